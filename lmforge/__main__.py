"""`python -m lmforge` and `torchrun ... -m lmforge`."""

import sys

from lmforge.cli import main

if __name__ == "__main__":
    sys.exit(main())

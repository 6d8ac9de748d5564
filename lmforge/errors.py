"""The one exception type that means "the user gave us bad input".

Library code raises `UserError` with a message that names the file, line or field at fault;
the CLI prints it as a single `error: ...` line and exits with code 2. Anything else that
escapes is a bug in lmforge and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed record, an invalid config value."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location prefix such as `data.jsonl:12: field 'text'`."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field is not None:
        loc += f": field '{field}'"
    return loc

"""Model families by name, as stored in a checkpoint's `config.json` ("family")."""

from collections.abc import Callable

from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder
from lmforge.models.transformer import Transformer, TransformerConfig

FAMILIES: dict[str, Callable[[TransformerConfig], Transformer]] = {
    "decoder": Decoder,
    "encoder": Encoder,
}

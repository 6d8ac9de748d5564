"""Model families by name, as stored in a checkpoint's `config.json` ("family")."""

from collections.abc import Callable

from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder
from lmforge.models.encoder_decoder import EncoderDecoder
from lmforge.models.transformer import Transformer, TransformerConfig

Model = Transformer | EncoderDecoder

FAMILIES: dict[str, Callable[[TransformerConfig], Model]] = {
    "decoder": Decoder,
    "encoder": Encoder,
    "encoder-decoder": EncoderDecoder,
}

from __future__ import annotations

import torch

from lmforge.models.decoder import Decoder
from lmforge.models.encoder import Encoder
from lmforge.models.transformer import TransformerConfig

CFG = TransformerConfig(vocab_size=50, n_layer=2, n_head=4, n_embd=32, max_seq_len=32)


def test_encoder_attention_is_bidirectional() -> None:
    torch.manual_seed(0)
    enc = Encoder(CFG).eval()
    x = torch.randint(0, 50, (2, 16))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 50
    with torch.no_grad():
        a, b = enc(x), enc(y)
    assert not torch.allclose(a[:, :12], b[:, :12])  # earlier positions see the later change


def test_encoder_and_decoder_differ_only_in_attention_direction() -> None:
    # One layer: deeper, the encoder's earlier positions already mix in later tokens.
    cfg = TransformerConfig(vocab_size=50, n_layer=1, n_head=4, n_embd=32, max_seq_len=32)
    torch.manual_seed(0)
    dec = Decoder(cfg).eval()
    enc = Encoder(cfg).eval()
    enc.load_state_dict(dec.state_dict())
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        d, e = dec(x), enc(x)
    # The last position attends to every token in both families.
    torch.testing.assert_close(d[:, -1], e[:, -1])
    assert not torch.allclose(d[:, 0], e[:, 0])

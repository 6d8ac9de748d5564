"""Encoder-only transformer (BERT family) for masked-token prediction.

Devlin et al. (2019) with today's blocks: the decoder's trunk (RMSNorm, rotary positions,
SwiGLU, optional grouped-query heads) with bidirectional attention, so every position sees the
whole block; the head over the vocabulary predicts the tokens hidden by `data/masking.py` and is
tied to the embedding by option. BERT's extra transform layer before the head is left out: with
a tied head and pre-norm blocks it adds parameters without a measured gain at this scale.
"""

from __future__ import annotations

from lmforge.models.transformer import Transformer, TransformerConfig


class Encoder(Transformer):
    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg, causal=False)

"""Caption decoder: a causal text decoder attending to the vision tower's tokens (CoCa's multimodal
text decoder, Yu et al. 2022; BLIP's image-grounded LM decoder, Li et al. 2022).

The language model is transformers' own ``BertLMHeadModel`` (``BertConfig(is_decoder=True,
add_cross_attention=True)``): causal self-attention over the caption, cross-attention to the
vision context, the MLM-style head tied to the input embeddings. It shares the corpus
tokenizer's vocabulary: a caption is ``[CLS] words [SEP]`` as curated, [CLS] the start token and
[SEP] the end token, so training reads the corpus's ``input_ids`` unchanged.

The vision context is the tower's token sequence (``VLModel.vision_tokens``: images and videos
through the same tower, (B, 1 + T*N, Wv)), either projected to the decoder width
(LayerNorm + Linear) or, with ``attn_pool_tokens`` > 0, pooled by CoCa's attentional pooler
(learned queries attending to the tokens), which gives the decoder a fixed-size context whatever
the number of frames.

    dec = CaptionDecoder(DecoderConfig(layers=2), vision_width=128, vocab_size=30522)
    ctx = dec.context(vision_tokens)                 # (B, M, W)
    logits = dec(ctx, input_ids, attention_mask)     # (B, L, vocab): next-token logits

Search (greedy, beam) lives in mm/generate.py; the loss in mm/objectives.py (``Captioning``).
Tested in tests/test_caption.py.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertLMHeadModel

from mm.config import DecoderConfig


def decoder_bert_config(cfg: DecoderConfig, vocab_size: int) -> BertConfig:
    """The transformers config of the decoder's language model."""
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.layers,
                      num_attention_heads=cfg.heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
                      max_position_embeddings=cfg.max_tokens, hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout, is_decoder=True, add_cross_attention=True,
                      tie_word_embeddings=True, attn_implementation="sdpa")


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler (OpenCLIP ``AttentionalPooler``): ``n`` learned queries attend to
    the (LayerNorm-ed) vision tokens; (B, M, Wv) -> (B, n, W)."""

    def __init__(self, width: int, vision_width: int, heads: int, n: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n, width) * width ** -0.5)
        self.ln_k = nn.LayerNorm(vision_width)
        self.ln_q = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, kdim=vision_width, vdim=vision_width, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        k = self.ln_k(tokens)
        q = self.ln_q(self.query).expand(tokens.shape[0], -1, -1)
        return self.attn(q, k, k, need_weights=False)[0]


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, vision_width: int, vocab_size: int) -> None:
        super().__init__()
        if cfg.layers < 1:
            raise ValueError("a caption decoder needs decoder.layers >= 1")
        self.cfg = cfg
        if cfg.attn_pool_tokens:
            self.pool = AttentionalPooler(cfg.width, vision_width, cfg.heads, cfg.attn_pool_tokens)
        else:
            self.pool = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, cfg.width))
        self.lm = BertLMHeadModel(decoder_bert_config(cfg, vocab_size))
        self.width = cfg.width

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder's transformer layers (for last-N fine-tuning)."""
        return self.lm.bert.encoder.layer

    def set_grad_checkpointing(self, enable: bool) -> None:
        if enable:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.lm.gradient_checkpointing_disable()

    def context(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Vision tokens (B, M, Wv) -> the cross-attention context (B, M', W)."""
        return self.pool(vision_tokens)

    def forward(self, context: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, vocab) logits; position i predicts token i + 1."""
        if input_ids.shape[1] > self.cfg.max_tokens:
            raise ValueError(f"{input_ids.shape[1]} tokens > decoder.max_tokens {self.cfg.max_tokens}")
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=context,
                       use_cache=False).logits


__all__ = ["CaptionDecoder", "AttentionalPooler", "decoder_bert_config"]

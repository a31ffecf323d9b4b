"""Single-stream fusion encoder: transformers BERT layers whose text tokens self-attend and then
cross-attend to the vision tokens (ALBEF's multimodal encoder, Li et al. 2021; FLAVA's
multimodal encoder, Singh et al. 2022). Used by image-text matching and image-conditioned MLM.

``forward(text (B, L, Wt), text_mask (B, L), vision (B, M, Wv)) -> (B, L, Wt)``.
Tested in tests/test_models.py.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer

from mm.config import FusionConfig


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 -> (B, 1, 1, L) additive attention bias: 0 where visible, dtype-min elsewhere."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig, text_width: int, vision_width: int) -> None:
        super().__init__()
        # transformers only builds cross-attention in "decoder" layers; the self-attention stays
        # bidirectional because we always pass an explicit (non-causal) mask.
        config = BertConfig(hidden_size=text_width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                            intermediate_size=4 * text_width, is_decoder=True, add_cross_attention=True,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            attn_implementation="sdpa")
        self.vision_proj = nn.Linear(vision_width, text_width)
        self.layers = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(cfg.depth))
        self.grad_checkpointing = False

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        v = self.vision_proj(vision)  # (B, M, Wt)
        self_bias = additive_mask(text_mask, text.dtype)
        cross_bias = torch.zeros(v.shape[0], 1, 1, v.shape[1], dtype=text.dtype, device=text.device)
        h = text
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(
                    lambda x, lyr=layer: lyr(x, self_bias, encoder_hidden_states=v,
                                             encoder_attention_mask=cross_bias)[0], h, use_reentrant=False)
            else:
                h = layer(h, self_bias, encoder_hidden_states=v, encoder_attention_mask=cross_bias)[0]
        return h

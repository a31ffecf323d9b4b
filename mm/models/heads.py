"""Task heads on top of the towers: the MLM head (transformers' BERT head), the ITM match head,
and the light MAE decoder for masked image/video modelling.

The projection heads and the logit scale belong to ``VLModel`` (they define the shared space);
the heads here belong to the objectives that train them and are not part of an exported model.
Tested in tests/test_models.py and tests/test_objectives.py.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertOnlyMLMHead


def build_mlm_head(width: int, vocab_size: int) -> nn.Module:
    """(B, L, W) -> (B, L, vocab) logits: dense + GELU + LayerNorm + decoder, as in BERT."""
    return BertOnlyMLMHead(BertConfig(hidden_size=width, vocab_size=vocab_size))


class ITMHead(nn.Module):
    """Fused [CLS] state (B, W) -> match / no-match logits (B, 2) (ALBEF)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.fc(cls)


class MaskedPatchDecoder(nn.Module):
    """MAE's light decoder (He et al. 2022): visible encoder tokens plus a shared mask token at
    every hidden position, own spatial and temporal position embeddings, a few timm blocks, and a
    linear layer predicting each patch's p*p*3 pixels."""

    def __init__(self, encoder_width: int, width: int, depth: int, heads: int, num_patches: int,
                 max_frames: int, patch_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, 1, num_patches, width))
        self.time = nn.Parameter(torch.zeros(1, max_frames, 1, width))
        for p in (self.mask_token, self.pos, self.time):
            nn.init.trunc_normal_(p, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch_dim)

    def forward(self, tokens: torch.Tensor, keep_idx: torch.Tensor, frames: int) -> torch.Tensor:
        """tokens (B, 1+K, We) from the encoder, keep_idx (B, K) -> predictions (B, T*N, patch_dim)."""
        b = tokens.shape[0]
        x = self.embed(tokens)  # (B, 1+K, Wd)
        n = self.pos.shape[2]
        full = self.mask_token.expand(b, frames * n, -1).clone()
        full = full.scatter(1, keep_idx[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])
        pos = (self.pos + self.time[:, :frames]).reshape(1, frames * n, -1)
        h = torch.cat([x[:, :1], full + pos], dim=1)
        for blk in self.blocks:
            h = blk(h)
        return self.pred(self.norm(h))[:, 1:]

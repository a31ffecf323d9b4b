"""Text tower: a transformers BERT encoder, built from ``TextConfig`` or loaded from a local
pretrained directory (e.g. MiniLM, ../shared/DATA.md).

``forward(input_ids (B, L), attention_mask (B, L)) -> (B, L, W)`` hidden states; ``pool`` takes
the [CLS] state or the masked mean. Tested in tests/test_models.py.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel

from mm.config import TextConfig


def bert_config(cfg: TextConfig, vocab_size: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                      num_attention_heads=cfg.heads, intermediate_size=int(cfg.width * cfg.mlp_ratio),
                      max_position_embeddings=max(cfg.max_tokens, 8), hidden_dropout_prob=cfg.dropout,
                      attention_probs_dropout_prob=cfg.dropout)


class TextTower(nn.Module):
    """``hf_config`` (a transformers config dict, as saved beside a checkpoint) rebuilds a
    pretrained architecture without its files; the weights then come from the checkpoint."""

    def __init__(self, cfg: TextConfig, vocab_size: int, hf_config: dict | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if hf_config is not None:
            d = dict(hf_config)
            self.bert = AutoModel.from_config(AutoConfig.for_model(d.pop("model_type"), **d), add_pooling_layer=False)
            if self.bert.config.vocab_size != vocab_size:
                raise ValueError(f"text config has vocab {self.bert.config.vocab_size}, expected {vocab_size}")
        elif cfg.pretrained_path:
            self.bert = AutoModel.from_pretrained(cfg.pretrained_path, add_pooling_layer=False)
            have = self.bert.config.vocab_size
            if have != vocab_size:
                raise ValueError(f"pretrained text tower {cfg.pretrained_path} has vocab {have} but the corpus "
                                 f"tokenizer has {vocab_size}; curate with that model's tokenizer")
            if self.bert.config.max_position_embeddings < cfg.max_tokens:
                raise ValueError(f"max_tokens {cfg.max_tokens} > the pretrained model's "
                                 f"{self.bert.config.max_position_embeddings} positions")
        else:
            self.bert = BertModel(bert_config(cfg, vocab_size), add_pooling_layer=False)
        self.width = self.bert.config.hidden_size

    @property
    def blocks(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def set_grad_checkpointing(self, enable: bool) -> None:
        if enable:
            self.bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.bert.gradient_checkpointing_disable()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, W) -> (B, W)."""
        if self.cfg.pool == "cls":
            return hidden[:, 0]
        m = attention_mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

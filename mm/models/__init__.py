"""The vision-language model: vision tower, text tower, projections into a shared space with a
learnable logit scale (and bias for SigLIP), and an optional fusion encoder.

    model = build_model(ModelConfig(), vocab_size=tok.vocab_size)
    img = model.encode_image(pixels)            # (B, 3, H, W) -> (B, D), L2-normalised
    vid = model.encode_video(frames)            # (B, T, 3, H, W) -> (B, D)
    txt = model.encode_text(input_ids, mask)    # (B, L) -> (B, D)

Per-token methods (``vision_tokens``, ``text_tokens``, ``fuse``) serve the fusion and masked
objectives; ``vision_features`` gives the pooled pre-projection feature for linear probes.
With ``model.decoder.layers`` > 0 the model also holds a caption decoder (``model.decoder``,
mm/models/decoder.py) and ``generate`` writes captions (mm/generate.py).
Single-device code: no Ray, no distributed wrapping (that lives in mm/train.py).
Tested in tests/test_models.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm.config import LockConfig, ModelConfig, ProjectionConfig
from mm.models.decoder import CaptionDecoder
from mm.models.fusion import FusionEncoder
from mm.models.text import TextTower
from mm.models.vision import build_vision_tower


def projection(width: int, embed_dim: int, kind: str, cfg: ProjectionConfig) -> nn.Module:
    """CLIP's linear projection (no bias, Radford et al. 2021) or the MLP of ``ProjectionConfig``."""
    if kind == "linear":
        proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(proj.weight, std=width ** -0.5)
        return proj
    hidden = cfg.hidden or 2 * embed_dim
    return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(width, hidden), nn.GELU(),
                         nn.Linear(hidden, embed_dim, bias=False))


class VLModel(nn.Module):
    """``text_hf_config``: the pretrained text tower's transformers config, to rebuild it from a
    checkpoint without its original files (``mm.checkpoint`` saves and passes it)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, text_hf_config: dict | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.vision = build_vision_tower(cfg.vision)
        self.text = TextTower(cfg.text, vocab_size, text_hf_config)
        self.vision_proj = projection(self.vision.width, cfg.embed_dim, cfg.proj.vision, cfg.proj)
        self.text_proj = projection(self.text.width, cfg.embed_dim, cfg.proj.text, cfg.proj)
        # Shape (1,), not a scalar: FSDP2's fully_shard refuses 0-d parameters. ``scale()`` returns
        # them as scalars.
        self.logit_scale = nn.Parameter(torch.tensor([cfg.init_logit_scale()]))
        # Only SigLIP trains a bias; for CLIP it stays a frozen 0 (DDP needs every trainable
        # parameter to get a gradient).
        self.logit_bias = nn.Parameter(torch.tensor([cfg.init_logit_bias()]), requires_grad=cfg.loss == "siglip")
        self.fusion = FusionEncoder(cfg.fusion, self.text.width, self.vision.width) if cfg.fusion.depth else None
        self.decoder = CaptionDecoder(cfg.decoder, self.vision.width, vocab_size) if cfg.decoder.layers else None

    # -- per-token features -------------------------------------------------------------------
    def vision_tokens(self, frames: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) or (B, T, 3, H, W) -> (B, 1 + T*N, Wv), class token first."""
        if frames.ndim == 4:
            frames = frames[:, None]
        return self.vision(frames, keep_idx)

    def text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, Wt)."""
        return self.text(input_ids, attention_mask)

    def fuse(self, text_tokens: torch.Tensor, attention_mask: torch.Tensor,
             vision_tokens: torch.Tensor) -> torch.Tensor:
        """Text tokens attending to vision tokens -> (B, L, Wt); needs ``fusion.depth > 0``."""
        if self.fusion is None:
            raise ValueError("this model has no fusion encoder; set model.fusion.depth > 0")
        return self.fusion(text_tokens, attention_mask, vision_tokens)

    # -- pooled and projected features ---------------------------------------------------------
    def vision_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Pooled pre-projection feature (B, Wv) of images (B,3,H,W) or videos (B,T,3,H,W)."""
        return self.vision.pool(self.vision_tokens(frames))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled pre-projection feature (B, Wt) of captions."""
        return self.text.pool(self.text_tokens(input_ids, attention_mask), attention_mask)

    def project_vision(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_vision_features(self.vision.pool(tokens))

    def project_text(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed_text_features(self.text.pool(tokens, attention_mask))

    def embed_vision_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled vision features (B, Wv) -> (B, D), L2-normalised: the projection alone."""
        return F.normalize(self.vision_proj(features), dim=-1)

    def embed_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled text features (B, Wt) -> (B, D), L2-normalised: the projection alone."""
        return F.normalize(self.text_proj(features), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D), L2-normalised."""
        return self.project_vision(self.vision_tokens(pixels[:, None]))

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, D), L2-normalised."""
        return self.project_vision(self.vision_tokens(frames))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, D), L2-normalised."""
        return self.project_text(self.text_tokens(input_ids, attention_mask), attention_mask)

    def scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """exp(logit_scale) clamped at exp(logit_scale_max) (CLIP clamps at 100), and the bias."""
        return self.logit_scale.clamp(max=self.cfg.logit_scale_max).exp().squeeze(0), self.logit_bias.squeeze(0)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Both embeddings and the scale, for callers that want CLIP's ``model(image, text)``."""
        vision = self.encode_image(pixels) if pixels.ndim == 4 else self.encode_video(pixels)
        return vision, self.encode_text(input_ids, attention_mask), self.scale()[0]

    # -- captions ------------------------------------------------------------------------------
    def generate(self, images_or_videos, max_tokens: int = 20, num_beams: int = 1, **kwargs) -> list[str]:
        """Captions of images or videos: what ``preprocess`` takes (PIL images, arrays, paths,
        bytes, lists of clips) or its tensors, (B, 3, H, W) / (B, T, 3, H, W). Greedy with
        ``num_beams`` 1, else beam search; needs a decoder and ``mm.load``'s tokenizer. See
        ``mm.generate.generate``."""
        from mm.generate import generate

        return generate(self, images_or_videos, max_tokens=max_tokens, num_beams=num_beams, **kwargs)

    # -- switches --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> VLModel:
        """A wholly locked tower stays in eval mode: LiT's locked towers compute fixed features,
        so their dropout would only add noise to them (the pretrained MiniLM has p=0.1), and
        features computed once (``train.frozen_features``) equal those of a training step."""
        super().train(mode)
        for tower in (self.vision, self.text):
            if mode and not any(p.requires_grad for p in tower.parameters()):
                tower.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.grad_checkpointing = enable
        self.text.set_grad_checkpointing(enable)
        if self.fusion is not None:
            self.fusion.grad_checkpointing = enable
        if self.decoder is not None:
            self.decoder.set_grad_checkpointing(enable)


def lock_towers(model: VLModel, cfg: LockConfig) -> list[str]:
    """Freeze towers LiT-style (Zhai et al. 2022); returns the frozen parameter names.

    A locked tower keeps its last ``*_unlocked_blocks`` blocks (and final norm) trainable; the
    projections, logit scale and fusion encoder are never locked here.
    """
    frozen: list[str] = []

    def lock(prefix: str, tower: nn.Module, blocks: nn.ModuleList, unlocked: int) -> None:
        keep = {id(p) for blk in list(blocks)[len(blocks) - unlocked:] for p in blk.parameters()} if unlocked else set()
        if unlocked and prefix == "vision":
            keep |= {id(p) for p in model.vision.norm.parameters()}
            if model.vision.temporal is not None:
                keep |= {id(p) for t in list(model.vision.temporal)[len(blocks) - unlocked:] for p in t.parameters()}
        for name, p in tower.named_parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
                frozen.append(f"{prefix}.{name}")

    if cfg.vision:
        lock("vision", model.vision, model.vision.blocks, cfg.vision_unlocked_blocks)
    if cfg.text:
        lock("text", model.text, model.text.blocks, cfg.text_unlocked_blocks)
    return frozen


def build_model(cfg: ModelConfig, vocab_size: int) -> VLModel:
    """Build the model and apply ``cfg.lock``."""
    model = VLModel(cfg, vocab_size)
    lock_towers(model, cfg.lock)
    return model


__all__ = ["VLModel", "build_model", "lock_towers"]

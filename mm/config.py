"""Model configuration: one frozen dataclass per component, nested into ``ModelConfig``.

The training job's other sections live with their owners (``mm.objectives.ObjectivesConfig``,
``mm.optim.OptimConfig``, ``mm.data.DataConfig``, ``mm.train.TrainConfig``). A ``ModelConfig``
is stored next to every checkpoint as ``config.json`` (``to_json`` / ``from_json``) so a model is
rebuilt without the YAML that trained it.

Tested in tests/test_models.py and tests/test_checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

# OpenAI CLIP's pixel statistics: the usual choice for image-text pretraining from scratch.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# torchvision's ImageNet statistics, for towers trained on them (e.g. its MobileNetV2 weights).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VisionConfig:
    """Image/video tower: a ViT, or a torchvision CNN trunk. Images are videos with T=1; frames
    share every weight."""

    image_px: int = 64
    patch_px: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_frames: int = 8
    # joint: one attention over all T*N tokens (ViViT "joint"); divided: time then space per
    # block (TimeSformer, Bertasius et al. 2021), cheaper for long clips.
    attention: Literal["joint", "divided"] = "joint"
    # avg (mean of patch tokens) learns much faster from scratch than the class token (seen on
    # the synthetic corpus: 24 steps to leave chance vs >100); use "token" for CLIP-style weights.
    # max (elementwise max over patch tokens) detects a part anywhere in the frame: on the demo's
    # shapes it learnt shape where avg and token pooling stayed near chance (docs/BENCHMARKS.md).
    pool: Literal["token", "avg", "max"] = "avg"
    # patch: the ViT's linear patch embedding. conv: a stride-2 3x3 conv stack (timm ConvStem,
    # BatchNorm + GELU) with the same total stride as patch_px, as in "Early convolutions help
    # transformers see better" (Xiao et al. 2021): far faster to learn from scratch on small data.
    stem: Literal["patch", "conv"] = "patch"
    drop_path_rate: float = 0.0
    # A timm model name (e.g. "vit_base_patch16_224") builds that architecture instead of the
    # width/depth/heads fields above; pretrained_path is a local weights file for it.
    timm_name: str | None = None
    # A torchvision CNN with a ``features`` trunk (e.g. "mobilenet_v2") instead of a ViT; then
    # pretrained_path is a torchvision state-dict file (e.g. its ImageNet weights, and set
    # mean/std to IMAGENET_MEAN/STD). No masked image modelling; pool token = avg = GAP.
    torchvision_name: str | None = None
    pretrained_path: str | None = None
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.image_px % self.patch_px:
            raise ValueError(f"image_px {self.image_px} is not a multiple of patch_px {self.patch_px}")
        if self.max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        if self.stem == "conv" and (self.timm_name is not None or self.patch_px & (self.patch_px - 1)):
            raise ValueError("stem=conv needs a power-of-two patch_px and no timm_name")
        if self.torchvision_name is not None and (self.timm_name is not None or self.stem != "patch"
                                                  or self.attention != "joint"):
            raise ValueError("torchvision_name builds a CNN tower: leave timm_name, stem and attention unset")
        if self.timm_name is None and self.torchvision_name is None and self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class TextConfig:
    """BERT-style text encoder, built from these fields or loaded from ``pretrained_path``."""

    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    max_tokens: int = 32
    pool: Literal["cls", "mean"] = "mean"  # mean: as sentence-transformers (MiniLM) pool
    dropout: float = 0.0
    # A local Hugging Face directory (config.json + weights), e.g. MiniLM (../shared/DATA.md);
    # its width/depth/heads replace the fields above.
    pretrained_path: str | None = None

    def __post_init__(self) -> None:
        if self.pretrained_path is None and self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class FusionConfig:
    """Single-stream encoder: BERT layers over text tokens with cross-attention to vision tokens
    (ALBEF, Li et al. 2021). depth 0 builds none; ITM and image-conditioned MLM need it."""

    depth: int = 0
    heads: int = 4


@dataclass(frozen=True)
class DecoderConfig:
    """Caption decoder (CoCa, Yu et al. 2022; BLIP's LM decoder, Li et al. 2022): causal
    transformers BERT layers over the caption with cross-attention to the vision tower's tokens,
    predicting the next token in the corpus tokenizer's vocabulary ([CLS] starts a caption,
    [SEP] ends it). layers 0 builds none (the default: nothing else changes).

    attn_pool_tokens > 0: CoCa's attentional pooler, that many learned queries attending to the
    vision tokens, so the decoder cross-attends to a fixed number of tokens whatever the frame
    count; 0: it attends to every vision token (projected to ``width``). max_tokens: the decoder's
    positions, prompt included. prompt: BLIP's text prefix ("a picture of"), fed after [CLS] in
    training and generation, never predicted and stripped from generated captions."""

    layers: int = 0
    width: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    attn_pool_tokens: int = 0
    max_tokens: int = 64
    dropout: float = 0.0
    prompt: str = ""

    def __post_init__(self) -> None:
        if self.layers < 0 or self.attn_pool_tokens < 0:
            raise ValueError("decoder.layers and decoder.attn_pool_tokens must be >= 0")
        if self.layers and self.width % self.heads:
            raise ValueError(f"decoder.width {self.width} is not divisible by decoder.heads {self.heads}")
        if self.max_tokens < 4:
            raise ValueError("decoder.max_tokens must be >= 4")


@dataclass(frozen=True)
class LockConfig:
    """LiT-style locking (Zhai et al. 2022): a locked tower gets no gradient, except its last
    ``*_unlocked_blocks`` transformer blocks (and, for vision, its projection)."""

    vision: bool = False
    vision_unlocked_blocks: int = 0
    text: bool = False
    text_unlocked_blocks: int = 0


@dataclass(frozen=True)
class ProjectionConfig:
    """The projections of the pooled tower features into the shared space, per tower.

    linear: CLIP's (no bias). mlp: OpenCLIP's ``timm_proj="mlp"`` / ``hf_proj_type="mlp"`` idea,
    Dropout(dropout) -> Linear(W, hidden) -> GELU -> Linear(hidden, embed_dim, no bias): more
    room for what a locked pretrained tower was not trained to express (LiT on the emoji set,
    docs/BENCHMARKS.md). ``hidden`` 0 means 2 x embed_dim, as timm's projection MLP."""

    vision: Literal["linear", "mlp"] = "linear"
    text: Literal["linear", "mlp"] = "linear"
    hidden: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("proj.hidden must be >= 0 and proj.dropout in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    lock: LockConfig = field(default_factory=LockConfig)
    embed_dim: int = 128
    proj: ProjectionConfig = field(default_factory=ProjectionConfig)
    # clip: InfoNCE with a learnable temperature, init 1/0.07 (Radford et al. 2021);
    # siglip: sigmoid loss with scale init 10 and bias init -10 (Zhai et al. 2023).
    loss: Literal["clip", "siglip"] = "clip"
    logit_scale_max: float = math.log(100.0)

    def init_logit_scale(self) -> float:
        return math.log(10.0) if self.loss == "siglip" else math.log(1 / 0.07)

    def init_logit_bias(self) -> float:
        return -10.0 if self.loss == "siglip" else 0.0


def to_json(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Knobs removed in issue 19 (they bought ~+0.01 R@1 on one benchmark at up to 2x the training
# cost), with the value that meant "off" (None: any value, it did nothing alone). A config.json
# saved before then carries them at these values and still loads; any other value is refused.
_REMOVED = {("vision", "hypercolumn_stages"): [], ("vision", "scales_px"): [], ("vision", "pyramid_stages"): [],
            ("vision", "pyramid_cells"): None, ("proj", "heads"): 1}


def from_json(data: dict[str, Any]) -> ModelConfig:
    """Rebuild a ModelConfig from ``to_json`` output; unknown keys are an error, missing ones default."""
    from core.config import ConfigError, build

    data = dict(data)
    for (section, key), off in _REMOVED.items():
        part = data.get(section)
        if isinstance(part, dict) and key in part:
            value = part[key]
            if off is not None and (list(value) if isinstance(value, (list, tuple)) else value) != off:
                raise ConfigError(f"model.{section}.{key}={value!r}: this knob was removed (docs/BENCHMARKS.md, "
                                  "LiT); a model trained with it cannot be rebuilt, retrain without it")
            data[section] = {k: v for k, v in part.items() if k != key}
    return build(ModelConfig, data)


__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "VisionConfig", "TextConfig", "FusionConfig", "DecoderConfig",
           "LockConfig", "ProjectionConfig", "ModelConfig", "to_json", "from_json"]

"""Vision towers: a timm ViT shared by images (T=1) and videos (T frames), or a pretrained
torchvision CNN (``CNNTower``, for LiT-style runs on ImageNet weights).

Every frame goes through the same patch embedding and spatial position embedding; a learned
temporal position embedding (one row per frame index, ``max_frames`` rows) is added on top, so an
image is a one-frame video at frame 0 and image and video batches train the same weights
(as in UMT, Li et al. 2023). Attention over the (T, N) tokens is either

* ``joint``: one sequence of 1 + T*N tokens through the timm blocks (ViViT model 1), or
* ``divided``: per block, attention over time for each patch position, then timm's block over
  space per frame with the class token (TimeSformer, Bertasius et al. 2021).

``forward(frames, keep_idx)`` accepts the indices of visible patches so masked image/video
modelling runs the encoder on visible tokens only (MAE, He et al. 2022; VideoMAE, Tong et al.
2022). With divided attention the visible set must be the same spatial positions in every frame,
which tube masking guarantees.

A CNN tower (``vision.torchvision_name``) returns the same token layout: its last feature map's
positions are the patch tokens (B, 1 + T*h*w, C), with their mean as the leading token. It has no
position or temporal embedding and no masked modelling (MIM needs a ViT).

Tested in tests/test_models.py.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import Attention, DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm.config import VisionConfig


class TemporalAttention(nn.Module):
    """Pre-norm attention over the T frames of each patch position; output projection is
    zero-initialised so a fresh (or image-pretrained) tower starts as a per-frame ViT."""

    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t, n, d = tokens.shape
        x = tokens.permute(0, 2, 1, 3).reshape(b * n, t, d)  # (B*N, T, D)
        x = x + self.drop_path(self.fc(self.attn(self.norm(x))))
        return x.view(b, n, t, d).permute(0, 2, 1, 3)


def _build_vit(cfg: VisionConfig) -> nn.Module:
    kwargs = dict(num_classes=0, img_size=cfg.image_px, drop_path_rate=cfg.drop_path_rate)
    if cfg.timm_name:
        # A timm model keeps its own pooling head (token, or avg with fc_norm), so its pretrained
        # norms load as trained; ``VisionTower.pool`` applies fc_norm when it exists.
        pretrained = cfg.pretrained_path is not None
        overlay = {"file": cfg.pretrained_path} if pretrained else None
        return timm.create_model(cfg.timm_name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)
    from timm.models.vision_transformer import VisionTransformer

    # global_pool="token" keeps the final LayerNorm on every token (fusion, MAE and both poolings
    # use normed tokens) and makes fc_norm an Identity: no parameter without a gradient.
    vit = VisionTransformer(patch_size=cfg.patch_px, embed_dim=cfg.width, depth=cfg.depth,
                            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, global_pool="token", **kwargs)
    if cfg.stem == "conv":
        # Swap the patch projection for a conv stack of the same total stride: PatchEmbed still
        # flattens (B, D, H/p, W/p) into tokens, so grid, positions and patchify are unchanged.
        from timm.models.vision_transformer_hybrid import ConvStem

        n = cfg.patch_px.bit_length() - 1  # stride-2 convs
        channels = tuple(max(cfg.width // 2 ** (n - 1 - i), 16) for i in range(n - 1)) + (cfg.width,)
        vit.patch_embed.proj = ConvStem(depth=n, channels=channels, stride=(2,) * n, padding=1,
                                        act_layer=nn.GELU)
    return vit


def _sync_norm_modes(norms: list[nn.Module], training: bool) -> None:
    """BatchNorms train only while their weights do: a frozen (LiT-locked or partially fine-tuned)
    conv layer keeps its running statistics instead of drifting through them."""
    for bn in norms:
        bn.train(training and any(p.requires_grad for p in bn.parameters()))


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class VisionTower(nn.Module):
    supports_masking = True

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = _build_vit(cfg)
        if getattr(self.vit, "reg_token", None) is not None or getattr(self.vit, "cls_token", None) is None:
            raise ValueError("vision tower needs a ViT with a class token and no register tokens")
        self.width = self.vit.embed_dim
        self.patch_px = self.vit.patch_embed.patch_size[0]
        self.grid = self.vit.patch_embed.grid_size  # (H/p, W/p)
        self.num_patches = self.grid[0] * self.grid[1]
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.max_frames, 1, self.width))
        nn.init.trunc_normal_(self.time_embed, std=0.02)
        self.temporal = None
        if cfg.attention == "divided":
            depth = len(self.vit.blocks)
            heads = self.vit.blocks[0].attn.num_heads
            rates = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, depth)]
            self.temporal = nn.ModuleList(TemporalAttention(self.width, heads, r) for r in rates)
        self.grad_checkpointing = False
        # A conv stem's BatchNorms: kept in eval mode while their weights are frozen (LiT locks,
        # partial fine-tunes), so a "frozen" stem does not drift through its running statistics.
        self._stem_norms = _batch_norms(self.vit.patch_embed)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @property
    def norm(self) -> nn.Module:
        """The final norm, trained with the last blocks when a locked tower unlocks some."""
        return self.vit.norm

    def embed(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 3, H, W) -> class token (B, 1, D) and patch tokens (B, T, N, D), position-embedded."""
        b, t = frames.shape[:2]
        if t > self.cfg.max_frames:
            raise ValueError(f"{t} frames > max_frames {self.cfg.max_frames}")
        _sync_norm_modes(self._stem_norms, self.training)
        x = self.vit.patch_embed(frames.flatten(0, 1))  # (B*T, N, D)
        pos = self.vit.pos_embed  # (1, 1+N, D) with the class position first
        x = x + pos[:, 1:]
        x = x.view(b, t, self.num_patches, self.width) + self.time_embed[:, :t]
        cls = (self.vit.cls_token + pos[:, :1]).expand(b, -1, -1)
        return cls, x

    def forward(self, frames: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Encode (B, T, 3, H, W); returns normed tokens (B, 1 + T*K, D), class token first.

        keep_idx: optional (B, T*K) indices into the T*N patch tokens (frame-major) to keep;
        with divided attention they must keep K positions per frame (tube masking).
        """
        cls, x = self.embed(frames)
        b, t, n, d = x.shape
        if keep_idx is not None:
            x = torch.gather(x.reshape(b, t * n, d), 1, keep_idx[..., None].expand(-1, -1, d))
            x = x.view(b, t, -1, d)  # (B, T, K, D)
        if self.temporal is None:
            h = torch.cat([cls, x.flatten(1, 2)], dim=1)
            h = self.vit.norm_pre(self.vit.pos_drop(h))
            for blk in self.vit.blocks:
                h = self._run(blk, h)
        else:
            h = self._divided(cls, x)
        return self.vit.norm(h)

    def _divided(self, cls: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, t, k, d = x.shape
        for temporal, blk in zip(self.temporal, self.vit.blocks):
            x = self._run(temporal, x)
            # Space: each frame with its own copy of the class token, which is then averaged
            # over frames (TimeSformer's treatment of the CLS token).
            h = torch.cat([cls.repeat_interleave(t, 0), x.reshape(b * t, k, d)], dim=1)  # (B*T, 1+K, D)
            h = self._run(blk, h)
            cls = h[:, :1].view(b, t, 1, d).mean(1)
            x = h[:, 1:].view(b, t, k, d)
        return torch.cat([cls, x.flatten(1, 2)], dim=1)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1+M, D) -> (B, D): the class token, or the mean / elementwise max of patch tokens."""
        if self.cfg.pool == "token":
            return tokens[:, 0]
        patches = tokens[:, 1:]
        return self.vit.fc_norm(patches.amax(1) if self.cfg.pool == "max" else patches.mean(1))

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T*N, p*p*3) pixel patches in the order of the patch tokens."""
        b, t, c, h, w = frames.shape
        p = self.patch_px
        x = frames.reshape(b, t, c, h // p, p, w // p, p)
        return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, t * (h // p) * (w // p), p * p * c)


class CNNTower(nn.Module):
    """A torchvision CNN's convolutional trunk (``model.features``: MobileNet, EfficientNet,
    ConvNeXt, ...) as a vision tower, e.g. MobileNetV2 on its ImageNet weights for LiT
    (Zhai et al. 2022). ``vision.pretrained_path`` is a torchvision state-dict file.

    Frames are encoded independently; the tokens are the positions of the last feature map
    (B, 1 + T*h*w, C) with their mean first, so pooling, fusion cross-attention and evaluation
    see the ViT tower's layout. ``blocks`` are the trunk's stages, for locking and last-N
    fine-tunes.
    """

    supports_masking = False
    temporal = None

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        import torchvision

        self.cfg = cfg
        net = torchvision.models.get_model(cfg.torchvision_name)
        if cfg.pretrained_path is not None:
            state = torch.load(cfg.pretrained_path, map_location="cpu", weights_only=True)
            net.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        features = getattr(net, "features", None)
        if not isinstance(features, nn.Sequential):
            raise ValueError(f"torchvision model {cfg.torchvision_name!r} has no `features` trunk "
                             "(MobileNet, EfficientNet, ConvNeXt, VGG and DenseNet have one)")
        self.features = features  # the classifier is dropped
        self.grad_checkpointing = False
        with torch.no_grad():
            self.features.eval()  # the shape probe must not touch BatchNorm statistics
            fmap = self.feature_map(torch.zeros(1, 3, cfg.image_px, cfg.image_px))
        self.width = fmap.shape[1]
        self.grid = tuple(fmap.shape[2:])
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_px = cfg.image_px // self.grid[0]  # the trunk's total stride
        self._norms = _batch_norms(self.features)

    @property
    def blocks(self) -> nn.Sequential:
        return self.features

    @property
    def norm(self) -> nn.Module:
        return nn.Identity()  # a CNN's norms live inside its stages

    def forward(self, frames: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, 1 + T*h*w, C): mean token first, then every frame's positions."""
        if keep_idx is not None:
            raise ValueError("a CNN vision tower cannot encode a subset of patches; masked image "
                             "modelling needs a ViT tower")
        b, t = frames.shape[:2]
        if t > self.cfg.max_frames:
            raise ValueError(f"{t} frames > max_frames {self.cfg.max_frames}")
        _sync_norm_modes(self._norms, self.training)
        x = self.feature_map(frames.flatten(0, 1))
        x = x.flatten(2).transpose(1, 2).reshape(b, -1, self.width)  # (B, T*h*w, C)
        return torch.cat([x.mean(1, keepdim=True), x], dim=1)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, h, w): the trunk's last map."""
        for stage in self.features:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + T*h*w, C) -> (B, C). token and avg: global average pooling; max: global max pooling."""
        return tokens[:, 1:].amax(1) if self.cfg.pool == "max" else tokens[:, 0]

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        raise ValueError("masked image modelling needs a ViT tower")


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    return CNNTower(cfg) if cfg.torchvision_name else VisionTower(cfg)

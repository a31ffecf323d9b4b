"""Portable export of the dual-stream towers as Hugging Face ``transformers`` models.

    export_hf("runs/pre", "exports/pre")          # or: mm export --model runs/pre --out exports/pre
    enc = load_hf_export("exports/pre")           # needs transformers + safetensors only, not mm
    img = enc.encode_image(pixels)                # (B, 3, H, W), normalised with enc.mean/enc.std
    txt = enc.encode_text(**enc.tokenizer(["a red circle"], return_tensors="pt", padding=True))

Layout (a Hugging Face user needs nothing of this project):

    EXPORT/vision/       transformers ViTModel (config.json + model.safetensors), no pooler
    EXPORT/text/         transformers BertModel + its tokenizer files
    EXPORT/projection.safetensors   visual_projection (D, Wv), text_projection (D, Wt), logit_scale
    EXPORT/export_config.json       pooling per tower, image size, mean/std, max_tokens, usage

An embedding is ``normalize(projection @ pool(last_hidden_state))`` with ``pool`` = the [CLS]
state, the mean or the elementwise max of the patch states (vision) / the masked mean of the
tokens (text), as written in export_config.json. The timm ViT maps onto ``ViTModel`` exactly:
fused ``qkv`` splits into query/key/value, and the image's frame-0 temporal embedding is folded
into the patch position embeddings (an image is a one-frame video). Joint space-time attention
and the linear patch stem only (``divided`` attention adds temporal blocks and ``stem=conv`` a
conv stack that a ViTModel cannot hold); videos are not exported.

Chosen over OpenCLIP: OpenCLIP builds timm towers by registered model name only, so the custom
widths/depths trained here would not load; ``transformers`` takes any size through its config.
Round trip tested in tests/test_export.py (embeddings equal to 1e-5).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

FORMAT = "mm-dual-encoder-hf/1"


def vit_to_hf_state(vit, time_embed0: torch.Tensor) -> dict[str, torch.Tensor]:
    """timm VisionTransformer state -> transformers ViTModel state (add_pooling_layer=False)."""
    sd = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    d = vit.embed_dim
    pos = sd["pos_embed"].clone()
    pos[:, 1:] += time_embed0.reshape(1, 1, d)  # frame-0 temporal embedding of an image
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": pos,
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    for i in range(len(vit.blocks)):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            out[h + f"attention.attention.{name}.weight"] = qkv_w[j * d:(j + 1) * d]
            out[h + f"attention.attention.{name}.bias"] = qkv_b[j * d:(j + 1) * d]
        pairs = {"attention.output.dense": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
                 "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
        for hf, tm in pairs.items():
            out[h + hf + ".weight"], out[h + hf + ".bias"] = sd[b + tm + ".weight"], sd[b + tm + ".bias"]
    return out


def export_hf(model_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (layout in the module docstring) from a run dir or model dir."""
    from safetensors.torch import save_file
    from transformers import ViTConfig, ViTModel

    from mm.checkpoint import load_model, model_dir

    src = model_dir(model_path)
    model, cfg = load_model(src)
    model.eval()
    if cfg.vision.torchvision_name:
        raise ValueError(f"export writes a transformers ViTModel; a torchvision CNN tower ({cfg.vision.torchvision_name}) "
                         "has none: load the model with mm.load instead")
    if "mlp" in (cfg.proj.vision, cfg.proj.text):
        raise ValueError("export writes CLIP's linear visual/text projections; this model has an mlp projection "
                         "(model.proj): load it with mm.load instead")
    if cfg.proj.heads > 1:
        raise ValueError(f"export writes one visual/text projection pair; this model has an ensemble of {cfg.proj.heads} "
                         "(model.proj.heads): load it with mm.load instead")
    vit = model.vision.vit
    if model.vision.temporal is not None:
        raise ValueError("export supports vision.attention=joint only (divided attention has temporal blocks)")
    if cfg.vision.stem != "patch":
        raise ValueError(f"export supports vision.stem=patch only (a {cfg.vision.stem} stem has no transformers "
                         "ViTModel equivalent)")
    if not getattr(vit.blocks[0].attn, "qkv", None) or vit.blocks[0].attn.qkv.bias is None:
        raise ValueError("export expects timm ViT blocks with a fused, biased qkv projection")
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mlp = vit.blocks[0].mlp.fc1
    vcfg = ViTConfig(hidden_size=vit.embed_dim, num_hidden_layers=len(vit.blocks),
                     num_attention_heads=vit.blocks[0].attn.num_heads, intermediate_size=mlp.out_features,
                     hidden_act="gelu", layer_norm_eps=vit.norm.eps, image_size=cfg.vision.image_px,
                     patch_size=model.vision.patch_px, num_channels=3, qkv_bias=True,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf_vit = ViTModel(vcfg, add_pooling_layer=False)
    hf_vit.load_state_dict(vit_to_hf_state(vit, model.vision.time_embed[0, 0, 0]), strict=True)
    hf_vit.save_pretrained(str(out / "vision"), safe_serialization=True)
    model.text.bert.save_pretrained(str(out / "text"), safe_serialization=True)
    if (src / "tokenizer").is_dir():
        for f in (src / "tokenizer").iterdir():
            shutil.copy2(f, out / "text" / f.name)
    save_file({"visual_projection": model.vision_proj.weight.detach().contiguous(),
               "text_projection": model.text_proj.weight.detach().contiguous(),
               "logit_scale": model.logit_scale.detach().reshape(1).contiguous()},
              str(out / "projection.safetensors"))
    meta = {"format": FORMAT, "source": str(src.resolve()), "embed_dim": cfg.embed_dim,
            "vision_pool": {"token": "cls", "avg": "mean", "max": "max"}[cfg.vision.pool], "text_pool": cfg.text.pool,
            "image_size": cfg.vision.image_px, "mean": list(cfg.vision.mean), "std": list(cfg.vision.std),
            "max_tokens": cfg.text.max_tokens,
            "usage": "embedding = normalize(projection @ pool(last_hidden_state)); see mm/export.py"}
    (out / "export_config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out


@dataclass
class HFDualEncoder:
    """The exported towers, loaded with transformers + safetensors only."""

    vision: torch.nn.Module
    text: torch.nn.Module
    visual_projection: torch.Tensor
    text_projection: torch.Tensor
    logit_scale: float
    config: dict
    tokenizer: object

    @property
    def mean(self) -> list[float]:
        return self.config["mean"]

    @property
    def std(self) -> list[float]:
        return self.config["std"]

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = self.vision(pixel_values=pixel_values).last_hidden_state  # (B, 1+N, Wv)
        pool = self.config["vision_pool"]
        pooled = h[:, 0] if pool == "cls" else h[:, 1:].amax(1) if pool == "max" else h[:, 1:].mean(1)
        return F.normalize(pooled @ self.visual_projection.T, dim=-1)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> torch.Tensor:
        h = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, Wt)
        if self.config["text_pool"] == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask[..., None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(pooled @ self.text_projection.T, dim=-1)


def load_hf_export(path: str | Path) -> HFDualEncoder:
    """What a Hugging Face user writes to load an export (no mm code involved)."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    p = Path(path)
    config = json.loads((p / "export_config.json").read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{p} is not an {FORMAT} export")
    proj = load_file(str(p / "projection.safetensors"))
    vision = AutoModel.from_pretrained(str(p / "vision"), add_pooling_layer=False).eval()
    text = AutoModel.from_pretrained(str(p / "text"), add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(str(p / "text"))
    return HFDualEncoder(vision, text, proj["visual_projection"], proj["text_projection"],
                         float(proj["logit_scale"].exp()), config, tok)


__all__ = ["FORMAT", "export_hf", "load_hf_export", "HFDualEncoder", "vit_to_hf_state"]

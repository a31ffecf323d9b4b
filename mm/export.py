"""Export of a run's dual-stream towers to formats other libraries load: OpenCLIP, or a timm +
transformers directory. Image and text embeddings round-trip to 1e-5 (tests/test_export.py,
loaded with those libraries alone); videos, the fusion encoder and task heads stay in mm.

    export("runs/lit", "exports/lit", to="hf")        # or: mm export --model RUN --to hf --out DIR
    export("runs/pre", "exports/pre", to="openclip")

``--to hf`` (any tower mm builds except TimeSformer's divided attention):

    EXPORT/vision/          a timm model dir: timm.create_model("local-dir:EXPORT/vision", pretrained=True)
                            returns the pooled image feature (num_classes=0)
    EXPORT/text/            a transformers model (BERT) + the run's tokenizer
    EXPORT/projection.safetensors   vision.N.* / text.N.* layers, logit_scale (and logit_bias)
    EXPORT/export_config.json       how to compose them: text pooling, each projection's layers
                                    (["linear", in, out, bias] / ["gelu"], torch.nn.Sequential
                                    order), image size, mean/std, max_tokens, the vision tower's
                                    embed_layer when it has a conv stem

``embedding = normalize(projection(feature))``; the vision feature is the timm model's output, the
text feature the masked mean (or [CLS] state) of the transformers model's last hidden state.
A conv stem (``vision.stem=conv``) is timm's own ``ConvStem`` inside timm's ``HybridEmbed``, the
way timm builds its hybrid ViTs; its arguments are JSON, so the caller adds
``embed_layer=partial(HybridEmbed, backbone=ConvStem(**spec["backbone"]), proj=False)``
(export_config.json ``vision.embed_layer``); without it timm refuses the weights (strict load).

``--to openclip``: ``open_clip.create_model_and_transforms("local-dir:EXPORT")`` and
``open_clip.get_tokenizer("local-dir:EXPORT")`` give a ``CustomTextCLIP`` (timm vision tower +
Hugging Face text tower, OpenCLIP's ``timm_model_name`` / ``hf_model_name``). OpenCLIP builds
those towers from names, so ``open_clip_config.json`` names ``EXPORT/text`` (and, for a ViT,
``local-dir:EXPORT/vision``, its timm architecture) by absolute path: after moving the
directory, rewrite those paths. It holds less than ``hf``: no conv stem (the timm name carries
no ``embed_layer``), an MLP image projection only with 2 x embed_dim hidden units and no MLP
text projection (OpenCLIP's own MLP shapes); those are refused with one line naming the part.

Weight mapping: the ViT is already timm's (the image's frame-0 temporal embedding is folded into
the patch position embeddings: an image is a one-frame video); torchvision's MobileNetV2 trunk
is timm's ``mobilenetv2_100`` parameter for parameter, in the same order. Tested in
tests/test_export.py.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import nn

FORMAT = "mm-dual-encoder/2"
VIT_ARCH = "vit_base_patch16_224"  # timm's ViT entry point; model_args give every size


class ExportError(ValueError):
    """A model part no target format holds (the message names it)."""


# -- towers -> timm / transformers ------------------------------------------------------------
def timm_vision(model, cfg) -> tuple[nn.Module, dict | None]:
    """The vision tower as a timm model (num_classes=0: returns the pooled feature) and, for a
    conv stem, the JSON spec of its embed layer."""
    tower = model.vision
    if cfg.vision.torchvision_name:
        return _cnn_to_timm(tower, cfg), None
    if tower.temporal is not None:
        raise ExportError("vision.attention=divided: TimeSformer's temporal blocks have no timm or OpenCLIP "
                          "tower; export a model with vision.attention=joint")
    return _vit_to_timm(tower, cfg)


def _vit_to_timm(tower, cfg) -> tuple[nn.Module, dict | None]:
    import timm

    vit = tower.vit
    args = dict(img_size=cfg.vision.image_px, num_classes=0, global_pool=_timm_pool(cfg),
                fc_norm=not isinstance(vit.fc_norm, nn.Identity))
    if not cfg.vision.timm_name:
        args.update(patch_size=tower.patch_px, embed_dim=vit.embed_dim, depth=len(vit.blocks),
                    num_heads=vit.blocks[0].attn.num_heads, mlp_ratio=cfg.vision.mlp_ratio)
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    state["pos_embed"][:, 1:] += tower.time_embed[0, 0].detach()  # frame 0's temporal embedding
    spec = None
    if cfg.vision.stem == "conv":
        from timm.layers import HybridEmbed
        from timm.models.vision_transformer_hybrid import ConvStem

        convs = [m for m in vit.patch_embed.proj.children()]
        spec = {"class": "timm.layers.HybridEmbed", "proj": False,
                "backbone": {"class": "timm.models.vision_transformer_hybrid.ConvStem", "depth": len(convs),
                             "channels": [c.conv.out_channels for c in convs],
                             "stride": [c.conv.stride[0] for c in convs],
                             "kernel_size": [c.conv.kernel_size[0] for c in convs],
                             "padding": [c.conv.padding[0] for c in convs], "act_layer": "gelu"}}
        backbone = ConvStem(**{k: v for k, v in spec["backbone"].items() if k != "class"})
        args["patch_size"] = 1  # HybridEmbed's patches are the stem's output positions
        out = timm.create_model(VIT_ARCH, pretrained=False, embed_layer=partial(HybridEmbed, backbone=backbone,
                                                                                proj=False), **args)
        out._model_args.pop("embed_layer")  # not JSON: export_config.json carries its spec instead
        state = {k.replace("patch_embed.proj.", "patch_embed.backbone.", 1): v for k, v in state.items()}
    else:
        out = timm.create_model(cfg.vision.timm_name or VIT_ARCH, pretrained=False, **args)
    out.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=True)
    return out.eval(), spec


def _cnn_to_timm(tower, cfg) -> nn.Module:
    import timm

    if cfg.vision.torchvision_name != "mobilenet_v2":
        raise ExportError(f"vision.torchvision_name={cfg.vision.torchvision_name}: only torchvision's mobilenet_v2 "
                          "maps onto a timm model (mobilenetv2_100)")
    out = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0, global_pool=_timm_pool(cfg))
    src, dst = tower.features.state_dict(), out.state_dict()
    pairs = list(zip(src, dst))
    if len(src) != len(dst) or any(src[a].shape != dst[b].shape or a.rsplit(".", 1)[1] != b.rsplit(".", 1)[1]
                                   for a, b in pairs):
        raise ExportError("vision: this torchvision mobilenet_v2 trunk does not match timm's mobilenetv2_100")
    out.load_state_dict({b: src[a].detach().clone() for a, b in pairs}, strict=True)
    return out.eval()


def projection_layers(proj: nn.Module, name: str) -> tuple[list[list], dict[str, torch.Tensor]]:
    """mm's projection as a torch.nn.Sequential spec (["linear", in, out, bias] / ["gelu"]) and its
    weights keyed by that Sequential's indices."""
    if isinstance(proj, nn.Linear):
        layers = [proj]
    elif (isinstance(proj, nn.Sequential) and [type(m) for m in proj] == [nn.Dropout, nn.Linear, nn.GELU, nn.Linear]):
        layers = list(proj)[1:]  # the dropout is the identity at inference
    else:
        raise ExportError(f"model.proj: a {type(proj).__name__} projection (an ensemble) has no equivalent in the "
                          "export formats; export a model with one projection per tower")
    spec, state = [], {}
    for i, m in enumerate(layers):
        if isinstance(m, nn.Linear):
            spec.append(["linear", m.in_features, m.out_features, m.bias is not None])
            state[f"{name}.{i}.weight"] = m.weight.detach().clone()
            if m.bias is not None:
                state[f"{name}.{i}.bias"] = m.bias.detach().clone()
        else:
            spec.append(["gelu"])
    return spec, state


def _text_dir(model, src: Path, out: Path):
    """Save the text tower (transformers) + the run's tokenizer into ``out``; returns the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src / "tokenizer"))
    bert = model.text.bert
    bert.config.pad_token_id = tok.pad_token_id  # OpenCLIP's HF tower masks padding by this id
    bert.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return tok


def _timm_pool(cfg) -> str:
    """timm's global_pool for mm's pooling (a CNN's token and avg pooling are both the mean)."""
    if cfg.vision.torchvision_name:
        return "max" if cfg.vision.pool == "max" else "avg"
    return {"token": "token", "avg": "avg", "max": "max"}[cfg.vision.pool]


# -- writers ----------------------------------------------------------------------------------
def export(model_path: str | Path, out_dir: str | Path, to: Literal["openclip", "hf"]) -> Path:
    """Write ``out_dir`` (replaced) in format ``to`` from a run dir or model dir; an unexportable
    part raises ``ExportError`` before anything is written."""
    from mm.checkpoint import load_model, model_dir

    if to not in ("openclip", "hf"):
        raise ExportError(f"--to {to}: valid formats are openclip, hf")
    src = model_dir(model_path)
    model, cfg = load_model(src)
    model.eval()
    vision, embed_layer = timm_vision(model, cfg)
    vproj, vstate = projection_layers(model.vision_proj, "vision")
    tproj, tstate = projection_layers(model.text_proj, "text")
    has_decoder = getattr(model, "decoder", None) is not None
    if to == "openclip":
        _check_openclip(cfg, embed_layer, vproj, tproj)
        if has_decoder:
            raise ExportError("model.decoder: OpenCLIP's CoCa text decoder is another architecture; "
                              "export the caption decoder with --to hf")
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = {"mean": list(cfg.vision.mean), "std": list(cfg.vision.std), "crop_pct": 1.0, "interpolation": "bicubic"}
    from timm.models import save_for_hf

    # timm's own model dir (config.json: architecture + model_args + preprocessing)
    save_for_hf(vision, str(out / "vision"), safe_serialization=True, data_config=data,
                model_config={"pretrained_cfg": {"tag": "mm"}, **({"embed_layer": embed_layer} if embed_layer else {})})
    tok = _text_dir(model, src, out / "text")
    scales = {"logit_scale": model.logit_scale.detach().reshape(()).clone()}
    if cfg.loss == "siglip":
        scales["logit_bias"] = model.logit_bias.detach().reshape(()).clone()
    if to == "hf":
        _write_hf(out, cfg, src, vproj, tproj, {**vstate, **tstate, **scales}, embed_layer)
        if has_decoder:  # a transformers BertLMHeadModel dir + its vision-context layers (mm/caption.py)
            from mm.caption import export_decoder_hf

            meta = json.loads((out / "export_config.json").read_text(encoding="utf-8"))
            meta["decoder"] = export_decoder_hf(model, src / "tokenizer", out)
            (out / "export_config.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    else:
        _write_openclip(out, cfg, vision, vstate, tstate, scales, model.text.bert)
        tok.save_pretrained(str(out))  # get_tokenizer("local-dir:EXPORT") reads the tokenizer there
    return out


def _write_hf(out: Path, cfg, src: Path, vproj, tproj, tensors: dict, embed_layer: dict | None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "projection.safetensors"))
    meta = {"format": FORMAT, "source": str(src.resolve()), "embed_dim": cfg.embed_dim,
            "vision": {"library": "timm", "dir": "vision", "embed_layer": embed_layer,
                       "image_size": cfg.vision.image_px, "mean": list(cfg.vision.mean), "std": list(cfg.vision.std)},
            "text": {"library": "transformers", "dir": "text", "pool": cfg.text.pool, "max_tokens": cfg.text.max_tokens},
            "projection": {"vision": vproj, "text": tproj},
            "usage": "embedding = normalize(projection(feature)); vision feature = timm.create_model("
                     "'local-dir:vision', pretrained=True)(pixels); text feature = masked mean (pool mean) or "
                     "[CLS] state of the transformers model's last_hidden_state; see mm/export.py"}
    (out / "export_config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def _check_openclip(cfg, embed_layer: dict | None, vproj: list, tproj: list) -> None:
    if embed_layer is not None:
        raise ExportError("vision.stem=conv: OpenCLIP builds its timm tower from a name, which cannot carry the "
                          "conv stem; use --to hf")
    if len(vproj) > 1 and vproj[0][2] != 2 * cfg.embed_dim:
        raise ExportError(f"model.proj.hidden={vproj[0][2]}: OpenCLIP's timm_proj=mlp has 2 x embed_dim = "
                          f"{2 * cfg.embed_dim} hidden units; use --to hf")
    if len(tproj) > 1:
        raise ExportError("model.proj.text=mlp: OpenCLIP's hf_proj_type=mlp is another MLP (no biases, "
                          "(width + embed_dim) / 2 hidden units); use --to hf")


def _write_openclip(out: Path, cfg, vision: nn.Module, vstate: dict, tstate: dict, scales: dict, bert) -> None:
    from safetensors.torch import save_file

    cnn = bool(cfg.vision.torchvision_name)
    if cnn:  # a registry name: OpenCLIP needs no timm model dir
        shutil.rmtree(out / "vision")
    else:  # the timm architecture only; the weights are in open_clip_model.safetensors
        (out / "vision" / "model.safetensors").unlink()
    (out / "text" / "model.safetensors").unlink()
    state = {f"visual.trunk.{k}": v for k, v in vision.state_dict().items()}
    if len(vstate) == 1:
        state["visual.head.proj.weight"] = vstate["vision.0.weight"]
    else:  # timm Mlp: fc1 (bias) -> GELU -> fc2 (no bias)
        state.update({"visual.head.mlp.fc1.weight": vstate["vision.0.weight"],
                      "visual.head.mlp.fc1.bias": vstate["vision.0.bias"],
                      "visual.head.mlp.fc2.weight": vstate["vision.2.weight"]})
    state.update({f"text.transformer.{k}": v for k, v in bert.state_dict().items()})
    state["text.proj.weight"] = tstate["text.0.weight"]
    state.update(scales)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "open_clip_model.safetensors"))
    text_dir = str((out / "text").resolve())
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": cfg.vision.image_px, "timm_model_name": "mobilenetv2_100" if cnn else
                       f"local-dir:{(out / 'vision').resolve()}", "timm_model_pretrained": False,
                       "timm_pool": _timm_pool(cfg),
                       "timm_proj": "linear" if len(vstate) == 1 else "mlp", "timm_proj_bias": False, "timm_drop": 0.0},
        "text_cfg": {"hf_model_name": text_dir, "hf_tokenizer_name": text_dir, "hf_model_pretrained": False,
                     "hf_proj_type": "linear", "context_length": cfg.text.max_tokens,
                     "hf_pooler_type": "mean_pooler" if cfg.text.pool == "mean" else "cls_last_hidden_state_pooler"},
        "init_logit_scale": float(scales["logit_scale"]),
    }
    if "logit_bias" in scales:
        model_cfg["init_logit_bias"] = float(scales["logit_bias"])
    preprocess = {"size": cfg.vision.image_px, "mean": list(cfg.vision.mean), "std": list(cfg.vision.std),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                          indent=2), encoding="utf-8")


__all__ = ["FORMAT", "ExportError", "export", "timm_vision", "projection_layers"]

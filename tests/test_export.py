"""Export round trips: the shipped demo config's architecture (conv-stem ViT) and the LiT config's
(torchvision MobileNetV2 + a pretrained-style BERT, MLP image projection), random weights,
exported and loaded with timm / transformers / OpenCLIP alone (no mm code), give mm's image and
text embeddings within 1e-5; what a format cannot hold is refused with one line; `mm export`.

    .venv/bin/pytest tests/test_export.py -q
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import build_tokenizer  # noqa: E402

import mm  # noqa: E402
from core.config import build, packaged_config  # noqa: E402
from mm.checkpoint import save_model  # noqa: E402
from mm.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, ProjectionConfig, TextConfig, VisionConfig  # noqa: E402
from mm.export import ExportError, export  # noqa: E402
from mm.models import VLModel  # noqa: E402

TEXTS = ["a red circle", "two green stars and a blue square on a red field, twice over"]


def shipped_model_config(name: str) -> ModelConfig:
    """The ``model:`` section of a shipped config, without its pretrained files."""
    return build(ModelConfig, yaml.safe_load(packaged_config(name).read_text())["model"])


def save_run(tmp_path: Path, cfg: ModelConfig, bert_dir: Path | None = None) -> Path:
    """A saved run with random weights (BatchNorm statistics too) and a real tokenizer."""
    import dataclasses

    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    build_tokenizer(["a red circle", "a blue square", "two green stars", "on a field twice over"], tok_dir)
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    if bert_dir is not None:  # a pretrained-style text tower from a local transformers dir, as LiT's MiniLM
        from transformers import BertConfig, BertModel

        BertModel(BertConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=96, max_position_embeddings=64)).save_pretrained(str(bert_dir))
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pretrained_path=str(bert_dir)))
    torch.manual_seed(0)
    model = VLModel(cfg, vocab)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_(0, 0.2)
        if hasattr(model.vision, "time_embed"):
            model.vision.time_embed.normal_(0, 0.5)  # the export must fold frame 0's into the positions
        if cfg.loss == "siglip":
            model.logit_bias.fill_(-3.5)
    save_model(model, cfg, tmp_path / "run" / "model", tok_dir)
    return tmp_path / "run"


# -- what a timm + transformers user writes: no mm import -------------------------------------
def load_hf_export(path: Path):
    import timm
    from safetensors.torch import load_file
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer_hybrid import ConvStem
    from transformers import AutoModel, AutoTokenizer

    spec = json.loads((path / "export_config.json").read_text())
    kwargs = {}
    if spec["vision"]["embed_layer"]:
        stem = {k: v for k, v in spec["vision"]["embed_layer"]["backbone"].items() if k != "class"}
        kwargs["embed_layer"] = partial(HybridEmbed, backbone=ConvStem(**stem), proj=False)
    vision = timm.create_model(f"local-dir:{path / 'vision'}", pretrained=True, **kwargs).eval()
    text = AutoModel.from_pretrained(str(path / "text"), add_pooling_layer=False).eval()
    weights = load_file(str(path / "projection.safetensors"))

    def projection(name: str) -> nn.Sequential:
        seq = nn.Sequential(*[nn.Linear(*layer[1:3], bias=layer[3]) if layer[0] == "linear" else nn.GELU()
                              for layer in spec["projection"][name]])
        seq.load_state_dict({k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")})
        return seq.eval()

    vproj, tproj = projection("vision"), projection("text")

    @torch.no_grad()
    def encode_image(pixels):
        return nn.functional.normalize(vproj(vision(pixels)), dim=-1)

    @torch.no_grad()
    def encode_text(input_ids, attention_mask, **_):
        h = text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].to(h.dtype)
        pooled = h[:, 0] if spec["text"]["pool"] == "cls" else (h * m).sum(1) / m.sum(1)
        return nn.functional.normalize(tproj(pooled), dim=-1)

    tokenizer = AutoTokenizer.from_pretrained(str(path / "text"))
    tokenize = partial(tokenizer, return_tensors="pt", padding=True, truncation=True,
                       max_length=spec["text"]["max_tokens"])
    return encode_image, encode_text, tokenize, weights


def assert_hf_round_trip(run: Path, out: Path, image_px: int) -> None:
    ours = mm.load(run)
    encode_image, encode_text, tokenize, weights = load_hf_export(export(run, out, "hf"))
    pixels = torch.randn(3, 3, image_px, image_px)
    batch = tokenize(TEXTS)
    with torch.no_grad():
        want_i, want_t = ours.encode_image(pixels), ours.encode_text(**ours.tokenize(TEXTS))
    torch.testing.assert_close(encode_image(pixels), want_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(encode_text(**batch), want_t, atol=1e-5, rtol=0)
    assert float(weights["logit_scale"]) == pytest.approx(float(ours.logit_scale.detach()[0]))


def assert_openclip_round_trip(run: Path, out: Path, image_px: int) -> None:
    import open_clip

    ours = mm.load(run)
    export(run, out, "openclip")
    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    clip.eval()
    pixels = torch.randn(3, 3, image_px, image_px)
    with torch.no_grad():
        got_i, got_t = clip.encode_image(pixels, normalize=True), clip.encode_text(tokenizer(TEXTS), normalize=True)
        want_i, want_t = ours.encode_image(pixels), ours.encode_text(**ours.tokenize(TEXTS))
    torch.testing.assert_close(got_i, want_i, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_t, want_t, atol=1e-5, rtol=0)
    assert float(clip.logit_scale.detach()) == pytest.approx(float(ours.logit_scale.detach()[0]))
    assert preprocess.transforms[-1].mean == list(ours.cfg.vision.mean)


def test_demo_config_round_trips_through_timm_and_transformers(tmp_path):
    cfg = shipped_model_config("pretrain.yaml")  # what `mm demo` trains: conv stem, max pooling
    assert cfg.vision.stem == "conv" and cfg.vision.pool == "max"
    run = save_run(tmp_path, cfg)
    assert_hf_round_trip(run, tmp_path / "hf", cfg.vision.image_px)
    with pytest.raises(ExportError, match="^vision.stem=conv: .*--to hf"):
        export(run, tmp_path / "oc", "openclip")
    assert not (tmp_path / "oc").exists()


def test_lit_config_round_trips_through_timm_and_transformers(tmp_path):
    cfg = shipped_model_config("lit_emoji.yaml")  # MobileNetV2, MLP image projection, MiniLM-style BERT
    assert cfg.vision.torchvision_name == "mobilenet_v2" and cfg.proj.vision == "mlp"
    run = save_run(tmp_path, cfg, bert_dir=tmp_path / "bert")
    assert_hf_round_trip(run, tmp_path / "hf", cfg.vision.image_px)
    with pytest.raises(ExportError, match=f"^model.proj.hidden={cfg.proj.hidden}: OpenCLIP"):
        export(run, tmp_path / "oc", "openclip")


def test_openclip_holds_the_lit_towers_with_its_own_mlp_width(tmp_path):
    import dataclasses

    lit = shipped_model_config("lit_emoji.yaml")
    cfg = dataclasses.replace(lit, proj=dataclasses.replace(lit.proj, hidden=2 * lit.embed_dim))
    assert_openclip_round_trip(save_run(tmp_path, cfg, bert_dir=tmp_path / "bert"), tmp_path / "oc",
                               cfg.vision.image_px)


@pytest.mark.parametrize("vpool,tpool,loss", [("token", "cls", "siglip"), ("avg", "mean", "clip"),
                                              ("max", "mean", "clip")])
def test_patch_stem_vits_round_trip_through_both_formats(tmp_path, vpool, tpool, loss):
    cfg = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=2, heads=4, pool=vpool),
                      text=TextConfig(width=32, depth=2, heads=4, max_tokens=8, pool=tpool), embed_dim=24, loss=loss)
    run = save_run(tmp_path, cfg)
    assert_hf_round_trip(run, tmp_path / "hf", 32)
    assert_openclip_round_trip(run, tmp_path / "oc", 32)
    if loss == "siglip":
        import open_clip

        clip = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}")
        assert float(clip.logit_bias.detach()) == pytest.approx(-3.5)


@pytest.mark.parametrize("to", ["hf", "openclip"])
@pytest.mark.parametrize("vision,match", [
    ({"attention": "divided"}, "^vision.attention=divided: "),
    ({"torchvision_name": "mobilenet_v3_small", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
     "^vision.torchvision_name=mobilenet_v3_small: "),
])
def test_parts_no_format_holds_are_refused(tmp_path, to, vision, match):
    cfg = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=16, depth=1, heads=2, **vision),
                      text=TextConfig(width=16, depth=1, heads=2), embed_dim=8)
    run = save_run(tmp_path, cfg)
    with pytest.raises(ExportError, match=match):
        export(run, tmp_path / "x", to)
    assert not (tmp_path / "x").exists()


def test_openclip_refuses_an_mlp_text_projection(tmp_path):
    cfg = ModelConfig(vision=VisionConfig(image_px=16, patch_px=8, width=16, depth=1, heads=2),
                      text=TextConfig(width=16, depth=1, heads=2), embed_dim=8, proj=ProjectionConfig(text="mlp"))
    run = save_run(tmp_path, cfg)
    with pytest.raises(ExportError, match="^model.proj.text=mlp: "):
        export(run, tmp_path / "x", "openclip")
    assert_hf_round_trip(run, tmp_path / "hf", 16)


def test_cli(tmp_path, capsys):
    from jobs.export import main

    cfg = shipped_model_config("pretrain.yaml")
    run = save_run(tmp_path, cfg)
    assert main(["--model", str(tmp_path / "missing"), "--to", "hf", "--out", str(tmp_path / "e")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", str(run), "--to", "openclip", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vision.stem=conv" in err[0] and not (tmp_path / "e").exists()
    assert main(["--model", str(run), "--to", "hf", "--out", str(tmp_path / "e")]) == 0
    assert {p.name for p in (tmp_path / "e").iterdir()} == {"vision", "text", "projection.safetensors",
                                                            "export_config.json"}

"""Export round trip: the Hugging Face towers give the same embeddings as mm.load; `mm export` CLI."""

from __future__ import annotations

import json

import pytest
import torch

from mm.checkpoint import save_model
from mm.config import ModelConfig, TextConfig, VisionConfig
from mm.models import VLModel


def _saved(tmp_path, cfg: ModelConfig):
    from test_evaluate import build_tokenizer

    tok_dir = tmp_path / "tok"
    build_tokenizer(["a red circle", "a blue square", "two green stars"], tok_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    model = VLModel(cfg, len(tok))
    if hasattr(model.vision, "time_embed"):
        with torch.no_grad():  # non-trivial temporal embedding: the export must fold it in
            model.vision.time_embed.normal_(0, 0.5)
    save_model(model, cfg, tmp_path / "run" / "model", tok_dir)
    return tmp_path / "run", tok


@pytest.mark.parametrize("vpool,tpool", [("token", "cls"), ("avg", "mean"), ("max", "mean")])
def test_hf_export_round_trip(tmp_path, vpool, tpool):
    import mm
    from mm.export import export_hf, load_hf_export

    cfg = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=2, heads=4, pool=vpool),
                      text=TextConfig(width=32, depth=2, heads=4, max_tokens=16, pool=tpool), embed_dim=24)
    run, tok = _saved(tmp_path, cfg)
    out = export_hf(run, tmp_path / "export")
    assert {p.name for p in out.iterdir()} >= {"vision", "text", "projection.safetensors", "export_config.json"}
    ours = mm.load(str(run))
    enc = load_hf_export(out)
    pixels = torch.randn(4, 3, 32, 32)
    batch = enc.tokenizer(["a red circle", "two green stars and a blue square"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want_i = ours.encode_image(pixels)
        want_t = ours.encode_text(batch["input_ids"], batch["attention_mask"])
    got_i, got_t = enc.encode_image(pixels), enc.encode_text(**batch)
    assert torch.allclose(got_i, want_i, atol=1e-5), (got_i - want_i).abs().max()
    assert torch.allclose(got_t, want_t, atol=1e-5)
    assert enc.logit_scale == pytest.approx(float(ours.logit_scale.exp()), rel=1e-6)
    cfg_json = json.loads((out / "export_config.json").read_text())
    assert cfg_json["image_size"] == 32 and cfg_json["vision_pool"] == {"token": "cls", "avg": "mean", "max": "max"}[vpool]


@pytest.mark.parametrize("vision,match", [({"attention": "divided"}, "joint"), ({"stem": "conv"}, "stem=patch"),
                                          ({"torchvision_name": "mobilenet_v2"}, "CNN tower")])
def test_unmappable_towers_are_refused(tmp_path, vision, match):
    """Divided attention (temporal blocks), a conv stem and a CNN tower have no ViTModel equivalent."""
    from mm.export import export_hf

    cfg = ModelConfig(vision=VisionConfig(image_px=16, patch_px=8, width=16, depth=1, heads=2, **vision),
                      text=TextConfig(width=16, depth=1, heads=2), embed_dim=8)
    run, _ = _saved(tmp_path, cfg)
    with pytest.raises(ValueError, match=match):
        export_hf(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mlp_projection_is_refused(tmp_path):
    from mm.config import ProjectionConfig
    from mm.export import export_hf

    cfg = ModelConfig(vision=VisionConfig(image_px=16, patch_px=8, width=16, depth=1, heads=2),
                      text=TextConfig(width=16, depth=1, heads=2), embed_dim=8, proj=ProjectionConfig(vision="mlp"))
    run, _ = _saved(tmp_path, cfg)
    with pytest.raises(ValueError, match="mlp projection"):
        export_hf(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path, capsys):
    from jobs.export import main

    cfg = ModelConfig(vision=VisionConfig(image_px=16, patch_px=8, width=16, depth=1, heads=2),
                      text=TextConfig(width=16, depth=1, heads=2), embed_dim=8)
    run, _ = _saved(tmp_path, cfg)
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", str(run), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "vision" / "model.safetensors").is_file()

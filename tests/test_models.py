"""The model: shapes, normalisation, image == one-frame video, divided vs joint attention, masked
encoding, fusion, locking, grad checkpointing, timm and transformers loading paths.

    .venv/bin/pytest tests/test_models.py -x -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mm.config import FusionConfig, LockConfig, ModelConfig, ProjectionConfig, TextConfig, VisionConfig
from mm.models import build_model

V = VisionConfig(image_px=32, patch_px=8, width=32, depth=2, heads=2, max_frames=4)
T = TextConfig(width=32, depth=2, heads=2, max_tokens=12)
CFG = ModelConfig(vision=V, text=T, fusion=FusionConfig(depth=1, heads=2), embed_dim=16)


def _inputs(b=3, t=4, length=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, 5:] = 0
    return torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, t, 3, 32, 32, generator=g), ids, mask


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_encoders_shapes_and_unit_norm(attention):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, vision=dataclasses.replace(V, attention=attention)), 50).eval()
    img, vid, ids, mask = _inputs()
    for emb in (model.encode_image(img), model.encode_video(vid), model.encode_text(ids, mask)):
        assert emb.shape == (3, 16)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # An image is a one-frame video with shared weights.
    assert torch.allclose(model.encode_image(img), model.encode_video(img[:, None]), atol=1e-6)
    assert model.vision_features(img).shape == (3, 32)
    assert model.vision_tokens(vid).shape == (3, 1 + 4 * 16, 32)
    # Padding tokens do not change the text embedding.
    ids2 = ids.clone()
    ids2[0, 5:] = 1
    assert torch.allclose(model.encode_text(ids, mask)[0], model.encode_text(ids2, mask)[0], atol=1e-5)


def test_temporal_order_matters_for_video():
    torch.manual_seed(0)
    model = build_model(CFG, 50).eval()
    _, vid, _, _ = _inputs()
    rev = vid.flip(1)
    assert not torch.allclose(model.encode_video(vid), model.encode_video(rev), atol=1e-4)


def test_divided_attention_starts_as_a_per_frame_vit():
    """Zero-initialised temporal projections (TimeSformer): at init divided == per-frame spatial."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, vision=dataclasses.replace(V, attention="divided")), 50).eval()
    assert all(float(t.fc.weight.abs().sum()) == 0 for t in model.vision.temporal)
    img = torch.randn(2, 3, 32, 32)
    assert model.encode_image(img).shape == (2, 16)


def test_masked_encoding_keeps_only_visible_tokens_and_fusion_shapes():
    torch.manual_seed(0)
    model = build_model(CFG, 50)
    _, vid, ids, mask = _inputs()
    keep = torch.stack([torch.cat([torch.tensor([1, 5]) + 16 * f for f in range(4)]) for _ in range(3)])
    assert model.vision_tokens(vid, keep).shape == (3, 1 + 8, 32)
    fused = model.fuse(model.text_tokens(ids, mask), mask, model.vision_tokens(vid))
    assert fused.shape == (3, 7, 32)
    # Fusion output depends on the image.
    fused2 = model.fuse(model.text_tokens(ids, mask), mask, model.vision_tokens(vid.flip(0)))
    assert not torch.allclose(fused, fused2)


def test_lock_freezes_towers_but_the_last_blocks():
    cfg = dataclasses.replace(CFG, lock=LockConfig(vision=True, vision_unlocked_blocks=1, text=True))
    model = build_model(cfg, 50)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text.") for n in trainable)
    assert any(n.startswith("vision.vit.blocks.1.") for n in trainable)
    assert not any(n.startswith("vision.vit.blocks.0.") for n in trainable)
    assert "vision.vit.patch_embed.proj.weight" not in trainable
    assert {"vision_proj.weight", "text_proj.weight", "logit_scale"} <= trainable


def test_conv_stem_and_max_pool():
    """stem=conv: a conv stack with the patch size's stride, so tokens, positions and MAE pixel
    targets line up as with the linear stem; a locked stem's BatchNorm statistics do not move."""
    conv = dataclasses.replace(V, stem="conv", pool="max")
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, vision=conv), 50).train()
    img, vid, _, _ = _inputs()
    assert model.vision_tokens(vid).shape == (3, 1 + 4 * 16, 32)
    assert model.vision.patchify(vid).shape == (3, 4 * 16, 8 * 8 * 3)
    tokens = model.vision_tokens(img[:, None])
    assert torch.equal(model.vision.pool(tokens), tokens[:, 1:].amax(1))
    with pytest.raises(ValueError, match="power-of-two"):
        dataclasses.replace(conv, image_px=36, patch_px=6)

    locked = build_model(dataclasses.replace(CFG, vision=conv, lock=LockConfig(vision=True)), 50).train()
    bn = locked.vision._stem_norms[0]
    before = bn.running_mean.clone()
    locked.encode_image(img * 3 + 1)
    assert torch.equal(bn.running_mean, before), "a frozen stem must not update its BatchNorm statistics"
    model.encode_image(img * 3 + 1)  # a trainable stem does
    assert not torch.equal(model.vision._stem_norms[0].running_mean, torch.zeros_like(before))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = build_model(CFG, 50)
    b = build_model(CFG, 50)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    _, vid, ids, mask = _inputs()
    for m in (a, b):
        (m.encode_video(vid).sum() + m.encode_text(ids, mask).sum()).backward()
    ga = a.vision.vit.blocks[0].attn.qkv.weight.grad
    gb = b.vision.vit.blocks[0].attn.qkv.weight.grad
    assert torch.allclose(ga, gb, atol=1e-6)


def test_logit_scale_clamped_and_siglip_init():
    model = build_model(CFG, 50)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale()[0].item() == pytest.approx(100.0)
    sig = build_model(dataclasses.replace(CFG, loss="siglip"), 50)
    scale, bias = sig.scale()
    assert scale.item() == pytest.approx(10.0) and bias.item() == pytest.approx(-10.0) and bias.requires_grad
    assert not model.logit_bias.requires_grad


def test_pretrained_paths_load_local_weights(tmp_path):
    """timm name + local weights file, and a local transformers directory, as users load MiniLM."""
    import timm
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    cfg = dataclasses.replace(
        CFG, vision=VisionConfig(image_px=32, patch_px=16, timm_name="vit_tiny_patch16_224", max_frames=2,
                                 pretrained_path=str(tmp_path / "vit.safetensors"), pool="token"),
        text=TextConfig(pretrained_path=str(tmp_path / "bert"), max_tokens=12), fusion=FusionConfig())
    model = build_model(cfg, 50)
    assert torch.equal(model.vision.vit.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    assert torch.equal(model.text.bert.encoder.layer[0].attention.self.query.weight,
                       bert.encoder.layer[0].attention.self.query.weight)
    assert model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 16)
    with pytest.raises(ValueError, match="vocab"):
        build_model(cfg, 51)


def test_torchvision_cnn_tower_loads_weights_locks_and_keeps_bn_statistics(tmp_path):
    """vision.torchvision_name: a torchvision trunk from a local state-dict file (as the
    MobileNetV2 ImageNet weights are loaded), the ViT token layout, LiT locking with frozen
    BatchNorm statistics, a trainable last stage, and clear refusals (MIM, a model without a trunk)."""
    import torchvision

    from mm.objectives import MaskedVision, MIMConfig

    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v2()
    torch.save(ref.state_dict(), tmp_path / "mnv2.pth")
    cnn = VisionConfig(image_px=32, torchvision_name="mobilenet_v2", pretrained_path=str(tmp_path / "mnv2.pth"),
                       max_frames=4)
    cfg = dataclasses.replace(CFG, vision=cnn, lock=LockConfig(vision=True, vision_unlocked_blocks=1))
    model = build_model(cfg, 50).train()
    assert torch.equal(model.vision.features[3].conv[0][0].weight, ref.features[3].conv[0][0].weight)
    assert (model.vision.width, model.vision.grid, model.vision.patch_px) == (1280, (1, 1), 32)
    img, vid, ids, mask = _inputs()
    assert model.vision_tokens(vid).shape == (3, 1 + 4, 1280)
    tokens = model.vision_tokens(img[:, None])
    assert torch.equal(model.vision.pool(tokens), tokens[:, 1:].mean(1))
    assert model.encode_video(vid).shape == model.encode_image(img).shape == (3, 16)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("vision.features.18.") for n in trainable)
    assert not any(n.startswith("vision.features.17.") for n in trainable)
    frozen_bn, open_bn = model.vision.features[17].conv[1][1], model.vision.features[18][1]
    frozen_before, open_before = frozen_bn.running_mean.clone(), open_bn.running_mean.clone()
    model.encode_image(img * 3 + 1)
    assert torch.equal(frozen_bn.running_mean, frozen_before), "a locked stage must keep its BN statistics"
    assert not torch.equal(open_bn.running_mean, open_before), "the unlocked stage trains its BatchNorm"
    loss = model.encode_image(img).sum() + model.encode_text(ids, mask).sum()
    loss.backward()
    assert model.vision.features[18][0].weight.grad is not None and model.vision.features[0][0].weight.grad is None

    with pytest.raises(ValueError, match="ViT"):
        MaskedVision(MIMConfig(weight=1.0), model)
    with pytest.raises(ValueError, match="features"):
        build_model(dataclasses.replace(CFG, vision=VisionConfig(image_px=32, torchvision_name="resnet18")), 50)
    with pytest.raises(ValueError, match="CNN"):
        VisionConfig(torchvision_name="mobilenet_v2", attention="divided")


def _calibrated_mobilenet_v2():
    """A random MobileNetV2 whose BatchNorm statistics come from random images. With the init's
    statistics (mean 0, var 1) its activations shrink to ~1e-8 by the last stage, so any two
    feature vectors would compare equal at the usual tolerances."""
    import torchvision

    net = torchvision.models.mobilenet_v2()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average over the calibration batch
            m.reset_running_stats()
    with torch.no_grad():
        net.train()(torch.randn(16, 3, 64, 64))
    return net.eval()


def test_cnn_tower_tokens_are_the_plain_trunk_map(tmp_path):
    """The CNN tower's tokens are the trunk's last map (positions, mean first), its pooled feature
    is that map's global average (or max), and projection and fusion read them."""
    torch.manual_seed(0)
    ref = _calibrated_mobilenet_v2()
    torch.save(ref.state_dict(), tmp_path / "mnv2.pth")
    cnn = VisionConfig(image_px=64, torchvision_name="mobilenet_v2", pretrained_path=str(tmp_path / "mnv2.pth"),
                       max_frames=2)
    model = build_model(dataclasses.replace(CFG, vision=cnn, fusion=FusionConfig(depth=1, heads=2)), 50).eval()
    assert (model.vision.width, model.vision.grid) == (1280, (2, 2))
    img = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        tokens = model.vision_tokens(img[:, None])
        plain = ref.features(img)
    assert tokens.shape == (3, 1 + 4, 1280) and plain.mean((2, 3)).abs().mean() > 0.1  # not vanishing
    torch.testing.assert_close(tokens[:, 1:], plain.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.vision.pool(tokens), plain.mean((2, 3)), rtol=1e-4, atol=1e-5)
    maxed = build_model(dataclasses.replace(CFG, vision=dataclasses.replace(cnn, pool="max")), 50).eval()
    with torch.no_grad():
        torch.testing.assert_close(maxed.vision.pool(maxed.vision_tokens(img[:, None])), plain.amax((2, 3)),
                                   rtol=1e-4, atol=1e-5)
    ids, mask = torch.randint(1, 50, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    with torch.no_grad():
        assert model.encode_image(img).shape == model.encode_video(torch.stack([img, img], 1)).shape == (3, 16)
        assert model.fuse(model.text_tokens(ids, mask), mask, tokens).shape == (3, 6, 32)


def test_removed_knobs_load_when_off_and_are_refused_by_name_otherwise():
    """vision.hypercolumn_stages / scales_px / pyramid_stages / pyramid_cells and proj.heads left
    the config (issue 19). A config.json saved before then carries them at their "off" values and
    still loads; one that used them, or a YAML/--set naming them, is refused in one line naming the key."""
    from core.config import ConfigError, load_config
    from mm.config import from_json, to_json
    from mm.train import PretrainConfig

    old = to_json(CFG)
    old["vision"].update(hypercolumn_stages=[], scales_px=[], pyramid_stages=[], pyramid_cells=2)
    old["proj"]["heads"] = 1
    assert from_json(old) == CFG
    for section, key, value in [("vision", "hypercolumn_stages", [13]), ("vision", "scales_px", [224]),
                                ("vision", "pyramid_stages", [13]), ("proj", "heads", 3)]:
        used = to_json(CFG)
        used[section][key] = value
        with pytest.raises(ConfigError, match=rf"^model\.{section}\.{key}=.*removed") as e:
            from_json(used)
        assert "\n" not in str(e.value)
    for override in ("model.vision.scales_px=[224]", "model.proj.heads=3"):
        with pytest.raises(ConfigError, match=f"unknown config key '{override.split('=')[0]}'"):
            load_config(PretrainConfig, None, [override])


def test_pretrained_towers_round_trip_through_a_checkpoint_without_their_files(tmp_path):
    """A model built on local pretrained towers (a CNN and a transformers BERT whose shape the
    TextConfig fields do not describe) reloads from its model dir after those files are gone."""
    import shutil

    import torchvision
    from transformers import BertConfig, BertModel

    from mm.checkpoint import load_model, save_model

    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mnv2.pth")
    BertModel(BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=40, max_position_embeddings=64),
              add_pooling_layer=False).save_pretrained(tmp_path / "bert")
    cfg = dataclasses.replace(
        CFG, fusion=FusionConfig(),
        vision=VisionConfig(image_px=32, torchvision_name="mobilenet_v2", pretrained_path=str(tmp_path / "mnv2.pth")),
        text=TextConfig(pretrained_path=str(tmp_path / "bert"), max_tokens=12))
    model = build_model(cfg, 50).eval()
    save_model(model, cfg, tmp_path / "model", tokenizer_dir=None)
    (tmp_path / "mnv2.pth").unlink()
    shutil.rmtree(tmp_path / "bert")
    loaded, loaded_cfg = load_model(tmp_path / "model")
    assert loaded_cfg == cfg and loaded.text.width == 24
    img, _, ids, mask = _inputs()
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode_image(img), model.encode_image(img), atol=1e-6)
        assert torch.allclose(loaded.encode_text(ids, mask), model.encode_text(ids, mask), atol=1e-6)


def test_wholly_locked_towers_stay_in_eval_mode():
    """train() leaves a tower with no trainable parameter in eval mode (no dropout noise in
    LiT's fixed features); a partly unlocked tower and the projections train."""
    cfg = dataclasses.replace(CFG, text=dataclasses.replace(T, dropout=0.5),
                              lock=LockConfig(vision=True, vision_unlocked_blocks=1, text=True))
    model = build_model(cfg, 50).train()
    assert not model.text.training and not any(m.training for m in model.text.modules())
    assert model.vision.training and model.vision_proj.training and model.fusion.training
    _, _, ids, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(model.text_features(ids, mask), model.text_features(ids, mask))
    assert build_model(CFG, 50).train().text.training


def test_mlp_projection_shapes_and_checkpoint_round_trip(tmp_path):
    from mm.checkpoint import load_model, save_model

    cfg = dataclasses.replace(CFG, proj=ProjectionConfig(vision="mlp", hidden=24, dropout=0.1))
    model = build_model(cfg, 50).eval()
    assert [type(m).__name__ for m in model.vision_proj] == ["Dropout", "Linear", "GELU", "Linear"]
    assert model.vision_proj[1].out_features == 24 and isinstance(model.text_proj, torch.nn.Linear)
    assert build_model(dataclasses.replace(cfg, proj=ProjectionConfig(text="mlp")), 50).text_proj[1].out_features == 32
    img, _, ids, mask = _inputs()
    with torch.no_grad():
        emb = model.encode_image(img)
        assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
        assert torch.equal(model.embed_vision_features(model.vision_features(img)), emb)
    save_model(model, cfg, tmp_path / "model", tokenizer_dir=None)
    loaded, loaded_cfg = load_model(tmp_path / "model")
    assert loaded_cfg == cfg
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode_image(img), emb, atol=1e-6)

"""Checkpoints: save/load round trip, refusal of pickles and foreign files, atomic writes, and
training state (optimizer state keyed by parameter name) round trip.

    .venv/bin/pytest tests/test_checkpoint.py -x -q
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_data import save_tokenizer  # noqa: E402

import mm  # noqa: E402
from mm.checkpoint import (  # noqa: E402
    CheckpointError,
    load_model,
    load_train_state,
    save_model,
    save_train_state,
)
from mm.config import FusionConfig, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from mm.models import build_model  # noqa: E402
from mm.optim import OptimConfig, build_optimizer  # noqa: E402

CFG = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=1, heads=2, max_frames=2,
                                      attention="divided"),
                  text=TextConfig(width=32, depth=1, heads=2, max_tokens=12), fusion=FusionConfig(depth=1, heads=2),
                  embed_dim=16, loss="siglip")


def test_save_load_round_trip_gives_the_same_embeddings(tmp_path):
    save_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = build_model(CFG, 40).eval()
    save_model(model, CFG, tmp_path / "run" / "model", tmp_path / "tok")
    assert {p.name for p in (tmp_path / "run" / "model").iterdir()} == {"model.safetensors", "config.json", "tokenizer"}
    loaded, cfg = load_model(tmp_path / "run")  # a run dir resolves to its model/
    assert cfg == CFG
    x = torch.randn(2, 3, 32, 32)
    ids, mask = torch.randint(5, 40, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    loaded.eval()
    assert torch.equal(model.encode_image(x), loaded.encode_image(x))
    assert torch.equal(model.encode_text(ids, mask), loaded.encode_text(ids, mask))
    assert not mm.load(str(tmp_path / "run" / "model")).training
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "run" / "model" / "tokenizer")).mask_token == "[MASK]"


def test_loading_refuses_a_pickle_named_safetensors(tmp_path):
    model = build_model(CFG, 40)
    save_model(model, CFG, tmp_path / "m", None)
    with open(tmp_path / "m" / "model.safetensors", "wb") as f:
        pickle.dump(model.state_dict(), f)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(tmp_path / "m")


def test_loading_refuses_foreign_or_broken_configs(tmp_path):
    model = build_model(CFG, 40)
    save_model(model, CFG, tmp_path / "m", None)
    cfg_path = tmp_path / "m" / "config.json"
    meta = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "m")
    cfg_path.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="mm-vlmodel"):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match="holds no model"):
        load_model(tmp_path / "nothing")


def test_writes_leave_no_temporary_files(tmp_path):
    save_model(build_model(CFG, 40), CFG, tmp_path / "m", None)
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]


def test_train_state_round_trip_restores_optimizer_exactly(tmp_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from mm.checkpoint import restore_state

    torch.manual_seed(0)
    model = build_model(CFG, 40)
    opt = build_optimizer(model, OptimConfig())
    x = torch.randn(2, 3, 32, 32)
    model.encode_image(x).sum().backward()
    opt.step()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, opt, options=full)
    save_train_state(tmp_path / "ck", msd, osd, {"step": 7, "streams": {"corpus0": {"epoch": 1, "batches": 3}}})
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {"state.safetensors", "optim.safetensors",
                                                               "train_state.json"}
    msd2, osd2, state = load_train_state(tmp_path / "ck")
    assert state["step"] == 7 and state["streams"]["corpus0"] == {"epoch": 1, "batches": 3}

    torch.manual_seed(1)
    other = build_model(CFG, 40)
    opt2 = build_optimizer(other, OptimConfig())
    restore_state(other, opt2, msd2, osd2)  # text tower never had a gradient: no state, fine
    # One more identical step on both: identical parameters afterwards.
    for m, o in ((model, opt), (other, opt2)):
        o.zero_grad()
        m.encode_image(x).sum().backward()
        o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), n


def test_train_state_with_tied_mlm_head_tensors_saves(tmp_path):
    """transformers ties the MLM head's decoder.bias to its bias; safetensors refuses shared storage."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from mm.data import TokenInfo
    from mm.objectives import MLMConfig, ObjectivesConfig, ObjectiveSet, build_objectives

    model = build_model(CFG, 40)
    tok = TokenInfo(vocab_size=40, pad_id=0, mask_id=4, cls_id=2, sep_id=3)
    module = ObjectiveSet(model, build_objectives(ObjectivesConfig(mlm=MLMConfig(weight=1.0)), model, tok))
    opt = build_optimizer(module, OptimConfig())
    msd, osd = get_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    save_train_state(tmp_path / "ck", msd, osd, {"step": 1})
    msd2, _, _ = load_train_state(tmp_path / "ck")
    assert set(msd2) == set(msd)
    assert all(torch.equal(msd[k], msd2[k]) for k in msd)

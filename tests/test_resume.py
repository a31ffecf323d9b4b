"""Resume after a killed driver, without Ray: which checkpoint a rerun picks, and the attempt fence
that stops a killed driver's surviving workers from writing behind the rerun's back.

    .venv/bin/pytest tests/test_resume.py -q

The end-to-end kill-and-rerun is tests/test_faults.py::test_pretrain_driver_killed_then_same_command_resumes_and_matches
(slow).
"""

from __future__ import annotations

import json

import pytest
import torch

from mm.checkpoint import complete_train_state, latest_complete_checkpoint, save_train_state, step_checkpoints


def _ckpt(root, step: int):
    d = root / f"step_{step:08d}"
    model = {"a": torch.full((32, 32), float(step))}
    optim = {"state": {"a": {"exp_avg": torch.ones(32, 32), "step": torch.tensor(float(step))}},
             "param_groups": [{"lr": 0.1, "params": ["a"]}]}
    save_train_state(d, model, optim, {"step": step, "nonfinite_steps": 0, "streams": {}})
    return d


def test_a_checkpoint_copied_only_in_part_is_not_complete(tmp_path):
    """Ray Train copies a checkpoint dir to storage file by file, in no set order: the JSON can
    land before a tensor file is whole. The sizes recorded in the JSON tell."""
    d = _ckpt(tmp_path, 6)
    assert complete_train_state(str(d))["step"] == 6
    blob = (d / "optim.safetensors").read_bytes()
    (d / "optim.safetensors").write_bytes(blob[: len(blob) // 2])
    assert complete_train_state(str(d)) is None
    (d / "optim.safetensors").unlink()
    assert complete_train_state(str(d)) is None
    d = _ckpt(tmp_path, 12)
    text = (d / "train_state.json").read_text()
    (d / "train_state.json").write_text(text[:-10])
    assert complete_train_state(str(d)) is None
    (d / "train_state.json").unlink()
    assert complete_train_state(str(d)) is None


def test_rerun_resumes_from_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "ray"
    _ckpt(root, 6)
    _ckpt(root, 12)
    torn = _ckpt(root, 18)
    (torn / "state.safetensors").write_bytes(b"\0" * 10)
    (root / "step_00000024").mkdir()  # an empty dir: the copy had just begun
    assert [s for s, _ in step_checkpoints(str(root))] == [6, 12, 18, 24]
    assert latest_complete_checkpoint(str(root)) == (12, str(root / "step_00000012"))
    assert latest_complete_checkpoint(str(tmp_path / "missing")) is None


def test_start_attempt_fences_the_old_attempt_and_ignores_ray_trains_snapshot(tmp_path):
    from mm.train import AttemptSuperseded, _check_attempt, _start_attempt

    run = tmp_path / "run"
    root = run / "ray"
    _ckpt(root, 6)
    _ckpt(root, 12)
    (root / "step_00000018").mkdir()
    (root / "step_00000018" / "train_state.json").write_text("{")
    # Ray's snapshot, one checkpoint behind (the controller had not registered step 12 yet)
    (root / "checkpoint_manager_snapshot.json").write_text(json.dumps({"latest": "step_00000006"}))
    old = _start_attempt(str(run))[0]
    _check_attempt(str(run), old)  # the current attempt may write

    new, resume = _start_attempt(str(run))
    assert resume == str(root / "step_00000012")
    assert sorted(p.name for p in root.iterdir()) == ["attempt.json", "step_00000012"]
    _check_attempt(str(run), new)
    with pytest.raises(AttemptSuperseded, match="took it over"):
        _check_attempt(str(run), old)  # a killed driver's surviving worker: stops before writing

    fresh = tmp_path / "fresh"
    assert _start_attempt(str(fresh))[1] is None
    assert json.loads((fresh / "ray" / "attempt.json").read_text())["attempt"]


def test_datasets_are_built_in_deterministic_order_and_the_setting_is_restored():
    from ray.data import DataContext

    from mm.train import _preserve_order

    opts = DataContext.get_current().execution_options
    before = opts.preserve_order
    with _preserve_order():
        assert DataContext.get_current().execution_options.preserve_order is True
    assert DataContext.get_current().execution_options.preserve_order == before


def test_workers_fetch_an_init_uri_themselves_not_the_drivers_cached_copy(tmp_path, monkeypatch):
    """``fit(init=URI)`` hands the URI to the workers, which fetch it on their own node (core.storage's
    cache): the driver's cached copy exists only on the driver's node on a cluster without a
    shared filesystem. A file:// URI takes the same code path as s3://."""
    from test_checkpoint import CFG

    from mm.checkpoint import save_model
    from mm.models import build_model
    from mm.train import _build_model

    src = build_model(CFG, 40)
    save_model(src, CFG, tmp_path / "run" / "model", None)
    monkeypatch.setenv("MM_CACHE_DIR", str(tmp_path / "worker-cache"))
    got = _build_model(CFG, 40, f"file://{tmp_path / 'run'}", None)
    want = src.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in got.state_dict().items())

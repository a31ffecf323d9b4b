"""Security: nothing unpickled, no unsafe YAML, local Ray on loopback only, secrets never echoed.

    .venv/bin/pytest tests/test_security.py -q            # model files and configs (no Ray)
    .venv/bin/pytest tests/test_security.py -q -m slow    # a real `python -m jobs.curate` process:
                                                          # its sockets, its dashboard, its logs

The payloads are real: a pickle whose unpickling would create a marker file, a YAML document
whose python tag would do the same. The tests pass only if the marker never appears.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hostile  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: proof that a loader unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model_dir(d: Path) -> Path:
    from mm.checkpoint import FORMAT
    from mm.config import ModelConfig, to_json

    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"format": FORMAT, "vocab_size": 50, "model": to_json(ModelConfig())}))
    return d


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_named_like_a_checkpoint_is_refused_and_never_unpickled(tmp_path, writer):
    import torch

    import mm
    from mm.checkpoint import CheckpointError, load_train_state

    marker = tmp_path / "PWNED"
    d = _model_dir(tmp_path / "run" / "model")
    payload = {"weights": _Payload(marker)}
    if writer == "pickle":
        (d / "model.safetensors").write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a safetensors file") as e:
        mm.load(str(tmp_path / "run"))
    assert "never unpickled" in str(e.value) and len(str(e.value).splitlines()) == 1
    # the same for Ray Train step checkpoints (resume)
    step = tmp_path / "step"
    step.mkdir()
    (step / "train_state.json").write_text(json.dumps({"format": "mm-vlmodel/1", "step": 1, "optimizer": {}}))
    (step / "state.safetensors").write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_train_state(step)
    assert not marker.exists()


def test_only_safetensors_and_json_are_looked_for(tmp_path):
    """A run holding only pickled weights (the usual PyTorch names) is not a model."""
    import mm
    from mm.checkpoint import CheckpointError

    marker = tmp_path / "PWNED"
    d = tmp_path / "run"
    d.mkdir()
    for name in ("pytorch_model.bin", "model.pt", "model.ckpt", "checkpoint.pth"):
        (d / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="holds no model"):
        mm.load(str(d))
    # config.json present but pickled weights only
    _model_dir(d / "model")
    (d / "model" / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="model.safetensors not found"):
        mm.load(str(d))
    assert not marker.exists()


def test_yaml_config_with_python_tags_is_refused(tmp_path, cli_errors):
    from core.config import ConfigError, load_config
    from jobs.curate import main
    from pipelines.curate import CurateConfig

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"modality: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(CurateConfig, str(evil))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a caption")
    rc = main([str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--config", str(evil)])
    err = cli_errors()
    assert rc == 2 and len(err) == 1 and "not valid YAML" in err[0]
    # an override is YAML too
    with pytest.raises(ConfigError):
        load_config(CurateConfig, None, [f"modality=!!python/object/apply:builtins.open ['{marker}', 'w']"])
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- a real curate process -----------------------------------------------------------------------------
SECRETS = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCY-0123", "MM_API_TOKEN": "tok-9f8e7d6c5b4a-secret",
           "HF_TOKEN": "hf_ZZtopSecretValue0987", "DB_PASSWORD": "pw-correct-horse-battery"}
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listeners(pid: int) -> set[tuple[str, int, str]]:
    import psutil

    found = set()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for p in procs:
        try:
            name = " ".join(p.cmdline()[:3])[:80]
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((c.laddr.ip, c.laddr.port, name))
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_curate_process_listens_on_loopback_only_has_no_dashboard_and_never_echoes_secrets(tmp_path):
    src = tmp_path / "src"
    hostile.write_tar(src / "00000.tar", [m for i in range(8) for m in (
        (f"{i:04d}.jpg", hostile.base_images(200 + i)["jpg"]), (f"{i:04d}.txt", f"a picture number {i}".encode()))])
    out = tmp_path / "out"
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmsec", dir="/tmp"))  # AF_UNIX paths: at most 107 bytes
    env = {**os.environ, **SECRETS, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.curate", str(src), "--out", str(out), "--set",
                             "images.min_side_px=16"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.update(_listeners(proc.pid))
            time.sleep(0.5)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    stdout, stderr = proc.communicate(timeout=600)
    done.set()
    t.join()
    assert proc.returncode == 0, stderr[-2000:]
    assert json.loads(stdout.strip().splitlines()[-1])["kept"] == 8
    assert any("gcs_server" in n for _, _, n in seen) and any("raylet" in n for _, _, n in seen), seen
    exposed = sorted(x for x in seen if x[0] not in LOOPBACK)
    assert not exposed, exposed
    assert not [x for x in seen if x[1] in (8265, 10001)], "dashboard or Ray client server started"
    # secrets: not on stdout/stderr, not in any output file, not in Ray's session files for this run
    texts = {"stdout": stdout, "stderr": stderr}
    for root in (out, ray_tmp):
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink() and f.stat().st_size < 64 << 20:
                texts[str(f)] = f.read_bytes().decode("utf-8", "replace")
    assert len(texts) > 10  # outputs and Ray's logs were really read
    for name, value in SECRETS.items():
        leaks = [where for where, text in texts.items() if value in text]
        assert not leaks, (name, leaks)
    shutil.rmtree(ray_tmp, ignore_errors=True)

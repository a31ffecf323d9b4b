"""``fit(init=URI)`` on a cluster without a shared disk: the workers get the URI and fetch the
model themselves, never the driver's fetched copy (a path under the driver's ~/.cache/mm that
other nodes do not have). Real S3 API server: moto_server (tests/s3.py); tests/test_resume.py
covers the same worker path with a file:// URI, which core.storage reads in place (no fetch).

    .venv/bin/pytest tests/test_train_init_s3.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from s3 import s3_server  # noqa: E402,F401

from core.storage import is_uri, upload_dir  # noqa: E402
from mm.checkpoint import save_model  # noqa: E402
from mm.config import FusionConfig, ModelConfig, TextConfig, VisionConfig  # noqa: E402
from mm.models import build_model  # noqa: E402
from mm.train import _build_model  # noqa: E402

CFG = ModelConfig(vision=VisionConfig(image_px=32, patch_px=8, width=32, depth=1, heads=2, max_frames=2),
                  text=TextConfig(width=32, depth=1, heads=2, max_tokens=16), fusion=FusionConfig(depth=0),
                  embed_dim=16)


def test_workers_fetch_an_s3_init_model_on_their_own_node(s3_server, tmp_path, monkeypatch):  # noqa: F811
    torch.manual_seed(3)
    model = build_model(CFG, 40)
    save_model(model, CFG, tmp_path / "pre" / "model", None)
    init = f"{s3_server.bucket('init')}/pre"
    upload_dir(tmp_path / "pre", init)
    # a worker on another node: an empty cache of its own
    monkeypatch.setenv("MM_CACHE_DIR", str(tmp_path / "other-node-cache"))
    got = _build_model(CFG, 40, init, None)
    want = model.state_dict()
    for k, v in got.state_dict().items():
        assert torch.equal(v, want[k]), k
    fetched = list((tmp_path / "other-node-cache").rglob("model.safetensors"))
    assert len(fetched) == 1 and not is_uri(str(fetched[0]))


@pytest.mark.slow  # ~45 s (a pretrain subprocess): `pytest -m slow tests/test_train_init_s3.py`
def test_frozen_features_live_in_an_s3_run_and_come_from_an_s3_init(s3_server, tmp_path):  # noqa: F811
    """``train.frozen_features`` with every path a URI (corpus, --init, --out on S3): the Ray Data
    actors fetch the init themselves and write the features under RUN/features/ on the store, so
    no node needs the driver's disk. (Before: refused with "give a local --out", and the actors got
    the driver's local path to the init.)"""
    import pyarrow.parquet as pq
    from test_data import make_corpus
    from transformers import AutoTokenizer

    import mm
    from core.storage import read_json, resolve

    corpus = make_corpus(tmp_path / "corpus", n=48, seed=2)
    bucket = s3_server.bucket("frozen")
    upload_dir(corpus, f"{bucket}/corpus")
    vocab = len(AutoTokenizer.from_pretrained(str(corpus / "tokenizer")))
    torch.manual_seed(5)
    save_model(build_model(CFG, vocab), CFG, tmp_path / "pre" / "model", None)
    upload_dir(tmp_path / "pre", f"{bucket}/pre")
    run = f"{bucket}/run"
    sets = ["model.lock.vision=true", "model.lock.text=true", "train.frozen_features=true", "data.augment=false",
            "data.batch_size=8", "train.max_steps=4", "train.checkpoint_every_steps=4", "train.max_failures=0"]
    env = {**os.environ, "MM_CACHE_DIR": str(tmp_path / "cache"), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    cmd = [sys.executable, "-m", "jobs.pretrain", "--data", f"{bucket}/corpus", "--init", f"{bucket}/pre",
           "--out", run] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    stamp = read_json(f"{run}/features/corpus0/features.json")
    train_ids = pq.read_table(corpus / "data", filters=[("split", "=", "train")]).column("sample_id").to_pylist()
    assert stamp is not None and stamp["rows"] == len(train_ids) and stamp["inputs"]["init"] == f"{bucket}/pre"
    fs, path, _ = resolve(f"{run}/features/corpus0/data")
    feats = pq.read_table(path, filesystem=fs).to_pydict()
    assert sorted(feats["sample_id"]) == sorted(train_ids)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob("**/features.json"))  # nothing local
    assert mm.load(run) is not None

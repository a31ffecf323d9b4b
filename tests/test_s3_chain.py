"""The chain on object storage, as a user runs it against MinIO or S3: every path an ``s3://`` URI.

A real S3 API server (``moto_server`` on 127.0.0.1, tests/s3.py) reached through
``AWS_ENDPOINT_URL``; the raw shards are uploaded to it, then the real commands run in
subprocesses (each its own local Ray, as `mm` runs for a user) with no local path given:

    mm curate   s3://B/raw/shard-000000.tar s3://B/raw/shard-000001.tar --out s3://B/corpus
    mm pretrain --data s3://B/corpus --out s3://B/run           (then rerun: it resumes, trains nothing)
    mm evaluate --model s3://B/run --data s3://B/corpus --out s3://B/run/eval.json
    mm refresh  --config refresh.yaml    (sources, held-out set, corpus, models, reports: s3://B/refresh/...)

and the outputs are read back from the store. The refresh adopts the chain's model: its corpus
starts with the chain corpus's tokenizer and ``s3://B/refresh/models/current.json`` names
``s3://B/run`` (core.locking.write_pointer, as a user promotes an existing run); it curates the new
shard, continues training from that run, evaluates both on the held-out set and promotes or holds
(the pointer object then names the new run, or still the chain's). ``mm finetune`` is not in this
chain (its object-store support is separate). Nothing is written to the working directory.
Run: ``.venv/bin/pytest -m slow tests/test_s3_chain.py`` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3 import s3_server  # noqa: E402,F401

from core.locking import read_pointer, write_pointer  # noqa: E402
from core.storage import exists, read_bytes, read_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TRAIN = ["--set", "train.max_steps=4", "--set", "train.checkpoint_every_steps=2", "--set", "train.log_every_steps=2",
         "--set", "data.batch_size=8"]


def _mm(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"mm {' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def test_curate_pretrain_evaluate_refresh_with_every_path_on_s3(s3_server, tmp_path):  # noqa: F811
    from pipelines.demo_corpus import generate_demo_corpus

    demo = generate_demo_corpus(tmp_path / "raw", n_images=120, n_videos=2, seed=3)
    bucket = s3_server.bucket("chain")
    fs, root = pafs.FileSystem.from_uri(bucket)
    raw = []
    for shard in demo["image_sources"][:2]:
        key = f"{root}/raw/{Path(shard).name}"
        pafs.copy_files(shard, key, destination_filesystem=fs)
        raw.append(f"{bucket}/raw/{Path(shard).name}")
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    _mm("curate", *raw, "--out", f"{bucket}/corpus", "--set", "images.image_px=32", cwd=cwd)
    stats = json.loads(read_bytes(f"{bucket}/corpus/stats.json"))
    assert stats["invariant_ok"] and stats["kept"] > 0

    _mm("pretrain", "--data", f"{bucket}/corpus", "--out", f"{bucket}/run", *TRAIN, cwd=cwd)
    metrics = [json.loads(x) for x in read_bytes(f"{bucket}/run/metrics.jsonl").decode().splitlines()]
    assert metrics[-1]["step"] == 4
    assert read_bytes(f"{bucket}/run/model/model.safetensors") is not None
    assert read_bytes(f"{bucket}/run/manifest.json") is not None
    again = _mm("pretrain", "--data", f"{bucket}/corpus", "--out", f"{bucket}/run", *TRAIN, cwd=cwd)
    assert "resumed from step 4" in again.stdout + again.stderr  # the store's checkpoint, nothing retrained

    _mm("evaluate", "--model", f"{bucket}/run", "--data", f"{bucket}/corpus", "--out", f"{bucket}/run/eval.json",
        cwd=cwd)
    result = json.loads(read_bytes(f"{bucket}/run/eval.json"))
    assert "retrieval" in result["metrics"]
    assert read_bytes(f"{bucket}/run/report.html") is not None

    # refresh: new data arrives on the store; the chain's model is the promoted one
    new = generate_demo_corpus(tmp_path / "new", n_images=32, n_videos=2, seed=4)
    held = generate_demo_corpus(tmp_path / "held", n_images=16, n_videos=2, seed=99)
    pafs.copy_files(new["image_sources"][0], f"{root}/incoming/shard-new.tar", destination_filesystem=fs)
    pafs.copy_files(held["image_sources"][0], f"{root}/heldout/h.tar", destination_filesystem=fs)
    pafs.copy_files(f"{root}/corpus/tokenizer", f"{root}/refresh/corpus/tokenizer", source_filesystem=fs,
                    destination_filesystem=fs)
    write_pointer(f"{bucket}/refresh/models/current", f"{bucket}/run")
    config = tmp_path / "refresh.yaml"
    config.write_text(json.dumps({
        "sources": [f"{bucket}/incoming"], "heldout_sources": [f"{bucket}/heldout/h.tar"],
        "storage": {"corpus_root": f"{bucket}/refresh/corpus", "models_root": f"{bucket}/refresh/models",
                    "reports_root": f"{bucket}/refresh/reports"},
        "curate": {"overrides": ["images.image_px=32"]},
        "train": {"config": None, "max_steps": 2,
                  "overrides": ["train.checkpoint_every_steps=2", "train.log_every_steps=2", "data.batch_size=8"]},
        "gate": {"task": "retrieval", "tolerance": 0.02}}))
    done = _mm("refresh", "--config", str(config), cwd=cwd)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report = read_json(result["report"])
    assert result["report"].startswith(f"{bucket}/refresh/reports/") and report["decision"]["action"] in ("promoted",
                                                                                                         "held")
    assert report["steps"]["train"]["init"] == f"{bucket}/run"  # continued from the chain's model
    cand = report["steps"]["train"]["run_dir"]
    assert read_json(f"{cand}/heldout/eval.json") is not None and read_json(f"{bucket}/run/heldout/eval.json")
    expected = cand if report["decision"]["action"] == "promoted" else f"{bucket}/run"
    assert read_pointer(f"{bucket}/refresh/models/current") == expected
    snap = report["snapshot"]
    assert snap.startswith(f"{bucket}/refresh/corpus/snapshot=") and read_json(f"{snap}/stats.json")["invariant_ok"]
    assert exists(f"{bucket}/refresh/corpus/_ledger.parquet") and not exists(f"{bucket}/refresh/corpus/_refresh.lock")
    assert list(cwd.iterdir()) == []  # nothing written where the user stood

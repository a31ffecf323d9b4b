"""`mm finetune` with every path an ``s3://`` URI, on a real S3 API server (tests/s3.py).

A tiny labelled corpus and a pretrained run (tests/test_evaluate.py's) are uploaded to
``moto_server``; then the real commands run in subprocesses, each with its own local Ray, as a
user runs them against MinIO or S3 through ``AWS_ENDPOINT_URL``:

    mm finetune --init s3://B/pre --data s3://B/corpus --out s3://B/ft --task retrieval --set finetune.strategy=lora
    mm finetune --init s3://B/pre --data s3://B/corpus --out s3://B/probe --task classify --set finetune.strategy=head_only
    mm evaluate --model s3://B/ft --data s3://B/corpus --out s3://B/ft/eval_again.json

and the runs are read back from the store: RUN/model (LoRA merged), metrics.jsonl, the manifest
naming the --init URI, Ray Train's checkpoints, eval.json, report.html; no local caches uploaded,
nothing written where the user stood. Bad URIs fail before any work in one line.
Run: ``.venv/bin/pytest -m slow tests/test_s3_finetune.py``.
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

from core.storage import exists, read_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

FAST = ["--set", "train.max_steps=2", "--set", "train.num_workers=1", "--set", "data.batch_size=8",
        "--set", "train.log_every_steps=1", "--set", "train.checkpoint_every_steps=2",
        "--set", "finetune.wise_ft_alphas=[0.5]", "--set", "eval.batch_rows=32"]


def _mm(*argv: str, cwd: Path, rc: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == rc, f"mm {' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def test_finetune_s3_to_s3_then_evaluate(s3_server, tmp_path):  # noqa: F811
    from test_evaluate import make_corpus, make_model

    corpus = make_corpus(tmp_path / "corpus", n=48)
    make_model(tmp_path / "pre", corpus)
    bucket = s3_server.bucket("ft")
    fs, root = pafs.FileSystem.from_uri(bucket)
    pafs.copy_files(str(corpus), f"{root}/corpus", destination_filesystem=fs)
    pafs.copy_files(str(tmp_path / "pre"), f"{root}/pre", destination_filesystem=fs)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    init, data = f"{bucket}/pre", f"{bucket}/corpus"

    # bad URIs: one line, exit 2, before any work
    bad = _mm("finetune", "--init", init, "--data", data, "--out", "s3://no-such-bucket-mm/ft", "--task", "retrieval",
              cwd=cwd, rc=2)
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --out s3://no-such-bucket-mm/ft: bucket")
    bad = _mm("finetune", "--init", f"{bucket}/nothing", "--data", data, "--out", f"{bucket}/x", "--task", "retrieval",
              cwd=cwd, rc=2)
    assert f"--init {bucket}/nothing" in bad.stderr.strip().splitlines()[-1]
    bad = _mm("finetune", "--init", init, "--data", data, "--out", init, "--task", "retrieval", cwd=cwd, rc=2)
    assert "would overwrite --init" in bad.stderr
    bad = _mm("finetune", "--init", init, "--data", data, "--out", f"{bucket}/x", "--task", "retrieval",
              "--set", "model.embed_dim=32", cwd=cwd, rc=2)
    assert "model.embed_dim=32 differs from the --init run's 16" in bad.stderr
    assert not exists(f"{bucket}/x")

    # retrieval with LoRA: trained on the store, merged locally, RUN/model re-uploaded
    ft = f"{bucket}/ft"
    _mm("finetune", "--init", init, "--data", data, "--out", ft, "--task", "retrieval",
        "--set", "finetune.strategy=lora", *FAST, cwd=cwd)
    ev = ev_ft = json.loads(read_bytes(f"{ft}/eval.json"))
    assert ev["finetune"] == {**ev["finetune"], "init": init, "task": "retrieval", "strategy": "lora"}
    assert [p["alpha"] for p in ev["wise_ft"]] == [0.0, 0.5, 1.0] and "retrieval" in ev["metrics"]
    metrics = [json.loads(x) for x in read_bytes(f"{ft}/metrics.jsonl").decode().splitlines()]
    assert metrics[-1]["step"] == 2
    assert json.loads(read_bytes(f"{ft}/manifest.json"))["inputs"]["init"] == init
    assert b"WiSE-FT curve" in read_bytes(f"{ft}/report.html")
    ckpts = fs.get_file_info(pafs.FileSelector(f"{root}/ft/ray", recursive=True))
    assert any(i.path.endswith("train_state.json") for i in ckpts)  # Ray Train's checkpoints on the store
    for cache in ("features", "ft_data", "wise_ft", "init_model"):
        assert not exists(f"{ft}/{cache}")
    local = tmp_path / "ft_model"
    pafs.copy_files(f"{root}/ft/model", str(local), source_filesystem=fs)
    import mm
    from mm.checkpoint import read_tensors

    assert not any("lora" in k for k in read_tensors(local / "model.safetensors"))  # merged before the upload
    pre, tuned = read_tensors(tmp_path / "pre" / "model" / "model.safetensors"), read_tensors(local / "model.safetensors")
    assert any(not (pre[k] == tuned[k]).all() for k in pre)  # the fine-tune changed the weights
    mm.load(str(local))

    # classify head_only: a probe on features embedded from the store's corpus, classifier/ uploaded
    probe = f"{bucket}/probe"
    _mm("finetune", "--init", init, "--data", data, "--out", probe, "--task", "classify",
        "--set", "finetune.strategy=head_only", *FAST, cwd=cwd)
    ev = json.loads(read_bytes(f"{probe}/eval.json"))
    assert "classify" in ev["metrics"] and exists(f"{probe}/classifier/classes.json")
    assert exists(f"{probe}/model/model.safetensors") and exists(f"{probe}/probe_metrics.jsonl")

    # and the fine-tuned run evaluates from the store like any run
    _mm("evaluate", "--model", ft, "--data", data, "--out", f"{ft}/eval_again.json", cwd=cwd)
    again = json.loads(read_bytes(f"{ft}/eval_again.json"))
    assert again["metrics"]["retrieval"] == pytest.approx(ev_ft["metrics"]["retrieval"])  # the same model
    assert list(cwd.iterdir()) == []  # nothing written where the user stood

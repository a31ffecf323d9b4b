"""``mm refresh``: the promotion gate, the lock, bad configs, and the three-refresh story.

Fast tests check the gate's decisions, the lock's message and that a bad config fails before any
work (the ledger and discovery are tested in tests/test_ledger.py).
The slow test is the issue's "done when", on real shards from ``pipelines.demo_corpus``: a refresh
on an empty corpus builds it and promotes the first model; adding new shards (one of them exact and
near duplicates of old samples) curates only the new inputs, rejects the cross-snapshot duplicates,
fails at training (an injected bad override), resumes at training without re-curating, evaluates,
and holds the old model with a stated reason; a third refresh with nothing new does no curation and
no training.

Run: ``.venv/bin/pytest tests/test_refresh.py`` (fast) and ``-m slow`` for the end-to-end story.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from core import lineage as L
from core.config import load_config
from jobs import refresh as R
from pipelines.ledger import read_ledger

ROOT = Path(__file__).resolve().parents[1]


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            t.addfile(info, io.BytesIO(data))
    return path


def _jpeg(seed: int) -> bytes:
    img = Image.new("RGB", (40, 40), ((seed * 37) % 256, (seed * 91) % 256, 120))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def duplicate_shard(src: Path, dst: Path, n_exact: int, n_near: int) -> list[str]:
    """A shard of exact copies and near duplicates (resized 90 %, brighter, re-encoded) of decodable
    images in ``src``, under new keys and with their original captions; returns the source keys."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(src) as t:
        for m in t.getmembers():
            if m.isfile() and "." in m.name:
                key, ext = m.name.rsplit(".", 1)
                groups.setdefault(key, {})[ext] = t.extractfile(m).read()
    picked = []
    for key, files in sorted(groups.items()):
        media = next((e for e in ("jpg", "png", "webp") if e in files), None)
        if media is None or "json" not in files:
            continue
        try:
            Image.open(io.BytesIO(files[media])).convert("RGB")
            caption = json.loads(files["json"]).get("caption")
        except Exception:  # noqa: BLE001 - planted corrupt samples are skipped
            continue
        if caption and len(caption.split()) >= 3:
            picked.append((key, media, files))
        if len(picked) == n_exact + n_near:
            break
    out = {}
    for i, (_key, media, files) in enumerate(picked):
        data, ext = files[media], media
        if i >= n_exact:
            im = Image.open(io.BytesIO(data)).convert("RGB")
            im = ImageEnhance.Brightness(im.resize((im.width * 9 // 10, im.height * 9 // 10))).enhance(1.05)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
            data, ext = buf.getvalue(), "jpg"
        out[f"copy{i:04d}.{ext}"] = data
        out[f"copy{i:04d}.json"] = files["json"]
    _tar(dst, out)
    return [k for k, _, _ in picked]


# --------------------------------------------------------------------------- fast
def _refresh_with_eval(tmp_path, cand: float, cur: float | None, tolerance: float = 0.02) -> R.Refresh:
    cfg = load_config(R.RefreshConfig, None, [f"storage.corpus_root={tmp_path / 'corpus'}",
                                              f"storage.models_root={tmp_path / 'models'}",
                                              f"gate.tolerance={tolerance}"])
    r = R.Refresh(cfg, {})
    r.state = {"snapshot": "20260101T0000", "steps": {"evaluate": {
        "candidate": cand, "current": cur, "current_run": str(tmp_path / "models" / "run-old") if cur else None}}}
    (tmp_path / "models" / "run-old").mkdir(parents=True)
    (tmp_path / "models" / "run-20260101T0000").mkdir(parents=True)
    L.write_pointer(tmp_path / "models" / "current", tmp_path / "models" / "run-old")
    return r


def test_gate_promotes_when_no_worse_within_tolerance(tmp_path):
    r = _refresh_with_eval(tmp_path, cand=0.49, cur=0.50)
    d = r.step_decide()
    assert d["action"] == "promoted" and "tolerance 0.02" in d["why"]
    assert L.read_pointer(tmp_path / "models" / "current").name == "run-20260101T0000"


def test_gate_holds_and_says_why(tmp_path):
    r = _refresh_with_eval(tmp_path, cand=0.40, cur=0.50)
    d = r.step_decide()
    assert d["action"] == "held"
    assert "0.4000 < 0.5000 - tolerance 0.02" in d["why"] and "run-old" in d["why"]
    assert L.read_pointer(tmp_path / "models" / "current").name == "run-old"


def test_default_gate_metric_exists_for_image_and_video_corpora():
    """The default gate metric names a metric evaluation writes for either modality (it was
    image_retrieval_recall@5, which a video evaluation never writes)."""
    import numpy as np

    from jobs.gate import GateConfig, metric_name
    from mm.metrics import retrieval_metrics

    emb = np.eye(4, dtype=np.float32)
    for media in ("image", "video"):
        written, _ = retrieval_metrics(emb, emb, np.arange(4), media=media)
        assert metric_name(GateConfig(), media) in written, sorted(written)


def test_gate_promotes_the_first_model(tmp_path):
    r = _refresh_with_eval(tmp_path, cand=0.1, cur=None)
    assert r.step_decide()["action"] == "promoted"


def _config(tmp_path: Path, **extra) -> Path:
    heldout = _tar(tmp_path / "heldout" / "h.tar", {"0.jpg": _jpeg(9), "0.txt": b"a held out sample"})
    (tmp_path / "incoming").mkdir(exist_ok=True)
    cfg = {"sources": [str(tmp_path / "incoming")], "heldout_sources": [str(heldout)],
           "storage": {"corpus_root": str(tmp_path / "corpus"), "models_root": str(tmp_path / "models"),
                       "reports_root": str(tmp_path / "reports")}, **extra}
    path = tmp_path / "refresh.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_second_refresh_at_once_exits_with_a_clear_message(tmp_path, capsys):
    path = _config(tmp_path)
    with L.StorageLock(tmp_path / "corpus" / "_refresh.lock", owner="mm refresh"):
        rc = R.main(["--config", str(path)])
    err = capsys.readouterr().err
    assert rc == R.EXIT_LOCKED
    assert "another run holds the lock" in err and "exits without changing anything" in err
    assert not (tmp_path / "corpus" / "_refresh_state.json").exists()


def test_bad_config_fails_before_any_work(tmp_path, capsys):
    path = _config(tmp_path)
    assert R.main(["--config", str(path), "--set", "train.config=configs/nope.yaml"]) == 2
    assert "train.config configs/nope.yaml does not exist" in capsys.readouterr().err
    assert R.main(["--config", str(path), "--set", "gate.task=bleu"]) == 2
    assert "valid choices: retrieval, zeroshot" in capsys.readouterr().err
    assert not (tmp_path / "corpus").exists()


# --------------------------------------------------------------------------- the story
TRAIN = ["train.num_workers=1", "train.checkpoint_every_steps=4", "train.log_every_steps=2", "data.batch_size=8"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_three_refreshes_build_then_grow_then_do_nothing(tmp_path, ray_session, capsys):
    from pipelines.demo_corpus import generate_demo_corpus

    inc = tmp_path / "incoming"
    inc.mkdir()
    first = generate_demo_corpus(tmp_path / "demo1", n_images=40, n_videos=2, seed=1)
    (inc / "shard-a.tar").write_bytes(Path(first["image_sources"][0]).read_bytes())
    held = generate_demo_corpus(tmp_path / "held", n_images=24, n_videos=2, seed=99)
    cfg = {"sources": [str(inc)], "heldout_sources": [held["image_sources"][0]],
           "storage": {"corpus_root": str(tmp_path / "corpus"), "models_root": str(tmp_path / "models"),
                       "reports_root": str(tmp_path / "reports")},
           "curate": {"config": str(ROOT / "configs" / "curate.yaml"), "overrides": ["images.image_px=64"]},
           "train": {"config": str(ROOT / "configs" / "pretrain.yaml"), "overrides": TRAIN, "max_steps": 4},
           "gate": {"task": "retrieval", "metric": "image_retrieval_recall@5", "tolerance": 0.02}}
    path = tmp_path / "refresh.yaml"
    path.write_text(json.dumps(cfg))
    corpus, models = tmp_path / "corpus", tmp_path / "models"

    # 1. Empty corpus: it is built, a first model trained and promoted.
    assert R.main(["--config", str(path)]) == 0
    rep1 = json.loads(sorted((tmp_path / "reports").glob("refresh-*.json"))[-1].read_text())
    assert rep1["decision"]["action"] == "promoted"
    snap1 = Path(rep1["snapshot"])
    assert snap1.name.startswith("snapshot=") and (corpus / "tokenizer").is_dir() and (corpus / "heldout").is_dir()
    run1 = L.read_pointer(models / "current")
    assert run1 == Path(rep1["steps"]["train"]["run_dir"]) and rep1["steps"]["train"]["init"] is None
    assert json.loads((snap1 / "stats.json").read_text())["invariant_ok"]
    lineage = L.read_manifest(run1)["lineage"]
    assert [Path(i["path"]).name for i in lineage["inputs"]] == [snap1.name]

    # 2. New shards: new samples, and exact + near duplicates of samples of snapshot 1.
    time.sleep(61)  # a new minute, so the new snapshot gets its own YYYYMMDDTHHMM id
    second = generate_demo_corpus(tmp_path / "demo2", n_images=24, n_videos=2, seed=2)
    (inc / "shard-b.tar").write_bytes(Path(second["image_sources"][0]).read_bytes())
    copied = duplicate_shard(inc / "shard-a.tar", inc / "shard-c.tar", n_exact=3, n_near=3)
    assert len(copied) == 6
    # ... first with a training failure injected: the run stops at train and keeps its state.
    assert R.main(["--config", str(path), "--set", "train.overrides=[no_such.key=1]"]) == 1
    assert "resumes at the failed step" in capsys.readouterr().err
    state = json.loads((corpus / "_refresh_state.json").read_text())
    assert set(state["steps"]) == {"discover", "curate", "commit"} and "train" in state["error"]
    snap2 = corpus / f"snapshot={state['snapshot']}"
    curated_at = (snap2 / "stats.json").stat().st_mtime_ns
    # ... then resumed (a strict gate this time, so the candidate is held).
    assert R.main(["--config", str(path), "--set", "gate.tolerance=-1.0"]) == 0
    rep2 = json.loads((tmp_path / "reports" / f"refresh-{state['snapshot']}.json").read_text())
    assert rep2["resumed"] == 1 and (snap2 / "stats.json").stat().st_mtime_ns == curated_at, "not re-curated"
    d = rep2["steps"]["discover"]
    assert sorted(Path(r["uri"]).name for r in d["new"]) == ["shard-b.tar", "shard-c.tar"] and d["unchanged"] == 1
    cross = pq.read_table(snap2 / "rejects" / "cross_snapshot.parquet").to_pylist()
    assert {Path(r["source"]).name for r in cross} == {"shard-c.tar"}
    reasons = [r["reason"] for r in cross]
    assert reasons.count("duplicate") >= 2 and reasons.count("near_duplicate") >= 2, reasons
    old_ids = set(pq.read_table(snap1 / "data", columns=["sample_id"]).column("sample_id").to_pylist())
    assert all(r["detail"].split()[0] in old_ids for r in cross), "the keeper named is an existing sample"
    stats2 = json.loads((snap2 / "stats.json").read_text())
    data2 = pq.read_table(snap2 / "data")
    assert stats2["invariant_ok"] and stats2["kept"] == data2.num_rows
    assert stats2["inputs"] == data2.num_rows + pq.read_table(snap2 / "rejects").num_rows
    assert not ({(r["source"], r["key"]) for r in cross}
                & set(zip(data2.column("source").to_pylist(), data2.column("key").to_pylist())))
    assert rep2["steps"]["train"]["init"] == str(run1)
    assert rep2["steps"]["train"]["corpora"] == [str(snap2), str(snap1)]
    assert rep2["decision"]["action"] == "held" and "tolerance -1.0" in rep2["decision"]["why"]
    assert L.read_pointer(models / "current") == run1, "the old model stays promoted"
    ledger = read_ledger(corpus).to_pylist()
    assert sorted((Path(r["uri"]).name, r["snapshot"]) for r in ledger) == sorted(
        [("shard-a.tar", snap1.name.split("=")[1])] + [(n, state["snapshot"]) for n in ("shard-b.tar", "shard-c.tar")])

    # 3. Nothing new: no curation, no training.
    snapshots, runs = sorted(corpus.glob("snapshot=*")), sorted(models.glob("run-*"))
    assert R.main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped: no new or changed inputs" in out
    rep3 = json.loads(sorted((tmp_path / "reports").glob("refresh-*.json"))[-1].read_text())
    assert set(rep3["steps"]) == {"discover"} and rep3["decision"]["action"] == "skipped"
    assert sorted(corpus.glob("snapshot=*")) == snapshots and sorted(models.glob("run-*")) == runs

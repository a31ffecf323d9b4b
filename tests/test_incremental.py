"""Cross-snapshot dedup of a video snapshot whose clips carry several captions (MSR-VTT style).

A clip's caption rows share its media, hence its content hash and frame hashes: they are one clip,
not duplicates of each other. Against an index holding one older clip, a new snapshot with two
clips of three captions each must lose exactly the three caption rows of the clip the index
already has, and keep all three of the other (before the fix, the caption rows of a kept clip were
dropped as duplicates of each other). The snapshot is written by hand in the layouts curate writes
(data/, the work rows, stats.json) so the test isolates pipelines/incremental.py; dedup runs for
real on the session Ray.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import stats as stats_mod
from pipelines.curate import WORK_ROWS_DIR
from pipelines.dedup import DedupConfig
from pipelines.incremental import INDEX_COLUMNS, dedup_against_index, kept_index_rows

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

"""DIR/report.html of ``mm curate`` (pipelines/curate_report.py) and the dedup evidence behind it.

One curate run of test_curate.py's mixed corpus (planted exact and near duplicates, corrupt,
truncated and empty files, bad captions) is audited through its report: every reject reason with
its count, drop | keeper pairs with the evidence that decided them, inline images only. The
near misses come from the look-alike corpus of test_dedup.py (same background and layout, other
pictures), on the local and the distributed dedup path. The report is also written to S3.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3 import s3_server  # noqa: F401
from test_curate import corpus  # noqa: F401  (the module-scoped mixed corpus)
from test_dedup import planted_corpus  # noqa: F401

from jobs.curate import main
from pipelines.curate_report import render_curate_report, svg_bars, write_curate_report
from pipelines.dedup import DedupConfig, drop_details, find_duplicates, find_duplicates_local, parse_detail


@pytest.fixture(scope="module")
def run(ray_session, corpus, tmp_path_factory):  # noqa: F811
    _, srcs, _ = corpus
    out = tmp_path_factory.mktemp("report") / "curated"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*srcs, "--out", str(out), "--set", "images.image_px=64", "--set", "tokenizer.vocab_size=300"]) == 0
    summary = json.loads(stdout.getvalue().strip().splitlines()[-1])
    return out, summary, (out / "report.html").read_text(encoding="utf-8")


def test_curate_prints_where_the_report_is(run):
    out, summary, page = run
    assert summary["report"] == f"{out}/report.html"
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")


def test_report_names_every_reason_with_its_count(run):
    out, _, page = run
    stats = json.loads((out / "stats.json").read_text())
    assert {"near_duplicate", "duplicate", "decode_error", "truncated", "empty_file", "missing_media"} <= set(
        stats["rejected"])
    for reason, n in stats["rejected"].items():
        assert f"<h3>{reason} ({n})</h3>" in page, reason
        assert f"<td class=name>{reason}</td><td>{n}</td>" in page, reason
    assert f"<td class=name>kept</td><td>{stats['kept']}</td>" in page
    # a sample of a stage reject shows its detail (no image exists for it)
    rejects = pq.read_table(out / "rejects").to_pylist()
    empty = next(r for r in rejects if r["reason"] == "empty_file")
    assert f"detail: {empty['detail']}" in page
    # every histogram of stats.json is drawn
    for name in stats["histograms"]:
        assert f"<title>{name}</title>" in page


def test_report_shows_drop_and_keeper_with_the_evidence(run):
    out, _, page = run
    rejects = pq.read_table(out / "rejects").to_pylist()
    near = [r for r in rejects if r["reason"] == "near_duplicate"]
    assert near
    keeper, evidence = parse_detail(near[0]["detail"])
    assert {"hamming", "residual", "limit"} <= set(evidence)
    pairs = re.findall(r'<div class="pair">(.*?)</div></div>(?=<div class="pair">|</div>)', page, re.S)
    dup_pairs = [p for p in pairs if "<div>kept apart</div>" not in p]
    assert len(dup_pairs) >= 2
    mine = [p for p in dup_pairs if f"keeper {keeper}" in p]
    assert mine, "the near duplicate's keeper is shown beside it"
    assert f"drop {near[0]['key']}" in mine[0]
    ev = " ".join(f"{k}={v}" for k, v in evidence.items())
    assert ev in mine[0]
    assert mine[0].count("data:image/jpeg;base64,") == 2, "both sides are pictured"
    assert any("exact=media" in p for p in dup_pairs)


def test_report_is_self_contained(run):
    _, _, page = run
    assert "<script" not in page and "<link" not in page and "url(" not in page
    assert not re.search(r"https?://", page)
    for target in re.findall(r'(?:src|href)="([^"]*)"', page):
        assert target.startswith("data:image/"), target[:40]
    assert page.count('<div class="cell">') > 10  # the kept grid (25 kept rows: up to 24 shown)


def test_near_misses_are_the_closest_pairs_verification_kept(planted_corpus, ray_session):  # noqa: F811
    import ray

    t, planted = planted_corpus
    stats: dict = {}
    drops = find_duplicates_local(t, DedupConfig(), with_evidence=True, stats=stats, near_misses=3)
    misses = stats["near_misses"]
    assert 1 <= len(misses) <= 3
    key = dict(zip(t.column("row_id").to_pylist(), t.column("key").to_pylist()))
    residuals = []
    for m in misses:
        ev = dict(tok.split("=") for tok in m["evidence"].split())
        assert float(ev["residual"]) > float(ev["limit"])  # kept apart: over the limit
        residuals.append(float(ev["residual"]))
        assert planted.get(key[m["row_id"]]) != key[m["other_row_id"]]  # never a planted copy and its original
    assert residuals == sorted(residuals)
    # the detail of every drop: keeper first, then the evidence
    for detail, k in zip(drop_details(drops).to_pylist(), drops.column("keeper").to_pylist()):
        keeper, ev = parse_detail(detail)
        assert keeper == k and float(ev["residual"]) <= float(ev["limit"])
    dist_stats: dict = {}
    find_duplicates(ray.data.from_arrow(t).repartition(3), DedupConfig(local_max_rows=0, lsh_shards=8, num_partitions=2),
                    stats=dist_stats, near_misses=3)
    assert dist_stats["near_misses"] == misses


def test_parse_detail_forms():
    assert parse_detail("abc hamming=3 residual=6.1 limit=22.0") == (
        "abc", {"hamming": "3", "residual": "6.1", "limit": "22.0"})
    assert parse_detail("abc exact=media") == ("abc", {"exact": "media"})
    assert parse_detail("abc") == ("abc", {})  # a bare keeper (video clips, older corpora)
    assert parse_detail(None) == (None, {})
    drops = pa.table({"row_id": ["r"], "reason": ["duplicate"], "keeper": ["k"]})
    assert drop_details(drops).to_pylist() == ["k"]


def test_video_stats_render_without_images():
    stats = {"modality": "video", "inputs": 3, "kept": 2, "kept_inputs": 2, "rejected": {"undecodable": 1},
             "rejected_by_stage": {"video": 1}, "histograms": {},
             "clips": {"dropped": {"static": 2}},
             "video": {"duration_s": {"edges": [0, 2, None], "counts": [1, 2]}, "codec": {"h264": 3}}}
    page = render_curate_report("v", stats, [], {"undecodable": [{"source": "s", "key": "k", "stage": "video",
                                                                   "reason": "undecodable", "detail": "bad"}]},
                                [], [], {}, {})
    assert "<h3>undecodable (1)</h3>" in page and "detail: bad" in page and "<title>video duration_s</title>" in page
    assert "∞" in svg_bars("x", ["0–∞"], [0])


def test_report_on_s3_with_pairs_and_near_misses(run, planted_corpus, s3_server):  # noqa: F811
    """write_curate_report on an S3 filesystem: the kept grid read from S3, the look-alike corpus's
    planted copies beside their originals and its closest look-alikes as near misses."""
    import ray
    from pyarrow import fs as pafs

    out, _, _ = run
    t, planted = planted_corpus
    bucket = s3_server.bucket("report")
    s3, root = pafs.FileSystem.from_uri(f"{bucket}/corpus")
    pafs.copy_files(str(out / "data"), f"{root}/data", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)
    dstats: dict = {}
    drops = find_duplicates_local(t, DedupConfig(), with_evidence=True, stats=dstats, near_misses=3)
    by_rid = {r["row_id"]: r for r in t.select(["row_id", "source", "key"]).to_pylist()}
    rejects = pa.Table.from_pylist([{**by_rid[r], "stage": "dedup", "reason": "near_duplicate", "detail": d}
                                    for r, d in zip(drops.column("row_id").to_pylist(), drops_details(drops))])
    stats = {"modality": "image", "inputs": t.num_rows, "kept": t.num_rows - drops.num_rows,
             "rejected": {"near_duplicate": drops.num_rows}, "histograms": {}}
    media = ray.data.from_arrow(t.select(["row_id", "sample_id", "key", "thumb"]))
    path = write_curate_report(s3, root, stats, media=media, drops=drops, rejects=rejects,
                               near_misses=dstats["near_misses"], title=f"{bucket}/corpus")
    with s3.open_input_stream(path) as f:
        page = f.read().decode("utf-8")
    assert page.count('<div class="cell">') > 10  # the kept grid, read from S3
    assert f"<h3>near_duplicate ({len(planted)})</h3>" in page
    for copy, original in planted.items():
        assert f'alt="drop {copy}"' in page and f'alt="keeper {original}"' in page
    near = page[page.index("<h2>Near misses"):]
    assert near.count("<div>kept apart</div>") == len(dstats["near_misses"]) >= 1
    assert near.count("data:image/jpeg;base64,") == 2 * len(dstats["near_misses"])
    assert dstats["near_misses"][0]["evidence"] in near


def drops_details(drops: pa.Table) -> list[str]:
    return drop_details(drops).to_pylist()

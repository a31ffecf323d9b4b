"""DIR/report.html: one self-contained page to audit a curation run (``mm curate``).

    write_curate_report(fs, out_dir, stats, media=ds, drops=drops, rejects=rejects_ds,
                        near_misses=dedup_stats["near_misses"])    # -> "<out_dir>/report.html"

Sections: the counts (inputs, kept, rejected per reason and per stage), the histograms of
``stats.json`` as inline SVG bar plots, a grid of kept samples with their captions, a few
samples of every reject reason with their ``detail``, duplicate pairs side by side (drop |
keeper) with the evidence that decided them, and the near misses: the candidate pairs
verification came closest to accepting but kept apart (pipelines/dedup.py ``near_misses``).
Images are base64 JPEG data URIs and the plots are SVG, so the page loads nothing from
anywhere and can be mailed as one file (like the run report, mm/report.py, whose look it shares).

Memory stays bounded whatever the corpus size: reject samples are the first ``REJECT_SAMPLES``
of each reason met while streaming ``rejects/`` (stopping once every reason has its share),
the kept grid is the first ``KEPT_SAMPLES`` rows of the smallest ``data/`` file, and one pass
over ``media`` (rows with ``row_id``, ``sample_id`` and a media column: ``thumb``, the 64x64
verification thumbnail of images, or ``frames`` of video clips) returns thumbnails of the few
rows the page shows, nothing else. Images exist only for rows that were decoded: a reject of the
read, caption or image stage is shown by its detail. Tested in tests/test_curate_report.py.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.schema import make_sample_id

KEPT_SAMPLES = 24
REJECT_SAMPLES = 4
PAIR_SAMPLES = 8      # drop | keeper pairs per duplicate reason
NEAR_MISSES = 8       # closest kept pairs (dedup's ``near_misses``)
THUMB_PX = 128
DUPLICATE_REASONS = ("duplicate", "near_duplicate", "semantic_duplicate")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.name{text-align:left;font-family:monospace}.meta{color:#666;font-size:.85em}
.bar{background:#4a7fc1;height:.8em;display:inline-block}
.grid{display:flex;flex-wrap:wrap;gap:.6em}.cell{width:140px;font-size:.75em;text-align:center;word-wrap:break-word}
.cell img,.pair img{width:128px;height:128px;object-fit:contain;border:1px solid #ccc;background:#fafafa}
.noimg{width:128px;height:40px;border:1px dashed #ccc;color:#999;display:flex;align-items:center;justify-content:center}
.pairs{display:flex;flex-wrap:wrap;gap:1em}.pair{border:1px solid #ddd;padding:.4em;font-size:.75em;width:290px}
.pair .two{display:flex;gap:.4em}.pair .two div{text-align:center}.ev{font-family:monospace;color:#333}
.rej{display:flex;gap:.6em;align-items:flex-start;margin:.3em 0;font-size:.8em}.rej .txt{font-family:monospace}
.hists{display:flex;flex-wrap:wrap;gap:1em}
"""


# --------------------------------------------------------------------------- small helpers
def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def thumbnail_jpeg(blob: bytes | None, px: int = THUMB_PX) -> bytes | None:
    """A JPEG at most ``px`` on a side (already-small JPEGs pass through); None if undecodable."""
    if not blob:
        return None
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(blob))
        if im.format == "JPEG" and max(im.size) <= px:
            return blob
        im = im.convert("RGB")
        im.thumbnail((px, px))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 - a broken picture is shown as missing, never an error
        return None


def _img(blob: bytes | None, alt: str = "") -> str:
    if not blob:
        return '<div class="noimg">no image</div>'
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(blob).decode("ascii")}" alt="{_e(alt)}">'


def svg_bars(title: str, labels: list[str], counts: list[int], width: int = 340, height: int = 170) -> str:
    """A bar plot as inline SVG (no script, no external font)."""
    n, top = max(len(counts), 1), max(max(counts, default=0), 1)
    left, plot_h = 34, height - 70
    bw = (width - left - 8) / n
    parts = [f'<svg width="{width}" height="{height}" role="img" style="overflow:visible" '
             f'font-family="sans-serif" font-size="9"><title>{_e(title)}</title>',
             f'<text x="{width / 2:.0f}" y="12" text-anchor="middle" font-size="11">{_e(title)}</text>',
             f'<text x="{left - 3}" y="{24:.0f}" text-anchor="end">{top}</text>',
             f'<text x="{left - 3}" y="{24 + plot_h:.0f}" text-anchor="end">0</text>',
             f'<line x1="{left}" y1="{24 + plot_h}" x2="{width - 8}" y2="{24 + plot_h}" stroke="#999"/>']
    for i, (lab, c) in enumerate(zip(labels, counts)):
        h = plot_h * c / top
        x = left + i * bw
        parts.append(f'<rect x="{x + 1:.1f}" y="{24 + plot_h - h:.1f}" width="{max(bw - 2, 1):.1f}" height="{h:.1f}" '
                     f'fill="#4a7fc1"><title>{_e(lab)}: {c}</title></rect>')
        ty = 24 + plot_h + 4
        parts.append(f'<text x="{x + bw / 2:.1f}" y="{ty}" transform="rotate(60 {x + bw / 2:.1f} {ty})" '
                     f'font-size="8">{_e(lab)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _edge_labels(edges: list) -> list[str]:
    def f(v):
        return "∞" if v is None else (f"{v:g}" if isinstance(v, (int, float)) else str(v))

    return [f"{f(a)}–{f(b)}" for a, b in zip(edges[:-1], edges[1:])]


def _hist_svgs(hists: dict, prefix: str = "") -> list[str]:
    out = []
    for name, h in hists.items():
        if isinstance(h, dict) and "edges" in h and "counts" in h:
            out.append(svg_bars(prefix + name, _edge_labels(h["edges"]), list(h["counts"])))
    return out


# --------------------------------------------------------------------------- bounded sampling
def sample_rejects(rejects, counts: dict[str, int], k: int = REJECT_SAMPLES) -> dict[str, list[dict]]:
    """The first ``k`` reject rows of each reason, streaming ``rejects`` (a Ray Dataset or a
    pyarrow Table of REJECT_SCHEMA rows) and stopping once every reason of ``counts`` has them."""
    want = {r: min(k, n) for r, n in counts.items()}
    got: dict[str, list[dict]] = {r: [] for r in counts}
    batches = rejects.to_batches() if isinstance(rejects, pa.Table) else rejects.iter_batches(
        batch_size=None, batch_format="pyarrow")
    for b in batches:
        for row in (b if isinstance(b, pa.Table) else pa.Table.from_batches([b])).to_pylist():
            lst = got.setdefault(row["reason"], [])
            if len(lst) < want.get(row["reason"], k):
                lst.append(row)
        if all(len(got[r]) >= n for r, n in want.items()):
            break
    return got


def pick_pairs(drops: pa.Table, k: int = PAIR_SAMPLES) -> list[dict]:
    """Up to ``k`` drops per duplicate reason (by row_id, one per keeper): the pairs to show."""
    if drops.num_rows == 0:
        return []
    drops = drops.sort_by("row_id")
    evidence = drops.column("evidence").to_pylist() if "evidence" in drops.column_names else [None] * drops.num_rows
    out, seen, per = [], set(), {}
    for rid, reason, keeper, ev in zip(drops.column("row_id").to_pylist(), drops.column("reason").to_pylist(),
                                       drops.column("keeper").to_pylist(), evidence):
        if keeper in seen or per.get(reason, 0) >= k:
            continue
        seen.add(keeper)
        per[reason] = per.get(reason, 0) + 1
        out.append({"row_id": rid, "reason": reason, "keeper": keeper, "evidence": ev})
    return out


def _media_thumbs(batch: pa.Table, row_ids: pa.Array, sample_ids: pa.Array, exclude: pa.Array,
                  column: str) -> pa.Table:
    """Rows named by row_id, or by sample_id (but not a dropped row) → (row_id, sample_id, key, thumb)."""
    by_row = pc.is_in(batch.column("row_id"), value_set=row_ids)
    by_sid = pc.and_(pc.is_in(batch.column("sample_id"), value_set=sample_ids),
                     pc.invert(pc.is_in(batch.column("row_id"), value_set=exclude)))
    t = batch.filter(pc.or_kleene(by_row, pc.fill_null(by_sid, False)))
    media = t.column(column).to_pylist()
    if column == "frames":
        media = [m[0] if m else None for m in media]
    key = t.column("key") if "key" in t.column_names else pa.nulls(t.num_rows, pa.string())
    return pa.table({"row_id": t.column("row_id"), "sample_id": t.column("sample_id"), "key": key,
                     "thumb": pa.array([thumbnail_jpeg(m) for m in media], pa.binary())})


def collect_thumbs(media, row_ids: set[str], sample_ids: set[str], exclude: pa.Array,
                   light: dict | None = None) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """One pass over ``media`` (Ray Dataset: row_id, sample_id, optional key, and ``thumb`` or
    ``frames``) → ({row_id: (key, thumbnail)}, {sample_id: (key, thumbnail)}) of the named rows only."""
    if not row_ids and not sample_ids:
        return {}, {}
    column = "thumb" if "thumb" in media.schema().names else "frames"
    kw = {"row_ids": pa.array(sorted(row_ids), pa.string()), "sample_ids": pa.array(sorted(sample_ids), pa.string()),
          "exclude": exclude, "column": column}
    by_row: dict[str, tuple] = {}
    by_sid: dict[str, tuple] = {}
    ds = media.map_batches(_media_thumbs, fn_kwargs=kw, **(light or {"batch_format": "pyarrow"}))
    for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for rid, sid, key, th in zip(*(b.column(c).to_pylist() for c in ("row_id", "sample_id", "key", "thumb"))):
            if rid in row_ids:
                by_row.setdefault(rid, (key, th))
            if sid in sample_ids and th:
                by_sid.setdefault(sid, (key, th))
    return by_row, by_sid


def kept_samples(fs: Any, data_dir: str, k: int = KEPT_SAMPLES) -> list[dict]:
    """The first ``k`` rows of the smallest ``data/`` Parquet file (one file read, however big
    the corpus), each with a thumbnail of its image (or first frame)."""
    infos = [i for i in fs.get_file_info(pafs.FileSelector(data_dir, allow_not_found=True))
             if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    if not infos:
        return []
    smallest = min(infos, key=lambda i: (i.size, i.path))
    with fs.open_input_file(smallest.path) as f:
        pf = pq.ParquetFile(f)
        column = "image" if "image" in pf.schema_arrow.names else "frames"
        cols = [c for c in ("sample_id", "source", "key", "caption", column, "start_s") if c in pf.schema_arrow.names]
        batch = next(pf.iter_batches(batch_size=k, columns=cols), None)
    rows = batch.to_pylist() if batch is not None else []
    for r in rows:
        media = r.pop(column)
        r["thumb"] = thumbnail_jpeg(media[0] if column == "frames" and media else media)
    return rows


# --------------------------------------------------------------------------- page
def _summary(stats: dict) -> str:
    keys = ("modality", "inputs", "kept", "rejected_total", "invariant_ok", "duplicates_dropped", "kept_inputs")
    cells = "".join(f"<tr><td class=name>{_e(k)}</td><td>{_e(stats[k])}</td></tr>" for k in keys if k in stats)
    secs = stats.get("seconds") or {}
    line = " · ".join(f"{_e(k)} {v:.1f} s" for k, v in secs.items() if isinstance(v, (int, float)))
    return f"<table>{cells}</table>" + (f"<p class=meta>seconds: {line}</p>" if line else "")


def _count_table(title: str, counts: dict[str, int], total: int) -> str:
    if not counts:
        return f"<p>{_e(title)}: none</p>"
    top = max(counts.values())
    rows = [f"<table><tr><th>{_e(title)}</th><th>count</th><th>% of inputs</th><th></th></tr>"]
    for name, n in counts.items():
        rows.append(f"<tr><td class=name>{_e(name)}</td><td>{n}</td><td>{100 * n / max(total, 1):.2f}</td>"
                    f'<td style="text-align:left"><span class="bar" style="width:{160 * n / top:.0f}px"></span></td></tr>')
    rows.append("</table>")
    return "\n".join(rows)


def _evidence_text(evidence: str | None) -> str:
    return _e(evidence) if evidence else "evidence not recorded"


def _side(label: str, ident: str, found: tuple | None) -> tuple[str, bytes | None]:
    key, thumb = found or (None, None)
    return f"{label} {key if key is not None else ident[:8]}".strip(), thumb


def _pair_html(left: tuple[str, bytes | None], right: tuple[str, bytes | None], caption: str, evidence: str) -> str:
    two = "".join(f"<div>{_img(th, label)}<br>{_e(label)}</div>" for label, th in (left, right))
    return f'<div class="pair"><div class="two">{two}</div><div>{caption}</div><div class="ev">{evidence}</div></div>'


def render_curate_report(title: str, stats: dict, kept: list[dict], reject_samples: dict[str, list[dict]],
                         pairs: list[dict], near_misses: list[dict], by_row: dict[str, tuple],
                         by_sid: dict[str, tuple], row_id_of=None) -> str:
    """The page, from what write_curate_report gathered (pure: testable without Ray)."""
    inputs = stats.get("inputs", 0)
    p = [f"<!doctype html><html><head><meta charset='utf-8'><title>curation report: {_e(title)}</title>"
         f"<style>{_CSS}</style></head><body>", f"<h1>Curation report: {_e(title)}</h1>",
         "<h2>Counts</h2>", _summary(stats),
         _count_table("reject reason", stats.get("rejected") or {}, inputs),
         _count_table("reject stage", stats.get("rejected_by_stage") or {}, inputs)]
    clips = (stats.get("clips") or {}).get("dropped")
    if clips:
        p.append(_count_table("clips dropped (input kept)", clips, inputs))
    svgs = _hist_svgs(stats.get("histograms") or {}) + _hist_svgs(
        {k: v for k, v in (stats.get("video") or {}).items() if isinstance(v, dict)}, "video ")
    if svgs:
        p += ["<h2>Histograms (kept samples)</h2>", f'<div class="hists">{"".join(svgs)}</div>']
    p.append(f"<h2>Kept samples</h2><p class=meta>the first {len(kept)} rows of one data/ file</p>")
    cells = [f'<div class="cell">{_img(r.get("thumb"), r.get("key", ""))}<br>{_e(r.get("caption"))}'
             f'<br><span class=meta>{_e(r.get("key"))}</span></div>' for r in kept]
    p.append(f'<div class="grid">{"".join(cells)}</div>' if cells else "<p>no kept samples</p>")
    p.append("<h2>Rejects by reason</h2><p class=meta>a few of each reason with their detail; a duplicate's "
             "detail is its keeper's sample_id, then the evidence</p>")
    for reason, n in (stats.get("rejected") or {}).items():
        p.append(f"<h3>{_e(reason)} ({n})</h3>")
        for r in reject_samples.get(reason, []):
            rid = row_id_of(r) if row_id_of else None
            img = _img(by_row.get(rid, (None, None))[1], r.get("key", "")) if rid and reason in DUPLICATE_REASONS else ""
            p.append(f'<div class="rej">{img}<div class="txt">{_e(r["source"])} · {_e(r["key"])} · stage '
                     f'{_e(r["stage"])}<br>detail: {_e(r["detail"])}</div></div>')
    p.append("<h2>Duplicate pairs: drop | keeper</h2><p class=meta>left the dropped sample, right the one kept; "
             "hamming: bits between pHashes, residual: worst 8x8 block difference of the aligned 64x64 "
             "thumbnails (grey levels), limit: the largest residual the pair's information allowed</p>")
    shown = [_pair_html(_side("drop", x["row_id"], by_row.get(x["row_id"])),
                        _side("keeper", x["keeper"], by_sid.get(x["keeper"])),
                        f'{_e(x["reason"])} · keeper {_e(x["keeper"])}', _evidence_text(x.get("evidence")))
             for x in pairs]
    p.append(f'<div class="pairs">{"".join(shown)}</div>' if shown else "<p>no duplicates</p>")
    p.append("<h2>Near misses: closest pairs kept</h2><p class=meta>candidate pairs verification kept apart, "
             "closest first: both samples stay (unless another pair dropped one)</p>")
    shown = [_pair_html(_side("", m["sample_id"], by_row.get(m["row_id"])),
                        _side("", m["other_sample_id"], by_row.get(m["other_row_id"])),
                        "kept apart", _evidence_text(m.get("evidence"))) for m in near_misses]
    p.append(f'<div class="pairs">{"".join(shown)}</div>' if shown else
             "<p>no candidate pair came close (or verification did not run)</p>")
    p.append("</body></html>")
    return "\n".join(p)


def write_curate_report(fs: Any, out_dir: str, stats: dict, *, media, drops: pa.Table, rejects,
                        near_misses: list[dict] | None = None, light: dict | None = None,
                        title: str | None = None) -> str:
    """Gather the bounded samples (see the module doc) and write ``out_dir/report.html`` on
    ``fs`` (any pyarrow filesystem: local, S3 ...). Returns the path written."""
    modality = stats.get("modality", "image")
    reject_samples = sample_rejects(rejects, stats.get("rejected") or {})
    pairs = pick_pairs(drops)
    near = list(near_misses or [])[:NEAR_MISSES]

    def row_id_of(r: dict) -> str | None:  # image work rows: row_id = make_sample_id(source, key)
        return make_sample_id(r["source"], r["key"]) if modality == "image" else None

    row_ids = {x["row_id"] for x in pairs} | {m[c] for m in near for c in ("row_id", "other_row_id")}
    row_ids |= {row_id_of(r) for reason in DUPLICATE_REASONS for r in reject_samples.get(reason, [])} - {None}
    by_row, by_sid = collect_thumbs(media, row_ids, {x["keeper"] for x in pairs}, drops.column("row_id"), light)
    page = render_curate_report(title or out_dir, stats, kept_samples(fs, f"{out_dir}/data"), reject_samples,
                                pairs, near, by_row, by_sid, row_id_of)
    path = f"{out_dir}/report.html"
    with fs.open_output_stream(path) as f:
        f.write(page.encode("utf-8"))
    return path


__all__ = ["write_curate_report", "render_curate_report", "svg_bars", "sample_rejects", "pick_pairs",
           "collect_thumbs", "kept_samples", "thumbnail_jpeg", "KEPT_SAMPLES", "REJECT_SAMPLES"]

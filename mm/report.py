"""RUN/report.html: one self-contained page (plots and images embedded as data URIs) for a run.

Reads what the run wrote and draws it with matplotlib (Agg, no display needed):

* ``RUN/metrics.jsonl``: one line per logged step; every numeric key whose name contains
  ``loss`` is drawn against ``step`` (loss curves); ``RUN/probe_metrics.jsonl`` likewise for a
  linear probe's L-BFGS (head-only and LP-FT fine-tunes).
* ``RUN/eval.json`` (``mm.evaluate`` format): ``metrics`` and ``chance`` per task
  (``{"zeroshot": {"acc1": ..}, "retrieval": {"image_retrieval_recall@1": ..}, ...}``) become the
  metric table; optional ``retention`` (zero-shot before/after fine-tuning beside fine-tuned
  accuracy), ``wise_ft`` (a list of ``{"alpha", "metrics": {task: {...}}}``, drawn as curves) and
  ``confusion_matrix`` (``{"classes", "matrix", "source"}``).
* ``RUN/eval_samples.json``: a few retrievals (query caption, top hits as base64 JPEG thumbnails
  with their captions and whether each is a positive).

The page loads no external resource, so it reads offline and can be mailed as one file.

    write_report("runs/ft")            # -> runs/ft/report.html
Tested in tests/test_report.py.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.name{text-align:left;font-family:monospace}
.q{margin:.8em 0}.hits{display:flex;gap:.6em;flex-wrap:wrap}
.hit{width:110px;font-size:.75em;text-align:center}.hit img{width:96px;height:96px;object-fit:contain;
border:3px solid #ccc;image-rendering:pixelated}.hit.ok img{border-color:#2a2}.meta{color:#666;font-size:.85em}
"""


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return rows


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plot_losses(rows: list[dict], title: str = "training losses", xlabel: str = "step") -> str | None:
    """Loss curves (every numeric ``*loss*`` key against ``step``) as a PNG data URI."""
    keys = sorted({k for r in rows for k, v in r.items() if "loss" in k and isinstance(v, (int, float))})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in keys:
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
               if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _png(fig)


def plot_wise_ft(curve: list[dict]) -> str | None:
    """Every metric of every task against the interpolation weight alpha (0 = pretrained)."""
    if not curve:
        return None
    series: dict[str, list[tuple[float, float]]] = {}
    for point in sorted(curve, key=lambda p: p["alpha"]):
        for task, metrics in point.get("metrics", {}).items():
            for name in ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1"):
                if isinstance(metrics.get(name), (int, float)):
                    series.setdefault(f"{task} {name}", []).append((point["alpha"], metrics[name]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("alpha (0 = pretrained, 1 = fine-tuned)")
    ax.set_ylabel("metric")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("WiSE-FT: weight-space interpolation")
    return _png(fig)


def plot_confusion(cm: dict) -> str | None:
    matrix = np.asarray(cm.get("matrix", []), dtype=np.int64)
    if matrix.ndim != 2 or matrix.size == 0:
        return None
    classes = cm.get("classes") or [str(i) for i in range(len(matrix))]
    n = len(matrix)
    side = min(12, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({cm.get('source', '')})")
    return _png(fig)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return html.escape(str(v))


def _metric_table(ev: dict) -> str:
    metrics, chance = ev.get("metrics", {}), ev.get("chance", {})
    if not metrics:
        return "<p>no metrics</p>"
    rows = ["<table><tr><th>task</th><th>metric</th><th>value</th><th>chance</th></tr>"]
    for task, values in metrics.items():
        for name, v in values.items():
            c = chance.get(task, {}).get(name, "")
            rows.append(f"<tr><td class=name>{html.escape(task)}</td><td class=name>{html.escape(name)}</td>"
                        f"<td>{_fmt(v)}</td><td>{_fmt(c)}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _retention_table(ret: dict) -> str:
    rows = ["<table><tr><th>quantity</th><th>value</th></tr>"]
    for k, v in ret.items():
        rows.append(f"<tr><td class=name>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _samples_html(samples: dict) -> str:
    out = []
    for q in samples.get("retrievals", []):
        hits = []
        for h in q.get("hits", []):
            cls = "hit ok" if h.get("positive") else "hit"
            img = f'<img src="data:image/jpeg;base64,{h["image"]}" alt="">' if h.get("image") else ""
            hits.append(f'<div class="{cls}">{img}<br>{html.escape(h.get("caption", ""))}</div>')
        out.append(f'<div class="q"><b>{html.escape(q.get("direction", "text→image"))}</b>: '
                   f'“{html.escape(q.get("query", ""))}”<div class="hits">{"".join(hits)}</div></div>')
    return "\n".join(out) or "<p>no samples</p>"


def _captions_html(samples: dict) -> str:
    if not samples.get("captions"):
        return ""
    from mm.caption import caption_grid_html

    return "<h2>Generated captions</h2>" + caption_grid_html(samples["captions"])


def render_report(run_dir: Path, ev: dict, metric_rows: list[dict], samples: dict,
                  probe_rows: list[dict] | None = None) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>report: {html.escape(run_dir.name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Run report: {html.escape(str(run_dir))}</h1>",
             f"<p class=meta>model: {html.escape(str(ev.get('model', '')))} · data: "
             f"{html.escape(str(ev.get('data', '')))} · split: {html.escape(str(ev.get('split', '')))}"
             f" · samples: {html.escape(json.dumps(ev.get('counts', {})))}</p>",
             "<h2>Metrics</h2>", _metric_table(ev)]
    if ev.get("retention"):
        parts += ["<h2>Zero-shot retention after fine-tuning</h2>", _retention_table(ev["retention"])]
    probe = plot_losses(probe_rows or [], "linear probe (L-BFGS)", "loss evaluation")
    for title, uri in (("Loss curves", plot_losses(metric_rows)), ("Linear-probe loss", probe),
                       ("WiSE-FT curve", plot_wise_ft(ev.get("wise_ft", []))),
                       ("Confusion matrix", plot_confusion(ev.get("confusion_matrix", {})))):
        if uri:
            parts += [f"<h2>{title}</h2>", f'<img src="{uri}" alt="{title}">']
    if ev.get("wise_ft"):
        parts.append(_wise_table(ev["wise_ft"]))
    parts += ["<h2>Sample retrievals</h2>", "<p class=meta>green border: a positive of the query</p>",
              _samples_html(samples), _captions_html(samples), "</body></html>"]
    return "\n".join(parts)


def _wise_table(curve: list[dict]) -> str:
    names = sorted({(t, n) for p in curve for t, m in p.get("metrics", {}).items() for n in m})
    head = "".join(f"<th>{html.escape(t)}<br>{html.escape(n)}</th>" for t, n in names)
    rows = [f"<table><tr><th>alpha</th>{head}</tr>"]
    for p in sorted(curve, key=lambda p: p["alpha"]):
        cells = "".join(f"<td>{_fmt(p['metrics'].get(t, {}).get(n, ''))}</td>" for t, n in names)
        rows.append(f"<tr><td>{p['alpha']:.2f}</td>{cells}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def write_report(run_dir: str | Path, eval_path: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Render ``run_dir``'s metrics.jsonl, eval.json and eval_samples.json into ``report.html``."""
    run = Path(run_dir)
    ev_path = Path(eval_path) if eval_path else run / "eval.json"
    ev = json.loads(ev_path.read_text(encoding="utf-8")) if ev_path.is_file() else {}
    samples_path = ev_path.with_name(ev_path.stem + "_samples.json")
    samples = json.loads(samples_path.read_text(encoding="utf-8")) if samples_path.is_file() else {}
    page = render_report(run, ev, read_jsonl(run / "metrics.jsonl"), samples, read_jsonl(run / "probe_metrics.jsonl"))
    target = Path(out) if out else run / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


__all__ = ["write_report", "render_report", "plot_losses", "plot_wise_ft", "plot_confusion", "read_jsonl"]

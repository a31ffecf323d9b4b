"""report.html is self-contained and shows what the run wrote."""

from __future__ import annotations

import base64
import io
import json
import re

from PIL import Image

from mm.report import write_report


def _jpeg_b64(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def _make_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(20):
            f.write(json.dumps({"step": step, "loss": 2.0 / (step + 1), "loss_itc": 1.0 / (step + 1), "lr": 1e-3}) + "\n")
        f.write('{"step": 20, "loss": 0.0')  # a line cut by a crash is skipped
    ev = {
        "model": "runs/x/model", "data": "corpus", "split": "val", "counts": {"images": 3},
        "metrics": {"zeroshot": {"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5},
                    "retrieval": {"image_retrieval_recall@1": 0.25}},
        "chance": {"zeroshot": {"acc1": 0.1, "acc5": 0.5, "mean_per_class_recall": 0.1},
                   "retrieval": {"image_retrieval_recall@1": 0.01}},
        "retention": {"pretrained_zeroshot_acc1": 0.6, "finetuned_zeroshot_acc1": 0.3},
        "wise_ft": [{"alpha": a, "metrics": {"classify": {"acc1": 0.5 + a / 3}, "zeroshot": {"acc1": 0.6 - a / 3}}}
                    for a in (0.0, 0.5, 1.0)],
        "confusion_matrix": {"classes": ["circle", "square"], "matrix": [[3, 1], [0, 4]], "source": "classify"},
    }
    (run / "eval.json").write_text(json.dumps(ev))
    samples = {"retrievals": [{"direction": "text→image", "query": "a <red> circle",
                               "hits": [{"caption": "a red circle", "image": _jpeg_b64("red"), "positive": True},
                                        {"caption": "a blue square", "image": _jpeg_b64("blue"), "positive": False}]}]}
    (run / "eval_samples.json").write_text(json.dumps(samples))
    return run


def test_report_is_self_contained(tmp_path):
    run = _make_run(tmp_path)
    page = write_report(run).read_text()
    # no external resources: every src is a data URI
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "http://" not in page and "https://" not in page
    # 3 plots (loss, WiSE-FT, confusion) + 2 thumbnails, all decodable
    pngs = [s for s in srcs if s.startswith("data:image/png")]
    assert len(pngs) == 3
    for s in srcs:
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    for text in ("image_retrieval_recall@1", "mean_per_class_recall", "0.2500", "0.0100",
                 "finetuned_zeroshot_acc1", "Loss curves", "WiSE-FT curve", "Confusion matrix"):
        assert text in page
    assert "a &lt;red&gt; circle" in page  # captions are escaped
    assert page.count('class="hit ok"') == 1


def test_report_without_eval_has_no_plots_it_cannot_draw(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    page = write_report(run).read_text()
    assert "data:image/png" not in page and "no metrics" in page

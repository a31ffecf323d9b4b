"""Smoke test: the whole `mm demo` chain on a smaller built-in corpus, on the session's local Ray.

generate → curate images + videos → pretrain (Ray Train, 2 workers) → evaluate → fine-tune →
report. Asserts the accounting invariant, the Parquet schemas, that the loss fell and that
retrieval beats chance. Takes a couple of minutes on 2 cores.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.demo import DemoConfig, format_summary, run_demo
from pipelines.schema import IMAGE_SCHEMA, REJECT_SCHEMA, VIDEO_SCHEMA


@pytest.fixture(scope="module")
def demo(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(
        n_images=160, n_videos=48,
        pretrain_overrides=("train.max_steps=40", "train.checkpoint_every_steps=20", "train.log_every_steps=5",
                            "data.batch_size=16"),
        finetune_overrides=("finetune.strategy=head_only", "finetune.wise_ft_alphas=[0.0,0.5,1.0]"),
    )
    return out, run_demo(out, cfg)


def test_curate_outputs_honour_the_contract(demo):
    out, summary = demo
    for name, schema in (("images", IMAGE_SCHEMA), ("videos", VIDEO_SCHEMA)):
        corpus = out / "corpus" / name
        stats = json.loads((corpus / "stats.json").read_text())
        assert stats["inputs"] == stats["kept"] + sum(stats["rejected"].values()) and stats["invariant_ok"]
        data = pq.read_table(corpus / "data")
        assert data.schema.remove_metadata().equals(schema, check_metadata=False), data.schema
        rejects = pq.read_table(corpus / "rejects")
        assert rejects.schema.remove_metadata().equals(REJECT_SCHEMA, check_metadata=False)
        assert len(set(data.column("sample_id").to_pylist())) == data.num_rows
        for f in ("manifest.json", "tokenizer/tokenizer.json"):
            assert (corpus / f).is_file(), f
    images = json.loads((out / "corpus" / "images" / "stats.json").read_text())
    assert images["kept"] == 160  # every clean sample kept; every planted fault rejected
    assert images["rejected"]["duplicate"] > 0 and images["rejected"]["near_duplicate"] > 0
    videos = json.loads((out / "corpus" / "videos" / "stats.json").read_text())
    assert videos["kept"] == 48 and videos["rejected"]["near_duplicate"] > 0


def test_pretraining_loss_fell_and_model_is_saved(demo):
    out, _ = demo
    run = out / "runs" / "pretrain"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 40
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "config.json").is_file()


def test_metrics_beat_chance_and_report_exists(demo):
    out, summary = demo
    ev = summary["pretrain"]
    for k in (5, 10):
        for direction in ("image", "text"):
            name = f"{direction}_retrieval_recall@{k}"
            assert ev["metrics"]["retrieval"][name] > 1.5 * ev["chance"]["retrieval"][name], name
    assert {"acc1", "acc5", "mean_per_class_recall"} <= set(summary["finetune"]["metrics"]["classify"])
    assert (out / "runs" / "pretrain" / "report.html").stat().st_size > 10_000
    assert (out / "runs" / "finetune" / "report.html").is_file()
    text = format_summary(summary)
    assert "chance" in text and "report:" in text

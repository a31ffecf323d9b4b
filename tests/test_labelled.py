"""Labelled converters: emoji-test.txt parsing, emoji rendering, digits source, and `mm data` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipelines import labelled as L

EMOJI_SNIPPET = """\
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: Flags
# subgroup: country-flag
1F1EB 1F1F7                                            ; fully-qualified     # 🇫🇷 E2.0 flag: France
# Smileys & Emotion subtotal:		3
"""


def test_parse_emoji_test(tmp_path):
    p = tmp_path / "emoji-test.txt"
    p.write_text(EMOJI_SNIPPET, encoding="utf-8")
    items = L.parse_emoji_test(str(p))
    assert [(e.chars, e.name, e.group, e.subgroup) for e in items] == [
        ("\U0001F600", "grinning face", "Smileys & Emotion", "face-smiling"),
        ("\u263A\uFE0F", "smiling face", "Smileys & Emotion", "face-smiling"),
        ("\U0001F1EB\U0001F1F7", "flag: France", "Flags", "country-flag"),
    ]


@pytest.mark.skipif(not L.emoji_available(), reason="needs Debian unicode-data and fonts-noto-color-emoji")
def test_real_emoji_list_and_rendering():
    items = L.parse_emoji_test()
    assert len(items) > 3000 and len({e.group for e in items}) == 9
    from PIL import ImageFont

    font = ImageFont.truetype(L.EMOJI_FONT, 109)
    img = np.asarray(L.render_emoji(items[0].chars, font))  # grinning face: a yellow disc
    assert img.shape == (128, 136, 3)
    yellow = (img[..., 0] > 200) & (img[..., 1] > 150) & (img[..., 2] < 100)
    assert yellow.mean() > 0.2


def test_digits_source(tmp_path):
    info = L.write_digits_source(tmp_path / "src", image_px=32, limit=50)
    assert info["n"] == 50 and info["classes"][7] == "seven"
    assert len(list((tmp_path / "src").glob("*.png"))) == 50
    sidecar = json.loads((tmp_path / "src" / "digit_0007.json").read_text())
    from sklearn.datasets import load_digits

    target = int(load_digits().target[7])
    assert sidecar["label"] == L.DIGIT_NAMES[target] and L.DIGIT_NAMES[target] in sidecar["caption"]
    img = Image.open(tmp_path / "src" / "digit_0007.png")
    assert img.size == (32, 32) and img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.min() < 60 and arr.max() > 200  # dark ink on a white page


def test_converter_config_layers(tmp_path):
    from core.config import ConfigError
    from jobs.data import load_curate_config

    cfg = load_curate_config("emoji", None, [])
    assert cfg.dedup.near is False and cfg.output.val_fraction == 0.2 and cfg.captions.min_caption_chars == 1
    (tmp_path / "c.yaml").write_text("dedup: {near: true}\noutput: {rows_per_file: 100}\n")
    cfg = load_curate_config("digits", str(tmp_path / "c.yaml"), ["output.val_fraction=0.1"])
    assert cfg.dedup.near is True and cfg.output.rows_per_file == 100 and cfg.output.val_fraction == 0.1
    with pytest.raises(ConfigError, match="unknown config key"):
        load_curate_config("digits", None, ["dedup.nearr=false"])


def test_emoji_without_packages_fails_before_work(tmp_path, monkeypatch, capsys):
    from jobs.data import main

    monkeypatch.setattr(L, "EMOJI_FONT", str(tmp_path / "missing.ttf"))
    assert main(["emoji", "--out", str(tmp_path / "e")]) == 2
    assert "fonts-noto-color-emoji" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_mm_data_digits_through_curate(ray_session, tmp_path):
    import pyarrow.parquet as pq

    from jobs.data import main

    out = tmp_path / "digits"
    assert main(["digits", "--out", str(out), "--limit", "40"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["inputs"] == 40 and stats["invariant_ok"]
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) == stats["kept"] and len(rows) >= 38  # at most exact duplicates removed
    from sklearn.datasets import load_digits

    want = {L.DIGIT_NAMES[t] for t in load_digits().target[:40]}
    assert {r["label"] for r in rows} == want
    assert all(r["label"] in r["caption"] for r in rows)
    assert json.loads((out / "classes.json").read_text()) == list(L.DIGIT_NAMES)
    assert json.loads((out / "manifest.json").read_text())["converter"]["samples_written"] == 40
    assert not list(tmp_path.glob(".digits-source-*"))  # scratch source removed

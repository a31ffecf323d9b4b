"""Labelled real data sets as curate sources: scikit-learn digits and Noto emoji with their names.

``mm data digits|emoji --out DIR`` (jobs/data.py) writes a *folder source* here (an image per
sample with a JSON sidecar ``{"caption": ..., "label": ...}``, the format every user's folder
has) and then runs the normal curation (``pipelines.curate.run_curate``) on it, so the Parquet
comes out of the same path as any corpus. Next to the corpus it writes ``classes.json`` (class
names, the order of the integer targets) and ``templates.json`` (zero-shot prompts with ``{c}``),
which ``mm evaluate`` and ``mm finetune`` pick up by default.

* digits (../shared/DATA.md): ``sklearn.datasets.load_digits()``, 1,797 real 8x8 grey scans of
  handwritten digits, upscaled (bicubic) to ``image_px``; label = the digit's English name;
  caption = one of a few templated paraphrases, picked from the sample index.
* emoji: every fully-qualified emoji in Debian's ``unicode-data`` ``emoji-test.txt`` rendered
  with ``fonts-noto-color-emoji`` (Pillow, 109 pt, 136x128, on white); caption = the Unicode
  name ("grinning face"), label = its group ("Smileys & Emotion"). A retrieval and zero-shot set.

Tested in tests/test_labelled.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTIONS = ("a handwritten digit {c}", "the number {c}, written by hand", "a scanned digit {c}",
                  "handwriting of the digit {c}")
DIGIT_TEMPLATES = ("a handwritten digit {c}", "the number {c}", "a scanned digit {c}", "the digit {c}")

EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEMPLATES = ("an emoji from the {c} group", "{c}", "an emoji of {c}")
_EMOJI_PT = 109  # the one bitmap strike size NotoColorEmoji carries
_EMOJI_CANVAS = (136, 128)


@dataclass(frozen=True)
class Emoji:
    chars: str
    name: str
    group: str
    subgroup: str


def emoji_available(test_path: str | None = None, font_path: str | None = None) -> bool:
    """True when the Debian packages ``unicode-data`` and ``fonts-noto-color-emoji`` are installed."""
    return Path(test_path or EMOJI_TEST).is_file() and Path(font_path or EMOJI_FONT).is_file()


def parse_emoji_test(path: str | None = None) -> list[Emoji]:
    """Fully-qualified emoji from ``emoji-test.txt``: ``1F600 ; fully-qualified # 😀 E1.0 grinning face``."""
    out: list[Emoji] = []
    group = subgroup = ""
    for line in Path(path or EMOJI_TEST).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            codes, _, rest = line.partition(";")
            status, _, comment = rest.partition("#")
            if status.strip() != "fully-qualified":
                continue
            chars = "".join(chr(int(c, 16)) for c in codes.split())
            # comment: " 😀 E1.0 grinning face" -> the name follows the version token
            parts = comment.strip().split(" ", 2)
            name = parts[2].strip() if len(parts) == 3 else comment.strip()
            out.append(Emoji(chars, name, group, subgroup))
    return out


def render_emoji(chars: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """One emoji as an RGB image on white (the colour bitmap glyph, alpha-composited)."""
    rgba = Image.new("RGBA", _EMOJI_CANVAS, (0, 0, 0, 0))
    ImageDraw.Draw(rgba).text((0, 0), chars, font=font, embedded_color=True)
    bg = Image.new("RGBA", _EMOJI_CANVAS, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _write_sample(root: Path, key: str, image: Image.Image, caption: str, label: str) -> None:
    image.save(root / f"{key}.png", format="PNG")
    (root / f"{key}.json").write_text(json.dumps({"caption": caption, "label": label}), encoding="utf-8")


def write_digits_source(root: str | Path, image_px: int = 64, limit: int | None = None) -> dict:
    """Write the 1,797 sklearn digits (or the first ``limit``) as ``root/digit_NNNN.png`` + ``.json``."""
    from sklearn.datasets import load_digits

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    images, targets = digits.images[:limit], digits.target[:limit]
    for i, (pixels, target) in enumerate(zip(images, targets)):
        grey = np.clip(255.0 - pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)  # ink dark on white
        image = Image.fromarray(grey, mode="L").resize((image_px, image_px), Image.BICUBIC).convert("RGB")
        name = DIGIT_NAMES[int(target)]
        caption = DIGIT_CAPTIONS[i % len(DIGIT_CAPTIONS)].format(c=name)
        _write_sample(root, f"digit_{i:04d}", image, caption, name)
    return {"n": len(images), "classes": list(DIGIT_NAMES), "templates": list(DIGIT_TEMPLATES),
            "origin": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)"}


def write_emoji_source(root: str | Path, *, test_path: str | None = None, font_path: str | None = None,
                       limit: int | None = None) -> dict:
    """Render every fully-qualified emoji as ``root/emoji_NNNN.png`` + ``.json`` (caption = name)."""
    test_path, font_path = test_path or EMOJI_TEST, font_path or EMOJI_FONT
    if not emoji_available(test_path, font_path):
        raise FileNotFoundError(f"emoji data needs Debian packages unicode-data and fonts-noto-color-emoji "
                                f"({test_path}, {font_path})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    font = ImageFont.truetype(font_path, _EMOJI_PT)
    items = parse_emoji_test(test_path)[:limit]
    for i, e in enumerate(items):
        _write_sample(root, f"emoji_{i:04d}", render_emoji(e.chars, font), e.name, e.group)
    groups = list(dict.fromkeys(e.group for e in items))
    return {"n": len(items), "classes": groups, "templates": list(EMOJI_TEMPLATES),
            "origin": f"{test_path} rendered with {font_path}"}


def write_class_files(corpus_dir: str | Path, classes: list[str], templates: list[str]) -> None:
    """``classes.json`` and ``templates.json`` beside the corpus, read by evaluate and finetune."""
    d = Path(corpus_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "classes.json").write_text(json.dumps(classes, indent=1), encoding="utf-8")
    (d / "templates.json").write_text(json.dumps(templates, indent=1), encoding="utf-8")


__all__ = ["DIGIT_NAMES", "DIGIT_TEMPLATES", "EMOJI_TEMPLATES", "Emoji", "emoji_available", "parse_emoji_test",
           "render_emoji", "write_digits_source", "write_emoji_source", "write_class_files"]

"""Demo corpus captions: templated paraphrases of a sample's attributes, and zero-shot prompts.

    caption_for({"shape": "circle", "colour": "red", "size": "large", "position": "left"}, rng)
    # e.g. "left side: a big red circle" or "red round shape, large, to the left of the frame"
    video_caption_for({"shape": "star", "colour": "blue", "size": "small", "direction": "up"}, rng)
    zeroshot_prompts()   # {"circle": ["a circle", "a picture of a circle", ...], ...}

Used by pipelines/demo_corpus.py. Tested in tests/test_demo_corpus.py.
"""

from __future__ import annotations

import numpy as np

from pipelines.demo_render import SHAPES

# Zero-shot prompts (CLIP-style templates); ``{c}`` is a class name from SHAPES / DIRECTIONS.
CLASS_PROMPTS = ("a {c}", "a picture of a {c}", "a photo of a {c}", "a {c} shape", "a drawing of a {c}")
VIDEO_CLASS_PROMPTS = ("moving {c}", "a shape moving {c}", "something moving {c}",
                       "a video of a shape moving {c}")

_SHAPE_WORDS = {
    "circle": ("circle", "circle", "round shape", "disc"),
    "square": ("square", "square", "square shape", "block"),
    "triangle": ("triangle", "triangle", "triangular shape"),
    "cross": ("cross", "cross", "plus sign", "plus shape"),
    "star": ("star", "star", "star shape", "five-pointed star"),
    "diamond": ("diamond", "diamond", "rhombus", "diamond shape"),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
_POS_PHRASES = {
    "left": ("on the left", "to the left of the frame", "at the left side", "in the left half"),
    "right": ("on the right", "to the right of the frame", "at the right side", "in the right half"),
    "top": ("at the top", "near the top edge", "in the upper part of the frame"),
    "bottom": ("at the bottom", "near the bottom edge", "in the lower part of the frame"),
    "centre": ("in the centre", "in the middle", "at the center of the frame"),
}
_POS_HEADS = {"left": ("left side", "left"), "right": ("right side", "right"), "top": ("top", "upper part"),
              "bottom": ("bottom", "lower part"), "centre": ("centre", "middle")}
_IMAGE_TEMPLATES = (
    "{a_size} {size} {colour} {shape} {pos}",
    "{pos_head}: {a_size} {size} {colour} {shape}",
    "{colour} {shape}, {size}, {pos}",
    "a photo of {a_size} {size} {colour} {shape} {pos}",
    "there is {a_colour} {colour} {shape} {pos}; it is {size}",
    "{Pos}, {a_size} {size} {shape} in {colour}",
    "{a_colour} {colour} {shape} ({size}) {pos} on a textured background",
)
_DIR_PHRASES = {
    "left": ("moving left", "moving to the left", "sliding left", "going left", "travelling to the left"),
    "right": ("moving right", "moving to the right", "sliding right", "going right", "travelling to the right"),
    "up": ("moving up", "moving upward", "sliding up", "going up", "rising"),
    "down": ("moving down", "moving downward", "sliding down", "going down", "falling"),
}
_VIDEO_TEMPLATES = (
    "{a_colour} {colour} {shape} {dir}",
    "{a_size} {size} {colour} {shape} {dir} across the frame",
    "a video of {a_colour} {colour} {shape} {dir}",
    "the {colour} {shape} is {dir}",
    "{colour} {shape}, {size}, {dir}",
)


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def caption_for(attrs: dict, rng: np.random.Generator) -> str:
    """One templated paraphrase of an image's attributes (shape, colour, size, position).

    ``{"shape": "circle", "colour": "red", "size": "large", "position": "left"}`` gives e.g.
    "left side: a big red circle" or "red round shape, large, to the left of the frame".
    """
    size, colour = _pick(rng, _SIZE_WORDS[attrs["size"]]), attrs["colour"]
    pos = _pick(rng, _POS_PHRASES[attrs["position"]])
    words = {"shape": _pick(rng, _SHAPE_WORDS[attrs["shape"]]), "size": size, "colour": colour,
             "a_size": _a(size), "a_colour": _a(colour), "pos": pos, "Pos": pos[0].upper() + pos[1:],
             "pos_head": _pick(rng, _POS_HEADS[attrs["position"]])}
    return _pick(rng, _IMAGE_TEMPLATES).format(**words)


def video_caption_for(attrs: dict, rng: np.random.Generator) -> str:
    """One templated paraphrase of a video's attributes (shape, colour, size, direction)."""
    size, colour = _pick(rng, _SIZE_WORDS[attrs["size"]]), attrs["colour"]
    words = {"shape": _pick(rng, _SHAPE_WORDS[attrs["shape"]]), "size": size, "colour": colour,
             "a_size": _a(size), "a_colour": _a(colour), "dir": _pick(rng, _DIR_PHRASES[attrs["direction"]])}
    return _pick(rng, _VIDEO_TEMPLATES).format(**words)


def zeroshot_prompts(classes=SHAPES, templates=CLASS_PROMPTS) -> dict[str, list[str]]:
    """Class name -> its prompts, e.g. ``{"circle": ["a circle", "a picture of a circle", ...]}``."""
    return {c: [t.format(c=c) for t in templates] for c in classes}


__all__ = ["CLASS_PROMPTS", "VIDEO_CLASS_PROMPTS", "caption_for", "video_caption_for", "zeroshot_prompts"]

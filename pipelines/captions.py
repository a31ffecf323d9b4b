"""Caption cleaning and filtering: pure functions, shared by the image and video pipelines.

    text = decode_caption(raw_bytes)              # UTF-8, else cp1252, never raises
    clean = clean_caption(text, cfg)              # HTML unescape + tag strip, NFC, control chars out
    reason = filter_caption(clean, cfg)           # None, or a reject reason

Reject reasons (the ``reason`` column of ``rejects/``): ``missing_caption``, ``empty_caption``,
``caption_too_short``, ``caption_too_long``, ``boilerplate_caption``, ``language``.
Length is measured in characters and in whitespace-separated words (the curated tokenizer
may not exist yet when filtering: it is trained on the kept captions; ``tokenizer.max_tokens``
truncates later). The language filter needs the ``lang`` extra (``pip install langid``).

Tested in tests/test_captions.py.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Alt-texts that say nothing about the picture (after lower-casing, digits and punctuation out).
DEFAULT_BOILERPLATE = (
    "image", "images", "photo", "photos", "picture", "pic", "img", "untitled", "untitled image",
    "thumbnail", "thumb", "placeholder", "no image", "no photo", "image not found", "default",
    "default image", "alt", "alt text", "null", "none", "undefined", "n a", "na", "photo of",
    "image of", "picture of", "click here", "click to enlarge", "loading", "spacer", "blank",
    "screenshot", "screen shot", "product image", "featured image", "stock photo", "banner",
)

_MEDIA_EXT = r"(jpe?g|png|gif|webp|bmp|tiff?|svg|heic|avif|ico|mp4|webm|mkv|mov|avi|mpe?g)"
_FILENAME_RE = re.compile(r"^[\w\-. ()\[\]~+,]+\." + _MEDIA_EXT + r"$", re.IGNORECASE)
_CAMERA_RE = re.compile(r"^(img|dsc|dscn|dscf|dcim|pxl|mvimg|gopr|sam|p\d{3}|screenshot)[ _\-]?[\d_\- ]+$",
                        re.IGNORECASE)
_URL_RE = re.compile(r"^(?:[a-z][a-z0-9+.\-]*://|www\.)\S+$", re.IGNORECASE)
_TAG_RE = re.compile(r"<!--.*?-->|</?[a-zA-Z][^<>]{0,2000}>|<![^<>]{0,2000}>", re.DOTALL)
_SCRIPT_RE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_PUNCT_DIGITS_RE = re.compile(r"[\W\d_]+", re.UNICODE)
# Format characters worth keeping: zero-width joiner (emoji sequences), variation selectors.
_KEEP_FORMAT = {"\u200d", "\ufe0e", "\ufe0f"}


@dataclass(frozen=True)
class CaptionConfig:
    """Caption cleaning and filters (DESIGN.md "Sources"); every threshold carries its unit."""

    caption_field: str = "caption"          # field of a sidecar JSON that holds the caption
    strip_html: bool = True
    min_caption_chars: int = 3
    max_caption_chars: int = 1000
    min_caption_words: int = 1
    max_caption_words: int = 200
    reject_boilerplate: bool = True
    boilerplate: tuple[str, ...] = DEFAULT_BOILERPLATE
    languages: tuple[str, ...] = ()         # ISO 639-1 codes to keep; empty = no language filter
    min_language_score: float = 0.5         # langid probability below which the filter abstains

    def __post_init__(self) -> None:
        if self.min_caption_chars < 0 or self.max_caption_chars < self.min_caption_chars:
            raise ValueError("need 0 <= min_caption_chars <= max_caption_chars")
        if self.min_caption_words < 0 or self.max_caption_words < self.min_caption_words:
            raise ValueError("need 0 <= min_caption_words <= max_caption_words")
        if not 0.0 <= self.min_language_score <= 1.0:
            raise ValueError("min_language_score must be in [0, 1]")


def decode_caption(raw: bytes | str | None) -> str | None:
    """Bytes to text: UTF-8 (BOM stripped); invalid UTF-8 falls back to cp1252, then latin-1.

    Web alt-texts in legacy encodings are mostly cp1252; decoding them as such keeps the words
    instead of replacement characters. Never raises.
    """
    if raw is None or isinstance(raw, str):
        return raw
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def clean_caption(text: str, cfg: CaptionConfig) -> str:
    """Unescape HTML, strip tags, NFC-normalise, drop control/format chars, collapse whitespace."""
    if cfg.strip_html:
        for _ in range(3):  # double-escaped alt-texts ("&amp;amp;") are common on the web
            unescaped = html.unescape(text)
            if unescaped == text:
                break
            text = unescaped
        if "<" in text:
            text = _SCRIPT_RE.sub(" ", text)
            text = _TAG_RE.sub(" ", text)
    text = unicodedata.normalize("NFC", text)
    out = []
    for ch in text:
        if ch.isspace() or ch == "\u200b":  # zero-width space marks a word break
            out.append(" ")
            continue
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs", "Co", "Cn") or ch == "\ufffd":
            out.append(" " if cat == "Cc" else "")
        elif cat == "Cf" and ch not in _KEEP_FORMAT:
            continue
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def is_boilerplate(text: str, cfg: CaptionConfig) -> bool:
    """File names, camera names, bare URLs and generic words ("image", "untitled") say nothing."""
    t = text.strip()
    if _URL_RE.match(t) or _FILENAME_RE.match(t) or _CAMERA_RE.match(t):
        return True
    words = " ".join(_PUNCT_DIGITS_RE.sub(" ", t.casefold()).split())
    return not words or words in _boilerplate_set(cfg.boilerplate)


@lru_cache(maxsize=8)
def _boilerplate_set(words: tuple[str, ...]) -> frozenset[str]:
    return frozenset(" ".join(_PUNCT_DIGITS_RE.sub(" ", w.casefold()).split()) for w in words)


def filter_caption(text: str, cfg: CaptionConfig) -> tuple[str, str] | None:
    """``None`` when the cleaned caption passes, else ``(reason, detail)``."""
    if not text:
        return "empty_caption", None
    n_chars = len(text)
    if n_chars < cfg.min_caption_chars:
        return "caption_too_short", f"{n_chars} chars < {cfg.min_caption_chars}"
    if n_chars > cfg.max_caption_chars:
        return "caption_too_long", f"{n_chars} chars > {cfg.max_caption_chars}"
    n_words = len(text.split())
    if n_words < cfg.min_caption_words:
        return "caption_too_short", f"{n_words} words < {cfg.min_caption_words}"
    if n_words > cfg.max_caption_words:
        return "caption_too_long", f"{n_words} words > {cfg.max_caption_words}"
    if cfg.reject_boilerplate and is_boilerplate(text, cfg):
        return "boilerplate_caption", text[:80]
    if cfg.languages:
        lang, score = detect_language(text)
        if score >= cfg.min_language_score and lang not in cfg.languages:
            return "language", f"{lang} ({score:.2f})"
    return None


def process_caption(raw: bytes | str | None, cfg: CaptionConfig) -> tuple[str | None, tuple[str, str] | None]:
    """decode → clean → filter: ``(clean_text, None)`` or ``(clean_text_or_None, (reason, detail))``."""
    text = decode_caption(raw)
    if text is None:
        return None, ("missing_caption", None)
    text = clean_caption(text, cfg)
    return text, filter_caption(text, cfg)


def normalize_for_dedup(text: str) -> str:
    """Case-folded, punctuation-free, whitespace-collapsed: the caption part of exact pair dedup."""
    return " ".join(_PUNCT_DIGITS_RE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()) \
        if text else ""


def check_language_support(cfg: CaptionConfig) -> None:
    """Fail before any work when a language filter is configured without its extra."""
    if cfg.languages:
        try:
            import langid  # noqa: F401
        except ImportError:
            raise ValueError("captions.languages needs the 'lang' extra: pip install langid") from None


@lru_cache(maxsize=1)
def _language_identifier():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    lang, prob = _language_identifier().classify(text)
    return lang, float(prob)


__all__ = ["CaptionConfig", "decode_caption", "clean_caption", "filter_caption", "process_caption",
           "is_boilerplate", "normalize_for_dedup", "check_language_support", "detect_language"]

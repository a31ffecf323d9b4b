"""Caption decoding, cleaning and filters (pure functions, no Ray)."""

from __future__ import annotations

import pytest

from pipelines.captions import (
    CaptionConfig,
    clean_caption,
    decode_caption,
    filter_caption,
    is_boilerplate,
    normalize_for_dedup,
    process_caption,
)

CFG = CaptionConfig()


def test_decode_utf8_bom_and_invalid_bytes():
    assert decode_caption("café".encode()) == "café"
    assert decode_caption(b"\xef\xbb\xbfhello") == "hello"
    # cp1252 alt-text (curly quotes, e-acute) is recovered instead of becoming U+FFFD
    assert decode_caption(b"\x93caf\xe9\x94") == "\u201ccafé\u201d"
    assert decode_caption(b"\x81\x8d\x8f\x90\x9d") is not None  # undefined in cp1252: latin-1, never raises
    assert decode_caption(None) is None


def test_clean_html_unicode_and_whitespace():
    assert clean_caption("A  <b>red</b>&nbsp;car &amp;amp; a dog", CFG) == "A red car & a dog"
    assert clean_caption("<script>alert(1)</script>a cat", CFG) == "a cat"
    assert clean_caption("cafe\u0301 \t\n\x00 au\u200blait\ufffd", CFG) == "café au lait"  # NFC, controls, ZW space
    assert clean_caption("family \U0001f468\u200d\U0001f469\u200d\U0001f467", CFG).endswith("\u200d\U0001f467")
    assert clean_caption("x < y and y > z", CFG) == "x < y and y > z"


@pytest.mark.parametrize("text", ["IMG_1234.jpg", "DSC01234", "photo.PNG", "https://example.com/a.jpg",
                                  "www.example.com/x", "image", "Untitled", "Photo 3", "untitled-image (2)",
                                  "n/a", "12345", "!!!"])
def test_boilerplate_rejected(text):
    assert is_boilerplate(text, CFG)
    assert filter_caption(clean_caption(text, CFG), CFG)[0] in ("boilerplate_caption", "caption_too_short")


@pytest.mark.parametrize("text", ["a photo of a dog on the beach", "Image processing textbook cover",
                                  "Untitled #3 by Cindy Sherman, 1977"])
def test_real_captions_pass(text):
    assert filter_caption(clean_caption(text, CFG), CFG) is None


def test_length_filters_chars_and_words():
    cfg = CaptionConfig(min_caption_chars=5, max_caption_chars=30, min_caption_words=2, max_caption_words=4)
    assert filter_caption("", cfg)[0] == "empty_caption"
    assert filter_caption("abc", cfg)[0] == "caption_too_short"
    assert filter_caption("abcdefgh", cfg)[0] == "caption_too_short"      # one word < 2
    assert filter_caption("one two three four five", cfg)[0] == "caption_too_long"
    assert filter_caption("x" * 31, cfg)[0] == "caption_too_long"
    assert filter_caption("a red car", cfg) is None


def test_process_caption_missing_and_ok():
    assert process_caption(None, CFG) == (None, ("missing_caption", None))
    text, bad = process_caption(b"  A dog &amp; a cat ", CFG)
    assert (text, bad) == ("A dog & a cat", None)


def test_normalize_for_dedup():
    assert normalize_for_dedup("A Dog, on the BEACH!") == normalize_for_dedup("a dog on the beach")
    assert normalize_for_dedup("") == ""


def test_config_validation():
    with pytest.raises(ValueError):
        CaptionConfig(min_caption_chars=10, max_caption_chars=5)


def test_language_filter_when_extra_installed():
    pytest.importorskip("langid")
    cfg = CaptionConfig(languages=("en",))
    assert filter_caption("a small dog runs across the green field in the morning", cfg) is None
    assert filter_caption("ein kleiner Hund läuft am Morgen über die grüne Wiese", cfg)[0] == "language"

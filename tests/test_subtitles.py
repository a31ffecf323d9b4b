"""SRT/WebVTT parsing, bad timestamps and encodings, overlap handling, short-segment merging."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.subtitles import (
    Segment,
    SubtitleError,
    decode_text,
    merge_segments,
    parse_subtitles,
)

SRT = """1
00:00:01,000 --> 00:00:03,500
Hello <i>world</i>

2
00:00:04,000 --> 00:00:09,250
second &amp; third
line

"""

VTT = """WEBVTT
Kind: captions

NOTE this is a comment

intro
00:01.000 --> 00:03.000 align:start position:0%
first <00:00:01.500><c> cue</c>

00:00:03.000 --> 00:00:07.000
<v Speaker>second cue</v>
"""


def test_parse_srt():
    segs, dropped = parse_subtitles(SRT.encode(), "srt")
    assert segs == [Segment(1.0, 3.5, "Hello world"), Segment(4.0, 9.25, "second & third line")]
    assert dropped == {}


def test_parse_vtt_with_header_notes_tags_and_short_timestamps():
    segs, dropped = parse_subtitles(VTT.encode(), "vtt")
    assert segs == [Segment(1.0, 3.0, "first cue"), Segment(3.0, 7.0, "second cue")]
    assert dropped == {}


def test_crlf_and_bom_are_handled():
    data = b"\xef\xbb\xbf" + SRT.replace("\n", "\r\n").encode()
    segs, _ = parse_subtitles(data)
    assert [s.text for s in segs] == ["Hello world", "second & third line"]


def test_negative_inverted_and_malformed_timestamps_are_dropped_and_counted():
    text = (
        "1\n-00:00:01,000 --> 00:00:02,000\nnegative\n\n"
        "2\n00:00:05,000 --> 00:00:04,000\ninverted\n\n"
        "3\n00:00:xx,000 --> 00:00:04,000\nmalformed\n\n"
        "4\n00:00:06,000 --> 00:00:08,000\n\n\n"
        "5\n00:00:10,000 --> 00:00:12,000\ngood\n"
    )
    segs, dropped = parse_subtitles(text.encode())
    assert segs == [Segment(10.0, 12.0, "good")]
    assert dropped == {"bad_timestamp": 3, "empty_text": 1}


def test_overlapping_cues_are_trimmed_and_rolling_repeats_collapse():
    text = (
        "00:00:00.000 --> 00:00:04.000\none\n\n"
        "00:00:02.000 --> 00:00:06.000\ntwo\n\n"
        "00:00:06.000 --> 00:00:08.000\ntwo\n\n"
        "00:00:05.000 --> 00:00:05.500\ninside\n"
    )
    segs, _ = parse_subtitles("WEBVTT\n\n" + text)
    # sorted by start; each cue ends where the next begins; repeated "two" merges on contact
    assert [(s.start_s, s.end_s, s.text) for s in segs] == [
        (0.0, 2.0, "one"), (2.0, 5.0, "two"), (5.0, 5.5, "inside"), (6.0, 8.0, "two")]
    for a, b in zip(segs, segs[1:]):
        assert a.end_s <= b.start_s


def test_same_start_cues_are_joined_not_lost():
    segs, dropped = parse_subtitles("00:00:01,000 --> 00:00:03,000\na\n\n00:00:01,000 --> 00:00:04,000\nb\n")
    assert segs == [Segment(1.0, 4.0, "a b")]
    assert dropped == {}


def test_broken_encodings():
    assert decode_text("café".encode("cp1252")) == "café"
    assert decode_text("héllo".encode("utf-16")) == "héllo"
    # bytes cp1252 leaves undefined: latin-1, never a crash
    assert decode_text(b"abc \x81\x8d\x90 def") == "abc \x81\x8d\x90 def"
    with pytest.raises(SubtitleError) as e:
        decode_text(b"\xff\xfeA\x00\x00\xd8")  # UTF-16 BOM, then an unpaired surrogate
    assert e.value.reason == "bad_encoding"
    segs, _ = parse_subtitles("00:00:01,000 --> 00:00:03,000\nça va\n".encode("cp1252"))
    assert segs[0].text == "ça va"


def test_file_without_cues_is_an_error_with_a_reason():
    with pytest.raises(SubtitleError) as e:
        parse_subtitles(b"just some text\nno times here\n")
    assert e.value.reason == "no_cues"


def test_merge_short_segments():
    segs = [Segment(0.0, 0.8, "a"), Segment(1.0, 1.5, "b"), Segment(1.6, 2.4, "c"),
            Segment(10.0, 14.0, "long"), Segment(20.0, 20.5, "lonely")]
    merged = merge_segments(segs, min_clip_s=2.0, max_clip_s=8.0, max_gap_s=1.0)
    assert merged == [Segment(0.0, 2.4, "a b c"), Segment(10.0, 14.0, "long"), Segment(20.0, 20.5, "lonely")]


def test_merge_respects_max_clip_and_gap():
    segs = [Segment(0.0, 1.0, "a"), Segment(1.0, 6.0, "b"), Segment(9.0, 10.0, "c")]
    merged = merge_segments(segs, min_clip_s=2.0, max_clip_s=5.0, max_gap_s=1.0)
    # a+b would be 6 s > 5 s; c is 3 s after b: none merge
    assert merged == segs
    # a short tail joins the clip before it when that fits
    tail = merge_segments([Segment(0.0, 3.0, "x"), Segment(3.2, 3.8, "y")], 2.0, 10.0, 1.0)
    assert tail == [Segment(0.0, 3.8, "x y")]


_seg = st.tuples(st.floats(0, 100), st.floats(0.01, 10), st.text(min_size=1, max_size=5)).map(
    lambda t: Segment(t[0], t[0] + t[1], t[2]))


@settings(max_examples=60, deadline=None)
@given(st.lists(_seg, max_size=12), st.floats(0.5, 5))
def test_merge_keeps_order_and_never_exceeds_max(segs, min_clip_s):
    from pipelines.subtitles import resolve_overlaps

    clean = resolve_overlaps(segs)
    merged = merge_segments(clean, min_clip_s=min_clip_s, max_clip_s=10.0, max_gap_s=1.0)
    for a, b in zip(merged, merged[1:]):
        assert a.end_s <= b.start_s
    for m in merged:
        assert m.duration_s > 0
        # a merged clip is never longer than max unless it was one input segment already
        assert m.duration_s <= 10.0 + 1e-9 or any(s.start_s == m.start_s and s.end_s == m.end_s for s in clean)

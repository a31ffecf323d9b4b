"""Subtitle files (``.srt``, ``.vtt``) as timed text segments that become video clips.

HowTo100M-style corpora pair a video with its (often automatic) subtitles: each timed cue is a
short piece of narration, so a clip is a run of cues long enough to show something. This
module turns subtitle bytes into clean, ordered, non-overlapping ``Segment``s and merges short
ones; ``pipelines/video_clips.py`` cuts and samples the clips.

Bad input is handled, never raised: bytes are UTF-16 (with a BOM) or decoded as captions are
(UTF-8, cp1252, latin-1); only broken UTF-16 fails, with ``SubtitleError("bad_encoding")``;
a cue with a negative, malformed or inverted timestamp is dropped and counted by reason;
overlapping cues are trimmed so that a cue ends when the next one starts (how players show
rolling automatic captions).

    segs, dropped = parse_subtitles(data, "srt")
    clips = merge_segments(segs, min_clip_s=2.0, max_clip_s=20.0, max_gap_s=1.0)

Tested in tests/test_subtitles.py (``.venv/bin/pytest tests/test_subtitles.py -q``).
"""

from __future__ import annotations

import html
import re
from collections import Counter
from dataclasses import dataclass

from pipelines.captions import decode_caption
from pipelines.inputs import SUBTITLE_EXTS
from pipelines.schema import Reject

# [-][hh:]mm:ss[.,]mmm ; hours optional (WebVTT), comma (SRT) or dot (WebVTT) before millis.
_TS = r"(-?)(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[.,](\d{1,3}))?"
_CUE_TIME = re.compile(rf"^\s*{_TS}\s*-->\s*{_TS}(?:\s+.*)?$")
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


class SubtitleError(Reject, ValueError):
    """A subtitle file that cannot be read at all; ``reason`` is the reject reason."""


@dataclass(frozen=True)
class Segment:
    """A timed piece of text: ``[start_s, end_s)`` seconds from the start of the video."""

    start_s: float
    end_s: float
    text: str

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def decode_text(data: bytes) -> str:
    """Subtitle bytes to text: UTF-16 when it starts with a BOM, else as captions are decoded
    (``pipelines.captions.decode_caption``: UTF-8, then cp1252, then latin-1; never mangled
    into replacement characters). Raises ``SubtitleError("bad_encoding")`` for broken UTF-16.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise SubtitleError("bad_encoding", f"utf-16: {e.reason}") from None
    return decode_caption(data)


def _seconds(sign: str, h: str | None, m: str, s: str, ms: str | None) -> float:
    value = int(h or 0) * 3600 + int(m) * 60 + int(s) + (int(ms.ljust(3, "0")) / 1000 if ms else 0.0)
    return -value if sign else value


def clean_cue_text(lines: list[str]) -> str:
    """Cue lines to one line of text: markup tags and inline timestamps removed, entities unescaped."""
    text = " ".join(lines)
    text = _TAG.sub(" ", text)  # <b>, <i>, <c.colour>, <00:00:01.000> karaoke times, <v Speaker>
    text = html.unescape(text)
    text = text.replace("{\\an8}", " ")  # common SRT positioning code
    return _SPACE.sub(" ", text).strip()


def parse_subtitles(data: bytes | str, fmt: str | None = None) -> tuple[list[Segment], dict[str, int]]:
    """Parse SRT or WebVTT into sorted, non-overlapping segments.

    ``fmt`` is ``"srt"`` or ``"vtt"``, or None to sniff (a ``WEBVTT`` header means VTT). Both
    formats share the cue grammar that matters here (a ``start --> end`` line followed by text
    lines, blocks separated by blank lines), so one parser reads both; VTT header, NOTE, STYLE
    and REGION blocks carry no time line and are skipped.

    Returns ``(segments, dropped)`` where ``dropped`` counts cues by reason: ``bad_timestamp``
    (negative, malformed or end <= start), ``empty_text``, ``overlap`` (a repeat of the next
    cue's text starting at the same time). Raises ``SubtitleError`` only when the bytes cannot be decoded
    or the file holds no time line at all (``no_cues``).
    """
    text = decode_text(data) if isinstance(data, bytes) else data
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if fmt is not None and fmt not in SUBTITLE_EXTS:
        raise ValueError(f"unknown subtitle format {fmt!r}; valid choices: {', '.join(SUBTITLE_EXTS)}")
    dropped: Counter[str] = Counter()
    cues: list[Segment] = []
    saw_time_line = False
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        idx = next((i for i, ln in enumerate(lines) if "-->" in ln), None)
        if idx is None:
            continue  # header, NOTE/STYLE/REGION block, or stray text
        saw_time_line = True
        m = _CUE_TIME.match(lines[idx])
        if m is None:
            dropped["bad_timestamp"] += 1
            continue
        g = m.groups()
        start, end = _seconds(*g[:5]), _seconds(*g[5:])
        if start < 0 or end < 0 or end <= start:
            dropped["bad_timestamp"] += 1
            continue
        body = clean_cue_text(lines[idx + 1:])
        if not body:
            dropped["empty_text"] += 1
            continue
        cues.append(Segment(start, end, body))
    if not saw_time_line:
        raise SubtitleError("no_cues", "no 'start --> end' line found")
    return resolve_overlaps(cues, dropped), dict(dropped)


def resolve_overlaps(cues: list[Segment], dropped: Counter[str] | None = None) -> list[Segment]:
    """Sort by start; a cue that overlaps the next ends where the next begins.

    A cue left with no time of its own (it starts where the next starts) is dropped as
    ``overlap`` unless its text differs, in which case its text joins the next cue.
    Consecutive cues with identical text (rolling automatic captions) become one.
    """
    dropped = Counter() if dropped is None else dropped
    cues = sorted(cues, key=lambda c: (c.start_s, c.end_s))
    out: list[Segment] = []
    for i, cue in enumerate(cues):
        end = cue.end_s
        nxt = cues[i + 1] if i + 1 < len(cues) else None
        if nxt is not None and nxt.start_s < end:
            end = nxt.start_s
        if end <= cue.start_s:
            if nxt is not None and cue.text != nxt.text:
                cues[i + 1] = Segment(nxt.start_s, nxt.end_s, f"{cue.text} {nxt.text}")
            else:
                dropped["overlap"] += 1
            continue
        if out and out[-1].text == cue.text and abs(out[-1].end_s - cue.start_s) < 1e-6:
            out[-1] = Segment(out[-1].start_s, end, cue.text)
            continue
        out.append(Segment(cue.start_s, end, cue.text))
    return out


def merge_segments(segments: list[Segment], min_clip_s: float, max_clip_s: float,
                   max_gap_s: float = 1.0) -> list[Segment]:
    """Merge consecutive segments shorter than ``min_clip_s`` into clips (texts joined).

    A segment shorter than ``min_clip_s`` absorbs the following ones while the gap between them
    is at most ``max_gap_s`` and the merged span stays within ``max_clip_s``. Segments still
    shorter than ``min_clip_s`` after merging are returned as they are: the caller drops them as
    ``too_short`` clips (and counts them). Input must be sorted and non-overlapping, as
    ``parse_subtitles`` returns it.
    """
    out: list[Segment] = []
    cur: Segment | None = None
    for seg in segments:
        if cur is None:
            cur = seg
            continue
        gap = seg.start_s - cur.end_s
        if cur.duration_s < min_clip_s and gap <= max_gap_s and seg.end_s - cur.start_s <= max_clip_s:
            cur = Segment(cur.start_s, seg.end_s, f"{cur.text} {seg.text}")
            continue
        out.append(cur)
        cur = seg
    if cur is not None:
        # A short tail joins the clip before it when that fits (the last words of a video).
        if out and cur.duration_s < min_clip_s and cur.start_s - out[-1].end_s <= max_gap_s \
                and cur.end_s - out[-1].start_s <= max_clip_s:
            prev = out.pop()
            cur = Segment(prev.start_s, cur.end_s, f"{prev.text} {cur.text}")
        out.append(cur)
    return out


__all__ = ["Segment", "SubtitleError", "decode_text", "parse_subtitles", "resolve_overlaps", "merge_segments",
           "clean_cue_text"]

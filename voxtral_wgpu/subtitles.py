"""Transcript writers: plain text, JSON (segments with words), SubRip (.srt) and WebVTT (.vtt).

Times come from the decoder's frame clock (``voxtral_wgpu.stream``): each word starts at the 80 ms
slot where the model wrote it, so they are accurate to about one slot. Subtitle cues keep a
segment on screen for at least ``MIN_CUE_S`` (or until the next cue starts, or the audio ends),
because a cue that only spans the slots the model needed to write it would flash by; JSON keeps
the raw times.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO

FORMATS = ("txt", "json", "srt", "vtt")
MIN_CUE_S = 1.0


def format_timestamp(seconds: float, *, decimal: str = ",", always_hours: bool = True) -> str:
    """``HH:MM:SS,mmm`` (SRT) or with ``decimal="."`` ``HH:MM:SS.mmm`` (WebVTT); rounded to ms."""
    ms = max(0, int(round(seconds * 1000.0)))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    if h or always_hours:
        return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"
    return f"{m:02d}:{s:02d}{decimal}{ms:03d}"


def cue_times(segments, duration_s: float | None = None) -> list[tuple[float, float]]:
    """Display ``(start, end)`` per segment: the segment's own end, extended to ``MIN_CUE_S`` after
    its start unless the next segment starts earlier or the audio ends (never before its own end)."""
    out = []
    for i, seg in enumerate(segments):
        limit = segments[i + 1].start if i + 1 < len(segments) else float("inf")
        if duration_s is not None:
            limit = min(limit, duration_s)
        end = max(seg.end, min(seg.start + MIN_CUE_S, limit))
        out.append((seg.start, end))
    return out


def to_txt(transcription) -> str:
    return transcription.text + "\n"


def to_srt(transcription) -> str:
    lines = []
    segs = transcription.segments
    for i, (seg, (start, end)) in enumerate(zip(segs, cue_times(segs, transcription.duration_s or None)), 1):
        lines += [str(i), f"{format_timestamp(start)} --> {format_timestamp(end)}", _one_line(seg.text), ""]
    return "\n".join(lines)


def to_vtt(transcription) -> str:
    lines = ["WEBVTT", ""]
    segs = transcription.segments
    for seg, (start, end) in zip(segs, cue_times(segs, transcription.duration_s or None)):
        lines += [f"{format_timestamp(start, decimal='.')} --> {format_timestamp(end, decimal='.')}",
                  _vtt_escape(_one_line(seg.text)), ""]
    return "\n".join(lines)


def _one_line(text: str) -> str:
    # a blank line ends a cue in both formats: keep each cue's text on one line
    return " ".join(text.split())


def _vtt_escape(text: str) -> str:
    # cue payloads may not contain "-->" and treat & and < as markup
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_json_dict(transcription) -> dict:
    """``{"text", "duration_s", "transcription_delay_ms", "segments": [{"id", "start", "end", "text",
    "avg_logprob", "words": [{"word", "start", "end", "probability"}]}], "token_ids", "token_probs"}``;
    times in seconds, rounded to ms. The confidences (faster-whisper's names: a word's mean token
    probability, a segment's mean token log-probability) appear when the transcription has them."""
    r = lambda t: round(float(t), 3)  # noqa: E731
    q = lambda x: round(float(x), 6)  # noqa: E731  (confidences: 6 decimals are plenty to read)

    def word(w) -> dict:
        d = {"word": w.text, "start": r(w.start), "end": r(w.end)}
        if getattr(w, "probability", None) is not None:
            d["probability"] = q(w.probability)
        return d

    def segment(i, s) -> dict:
        d = {"id": i, "start": r(s.start), "end": r(s.end), "text": s.text}
        if getattr(s, "avg_logprob", None) is not None:
            d["avg_logprob"] = q(s.avg_logprob)
        d["words"] = [word(w) for w in s.words]
        return d

    out = {
        "text": transcription.text,
        "duration_s": r(transcription.duration_s),
        "transcription_delay_ms": int(transcription.transcription_delay_ms),
        "segments": [segment(i, s) for i, s in enumerate(transcription.segments)],
        "token_ids": list(map(int, transcription.token_ids)),
    }
    probs = getattr(transcription, "token_probs", None)
    if probs is not None and len(probs) == len(out["token_ids"]):  # (a hand-made one may have none)
        out["token_probs"] = [q(x) for x in probs]
    return out


def to_json(transcription) -> str:
    return json.dumps(to_json_dict(transcription), ensure_ascii=False, indent=2) + "\n"


_WRITERS = {"txt": to_txt, "json": to_json, "srt": to_srt, "vtt": to_vtt}


def render(transcription, fmt: str) -> str:
    """The transcript as text in ``fmt`` (one of ``FORMATS``)."""
    try:
        writer = _WRITERS[fmt]
    except KeyError:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}") from None
    return writer(transcription)


def write_transcript(transcription, fmt: str, file: str | os.PathLike | IO[str]) -> None:
    """Write ``transcription`` (an ``api.Transcription``) as txt/json/srt/vtt to a path or an open
    text file (UTF-8 for paths)."""
    text = render(transcription, fmt)
    if isinstance(file, (str, os.PathLike)):
        write_text_atomically(file, text)
    else:
        file.write(text)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it and a rename, so that
    ``path`` always holds its old content or the whole new one: an interrupt, a full disk or a
    crash never leaves half a transcript, nor destroys the file it was replacing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        if path.exists():  # keep the replaced file's mode (mkstemp makes 0600)
            mode = path.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

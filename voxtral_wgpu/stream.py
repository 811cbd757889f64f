"""Streaming transcription: audio in as it arrives, text out as the decoder writes it.

    stream = model.create_stream(transcription_delay_ms=480)
    for chunk in microphone():                  # any size: 1 sample .. minutes
        for d in stream.feed(chunk):            # TextDelta(text, start, end, token_ids)
            print(d.text, end="", flush=True)
    for d in stream.finish():                   # right padding, decode to EOS
        print(d.text, end="")
    stream.token_ids == model.transcribe(all_audio).token_ids   # for any chunking

How (spec §3.4, §6.3): the stream is "32 * 1280 zeros of left pad, then the samples as they arrive".
The C extension's :class:`MelStream` turns it into log-mel frames exactly as ``log_mel`` would over
the whole signal; every frame goes into one :class:`~voxtral_wgpu.model.Session`, the same object
offline transcription uses, which runs the encoder over all newly complete positions in one batch
and one decoder step per position. ``finish`` appends the offline right padding
(``align + (n_delay + 1 + 10) * 1280`` zeros), so the whole token sequence equals offline decoding.
Memory is constant: the mel context, the conv state, the encoder KV ring (window 750), the
audio-embedding ring and the decoder KV ring (window 8192, grown once up to its size) are all
fixed-size; only the output (ids, text, latencies) grows, by a few bytes per 80 ms.

The frame clock (all times are seconds of INPUT audio, i.e. without the 2.56 s of left pad):
the decoder runs one position per 80 ms of audio; generated token ``i`` (0-based, prompt excluded)
comes from the step at position ``p = 32 + n_delay + i``, which has heard the audio up to the end of
position ``p``, and by construction of the delay speaks of the audio ``n_delay`` positions earlier,
position ``32 + i``: the input-audio slot ``[0.08 i, 0.08 (i + 1))`` s. That slot is the token's
``start``/``end`` (clamped to the input's duration once it is known: tokens written during the
right padding get a zero-length time at the end of the audio). The alignment is the model's own
(it writes a word about ``n_delay`` positions after hearing its start), so it is accurate to about
one slot plus whatever the model's delay habit is; it is not a forced alignment.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from . import audio as audio_mod
from .model import Session

SECONDS_PER_TOKEN = audio_mod.SAMPLES_PER_TOKEN / audio_mod.SAMPLE_RATE  # 0.08 s = 1 decoder position
LOOK_AHEAD_SAMPLES = 40  # frame 8p+7 of position p reads samples up to 1280p + 1319 (spec §3.3)

# Segmentation (words -> segments/subtitle cues); readability choices, not part of the model.
SENTENCE_END = (".", "?", "!", "…", "。", "？", "！")
SEGMENT_GAP_S = 1.2  # a pause this long between two words starts a new segment
SEGMENT_MAX_CHARS = 84  # two 42-character subtitle lines
SEGMENT_MAX_S = 8.0


# ------------------------------------------------------------------------------------------------
# events and timed text
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextDelta:
    """New text from a stream.

    ``text``: the characters to append to what was printed so far (``"".join`` of every delta's text
    is the final, stripped transcript; leading whitespace is dropped and trailing whitespace is held
    back until text follows it). ``start``/``end``: seconds of input audio the delta speaks of (frame
    clock, see the module docstring). ``token_ids``: the generated ids since the previous delta, up
    to and including the one that completed this text (specials included), so the deltas' ids
    concatenated are a prefix of ``Stream.token_ids``.
    """

    text: str
    start: float
    end: float
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Word:
    """A word: the text tokens from one that starts a word to the next such one.

    A token starts a word when its bytes begin with whitespace, when it is the first text token
    after a ``[STREAMING_WORD]`` marker, or when it is the first text token of the transcript.
    ``start`` is the slot of the marker (if the word has one) or of its first text token; ``end``
    the end of its last text token's slot. ``probability``: the mean of its text tokens' softmax
    probabilities (faster-whisper's ``Word.probability`` convention; the marker is not a text token);
    None when the probabilities are unknown."""

    text: str
    start: float
    end: float
    probability: float | None = None


@dataclass(frozen=True)
class Segment:
    """A run of words for display (a subtitle cue): split after sentence-final punctuation, at a
    pause of ``SEGMENT_GAP_S`` or more, and before it would pass ``SEGMENT_MAX_CHARS`` characters
    or ``SEGMENT_MAX_S`` seconds. ``avg_logprob``: the mean natural-log probability of its words'
    text tokens (as openai-whisper / faster-whisper report it, without their length penalty); None
    when the probabilities are unknown."""

    text: str
    start: float
    end: float
    words: tuple[Word, ...] = ()
    avg_logprob: float | None = None


def token_time(index: int, duration_s: float | None = None, offset_s: float = 0.0) -> tuple[float, float]:
    """Input-audio slot ``(start, end)`` in seconds of generated token ``index`` (frame clock)."""
    start = index * audio_mod.SAMPLES_PER_TOKEN / audio_mod.SAMPLE_RATE  # exact ratio, correctly rounded
    end = (index + 1) * audio_mod.SAMPLES_PER_TOKEN / audio_mod.SAMPLE_RATE
    if duration_s is not None:
        start, end = min(start, duration_s), min(end, duration_s)
    return offset_s + start, offset_s + end


def words_from_tokens(tokenizer, token_ids, *, duration_s: float | None = None, offset_s: float = 0.0,
                      token_probs=None) -> list[Word]:
    """Split generated ids (``Transcription.token_ids`` convention) into timed :class:`Word` s;
    ``token_probs`` (aligned with ``token_ids``) gives each word its ``probability``."""
    return [w for w, _ in _words_with_tokens(tokenizer, token_ids, duration_s, offset_s, token_probs)]


def _words_with_tokens(tokenizer, token_ids, duration_s, offset_s, token_probs) -> list[tuple[Word, list[int]]]:
    """(word, indices of its text tokens in ``token_ids``) pairs: see :func:`words_from_tokens`."""
    word_id = tokenizer.streaming_word_id
    ns = tokenizer.num_special
    groups: list[tuple[int, list[int]]] = []  # (start index, text ids)
    marker: int | None = None
    for i, t in enumerate(token_ids):
        if t == word_id:
            if marker is None:
                marker = i
            continue
        if t < ns:
            continue
        data = tokenizer.token_bytes(t)
        if not groups or marker is not None or data[:1].isspace():
            groups.append((i if marker is None else marker, []))
            marker = None
        groups[-1][1].append(i)
    words = []
    for first, idx in groups:
        text = tokenizer.decode([token_ids[i] for i in idx]).strip()
        if text:
            start = token_time(first, duration_s, offset_s)[0]
            end = token_time(idx[-1], duration_s, offset_s)[1]
            prob = None if token_probs is None else float(np.mean([token_probs[i] for i in idx]))
            words.append((Word(text, start, end, prob), idx))
    return words


def segments_from_words(words: list[Word]) -> list[Segment]:
    """Group words into display segments (see :class:`Segment`)."""
    segments: list[Segment] = []
    cur: list[Word] = []

    def close():
        if cur:
            segments.append(Segment(" ".join(w.text for w in cur), cur[0].start, cur[-1].end, tuple(cur)))
            cur.clear()

    for w in words:
        if cur:
            prev = cur[-1]
            n_chars = sum(len(x.text) + 1 for x in cur) + len(w.text)
            if (prev.text.endswith(SENTENCE_END) or w.start - prev.end >= SEGMENT_GAP_S
                    or n_chars > SEGMENT_MAX_CHARS or w.end - cur[0].start > SEGMENT_MAX_S):
                close()
        cur.append(w)
    close()
    return segments


def timed_text(tokenizer, token_ids, *, duration_s: float | None = None, offset_s: float = 0.0,
               token_probs=None) -> tuple[list[Word], list[Segment]]:
    """``(words, segments)`` of a transcript; used by offline ``transcribe`` and by streams.
    ``token_probs`` (aligned with ``token_ids``): each word's ``probability`` and each segment's
    ``avg_logprob`` (see :class:`Word`, :class:`Segment`)."""
    pairs = _words_with_tokens(tokenizer, token_ids, duration_s, offset_s, token_probs)
    words = [w for w, _ in pairs]
    segments = segments_from_words(words)
    if token_probs is not None:
        k = 0  # segments hold consecutive runs of the words, in order
        for j, seg in enumerate(segments):
            idx = [i for _, ix in pairs[k: k + len(seg.words)] for i in ix]
            k += len(seg.words)
            # a probability is >= 1/vocab (the winner's own softmax term is 1), so the log is finite
            segments[j] = dataclasses.replace(seg, avg_logprob=float(np.mean(np.log([token_probs[i] for i in idx]))))
    return words, segments


# ------------------------------------------------------------------------------------------------
# input checking
# ------------------------------------------------------------------------------------------------
def as_chunk(samples) -> np.ndarray:
    """One chunk of 16 kHz mono samples -> float32 (n,), converted as ``audio.load_audio`` documents
    (float as [-1, 1] full scale; int8/int16/int32 PCM scaled by 2^(bits-1); uint8 offset by 128).

    Raises ValueError for arrays that are not 1-D and for NaN/Inf samples (the message gives their
    count and the first index), TypeError for unsupported dtypes and objects."""
    if isinstance(samples, (bytes, bytearray, memoryview)):
        raise TypeError("Stream.feed() got raw bytes; pass a numpy array of samples "
                        "(e.g. np.frombuffer(data, np.int16) for 16-bit PCM)")
    if isinstance(samples, (list, tuple)):
        try:
            samples = np.asarray(samples, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"Stream.feed() got a {type(samples).__name__} that is not a flat sequence of "
                            f"numbers: {e}") from e
    if isinstance(samples, np.generic):  # a numpy scalar: refused below as a 0-d array
        samples = np.asarray(samples)
    if not isinstance(samples, np.ndarray):
        raise TypeError(f"Stream.feed() expects a 1-D numpy array of 16 kHz samples, got {type(samples).__name__}")
    if samples.ndim != 1:
        raise ValueError(f"Stream.feed() expects mono audio of shape (n,), got an array of shape {samples.shape}; "
                         "mix channels first, e.g. x.mean(axis=1) for shape (n, channels)")
    x = audio_mod._to_float32(samples)
    audio_mod._check_finite(x, "audio chunk")
    return x


# ------------------------------------------------------------------------------------------------
# the stream
# ------------------------------------------------------------------------------------------------
class StreamClosedError(RuntimeError):
    """feed()/finish() on a stream that has already finished, was closed, or was closed because a
    feed()/finish() call failed (an interrupt, say)."""


def _release_abandoned(gpu, session) -> None:
    """A stream was garbage-collected without finish()/close(): free its session's GPU buffers (the
    Gpu's bind-group cache would keep them alive). The collector may run this in any thread and in
    the middle of another call's recording, so the release waits for a moment when nobody records."""
    gpu.run_soon(session.release)


class TranscriptView:
    """What a stream shows of its transcript (``Stream`` and the engine's ``EngineStream``): the
    subclass provides ``_session`` (a model.Session), ``_text`` (TextAssembler), ``_n_samples``,
    ``_finished``, ``tokenizer``, ``transcription_delay_ms`` and ``latencies``."""

    @property
    def token_ids(self) -> list[int]:
        return list(self._session.generated)

    @property
    def text(self) -> str:
        return self._text.text

    @property
    def duration_s(self) -> float:
        return self._n_samples / audio_mod.SAMPLE_RATE

    @property
    def eos(self) -> bool:
        return self._session.eos

    @property
    def finished(self) -> bool:
        return self._finished

    def _emit(self, piece: str, last: int | None = None) -> TextDelta | None:
        """A delta for the characters ``piece`` that id ``last`` (default: the last id) completed
        (the subclass also provides ``_delta_first``, the first id not yet in a delta)."""
        body = self._text.push(piece)
        if not body:
            return None
        ids = self._session.generated
        end_index = len(ids) - 1 if last is None else last
        first = self._delta_first
        self._delta_first = end_index + 1
        chunk = tuple(ids[first:end_index + 1])
        ns = self.tokenizer.num_special
        text_idx = [first + k for k, t in enumerate(chunk) if t >= ns] or [end_index]
        duration = self.duration_s if self._finished else None
        start = token_time(text_idx[0], duration)[0]
        end = token_time(end_index, duration)[1]
        return TextDelta(body, start, end, chunk)

    def result(self):
        """The :class:`~voxtral_wgpu.api.Transcription` of everything decoded so far (complete after
        ``finish()``)."""
        from .api import Transcription

        ids = self.token_ids
        # taken after the ids: a decoding thread appends an id's probability before the id
        probs = self._session.generated_probs[: len(ids)]
        duration = self.duration_s if self._finished else None
        words, segments = timed_text(self.tokenizer, ids, duration_s=duration, token_probs=probs)
        return Transcription(text=self.text, token_ids=ids, duration_s=self.duration_s,
                             transcription_delay_ms=self.transcription_delay_ms,
                             timings={"latency_median_s": _quantile(self.latencies, 0.5),
                                      "latency_p90_s": _quantile(self.latencies, 0.9)},
                             words=words, segments=segments, token_probs=probs)


class Stream(TranscriptView):
    """An open transcription of 16 kHz mono audio that arrives in pieces. Create with
    ``Model.create_stream``.

    Attributes and properties:
        token_ids: every generated id so far (specials included, prompt and EOS excluded), as
            ``Transcription.token_ids``.
        text: the transcript so far (the concatenation of all deltas' text).
        latencies: per generated id, the wall time in seconds from the arrival of the audio that
            completed its decoder position (the ``feed``/``finish`` call that brought it) to the
            return of that id from ``feed``/``finish``.
        duration_s: seconds of input audio fed so far.
        eos: True once the model emitted EOS; further audio is then accepted and ignored (offline
            decoding stops there too). Start a new stream to go on listening.
        finished: True after ``finish()`` (or ``close()``).

    Streams of one model may be fed from several threads: each ``feed``/``finish``/``close`` holds the
    model's GPU for the whole call (``Gpu.exclusive``), so calls serialise and every stream's result
    is the one it would have alone. One stream is fed by one thread at a time.

    If ``feed``/``finish`` fails while decoding (a KeyboardInterrupt, say), the stream is closed: its
    buffers are freed, later calls raise :class:`StreamClosedError`, and ``token_ids``, ``text`` and
    ``result()`` keep what was decoded before the failure. The model stays usable.

    A stream dropped without ``finish()``/``close()`` frees its GPU buffers when it is collected
    (``with model.create_stream() as s:`` closes it at the end of the block).
    """

    def __init__(self, model, transcription_delay_ms: int | None = None):
        from ._native import MelStream

        self.model = model
        self.tokenizer = model.tokenizer
        self.transcription_delay_ms, self.n_delay = model._n_delay(transcription_delay_ms)
        self.n_left_pad = model.n_left_pad
        self._gpu = model.gpu
        with self._gpu.exclusive():
            self._session = Session(model, self.n_delay)
        # holds the session, not the stream: a dropped stream is collected, then its session released
        self._finalizer = weakref.finalize(self, _release_abandoned, self._gpu, self._session)
        self._finalizer.atexit = False  # at interpreter exit the device goes anyway
        self._mel = MelStream()
        self._text_decoder = self.tokenizer.stream()
        self._n_samples = 0  # real samples fed
        self._finished = False
        self._closed_by: str | None = None  # why feed()/finish() now refuse, once closed
        self._text = TextAssembler()
        self._delta_first = 0  # index of the first id not yet in a delta
        self._arrivals: collections.deque = collections.deque()  # (real samples after a feed, wall time)
        self.latencies: list[float] = []
        now = time.perf_counter()
        self._arrivals.append((0, now))
        with self._failure_closes("create_stream()"):
            self._push(self._mel.feed(np.zeros(self.n_left_pad * audio_mod.SAMPLES_PER_TOKEN, np.float32)))

    # -------------------------------------------------------------------- public
    def feed(self, samples) -> list[TextDelta]:
        """Append audio (1-D, 16 kHz; float in [-1, 1] or integer PCM, see :func:`as_chunk`); decode
        every position it completes; return the new text. A rejected chunk (ValueError/TypeError)
        changes nothing."""
        if self._finished:
            raise StreamClosedError(f"Stream.feed() after {self._closed_by or 'finish()'}: the stream has ended; "
                                    "create a new one with model.create_stream()")
        x = as_chunk(samples)
        if x.size == 0:
            return []
        t_arrival = time.perf_counter()
        with self._failure_closes("feed()"):
            self._n_samples += x.size
            if self._session.done:  # EOS already: the transcript is complete, nothing more is decoded
                return []
            self._arrivals.append((self._n_samples, t_arrival))
            self._push(self._mel.feed(x))
            return self._decode()

    def finish(self) -> list[TextDelta]:
        """End of audio: append the offline right padding, decode until EOS or the last position,
        return the remaining text, and release the GPU buffers."""
        if self._finished:
            if self._closed_by is not None:
                raise StreamClosedError(f"Stream.finish() after {self._closed_by}: the stream was closed "
                                        "without finishing; create a new one with model.create_stream()")
            raise StreamClosedError("Stream.finish() called twice: the stream has already ended")
        self._finished = True
        t_arrival = time.perf_counter()
        left, right = audio_mod.padding(self._n_samples, self.n_delay, self.n_left_pad)
        total_positions = (left + self._n_samples + right) // audio_mod.SAMPLES_PER_TOKEN
        try:
            with self._failure_closes("finish()"):
                if not self._session.done:
                    self._arrivals.append((float("inf"), t_arrival))
                    self._push(self._mel.feed(np.zeros(right, np.float32)))
                    self._push(self._mel.finish())
                    self._session.close(total_positions)
                    events = self._decode()
                else:
                    events = []
                tail = self._emit(self._text_decoder.flush())
                if tail is not None:
                    events.append(tail)
                return events
        finally:
            self.close()

    def close(self) -> None:
        """Free the stream's GPU buffers and mel context without finishing (idempotent); later
        ``feed``/``finish`` raise :class:`StreamClosedError`."""
        if not self._finished:
            self._closed_by = "close()"
        self._finished = True
        if self._mel is not None:
            self._mel.close()
            self._mel = None
        self._session.release()
        self._finalizer.detach()  # after the release: one interrupted half-way is still done on collection

    @contextmanager
    def _failure_closes(self, call: str):
        """Hold the model's GPU for one call (other threads' calls wait). If the call fails part-way,
        the GPU work it had not submitted is dropped (Gpu.exclusive) and the session no longer matches
        what ran, so the stream is closed: its buffers freed, later calls refused with the reason."""
        try:
            with self._gpu.exclusive():
                yield
        except BaseException as e:
            if self._closed_by is None:
                self._closed_by = f"{call} failed ({type(e).__name__})"
            self._finished = True
            self.close()
            raise

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Stream(delay={self.transcription_delay_ms} ms, fed={self.duration_s:.2f} s, "
                f"tokens={len(self._session.generated)}, finished={self._finished})")

    # -------------------------------------------------------------------- internals
    def _push(self, frames: np.ndarray) -> None:
        if len(frames):
            self._session.push_mel(frames)

    def _decode(self) -> list[TextDelta]:
        first = len(self._session.generated)
        new = self._session.decode()
        t_return = time.perf_counter()
        self._record_latencies(first, len(new), t_return)
        events = []
        ids = self._session.generated
        for i in range(first, first + len(new)):
            ev = self._emit(self._text_decoder.push(ids[i]), last=i)
            if ev is not None:
                events.append(ev)
        return events

    def _record_latencies(self, first: int, n: int, t_return: float) -> None:
        """Token ``i`` comes from the step at position p = L - 1 + i, complete once the real samples
        reach 1280 (p - n_left_pad + 1) + 40 (its last mel frame's window)."""
        L = len(self._session.prompt_ids)
        arrivals = self._arrivals
        for i in range(first, first + n):
            p = L - 1 + i
            need = audio_mod.SAMPLES_PER_TOKEN * (p - self.n_left_pad + 1) + LOOK_AHEAD_SAMPLES
            while len(arrivals) > 1 and arrivals[0][0] < need:
                arrivals.popleft()
            self.latencies.append(t_return - arrivals[0][1])


class TextAssembler:
    """Decoded characters -> the text to print: leading whitespace is dropped and trailing
    whitespace held back until something follows it, so that after any sequence of ``push``es the
    printed text is ``"".join(pieces).strip()`` minus nothing but the held whitespace: in the end
    exactly ``Transcription.text`` (which is stripped)."""

    def __init__(self):
        self._parts: list[str] = []
        self._started = False  # a non-whitespace character has been printed
        self._held = ""  # trailing whitespace not printed yet

    def push(self, piece: str) -> str:
        """Add characters; return what to print now (possibly "")."""
        s = self._held + piece
        if not self._started:
            s = s.lstrip()
        body = s.rstrip()
        self._held = s[len(body):]
        if body:
            self._started = True
            self._parts.append(body)
        return body

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""


def _quantile(xs: list[float], q: float) -> float | None:
    return float(np.quantile(np.asarray(xs), q)) if xs else None


def transcribe_stream(model, chunks: Iterable, *, transcription_delay_ms: int | None = None
                      ) -> Iterator[TextDelta]:
    """Generator form: feed each chunk, yield its deltas, then the deltas of ``finish()``. The
    generator's return value (``StopIteration.value``) is the final Transcription."""
    stream = Stream(model, transcription_delay_ms)
    try:
        for chunk in chunks:
            yield from stream.feed(chunk)
        yield from stream.finish()
    finally:
        stream.close()
    return stream.result()

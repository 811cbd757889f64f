"""A stream served by an :class:`~voxtral_wgpu.engine.Engine`: the ``Stream`` interface, non-blocking.

``feed`` computes the chunk's log-mel on the calling thread, hands the frames to the engine and
returns the text that is ready, without waiting for the GPU; ``finish`` waits for this stream only.
Any thread may call them (one stream's calls serialise on its lock). For asyncio servers:
``afeed`` (same as ``feed``, it never blocks on the GPU), ``afinish`` (waits in an executor) and
``async for delta in stream.adeltas()`` (text as the engine produces it, until the stream ends).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import weakref

import numpy as np

from .. import audio as audio_mod
from ..stream import LOOK_AHEAD_SAMPLES, StreamClosedError, TextAssembler, TextDelta, TranscriptView, as_chunk
from .core import EngineError, _finalize_slot


class EngineStream(TranscriptView):
    """One live transcription inside an engine. Create with ``Engine.create_stream``.

    ``token_ids``, ``text``, ``latencies`` (seconds from the arrival of the audio that completed a
    token's position to the moment the engine had the token), ``duration_s``, ``eos``, ``finished``
    and ``result()`` mean what they mean on ``Stream``; after ``finish()`` the ids equal
    ``Model.transcribe()``'s on the same audio and delay."""

    def __init__(self, engine, transcription_delay_ms: int | None = None):
        from .._native import MelStream

        model = engine.model
        self.engine = engine
        self.tokenizer = model.tokenizer
        self.transcription_delay_ms, self.n_delay = model._n_delay(transcription_delay_ms)
        self.n_left_pad = model.n_left_pad
        self._slot = engine._register(self.n_delay)
        self._lock = threading.RLock()
        self._arrivals_lock = threading.Lock()  # the feeding thread appends, the engine's reads (_on_tokens)
        self._finished = False  # no more audio: finish() queued or close()d
        self._closed = False
        self._mel = MelStream()
        self._text_decoder = self.tokenizer.stream()
        self._text = TextAssembler()
        self._n_samples = 0
        self._seen = 0  # ids turned into deltas so far
        self._delta_first = 0
        self._arrivals: collections.deque = collections.deque([(0, time.perf_counter())])
        self._timed = 0  # ids whose latency is recorded
        self.latencies: list[float] = []
        self._waiters: list = []  # (loop, asyncio.Event) of adeltas() consumers
        self._slot.on_tokens = weakref.WeakMethod(self._on_tokens)
        self._finalizer = weakref.finalize(self, _finalize_slot, weakref.ref(engine), self._slot)
        self._finalizer.atexit = False
        engine._submit(self._slot, self._mel.feed(np.zeros(self.n_left_pad * audio_mod.SAMPLES_PER_TOKEN, np.float32)))

    # ------------------------------------------------------------------ public
    @property
    def _session(self):
        return self._slot.session

    def feed(self, samples) -> list[TextDelta]:
        """Queue audio (as ``Stream.feed``) and return the text that is ready now (never waits for the GPU)."""
        with self._lock:
            if self._finished:
                raise StreamClosedError("feed() after finish() or close(): the stream has ended; "
                                        "create a new one with engine.create_stream()")
            self._raise_failure()
            x = as_chunk(samples)
            if x.size and self._slot.session.done:  # EOS: the transcript is complete, audio is ignored
                self._n_samples += x.size
            elif x.size:
                t = time.perf_counter()
                self._n_samples += x.size
                with self._arrivals_lock:
                    self._arrivals.append((self._n_samples, t))
                self.engine._submit(self._slot, self._mel.feed(x))
            return self._collect(final=False)

    def poll(self) -> list[TextDelta]:
        """The text produced since the last call, without feeding anything."""
        with self._lock:
            return self._collect(final=False)

    def finish(self) -> list[TextDelta]:
        """End of audio: the offline right padding is queued, then this waits for the stream's last
        token (other streams go on) and returns the remaining text; the stream's GPU memory is freed."""
        with self._lock:
            if self._closed:
                raise StreamClosedError("finish() after finish() or close(): the stream has already ended")
            self._request_finish()
        self._slot.finished.wait()  # not under the lock: poll() / adeltas() go on meanwhile
        with self._lock:
            try:
                self._raise_failure()
                return self._collect(final=True)
            finally:
                self.close()

    def close(self) -> None:
        """Leave the engine without finishing; frees the stream's GPU memory at the next tick (idempotent)."""
        with self._lock:
            self._finished = self._closed = True
            if self._mel is not None:
                self._mel.close()
                self._mel = None
            self._finalizer.detach()
            try:
                self.engine._submit(self._slot, close=True)
            except EngineError:
                pass  # the engine is gone, and with it the stream's buffers

    def __enter__(self) -> "EngineStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # asyncio forms
    async def afeed(self, samples) -> list[TextDelta]:
        return self.feed(samples)

    async def afinish(self) -> list[TextDelta]:
        return await asyncio.get_running_loop().run_in_executor(None, self.finish)

    async def adeltas(self):
        """Text as the engine produces it (``async for delta in stream.adeltas()``), until the stream's
        last token was decoded or it was closed; the held-back tail comes from ``finish()``."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._lock:
            self._waiters.append(entry)
        try:
            while True:
                for d in self.poll():
                    yield d
                if self._slot.finished.is_set() or self._closed:
                    for d in self.poll():
                        yield d
                    return
                await event.wait()
                event.clear()
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    def __repr__(self) -> str:
        return (f"EngineStream(delay={self.transcription_delay_ms} ms, fed={self.duration_s:.2f} s, "
                f"tokens={len(self._slot.session.generated)}, finished={self._finished})")

    # ------------------------------------------------------------------ internals
    def _request_finish(self) -> None:
        """Queue the right padding and the end of input (once), without waiting."""
        if self._mel is None:
            return
        self._finished = True
        left, right = audio_mod.padding(self._n_samples, self.n_delay, self.n_left_pad)
        total = (left + self._n_samples + right) // audio_mod.SAMPLES_PER_TOKEN
        with self._arrivals_lock:
            self._arrivals.append((float("inf"), time.perf_counter()))
        frames = np.concatenate([self._mel.feed(np.zeros(right, np.float32)), self._mel.finish()])
        self._mel.close()
        self._mel = None
        self.engine._submit(self._slot, frames, total_positions=total)

    def _raise_failure(self) -> None:
        if self._slot.error is not None:
            err = self._slot.error
            raise EngineError(f"this stream's decoding failed: {err}") from err

    def _on_tokens(self) -> None:
        """Engine thread, after a tick: time the new ids, wake the async consumers."""
        ids = self._slot.session.generated
        now = time.perf_counter()
        L = len(self._slot.session.prompt_ids)
        with self._arrivals_lock:
            arrivals = self._arrivals
            for i in range(self._timed, len(ids)):
                need = audio_mod.SAMPLES_PER_TOKEN * (L - 1 + i - self.n_left_pad + 1) + LOOK_AHEAD_SAMPLES
                while len(arrivals) > 1 and arrivals[0][0] < need:
                    arrivals.popleft()
                self.latencies.append(now - arrivals[0][1])
            self._timed = len(ids)
        for loop, event in list(self._waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed
                pass

    def _collect(self, *, final: bool) -> list[TextDelta]:
        """Deltas for the ids the engine produced since the last call (and the held tail if final)."""
        ids = self._slot.session.generated
        n = len(ids)
        events = []
        for i in range(self._seen, n):
            ev = self._emit(self._text_decoder.push(ids[i]), i)
            if ev is not None:
                events.append(ev)
        self._seen = n
        if final:
            ev = self._emit(self._text_decoder.flush(), n - 1)
            if ev is not None:
                events.append(ev)
        return events

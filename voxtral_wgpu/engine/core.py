"""The engine: one scheduler thread that owns the GPU work of many streams.

Each tick the scheduler takes the audio the streams were fed since the last one (their log-mel
frames, computed on the feeding thread), records the encoder over every stream's newly complete
positions and the prefill of streams that just got their prompt's audio, then decoder steps: each
step one row per decoding stream (:class:`~voxtral_wgpu.engine.batch.DecodeBatch`; streams without a
runnable position ride along with a placeholder row, so the recorded step is replayed), until no
stream has a runnable position (or ``STEPS_PER_TICK`` steps). Token ids come back through one copy of
the streams' token rings taken one tick later, so no readback waits for the work just submitted.

Streams join and leave between ticks. A stream's ids equal ``Model.transcribe()``'s on the same
audio and delay, whatever the other streams do (every kernel gives a row the bits it has alone).
"""

from __future__ import annotations

import threading
import time
import weakref

from ..model import MEL_FRAMES_PER_POSITION, TOKEN_RING_WORDS, Session

STEPS_PER_TICK = 16  # decoder steps per tick at most, so newly arrived audio is encoded soon
DEFAULT_MAX_STREAMS = 64


class EngineError(RuntimeError):
    """The engine stopped (closed, or its scheduler failed); the message says why."""


class EngineFullError(RuntimeError):
    """``create_stream`` on an engine that already serves ``max_streams`` streams."""


class _Slot:
    """The scheduler's side of one stream: its session and what the stream asked for since the last tick."""

    def __init__(self, session: Session, index: int):
        self.session = session
        self.index = index  # its place in the encoder's KV pools
        self.frames: list = []  # mel frame arrays fed, not yet pushed into the session
        self.total_positions: int | None = None  # set by finish(): the input ends there
        self.closing = False  # close(): drop the stream at the next tick
        self.error: BaseException | None = None
        self.finished = threading.Event()  # decoding reached its end (or failed, or was closed)
        # the stream's callback for new ids in session.generated, held weakly: a dropped stream is
        # collected (and its finalizer frees the slot) even though the engine holds the slot
        self.on_tokens: weakref.WeakMethod | None = None

    def notify(self) -> None:
        callback = self.on_tokens() if self.on_tokens is not None else None
        if callback is not None:
            callback()


class Engine:
    """Owns the GPU work of many streams of one model. ``with Engine(model) as engine:`` ...

    ``engine.create_stream()`` gives a stream with the ``Stream`` interface (``feed``, ``finish``,
    ``text``, ``token_ids``, ``latencies``), usable from any thread; ``transcribe_many`` runs files
    through the same batches. Closing the engine ends every open stream (their ``finish`` raises
    :class:`EngineError`) and frees the GPU buffers."""

    def __init__(self, model, *, max_streams: int | None = None):
        if max_streams is None:
            max_streams = DEFAULT_MAX_STREAMS
        if not isinstance(max_streams, int) or isinstance(max_streams, bool) or max_streams < 1:
            raise ValueError(f"max_streams must be a positive integer, not {max_streams!r}")
        from .batch import DecodeBatch
        from .encoder import BatchEncoder

        self.model = model
        self.gpu = model.gpu
        self.max_streams = max_streams
        self._lock = threading.Condition()
        self._slots: list[_Slot] = []
        self._joining = 0  # create_stream() calls between taking a place and adding their slot
        self._closed = False
        self._error: BaseException | None = None
        self._wake = False
        self._stats = {"ticks": 0, "steps": 0, "rows": 0, "step_s": 0.0, "tick_s": 0.0, "encode_s": 0.0}
        self._free = list(range(max_streams))  # places in the encoder's KV pools
        with self.gpu.exclusive():
            before = self.gpu.bytes_allocated
            try:
                self._batch = DecodeBatch(model, max_streams)
                self._encoder = BatchEncoder(model, max_streams)
            except Exception as e:  # out of GPU memory, or a buffer over the device's limits
                if hasattr(self, "_batch"):  # (each part frees its own buffers when it fails)
                    self._batch.release()
                raise EngineError(f"the engine's buffers for max_streams={max_streams} do not fit this GPU "
                                  f"({e}); create it with a smaller max_streams") from e
            self.buffer_bytes = self.gpu.bytes_allocated - before
        self._thread = threading.Thread(target=self._run, name="voxtral-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def create_stream(self, *, transcription_delay_ms: int | None = None):
        """A new stream (``EngineStream``) of this engine; raises :class:`EngineFullError` when
        ``max_streams`` streams are open."""
        from .stream import EngineStream

        return EngineStream(self, transcription_delay_ms)

    def transcribe_many(self, audios, *, transcription_delay_ms: int | None = None, progress: bool | None = None):
        """Transcribe many recordings (paths or 1-D float32 arrays at 16 kHz) through shared batches,
        ``max_streams`` at a time; returns one ``Transcription`` per input, in order (each equal to
        ``model.transcribe``'s)."""
        import sys

        from .. import audio as audio_mod

        audios = list(audios)
        if progress is None:
            progress = len(audios) > 1 and sys.stderr.isatty()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(audios), unit="file", desc="transcribing", file=sys.stderr, leave=False)
        results: list = [None] * len(audios)
        open_streams: dict = {}
        next_i = 0
        try:
            while next_i < len(audios) or open_streams:
                while next_i < len(audios) and len(open_streams) < self.max_streams:
                    samples = audio_mod.load_audio(audios[next_i])
                    s = self.create_stream(transcription_delay_ms=transcription_delay_ms)
                    s.feed(samples)
                    s._request_finish()
                    open_streams[next_i] = s
                    next_i += 1
                done = [i for i, s in open_streams.items() if s._slot.finished.wait(0.05)]
                for i in done:
                    s = open_streams.pop(i)
                    s.finish()
                    results[i] = s.result()
                    if bar is not None:
                        bar.update(1)
        finally:
            for s in open_streams.values():
                s.close()
            if bar is not None:
                bar.close()
        return results

    def stats(self) -> dict:
        """Counters: open streams, ticks, decoder steps and rows so far, host seconds recording steps,
        ticks and the encoder (with prefills), GPU bytes this process holds, the batch buffers' bytes."""
        with self._lock:
            return {**self._stats, "streams": len(self._slots), "max_streams": self.max_streams,
                    "gpu_bytes": self.gpu.bytes_allocated, "batch_bytes": self._batch.nbytes,
                    "encoder_bytes": self._encoder.nbytes, "encoder_bytes_per_stream": self._encoder.bytes_per_stream}

    def close(self) -> None:
        """End every open stream, stop the scheduler and free the engine's GPU buffers (idempotent)."""
        with self._lock:
            if self._closed and not self._thread.is_alive():
                return
            self._closed = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ called by streams
    def _register(self, n_delay: int) -> _Slot:
        # Lock order: the GPU (held by the scheduler through a whole tick) is never awaited while
        # holding the engine's lock (which the tick takes), so the session is made between the two.
        with self._lock:
            self._check_open()
            # a closed stream's place is free at once (its buffers go at the next tick)
            if sum(not s.closing for s in self._slots) + self._joining >= self.max_streams:
                raise EngineFullError(f"this engine serves at most {self.max_streams} streams at once (max_streams); "
                                      "finish or close one first, or create the engine with a larger max_streams")
            self._joining += 1
            index = self._free.pop()
        try:
            with self.gpu.exclusive():
                slot = _Slot(Session(self.model, n_delay, chunk_positions=self._encoder.positions, encoder=False),
                             index)
        except BaseException:
            with self._lock:
                self._joining -= 1
                self._free.append(index)
            raise
        with self._lock:
            self._joining -= 1
            if self._closed:
                self.gpu.run_soon(slot.session.release)
                self._check_open()
            self._slots.append(slot)
            return slot

    def _submit(self, slot: _Slot, frames=None, *, total_positions: int | None = None, close: bool = False) -> None:
        with self._lock:
            if slot.error is None and not slot.closing:
                self._check_open()
            if frames is not None and len(frames):
                slot.frames.append(frames)
            if total_positions is not None:
                slot.total_positions = total_positions
            if close and not slot.closing:
                slot.closing = True
                self._free.append(slot.index)  # later ticks encode the stream no more
            self._wake = True
            self._lock.notify_all()

    def _check_open(self) -> None:
        if self._error is not None:
            raise EngineError(f"the engine's scheduler failed: {self._error!r}") from self._error
        if self._closed:
            raise EngineError("the engine is closed")

    # ------------------------------------------------------------------ the scheduler
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._wake and not self._closed and not self._busy():
                        self._lock.wait(0.5)
                    self._wake = False
                    if self._closed:
                        break
                    slots = list(self._slots)
                    inputs = []
                    for s in slots:
                        inputs.append((s, s.frames, s.total_positions, s.closing))
                        s.frames = []
                with self.gpu.exclusive():
                    self._tick(inputs)
        except BaseException as e:  # every waiting stream learns of it, none hangs
            with self._lock:
                self._error = e
                for s in self._slots:
                    s.error = e
                    s.finished.set()
                self._lock.notify_all()
        finally:
            with self._lock:
                slots, self._slots = self._slots, []
                self._closed = True
            with self.gpu.exclusive():
                self._batch.forget()
                for s in slots:
                    if s.error is None and not s.finished.is_set():
                        s.error = EngineError("the engine was closed before this stream finished")
                    s.session.release()
                    s.finished.set()
                    s.notify()
                self._batch.release()
                self._encoder.release()

    def _busy(self) -> bool:
        """Work left without new input: positions to encode, runnable positions, token copies to take."""
        return any(not s.closing and not s.finished.is_set()
                   and (s.session._token_reads or self._encodable(s.session) > 0
                        or (s.session.prefilled and s.session.next_pos < _limit(s.session)))
                   for s in self._slots)

    def _encodable(self, sess: Session) -> int:
        """Positions of the session the next encoder pass takes: complete ones, while its ring has room."""
        room = sess.dec.acap - (sess.positions_encoded - sess.next_pos)
        return min(len(sess._mel_pending) // MEL_FRAMES_PER_POSITION, self._encoder.positions, room)

    def _tick(self, inputs) -> None:
        t0 = time.perf_counter()
        live = []
        for slot, frames, total, closing in inputs:
            sess = slot.session
            if closing:
                self._drop(slot)
                continue
            if slot.finished.is_set():
                continue
            if not sess.done:  # after EOS the audio is ignored (it would only pile up)
                for f in frames:
                    sess.push_mel(f)
            if total is not None and sess.total_positions is None:
                sess.close(total)
            live.append(slot)
        t_enc = time.perf_counter()
        items = []
        for slot in live:
            sess = slot.session
            n = self._encodable(sess)
            if n > 0 and not sess.done:
                items.append((slot.index, sess, n))
        if items:
            self._encoder.encode(items)
        for slot in live:
            sess = slot.session
            L = len(sess.prompt_ids)
            if not sess.prefilled and sess.positions_encoded >= L:
                sess._decoder_rows(0, L - 1, head=False)  # prompt positions 0..L-2 fill the KV cache
                sess.next_pos = L - 1
                sess.prefilled = True
        self._stats["encode_s"] += time.perf_counter() - t_enc
        # Every decoding stream has a row in each step, runnable or not (placeholder rows, see
        # DecodeBatch.step), so the batch changes only when streams join or end and its recorded step
        # is replayed: with only the runnable ones, streams fed at their own times made a new batch
        # (and a full recording) almost every step.
        batch = [s.session for s in live if s.session.prefilled and not s.session.done]
        for _ in range(STEPS_PER_TICK):
            runnable = {s for s in batch if s.next_pos < _limit(s)}
            if not runnable:
                break
            t = time.perf_counter()
            self._batch.step(batch, runnable)
            self._stats["step_s"] += time.perf_counter() - t
            self._stats["steps"] += 1
            self._stats["rows"] += len(runnable)
        self.gpu.flush()
        # ids of the previous tick (its copies ran before this tick's work), then this tick's copies,
        # all streams' through one readback
        requests = []
        for slot in live:
            sess = slot.session
            while sess._token_reads:
                sess._take_tokens(*sess._token_reads.pop(0))
            at_end = sess.total_positions is not None and sess.prefilled and sess.next_pos >= sess.total_positions - 1
            if sess.done or at_end:
                sess._read_tokens()  # the last copies (waits for this tick's work)
                sess.done = True
                slot.finished.set()
            elif sess.prefilled and sess.next_pos >= sess._tokens_requested_until():
                requests.append(sess)  # positions decoded this tick, taken at the next one
            slot.notify()
        reads = self.gpu.read_later_many([(sess.dec.tokens, TOKEN_RING_WORDS) for sess in requests])
        for sess, read in zip(requests, reads):
            sess._token_reads.append((sess._tokens_requested_until(), sess.next_pos, read))
        self._stats["ticks"] += 1
        self._stats["tick_s"] += time.perf_counter() - t0

    def _drop(self, slot: _Slot) -> None:
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)
        self._batch.forget()  # the recorded step binds the session's buffers
        slot.session.release()
        slot.finished.set()


def _limit(sess: Session) -> int:
    """The first position not runnable yet: the audio encoded so far, and HF's max_length (the last
    step runs at total - 2)."""
    limit = sess.positions_encoded
    if sess.total_positions is not None:
        limit = min(limit, sess.total_positions - 1)
    return limit


def _finalize_slot(engine_ref: weakref.ref, slot: _Slot) -> None:
    """A stream was collected without finish()/close(): its slot is dropped at the next tick."""
    engine = engine_ref()
    if engine is not None:
        try:
            engine._submit(slot, close=True)
        except EngineError:
            pass

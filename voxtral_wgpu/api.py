"""Public entry points: ``load`` a checkpoint, ``Model.transcribe`` audio."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import audio as audio_mod
from .config import ModelConfig
from .gpu import Gpu
from .model import Model as _GraphModel
from .model import KV_CACHE_TYPES, Session
from .stream import Stream, TextDelta, timed_text, transcribe_stream
from .tokenizer import Tekken
from .weights import load_safetensors

DEFAULT_REPO = "mistralai/Voxtral-Mini-4B-Realtime-2602"


@dataclass
class Transcription:
    """What ``Model.transcribe`` returns.

    ``text``: the transcript, stripped. ``token_ids``: every generated id in order, specials
    included (``[STREAMING_PAD]``, ``[STREAMING_WORD]``, ...), prompt excluded, EOS excluded.
    ``words`` / ``segments``: timed :class:`~voxtral_wgpu.stream.Word` and
    :class:`~voxtral_wgpu.stream.Segment` lists from the decoder's frame clock (generated token i
    speaks of input audio [0.08 i, 0.08 (i + 1)) s; see ``voxtral_wgpu.stream``).
    ``token_probs``: the softmax probability of each id in ``token_ids`` (aligned with it) under the
    logits it was chosen from, computed on the GPU beside the argmax; words' ``probability`` and
    segments' ``avg_logprob`` come from it.
    """

    text: str
    token_ids: list[int]
    duration_s: float = 0.0  # seconds of input audio
    transcription_delay_ms: int = 480
    timings: dict = field(default_factory=dict)
    words: list = field(default_factory=list)  # list[stream.Word]
    segments: list = field(default_factory=list)  # list[stream.Segment]
    token_probs: list = field(default_factory=list)  # list[float], aligned with token_ids


class Model(_GraphModel):
    """A loaded Voxtral Realtime model. Create with :func:`voxtral_wgpu.load`."""

    def _n_delay(self, transcription_delay_ms: int | None) -> tuple[int, int]:
        ms = self.default_delay_ms if transcription_delay_ms is None else transcription_delay_ms
        n_delay = audio_mod.delay_ms_to_tokens(ms)  # refuses NaN, inf and off-grid values before int()
        return int(ms), n_delay

    def transcribe(self, audio, *, transcription_delay_ms: int | None = None, progress: bool | None = None,
                   stop_on_eos: bool = True) -> Transcription:
        """Transcribe a whole recording. Safe to call from several threads: calls on one model take
        turns on its GPU (they serialise), and each returns what it would alone.

        ``audio``: a file path (any format libsndfile reads; resampled to 16 kHz, mixed to mono) or
        a 1-D float32 NumPy array of 16 kHz samples. ``transcription_delay_ms``: 80..2400 in steps
        of 80 (default: the model's, 480 ms). ``progress``: a progress bar on stderr (default: on
        for audio longer than 60 s when stderr is a terminal). ``stop_on_eos=False`` decodes every
        position (benchmarks on random weights)."""
        from ._native import MelStream

        delay_ms, n_delay = self._n_delay(transcription_delay_ms)
        samples = audio_mod.load_audio(audio)
        t0 = time.perf_counter()
        left, right = audio_mod.padding(len(samples), n_delay, self.n_left_pad)
        padded = np.concatenate([np.zeros(left, np.float32), samples, np.zeros(right, np.float32)])
        n_positions = len(padded) // audio_mod.SAMPLES_PER_TOKEN
        if progress is None:
            progress = len(samples) > 60 * audio_mod.SAMPLE_RATE and sys.stderr.isatty()
        bar = session = None
        # encoder and decoder interleave chunk by chunk; each chunk's log-mel (MelStream: the same
        # frames as log_mel over the whole signal) is computed while the GPU runs the previous chunk
        piece = audio_mod.SAMPLES_PER_TOKEN * self.offline_chunk_positions
        mel_s = 0.0
        try:
            # one call records on the GPU at a time (other threads wait); an exception anywhere inside,
            # a KeyboardInterrupt included, drops this call's unsubmitted work and the model stays usable
            with self.gpu.exclusive():
                session = Session(self, n_delay, chunk_positions=self.offline_chunk_positions)
                session.stop_on_eos = stop_on_eos
                session.close(n_positions)
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=n_positions, unit="pos", desc="transcribing", file=sys.stderr, leave=False)
                with MelStream() as mel:
                    for i in range(0, len(padded), piece):
                        t = time.perf_counter()
                        frames = mel.feed(padded[i:i + piece])  # [frames, 128]
                        if i + piece >= len(padded):
                            frames = np.concatenate([frames, mel.finish()])
                        mel_s += time.perf_counter() - t
                        session.push_mel(frames)
                        session.decode(wait=False)  # ids arrive a chunk late; the GPU never waits for the host
                        if bar is not None:
                            bar.n = min(session.next_pos, n_positions)
                            bar.refresh()
                        if session.done:
                            break
                session.decode()
                steps = max(session.next_pos - len(session.prompt_ids) + 1, 0)
        finally:
            if session is not None:
                session.release()  # the GPU buffers of this transcription (the bind-group cache would keep them)
            if bar is not None:
                bar.close()
        t_end = time.perf_counter()
        ids, probs = session.generated, session.generated_probs
        words, segments = timed_text(self.tokenizer, ids, duration_s=len(samples) / audio_mod.SAMPLE_RATE,
                                     token_probs=probs)
        return Transcription(
            text=self.tokenizer.decode(ids).strip(), token_ids=list(ids),
            duration_s=len(samples) / audio_mod.SAMPLE_RATE, transcription_delay_ms=delay_ms,
            timings={"mel_s": mel_s, "model_s": t_end - t0 - mel_s, "steps": steps},
            words=words, segments=segments, token_probs=list(probs),
        )

    def transcribe_many(self, audios, *, transcription_delay_ms: int | None = None, progress: bool | None = None,
                        max_streams: int | None = None) -> list[Transcription]:
        """Transcribe many recordings through the shared batches of an :class:`~voxtral_wgpu.Engine`
        made for the call (``max_streams`` at a time, default: as many as there are recordings, at
        most 64); one Transcription per input, in order, each equal to :meth:`transcribe`'s."""
        from .engine import Engine
        from .engine.core import DEFAULT_MAX_STREAMS

        audios = list(audios)
        if not audios:
            return []
        with Engine(self, max_streams=max_streams or min(len(audios), DEFAULT_MAX_STREAMS)) as engine:
            return engine.transcribe_many(audios, transcription_delay_ms=transcription_delay_ms, progress=progress)

    # streaming entry points (voxtral_wgpu/stream.py)
    def create_stream(self, *, transcription_delay_ms: int | None = None) -> Stream:
        """Open a :class:`~voxtral_wgpu.stream.Stream`: ``feed(samples)`` 16 kHz mono audio in chunks of
        any size, get :class:`~voxtral_wgpu.stream.TextDelta` events back, ``finish()`` at the end.
        After ``finish()`` its ``token_ids`` equal ``transcribe()``'s on the same audio."""
        return Stream(self, transcription_delay_ms)

    def transcribe_stream(self, chunks, *, transcription_delay_ms: int | None = None) -> Iterator[TextDelta]:
        """Generator form of :meth:`create_stream`: yields the deltas of each chunk of ``chunks`` as
        it is fed, then those of ``finish()``; its return value is the final Transcription."""
        return transcribe_stream(self, chunks, transcription_delay_ms=transcription_delay_ms)


def resolve_model_path(path: str | os.PathLike | None, *, offline: bool | None = None,
                       progress: bool | None = None) -> Path:
    """A model directory, a .gguf file, or a HF repo id (``ORG/NAME``, ``ORG/NAME:FILE.gguf``) fetched
    into the HF cache on first use (:mod:`voxtral_wgpu.hub`; ``offline``: the cache only)."""
    if path is None:
        path = DEFAULT_REPO
    p = Path(os.fsdecode(path)).expanduser()
    if not p.exists() and p.with_name(p.name + ".part-000").is_file():
        return p.with_name(p.name + ".part-000")  # NAME.gguf given, its byte shards on disk
    if p.is_dir() and not (p / "consolidated.safetensors").exists():
        ggufs = sorted(p.glob("*.gguf")) or sorted(p.glob("*.gguf.part-000"))
        if ggufs:
            return ggufs[0]  # e.g. a Hugging Face snapshot holding only a GGUF
    if p.exists():
        return p
    s = os.fsdecode(path)
    from . import hub

    spec = hub.parse_model_spec(s)
    if spec is not None:
        return hub.fetch(*spec, offline=offline, progress=progress)
    raise FileNotFoundError(f"model path {p} does not exist")


def load(path: str | os.PathLike | None = None, *, transcription_delay_ms: int | None = None,
         tokenizer: str | os.PathLike | None = None, gpu: Gpu | None = None, progress: bool | None = None,
         embeddings: str | None = None, kv_cache: str | None = None, offline: bool | None = None) -> Model:
    """Load a Voxtral Mini 4B Realtime checkpoint onto the GPU.

    ``path``: a Mistral-native directory (params.json, consolidated.safetensors in BF16,
    tekken.json), a ``.gguf`` file, or a Hugging Face repo id (default
    ``mistralai/Voxtral-Mini-4B-Realtime-2602``; ``ORG/NAME:FILE.gguf`` picks a GGUF), fetched into
    the Hugging Face cache on first use; ``offline=True`` (or HF_HUB_OFFLINE=1) reads the cache
    only. ``transcription_delay_ms``: the default delay of this model's transcriptions (None:
    tekken.json's, 480 ms). ``tokenizer``: tekken.json when it does not sit beside the weights.
    ``embeddings`` (GGUF only): "gpu" gathers input embeddings on the GPU (default), "cpu"
    dequantises the rows with the C extension as the browser build does.
    ``kv_cache``: "f32" or "f16" storage of the attention caches (default: f32 for BF16 weights,
    which keeps float32 parity with the reference; f16 for GGUF models, halving session memory)."""
    if transcription_delay_ms is not None:
        audio_mod.delay_ms_to_tokens(transcription_delay_ms)  # validate before reading gigabytes
    if kv_cache is not None and kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_TYPES)}, not {kv_cache!r}")
    root = resolve_model_path(path, offline=offline, progress=progress)
    if gpu is None:
        gpu = Gpu()
    if root.is_file() or root.name.endswith(".gguf.part-000"):
        from .gguf_loader import load_gguf  # Q4_0 / Q8_0 path

        weights, tok_path = load_gguf(gpu, root, tokenizer=tokenizer, progress=progress, embeddings=embeddings)
        tok = Tekken.from_file(tok_path)
    else:
        if embeddings not in (None, "gpu"):
            raise ValueError(f"embeddings={embeddings!r} applies to GGUF models only ({root} is a BF16 checkpoint, "
                             "whose input embeddings are always gathered on the GPU)")
        tok_path = Path(tokenizer) if tokenizer is not None else root / "tekken.json"
        cfg = ModelConfig.from_file(root / "params.json")
        tok = Tekken.from_file(tok_path)  # fail on a missing tokenizer before reading gigabytes
        bar = _progress_bar(progress, "loading")
        weights = load_safetensors(gpu, root, cfg, progress=bar)
        if bar is not None:
            bar.close()
    if tok.vocab_size != weights.cfg.decoder.vocab_size:
        raise ValueError(f"{tok_path}: vocabulary of {tok.vocab_size} ids, but the model has "
                         f"{weights.cfg.decoder.vocab_size} embedding rows")
    return Model(gpu, weights, tok, transcription_delay_ms=transcription_delay_ms, kv_cache=kv_cache)


class _Bar:
    def __init__(self, desc):
        from tqdm import tqdm

        self.t = tqdm(desc=desc, unit="tensor", file=sys.stderr, leave=False)

    def __call__(self, done, total):
        self.t.total = total
        self.t.n = done
        if done == total or done % 16 == 0:
            self.t.refresh()

    def close(self):
        self.t.close()


def _progress_bar(progress: bool | None, desc: str):
    if progress is None:
        progress = sys.stderr.isatty()
    return _Bar(desc) if progress else None

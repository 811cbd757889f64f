"""The ``stream`` and ``listen`` commands (wired into ``voxtral-wgpu`` by ``cli.py``).

    voxtral-wgpu stream AUDIO --model PATH [--realtime] [--transcription-delay-ms N] [--chunk-ms 80]
    voxtral-wgpu listen --model PATH [--device N] [--transcription-delay-ms N]

``stream`` reads a file in blocks (constant memory for any length) and feeds it through
``Model.create_stream`` — the same code path as live input — printing each text delta with its
time in the audio; ``--realtime`` paces the feeding at the audio's own speed, so the printed
latencies are what a live source would see. ``listen`` streams the default microphone through
``sounddevice`` (optional: ``pip install voxtral_wgpu[mic]``) and prints text as it comes; Ctrl-C
ends the stream (the last words are flushed). After the model emits end-of-stream it opens a new
stream and goes on listening.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import time
from pathlib import Path

import numpy as np

from . import audio as audio_mod
from .cli_support import PROG, bounded_float, check_output_file, interrupts
from .subtitles import FORMATS, format_timestamp, write_transcript

CHUNK_MS_RANGE = (1.0, 60_000.0)  # one ms (16 samples) to a minute of audio per feed() call


def add_stream_commands(subparsers) -> None:
    """Add ``stream`` and ``listen`` to an ``argparse`` subparsers object; each sets ``func``
    (called as ``func(args) -> int``)."""
    p = subparsers.add_parser("stream", help="transcribe a file through the streaming path, printing text as it comes",
                              description="Feed an audio file through a live stream (same code as `listen`); "
                                          "print each text delta with its time in the audio.")
    p.add_argument("audio", help="audio file (anything libsndfile reads; resampled to 16 kHz mono)")
    _common(p)
    p.add_argument("--realtime", action="store_true", help="pace the feeding at real time (as a live source)")
    p.add_argument("--chunk-ms", type=bounded_float(*CHUNK_MS_RANGE, "ms"), default=80.0,
                   help="audio per feed() call in ms (default 80)")
    p.add_argument("--text-only", action="store_true", help="print the running text instead of timed deltas")
    p.add_argument("--output", "-o", help="also write the transcript to this file (replaced if it exists; "
                                          "after Ctrl-C it holds the text so far)")
    p.add_argument("--output-format", "-f", choices=FORMATS, default=None,
                   help="format of --output (default: from its extension, else txt)")
    p.set_defaults(func=cmd_stream, ctrl_c_exits=True)

    q = subparsers.add_parser("listen", help="transcribe the default microphone live",
                              description="Stream the microphone (sounddevice) and print the text as it comes. "
                                          "Ctrl-C to stop.")
    _common(q)
    q.add_argument("--device", default=None, help="input device index or name (default: the system's default)")
    q.add_argument("--chunk-ms", type=bounded_float(*CHUNK_MS_RANGE, "ms"), default=80.0,
                   help="audio per feed() call in ms (default 80)")
    q.set_defaults(func=cmd_listen, ctrl_c_exits=True)


def _common(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_args

    add_model_args(p)


def _load(args):
    from .cli import load_model

    return load_model(args)  # load() validates the delay before reading gigabytes


# ------------------------------------------------------------------------------------------------
# stream FILE
# ------------------------------------------------------------------------------------------------
def file_chunks(path: str | os.PathLike, chunk_samples: int):
    """Yield float32 16 kHz mono chunks of ``chunk_samples`` (the last may be shorter) from a file,
    reading it block by block. 16 kHz files give exactly ``audio.load_audio``'s samples; other
    rates go through soxr's streaming resampler (HQ), which can differ from the one-shot resampling
    of ``load_audio`` by rounding."""
    import soundfile as sf

    path = Path(os.fsdecode(path))
    if not path.exists():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        f = sf.SoundFile(path)
    except (sf.SoundFileError, RuntimeError, TypeError) as e:
        raise audio_mod.AudioError(f"cannot decode audio file {path}: {e}") from e
    with f:
        resampler = None
        if f.samplerate != audio_mod.SAMPLE_RATE:
            import soxr

            resampler = soxr.ResampleStream(f.samplerate, audio_mod.SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        pending = np.zeros(0, np.float32)
        block = max(1024, int(chunk_samples * f.samplerate / audio_mod.SAMPLE_RATE))
        while True:
            data = f.read(block, dtype="float32", always_2d=True)
            last = len(data) < block
            x = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
            if resampler is not None:
                x = resampler.resample_chunk(np.ascontiguousarray(x), last=last)
            pending = np.concatenate([pending, x])
            while len(pending) >= chunk_samples:
                yield pending[:chunk_samples]
                pending = pending[chunk_samples:]
            if last:
                break
        if len(pending):
            yield pending


def cmd_stream(args) -> int:
    """Exit status 0, or 130 after Ctrl-C: the feeding stops at the next chunk, the stream is
    finished (its last words printed) and ``--output`` written with the text so far. A second
    Ctrl-C leaves at once."""
    if not Path(args.audio).is_file():
        raise FileNotFoundError(f"audio file not found: {args.audio}")
    out_path = fmt = None
    if args.output:  # checked before loading gigabytes: never the input itself, never a directory
        out_path = check_output_file(args.output, inputs=[args.audio], what="--output")
        fmt = args.output_format or _format_from_name(args.output)
    model = _load(args)
    chunk = max(1, int(round(args.chunk_ms * audio_mod.SAMPLE_RATE / 1000.0)))
    out = sys.stdout
    t0 = time.perf_counter()
    fed = 0

    def show(deltas):
        for d in deltas:
            if args.text_only:
                out.write(d.text)
            else:
                out.write(f"[{format_timestamp(d.start, decimal='.')} --> {format_timestamp(d.end, decimal='.')}]"
                          f" {d.text}\n")
        out.flush()

    with interrupts.deferred():
        stream = model.create_stream(transcription_delay_ms=args.transcription_delay_ms)
        try:
            for x in file_chunks(args.audio, chunk):
                if interrupts.requested:
                    break
                fed += len(x)
                if args.realtime:  # this chunk "arrives" once its last sample has been spoken
                    _sleep_until(t0 + fed / audio_mod.SAMPLE_RATE)
                show(stream.feed(x))
            show(stream.finish())
        finally:
            stream.close()
        if args.text_only:
            out.write("\n")
            out.flush()
        wall = time.perf_counter() - t0
        result = stream.result()
        lat = result.timings
        med, p90 = lat.get("latency_median_s"), lat.get("latency_p90_s")
        msg = (f"{result.duration_s:.1f} s of audio in {wall:.1f} s "
               f"({result.duration_s / max(wall, 1e-9):.2f}x real time)")
        if med is not None:
            msg += f"; token latency median {1000 * med:.0f} ms, p90 {1000 * p90:.0f} ms"
        print(msg, file=sys.stderr)
        if out_path is not None:
            write_transcript(result, fmt, out_path)
    if interrupts.requested:
        print(f"{PROG}: interrupted" + (f"; {args.output} holds the text so far" if out_path else ""),
              file=sys.stderr)
        return 130
    return 0


def _sleep_until(deadline: float) -> None:
    """Sleep in short steps, so that Ctrl-C (deferred to a flag) stops a long wait promptly."""
    while not interrupts.requested:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def _format_from_name(name: str) -> str:
    ext = Path(name).suffix.lower().lstrip(".")
    return ext if ext in FORMATS else "txt"


# ------------------------------------------------------------------------------------------------
# listen
# ------------------------------------------------------------------------------------------------
class MicrophoneError(RuntimeError):
    pass


def _import_sounddevice():
    try:
        import sounddevice as sd
    except ImportError:
        raise MicrophoneError("`listen` needs the optional package sounddevice: pip install 'voxtral_wgpu[mic]' "
                              "(or pip install sounddevice)") from None
    except OSError as e:  # the wheel is there but the PortAudio library is not
        raise MicrophoneError(f"sounddevice cannot load PortAudio ({e}); install it, e.g. "
                              "apt-get install libportaudio2") from None
    return sd


def open_microphone(device=None, chunk_ms: float = 80.0):
    """``(sounddevice.InputStream, queue of float32 16 kHz mono chunks)``; the stream is not started.
    Opens at 16 kHz when the device takes it, else at its default rate with soxr resampling."""
    sd = _import_sounddevice()
    if isinstance(device, str) and device.isdigit():
        device = int(device)
    try:
        info = sd.query_devices(device, kind="input")
    except Exception as e:  # sounddevice.PortAudioError / ValueError: no such (input) device
        raise MicrophoneError(f"no audio input device{'' if device is None else f' {device!r}'} found ({e}); "
                              "list them with: python -m sounddevice") from None
    rate = audio_mod.SAMPLE_RATE
    try:
        sd.check_input_settings(device=device, channels=1, samplerate=rate, dtype="float32")
    except Exception:
        rate = int(info["default_samplerate"])
    resampler = None
    if rate != audio_mod.SAMPLE_RATE:
        import soxr

        resampler = soxr.ResampleStream(rate, audio_mod.SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    q: queue.Queue = queue.Queue()

    def callback(indata, frames, time_info, status):  # PortAudio's thread: copy and hand over only
        q.put(indata[:, 0].copy())

    try:
        mic = sd.InputStream(device=device, channels=1, samplerate=rate, dtype="float32",
                             blocksize=max(1, int(rate * chunk_ms / 1000.0)), callback=callback)
    except Exception as e:
        raise MicrophoneError(f"cannot open the audio input {info.get('name', device)!r}: {e}") from None
    if resampler is not None:
        raw = q
        q = _ResamplingQueue(raw, resampler)
    return mic, q


class _ResamplingQueue:
    def __init__(self, raw: queue.Queue, resampler):
        self.raw, self.resampler = raw, resampler

    def get(self, timeout=None):
        return self.resampler.resample_chunk(self.raw.get(timeout=timeout))


def cmd_listen(args) -> int:
    try:
        mic, chunks = open_microphone(args.device, args.chunk_ms)
    except MicrophoneError as e:
        print(f"voxtral-wgpu listen: {e}", file=sys.stderr)
        return 2
    model = _load(args)
    out = sys.stdout
    print("listening... (Ctrl-C to stop)", file=sys.stderr)
    stream = model.create_stream(transcription_delay_ms=args.transcription_delay_ms)
    # Ctrl-C is how listening ends: it sets a flag (see main) that the loop sees within 0.1 s, and
    # the stream is finished normally; a KeyboardInterrupt covers callers that did not install that
    try:
        with interrupts.deferred(), mic:
            while not interrupts.requested:
                try:
                    x = chunks.get(timeout=0.1)
                except queue.Empty:
                    continue
                for d in stream.feed(x):
                    out.write(d.text)
                out.flush()
                if stream.eos:  # the model closed its transcript: start a fresh one and keep listening
                    for d in stream.finish():
                        out.write(d.text)
                    out.write("\n")
                    stream = model.create_stream(transcription_delay_ms=args.transcription_delay_ms)
    except KeyboardInterrupt:
        pass
    with interrupts.deferred():
        for d in stream.finish():
            out.write(d.text)
        out.write("\n")
        out.flush()
    return 0

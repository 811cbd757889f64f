"""Audio input: loading, conversion to 16 kHz mono float32, and the offline padding.

What reaches the model (spec §3.1): mono (mean of channels), 16 kHz (soxr "HQ", as in
mistral-common and antirez's Python reference), float32. No pre-emphasis, dither, clipping or gain
normalisation: the reference pipeline has none.

The decoder runs at 12.5 Hz: one position covers 80 ms = 1280 samples = 8 mel frames = 4 encoder
frames. Offline (whole-file) transcription pads the waveform with silence (spec §3.2,
mistral-common ``tokens/tokenizers/audio.py`` ``AudioEncoder._get_streaming_pad``).
"""

from __future__ import annotations

import errno
import math
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "SAMPLE_RATE", "HOP_LENGTH", "N_FFT", "N_MELS", "SAMPLES_PER_TOKEN", "MS_PER_TOKEN",
    "LEFT_PAD_TOKENS", "RIGHT_PAD_EXTRA_TOKENS", "MIN_DELAY_MS", "MAX_DELAY_MS", "DEFAULT_DELAY_MS",
    "AudioError", "delay_ms_to_tokens", "padding", "pad_audio", "load_audio", "snap_to_int16",
]  # fmt: skip

SAMPLE_RATE = 16000  # Hz
HOP_LENGTH = 160  # samples = 10 ms between mel frames -> 100 frames/s
N_FFT = 400  # samples = 25 ms STFT window
N_MELS = 128
SAMPLES_PER_TOKEN = 1280  # 80 ms = 1 decoder position = 8 mel frames = 4 encoder frames
MS_PER_TOKEN = 80  # 1000 * SAMPLES_PER_TOKEN / SAMPLE_RATE
LEFT_PAD_TOKENS = 32  # 40960 samples (2.56 s) of silence before the audio
RIGHT_PAD_EXTRA_TOKENS = 10  # mistral-common OFFLINE_STREAMING_BUFFER_TOKENS ("max word length")
MIN_DELAY_MS = 80  # n_delay = 1
MAX_DELAY_MS = 2400  # n_delay = 30
DEFAULT_DELAY_MS = 480  # n_delay = 6 (tekken.json transcription_delay_ms)


class AudioError(ValueError):
    """An audio file could not be decoded."""


# ---- delay and padding ----------------------------------------------------------------------


def delay_ms_to_tokens(ms: float) -> int:
    """Transcription delay in ms -> ``n_delay`` decoder positions (80 -> 1, 480 -> 6, 2400 -> 30).

    The model was trained for delays that are whole positions (multiples of 80 ms) from 80 to 2400 ms
    (spec §6.4; mistral-common asserts ``transcription_delay_ms % frame_duration_ms == 0``).
    """
    if isinstance(ms, bool) or not isinstance(ms, (int, float, np.integer, np.floating)):
        raise TypeError(f"delay must be a number of milliseconds, got {type(ms).__name__}")
    if not (MIN_DELAY_MS <= ms <= MAX_DELAY_MS and ms % MS_PER_TOKEN == 0):
        raise ValueError(
            f"invalid transcription delay {ms} ms: it must be a multiple of {MS_PER_TOKEN} ms between "
            f"{MIN_DELAY_MS} and {MAX_DELAY_MS} ms (80, 160, ..., 2400; default {DEFAULT_DELAY_MS})"
        )
    return int(ms) // MS_PER_TOKEN


def padding(n_samples: int, n_delay: int, n_left_pad_tokens: int = LEFT_PAD_TOKENS) -> tuple[int, int]:
    """Zero samples to add (left, right) around ``n_samples`` of 16 kHz audio for offline decoding.

    left  = n_left_pad_tokens * 1280                     (40960: "gives the model more compute")
    right = (align to a multiple of 1280) + (n_delay + 1 + 10) * 1280
            (the delayed text, the BOS offset, and a 10-position buffer for the last word)

    Equals mistral-common ``AudioEncoder._get_streaming_pad``. The padded length is a multiple of
    1280; it gives ``n_left_pad_tokens + ceil(n_samples / 1280) + n_delay + 11`` decoder positions.
    """
    n = _non_negative_int(n_samples, "n_samples")
    d = _non_negative_int(n_delay, "n_delay")
    n_left = _non_negative_int(n_left_pad_tokens, "n_left_pad_tokens")
    align = (SAMPLES_PER_TOKEN - n % SAMPLES_PER_TOKEN) % SAMPLES_PER_TOKEN
    right = align + (d + 1 + RIGHT_PAD_EXTRA_TOKENS) * SAMPLES_PER_TOKEN
    return n_left * SAMPLES_PER_TOKEN, right


def pad_audio(x: np.ndarray, n_delay: int, n_left_pad_tokens: int = LEFT_PAD_TOKENS) -> np.ndarray:
    """``x`` (n,) float32 16 kHz -> (left + n + right,) float32 with the :func:`padding` zeros."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"pad_audio expects mono audio of shape (n,), got shape {x.shape}")
    left, right = padding(x.shape[0], n_delay, n_left_pad_tokens)
    return np.pad(x, (left, right))


def _non_negative_int(value: Any, name: str) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


# ---- loading ---------------------------------------------------------------------------------


def load_audio(audio: str | os.PathLike[str] | np.ndarray, *, sample_rate: float | None = None) -> np.ndarray:
    """Load or convert audio to what the model takes: shape (n,), float32, mono, 16 kHz.

    ``audio`` is either

    * a file path (str or os.PathLike): decoded by libsndfile via soundfile (WAV, FLAC, OGG/Vorbis,
      Opus, MP3, ... whatever its build supports), channels averaged, resampled to 16 kHz with
      soxr "HQ". ``sample_rate`` must not be given (the file header has it). An empty file (0
      frames) returns an empty array; deciding what that means is up to the caller. A file whose
      data section is cut short yields the samples that are present (libsndfile's behaviour).
    * a 1-D numpy array of samples (a list of numbers is accepted too and read as floats) at
      ``sample_rate`` Hz (default 16000; resampled when different). Float arrays are taken as
      [-1, 1] full scale; integer PCM is scaled: int8 / 128, int16 / 32768, int32 / 2**31,
      uint8 (x - 128) / 128. Other integer widths are refused (their scale is ambiguous).

    Samples are not clipped or normalised. The result is a new array (never a view of the input).

    Raises:
        FileNotFoundError: the path does not exist.
        AudioError (a ValueError): the file cannot be decoded; the message names it.
        ValueError: multi-channel arrays, a bad sample rate, or NaN/Inf samples (counted, with
            the first index; they are never silently replaced).
        TypeError: anything that is not a path or an array of numbers (bytes, None, ...).
    """
    if isinstance(audio, (str, os.PathLike)):
        if sample_rate is not None:
            raise ValueError("sample_rate= applies to arrays only; a file's rate comes from its header")
        return _load_file(Path(os.fsdecode(audio)))
    if isinstance(audio, (bytes, bytearray, memoryview)):
        raise TypeError("load_audio() got raw bytes; pass a file path or a numpy array of samples "
                        "(e.g. decode the bytes with soundfile.read(io.BytesIO(data)))")
    if isinstance(audio, (list, tuple)):
        try:
            audio = np.asarray(audio, dtype=np.float64)
        except (TypeError, ValueError) as e:
            kind = type(audio).__name__
            raise TypeError(f"load_audio() got a {kind} that is not a flat sequence of numbers: {e}") from e
    if not isinstance(audio, np.ndarray):
        raise TypeError(f"load_audio() expects a file path (str or os.PathLike) or a 1-D numpy array, "
                        f"got {type(audio).__name__}")
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio of shape (n,), got an array of shape {audio.shape}; "
                         "mix channels first, e.g. x.mean(axis=1) for shape (n, channels)")
    x = _to_float32(audio)
    _check_finite(x, "audio array")
    return _resample(x, SAMPLE_RATE if sample_rate is None else _check_rate(sample_rate))


def _load_file(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "audio file not found", str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "expected an audio file, got a directory", str(path))
    try:
        # always_2d: (frames, channels) even for mono; float32 scales PCM by 1/32768 etc. (libsndfile)
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError) as e:
        raise AudioError(f"cannot decode audio file {path}: {e}") from e
    x = np.ascontiguousarray(data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0])
    _check_finite(x, f"audio file {path}")
    return _resample(x, sr)


def _to_float32(x: np.ndarray) -> np.ndarray:
    """Samples of any supported dtype -> float32 full scale [-1, 1] (new array)."""
    kind, size = x.dtype.kind, x.dtype.itemsize
    if kind == "f":
        with np.errstate(over="ignore"):  # values beyond float32 become Inf, reported by _check_finite
            return x.astype(np.float32)  # astype copies
    if kind == "i" and size in (1, 2, 4):
        return (x.astype(np.float64) / float(2 ** (8 * size - 1))).astype(np.float32)
    if kind == "u" and size == 1:
        return ((x.astype(np.float64) - 128.0) / 128.0).astype(np.float32)
    raise TypeError(f"unsupported sample dtype {x.dtype}: use float (full scale [-1, 1]) or "
                    "int8 / int16 / int32 / uint8 PCM")


def _check_finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"{what} has {int(bad.sum())} non-finite sample(s) (NaN or Inf), the first at "
                         f"index {int(np.argmax(bad))}")


def _check_rate(sample_rate: Any) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"sample_rate must be a number in Hz, got {type(sample_rate).__name__}")
    if not (math.isfinite(sample_rate) and sample_rate > 0):
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
    return sample_rate


def _resample(x: np.ndarray, sr: float) -> np.ndarray:
    """(n,) float32 at ``sr`` Hz -> (≈ n * 16000 / sr,) float32 at 16 kHz (soxr "HQ", as mistral-common)."""
    if sr == SAMPLE_RATE or x.shape[0] == 0:
        return x
    return np.asarray(soxr.resample(x, sr, SAMPLE_RATE, quality="HQ"), dtype=np.float32)


def snap_to_int16(x: np.ndarray) -> np.ndarray:
    """Round samples to the 16-bit PCM grid: ``clip(round(x * 32768), -32768, 32767) / 32768``.

    The HF offline processor sends audio through a PCM_16 WAV (mistral-common
    ``Audio.to_base64("wav")``) but the streaming path does not, so tests snap their audio to make
    both paths see identical samples: snapped audio survives that round trip unchanged. (For
    off-grid input libsndfile's own float -> int16 step may differ by one step, e.g. 1.2.2 floors.)
    """
    x = np.asarray(x, dtype=np.float64)
    return (np.clip(np.round(x * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)

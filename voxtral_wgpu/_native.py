"""numpy front end of voxtral_wgpu's C helpers (csrc/), loaded with cffi in ABI mode.

Functions:
    log_mel(samples)               -> float32 [floor(n/160), 128]  (time-major log-mel, spec section 3.3)
    MelStream()                    -> incremental log-mel, frames bit-identical to log_mel (spec section 3.4)
    q4_0_rows(blocks, n_cols, ids) -> float32 [len(ids), n_cols]   (GGML Q4_0 rows, spec section 8.3)
    q8_0_rows(blocks, n_cols, ids) -> float32 [len(ids), n_cols]   (GGML Q8_0 rows)

Where the shared library is looked for, in order:
    1. $VOXTRAL_WGPU_NATIVE (a path to the library file itself)
    2. next to this file (regular and editable pip installs put it there / make it visible there)
    3. the package directories of ``voxtral_wgpu.__path__`` (scikit-build-core's editable redirect)
    4. <source checkout>/build/ (``cmake -S . -B build && cmake --build build``)
The C declarations are read from voxtral_native.h, installed next to the library (or csrc/ in a checkout).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

import numpy as np

__all__ = [
    "MelStream",
    "N_MEL",
    "HOP",
    "log_mel",
    "log_mel_num_frames",
    "mel_filterbank",
    "q4_0_rows",
    "q8_0_rows",
    "f16_to_f32",
    "library_path",
]

_ABI_VERSION = 1
N_MEL = 128
HOP = 160
_Q4_0_BYTES = 18
_Q8_0_BYTES = 34
_QK = 32

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent

_ERRORS = {
    -1: "invalid argument",
    -2: "n_cols must be a positive multiple of 32",
    -3: "row id out of range",
    -4: "stream already finished",
    -5: "output buffer too small",
    -6: "out of memory",
}


def _lib_names() -> list[str]:
    if sys.platform == "win32":
        return ["voxtral_native.dll", "libvoxtral_native.dll"]
    if sys.platform == "darwin":
        return ["libvoxtral_native.dylib", "libvoxtral_native.so"]
    return ["libvoxtral_native.so"]


def _candidate_dirs() -> list[Path]:
    dirs = [_HERE]
    pkg = sys.modules.get(__package__ or "voxtral_wgpu")
    for p in list(getattr(pkg, "__path__", []) or []):
        dirs.append(Path(p))
    dirs.append(_REPO / "build")
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def _find_library() -> Path:
    env = os.environ.get("VOXTRAL_WGPU_NATIVE")
    if env:
        p = Path(env)
        if not p.is_file():
            raise ImportError(
                f"VOXTRAL_WGPU_NATIVE={env!r} does not name an existing file "
                "(it must be the path of the built libvoxtral_native shared library)"
            )
        return p
    for d in _candidate_dirs():
        for name in _lib_names():
            if (d / name).is_file():
                return d / name
    raise ImportError(
        "voxtral_wgpu's C extension was not found; reinstall with `pip install .` (or "
        "`pip install --no-build-isolation -e .`) from the voxtral_wgpu source tree, or build it with "
        "`cmake -S . -B build && cmake --build build` and/or point VOXTRAL_WGPU_NATIVE at "
        f"the library file. Looked for {_lib_names()} in: " + ", ".join(str(d) for d in _candidate_dirs())
    )


def _find_header(lib: Path) -> Path:
    for p in (lib.parent / "voxtral_native.h", _HERE / "voxtral_native.h", _REPO / "csrc" / "voxtral_native.h"):
        if p.is_file():
            return p
    raise ImportError(
        f"voxtral_native.h was not found next to {lib} nor in the source checkout; reinstall voxtral_wgpu "
        "with `pip install .`"
    )


def _cdef_text(header: Path) -> str:
    text = header.read_text(encoding="utf-8")
    m = re.search(r"CFFI-CDEF BEGIN[^\n]*\n(.*?)\n[^\n]*CFFI-CDEF END", text, re.S)
    if not m:
        raise ImportError(f"{header}: CFFI-CDEF markers not found")
    return re.sub(r"\bVX_API\b", "", m.group(1))


_state: dict = {}
_lock = threading.Lock()


def _load():
    """Return (ffi, lib), loading the library on first use."""
    st = _state.get("v")
    if st is not None:
        return st
    with _lock:
        st = _state.get("v")
        if st is not None:
            return st
        import cffi

        path = _find_library()
        ffi = cffi.FFI()
        ffi.cdef(_cdef_text(_find_header(path)))
        try:
            lib = ffi.dlopen(str(path))
        except OSError as e:
            raise ImportError(f"voxtral_wgpu's C extension at {path} could not be loaded: {e}") from e
        ver = lib.vx_native_abi_version()
        if ver != _ABI_VERSION:
            raise ImportError(
                f"voxtral_wgpu's C extension at {path} has ABI version {ver}, expected {_ABI_VERSION}; "
                "it is stale: rebuild/reinstall with pip install ."
            )
        _state["v"] = (ffi, lib, path)
        return _state["v"]


def library_path() -> Path:
    """Path of the loaded shared library (loads it if needed)."""
    return _load()[2]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise RuntimeError(f"{what} failed: {_ERRORS.get(int(rc), 'error')} (code {rc})")
    return rc


def _ptr(ffi, ctype: str, arr: np.ndarray):
    return ffi.cast(ctype, arr.ctypes.data) if arr.size else ffi.NULL


# --------------------------------------------------------------------------------------------------------------
# log-mel
# --------------------------------------------------------------------------------------------------------------
def _as_samples(samples, what: str = "samples", check_finite: bool = True) -> np.ndarray:
    a = np.asarray(samples)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of mono 16 kHz samples, got shape {a.shape}")
    if a.dtype != np.float32:
        if a.size == 0 or np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
        else:
            # integer PCM is refused rather than silently taken at face value (int16 would be 32768x too loud)
            raise ValueError(
                f"{what} must be float32 in [-1, 1] (got dtype {a.dtype}); convert PCM first, e.g. x / 32768"
            )
    a = np.ascontiguousarray(a)
    if check_finite and a.size and not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return a


def log_mel_num_frames(n_samples: int) -> int:
    """Frames log_mel produces for n samples: floor(n / 160)."""
    if n_samples < 0:
        raise ValueError("n_samples must be >= 0")
    return int(n_samples) // HOP


def log_mel(samples) -> np.ndarray:
    """Voxtral log-mel of a whole signal (spec 3.3): float32 [floor(n/160), 128], time-major.

    samples: 1-D mono float32 at 16 kHz (other float dtypes are converted), all finite.
    Same as HF VoxtralRealtimeFeatureExtractor(...)["input_features"][0].T, computed in float64.
    """
    ffi, lib, _ = _load()
    x = _as_samples(samples)
    n_frames = x.size // HOP
    out = np.empty((n_frames, N_MEL), dtype=np.float32)
    if n_frames == 0:
        return out
    rc = lib.vx_log_mel(_ptr(ffi, "float *", x), x.size, _ptr(ffi, "float *", out))
    _check(rc, "vx_log_mel")
    assert rc == n_frames
    return out


def mel_filterbank() -> np.ndarray:
    """The 128 x 201 Slaney mel filterbank (float64) used by log_mel."""
    ffi, lib, _ = _load()
    out = np.empty((N_MEL, 201), dtype=np.float64)
    _check(lib.vx_mel_filterbank(ffi.cast("double *", out.ctypes.data)), "vx_mel_filterbank")
    return out


class MelStream:
    """Incremental log-mel over one growing signal (spec 3.4).

    feed(samples) returns the frames that became computable ([k, 128] float32, k may be 0); finish() returns the
    remaining frames (right edge reflected). The concatenation of everything returned equals
    log_mel(all samples) bit for bit, whatever the chunking. Feed left-pad zeros yourself if you want them.
    Memory stays bounded (a fixed 64 KiB sample buffer). Use as a context manager or call close().
    """

    def __init__(self):
        ffi, lib, _ = _load()
        self._ffi = ffi
        self._lib = lib
        p = lib.vx_mel_stream_new()
        if p == ffi.NULL:
            raise MemoryError("vx_mel_stream_new failed")
        self._p = p
        self._closed = False

    # lifetime -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the C context (idempotent)."""
        p = getattr(self, "_p", None)
        if p is not None:
            self._p = None
            self._closed = True
            self._lib.vx_mel_stream_free(p)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "MelStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self):
        if self._p is None:
            raise RuntimeError("MelStream is closed")
        return self._p

    # work ---------------------------------------------------------------------------------------------------
    def feed(self, samples) -> np.ndarray:
        """Append samples; return the newly complete frames as float32 [k, 128]."""
        p = self._handle()
        if self._lib.vx_mel_stream_is_finished(p):
            raise RuntimeError("MelStream.feed() called after finish(): the stream has ended; create a new MelStream")
        x = _as_samples(samples)
        ffi, lib = self._ffi, self._lib
        k = _check(lib.vx_mel_stream_frames_for_feed(p, x.size), "vx_mel_stream_frames_for_feed")
        out = np.empty((k, N_MEL), dtype=np.float32)
        rc = lib.vx_mel_stream_feed(p, _ptr(ffi, "float *", x), x.size, _ptr(ffi, "float *", out), k)
        _check(rc, "vx_mel_stream_feed")
        assert rc == k
        return out

    def finish(self) -> np.ndarray:
        """End the signal; return the remaining frames as float32 [k, 128]. Further feed()/finish() raise."""
        p = self._handle()
        if self._lib.vx_mel_stream_is_finished(p):
            raise RuntimeError("MelStream.finish() called twice: the stream has already ended")
        ffi, lib = self._ffi, self._lib
        k = _check(lib.vx_mel_stream_frames_for_finish(p), "vx_mel_stream_frames_for_finish")
        out = np.empty((k, N_MEL), dtype=np.float32)
        rc = lib.vx_mel_stream_finish(p, _ptr(ffi, "float *", out), k)
        _check(rc, "vx_mel_stream_finish")
        assert rc == k
        return out

    # introspection ------------------------------------------------------------------------------------------
    @property
    def samples_fed(self) -> int:
        return int(self._lib.vx_mel_stream_samples_fed(self._handle()))

    @property
    def frames_emitted(self) -> int:
        return int(self._lib.vx_mel_stream_frames_emitted(self._handle()))

    @property
    def finished(self) -> bool:
        return bool(self._lib.vx_mel_stream_is_finished(self._handle()))

    @property
    def buffer_capacity(self) -> int:
        """Size of the C sample buffer, in samples (constant)."""
        return int(self._lib.vx_mel_stream_buffer_capacity(self._handle()))

    @property
    def buffered(self) -> int:
        """Samples currently retained for future frames (< 400 between calls)."""
        return int(self._lib.vx_mel_stream_buffered(self._handle()))

    def frames_ready_after(self, n_more: int) -> int:
        """How many frames feed() would return for n_more more samples."""
        return int(_check(self._lib.vx_mel_stream_frames_for_feed(self._handle(), int(n_more)), "frames_for_feed"))


# --------------------------------------------------------------------------------------------------------------
# GGML rows
# --------------------------------------------------------------------------------------------------------------
def _rows(blocks, n_cols, ids, block_bytes: int, fn_name: str, what: str) -> np.ndarray:
    ffi, lib, _ = _load()
    n_cols = int(n_cols)
    if n_cols <= 0 or n_cols % _QK:
        raise ValueError(f"{what}: n_cols must be a positive multiple of 32, got {n_cols}")
    row_bytes = n_cols // _QK * block_bytes
    b = np.asarray(blocks)
    if b.dtype != np.uint8:
        raise ValueError(f"{what}: blocks must be a uint8 array of raw {what} bytes, got dtype {b.dtype}")
    if b.ndim == 2:
        if b.shape[1] != row_bytes:
            raise ValueError(
                f"{what}: blocks has {b.shape[1]} bytes per row, expected {row_bytes} for n_cols={n_cols}"
            )
    elif b.ndim != 1:
        raise ValueError(f"{what}: blocks must be 1-D (flat) or 2-D [n_rows, row_bytes], got shape {b.shape}")
    if b.size % row_bytes:
        raise ValueError(f"{what}: {b.size} bytes is not a whole number of {row_bytes}-byte rows (n_cols={n_cols})")
    n_rows = b.size // row_bytes
    b = np.ascontiguousarray(b).reshape(-1)

    raw_ids = np.asarray(ids)
    if raw_ids.ndim == 0:
        raw_ids = raw_ids.reshape(1)
    if raw_ids.ndim != 1:
        raise ValueError(f"{what}: ids must be a 1-D sequence of row indices, got shape {raw_ids.shape}")
    if raw_ids.size and not np.issubdtype(raw_ids.dtype, np.integer):
        raise ValueError(f"{what}: ids must be integers, got dtype {raw_ids.dtype}")
    if raw_ids.size:
        lo, hi = int(raw_ids.min()), int(raw_ids.max())
        if lo < 0 or hi >= n_rows:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what}: row id {bad} out of range [0, {n_rows})")
    id32 = np.ascontiguousarray(raw_ids, dtype=np.int32)

    out = np.empty((id32.size, n_cols), dtype=np.float32)
    if id32.size == 0:
        return out
    rc = getattr(lib, fn_name)(
        ffi.cast("uint8_t *", b.ctypes.data), n_rows, n_cols,
        ffi.cast("int32_t *", id32.ctypes.data), id32.size, ffi.cast("float *", out.ctypes.data),
    )
    if rc < 0:
        raise ValueError(f"{what}: {_ERRORS.get(int(rc), 'error')} (code {rc})")
    return out


def q4_0_rows(blocks, n_cols: int, ids) -> np.ndarray:
    """Dequantise rows `ids` of a GGML Q4_0 matrix [n_rows, n_cols] -> float32 [len(ids), n_cols].

    blocks: uint8, flat or [n_rows, n_cols//32*18] (18-byte blocks: f16 scale d, 16 bytes of nibbles).
    """
    return _rows(blocks, n_cols, ids, _Q4_0_BYTES, "vx_q4_0_dequant_rows", "Q4_0")


def q8_0_rows(blocks, n_cols: int, ids) -> np.ndarray:
    """Dequantise rows `ids` of a GGML Q8_0 matrix [n_rows, n_cols] -> float32 [len(ids), n_cols].

    blocks: uint8, flat or [n_rows, n_cols//32*34] (34-byte blocks: f16 scale d, 32 int8).
    """
    return _rows(blocks, n_cols, ids, _Q8_0_BYTES, "vx_q8_0_dequant_rows", "Q8_0")


def f16_to_f32(bits) -> np.ndarray:
    """The C half->float conversion of uint16 bit patterns (exact, NaN payloads kept); same shape as bits."""
    ffi, lib, _ = _load()
    b = np.ascontiguousarray(np.asarray(bits, dtype=np.uint16))
    out = np.empty(b.shape, dtype=np.float32)
    if b.size:
        _check(lib.vx_f16_to_f32_array(ffi.cast("uint16_t *", b.ctypes.data), b.size,
                                       ffi.cast("float *", out.ctypes.data)), "vx_f16_to_f32_array")
    return out

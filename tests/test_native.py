"""Tests of the C helpers (csrc/) through voxtral_wgpu._native.

Every numeric comparison states its tolerance. References:
  - a float64 numpy log-mel written here from the spec (np.fft.rfft, own Slaney filterbank, np.pad reflect)
  - HF transformers' VoxtralRealtimeFeatureExtractor (torch.stft, float32), when installed
  - gguf's numpy quantise/dequantise for Q4_0 / Q8_0 (bit-exact)
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from voxtral_wgpu import _native as N

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover
    HAVE_HYPOTHESIS = False

needs_hypothesis = pytest.mark.skipif(not HAVE_HYPOTHESIS, reason="hypothesis not installed")

SR = 16000
HOP = 160
NFFT = 400
NMEL = 128

# ---------------------------------------------------------------------------------------------------------------
# float64 reference (spec 3.3), independent of the C code
# ---------------------------------------------------------------------------------------------------------------


def _hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    lin = 3.0 * f / 200.0
    log = 15.0 + np.log(np.maximum(f, 1e-300) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    lin = 200.0 * m / 3.0
    log = 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


def ref_filterbank() -> np.ndarray:
    """[128, 201] Slaney-scale, Slaney-normalised triangles over 0..8000 Hz (librosa htk=False norm='slaney')."""
    edges = _mel_to_hz(np.linspace(0.0, float(_hz_to_mel(8000.0)), NMEL + 2))
    fk = np.arange(NFFT // 2 + 1) * (SR / NFFT)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (fk[None, :] - lo) / (mid - lo)
    down = (hi - fk[None, :]) / (hi - mid)
    tri = np.maximum(0.0, np.minimum(up, down))
    return tri * (2.0 / (hi - lo))


_FB = None


def ref_log_mel(x: np.ndarray) -> np.ndarray:
    """float64 log-mel [floor(n/160), 128] with torch.stft(center=True, reflect) semantics, last frame dropped."""
    global _FB
    if _FB is None:
        _FB = ref_filterbank()
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    T = n // HOP
    if T == 0:
        return np.zeros((0, NMEL))
    xp = np.pad(x, NFFT // 2, mode="reflect")
    idx = np.arange(T)[:, None] * HOP + np.arange(NFFT)[None, :]
    win = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(NFFT) / NFFT)
    spec = np.fft.rfft(xp[idx] * win, axis=1)
    power = spec.real**2 + spec.imag**2
    mel = power @ _FB.T
    v = np.maximum(np.log10(np.maximum(mel, 1e-10)), 1.5 - 8.0)
    return (v + 4.0) / 4.0


def int16_grid(rng, n, scale=0.3):
    """Audio that lies on the int16 grid (as decoded PCM does)."""
    v = np.clip(np.round(rng.standard_normal(n) * scale * 32768.0), -32768, 32767)
    return (v / 32768.0).astype(np.float32)


def speechlike(rng, n):
    """Harmonic tone with an envelope and a little noise: a more realistic spectrum than white noise."""
    t = np.arange(n) / SR
    f0 = 120.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)
    ph = 2 * np.pi * np.cumsum(f0) / SR
    y = sum(np.sin(h * ph) / h for h in range(1, 20))
    y *= 0.2 * (0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)) ** 2
    y += 0.002 * rng.standard_normal(n)
    return np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.float32) / 32768.0


# ---------------------------------------------------------------------------------------------------------------
# log-mel, whole signal
# ---------------------------------------------------------------------------------------------------------------


def test_filterbank_matches_reference():
    fb = N.mel_filterbank()
    assert fb.shape == (128, 201)
    # tolerance: 1e-12 relative to the largest weight (both float64, same formula, different op order)
    np.testing.assert_allclose(fb, ref_filterbank(), rtol=0, atol=1e-12 * ref_filterbank().max())


def test_filterbank_matches_hf_mel_filter_bank():
    audio_utils = pytest.importorskip("transformers.audio_utils")
    hf = audio_utils.mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    )  # [201, 128]
    # tolerance: 1e-12 relative (float64 both sides)
    np.testing.assert_allclose(N.mel_filterbank(), hf.T, rtol=0, atol=1e-12 * hf.max())


@pytest.mark.parametrize("n", [160, 199, 200, 201, 401, 1599, 1600, 16000 + 37, 48000 + 159])
@pytest.mark.parametrize("kind", ["gauss", "int16", "speech"])
def test_log_mel_vs_float64_reference(n, kind):
    rng = np.random.default_rng(n * 7 + len(kind))
    if kind == "gauss":
        x = (rng.standard_normal(n) * 0.2).astype(np.float32)
    elif kind == "int16":
        x = int16_grid(rng, n)
    else:
        x = speechlike(rng, n)
    got = N.log_mel(x)
    ref = ref_log_mel(x)
    assert got.shape == (n // 160, 128) and got.dtype == np.float32
    # tolerance: 1e-4 absolute (C is float64 internally; the residual is float32 output rounding ~6e-8)
    assert np.max(np.abs(got - ref)) <= 1e-4
    # and in practice much tighter: a few float32 ulps of values of magnitude <= ~2
    assert np.max(np.abs(got - ref)) <= 1e-6


def test_log_mel_loud_and_quiet_signal():
    rng = np.random.default_rng(5)
    x = np.concatenate([
        np.zeros(3000, np.float32),
        (rng.standard_normal(4000) * 1e-4).astype(np.float32),  # near the -6.5 floor
        np.sign(rng.standard_normal(4000)).astype(np.float32),  # full scale
        np.full(2000, 0.5, np.float32),  # DC
    ])
    # tolerance: 1e-4 absolute
    assert np.max(np.abs(N.log_mel(x) - ref_log_mel(x))) <= 1e-4


def test_silence_is_exactly_minus_0625():
    out = N.log_mel(np.zeros(16000, np.float32))
    assert out.shape == (100, 128)
    assert np.all(out == np.float32(-0.625))  # exact: floor 1e-10 -> -10 -> clamp -6.5 -> (-6.5+4)/4


@pytest.mark.parametrize("n,frames", [(0, 0), (1, 0), (159, 0), (160, 1), (319, 1), (320, 2), (16000, 100)])
def test_frame_counts(n, frames):
    assert N.log_mel(np.zeros(n, np.float32)).shape == (frames, 128)
    assert N.log_mel_num_frames(n) == frames


def test_log_mel_input_validation():
    with pytest.raises(ValueError, match="1-D"):
        N.log_mel(np.zeros((2, 400), np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        N.log_mel(np.array([0.0] * 300 + [np.nan], np.float32))
    with pytest.raises(ValueError, match="float32"):
        N.log_mel(np.zeros(400, np.int16))
    # float64 and non-contiguous inputs are converted
    x = np.random.default_rng(1).standard_normal(2000) * 0.1
    a = N.log_mel(x)
    b = N.log_mel(x.astype(np.float32))
    assert np.array_equal(a, b)
    y = np.random.default_rng(2).standard_normal(4000).astype(np.float32)
    assert np.array_equal(N.log_mel(y[::2]), N.log_mel(np.ascontiguousarray(y[::2])))


def voxtral_pad(audio: np.ndarray) -> np.ndarray:
    """Spec 3.2: 32*1280 zeros left; right zeros to a multiple of 1280 plus 17*1280."""
    L = 1280
    align = (L - audio.size % L) % L
    return np.concatenate([np.zeros(32 * L, np.float32), audio, np.zeros(align + 17 * L, np.float32)])


@pytest.mark.parametrize("n_real", [16000, 23456])
def test_log_mel_vs_hf_feature_extractor(n_real):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    FE = getattr(transformers, "VoxtralRealtimeFeatureExtractor", None)
    if FE is None:
        pytest.skip("this transformers has no VoxtralRealtimeFeatureExtractor")
    rng = np.random.default_rng(n_real)
    audio = np.concatenate([int16_grid(rng, n_real // 2, 0.1), speechlike(rng, n_real - n_real // 2)])
    x = voxtral_pad(audio)
    hf = FE()(x, sampling_rate=16000, return_tensors="np")["input_features"][0]  # [128, T] channel-major
    got = N.log_mel(x)
    assert hf.shape == (128, x.size // 160) == got.T.shape
    # tolerance: 1e-4 absolute (HF runs torch.stft in float32)
    assert np.max(np.abs(got.T - hf)) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# log-mel, incremental
# ---------------------------------------------------------------------------------------------------------------


def stream_frames(x: np.ndarray, sizes) -> np.ndarray:
    """Feed x in chunks of the given sizes (the rest in one last chunk), then finish."""
    out = []
    pos = 0
    with N.MelStream() as s:
        for c in sizes:
            c = min(c, x.size - pos)
            before = s.frames_emitted
            f = s.feed(x[pos:pos + c])
            pos += c
            assert f.shape == (s.frames_emitted - before, 128)
            assert s.samples_fed == pos
            out.append(f)
        out.append(s.feed(x[pos:]))
        out.append(s.finish())
        assert s.samples_fed == x.size
        assert s.frames_emitted == x.size // 160
    return np.concatenate(out, axis=0)


@pytest.mark.parametrize("n", [0, 1, 159, 160, 170, 199, 200, 201, 359, 360, 361, 401, 1599, 16037])
def test_stream_one_sample_feeds_equal_whole(n):
    x = speechlike(np.random.default_rng(n), n) if n else np.zeros(0, np.float32)
    whole = N.log_mel(x)
    got = stream_frames(x, [1] * n)
    # tolerance: exact (bit-identical: same per-frame code on the same samples)
    assert got.shape == whole.shape
    assert np.array_equal(got, whole)


def test_stream_emits_frames_as_soon_as_possible():
    x = speechlike(np.random.default_rng(3), 2000)
    with N.MelStream() as s:
        for n in range(1, x.size + 1):
            s.feed(x[n - 1:n])
            expected = 0 if n < 201 else (n - 40) // 160  # frame t>=1 needs sample 160t+199, frame 0 needs x[200]
            assert s.frames_emitted == expected, n
            assert s.buffered < 400


if HAVE_HYPOTHESIS:

    @needs_hypothesis
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        n=st.integers(min_value=0, max_value=12000),
        sizes=st.lists(st.integers(min_value=0, max_value=5000), min_size=0, max_size=40),
        seed=st.integers(min_value=0, max_value=2**32 - 1),
    )
    def test_stream_any_chunking_equals_whole(n, sizes, seed):
        x = int16_grid(np.random.default_rng(seed), n)
        # tolerance: exact equality
        assert np.array_equal(stream_frames(x, sizes), N.log_mel(x))

    @needs_hypothesis
    @settings(max_examples=30, deadline=None)
    @given(
        n=st.integers(min_value=0, max_value=900),
        sizes=st.lists(st.integers(min_value=0, max_value=3), min_size=0, max_size=400),
    )
    def test_stream_tiny_chunks_equal_whole(n, sizes):
        x = speechlike(np.random.default_rng(n), n) if n else np.zeros(0, np.float32)
        # tolerance: exact equality
        assert np.array_equal(stream_frames(x, sizes), N.log_mel(x))

else:  # pragma: no cover

    @needs_hypothesis
    def test_stream_any_chunking_equals_whole():
        pass


def test_stream_voxtral_padding_matches_offline():
    """The way the pipeline uses it: left-pad zeros, real audio in 1280-sample steps, right pad, finish."""
    rng = np.random.default_rng(11)
    audio = speechlike(rng, 20000)
    x = voxtral_pad(audio)
    sizes = [32 * 1280] + [1280] * (audio.size // 1280 + 1)
    # tolerance: exact equality
    assert np.array_equal(stream_frames(x, sizes), N.log_mel(x))


def test_stream_long_memory_bounded_and_feed_after_finish():
    """10 minutes in 1 s chunks: fixed buffer, < 400 samples retained, frames == whole-signal frames."""
    rng = np.random.default_rng(0)
    chunk = int16_grid(rng, SR, 0.1)
    s = N.MelStream()
    cap = s.buffer_capacity
    assert cap <= 1 << 16
    total = 0
    last = None
    for i in range(600):
        f = s.feed(chunk)
        total += f.shape[0]
        assert s.buffer_capacity == cap
        assert s.buffered < 400
        last = f
    assert s.samples_fed == 600 * SR
    assert total == s.frames_emitted == (600 * SR - 40) // 160
    # the signal is periodic (1 s), so the last feed's frames t = 59899..59998 equal frames 199..298 of three
    # repetitions (all interior frames: they read only x[160t-200 .. 160t+199])
    assert (last.shape[0], (600 * SR - 40) // 160 - last.shape[0]) == (100, 59899)
    ref = N.log_mel(np.tile(chunk, 3))[199:299]
    # tolerance: exact equality
    assert np.array_equal(last, ref)
    rest = s.finish()
    assert rest.shape[0] == 600 * SR // 160 - total
    assert s.frames_emitted == 600 * SR // 160
    with pytest.raises(RuntimeError, match="after finish"):
        s.feed(np.zeros(10, np.float32))
    with pytest.raises(RuntimeError, match="finish"):
        s.finish()
    s.close()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        s.feed(np.zeros(1, np.float32))


def test_stream_many_contexts_do_not_leak():
    """Creating/freeing contexts repeatedly does not grow RSS (C memory is released)."""
    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc")
    x = np.zeros(5000, np.float32)
    for _ in range(200):
        with N.MelStream() as s:
            s.feed(x)
    r0 = rss_kb()
    for _ in range(2000):
        with N.MelStream() as s:
            s.feed(x)
            s.finish()
    # tolerance: < 8 MiB growth for 2000 contexts of ~300 KiB each (a leak would be ~600 MiB)
    assert rss_kb() - r0 < 8 * 1024


# ---------------------------------------------------------------------------------------------------------------
# GGML Q4_0 / Q8_0 rows
# ---------------------------------------------------------------------------------------------------------------

def _gguf():
    g = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType

    return g, GGMLQuantizationType


@pytest.mark.parametrize("qname,fn,bpb", [("Q4_0", N.q4_0_rows, 18), ("Q8_0", N.q8_0_rows, 34)])
@pytest.mark.parametrize("n_rows,n_cols", [(1, 32), (7, 64), (50, 3072), (3, 96)])
def test_rows_match_gguf(qname, fn, bpb, n_rows, n_cols):
    g, Q = _gguf()
    qt = getattr(Q, qname)
    rng = np.random.default_rng(n_rows * 1000 + n_cols)
    x = (rng.standard_normal((n_rows, n_cols)) * rng.uniform(1e-3, 3.0, (n_rows, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (d = 0)
    q = g.quants.quantize(x, qt)
    assert q.dtype == np.uint8 and q.shape == (n_rows, n_cols // 32 * bpb)
    ref = g.quants.dequantize(q, qt).astype(np.float32)
    ids = rng.integers(0, n_rows, size=11)
    ids[0] = n_rows - 1
    # tolerance: exact (bit-identical)
    for blocks in (q, q.reshape(-1)):
        got = fn(blocks, n_cols, ids)
        assert got.shape == (ids.size, n_cols) and got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), ref[ids].view(np.uint32))
    assert np.array_equal(fn(q, n_cols, list(range(n_rows))), ref)
    assert fn(q, n_cols, []).shape == (0, n_cols)


@pytest.mark.parametrize("qname,fn", [("Q4_0", N.q4_0_rows), ("Q8_0", N.q8_0_rows)])
def test_rows_special_scales(qname, fn):
    """Scales that are subnormal, inf or NaN halves: same float32 bits as gguf's numpy dequantiser."""
    g, Q = _gguf()
    qt = getattr(Q, qname)
    bpb = 18 if qname == "Q4_0" else 34
    rng = np.random.default_rng(9)
    scales = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x8201, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E00,
                       0x7C01, 0xFE55], dtype=np.uint16)
    blocks = rng.integers(0, 256, size=(scales.size, bpb), dtype=np.uint8)
    blocks[:, :2] = scales.view(np.uint8).reshape(-1, 2)
    with np.errstate(invalid="ignore"):  # inf * 0 in the reference
        ref = g.quants.dequantize(blocks, qt).reshape(scales.size, 32).astype(np.float32)
    got = fn(blocks, 32, np.arange(scales.size))
    # tolerance: exact, NaN compared by position (payload propagation through multiply is platform-defined)
    nan = np.isnan(ref)
    assert np.array_equal(nan, np.isnan(got))
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def test_f16_to_f32_all_65536_patterns():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    got = N.f16_to_f32(bits)
    # tolerance: exact bit patterns (NaN payloads included)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("fn,bpb", [(N.q4_0_rows, 18), (N.q8_0_rows, 34)])
def test_rows_bad_arguments(fn, bpb):
    blocks = np.zeros((4, 2 * bpb), np.uint8)
    with pytest.raises(ValueError, match="out of range"):
        fn(blocks, 64, [0, 4])
    with pytest.raises(ValueError, match="out of range"):
        fn(blocks, 64, [-1])
    with pytest.raises(ValueError, match="multiple of 32"):
        fn(blocks, 48, [0])
    with pytest.raises(ValueError, match="bytes per row"):
        fn(blocks, 32, [0])
    with pytest.raises(ValueError, match="whole number"):
        fn(blocks.reshape(-1)[:-1], 64, [0])
    with pytest.raises(ValueError, match="uint8"):
        fn(blocks.astype(np.int16), 64, [0])
    with pytest.raises(ValueError, match="integers"):
        fn(blocks, 64, [0.5])


def test_c_level_row_id_error_code():
    """The C function itself rejects out-of-range ids (error code, nothing written)."""
    ffi, lib, _ = N._load()
    blocks = np.zeros(18 * 2, np.uint8)
    ids = np.array([0, 2], np.int32)
    out = np.full((2, 32), 7.0, np.float32)
    rc = lib.vx_q4_0_dequant_rows(ffi.cast("uint8_t *", blocks.ctypes.data), 2, 32,
                                  ffi.cast("int32_t *", ids.ctypes.data), 2, ffi.cast("float *", out.ctypes.data))
    assert rc == lib.VX_ERR_ROW_ID
    assert np.all(out == 7.0)
    assert lib.vx_q8_0_dequant_rows(ffi.NULL, 0, 33, ffi.NULL, 0, ffi.NULL) == lib.VX_ERR_SHAPE


# ---------------------------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------------------------


def test_missing_library_message(tmp_path):
    code = (
        "import os, pytest\n"
        "os.environ['VOXTRAL_WGPU_NATIVE'] = %r\n"
        "from voxtral_wgpu import _native\n"
        "try:\n"
        "    _native.log_mel(__import__('numpy').zeros(400, 'float32'))\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n" % str(tmp_path / "nope.so")
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "ERR" in r.stdout and "does not name an existing file" in r.stdout


def test_not_found_message(monkeypatch):
    monkeypatch.delenv("VOXTRAL_WGPU_NATIVE", raising=False)
    monkeypatch.setattr(N, "_candidate_dirs", lambda: [])
    with pytest.raises(ImportError, match="C extension was not found; reinstall with `pip install"):
        N._find_library()


def test_stream_single_huge_feed_equals_whole():
    """One feed much larger than the internal buffer is processed through it in pieces."""
    x = int16_grid(np.random.default_rng(4), 10 * SR + 123, 0.1)
    with N.MelStream() as s:
        assert x.size > 4 * s.buffer_capacity
        a = s.feed(x)
        assert s.buffered < 400
        b = s.finish()
    # tolerance: exact equality
    assert np.array_equal(np.concatenate([a, b]), N.log_mel(x))


def test_speed_smoke():
    """One minute of audio well under a second (1 h measured ~3 s on a 2-core dev box)."""
    import time

    x = int16_grid(np.random.default_rng(0), 60 * SR, 0.1)
    t = time.perf_counter()
    out = N.log_mel(x)
    dt = time.perf_counter() - t
    assert out.shape == (6000, 128)
    assert dt < 2.0, dt
    assert math.isfinite(float(out.sum()))


def test_c_level_stream_error_codes():
    """C API: too-small output buffer consumes nothing; feed/finish after finish return VX_ERR_FINISHED."""
    ffi, lib, _ = N._load()
    s = lib.vx_mel_stream_new()
    try:
        x = np.ones(1000, np.float32)
        out = np.zeros((10, 128), np.float32)
        xp, op = ffi.cast("float *", x.ctypes.data), ffi.cast("float *", out.ctypes.data)
        assert lib.vx_mel_stream_frames_for_feed(s, 1000) == (1000 - 40) // 160
        assert lib.vx_mel_stream_feed(s, xp, 1000, op, 5) == lib.VX_ERR_CAPACITY
        assert lib.vx_mel_stream_samples_fed(s) == 0 and lib.vx_mel_stream_frames_emitted(s) == 0
        assert lib.vx_mel_stream_feed(s, xp, 1000, op, 6) == 6
        assert lib.vx_mel_stream_frames_for_finish(s) == 0
        assert lib.vx_mel_stream_feed(s, xp, 0, ffi.NULL, 0) == 0  # empty feed
        assert lib.vx_mel_stream_feed(s, xp, -1, op, 10) == lib.VX_ERR_ARG
        assert lib.vx_mel_stream_finish(s, op, 10) == 0
        assert lib.vx_mel_stream_is_finished(s) == 1
        assert lib.vx_mel_stream_feed(s, xp, 10, op, 10) == lib.VX_ERR_FINISHED
        assert lib.vx_mel_stream_finish(s, op, 10) == lib.VX_ERR_FINISHED
    finally:
        lib.vx_mel_stream_free(s)
    lib.vx_mel_stream_free(ffi.NULL)
    assert lib.vx_log_mel(ffi.NULL, -1, ffi.NULL) == lib.VX_ERR_ARG
    assert lib.vx_log_mel(ffi.NULL, 100, ffi.NULL) == 0

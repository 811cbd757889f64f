"""voxtral_wgpu.audio: loading/conversion and the offline padding (vs mistral-common)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.audio import (
    AudioConfig,
    AudioEncoder,
    AudioSpectrogramConfig,
    SpecialAudioIDs,
    TranscriptionFormat,
)

from voxtral_wgpu import audio
from voxtral_wgpu.audio import AudioError, delay_ms_to_tokens, load_audio, pad_audio, padding, snap_to_int16

VALID_DELAYS_MS = list(range(80, 2401, 80))


def mc_encoder() -> AudioEncoder:
    """mistral-common's encoder with the realtime tekken.json audio section (spec §1.4)."""
    cfg = AudioConfig(
        sampling_rate=16000,
        frame_rate=12.5,
        encoding_config=AudioSpectrogramConfig(num_mel_bins=128, hop_length=160, window_size=400),
        transcription_format=TranscriptionFormat.STREAMING,
        transcription_delay_ms=480,
        streaming_look_ahead_ms=2.5,
        streaming_look_back_ms=52.5,
        streaming_n_left_pad_tokens=32,
    )
    return AudioEncoder(cfg, SpecialAudioIDs(audio=None, begin_audio=None, streaming_pad=32,
                                             text_to_audio=None, audio_to_text=None))


MC = mc_encoder()


def test_constants() -> None:
    assert (audio.SAMPLE_RATE, audio.HOP_LENGTH, audio.N_FFT, audio.N_MELS) == (16000, 160, 400, 128)
    assert audio.SAMPLES_PER_TOKEN == 1280 == 8 * audio.HOP_LENGTH == MC.audio_config.raw_audio_length_per_tok
    assert (audio.LEFT_PAD_TOKENS, audio.RIGHT_PAD_EXTRA_TOKENS) == (32, 10)


# ---- delay and padding -----------------------------------------------------------------------


def test_delay_ms_to_tokens() -> None:
    assert [delay_ms_to_tokens(m) for m in (80, 480, 2400, 480.0, np.int64(960))] == [1, 6, 30, 6, 12]
    for ms in VALID_DELAYS_MS:  # same as mistral-common's get_num_delay_tokens
        assert delay_ms_to_tokens(ms) == MC.audio_config.get_num_delay_tokens(ms)
    for bad in (0, 40, 100, 479.5, 2480, -80, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="multiple of 80 ms between 80 and 2400"):
            delay_ms_to_tokens(bad)
    for bad in ("480", None, True):
        with pytest.raises(TypeError):
            delay_ms_to_tokens(bad)  # type: ignore[arg-type]


def test_padding_hand_values() -> None:
    assert padding(16000, 6) == (40960, 22400)  # spec §3.2: align 640 + 17 * 1280
    assert padding(0, 6) == (40960, 21760)
    assert padding(1280, 1) == (40960, 12 * 1280)
    assert padding(1, 30) == (40960, 1279 + 41 * 1280)
    assert padding(100, 6, n_left_pad_tokens=0) == (0, 1180 + 17 * 1280)


def test_padding_matches_mistral_common() -> None:
    rng = np.random.default_rng(0)
    ns = [*range(0, 2600), *rng.integers(0, 10**7, 300).tolist()]
    for ms in VALID_DELAYS_MS:
        d = delay_ms_to_tokens(ms)
        for n in ns:
            assert padding(n, d) == MC._get_streaming_pad(n, transcription_delay_ms=ms), (n, ms)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 10**8), ms=st.sampled_from(VALID_DELAYS_MS))
def test_padding_property(n: int, ms: int) -> None:
    d = delay_ms_to_tokens(ms)
    left, right = padding(n, d)
    assert (left, right) == MC._get_streaming_pad(n, transcription_delay_ms=ms)
    total = left + n + right
    assert total % 1280 == 0 and total // 1280 == 32 + -(-n // 1280) + d + 11


def test_padding_errors() -> None:
    with pytest.raises(ValueError, match="n_samples"):
        padding(-1, 6)
    with pytest.raises(ValueError, match="n_delay"):
        padding(10, -1)
    with pytest.raises(TypeError, match="n_samples"):
        padding(10.5, 6)  # type: ignore[arg-type]


def test_pad_audio() -> None:
    x = np.linspace(-1, 1, 3000, dtype=np.float32)
    y = pad_audio(x, 6)
    left, right = padding(3000, 6)
    assert y.dtype == np.float32 and y.shape == (left + 3000 + right,) and y.shape[0] % 1280 == 0
    assert not y[:left].any() and not y[left + 3000:].any()
    np.testing.assert_array_equal(y[left:left + 3000], x)
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        pad_audio(np.zeros((10, 2), np.float32), 6)


# ---- files -----------------------------------------------------------------------------------


def tone(n: int, sr: int, freq: float, amp: float = 0.4, phase: float = 0.0) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(n) / sr + phase)


def test_wav_stereo_44k(tmp_path: Path) -> None:
    n, sr = 44100, 44100
    stereo = np.stack([tone(n, sr, 440), tone(n, sr, 1000, 0.2)], axis=1)
    pcm = np.round(stereo * 32767).astype(np.int16)
    p = tmp_path / "stereo.wav"
    sf.write(p, pcm, sr, subtype="PCM_16")
    x = load_audio(p)
    assert x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous
    assert abs(x.shape[0] - n * 16000 / sr) <= 1
    mono = (pcm.astype(np.float32) / 32768).mean(axis=1)  # mean of channels, then soxr HQ
    np.testing.assert_allclose(x, soxr.resample(mono, sr, 16000, quality="HQ"), atol=1e-6)
    assert load_audio(str(p)).shape == x.shape


def test_wav_16k_int16_round_trips_exactly(tmp_path: Path) -> None:
    pcm = np.random.default_rng(1).integers(-32768, 32768, 12345).astype(np.int16)
    p = tmp_path / "a.wav"
    sf.write(p, pcm, 16000, subtype="PCM_16")
    x = load_audio(p)
    np.testing.assert_array_equal(x, pcm.astype(np.float32) / 32768)
    np.testing.assert_array_equal(x, load_audio(pcm))  # the same array given directly


def test_flac(tmp_path: Path) -> None:
    pcm = np.round(tone(24000, 24000, 300)[:, None] * 32767).astype(np.int16)
    p = tmp_path / "a.flac"
    sf.write(p, pcm, 24000)
    x = load_audio(p)
    assert abs(x.shape[0] - 16000) <= 1
    np.testing.assert_allclose(x, soxr.resample(pcm[:, 0] / 32768, 24000, 16000, quality="HQ"), atol=1e-6)


def test_ogg(tmp_path: Path) -> None:
    n, sr = 48000, 48000
    stereo = np.stack([tone(n, sr, 500), tone(n, sr, 500)], axis=1).astype(np.float32)
    p = tmp_path / "a.ogg"
    sf.write(p, stereo, sr)  # Vorbis: lossy, so only compare loosely
    x = load_audio(p)
    assert abs(x.shape[0] - n * 16000 / sr) <= 1
    ref = tone(16000, 16000, 500)
    assert np.corrcoef(x[800:-800], ref[800:-800])[0, 1] > 0.99


def test_mp3_if_supported(tmp_path: Path) -> None:
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no MP3 support")
    n, sr = 44100, 44100
    p = tmp_path / "a.mp3"
    sf.write(p, np.stack([tone(n, sr, 440)] * 2, axis=1).astype(np.float32), sr)
    x = load_audio(p)
    assert abs(x.shape[0] - 16000) < 16000 * 0.05 and x.dtype == np.float32


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.wav"
    sf.write(p, np.zeros((0, 2), np.int16), 44100, subtype="PCM_16")
    x = load_audio(p)
    assert x.shape == (0,) and x.dtype == np.float32


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wav"
    with pytest.raises(FileNotFoundError) as e:
        load_audio(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(IsADirectoryError):
        load_audio(tmp_path)

    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(2).bytes(5000))
    with pytest.raises(AudioError, match="cannot decode audio file") as e2:
        load_audio(junk)
    assert str(junk) in str(e2.value) and isinstance(e2.value, ValueError)

    good = tmp_path / "good.wav"
    sf.write(good, np.zeros(16000, np.int16), 16000, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(good.read_bytes()[:20])  # ends inside the header
    with pytest.raises(AudioError, match="cut.wav"):
        load_audio(cut)
    # A cut inside the data section is tolerated by libsndfile: the samples present come back.
    cut.write_bytes(good.read_bytes()[:44 + 2 * 1000])
    assert load_audio(cut).shape == (1000,)

    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(good, sample_rate=16000)


def test_nan_in_float_file(tmp_path: Path) -> None:
    x = np.zeros(1000, np.float32)
    x[[10, 20]] = np.nan
    p = tmp_path / "nan.wav"
    sf.write(p, x, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="2 non-finite sample.*index 10") as e:
        load_audio(p)
    assert str(p) in str(e.value)


# ---- arrays ----------------------------------------------------------------------------------


def test_integer_arrays() -> None:
    np.testing.assert_array_equal(load_audio(np.array([-32768, 0, 16384, 32767], np.int16)),
                                  np.array([-1, 0, 0.5, 32767 / 32768], np.float32))
    np.testing.assert_array_equal(load_audio(np.array([-2**31, 2**30], np.int32)), np.array([-1, 0.5], np.float32))
    np.testing.assert_array_equal(load_audio(np.array([0, 128, 192], np.uint8)), np.array([-1, 0, 0.5], np.float32))
    np.testing.assert_array_equal(load_audio(np.array([-128, 64], np.int8)), np.array([-1, 0.5], np.float32))
    for dtype in (np.int64, np.uint16, np.bool_, np.complex64):
        with pytest.raises(TypeError, match="dtype"):
            load_audio(np.zeros(4, dtype))


def test_float_arrays() -> None:
    x64 = np.array([0.25, -0.5, 1.5])
    y = load_audio(x64)
    assert y.dtype == np.float32 and y.tolist() == [0.25, -0.5, 1.5]  # not clipped
    x32 = np.array([0.1, 0.2], np.float32)
    y = load_audio(x32)
    y[0] = 9
    assert x32[0] == np.float32(0.1)  # the result never aliases the input
    assert load_audio([0.5, -0.5]).tolist() == [0.5, -0.5]
    assert load_audio(np.zeros(0)).shape == (0,)


def test_array_resampling() -> None:
    x = tone(8000, 8000, 200).astype(np.float32)
    y = load_audio(x, sample_rate=8000)
    assert abs(y.shape[0] - 16000) <= 1 and y.dtype == np.float32
    np.testing.assert_array_equal(load_audio(x, sample_rate=16000), x)
    assert abs(load_audio(x, sample_rate=44100.0).shape[0] - 8000 * 16000 / 44100) <= 1
    for bad in (0, -16000, float("nan")):
        with pytest.raises(ValueError, match="sample_rate"):
            load_audio(x, sample_rate=bad)
    with pytest.raises(TypeError, match="sample_rate"):
        load_audio(x, sample_rate="16000")  # type: ignore[arg-type]


def test_non_finite_array() -> None:
    x = np.zeros(100, np.float32)
    x[[5, 7, 99]] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match="3 non-finite sample.*index 5"):
        load_audio(x)
    with pytest.raises(ValueError, match="non-finite"):
        load_audio(np.array([0.0, 1e300]))  # overflows float32


def test_shape_and_type_errors() -> None:
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        load_audio(np.zeros((100, 2), np.float32))
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        load_audio(np.array(0.5))  # 0-d
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        load_audio([[0.1, 0.2], [0.3, 0.4]])  # type: ignore[arg-type]
    for bad in (b"RIFF....", bytearray(4), None, 3.0, {"a": 1}):
        with pytest.raises(TypeError):
            load_audio(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of numbers"):
        load_audio(["a", "b"])  # type: ignore[list-item]


def test_path_like(tmp_path: Path) -> None:
    class P(os.PathLike):
        def __fspath__(self) -> str:
            return str(tmp_path / "p.wav")

    sf.write(tmp_path / "p.wav", np.array([1, 2, 3], np.int16), 16000, subtype="PCM_16")
    assert load_audio(P()).tolist() == [1 / 32768, 2 / 32768, 3 / 32768]


def test_snap_to_int16(tmp_path: Path) -> None:
    x = np.array([0.0, 0.5, -1.0, 1.0, 2.0, -3.0, 1.4 / 32768, 32767.6 / 32768])
    np.testing.assert_array_equal(snap_to_int16(x), np.array([0, 0.5, -1, 32767 / 32768, 32767 / 32768, -1,
                                                              1 / 32768, 32767 / 32768], np.float32))
    r = np.random.default_rng(3).uniform(-1.2, 1.2, 5000)
    s = snap_to_int16(r)
    assert s.dtype == np.float32
    np.testing.assert_array_equal(snap_to_int16(s), s)
    # Snapped audio passes a float -> PCM_16 WAV round trip (mistral-common's to_base64) unchanged.
    p = tmp_path / "q.wav"
    sf.write(p, s, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(p), s)
    # Off-grid input: libsndfile (1.2.2 here) rounds differently (floor) for about half the samples,
    # but never by more than one step.
    sf.write(p, r.astype(np.float32), 16000, subtype="PCM_16")
    assert np.abs(load_audio(p) - s).max() <= 1 / 32768

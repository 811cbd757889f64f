"""Browser build: the page's token ids (web/model.js over the same shaders/*.wgsl) equal the Python
implementation's on the same audio, and its mel (web/mel.js) equals the C extension's, for a tiny Q4_0
model, in headless Debian chromium with the SwiftShader WebGPU adapter (no browser driver: the page
POSTs its result to the test server)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="needs Debian chromium (apt-get install chromium)")


def test_page_ids_and_mel_equal_python(tmp_path):
    sys.path.insert(0, str(ROOT / "web" / "test"))
    from make_fixture import build
    from run_browser import run_page

    exp = build(tmp_path)
    r = run_page(tmp_path, "test/test.html?return_mel=1&shard_checks=1", timeout=150)
    assert r["errors"] == []
    # fetchShards against sizes that do not match the file: clear errors, never short weights
    short, long_ = r["shard_checks"]
    assert "more than the" in short and "truncated or changed download" in short, short
    assert "bytes of the" in long_ and "truncated or changed download" in long_, long_
    mel = np.fromfile(tmp_path / "mel.f32", "<f4")
    js = np.asarray(r["mel"], np.float32)
    assert js.shape == mel.shape
    assert float(np.abs(js - mel).max()) <= 1e-4
    assert r["ids"] == exp["ids"] and len(exp["ids"]) > 0
    print(json.dumps({k: r[k] for k in ("adapter", "load_s", "decode_s", "steps")}))


def test_page_streaming_ids_equal_python(tmp_path):
    """The microphone path minus the worklet: MelStream (bounded memory) + a streaming Session fed
    uneven chunks give the same ids as Python's offline transcription. Both sides split the weights
    for a 64 KiB binding limit (as the 4B model's 131072-row embedding table must be split under
    WebGPU's default 128 MiB; here the 72 KiB Q4 embedding table and the f32 conv weights split): the
    page's row chunks mirror Python's."""
    sys.path.insert(0, str(ROOT / "web" / "test"))
    from make_fixture import build
    from run_browser import run_page

    import voxtral_wgpu
    from voxtral_wgpu.gpu import Gpu

    build(tmp_path)
    max_binding = 65536
    r = run_page(tmp_path, f"test/test.html?stream=1&max_binding={max_binding}", timeout=150)
    assert r["errors"] == []
    gpu = Gpu()
    gpu.max_binding = max_binding
    model = voxtral_wgpu.load(tmp_path / "model.gguf", gpu=gpu, progress=False)
    tok_chunks = len(model.weights.tok_embeddings.chunks)
    assert r["tok_chunks"] == tok_chunks >= 2
    tr = model.transcribe(np.fromfile(tmp_path / "audio.f32", "<f4"))
    want = tr.token_ids
    assert r["ids"] == want and len(want) > 0
    # each id's probability from the same argmax kernel (another GPU: equal to float rounding)
    assert r["probs"] == pytest.approx(tr.token_probs, rel=1e-4)
    assert 0 < r["kept_samples"] <= 2000  # the stream kept only a window of samples, not the whole signal


def test_page_microphone_worklet_ids_equal_python(tmp_path):
    """The page's microphone path itself (web/mic.js: getUserMedia -> AudioWorklet -> MelStream ->
    streaming Session) on Chromium's fake capture device playing the fixture audio: its ids equal
    Python's offline transcription of exactly the samples the worklet delivered (the browser resamples
    the file to the 16 kHz AudioContext, so those samples, not the file's, are the reference)."""
    import soundfile as sf

    sys.path.insert(0, str(ROOT / "web" / "test"))
    from make_fixture import build
    from run_browser import run_page

    import voxtral_wgpu

    build(tmp_path)
    audio = np.fromfile(tmp_path / "audio.f32", "<f4")
    wav = tmp_path / "mic.wav"
    sf.write(wav, audio, 16000, subtype="PCM_16")
    flags = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required"]
    r = run_page(tmp_path, "test/test.html?mic=2.5", timeout=180, extra_flags=flags)
    assert r["errors"] == []
    got = np.asarray(r["mic_samples"], np.float32)
    assert len(got) >= 2.5 * 16000 and float(np.abs(got).max()) > 0.01  # real audio came through the worklet
    want = voxtral_wgpu.load(tmp_path / "model.gguf", progress=False).transcribe(got).token_ids
    assert r["ids"] == want and len(want) > 0


def test_page_file_upload_ids_equal_python(tmp_path):
    """The page's file-upload path (web/upload.js: decodeAudioData straight to 16 kHz, channels
    averaged, offline transcription). A 16 kHz mono float WAV decodes to exactly the samples Python's
    loader reads and gives Python's ids for that file (Chromium scales PCM16 by 1/32767 where
    soundfile uses 1/32768, so an integer file differs by up to half a step); a 44.1 kHz stereo PCM16
    WAV (the browser resamples,
    with its own resampler rather than soxr) gives Python's ids on exactly the samples the browser
    decoded, and those are the expected length and close to Python's own decoding of the file."""
    import soundfile as sf
    import soxr

    sys.path.insert(0, str(ROOT / "web" / "test"))
    from make_fixture import build
    from run_browser import run_page

    import voxtral_wgpu
    from voxtral_wgpu.audio import load_audio

    build(tmp_path)
    audio = np.fromfile(tmp_path / "audio.f32", "<f4")
    sf.write(tmp_path / "mono16k.wav", audio, 16000, subtype="FLOAT")
    x44 = soxr.resample(audio, 16000, 44100)
    sf.write(tmp_path / "stereo44k.wav", np.stack([x44, 0.6 * x44[::-1]], axis=1), 44100, subtype="PCM_16")
    r = run_page(tmp_path, "test/test.html?upload=mono16k.wav,stereo44k.wav", timeout=200)
    assert r["errors"] == []
    mono, stereo = r["uploads"]
    model = voxtral_wgpu.load(tmp_path / "model.gguf", progress=False)

    np.testing.assert_array_equal(np.asarray(mono["samples"], np.float32), load_audio(tmp_path / "mono16k.wav"))
    want = model.transcribe(tmp_path / "mono16k.wav").token_ids
    assert mono["ids"] == want and len(want) > 0

    got = np.asarray(stereo["samples"], np.float32)
    py = load_audio(tmp_path / "stereo44k.wav")
    assert abs(len(got) - len(py)) <= 1, (len(got), len(py))
    n = min(len(got), len(py))
    rel = float(np.sqrt(np.mean((got[:n] - py[:n]) ** 2) / np.mean(py[:n] ** 2)))
    print(json.dumps({"stereo_rel_rms_vs_soxr": rel, "decode_s": [u["decode_s"] for u in r["uploads"]],
                      "load_s": r.get("load_s")}))
    assert rel < 0.05, rel
    assert stereo["ids"] == model.transcribe(got).token_ids and len(stereo["ids"]) > 0

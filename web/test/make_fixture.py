"""Build the browser test fixture: a tiny random Q4_0 GGUF model + tekken.json, test audio, and the
Python implementation's mel and token ids on that audio (the page must reproduce them).

    python web/test/make_fixture.py OUT_DIR
writes OUT_DIR/{model.gguf, tekken.json, audio.f32, expected.json, mel.f32}."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def build(out: Path, seconds: float = 2.0) -> dict:
    from hf_reference import TINY_SW, build_model, synth_audio

    import voxtral_wgpu
    from voxtral_wgpu import audio as audio_mod
    from voxtral_wgpu._native import log_mel
    from voxtral_wgpu.quantize import quantize

    out.mkdir(parents=True, exist_ok=True)
    # every matrix row a whole number of Q4 blocks; the encoder's w2 (K = 544 > ops.MATMUL_SPLIT_K)
    # takes the split-K matmul in the page too
    spec = TINY_SW.replace(dec_dim=64, enc_hidden=544)
    with tempfile.TemporaryDirectory() as tmp:
        ref = build_model(spec, Path(tmp), delay_ms=480)
        shutil.copy(ref.out_dir / "tekken.json", out / "tekken.json")
        quantize(ref.out_dir, out / "model.gguf", qtype="q4_0")
    samples = synth_audio(seconds)
    samples.astype("<f4").tofile(out / "audio.f32")
    model = voxtral_wgpu.load(out / "model.gguf")
    res = model.transcribe(samples, stop_on_eos=True)
    n_delay = audio_mod.delay_ms_to_tokens(model.default_delay_ms)
    left, right = audio_mod.padding(len(samples), n_delay, model.n_left_pad)
    mel = log_mel(np.concatenate([np.zeros(left, np.float32), samples, np.zeros(right, np.float32)]))
    mel.astype("<f4").tofile(out / "mel.f32")
    exp = {"ids": [int(i) for i in res.token_ids], "text": res.text, "mel_shape": list(mel.shape),
           "n_samples": int(len(samples))}
    (out / "expected.json").write_text(json.dumps(exp))
    return exp


if __name__ == "__main__":
    e = build(Path(sys.argv[1]))
    print(json.dumps({k: v for k, v in e.items()}))

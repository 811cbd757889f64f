"""CPU smoke tests of ``python -m voxtral_wgpu.bench`` on a tiny synthetic model, and its synthetic
quantised weights against a real GGUF's."""

import dataclasses
import json
import math

import numpy as np
import pytest

TINY_PARAMS = {
    "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2,
    "vocab_size": 1300, "sliding_window": 30, "rope_theta": 1e6, "norm_eps": 1e-5,
    "multimodal": {"whisper_model_args": {
        "encoder_args": {"dim": 48, "n_layers": 2, "head_dim": 16, "hidden_dim": 80, "n_heads": 3, "n_kv_heads": 3,
                         "sliding_window": 40, "audio_encoding_args": {"num_mel_bins": 128}},
        "downsample_args": {"downsample_factor": 4}}},
}
KEYS = ("adapter", "weights", "weights_dtype", "kv_cache", "load_s", "weight_bytes", "encoder_ms_per_audio_s",
        "encoder_ms_per_audio_s_1.5s", "encoder_ms_per_audio_s_4s", "prefill_ms", "step_ms_median", "step_ms_p90", "step_ms_pipelined", "tokens_per_s", "rtf_1.5s", "steps_1.5s",
        "gpu_peak_bytes_1.5s", "step_ms_at_1min", "dec_kv_bytes_at_1min", "step_ms_at_60min", "dec_kv_bytes_at_60min",
        "stream_latency_ms_median", "stream_latency_ms_p90", "gpu_bytes", "host_rss_bytes")


def run_bench(tmp_path, capsys, *extra):
    from voxtral_wgpu import bench

    params = tmp_path / "params.json"
    params.write_text(json.dumps(TINY_PARAMS))
    assert bench.main(["--params", str(params), "--seconds", "1.5", "--steps", "3", "--encoder-seconds", "1.5", "4",
                       "--json", *extra]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out.strip().splitlines()[-1])
    for key in KEYS:
        assert key in res, key
        if isinstance(res[key], (int, float)):
            assert math.isfinite(res[key]), (key, res[key])
    assert res["steps_1.5s"] > 0 and res["tokens_per_s"] > 0 and res["gpu_bytes"] > 0
    # the transcription holds the weights and its session's buffers at once
    assert res["gpu_peak_bytes_1.5s"] > res["weight_bytes"] > 0
    assert res["dec_kv_bytes_at_60min"] >= res["dec_kv_bytes_at_1min"] > 0
    assert res["encoder_ms_per_audio_s"] == res["encoder_ms_per_audio_s_1.5s"] > 0
    runs = res["step_ms_pipelined_runs"]
    assert len(runs) == 3 and res["step_ms_pipelined"] == sorted(runs)[1] > 0
    return res, err


@pytest.mark.gpu
def test_bench_runs_and_reports_every_row(tmp_path, capsys):
    res, _ = run_bench(tmp_path, capsys)
    assert res["weights"] == "synthetic-bf16" and res["weights_dtype"] == "bf16"


@pytest.mark.gpu
def test_bench_q4_0_with_hf_ratios(tmp_path, capsys, monkeypatch):
    from voxtral_wgpu import bench

    def fake_hf(seconds_list, log=print):  # the HF peer needs CUDA: only the ratio lines are checked here
        return {"device": "stub", "dtype": "bf16", **{f"rtf_{s:g}s": 1.0 for s in seconds_list},
                **{f"gpu_peak_bytes_{s:g}s": 2**30 for s in seconds_list}}

    monkeypatch.setattr(bench, "compare_hf", fake_hf)
    res, err = run_bench(tmp_path, capsys, "--dtype", "q4_0", "--compare-hf")
    assert res["weights"] == "synthetic-q4_0" and res["weights_dtype"] == "q4_0"
    assert res["hf"]["device"] == "stub"
    assert "vs HF (bf16) at 1.5 s, voxtral_wgpu q4_0: speed-up" in err and "peak GPU memory" in err


def _kind(gpu, x):
    """What a Weights field is, everything but its values: types, dtypes, shapes, chunking, sizes."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return ("ndarray", x.dtype.str, x.shape)
    if isinstance(x, (list, tuple)):
        return [_kind(gpu, v) for v in x]
    if dataclasses.is_dataclass(x) and hasattr(x, "chunks"):
        d = {f.name: getattr(x, f.name) for f in dataclasses.fields(x) if not f.name.startswith("_")}
        d["chunks"] = [(b.size, r0, nr) for b, r0, nr in x.chunks]
        return (type(x).__name__, {k: _kind(gpu, v) if k in ("bias", "host_blocks") else v for k, v in d.items()})
    if dataclasses.is_dataclass(x):
        return (type(x).__name__, {f.name: _kind(gpu, getattr(x, f.name)) for f in dataclasses.fields(x)})
    if hasattr(x, "size") and hasattr(x, "usage"):  # a GPU buffer
        return ("buffer", x.size)
    raise TypeError(type(x))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_synthetic_quantised_weights_match_a_gguf(gpu, tmp_path, qtype):
    """Synthetic Q4_0/Q8_0 weights are built like a GGUF from `voxtral-wgpu quantize` loads (same
    objects, dtypes, chunks, buffer sizes and nbytes), with finite normal f16 scales and the intended
    spread of dequantised values."""
    from safetensors.numpy import save_file

    from voxtral_wgpu.bench import synthetic_weights
    from voxtral_wgpu.config import ModelConfig
    from voxtral_wgpu.gguf_loader import load_gguf
    from voxtral_wgpu.ops_quant import QuantWeight, dequantize_blocks
    from voxtral_wgpu.quantize import quantize
    from voxtral_wgpu.weights import expected_shapes

    (tmp_path / "params.json").write_text(json.dumps(TINY_PARAMS))
    cfg = ModelConfig.from_file(tmp_path / "params.json")
    rng = np.random.default_rng(0)
    save_file({name: (0.05 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in expected_shapes(cfg).items()}, str(tmp_path / "consolidated.safetensors"))
    (path,) = quantize(tmp_path, tmp_path / "m.gguf", qtype=qtype)
    (tmp_path / "tekken.json").write_text("{}")  # load_gguf only needs it to exist
    real, _ = load_gguf(gpu, path, progress=False)

    held = gpu.bytes_allocated
    synth = synthetic_weights(gpu, cfg, dtype=qtype)
    assert gpu.bytes_allocated - held == synth.nbytes == real.nbytes
    assert synth.quantized and synth.cfg == real.cfg
    skip = ("cfg", "nbytes", "source", "extra")
    for f in dataclasses.fields(real):
        if f.name not in skip:
            assert _kind(gpu, getattr(synth, f.name)) == _kind(gpu, getattr(real, f.name)), f.name
    assert synth.tok_embeddings.dtype == qtype and synth.enc_layers[0].wq.dtype == "f32"  # encoder dim 48: F32

    tok = synth.tok_embeddings
    quants, scales = (gpu.read(b, np.uint8, count=s, offset=o) for b, o, s in tok.views(tok.chunks[0]))
    nb = tok.chunks[0][2] * tok.k // 32
    d = scales[:2 * nb].view("<f2")
    assert np.isfinite(d).all() and (np.abs(d) >= 2.0 ** -14).all()  # normal f16
    assert 0.3 < np.mean(d > 0) < 0.7
    blocks = np.concatenate([scales[:2 * nb].reshape(nb, 2), quants.reshape(nb, -1)], axis=1)
    w = dequantize_blocks(blocks, tok.chunks[0][2], tok.k, qtype)
    assert abs(w.std() / (0.17 / math.sqrt(3)) - 1) < 0.1, w.std()  # the BF16 table's spread
    w2 = synth.dec_layers[0].w2
    assert isinstance(w2, QuantWeight)
    quants, scales = (gpu.read(b, np.uint8, count=s, offset=o) for b, o, s in w2.views(w2.chunks[0]))
    nb = w2.n * w2.k // 32
    w = dequantize_blocks(np.concatenate([scales[:2 * nb].reshape(nb, 2), quants.reshape(nb, -1)], axis=1),
                          w2.n, w2.k, qtype)
    assert abs(w.std() * math.sqrt(w2.k) - 1) < 0.1, w.std()  # std 1/sqrt(fan_in)


def test_bench_streams_smoke(tmp_path, capsys):
    """``--streams``: live streams through one Engine at real time on a tiny synthetic model."""
    from voxtral_wgpu import bench

    params = tmp_path / "params.json"
    params.write_text(json.dumps(TINY_PARAMS))
    assert bench.main(["--params", str(params), "--streams", "1", "3", "--stream-seconds", "1.2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = res["streams"]["per_n"]
    assert [r["streams"] for r in rows] == [1, 3]
    for r in rows:
        assert r["rows_per_step"] >= 1 and r["ticks"] > 0 and r["lat_ms_p50"] is not None
        assert r["gpu_bytes_per_stream"] > 0 and isinstance(r["kept_up"], bool)
    assert res["streams"]["max_streams_kept_up"] in (0, 1, 3)

"""CPU smoke test of ``python -m voxtral_wgpu.bench`` on a tiny synthetic model."""

import json
import math

import pytest

TINY_PARAMS = {
    "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2,
    "vocab_size": 1300, "sliding_window": 30, "rope_theta": 1e6, "norm_eps": 1e-5,
    "multimodal": {"whisper_model_args": {
        "encoder_args": {"dim": 48, "n_layers": 2, "head_dim": 16, "hidden_dim": 80, "n_heads": 3, "n_kv_heads": 3,
                         "sliding_window": 40, "audio_encoding_args": {"num_mel_bins": 128}},
        "downsample_args": {"downsample_factor": 4}}},
}


@pytest.mark.gpu
def test_bench_runs_and_reports_every_row(tmp_path, capsys):
    from voxtral_wgpu import bench

    params = tmp_path / "params.json"
    params.write_text(json.dumps(TINY_PARAMS))
    assert bench.main(["--params", str(params), "--seconds", "1.5", "--steps", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("adapter", "load_s", "encoder_ms_per_audio_s", "prefill_ms", "step_ms_median", "step_ms_p90",
                "step_ms_pipelined", "tokens_per_s", "rtf_1.5s", "stream_latency_ms_median",
                "stream_latency_ms_p90", "gpu_bytes", "host_rss_bytes"):
        assert key in res, key
        if isinstance(res[key], float):
            assert math.isfinite(res[key]), (key, res[key])
    assert res["steps_1.5s"] > 0 and res["tokens_per_s"] > 0 and res["gpu_bytes"] > 0

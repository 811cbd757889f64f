"""params.json: every invalid value is a ValueError that names the file and the key to fix."""

from __future__ import annotations

import copy
import json

import pytest

from hf_reference import TINY_SW, params_json
from voxtral_wgpu.config import ModelConfig

ENC = "multimodal.whisper_model_args.encoder_args"


def _set(params: dict, dotted: str, value) -> dict:
    p = copy.deepcopy(params)
    *parents, last = dotted.split(".")
    d = p
    for k in parents:
        d = d[k]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return p


@pytest.mark.parametrize("key, value, problem", [
    ("dim", "3072", "must be a number"),
    ("dim", None, "must be a number"),
    ("dim", 1.5, "whole number"),
    ("dim", True, "must be a number"),
    ("dim", [80], "must be a number"),
    ("n_layers", 0, "must be positive"),
    ("norm_eps", float("nan"), "finite"),
    ("rope_theta", float("inf"), "finite"),
    ("rope_theta", -1.0, "must be positive"),
    ("vocab_size", KeyError, "missing key 'vocab_size'"),
    ("n_kv_heads", 3, "not a multiple of n_kv_heads"),
    ("ada_rms_norm_t_cond_dim", "32", "must be a number"),
    (f"{ENC}.head_dim", {"x": 1}, "must be a number"),
    (f"{ENC}.head_dim", 7, "must be even"),
    (f"{ENC}.audio_encoding_args", "x", "must be a JSON object"),
    (f"{ENC}.audio_encoding_args.num_mel_bins", 80, "unsupported"),
    ("multimodal.whisper_model_args.downsample_args.downsample_factor", -4, "must be positive"),
    ("multimodal.whisper_model_args", [], "must be a JSON object"),
    ("multimodal", KeyError, "missing key 'multimodal'"),
])
def test_invalid_values_name_the_file_and_the_key(tmp_path, key, value, problem):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(_set(params_json(TINY_SW), key, value)))
    with pytest.raises(ValueError) as e:
        ModelConfig.from_file(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and problem in message
    assert key.split(".")[-1] in message or "multimodal" in message, message


def test_release_defaults_still_apply(tmp_path):
    """null / 0 sliding windows and missing optional keys mean "the default", as in the release file."""
    params = _set(_set(params_json(TINY_SW), "sliding_window", None), f"{ENC}.sliding_window", 0)
    params = _set(_set(params, "norm_eps", KeyError), "dim", float(TINY_SW.dec_dim))  # 80.0 is a whole number
    cfg = ModelConfig.from_params(params)
    assert cfg.decoder.sliding_window == 8192 and cfg.encoder.sliding_window == 750
    assert cfg.decoder.norm_eps == 1e-5 and cfg.decoder.dim == TINY_SW.dec_dim


def test_text_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "params.json"
    path.write_bytes(b'{"dim": "\xff"}')
    with pytest.raises(ValueError, match=f"{path}: not UTF-8"):
        ModelConfig.from_file(path)

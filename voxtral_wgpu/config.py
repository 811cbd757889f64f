"""Model hyper-parameters, read from the Mistral-native ``params.json`` (spec §1.1)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path


_REQUIRED = object()


def _section(params, dotted: str, source: str, required: bool = True) -> dict:
    """The JSON object at ``dotted`` (e.g. "multimodal.whisper_model_args"); {} when optional and absent."""
    d = params
    seen = []
    for key in dotted.split("."):
        if not isinstance(d, dict):
            raise ValueError(f"{source}: {'.'.join(seen) or 'the top level'} must be a JSON object, "
                             f"got {type(d).__name__}")
        seen.append(key)
        if key not in d or (d[key] is None and not required):
            if required:
                raise ValueError(f"{source}: missing key '{'.'.join(seen)}'")
            return {}
        d = d[key]
    if not isinstance(d, dict):
        raise ValueError(f"{source}: {dotted} must be a JSON object, got {type(d).__name__}")
    return d


def _number(d: dict, prefix: str, key: str, kind: type, default, source: str, zero_is_default: bool = False):
    """``d[key]`` as ``kind``: an int must be a whole number (1280 or 1280.0, not true, "1280" or
    1280.5), a float any finite number. Errors name the file and the key's full path."""
    name = f"{prefix}.{key}" if prefix else key
    v = d.get(key, default)
    if v is _REQUIRED:
        raise ValueError(f"{source}: missing key '{name}'")
    if zero_is_default and not v and v is not False:  # the release files write null/0 for "the default"
        v = default
    if v is None:
        if default is _REQUIRED:
            raise ValueError(f"{source}: {name} must be a number, got null")
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{source}: {name} must be a number, got {json.dumps(v)[:40]}")
    if not math.isfinite(v):
        raise ValueError(f"{source}: {name} must be finite, got {v}")
    if kind is int:
        if v != int(v):
            raise ValueError(f"{source}: {name} must be a whole number, got {v}")
        return int(v)
    return float(v)


@dataclass(frozen=True)
class EncoderConfig:
    dim: int = 1280
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 64
    hidden_dim: int = 5120
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int = 750
    num_mel_bins: int = 128
    downsample_factor: int = 4  # encoder frames concatenated per adapter row


@dataclass(frozen=True)
class DecoderConfig:
    dim: int = 3072
    n_layers: int = 26
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 9216
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int = 8192
    vocab_size: int = 131072
    ada_dim: int = 32  # ada_rms_norm_t_cond bottleneck


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = EncoderConfig()
    decoder: DecoderConfig = DecoderConfig()

    @staticmethod
    def from_params(params: dict, source: str = "params.json") -> "ModelConfig":
        """Parse the release layout of params.json; unknown keys are ignored. A missing section or
        key, or a value of the wrong type, is a ValueError naming ``source`` and the key."""
        enc_path = "multimodal.whisper_model_args.encoder_args"
        enc = _section(params, enc_path, source)
        downsample = _section(params, "multimodal.whisper_model_args.downsample_args", source, required=False)
        audio = _section(params, f"{enc_path}.audio_encoding_args", source, required=False)

        def num(d, prefix, key, kind, default=_REQUIRED, zero_is_default=False):
            return _number(d, prefix, key, kind, default, source, zero_is_default)

        encoder = EncoderConfig(
            dim=num(enc, enc_path, "dim", int), n_layers=num(enc, enc_path, "n_layers", int),
            n_heads=num(enc, enc_path, "n_heads", int),
            n_kv_heads=num(enc, enc_path, "n_kv_heads", int, num(enc, enc_path, "n_heads", int)),
            head_dim=num(enc, enc_path, "head_dim", int), hidden_dim=num(enc, enc_path, "hidden_dim", int),
            norm_eps=num(enc, enc_path, "norm_eps", float, 1e-5),
            rope_theta=num(enc, enc_path, "rope_theta", float, 1e6),
            sliding_window=num(enc, enc_path, "sliding_window", int, 750, zero_is_default=True),
            num_mel_bins=num(audio, f"{enc_path}.audio_encoding_args", "num_mel_bins", int, 128),
            downsample_factor=num(downsample, "multimodal.whisper_model_args.downsample_args",
                                  "downsample_factor", int, 4),
        )
        decoder = DecoderConfig(
            dim=num(params, "", "dim", int), n_layers=num(params, "", "n_layers", int),
            n_heads=num(params, "", "n_heads", int), n_kv_heads=num(params, "", "n_kv_heads", int),
            head_dim=num(params, "", "head_dim", int), hidden_dim=num(params, "", "hidden_dim", int),
            norm_eps=num(params, "", "norm_eps", float, 1e-5), rope_theta=num(params, "", "rope_theta", float, 1e6),
            sliding_window=num(params, "", "sliding_window", int, 8192, zero_is_default=True),
            vocab_size=num(params, "", "vocab_size", int),
            ada_dim=num(params, "", "ada_rms_norm_t_cond_dim", int, 32),
        )
        cfg = ModelConfig(encoder, decoder)
        keys = {f"encoder.{f.name}": f"{enc_path}.{f.name}" for f in fields(EncoderConfig)}
        keys.update({"encoder.num_mel_bins": f"{enc_path}.audio_encoding_args.num_mel_bins",
                     "encoder.downsample_factor": "multimodal.whisper_model_args.downsample_args.downsample_factor",
                     "decoder.ada_dim": "ada_rms_norm_t_cond_dim"})
        keys.update({f"decoder.{f.name}": f.name for f in fields(DecoderConfig) if f.name != "ada_dim"})
        cfg.validate(source, keys)
        return cfg

    @staticmethod
    def from_file(path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            params = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: params.json not found; a Mistral-native model directory holds "
                                    "params.json, consolidated.safetensors and tekken.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return ModelConfig.from_params(params, str(path))

    def validate(self, source: str = "config", keys: dict[str, str] | None = None) -> None:
        """Check the values the shaders rely on. ``keys`` maps "encoder.dim"-style names to the names
        the source file uses, so an error names the key to fix."""
        e, d = self.encoder, self.decoder

        def key(section, field_name):
            name = f"{section}.{field_name}"
            return (keys or {}).get(name, name)

        for name, c in (("encoder", e), ("decoder", d)):
            for f in fields(c):
                v = getattr(c, f.name)
                if not (math.isfinite(v) and v > 0):  # NaN compares false both ways
                    raise ValueError(f"{source}: {key(name, f.name)} must be positive and finite, got {v}")
            if c.n_heads % c.n_kv_heads:
                raise ValueError(f"{source}: {key(name, 'n_heads')} {c.n_heads} is not a multiple of "
                                 f"{key(name, 'n_kv_heads')} {c.n_kv_heads}")
            if c.head_dim % 2 or c.head_dim > 256:
                raise ValueError(f"{source}: {key(name, 'head_dim')} {c.head_dim} must be even and <= 256")
        if e.num_mel_bins != 128:
            raise ValueError(f"{source}: {key('encoder', 'num_mel_bins')} {e.num_mel_bins} unsupported "
                             "(the log-mel front end has 128)")

    @property
    def adapter_in(self) -> int:
        return self.encoder.dim * self.encoder.downsample_factor

"""Model hyper-parameters, read from the Mistral-native ``params.json`` (spec §1.1)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


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
        """Parse the release layout of params.json; unknown keys are ignored, a missing section is an error."""
        try:
            enc = params["multimodal"]["whisper_model_args"]["encoder_args"]
            ds = params["multimodal"]["whisper_model_args"].get("downsample_args", {}).get("downsample_factor", 4)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: missing multimodal.whisper_model_args.encoder_args ({e})") from None
        try:
            audio = enc.get("audio_encoding_args", {})
            encoder = EncoderConfig(
                dim=int(enc["dim"]), n_layers=int(enc["n_layers"]), n_heads=int(enc["n_heads"]),
                n_kv_heads=int(enc.get("n_kv_heads", enc["n_heads"])), head_dim=int(enc["head_dim"]),
                hidden_dim=int(enc["hidden_dim"]), norm_eps=float(enc.get("norm_eps", 1e-5)),
                rope_theta=float(enc.get("rope_theta", 1e6)),
                sliding_window=int(enc.get("sliding_window") or 750),
                num_mel_bins=int(audio.get("num_mel_bins", 128)), downsample_factor=int(ds),
            )
            decoder = DecoderConfig(
                dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=int(params["n_heads"]),
                n_kv_heads=int(params["n_kv_heads"]), head_dim=int(params["head_dim"]),
                hidden_dim=int(params["hidden_dim"]), norm_eps=float(params.get("norm_eps", 1e-5)),
                rope_theta=float(params.get("rope_theta", 1e6)),
                sliding_window=int(params.get("sliding_window") or 8192),
                vocab_size=int(params["vocab_size"]), ada_dim=int(params.get("ada_rms_norm_t_cond_dim", 32)),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e}") from None
        cfg = ModelConfig(encoder, decoder)
        cfg.validate(source)
        return cfg

    @staticmethod
    def from_file(path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            params = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: params.json not found; a Mistral-native model directory holds "
                                    "params.json, consolidated.safetensors and tekken.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return ModelConfig.from_params(params, str(path))

    def validate(self, source: str = "config") -> None:
        e, d = self.encoder, self.decoder
        for name, c in (("encoder", e), ("decoder", d)):
            for f in fields(c):
                v = getattr(c, f.name)
                if isinstance(v, int) and v <= 0:
                    raise ValueError(f"{source}: {name}.{f.name} must be positive, got {v}")
            if c.n_heads % c.n_kv_heads:
                raise ValueError(f"{source}: {name} n_heads {c.n_heads} is not a multiple of n_kv_heads {c.n_kv_heads}")
            if c.head_dim % 2 or c.head_dim > 256:
                raise ValueError(f"{source}: {name} head_dim {c.head_dim} must be even and <= 256")
        if e.num_mel_bins != 128:
            raise ValueError(f"{source}: num_mel_bins {e.num_mel_bins} unsupported (the log-mel front end has 128)")

    @property
    def adapter_in(self) -> int:
        return self.encoder.dim * self.encoder.downsample_factor

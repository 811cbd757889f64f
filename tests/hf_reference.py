"""HF-transformers reference oracle for the voxtral_wgpu tests.

Builds TINY random-weight ``VoxtralRealtimeForConditionalGeneration`` models that have the real
model's structure, writes them as Mistral-native checkpoint directories (the format the project
loads) and exposes every stage of the HF computation as numpy float32, time-major arrays.

    from hf_reference import TINY_SW, build_model, synth_audio
    ref = build_model(TINY_SW, tmp_path)            # writes consolidated.safetensors/params.json/tekken.json
    audio = synth_audio(1.5)
    mel = ref.mel(ref.pad(audio))                    # [T, 128]
    ids = ref.generate(audio)                        # generated ids, prompt and EOS excluded
    lg = ref.logits(ref.prompt_ids() + ids, mel)     # teacher-forced logits [L, vocab]

Conventions
* Arrays are float32 numpy and time-major: mel [T, 128], conv stem / encoder [T/2, enc_dim],
  adapter [T/8, dec_dim], logits [L, vocab].
* Generated ids: every generated id in order, specials included, prompt excluded, EOS excluded
  (``Generation.eos`` says whether generation stopped on EOS).
* The Mistral-native file stores wq/wk (weights and the encoder wq bias) in INTERLEAVED RoPE order
  (rotation pairs (2i, 2i+1) per head); HF uses the half-split ``rotate_half`` order.  Per head of
  size hd: ``hf_row[j*hd/2 + i] == native_row[2*i + j]``.
* Every weight is bf16-representable, so the BF16 file and the float32 HF model hold the same values.

Pitfalls avoided here: the HF offline *processor* round-trips audio through a 16-bit WAV, so this
module never uses it for features (it pads with mistral-common itself and calls the feature
extractor on the float32 array); HF's encoder rope_theta default (10000) is overridden with 1e6;
``num_delay_tokens`` is always passed explicitly.

torch / transformers / mistral-common are imported lazily: importing this module is cheap, and
``TinySpec``, ``synth_audio``, ``speechlike_audio`` and ``load_native_state`` need only numpy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

SAMPLE_RATE = 16000
HOP = 160
N_MELS = 128
MEL_PER_TOK = 8  # mel frames per decoder position
SAMPLES_PER_TOK = HOP * MEL_PER_TOK  # 1280 samples = 80 ms
DOWNSAMPLE = 4  # encoder frames per decoder position
N_LEFT_PAD_TOKENS = 32
OFFLINE_BUFFER_TOKENS = 10
ADA_DIM = 32  # hard-coded in HF VoxtralRealtimeTextAdaRmsNorm
ROPE_THETA = 1e6
NORM_EPS = 1e-5
N_SPECIAL = 1000
BOS, EOS, PAD_ID, STREAMING_PAD, STREAMING_WORD = 1, 2, 11, 32, 33

ENC = "mm_streams_embeddings.embedding_module.whisper_encoder"
MM = "mm_streams_embeddings.embedding_module"


# ============================================================================ spec

@dataclass(frozen=True)
class TinySpec:
    """Dimensions of a tiny Voxtral-Realtime model.  Hashable (use it as a cache key).

    enc_*: audio encoder (MHA: kv heads == heads); dec_*: decoder (GQA).  Attention width
    heads*head_dim may differ from dim, as in the real model.  dims and head dims must be even."""

    enc_dim: int = 96
    enc_layers: int = 2
    enc_heads: int = 4
    enc_head_dim: int = 32
    enc_hidden: int = 160
    enc_window: int = 40
    dec_dim: int = 80
    dec_layers: int = 2
    dec_heads: int = 4
    dec_kv_heads: int = 2
    dec_head_dim: int = 32
    dec_hidden: int = 224
    dec_window: int = 20
    n_inner: int = 1048  # regular (BPE) vocabulary entries; vocab = 1000 specials + n_inner
    seed: int = 1234
    embed_std: float = 0.1  # token embedding std; 1.0 makes the tied head echo its input token

    def __post_init__(self):
        if self.dec_dim % 2:
            raise ValueError("dec_dim must be even (the [cos, sin] time embedding has dec_dim/2 frequencies)")
        if self.enc_head_dim % 2 or self.dec_head_dim % 2:
            raise ValueError("head dims must be even (RoPE rotates pairs)")
        if self.dec_heads % self.dec_kv_heads:
            raise ValueError("dec_heads must be a multiple of dec_kv_heads")
        if self.n_inner < 1:
            raise ValueError("n_inner must be >= 1")

    @property
    def vocab(self) -> int:
        return N_SPECIAL + self.n_inner

    def replace(self, **kw) -> "TinySpec":
        return dataclasses.replace(self, **kw)


# sliding windows smaller than the 1.5 s test sequences (272 encoder frames, 68 positions)
TINY_SW = TinySpec()
# the real windows (750 / 8192): never reached by short audio -> plain causal attention
TINY_FULL = TinySpec(enc_window=750, dec_window=8192)


def n_delay_tokens(delay_ms: float) -> int:
    """Delay tokens for a transcription delay (mistral-common ``get_num_delay_tokens``): 480 ms -> 6."""
    d = int(delay_ms / 1000.0 * SAMPLE_RATE)
    frames = math.ceil(d / HOP - 1) if d % HOP else d // HOP
    return math.ceil(frames / MEL_PER_TOK)


def streaming_pad_amounts(n_samples: int, delay_ms: float) -> tuple[int, int]:
    """(left, right) zero samples of mistral-common's offline streaming padding."""
    right = (SAMPLES_PER_TOK - n_samples % SAMPLES_PER_TOK) % SAMPLES_PER_TOK
    right += SAMPLES_PER_TOK * (n_delay_tokens(delay_ms) + 1 + OFFLINE_BUFFER_TOKENS)
    return N_LEFT_PAD_TOKENS * SAMPLES_PER_TOK, right


def _check_delay(delay_ms: float) -> int:
    if delay_ms <= 0 or delay_ms % 80 != 0:
        raise ValueError(f"delay_ms must be a positive multiple of 80, got {delay_ms}")
    return int(delay_ms)


# ============================================================================ audio

def _to_int16_grid(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.round(x * 32768.0), -32768, 32767) / 32768.0).astype(np.float32)


def synth_audio(seconds: float = 1.5, seed: int = 1234, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Deterministic float32 test audio on the int16 grid (k/32768): a 200->2000 Hz chirp with slow
    AM, a 440 Hz tone and seeded white noise (peak ~0.5).  Identical to the shared oracle's audio."""
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    f0, f1 = 200.0, 2000.0
    phase = 2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / seconds * t * t)
    x = 0.3 * np.sin(phase) * (0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t))
    x += 0.1 * np.sin(2 * np.pi * 440.0 * t)
    x += 0.01 * np.random.RandomState(seed).randn(n)
    return _to_int16_grid(x)


def speechlike_audio(seconds: float = 3.0, seed: int = 0, sr: int = SAMPLE_RATE,
                     n_bursts: int | None = None, tail_silence_s: float = 0.8) -> np.ndarray:
    """Deterministic int16-grid audio of voiced "syllables" separated by silences, ending in
    ``tail_silence_s`` of exact silence.  Each syllable is a harmonic series (f0 100-250 Hz, gliding)
    shaped by two random formant peaks, with a raised-cosine envelope; gaps are exact zeros."""
    rng = np.random.RandomState(seed)
    n = int(round(seconds * sr))
    x = np.zeros(n, dtype=np.float64)
    speech_end = max(0, n - int(round(tail_silence_s * sr)))
    if n_bursts is None:
        n_bursts = max(1, int(speech_end / sr * 2.5))
    pos = int(0.1 * sr)
    for _ in range(n_bursts):
        dur = int(rng.uniform(0.12, 0.35) * sr)
        if pos + dur > speech_end:
            break
        t = np.arange(dur) / sr
        f0 = rng.uniform(100, 250) * (1 + rng.uniform(-0.15, 0.15) * t / max(t[-1], 1e-9))
        ph = 2 * np.pi * np.cumsum(f0) / sr
        formants = rng.uniform([300, 900], [900, 2500])
        s = np.zeros(dur)
        for h in range(1, 25):
            fh = h * f0.mean()
            if fh > 7000:
                break
            amp = sum(np.exp(-0.5 * ((fh - fm) / 120.0) ** 2) for fm in formants) + 0.05 / h
            s += amp * np.sin(h * ph)
        env = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(dur) / max(dur - 1, 1))
        s = s * env
        s *= rng.uniform(0.2, 0.5) / max(np.abs(s).max(), 1e-9)
        x[pos:pos + dur] += s + 0.003 * rng.randn(dur) * env
        pos += dur + int(rng.uniform(0.05, 0.3) * sr)
    return _to_int16_grid(x)


# ============================================================================ Mistral-native file I/O

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def load_native_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``consolidated.safetensors`` (a directory holding it, or the file) -> {name: float32 array}.
    Pure numpy (BF16 is widened exactly by a 16-bit shift)."""
    p = Path(path)
    if p.is_dir():
        p = p / "consolidated.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        buf = raw[base + b: base + e]
        dt = info["dtype"]
        if dt == "BF16":
            a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(buf, dtype=np.dtype(_ST_DTYPES[dt]).newbyteorder("<")).astype(np.float32)
        out[name] = a.reshape(info["shape"])
    return out


def _hf_to_native_key(k: str) -> str:
    """HF (transformers-5 runtime) parameter name -> Mistral-native tensor name."""
    import re

    rules = [
        (r"^model\.audio_tower\.embedder\.conv([12])\.(weight|bias)$",
         lambda m: f"{ENC}.conv_layers.{int(m[1]) - 1}.conv.{m[2]}"),
        (r"^model\.audio_tower\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)$",
         lambda m: f"{ENC}.transformer.layers.{m[1]}.attention.w{m[2]}.{m[3]}"),
        (r"^model\.audio_tower\.layers\.(\d+)\.self_attn_layer_norm\.weight$",
         lambda m: f"{ENC}.transformer.layers.{m[1]}.attention_norm.weight"),
        (r"^model\.audio_tower\.layers\.(\d+)\.final_layer_norm\.weight$",
         lambda m: f"{ENC}.transformer.layers.{m[1]}.ffn_norm.weight"),
        (r"^model\.audio_tower\.layers\.(\d+)\.mlp\.(gate|down|up)_proj\.(weight|bias)$",
         lambda m: f"{ENC}.transformer.layers.{m[1]}.feed_forward.w{ {'gate': 1, 'down': 2, 'up': 3}[m[2]] }.{m[3]}"),
        (r"^model\.audio_tower\.norm\.weight$", lambda m: f"{ENC}.transformer.norm.weight"),
        (r"^model\.multi_modal_projector\.linear_([12])\.weight$",
         lambda m: f"{MM}.audio_language_projection.{2 * (int(m[1]) - 1)}.weight"),
        (r"^model\.language_model\.embed_tokens\.weight$", lambda m: f"{MM}.tok_embeddings.weight"),
        (r"^model\.language_model\.layers\.(\d+)\.input_layernorm\.weight$",
         lambda m: f"layers.{m[1]}.attention_norm.weight"),
        (r"^model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.weight$",
         lambda m: f"layers.{m[1]}.ffn_norm.weight"),
        (r"^model\.language_model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight$",
         lambda m: f"layers.{m[1]}.attention.w{m[2]}.weight"),
        (r"^model\.language_model\.layers\.(\d+)\.mlp\.(gate|down|up)_proj\.weight$",
         lambda m: f"layers.{m[1]}.feed_forward.w{ {'gate': 1, 'down': 2, 'up': 3}[m[2]] }.weight"),
        (r"^model\.language_model\.layers\.(\d+)\.ada_rms_norm\.linear([12])\.weight$",
         lambda m: f"layers.{m[1]}.ada_rms_norm_t_cond.{2 * (int(m[2]) - 1)}.weight"),
        (r"^model\.language_model\.norm\.weight$", lambda m: "norm.weight"),
    ]
    for pat, fn in rules:
        m = re.match(pat, k)
        if m:
            return fn(m)
    raise KeyError(f"no Mistral-native name for HF parameter {k!r}")


def _rope_heads(hf_key: str, spec: TinySpec) -> int | None:
    """Heads to permute over for q/k tensors (by HF name), else None."""
    if ".self_attn.q_proj." in hf_key or ".self_attn.k_proj." in hf_key:
        if hf_key.startswith("model.audio_tower."):
            return spec.enc_heads
        return spec.dec_heads if ".q_proj." in hf_key else spec.dec_kv_heads
    return None


def halfsplit_to_interleaved(a, n_heads: int):
    """HF (rotate_half) row order -> Mistral-native interleaved order; [out, ...] numpy or torch."""
    out, rest = a.shape[0], tuple(a.shape[1:])
    hd = out // n_heads
    x = a.reshape(n_heads, 2, hd // 2, *rest)
    x = x.transpose(1, 2) if not isinstance(x, np.ndarray) else np.swapaxes(x, 1, 2)
    return x.reshape(out, *rest)


def interleaved_to_halfsplit(a, n_heads: int):
    """Mistral-native interleaved row order -> HF (rotate_half) order; inverse of the above."""
    out, rest = a.shape[0], tuple(a.shape[1:])
    hd = out // n_heads
    x = a.reshape(n_heads, hd // 2, 2, *rest)
    x = x.transpose(1, 2) if not isinstance(x, np.ndarray) else np.swapaxes(x, 1, 2)
    return x.reshape(out, *rest)


def native_to_hf_state(native: dict[str, np.ndarray], model, spec: TinySpec | None = None
                       ) -> dict[str, "torch.Tensor"]:
    """Mistral-native {name: array} -> HF state dict for ``model`` (names + q/k un-permutation).
    ``lm_head.weight`` is tied to the token embedding.  ``spec`` defaults to the one of a model made by
    ``new_hf_model``."""
    import torch

    spec = spec or model._tiny_spec
    out = {}
    for hk in model.state_dict():
        if hk == "lm_head.weight":
            continue
        a = np.asarray(native[_hf_to_native_key(hk)], dtype=np.float32)
        nh = _rope_heads(hk, spec)
        if nh:
            a = interleaved_to_halfsplit(a, nh)
        out[hk] = torch.from_numpy(np.ascontiguousarray(a))
    out["lm_head.weight"] = out["model.language_model.embed_tokens.weight"]
    return out


def params_json(spec: TinySpec) -> dict:
    """params.json in the release layout with the tiny dimensions."""
    return {
        "dim": spec.dec_dim,
        "n_layers": spec.dec_layers,
        "head_dim": spec.dec_head_dim,
        "hidden_dim": spec.dec_hidden,
        "n_heads": spec.dec_heads,
        "n_kv_heads": spec.dec_kv_heads,
        "use_biases": False,
        "causal": True,
        "rope_theta": ROPE_THETA,
        "norm_eps": NORM_EPS,
        "vocab_size": spec.vocab,
        "model_parallel": 1,
        "tied_embeddings": True,
        "sliding_window": spec.dec_window,
        "model_max_length": 131072,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        "sampling_rate": SAMPLE_RATE,
                        "frame_rate": 12.5,
                        "num_mel_bins": N_MELS,
                        "hop_length": HOP,
                        "window_size": 400,
                        "chunk_length_s": None,
                        "global_log_mel_max": 1.5,
                        "transcription_format": "streaming",
                    },
                    "dim": spec.enc_dim,
                    "n_layers": spec.enc_layers,
                    "head_dim": spec.enc_head_dim,
                    "hidden_dim": spec.enc_hidden,
                    "n_heads": spec.enc_heads,
                    "vocab_size": spec.vocab,
                    "n_kv_heads": spec.enc_heads,
                    "use_biases": True,
                    "use_cache": False,
                    "rope_theta": ROPE_THETA,
                    "causal": True,
                    "norm_eps": NORM_EPS,
                    "pos_embed": "rope",
                    "max_source_positions": None,
                    "ffn_type": "swiglu",
                    "norm_type": "rms_norm",
                    "sliding_window": spec.enc_window,
                },
                "downsample_args": {"downsample_factor": DOWNSAMPLE},
            }
        },
        "ada_rms_norm_t_cond": True,
        "ada_rms_norm_t_cond_dim": ADA_DIM,
    }


_TEKKEN_CACHE: dict[int, dict] = {}


def write_tekken_for(out_dir: str | os.PathLike, n_inner: int, delay_ms: float) -> Path:
    """tekken.json fixture (tests/tekken_fixture.py) with the audio section's delay set."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = out / "tekken.json"
    if n_inner not in _TEKKEN_CACHE:
        from tekken_fixture import write_tekken  # tests/ is on sys.path under pytest

        _TEKKEN_CACHE[n_inner] = json.loads(Path(write_tekken(out, n_inner=n_inner)).read_text(encoding="utf-8"))
    tk = json.loads(json.dumps(_TEKKEN_CACHE[n_inner]))
    tk["audio"]["transcription_delay_ms"] = delay_ms
    p.write_text(json.dumps(tk), encoding="utf-8")
    return p


# ============================================================================ HF model

def make_hf_config(spec: TinySpec, n_delay: int = 6):
    from transformers import VoxtralRealtimeConfig

    rope = {"rope_type": "default", "rope_theta": ROPE_THETA}
    cfg = VoxtralRealtimeConfig(
        audio_config=dict(hidden_size=spec.enc_dim, intermediate_size=spec.enc_hidden,
                          num_hidden_layers=spec.enc_layers, num_attention_heads=spec.enc_heads,
                          head_dim=spec.enc_head_dim, num_mel_bins=N_MELS, rms_norm_eps=NORM_EPS,
                          vocab_size=spec.vocab, sliding_window=spec.enc_window, rope_parameters=dict(rope)),
        text_config=dict(vocab_size=spec.vocab, hidden_size=spec.dec_dim, intermediate_size=spec.dec_hidden,
                         num_hidden_layers=spec.dec_layers, num_attention_heads=spec.dec_heads,
                         num_key_value_heads=spec.dec_kv_heads, head_dim=spec.dec_head_dim,
                         rms_norm_eps=NORM_EPS, max_position_embeddings=131072, tie_word_embeddings=True,
                         sliding_window=spec.dec_window, rope_parameters=dict(rope),
                         bos_token_id=BOS, eos_token_id=EOS),
        projector_hidden_act="gelu",
        downsample_factor=DOWNSAMPLE,
        audio_length_per_tok=MEL_PER_TOK,
        default_num_delay_tokens=n_delay,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    return cfg


def randomize_(model, spec: TinySpec) -> None:
    """Deterministic bf16-exact weights: parameters in sorted-name order from one generator;
    norm weights 1+0.2N, biases 0.1N, token embeddings embed_std*N, matrices N/sqrt(fan_in)."""
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    params = dict(model.named_parameters())  # tied lm_head appears once
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            x = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name:
                x = 1.0 + 0.2 * x
            elif name.endswith(".bias"):
                x = 0.1 * x
            elif "embed_tokens" in name:
                x = spec.embed_std * x
            else:
                x = x / math.sqrt(int(np.prod(p.shape[1:])))
            p.copy_(x.to(torch.bfloat16).to(torch.float32))


_TORCH_READY = False


def _setup_torch() -> None:
    """Once per process: torch intra-op threads = $VOXTRAL_TEST_TORCH_THREADS (default 1).  The tiny
    models gain nothing from threads, and on a loaded 2-core CI box 2 spinning OpenMP threads made
    this file's tests 4x slower.  Outputs are bitwise identical for 1 or 2 threads."""
    global _TORCH_READY
    if not _TORCH_READY:
        import torch

        torch.set_num_threads(int(os.environ.get("VOXTRAL_TEST_TORCH_THREADS", "1")))
        _TORCH_READY = True


def new_hf_model(spec: TinySpec, n_delay: int = 6):
    """Fresh (default-initialised) eager float32 HF model for ``spec``."""
    import torch

    _setup_torch()
    from transformers import VoxtralRealtimeForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(spec.seed)
    model = VoxtralRealtimeForConditionalGeneration(make_hf_config(spec, n_delay)).eval()
    model.set_attn_implementation("eager")
    model.requires_grad_(False)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = PAD_ID, BOS, EOS
    model._tiny_spec = spec
    return model


def write_native_checkpoint(model, spec: TinySpec, out_dir: str | os.PathLike) -> Path:
    """consolidated.safetensors (BF16, Mistral names, interleaved q/k) + params.json."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for hk, v in model.state_dict().items():
        if hk == "lm_head.weight":
            continue  # tied
        nh = _rope_heads(hk, spec)
        t = halfsplit_to_interleaved(v.detach(), nh) if nh else v.detach()
        tensors[_hf_to_native_key(hk)] = t.to(torch.bfloat16).contiguous()
    save_file(dict(sorted(tensors.items())), str(out / "consolidated.safetensors"), metadata={"format": "pt"})
    (out / "params.json").write_text(json.dumps(params_json(spec), indent=2))
    return out


def build_model(spec: TinySpec, out_dir: str | os.PathLike, *, delay_ms: float = 480) -> "Reference":
    """Build the HF reference for ``spec`` and write the Mistral-native checkpoint into ``out_dir``
    (consolidated.safetensors, params.json, tekken.json with ``transcription_delay_ms=delay_ms``)."""
    delay_ms = _check_delay(delay_ms)
    n_delay = n_delay_tokens(delay_ms)
    model = new_hf_model(spec, n_delay)
    randomize_(model, spec)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    out = write_native_checkpoint(model, spec, out_dir)
    write_tekken_for(out, spec.n_inner, delay_ms)
    return Reference(spec, model, out, delay_ms)


def build_eos_model(spec: TinySpec, out_dir: str | os.PathLike, audio: np.ndarray, eos_step: int, *,
                    delay_ms: float = 480) -> "Reference":
    """Like ``build_model``, but with the EOS (id 2) token-embedding row replaced so that greedy
    generation on ``audio`` emits EOS exactly at generation step ``eos_step`` (so ``generate`` returns
    ``eos_step`` ids and ``Generation.eos`` is True).  Random weights essentially never emit EOS on their
    own; this exercises the stop-on-EOS path.  Row 2 only changes the EOS logit (EOS is never fed back),
    so all other logits are those of the plain model.  The row stays bf16-exact; the checkpoint in
    ``out_dir`` holds the modified weights.  Raises RuntimeError if no such row is found."""
    import torch

    ref = build_model(spec, out_dir, delay_ms=delay_ms)
    g = ref.generate_full(audio)
    n_steps = len(g.ids) + g.eos
    if g.eos and len(g.ids) <= eos_step:
        raise RuntimeError(f"the plain model already stops at step {len(g.ids)}")
    if not 0 <= eos_step < n_steps:
        raise ValueError(f"eos_step must be in [0, {n_steps}), got {eos_step}")
    mel = ref.mel(ref.pad(audio))
    P = len(g.prompt_ids)
    seq = g.prompt_ids + g.ids[: eos_step]  # inputs up to the position that should emit EOS
    h = ref.final_hidden(seq, mel)[P - 1:].astype(np.float64)  # [eos_step + 1, D], step k -> row k
    other = g.logits[: eos_step + 1].astype(np.float64).copy()
    other[:, EOS] = -np.inf
    m = other.max(1)  # best non-EOS logit per step
    emb = ref.model.model.language_model.embed_tokens.weight
    best = None
    for beta in (0.0, 0.5, 0.9, 1.0):
        u = h[-1] - beta * h[:-1].mean(0) if eos_step else h[-1]
        u = u / np.linalg.norm(u)
        s = h @ u
        if s[-1] <= 0:
            continue
        lo = m[-1] / s[-1]  # alpha must exceed this for EOS to win at eos_step
        hi = min([m[k] / s[k] for k in range(eos_step) if s[k] > 0], default=lo * 4 + 4)
        if hi > lo and (best is None or hi / lo > best[0]):
            best = (hi / lo, u, (math.sqrt(lo * hi) if lo > 0 else 0.5 * (lo + hi)))
    if best is None:
        raise RuntimeError(f"cannot place EOS at step {eos_step} for this audio")
    _, u, alpha = best
    with torch.no_grad():
        emb[EOS] = torch.from_numpy(alpha * u).float().to(torch.bfloat16).float()
    write_native_checkpoint(ref.model, spec, ref.out_dir)
    g2 = ref.generate_full(audio)
    if not (g2.eos and g2.ids == g.ids[:eos_step]):
        raise RuntimeError(f"EOS placement failed (eos={g2.eos}, n_ids={len(g2.ids)})")
    return ref


# ============================================================================ reference

@dataclass
class Generation:
    """Result of greedy HF ``generate`` on a whole padded utterance."""

    ids: list[int]  # generated ids in order, specials included; prompt and EOS excluded
    eos: bool  # True if generation stopped because EOS (2) was generated
    logits: np.ndarray  # [n_steps, vocab] float32; row k produced step k; n_steps = len(ids) + eos
    margins: np.ndarray  # [n_steps] top1 - top2 logit of each step
    prompt_ids: list[int]
    n_positions: int  # decoder positions in the padded audio (= mel frames / 8) = max sequence length

    @property
    def full_ids(self) -> list[int]:
        """The decoder's input sequence for teacher forcing: prompt + ids (+ EOS if eos)."""
        return self.prompt_ids + self.ids + ([EOS] if self.eos else [])


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


class Reference:
    """HF reference for one tiny model + one delay.  All outputs are float32 numpy, time-major."""

    def __init__(self, spec: TinySpec, model, out_dir: Path, delay_ms: int):
        self.spec = spec
        self.model = model
        self.out_dir = Path(out_dir)
        self.delay_ms = delay_ms
        self._mc = None
        self._ae = None
        self._fe = None

    # ------------------------------------------------------------------ tokenizer / padding
    @property
    def tekkenizer(self):
        """mistral-common ``Tekkenizer`` of the written tekken.json (its ``.audio`` is the AudioConfig)."""
        if self._mc is None:
            from mistral_common.tokens.tokenizers.tekken import Tekkenizer

            self._mc = Tekkenizer.from_file(str(self.out_dir / "tekken.json"))
        return self._mc

    @property
    def _audio_encoder(self):
        # Built from the Tekkenizer directly: MistralTokenizer.from_file would also demand the
        # instruct control tokens ([INST], ...), which the tekken fixture does not name.
        if self._ae is None:
            from mistral_common.tokens.tokenizers.audio import AudioEncoder, SpecialAudioIDs

            tok = self.tekkenizer
            ids = SpecialAudioIDs(audio=None, begin_audio=None,
                                  streaming_pad=tok.get_special_token("[STREAMING_PAD]"),
                                  text_to_audio=None, audio_to_text=None)
            self._ae = AudioEncoder(tok.audio, ids)
        return self._ae

    @property
    def n_delay(self) -> int:
        """Delay tokens (mistral-common ``get_num_delay_tokens``): delay_ms / 80."""
        n = self._audio_encoder.audio_config.get_num_delay_tokens()
        assert n == n_delay_tokens(self.delay_ms)
        return n

    def prompt_ids(self) -> list[int]:
        """[BOS] + [STREAMING_PAD] * (32 + n_delay), from mistral-common."""
        return [self.tekkenizer.bos_id] + list(self._audio_encoder.encode_streaming_tokens())

    def pad_amounts(self, n_samples: int) -> tuple[int, int]:
        return tuple(int(v) for v in self._audio_encoder._get_streaming_pad(int(n_samples)))

    def pad(self, audio: np.ndarray) -> np.ndarray:
        """mistral-common offline streaming padding: 32*1280 zeros left; right zeros to a multiple of
        1280 plus (n_delay + 1 + 10)*1280."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        left, right = self.pad_amounts(audio.shape[0])
        return np.pad(audio, (left, right))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` via mistral-common, special tokens skipped."""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        return self.tekkenizer.decode([int(i) for i in ids], special_token_policy=SpecialTokenPolicy.IGNORE)

    # ------------------------------------------------------------------ features
    @property
    def feature_extractor(self):
        if self._fe is None:
            from transformers import VoxtralRealtimeFeatureExtractor

            self._fe = VoxtralRealtimeFeatureExtractor()
        return self._fe

    def mel(self, padded: np.ndarray) -> np.ndarray:
        """Log-mel [T, 128] (T = len/160) of an already padded waveform (HF feature extractor)."""
        x = np.asarray(padded, dtype=np.float32).reshape(-1)
        f = self.feature_extractor(x, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_features"]
        return _np(f[0].T)

    @staticmethod
    def _mel_t(mel: np.ndarray):
        import torch

        m = np.asarray(mel, dtype=np.float32)
        assert m.ndim == 2 and m.shape[1] == N_MELS, f"mel must be [T, {N_MELS}], got {m.shape}"
        return torch.from_numpy(np.ascontiguousarray(m.T))[None]  # [1, 128, T]

    # ------------------------------------------------------------------ encoder side
    def conv_stem(self, mel: np.ndarray) -> np.ndarray:
        """Causal conv stem (conv1+GELU, conv2 stride 2+GELU): [T, 128] -> [T/2, enc_dim]."""
        import torch

        with torch.no_grad():
            return _np(self.model.model.audio_tower.embedder(self._mel_t(mel))[0])

    def encoder(self, mel: np.ndarray) -> np.ndarray:
        """Full audio encoder incl. final RMSNorm: [T, 128] -> [T/2, enc_dim]."""
        import torch

        with torch.no_grad():
            return _np(self.model.model.audio_tower(input_features=self._mel_t(mel)).last_hidden_state[0])

    def encoder_layers(self, mel: np.ndarray) -> list[np.ndarray]:
        """Output of each encoder layer (before the final norm), each [T/2, enc_dim]."""
        import torch

        at = self.model.model.audio_tower
        with torch.no_grad(), _capture(at.layers) as store:
            at(input_features=self._mel_t(mel))
        return [_np(store[i][0]) for i in range(len(at.layers))]

    def adapter(self, enc_out: np.ndarray) -> np.ndarray:
        """Downsample (concat 4 consecutive frames) + 2-layer GELU projector: [T/2, C] -> [T/8, dec_dim]."""
        import torch

        e = torch.from_numpy(np.ascontiguousarray(enc_out, dtype=np.float32))
        assert e.shape[0] % DOWNSAMPLE == 0
        with torch.no_grad():
            return _np(self.model.model.multi_modal_projector(e.reshape(1, -1, e.shape[1] * DOWNSAMPLE))[0])

    def audio_embeds(self, mel: np.ndarray) -> np.ndarray:
        """HF ``get_audio_features`` (encoder + adapter): [T, 128] -> [T/8, dec_dim]."""
        import torch

        with torch.no_grad():
            return _np(self.model.model.get_audio_features(input_features=self._mel_t(mel)).pooler_output[0])

    # ------------------------------------------------------------------ decoder side
    def t_cond(self) -> np.ndarray:
        """Sinusoidal time embedding of t = n_delay ([cos, sin], theta 10000): [dec_dim]."""
        import torch

        with torch.no_grad():
            return _np(self.model.model.time_embedding(torch.full((1,), float(self.n_delay))).reshape(-1))

    def ada_scales(self) -> np.ndarray:
        """1 + ada MLP(t_cond) per decoder layer: [dec_layers, dec_dim] (multiplies the FFN norm)."""
        import torch

        tc = torch.from_numpy(self.t_cond())[None]
        with torch.no_grad():
            return np.stack([_np(1 + l.ada_rms_norm(tc)[0]) for l in self.model.model.language_model.layers])

    def _forward(self, token_ids: Sequence[int], mel: np.ndarray, capture: bool = False):
        import torch

        ids = torch.tensor([list(map(int, token_ids))], dtype=torch.long)
        L = ids.shape[1]
        m = self._mel_t(mel)
        if m.shape[-1] < L * MEL_PER_TOK:
            raise ValueError(f"{L} tokens need {L * MEL_PER_TOK} mel frames, got {m.shape[-1]}")
        m = m[..., : L * MEL_PER_TOK]
        layers = self.model.model.language_model.layers
        with torch.no_grad(), _capture(layers if capture else []) as store:
            out = self.model(input_ids=ids, input_features=m, num_delay_tokens=self.n_delay, use_cache=False)
        return out, store

    def logits(self, token_ids: Sequence[int], mel: np.ndarray) -> np.ndarray:
        """Teacher-forced full forward: logits [len(ids), vocab].  Position p adds the audio embedding
        of mel frames 8p..8p+7 (mel must hold at least 8*len(ids) frames; extra frames are ignored)."""
        out, _ = self._forward(token_ids, mel)
        return _np(out.logits[0])

    def final_hidden(self, token_ids: Sequence[int], mel: np.ndarray) -> np.ndarray:
        """Decoder output after the final RMSNorm under teacher forcing: [L, dec_dim]
        (logits = final_hidden @ tok_embeddings.T)."""
        import torch

        ids = torch.tensor([list(map(int, token_ids))], dtype=torch.long)
        m = self._mel_t(mel)[..., : ids.shape[1] * MEL_PER_TOK]
        with torch.no_grad():
            out = self.model.model(input_ids=ids, input_features=m, num_delay_tokens=self.n_delay, use_cache=False)
        return _np(out.last_hidden_state[0])

    def decoder_layers(self, token_ids: Sequence[int], mel: np.ndarray) -> list[np.ndarray]:
        """Output of each decoder layer under teacher forcing (before the final norm), [L, dec_dim]."""
        _, store = self._forward(token_ids, mel, capture=True)
        return [_np(store[i][0]) for i in range(self.spec.dec_layers)]

    # ------------------------------------------------------------------ greedy generation
    def generate_full(self, audio: np.ndarray, *, padded: bool = False) -> Generation:
        """HF greedy ``generate`` on the whole (padded) utterance; see ``Generation``."""
        import torch

        x = np.asarray(audio, dtype=np.float32) if padded else self.pad(audio)
        mel = self.mel(x)
        prompt = self.prompt_ids()
        n_pos = mel.shape[0] // MEL_PER_TOK
        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad():
            g = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    input_features=self._mel_t(mel), num_delay_tokens=self.n_delay,
                                    max_length=n_pos, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        seq = g.sequences[0].tolist()
        assert seq[: len(prompt)] == prompt
        new = seq[len(prompt):]
        lg = torch.cat(g.logits, 0) if g.logits else torch.zeros(0, self.spec.vocab)
        assert lg.shape[0] == len(new)
        eos = bool(new) and new[-1] == EOS
        if eos:
            new = new[:-1]
        assert EOS not in new
        top2 = lg.topk(2, dim=-1).values if lg.shape[0] else torch.zeros(0, 2)
        return Generation(ids=new, eos=eos, logits=_np(lg), margins=_np(top2[:, 0] - top2[:, 1]),
                          prompt_ids=prompt, n_positions=n_pos)

    def generate(self, audio: np.ndarray, *, padded: bool = False) -> list[int]:
        """Greedy generated ids (specials included; prompt and EOS excluded)."""
        return self.generate_full(audio, padded=padded).ids


class _capture:
    """Context manager: forward hooks storing each module's output (first element of tuples)."""

    def __init__(self, modules):
        self.modules = list(modules)
        self.store: dict[int, Any] = {}
        self.hooks = []

    def __enter__(self):
        for i, m in enumerate(self.modules):
            def hook(_m, _inp, out, i=i):
                self.store[i] = out[0] if isinstance(out, tuple) else out
            self.hooks.append(m.register_forward_hook(hook))
        return self.store

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return False

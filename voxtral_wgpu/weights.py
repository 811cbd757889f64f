"""Checkpoint loading: one name table, tensor sources, and the GPU-resident ``Weights``.

Layout decisions happen here, once:

* BF16 matrices stay BF16: their raw 16-bit words are uploaded unchanged and widened to f32 in
  the shader (exact: a BF16 is the top half of an f32). That halves memory versus f32 and needs
  no ``shader-f16`` feature (BF16 -> F16 would also be lossy).
* q/k rows keep the Mistral-native interleaved-RoPE order (spec §1.2); the rope shader rotates
  adjacent pairs, so nothing is permuted.
* Conv weights ``[C_out, C_in, 3]`` are reordered to ``[C_out, 3, C_in]`` so the causal conv is a
  plain linear layer over three consecutive time-major input rows.
* Norm weights and biases become f32 (tiny). The decoder's ada time-conditioning MLP stays on the
  host: it depends only on the delay, so ``model.py`` folds it into the FFN norm weight.
* Matrices larger than the device's max storage binding (the 131072-row embedding) are split
  into row chunks.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .ops import DenseWeight

ENC = "mm_streams_embeddings.embedding_module.whisper_encoder"
MM = "mm_streams_embeddings.embedding_module"

# Mistral-native tensor names ({i} = layer index), spec §1.2.
ENCODER_NAMES = {
    "conv0.weight": f"{ENC}.conv_layers.0.conv.weight",
    "conv0.bias": f"{ENC}.conv_layers.0.conv.bias",
    "conv1.weight": f"{ENC}.conv_layers.1.conv.weight",
    "conv1.bias": f"{ENC}.conv_layers.1.conv.bias",
    "norm": f"{ENC}.transformer.norm.weight",
}
ENCODER_LAYER_NAMES = {
    "attention_norm": f"{ENC}.transformer.layers.{{i}}.attention_norm.weight",
    "wq": f"{ENC}.transformer.layers.{{i}}.attention.wq.weight",
    "wq.bias": f"{ENC}.transformer.layers.{{i}}.attention.wq.bias",
    "wk": f"{ENC}.transformer.layers.{{i}}.attention.wk.weight",
    "wv": f"{ENC}.transformer.layers.{{i}}.attention.wv.weight",
    "wv.bias": f"{ENC}.transformer.layers.{{i}}.attention.wv.bias",
    "wo": f"{ENC}.transformer.layers.{{i}}.attention.wo.weight",
    "wo.bias": f"{ENC}.transformer.layers.{{i}}.attention.wo.bias",
    "ffn_norm": f"{ENC}.transformer.layers.{{i}}.ffn_norm.weight",
    "w1": f"{ENC}.transformer.layers.{{i}}.feed_forward.w1.weight",
    "w2": f"{ENC}.transformer.layers.{{i}}.feed_forward.w2.weight",
    "w2.bias": f"{ENC}.transformer.layers.{{i}}.feed_forward.w2.bias",
    "w3": f"{ENC}.transformer.layers.{{i}}.feed_forward.w3.weight",
}
ADAPTER_NAMES = {
    "adapter0": f"{MM}.audio_language_projection.0.weight",
    "adapter2": f"{MM}.audio_language_projection.2.weight",
    "tok_embeddings": f"{MM}.tok_embeddings.weight",
}
DECODER_NAMES = {"norm": "norm.weight"}
DECODER_LAYER_NAMES = {
    "attention_norm": "layers.{i}.attention_norm.weight",
    "wq": "layers.{i}.attention.wq.weight",
    "wk": "layers.{i}.attention.wk.weight",
    "wv": "layers.{i}.attention.wv.weight",
    "wo": "layers.{i}.attention.wo.weight",
    "ffn_norm": "layers.{i}.ffn_norm.weight",
    "w1": "layers.{i}.feed_forward.w1.weight",
    "w2": "layers.{i}.feed_forward.w2.weight",
    "w3": "layers.{i}.feed_forward.w3.weight",
    "ada_down": "layers.{i}.ada_rms_norm_t_cond.0.weight",
    "ada_up": "layers.{i}.ada_rms_norm_t_cond.2.weight",
}
ALIASES = {f"{MM}.tok_embeddings.weight": ["tok_embeddings.weight"]}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint with its PyTorch shape ``[out, in]``."""
    e, d = cfg.encoder, cfg.decoder
    shapes = {
        ENCODER_NAMES["conv0.weight"]: (e.dim, e.num_mel_bins, 3),
        ENCODER_NAMES["conv0.bias"]: (e.dim,),
        ENCODER_NAMES["conv1.weight"]: (e.dim, e.dim, 3),
        ENCODER_NAMES["conv1.bias"]: (e.dim,),
        ENCODER_NAMES["norm"]: (e.dim,),
        ADAPTER_NAMES["adapter0"]: (d.dim, cfg.adapter_in),
        ADAPTER_NAMES["adapter2"]: (d.dim, d.dim),
        ADAPTER_NAMES["tok_embeddings"]: (d.vocab_size, d.dim),
        DECODER_NAMES["norm"]: (d.dim,),
    }
    eq, ekv = e.n_heads * e.head_dim, e.n_kv_heads * e.head_dim
    enc_layer = {"attention_norm": (e.dim,), "wq": (eq, e.dim), "wq.bias": (eq,), "wk": (ekv, e.dim),
                 "wv": (ekv, e.dim), "wv.bias": (ekv,), "wo": (e.dim, eq), "wo.bias": (e.dim,),
                 "ffn_norm": (e.dim,), "w1": (e.hidden_dim, e.dim), "w2": (e.dim, e.hidden_dim),
                 "w2.bias": (e.dim,), "w3": (e.hidden_dim, e.dim)}
    dq, dkv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    dec_layer = {"attention_norm": (d.dim,), "wq": (dq, d.dim), "wk": (dkv, d.dim), "wv": (dkv, d.dim),
                 "wo": (d.dim, dq), "ffn_norm": (d.dim,), "w1": (d.hidden_dim, d.dim),
                 "w2": (d.dim, d.hidden_dim), "w3": (d.hidden_dim, d.dim), "ada_down": (d.ada_dim, d.dim),
                 "ada_up": (d.dim, d.ada_dim)}
    for i in range(e.n_layers):
        for k, s in enc_layer.items():
            shapes[ENCODER_LAYER_NAMES[k].format(i=i)] = s
    for i in range(d.n_layers):
        for k, s in dec_layer.items():
            shapes[DECODER_LAYER_NAMES[k].format(i=i)] = s
    return shapes


class WeightsError(ValueError):
    """A checkpoint that does not match the model: names the file and the tensor."""


# ---------------------------------------------------------------------------- tensor sources
class SafetensorsFile:
    """Tensor-by-tensor reader of a ``.safetensors`` file.

    The safetensors library has no NumPy dtype for BF16, so this reads the (documented) header
    itself: 8-byte little-endian header length, a JSON table {name: {dtype, shape, data_offsets}},
    then raw little-endian data. Tensors are read with positioned reads, one at a time, so host
    memory never holds the whole model."""

    DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4), "F64": (np.float64, 8),
              "I64": (np.int64, 8), "I32": (np.int32, 4), "U8": (np.uint8, 1)}

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: checkpoint file not found") from None
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise WeightsError(f"{self.path}: corrupt safetensors header (claims {n} bytes, file has {size})")
        try:
            table = json.loads(self._f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{self.path}: corrupt safetensors header ({e})") from None
        table.pop("__metadata__", None)
        self._data_start = 8 + n
        self._tensors = {}
        for name, t in table.items():
            try:
                dtype, shape, (begin, end) = t["dtype"], tuple(int(s) for s in t["shape"]), t["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{self.path}: tensor {name!r} has a malformed header entry") from None
            if dtype not in self.DTYPES:
                raise WeightsError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.DTYPES[dtype][1]
            if end - begin != nbytes or begin < 0 or self._data_start + end > size:
                raise WeightsError(f"{self.path}: tensor {name!r} data range [{begin}, {end}) does not fit "
                                   f"its shape {list(shape)} {dtype} or the file ({size} bytes): truncated?")
            self._tensors[name] = (dtype, shape, begin)

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        dtype, shape, _ = self._tensors[name]
        return dtype, shape

    def read(self, name: str) -> np.ndarray:
        """The tensor's raw values (BF16 as uint16 words) in its PyTorch shape."""
        dtype, shape, begin = self._tensors[name]
        np_dtype, itemsize = self.DTYPES[dtype]
        n = int(np.prod(shape, dtype=np.int64))
        out = np.empty(n, dtype=np_dtype)
        self._f.seek(self._data_start + begin)
        got = self._f.readinto(memoryview(out).cast("B"))
        if got != n * itemsize:
            raise WeightsError(f"{self.path}: tensor {name!r} is truncated")
        return out.reshape(shape)

    def close(self):
        self._f.close()


def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def to_f32(dtype: str, raw: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(raw)
    return raw.astype(np.float32)


# ---------------------------------------------------------------------------- GPU weights
@dataclass
class EncoderLayer:
    attention_norm: object  # f32 [dim]
    wq: DenseWeight  # [n_heads*head_dim, dim] + bias
    wk: DenseWeight  # [n_kv_heads*head_dim, dim], no bias
    wv: DenseWeight  # + bias
    wo: DenseWeight  # [dim, n_heads*head_dim] + bias
    ffn_norm: object
    w1: DenseWeight  # gate [hidden, dim]
    w2: DenseWeight  # down [dim, hidden] + bias
    w3: DenseWeight  # up [hidden, dim]


@dataclass
class DecoderLayer:
    attention_norm: object
    wq: DenseWeight  # [n_heads*head_dim, dim]
    wk: DenseWeight  # [n_kv_heads*head_dim, dim]
    wv: DenseWeight
    wo: DenseWeight  # [dim, n_heads*head_dim]
    ffn_norm_host: np.ndarray  # f32 [dim]; times (1 + ada scale) per delay -> GPU in model.py
    w1: DenseWeight
    w2: DenseWeight
    w3: DenseWeight
    ada_down: np.ndarray  # f32 [ada_dim, dim]  (host: depends only on the delay)
    ada_up: np.ndarray  # f32 [dim, ada_dim]


@dataclass
class Weights:
    cfg: ModelConfig
    conv0: DenseWeight  # [enc_dim, 3*128] (reordered [C_out, 3, C_in]) + bias
    conv1: DenseWeight  # [enc_dim, 3*enc_dim] + bias
    enc_layers: list
    enc_norm: object
    adapter0: DenseWeight  # [dec_dim, 4*enc_dim]
    adapter2: DenseWeight  # [dec_dim, dec_dim]
    tok_embeddings: DenseWeight  # [vocab, dec_dim], also the tied LM head
    dec_layers: list
    norm: object
    nbytes: int = 0
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        """True for a GGUF-quantised model (Q4_0 / Q8_0 linear weights)."""
        return getattr(self.tok_embeddings, "dtype", "") in ("q4_0", "q8_0")


class Uploader:
    """Turns raw tensors into GPU objects, recording sizes."""

    def __init__(self, gpu):
        self.gpu = gpu
        self.nbytes = 0

    def vector(self, arr: np.ndarray, label: str):
        buf = self.gpu.upload(np.ascontiguousarray(arr, dtype=np.float32), label)
        self.nbytes += buf.size
        return buf

    def dense(self, raw: np.ndarray, dtype: str, label: str, bias: np.ndarray | None = None) -> DenseWeight:
        """A [n, k] matrix as BF16 words (dtype 'BF16') or f32 (anything else), row-chunked to fit
        one storage binding."""
        if dtype == "BF16":
            data, kind = np.ascontiguousarray(raw, dtype=np.uint16), "bf16"
        else:
            data, kind = np.ascontiguousarray(raw, dtype=np.float32), "f32"
        w = self.allocate_dense(data.shape[0], data.shape[1], kind, label)
        for buf, r0, nrows in w.chunks:
            self.gpu.write(buf, data[r0:r0 + nrows])
        w.bias = self.vector(bias, label + ".bias") if bias is not None else None
        return w

    def allocate_dense(self, n: int, k: int, kind: str, label: str) -> DenseWeight:
        """GPU storage for a [n, k] 'bf16' or 'f32' matrix, split into row chunks that each fit one
        storage binding (the 131072-row embedding exceeds WebGPU's default 128 MiB)."""
        itemsize = 2 if kind == "bf16" else 4
        limit = min(self.gpu.max_binding, self.gpu.max_buffer)
        rows_per_chunk = max(1, limit // (k * itemsize))
        if kind == "bf16" and rows_per_chunk < n and (rows_per_chunk * k) % 2:
            rows_per_chunk -= 1  # keep chunks on whole u32 words
        chunks = []
        for r0 in range(0, n, rows_per_chunk):
            nrows = min(rows_per_chunk, n - r0)
            buf = self.gpu.empty(nrows * k * itemsize, f"{label}[{r0}:]")
            chunks.append((buf, r0, nrows))
            self.nbytes += buf.size
        return DenseWeight(n, k, kind, chunks, None)


def load_safetensors(gpu, model_dir: Path, cfg: ModelConfig, progress=None) -> Weights:
    """Load ``consolidated.safetensors`` (Mistral-native names) onto the GPU."""
    path = Path(model_dir) / "consolidated.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; a Mistral-native model directory holds params.json, "
                                "consolidated.safetensors and tekken.json")
    src = SafetensorsFile(path)
    try:
        return build_weights(gpu, src, cfg, str(path), progress)
    finally:
        src.close()


def build_weights(gpu, src, cfg: ModelConfig, source: str, progress=None) -> Weights:
    """Check every tensor's presence, shape and dtype against ``cfg``, then upload tensor by tensor.

    ``src`` offers ``names()``, ``info(name) -> (dtype, shape)`` and ``read(name) -> ndarray``."""
    shapes = expected_shapes(cfg)
    present = set(src.names())
    resolved = {}
    for name in shapes:
        cands = [name] + ALIASES.get(name, [])
        hit = next((c for c in cands if c in present), None)
        if hit is None:
            raise WeightsError(f"{source}: missing tensor {name!r}")
        resolved[name] = hit
    extra = present - set(resolved.values())
    if extra:
        raise WeightsError(f"{source}: unexpected tensors {sorted(extra)[:5]}{' ...' if len(extra) > 5 else ''} "
                           "(does params.json match this checkpoint?)")
    for name, shape in shapes.items():
        dtype, got = src.info(resolved[name])
        if tuple(got) != shape:
            raise WeightsError(f"{source}: tensor {name!r} has shape {list(got)}, params.json implies {list(shape)}")
        if dtype not in ("BF16", "F16", "F32"):
            raise WeightsError(f"{source}: tensor {name!r} has dtype {dtype}; expected BF16, F16 or F32")

    up = Uploader(gpu)
    done = [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], len(shapes))

    def raw(name):
        dtype, _ = src.info(resolved[name])
        tick()
        return dtype, src.read(resolved[name])

    def vec(name):
        dtype, r = raw(name)
        return to_f32(dtype, r)

    def dense(name, label, bias_name=None):
        dtype, r = raw(name)
        if dtype == "F16":
            dtype, r = "F32", r.astype(np.float32)
        b = vec(bias_name) if bias_name else None
        return up.dense(r, dtype, label, b)

    def conv(name, bias_name, label):
        dtype, r = raw(name)
        if dtype == "F16":
            dtype, r = "F32", r.astype(np.float32)
        reordered = np.ascontiguousarray(r.transpose(0, 2, 1)).reshape(r.shape[0], 3 * r.shape[1])
        return up.dense(reordered, dtype, label, vec(bias_name))

    return assemble_weights(cfg, matrix=dense, conv=conv, token_table=dense,
                            gpu_vector=lambda name, label: up.vector(vec(name), label), host_vector=vec,
                            nbytes=lambda: up.nbytes, source=source)


def assemble_weights(cfg: ModelConfig, *, matrix, conv, token_table, gpu_vector, host_vector, nbytes,
                     source: str) -> Weights:
    """The model's tensors in reading order, each made by the loader's own callables (so the
    safetensors and GGUF loaders share one list): ``matrix(name, label, bias_name=None)``,
    ``conv(weight_name, bias_name, label)``, ``token_table(name, label)``, ``gpu_vector(name, label)``,
    ``host_vector(name)``; ``nbytes()`` is read once everything is uploaded."""
    e_, d_ = cfg.encoder, cfg.decoder
    conv0 = conv(ENCODER_NAMES["conv0.weight"], ENCODER_NAMES["conv0.bias"], "conv0")
    conv1 = conv(ENCODER_NAMES["conv1.weight"], ENCODER_NAMES["conv1.bias"], "conv1")
    enc_layers = []
    for i in range(e_.n_layers):
        n = {k: v.format(i=i) for k, v in ENCODER_LAYER_NAMES.items()}
        enc_layers.append(EncoderLayer(
            attention_norm=gpu_vector(n["attention_norm"], f"enc{i}.attention_norm"),
            wq=matrix(n["wq"], f"enc{i}.wq", n["wq.bias"]),
            wk=matrix(n["wk"], f"enc{i}.wk"),
            wv=matrix(n["wv"], f"enc{i}.wv", n["wv.bias"]),
            wo=matrix(n["wo"], f"enc{i}.wo", n["wo.bias"]),
            ffn_norm=gpu_vector(n["ffn_norm"], f"enc{i}.ffn_norm"),
            w1=matrix(n["w1"], f"enc{i}.w1"),
            w2=matrix(n["w2"], f"enc{i}.w2", n["w2.bias"]),
            w3=matrix(n["w3"], f"enc{i}.w3"),
        ))
    enc_norm = gpu_vector(ENCODER_NAMES["norm"], "enc.norm")
    adapter0 = matrix(ADAPTER_NAMES["adapter0"], "adapter0")
    adapter2 = matrix(ADAPTER_NAMES["adapter2"], "adapter2")
    tok = token_table(ADAPTER_NAMES["tok_embeddings"], "tok_embeddings")
    dec_layers = []
    for i in range(d_.n_layers):
        n = {k: v.format(i=i) for k, v in DECODER_LAYER_NAMES.items()}
        dec_layers.append(DecoderLayer(
            attention_norm=gpu_vector(n["attention_norm"], f"dec{i}.attention_norm"),
            wq=matrix(n["wq"], f"dec{i}.wq"),
            wk=matrix(n["wk"], f"dec{i}.wk"),
            wv=matrix(n["wv"], f"dec{i}.wv"),
            wo=matrix(n["wo"], f"dec{i}.wo"),
            ffn_norm_host=host_vector(n["ffn_norm"]),
            w1=matrix(n["w1"], f"dec{i}.w1"),
            w2=matrix(n["w2"], f"dec{i}.w2"),
            w3=matrix(n["w3"], f"dec{i}.w3"),
            ada_down=host_vector(n["ada_down"]),
            ada_up=host_vector(n["ada_up"]),
        ))
    norm = gpu_vector(DECODER_NAMES["norm"], "norm")
    return Weights(cfg, conv0, conv1, enc_layers, enc_norm, adapter0, adapter2, tok, dec_layers, norm,
                   nbytes=nbytes(), source=source)

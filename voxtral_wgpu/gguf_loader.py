"""GGUF checkpoints: a defensive GGUF reader (one file or byte shards) and the GPU weight builder.

Three layouts load to the same :class:`weights.Weights`:

(a) ours (``voxtral-wgpu quantize``): Mistral-native tensor names, Q4_0/Q8_0 matrices, F32 small
    tensors, hyper-parameters under ``voxtral_wgpu.encoder.*`` / ``voxtral_wgpu.decoder.*``;
(b) the Rust seed project's (TrevorS/voxtral-mini-realtime-rs): the same native names, Q4_0
    matrices, F32 or F16 small tensors, metadata absent or ignored;
(c) the ggml project's (voxtral.cpp): ``enc.blk.N.attn_q.weight``, ``dec.blk.N.ada0.weight``,
    ``adapter.0.weight``, ... with ``voxtral.encoder.*`` / ``voxtral.decoder.*`` metadata and
    F32/F16/BF16/Q8_0/Q4_0 tensors (its ``audio.mel_filters`` is ignored: the log-mel front end
    is built in).

Hyper-parameters: params.json beside the file (else the published model's values), overridden by
every hyper-parameter the GGUF metadata carries; then every tensor shape must match them.

The reader parses the GGUF container itself (the ``gguf`` package supplies the type constants):
``gguf.GGUFReader`` memory-maps one file, cannot read byte shards, and trusts counts and lengths.
Here every count, length and offset is checked against the bytes that exist before anything is
allocated, so a truncated or corrupt file raises :class:`weights.WeightsError` naming the file and
what was being read (a tensor, a metadata key), never crashes, hangs or allocates absurd sizes.
Tensor data is read with positioned reads, one tensor at a time; quantised matrices go to the GPU
as blocks (``ops_quant.upload_quant``) and are never dequantised on the host.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from .config import DecoderConfig, EncoderConfig, ModelConfig
from .ops_quant import dequantize_blocks, upload_quant
from .weights import (ADAPTER_NAMES, ALIASES, DECODER_LAYER_NAMES, DECODER_NAMES, ENCODER_LAYER_NAMES,
                      ENCODER_NAMES, Uploader, Weights, WeightsError, assemble_weights, expected_shapes)

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4
MAX_NAME = 1 << 16
MAX_ARRAY_DEPTH = 3
READ_AHEAD = 1 << 20
SHARD_RE = re.compile(r"^(?P<base>.+)\.part-(?P<idx>\d{3})$")
UPLOAD_SYNC_BYTES = 256 << 20  # submit queued uploads this often so staging memory is released

# GGUF value types -> (struct format, size)
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NP_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
               12: "<f8"}
_STRING, _ARRAY = 8, 9


# ============================================================================== byte stream
def shard_list(path: str | os.PathLike) -> list[Path]:
    """The files of one GGUF stream: ``[path]``, or ``NAME.part-000, -001, ...`` when ``path`` is a
    first shard (or a ``NAME.gguf`` that does not exist while ``NAME.gguf.part-000`` does)."""
    p = Path(path)
    m = SHARD_RE.match(p.name)
    if m is None and not p.exists() and p.with_name(p.name + ".part-000").is_file():
        p = p.with_name(p.name + ".part-000")
        m = SHARD_RE.match(p.name)
    if m is None:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: GGUF file not found")
        return [p]
    if int(m.group("idx")) != 0:
        raise WeightsError(f"{p}: pass the first shard ({m.group('base')}.part-000)")
    parts = []
    i = 0
    while True:
        q = p.with_name(f"{m.group('base')}.part-{i:03d}")
        if not q.is_file():
            break
        parts.append(q)
        i += 1
    if not parts:
        raise FileNotFoundError(f"{p}: GGUF shard not found")
    extra = p.with_name(f"{m.group('base')}.part-{i + 1:03d}")
    if extra.is_file():
        raise WeightsError(f"{p}: shard {q.name} is missing but {extra.name} exists")
    return parts


class ByteStream:
    """Positioned reads over one file or a list of byte shards, as one stream."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self.name = str(self.paths[0]) + (f" (+{len(self.paths) - 1} shards)" if len(self.paths) > 1 else "")
        self._files = []
        self.starts = []
        pos = 0
        try:
            for p in self.paths:
                f = open(p, "rb")
                self._files.append(f)
                self.starts.append(pos)
                pos += os.fstat(f.fileno()).st_size
        except OSError:
            self.close()
            raise
        self.size = pos

    def readinto(self, offset: int, out) -> None:
        """Fill ``out`` (a writable buffer) with bytes ``[offset, offset + len)``; the caller has
        checked the range against ``size``."""
        mv = memoryview(out).cast("B")
        n = len(mv)
        if offset < 0 or offset + n > self.size:
            raise WeightsError(f"{self.name}: read of {n} bytes at {offset} beyond the end ({self.size} bytes)")
        done = 0
        i = max(0, np.searchsorted(self.starts, offset, side="right") - 1)
        while done < n:
            f = self._files[i]
            local = offset + done - self.starts[i]
            end = self.starts[i + 1] if i + 1 < len(self.starts) else self.size
            take = min(n - done, end - (offset + done))
            f.seek(local)
            got = f.readinto(mv[done:done + take])
            if got != take:
                raise WeightsError(f"{self.paths[i]}: file changed while reading (short read)")
            done += take
            i += 1

    def read(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.readinto(offset, buf)
        return bytes(buf)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []


class _Cursor:
    """Sequential reader of the header with read-ahead; every read is bounds-checked first."""

    def __init__(self, stream: ByteStream):
        self.s = stream
        self.pos = 0
        self._buf = b""
        self._buf_at = 0

    def remaining(self) -> int:
        return self.s.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.remaining():
            raise WeightsError(f"{self.s.name}: truncated or corrupt GGUF header: {what} needs {n} bytes at "
                               f"offset {self.pos}, the file has {self.remaining()} left")
        lo = self.pos - self._buf_at
        if lo < 0 or lo + n > len(self._buf):
            self._buf_at = self.pos
            self._buf = self.s.read(self.pos, min(max(n, READ_AHEAD), self.remaining()))
            lo = 0
        self.pos += n
        return self._buf[lo:lo + n]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(what + " length")
        if limit is not None and n > limit:
            raise WeightsError(f"{self.s.name}: corrupt GGUF header: {what} claims {n} bytes")
        return self.take(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            fmt, n = _SCALARS[vtype]
            return struct.unpack(fmt, self.take(n, what))[0]
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise WeightsError(f"{self.s.name}: corrupt GGUF header: {what} nests arrays too deeply")
            etype = self.u32(what + " element type")
            count = self.u64(what + " element count")
            if etype in _SCALARS:
                size = _SCALARS[etype][1]
                if count > self.remaining() // size:
                    raise WeightsError(f"{self.s.name}: truncated or corrupt GGUF header: {what} claims "
                                       f"{count} elements, the file has {self.remaining()} bytes left")
                arr = np.frombuffer(self.take(count * size, what), dtype=_NP_SCALARS[etype]).copy()
                return arr.astype(bool) if etype == 7 else arr
            if etype in (_STRING, _ARRAY):
                if count > self.remaining() // (8 if etype == _STRING else 12):
                    raise WeightsError(f"{self.s.name}: truncated or corrupt GGUF header: {what} claims "
                                       f"{count} elements, the file has {self.remaining()} bytes left")
                return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]
            raise WeightsError(f"{self.s.name}: corrupt GGUF header: {what} has unknown element type {etype}")
        raise WeightsError(f"{self.s.name}: corrupt GGUF header: {what} has unknown value type {vtype}")


# ============================================================================== GGUF file
@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    type_name: str
    shape: tuple  # PyTorch order (ne reversed): [out, in] for matrices
    offset: int  # absolute byte offset in the stream
    nbytes: int


class GgufFile:
    """A parsed GGUF stream: ``metadata`` {key: value}, ``tensors`` {name: TensorInfo}, reads."""

    def __init__(self, path: str | os.PathLike):
        self.paths = shard_list(path)
        self.stream = ByteStream(self.paths)
        self.name = self.stream.name
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _err(self, msg: str) -> WeightsError:
        return WeightsError(f"{self.name}: {msg}")

    def _parse(self) -> None:
        import gguf

        c = _Cursor(self.stream)
        if self.stream.size < 24:
            raise self._err(f"too short to be a GGUF file ({self.stream.size} bytes)")
        magic = c.take(4, "magic")
        if magic != GGUF_MAGIC:
            raise self._err(f"not a GGUF file (magic {magic!r})")
        version = c.u32("version")
        if version in (2, 3):
            pass
        elif version == 1:
            raise self._err("GGUF version 1 is not supported (re-convert with a current gguf writer)")
        elif version & 0xFFFF == 0 and version >> 16:
            raise self._err("big-endian GGUF files are not supported")
        else:
            raise self._err(f"unsupported GGUF version {version}")
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        if n_tensors > c.remaining() // 24 or n_kv > c.remaining() // 13:
            raise self._err(f"corrupt GGUF header: {n_tensors} tensors / {n_kv} metadata entries cannot fit "
                            f"in {self.stream.size} bytes")
        self.version = version
        self.metadata: dict = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}", limit=MAX_NAME)
            vtype = c.u32(f"type of metadata {key!r}")
            self.metadata[key] = c.value(vtype, f"metadata {key!r}")
        align = self.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(align, (int, np.integer)) or isinstance(align, bool) or align <= 0 or align & (align - 1) \
                or align > (1 << 24):
            raise self._err(f"corrupt GGUF header: general.alignment = {align!r} is not a power of two")
        self.alignment = int(align)
        infos = []
        for i in range(n_tensors):
            name = c.string(f"name of tensor #{i}", limit=MAX_NAME)
            n_dims = c.u32(f"tensor {name!r} dimension count")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._err(f"corrupt GGUF header: tensor {name!r} has {n_dims} dimensions")
            ne = [c.u64(f"tensor {name!r} dimension {j}") for j in range(n_dims)]
            ttype = c.u32(f"tensor {name!r} type")
            offset = c.u64(f"tensor {name!r} offset")
            infos.append((name, ne, ttype, offset))
        self.data_start = -(-c.pos // self.alignment) * self.alignment
        data_size = self.stream.size - self.data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ttype, offset in infos:
            if name in self.tensors:
                raise self._err(f"corrupt GGUF header: tensor {name!r} appears twice")
            try:
                qt = gguf.GGMLQuantizationType(ttype)
            except ValueError:
                raise self._err(f"tensor {name!r} has unknown ggml type {ttype}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qt]
            if ne[0] % block:
                raise self._err(f"tensor {name!r} ({qt.name}) has rows of {ne[0]} elements, "
                                f"not a multiple of the {block}-element block")
            n_el = math.prod(ne)
            nbytes = n_el // block * type_size
            if offset > data_size or nbytes > data_size - offset:
                raise self._err(f"tensor {name!r} ({qt.name} {list(reversed(ne))}) needs bytes "
                                f"[{offset}, {offset + nbytes}) of the data section, which has {max(data_size, 0)}: "
                                "truncated file?")
            self.tensors[name] = TensorInfo(name, int(ttype), qt.name, tuple(int(v) for v in reversed(ne)),
                                            self.data_start + offset, nbytes)

    # ------------------------------------------------------------------ reads
    def read_raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (uint8 [nbytes])."""
        t = self.tensors[name]
        out = np.empty(t.nbytes, dtype=np.uint8)
        try:
            self.stream.readinto(t.offset, out)
        except WeightsError as e:
            raise self._err(f"tensor {name!r}: {e}") from None
        return out

    def read_rows_raw(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Bytes of rows ``r0 .. r1-1`` (first dimension) of a tensor, uint8 ``[r1 - r0, row_bytes]``."""
        t = self.tensors[name]
        row_bytes = t.nbytes // t.shape[0]
        out = np.empty((r1 - r0, row_bytes), dtype=np.uint8)
        try:
            self.stream.readinto(t.offset + r0 * row_bytes, out)
        except WeightsError as e:
            raise self._err(f"tensor {name!r}: {e}") from None
        return out

    def read_f32(self, name: str) -> np.ndarray:
        """The tensor as float32 in its PyTorch shape (dequantised on the host: small tensors only)."""
        t = self.tensors[name]
        raw = self.read_raw(name)
        if t.type_name == "F32":
            a = raw.view("<f4")
        elif t.type_name == "F16":
            a = raw.view("<f2").astype(np.float32)
        elif t.type_name == "BF16":
            a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif t.type_name in ("Q4_0", "Q8_0"):
            a = dequantize_blocks(raw, int(np.prod(t.shape[:-1])), t.shape[-1], t.type_name.lower())
        elif t.type_name in ("F64",):
            a = raw.view("<f8").astype(np.float32)
        else:
            import gguf

            try:
                a = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.ggml_type))
            except NotImplementedError:
                raise self._err(f"tensor {name!r} has type {t.type_name}, which cannot be dequantised") from None
        return np.asarray(a, dtype=np.float32).reshape(t.shape)

    def close(self) -> None:
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ============================================================================== naming
def _ggml_table(cfg: ModelConfig) -> dict[str, str]:
    """ggml-project name -> Mistral-native name (spec §9)."""
    m = {
        "enc.conv0.weight": ENCODER_NAMES["conv0.weight"], "enc.conv0.bias": ENCODER_NAMES["conv0.bias"],
        "enc.conv1.weight": ENCODER_NAMES["conv1.weight"], "enc.conv1.bias": ENCODER_NAMES["conv1.bias"],
        "enc.norm.weight": ENCODER_NAMES["norm"],
        "adapter.0.weight": ADAPTER_NAMES["adapter0"], "adapter.2.weight": ADAPTER_NAMES["adapter2"],
        "tok_embeddings.weight": ADAPTER_NAMES["tok_embeddings"], "norm.weight": DECODER_NAMES["norm"],
    }
    enc = {"attn_norm.weight": "attention_norm", "attn_q.weight": "wq", "attn_q.bias": "wq.bias",
           "attn_k.weight": "wk", "attn_v.weight": "wv", "attn_v.bias": "wv.bias", "attn_o.weight": "wo",
           "attn_o.bias": "wo.bias", "ffn_norm.weight": "ffn_norm", "ffn_w1.weight": "w1", "ffn_w2.weight": "w2",
           "ffn_w2.bias": "w2.bias", "ffn_w3.weight": "w3"}
    dec = {"attn_norm.weight": "attention_norm", "attn_q.weight": "wq", "attn_k.weight": "wk", "attn_v.weight": "wv",
           "attn_o.weight": "wo", "ffn_norm.weight": "ffn_norm", "ffn_w1.weight": "w1", "ffn_w2.weight": "w2",
           "ffn_w3.weight": "w3", "ada0.weight": "ada_down", "ada2.weight": "ada_up"}
    for i in range(cfg.encoder.n_layers):
        for g, k in enc.items():
            m[f"enc.blk.{i}.{g}"] = ENCODER_LAYER_NAMES[k].format(i=i)
    for i in range(cfg.decoder.n_layers):
        for g, k in dec.items():
            m[f"dec.blk.{i}.{g}"] = DECODER_LAYER_NAMES[k].format(i=i)
    return m


GGML_IGNORED = {"audio.mel_filters"}


def detect_layout(f: GgufFile) -> str:
    """'voxtral_wgpu' (ours), 'ggml' (voxtral.cpp naming) or 'native' (the seed project's)."""
    names = f.tensors.keys()
    if any(n.startswith(("enc.", "dec.blk.", "adapter.")) for n in names):
        return "ggml"
    if any(k.startswith("voxtral_wgpu.") for k in f.metadata):
        return "voxtral_wgpu"
    return "native"


# ============================================================================== config
_GGML_KEYS = {
    "encoder": ("dim", "n_layers", "n_heads", "head_dim", "hidden_dim", "n_kv_heads", "norm_eps", "rope_theta"),
    "decoder": ("dim", "n_layers", "n_heads", "head_dim", "hidden_dim", "n_kv_heads", "norm_eps", "rope_theta"),
}


def resolve_config(f: GgufFile, params_json: Path | None) -> tuple[ModelConfig, str]:
    """params.json beside the file (else the published values), overridden by GGUF metadata."""
    if params_json is not None and params_json.is_file():
        cfg, source = ModelConfig.from_file(params_json), str(params_json)
    else:
        cfg, source = ModelConfig(), "the published model's hyper-parameters"
    over: dict[str, dict] = {"encoder": {}, "decoder": {}}
    meta = f.metadata
    for section, cls in (("encoder", EncoderConfig), ("decoder", DecoderConfig)):
        for fld in fields(cls):
            key = f"voxtral_wgpu.{section}.{fld.name}"
            if key in meta:
                over[section][fld.name] = (key, meta[key], fld.type)
        for name in _GGML_KEYS[section]:
            key = f"voxtral.{section}.{name}"
            if key in meta and name not in over[section]:
                over[section][name] = (key, meta[key], next(x.type for x in fields(cls) if x.name == name))
    if "voxtral.vocab_size" in meta and "vocab_size" not in over["decoder"]:
        over["decoder"]["vocab_size"] = ("voxtral.vocab_size", meta["voxtral.vocab_size"], "int")
    if "voxtral.audio.downsample_factor" in meta and "downsample_factor" not in over["encoder"]:
        over["encoder"]["downsample_factor"] = ("voxtral.audio.downsample_factor",
                                                meta["voxtral.audio.downsample_factor"], "int")
    if any(over.values()):
        source = f"the GGUF metadata of {f.name}" + (f" over {source}" if params_json and params_json.is_file() else "")
    parts = {}
    for section in ("encoder", "decoder"):
        vals = {}
        for name, (key, v, ty) in over[section].items():
            is_int = ty in (int, "int")
            ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            if ok and is_int:
                ok = float(v).is_integer() and 0 < v < 2**31
            elif ok:
                ok = math.isfinite(float(v))
            if not ok:
                kind = "integer" if is_int else "number"
                raise WeightsError(f"{f.name}: metadata {key} = {v!r} is not a valid {kind}")
            if is_int:
                vals[name] = int(v)
            else:
                v = float(v)
                short = float(str(np.float32(v)))  # a float32 value (voxtral.cpp's keys): 1e-5, not 9.99999974e-06
                vals[name] = short if float(np.float32(short)) == v else v
        parts[section] = replace(getattr(cfg, section), **vals)
    cfg = ModelConfig(parts["encoder"], parts["decoder"])
    try:
        cfg.validate(source)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    return cfg, source


# ============================================================================== loader
MATRIX_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q8_0")
HOST_TYPES = ("F32", "F16", "BF16", "F64", "Q4_0", "Q8_0")  # any the gguf package dequantises is also accepted


def _n_tensors(cfg: ModelConfig) -> int:
    return len(ENCODER_NAMES) + len(ADAPTER_NAMES) + len(DECODER_NAMES) + \
        cfg.encoder.n_layers * len(ENCODER_LAYER_NAMES) + cfg.decoder.n_layers * len(DECODER_LAYER_NAMES)


def resolve_tensors(f: GgufFile, cfg: ModelConfig, cfg_source: str) -> tuple[dict[str, str], str]:
    """Native name -> name in the file, after checking presence, shapes and types."""
    layout = detect_layout(f)
    arch = f.metadata.get("general.architecture")
    if layout == "ggml" and arch == "voxtral":  # voxtral.cpp's name for the offline (non-Realtime) model
        raise WeightsError(f"{f.name}: general.architecture 'voxtral' is the offline Voxtral model; this loader "
                           "reads Voxtral Realtime checkpoints ('voxtral_realtime')")
    names = set(f.tensors)
    if layout == "ggml":
        names -= GGML_IGNORED
    # a corrupt layer count must not make us build millions of names
    if _n_tensors(cfg) > len(names) + 16:
        raise WeightsError(f"{f.name}: {cfg_source} imply {_n_tensors(cfg)} tensors "
                           f"({cfg.encoder.n_layers} encoder and {cfg.decoder.n_layers} decoder layers); "
                           f"the file has {len(names)}")
    shapes = expected_shapes(cfg)
    resolved = {}
    if layout == "ggml":
        table = _ggml_table(cfg)
        inverse = {v: k for k, v in table.items()}
        for native in shapes:
            g = inverse[native]
            if g not in names:
                raise WeightsError(f"{f.name}: missing tensor {g!r} (native name {native!r})")
            resolved[native] = g
    else:
        for native in shapes:
            hit = next((c for c in [native] + ALIASES.get(native, []) if c in names), None)
            if hit is None:
                raise WeightsError(f"{f.name}: missing tensor {native!r}")
            resolved[native] = hit
    extra = names - set(resolved.values())
    if extra:
        raise WeightsError(f"{f.name}: unexpected tensors {sorted(extra)[:5]}{' ...' if len(extra) > 5 else ''} "
                           f"(hyper-parameters from {cfg_source})")
    host = {DECODER_LAYER_NAMES[k].format(i=i) for k in ("ada_down", "ada_up") for i in range(cfg.decoder.n_layers)}
    matrices = {n for n, s in shapes.items() if len(s) == 2 and n not in host}  # GPU linear weights
    for native, shape in shapes.items():
        t = f.tensors[resolved[native]]
        if t.shape != shape:
            raise WeightsError(f"{f.name}: tensor {resolved[native]!r} has shape {list(t.shape)}, "
                               f"{cfg_source} imply {list(shape)}")
        allowed = MATRIX_TYPES if native in matrices else None
        if allowed is not None and t.type_name not in allowed:
            raise WeightsError(f"{f.name}: tensor {resolved[native]!r} has type {t.type_name}; matrices must be "
                               f"{', '.join(allowed)}")
        if allowed is None and t.type_name not in HOST_TYPES:
            import gguf

            if gguf.GGMLQuantizationType(t.ggml_type) not in getattr(gguf.quants, "_type_traits", {}):
                raise WeightsError(f"{f.name}: tensor {resolved[native]!r} has unsupported type {t.type_name}")
    return resolved, layout


def load_gguf(gpu, path, *, tokenizer=None, progress=None, embeddings: str | None = None):
    """Load a GGUF checkpoint (one file or ``NAME.gguf.part-000`` shards) onto ``gpu``.

    Returns ``(Weights, tekken_path)``. ``tokenizer``: tekken.json when it is not beside the file.
    ``progress``: a callable ``(done, total)``, or a bool (None: a bar when stderr is a terminal).
    ``embeddings``: "gpu" (gather input embeddings from the quantised table on the GPU, default) or
    "cpu" (dequantise the rows on the host with the C extension, the browser build's way); default
    from $VOXTRAL_WGPU_EMBEDDINGS, else "gpu"."""
    mode = (embeddings or os.environ.get("VOXTRAL_WGPU_EMBEDDINGS") or "gpu").lower()
    if mode not in ("gpu", "cpu"):
        raise ValueError(f"embeddings must be 'gpu' or 'cpu', got {mode!r}")
    paths = shard_list(path)
    folder = paths[0].parent
    tok_path = Path(tokenizer) if tokenizer is not None else folder / "tekken.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path}: tekken.json not found" + (
            "" if tokenizer is not None else f" beside {paths[0].name}; pass the tokenizer path explicitly "
                                             "(tokenizer=... / --tokenizer)"))
    bar = None
    if progress is None or isinstance(progress, bool):
        from .api import _progress_bar

        bar = _progress_bar(progress, "loading")
        progress = bar
    f = GgufFile(paths[0])
    try:
        cfg, cfg_source = resolve_config(f, folder / "params.json")
        resolved, layout = resolve_tensors(f, cfg, cfg_source)
        weights = _build(gpu, f, cfg, resolved, progress, mode)
        weights.extra.update({"gguf_layout": layout, "config_source": cfg_source, "embeddings": mode,
                              "gguf_files": [str(p) for p in paths]})
        return weights, tok_path
    finally:
        f.close()
        if bar is not None:
            bar.close()


def _build(gpu, f: GgufFile, cfg: ModelConfig, resolved: dict, progress, mode: str) -> Weights:
    up = Uploader(gpu)
    total = len(resolved)
    state = {"done": 0, "since_sync": 0}

    def tick(nbytes: int):
        state["done"] += 1
        state["since_sync"] += nbytes
        if state["since_sync"] >= UPLOAD_SYNC_BYTES:
            _release_staging(gpu)
            state["since_sync"] = 0
        if progress is not None:
            progress(state["done"], total)

    def info(native):
        return f.tensors[resolved[native]]

    def vec(native) -> np.ndarray:
        a = f.read_f32(resolved[native])
        tick(a.nbytes)
        return a

    def gpu_vec(native, label):
        return up.vector(vec(native), label)

    def mat(native, label, bias_native=None, keep_host=False):
        t = info(native)
        n, k = t.shape
        if t.type_name in ("Q4_0", "Q8_0"):
            bias = gpu_vec(bias_native, label + ".bias") if bias_native else None
            w = upload_quant(gpu, lambda r0, r1: f.read_rows_raw(t.name, r0, r1), n, k, t.type_name.lower(), label,
                             bias=bias, keep_host=keep_host, embeddings=mode if keep_host else "gpu")
            up.nbytes += sum(b.size for b, _, _ in w.chunks)
            tick(t.nbytes)
            return w
        bias = vec(bias_native) if bias_native else None
        if t.type_name == "BF16":
            raw = f.read_raw(t.name).view("<u2").reshape(n, k)
            w = up.dense(raw, "BF16", label, bias)
        else:
            raw = f.read_f32(t.name)
            w = up.dense(raw, "F32", label, bias)
        tick(raw.nbytes)
        return w

    def conv(native_w, native_b, label):
        r = f.read_f32(resolved[native_w])
        reordered = np.ascontiguousarray(r.transpose(0, 2, 1)).reshape(r.shape[0], 3 * r.shape[1])
        tick(r.nbytes)
        return up.dense(reordered, "F32", label, vec(native_b))

    weights = assemble_weights(
        cfg, matrix=mat, conv=conv, token_table=lambda name, label: mat(name, label, keep_host=(mode == "cpu")),
        gpu_vector=gpu_vec, host_vector=vec, nbytes=lambda: up.nbytes, source=f.name)
    _release_staging(gpu)
    return weights


def _release_staging(gpu) -> None:
    """Submit the queued buffer uploads and wait, so wgpu frees their host staging copies (loading
    2.5 GB would otherwise keep 2.5 GB of staging memory alive until the first dispatch)."""
    gpu.flush()
    gpu.queue.submit([])
    gpu.sync()

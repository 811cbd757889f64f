"""``voxtral-wgpu quantize MODEL_DIR OUT.gguf``: Mistral-native BF16 checkpoint -> Q4_0 / Q8_0 GGUF.

The file (GGUF v3, written with the ``gguf`` library's writer) holds:

* every tensor under its Mistral-native name (spec §1.2), in the checkpoint's ``[out, in]`` shape;
* Q4_0 (or Q8_0) for every matrix of a linear layer: encoder/decoder wq wk wv wo w1 w2 w3, the
  adapter's two matrices, the decoder's ada_rms_norm_t_cond.0/.2 and ``tok_embeddings`` (also the
  tied LM head). Blocks are bit-identical to ``gguf.quants.quantize`` (ggml's reference quantiser).
  A matrix whose row length is not a multiple of 32 (never in the published model) stays F32;
* F32 for the conv weights, all biases and all norm weights;
* metadata (``general.architecture = "voxtral_realtime"``, ``general.file_type``, and):

  ``voxtral_wgpu.format_version``        u32  1
  ``voxtral_wgpu.naming``                str  "mistral-native"
  ``voxtral_wgpu.quantization``          str  "q4_0" / "q8_0"
  ``voxtral_wgpu.encoder.<field>``       u32/f64  every field of config.EncoderConfig
                                          (dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim,
                                          norm_eps, rope_theta, sliding_window, num_mel_bins,
                                          downsample_factor)
  ``voxtral_wgpu.decoder.<field>``       u32/f64  every field of config.DecoderConfig
                                          (..., sliding_window, vocab_size, ada_dim)
  ``voxtral_wgpu.params_json``           str  the source params.json verbatim (provenance)
  ``voxtral_wgpu.audio.<key>``           tekken.json's ``audio`` settings when tekken.json is in
                                          MODEL_DIR (sampling_rate, frame_rate,
                                          transcription_delay_ms, streaming_n_left_pad_tokens, ...);
                                          informational: the tokenizer still comes from tekken.json.

The loader (``gguf_loader.py``) takes the hyper-parameters from the ``voxtral_wgpu.encoder.*`` /
``voxtral_wgpu.decoder.*`` keys.

Streaming: the header (metadata + tensor table) is produced by ``gguf.GGUFWriter`` before any data
(``add_tensor_info`` needs only shapes), then each tensor is read from the safetensors file a slab
of rows at a time, quantised and appended, so host memory holds one slab (<= 64 MiB of f32) plus
the quantiser's temporaries, never the model.

``--shard-size 512MB`` splits the one GGUF byte stream into ``OUT.gguf.part-000``, ``-001``, ...
(plain byte split, like ``split -b``; at most 1000 parts); the loader reads the parts as one stream.

MODEL_DIR/tekken.json is copied beside the output, where the loader looks for it. An output that
is one of the inputs, or a different tekken.json already beside it, is refused before any work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .weights import ALIASES, SafetensorsFile, WeightsError, expected_shapes, to_f32

FORMAT_VERSION = 1
SLAB_ELEMENTS = 16 << 20  # f32 elements quantised per slab (64 MiB)
SHARD_SUFFIX = ".part-{:03d}"
MAX_SHARDS = 1000  # the suffix has three digits; the loader stops at the first missing part
MAX_SIZE = float(1 << 50)
INPUT_FILES = ("params.json", "consolidated.safetensors", "tekken.json")


def _gguf():
    import gguf

    return gguf


def parse_size(text: str | int | None) -> int | None:
    """'512MB' / '512M' / '2GiB' / '1000000' -> bytes (MB = 2^20, like ``split -b 512m``)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"invalid size {text!r} (examples: 512MB, 2GB, 1048576)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    x = float(m.group(1)) * mult
    if not x < MAX_SIZE:  # also a digit string so long that float() gives inf
        raise ValueError(f"size {text!r} is too large (at most 1 PiB)")
    n = int(x)
    if n <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


def shard_paths(out_path: Path, n: int) -> list[Path]:
    return [out_path.with_name(out_path.name + SHARD_SUFFIX.format(i)) for i in range(n)]


class _Sink:
    """Write-only byte stream into one file, or split into byte shards of ``shard_size``."""

    def __init__(self, out_path: Path, shard_size: int | None):
        self.out_path = out_path
        self.shard_size = shard_size
        self.paths: list[Path] = []
        self.pos = 0
        self._f = None
        self._left = 0

    def _next_file(self):
        if self._f is not None:
            self._f.close()
        path = (shard_paths(self.out_path, len(self.paths) + 1)[-1] if self.shard_size else self.out_path)
        self.paths.append(path)
        self._f = open(path, "wb")
        self._left = self.shard_size or (1 << 62)

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            if self._f is None or self._left == 0:
                self._next_file()
            n = min(len(mv), self._left)
            self._f.write(mv[:n])
            mv = mv[n:]
            self._left -= n
            self.pos += n

    def pad_to(self, alignment: int) -> None:
        pad = -self.pos % alignment
        if pad:
            self.write(bytes(pad))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _RowReader(SafetensorsFile):
    """SafetensorsFile plus reads of a row range, so a big matrix is never read whole."""

    def read_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        dtype, shape, begin = self._tensors[name]
        np_dtype, itemsize = self.DTYPES[dtype]
        row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        out = np.empty((r1 - r0) * row, dtype=np_dtype)
        self._f.seek(self._data_start + begin + r0 * row * itemsize)
        got = self._f.readinto(memoryview(out).cast("B"))
        if got != out.nbytes:
            raise WeightsError(f"{self.path}: tensor {name!r} is truncated")
        return out.reshape((r1 - r0,) + tuple(shape[1:]))


def _is_matrix(name: str, shape: tuple) -> bool:
    """Matrices of linear layers (quantised); conv weights are 3-D, norms and biases 1-D."""
    return len(shape) == 2


def _config_metadata(cfg: ModelConfig) -> list[tuple[str, object]]:
    out = []
    for section, obj in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        for f in fields(obj):
            out.append((f"voxtral_wgpu.{section}.{f.name}", getattr(obj, f.name)))
    return out


def _audio_metadata(model_dir: Path) -> list[tuple[str, object]]:
    tk = model_dir / "tekken.json"
    if not tk.is_file():
        return []
    try:
        audio = json.loads(tk.read_text(encoding="utf-8")).get("audio") or {}
    except (OSError, ValueError):
        return []
    out = []

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, (bool, int, float, str)):
                out.append((f"voxtral_wgpu.audio.{prefix}{k}", v))

    walk("", audio)
    return out


def quantize(model_dir, out_path, *, qtype: str = "q4_0", shard_size=None, progress=None) -> list[Path]:
    """Quantise ``MODEL_DIR`` (params.json + consolidated.safetensors) into ``out_path``.

    ``qtype``: "q4_0" or "q8_0". ``shard_size``: bytes (or a string such as "512MB") to split the
    output into byte shards ``out_path.part-000`` ...; None writes one file. ``progress``: a
    callable ``(done_tensors, total)`` or None. Returns the written paths."""
    gguf = _gguf()
    qtype = qtype.lower()
    qenum = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(qtype)
    if qenum is None:
        raise ValueError(f"unsupported quantisation {qtype!r}: choose q4_0 or q8_0")
    ftype = {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    shard_size = parse_size(shard_size)
    model_dir = Path(model_dir)
    out_path = Path(out_path)
    tokenizer_copy = check_output(model_dir, out_path)
    params_path = model_dir / "params.json"
    cfg = ModelConfig.from_file(params_path)
    st_path = model_dir / "consolidated.safetensors"
    if not st_path.is_file():
        raise FileNotFoundError(f"{st_path}: not found; MODEL_DIR must be a Mistral-native checkpoint directory")
    src = _RowReader(st_path)
    try:
        shapes = expected_shapes(cfg)
        present = set(src.names())
        resolved = {}
        for name in shapes:
            hit = next((c for c in [name] + ALIASES.get(name, []) if c in present), None)
            if hit is None:
                raise WeightsError(f"{st_path}: missing tensor {name!r}")
            resolved[name] = hit
            dtype, got = src.info(hit)
            if tuple(got) != shapes[name]:
                raise WeightsError(f"{st_path}: tensor {name!r} has shape {list(got)}, "
                                   f"params.json implies {list(shapes[name])}")
            if dtype not in ("BF16", "F16", "F32"):
                raise WeightsError(f"{st_path}: tensor {name!r} has dtype {dtype}; expected BF16, F16 or F32")
        extra = present - set(resolved.values())
        if extra:
            raise WeightsError(f"{st_path}: unexpected tensors {sorted(extra)[:5]} (does params.json match?)")

        # plan: (name, shape, ggml type, nbytes)
        plan, kept_f32 = [], []
        for name, shape in shapes.items():
            if _is_matrix(name, shape) and shape[-1] % 32 == 0:
                t = qenum
            else:
                t = gguf.GGMLQuantizationType.F32
                if _is_matrix(name, shape):
                    kept_f32.append((name, shape[-1]))
            bs, ts = gguf.GGML_QUANT_SIZES[t]
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // bs) * ts
            plan.append((name, shape, t, nbytes))

        if shard_size is not None:
            # the header is a few KB; counting it as one more alignment unit per tensor over-estimates
            data_bytes = sum(nbytes + 32 for *_, nbytes in plan) + (1 << 20)
            if -(-data_bytes // shard_size) > MAX_SHARDS:
                raise ValueError(f"shard size {shard_size} bytes would split this model ({data_bytes / 2**20:.1f} MiB) "
                                 f"into more than {MAX_SHARDS} files; choose at least "
                                 f"{-(-data_bytes // MAX_SHARDS // 2**20)} MB")
        for name, row in kept_f32:
            print(f"voxtral-wgpu quantize: {name} has rows of {row} (not a multiple of 32): kept F32", file=sys.stderr)

        # header through gguf's writer, into a small temporary file
        out_path.parent.mkdir(parents=True, exist_ok=True)
        header_tmp = out_path.with_name(out_path.name + ".header.tmp")
        w = gguf.GGUFWriter(header_tmp, arch="voxtral_realtime")
        try:
            w.add_name("Voxtral Mini 4B Realtime")
            w.add_file_type(int(ftype))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_uint32("voxtral_wgpu.format_version", FORMAT_VERSION)
            w.add_string("voxtral_wgpu.naming", "mistral-native")
            w.add_string("voxtral_wgpu.quantization", qtype)
            for key, v in _config_metadata(cfg):
                (w.add_float64 if isinstance(v, float) else w.add_uint32)(key, v)
            w.add_string("voxtral_wgpu.params_json", params_path.read_text(encoding="utf-8"))
            for key, v in _audio_metadata(model_dir):
                if isinstance(v, bool):
                    w.add_bool(key, v)
                elif isinstance(v, int):
                    (w.add_int64 if v < 0 or v >= 2**32 else w.add_uint32)(key, v)
                elif isinstance(v, float):
                    w.add_float64(key, v)
                else:
                    w.add_string(key, v)
            for name, shape, t, nbytes in plan:
                w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=t)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            alignment = w.data_alignment
        finally:
            w.close()
        header = header_tmp.read_bytes()
        header_tmp.unlink()

        # remove stale shards / file of an earlier run with the same name
        for p in [out_path] + sorted(out_path.parent.glob(out_path.name + ".part-*")):
            if p.is_file():
                p.unlink()
        sink = _Sink(out_path, shard_size)
        try:
            sink.write(header)
            sink.pad_to(alignment)
            for i, (name, shape, t, nbytes) in enumerate(plan):
                start = sink.pos
                _write_tensor(sink, src, resolved[name], shape, t, gguf)
                if sink.pos - start != nbytes:
                    raise AssertionError(f"{name}: wrote {sink.pos - start} bytes, planned {nbytes}")
                sink.pad_to(alignment)
                if progress is not None:
                    progress(i + 1, len(plan))
        except BaseException:
            sink.close()
            for p in sink.paths:  # no half-written model left behind
                p.unlink(missing_ok=True)
            raise
        sink.close()
        if tokenizer_copy is not None:  # the loader reads the tokenizer from beside the GGUF
            shutil.copyfile(model_dir / "tekken.json", tokenizer_copy)
        return sink.paths
    finally:
        src.close()


def check_output(model_dir: Path, out_path: Path) -> Path | None:
    """Refuse, before anything is read or written, an output that would replace an input of
    ``model_dir`` (or a directory), or sit beside a different tekken.json. Returns where
    tekken.json is to be copied, or None (already there, or no tekken.json in ``model_dir``)."""
    if out_path.is_dir():
        raise ValueError(f"{out_path}: is a directory; the output must be a .gguf file path")
    outputs = [out_path, out_path.with_name(out_path.name + ".header.tmp")]
    for name in INPUT_FILES:
        src = model_dir / name
        for out in outputs:
            if os.path.abspath(out) == os.path.abspath(src) or (
                    out.exists() and src.exists() and os.path.samefile(out, src)):
                raise ValueError(f"{out_path}: the output would overwrite the input {src}; write the GGUF elsewhere")
    tokenizer = model_dir / "tekken.json"
    dest = out_path.parent / "tekken.json"
    if not tokenizer.is_file():
        return None
    if dest.exists():
        if os.path.samefile(dest, tokenizer) or dest.read_bytes() == tokenizer.read_bytes():
            return None
        raise ValueError(f"{dest} exists and differs from {tokenizer}: the GGUF would load with the wrong "
                         "tokenizer; remove it or write the GGUF to another directory")
    return dest


def _write_tensor(sink: _Sink, src: _RowReader, name: str, shape: tuple, t, gguf) -> None:
    dtype, _ = src.info(name)
    n_rows = shape[0]
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, SLAB_ELEMENTS // max(row, 1)) if len(shape) > 1 else n_rows
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        raw = src.read_rows(name, r0, r1)
        x = to_f32(dtype, raw)
        del raw
        if t == gguf.GGMLQuantizationType.F32:
            sink.write(np.ascontiguousarray(x, dtype=np.float32))
        else:
            sink.write(gguf.quants.quantize(x.reshape(r1 - r0, -1), t))
        del x


# ------------------------------------------------------------------------------------------ CLI
def add_cli(subparsers) -> None:
    from .cli_support import byte_size, checkpoint_dir

    p = subparsers.add_parser("quantize", help="write a Q4_0 / Q8_0 GGUF from a Mistral-native checkpoint",
                              description="Quantise a Mistral-native checkpoint directory (params.json, "
                                          "consolidated.safetensors) into a GGUF file; tekken.json is copied "
                                          "beside it. An existing OUT is replaced (the command says so); an "
                                          "OUT that is one of the inputs is refused.")
    p.add_argument("model_dir", type=checkpoint_dir, help="Mistral-native model directory")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--type", dest="qtype", default="q4_0", choices=["q4_0", "q8_0"],
                   help="quantisation of the linear layers (default q4_0)")
    p.add_argument("--shard-size", type=byte_size, default=None,
                   help="split the output into byte shards OUT.part-000, -001, ... of this size (e.g. 512MB; "
                        f"at most {MAX_SHARDS} shards)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args) -> int:
    out = Path(args.out)
    tokenizer_copy = check_output(Path(args.model_dir), out)  # before the progress bar and any work
    replaced = [p for p in [out] + sorted(out.parent.glob(out.name + ".part-*")) if p.is_file()]
    if replaced:
        print(f"voxtral-wgpu quantize: replacing {', '.join(str(p) for p in replaced[:3])}"
              + (f" and {len(replaced) - 3} more" if len(replaced) > 3 else ""), file=sys.stderr)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(desc="quantizing", unit="tensor", file=sys.stderr, leave=False)

    def progress(done, total):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        paths = quantize(args.model_dir, args.out, qtype=args.qtype, shard_size=args.shard_size, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    total = sum(os.path.getsize(p) for p in paths)
    print(f"wrote {len(paths)} file{'s' if len(paths) > 1 else ''}, {total / 2**30:.2f} GiB: "
          + ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
          + (f"; copied {tokenizer_copy}" if tokenizer_copy is not None else ""))
    return 0


def main_quantize(argv: list[str] | None = None) -> int:
    from .cli import main

    return main(["quantize"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main_quantize())

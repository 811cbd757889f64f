"""Quantised (GGML Q4_0 / Q8_0) weights on the GPU and the ops that read them.

GPU layout (made once at load time by :func:`upload_quant`; the browser build does the same split)
--------------------------------------------------------------------------------------------------
A GGML block covers 32 consecutive weights of one row: an f16 scale ``d`` followed by the quants
(Q4_0: 16 bytes, byte j holds element j in its low nibble and element j+16 in its high nibble,
value ``(q - 8) * d``; Q8_0: 32 int8, value ``q * d``). GGML interleaves scale and quants, which
leaves the quants only 2-byte aligned (18- and 34-byte blocks). We split them instead:

    one GPU buffer per row chunk, rows row0 .. row0+nrows-1 of W [N, K], NB = K/32 blocks per row:
      bytes [0, QB*nrows*NB)               quants of block (r, b) at (r*NB + b) * QB   (QB = 16 or 32)
      bytes [sc_off, sc_off + 2*nrows*NB)  f16 scale of block (r, b) at sc_off + 2*(r*NB + b)
      sc_off = QB*nrows*NB rounded up to 256 (minStorageBufferOffsetAlignment); size padded to 16

``linear_quant.wgsl`` binds the whole chunk as one ``array<vec4<u32>>`` (one 16-byte load per Q4
block, two per Q8 block; the scale region found from ``sc_off / 16`` in Params), so a fused q/k/v
kernel needs only three weight bindings; ``embed_quant.wgsl`` binds the two regions as two
``array<u32>`` views. The f16 -> f32 conversion is done with integer ops in the shaders (exact for
subnormals on every device; no f16 feature needed). Memory equals GGML's: 18 (Q4_0) / 34 (Q8_0)
bytes per 32 weights.

Chunks split the rows so that each chunk fits ``max-storage-buffer-binding-size`` (the 131072-row
token table of the real model is one chunk on desktop GPUs and two under a 128 MiB browser limit).

Input embeddings
----------------
``embed`` gathers rows of a quantised token table on the GPU (``embeddings="gpu"``, the default)
or, with ``embeddings="cpu"`` (the browser build's way), reads the token ids back, dequantises the
rows on the host with the C extension (``_native.q4_0_rows``) and uploads them. Both compute
``(q - 8) * d`` (or ``q * d``) exactly in f32 and add the audio embedding with one f32 addition,
so they give bit-identical results; the CPU path costs one readback per decoder step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import ops
from .gpu import Gpu, groups_2d, pack_params

QTYPES = ("q4_0", "q8_0")
QUANT_BYTES = {"q4_0": 16, "q8_0": 32}  # quant bytes per 32-weight block on the GPU
GGML_BLOCK_BYTES = {"q4_0": 18, "q8_0": 34}  # bytes per block in a GGUF file (f16 scale first)
QK = 32
SC_ALIGN = 256
# Input rows per matvec workgroup (MV_M): one, whatever the rows of the dispatch (a workgroup per row
# and block of W), so a row runs the same pipeline alone (a single stream's step) or in a batch of
# many streams and is bit-identical in both. H100, Q4_0 single-stream step, pipelined: 2.05 ms with
# one row per workgroup, 2.78 ms with pipelines compiled for 4 rows and the q/k/v staging off.
MATVEC_ROWS_PER_GROUP = 1
# matvec work split per decode kernel, linear_quant.wgsl's overrides (MV_LW, MV_RG, MV_RPT, MV_UB):
# neighbouring invocations on neighbouring blocks of one row, row groups per workgroup, rows per
# invocation, blocks per row loaded per loop step. A workgroup covers MV_RG * MV_RPT rows with
# 256 / MV_RG invocations per row along K. "lm_head": matrices of at least LM_HEAD_ROWS rows.
# Chosen on an H100 (Vulkan) with benches/quant_matvec.py (GPU timestamps, weights cycled past L2),
# Q4_0 us per call, these / the previous kernels (removed; benches/RESULTS.md): qkv 13.3 / 35.1, wo 9.0 /
# 22.9, w1|w3 SwiGLU 23.5 / 68.8, w2 15.2 / 44.3, LM head 117 / 327 (Q8_0: 18.4, 10.9, 33.8, 18.2, 165).
# One workgroup's dependent dispatch costs ~4 us there, which bounds the small matrices; 44 other
# splits of wo / w2 / SwiGLU timed since (benches/RESULTS.md) were all slower, and so was issuing each
# loop step's loads before the previous step's arithmetic. qkv loads one block per step since
# (4x8x4x3 -> 4x8x4x1: 13.2 -> 11.9 us per call; Q4_0 step 2.180 -> 2.148 ms). Three rows per
# invocation (none of those 44 had it), 2026-11-26: qkv 4x8x4x1 -> 2x8x3x1 11.9 -> 11.0 us, SwiGLU
# 2x8x2x3 -> 2x8x3x1 23.5 -> 20.7, wo / w2 4x4x2x2 -> 4x4x3x2 9.0 / 15.2 -> 8.7 / 14.3 (the LM head
# stays: 2x8x3x1 120.6 against 117.2).
MATVEC_SPLITS = {"matvec": (4, 4, 3, 2), "matvec_qkv": (2, 8, 3, 1), "matvec_swiglu": (2, 8, 3, 1),
                 "lm_head": (2, 8, 4, 1)}
# Kinds whose kernel stages x * g in workgroup memory once per workgroup (MV_STAGE; with the norm, one
# input row and K <= MATVEC_STAGE_K) instead of every invocation multiplying the x it reads by g: it
# pays where a workgroup covers many rows (q/k/v), not where workgroups are many and small (SwiGLU).
MATVEC_STAGE = ("matvec_qkv",)
MATVEC_STAGE_K = 3072
LM_HEAD_ROWS = 65536  # matrices with at least this many rows use the LM-head split
F16_HW = False  # scales decoded by unpack2x16float instead of integer ops (same speed measured)
TILE = 64  # matmul output tile
UPLOAD_SLAB_BYTES = 16 << 20  # host bytes repacked and uploaded at a time


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def chunk_layout(dtype: str, nrows: int, k: int) -> tuple[int, int, int, int]:
    """``(quant_bytes, scale_offset, scale_bytes, buffer_bytes)`` of a chunk of ``nrows`` rows."""
    nb = nrows * (k // QK)
    qbytes = QUANT_BYTES[dtype] * nb
    sc_off = _align(qbytes, SC_ALIGN)
    sc_bytes = _align(2 * nb, 16)
    return qbytes, sc_off, sc_bytes, sc_off + sc_bytes


@dataclass
class QuantWeight:
    """``W [n, k]`` in GGML Q4_0/Q8_0 blocks, repacked (see the module docstring) into row chunks
    ``chunks = [(buffer, first_row, n_rows)]``; optional f32 bias ``[n]``.

    ``host_blocks``: the raw GGML bytes ``[n, k/32 * block_bytes]`` kept on the host for the CPU
    embedding path (only for the token table when loaded with ``embeddings="cpu"``).
    ``embeddings``: "gpu" or "cpu", how :func:`embed` produces input embeddings from this table."""

    n: int
    k: int
    dtype: str
    chunks: list
    bias: object = None
    host_blocks: np.ndarray | None = None
    embeddings: str = "gpu"
    _scratch: dict = field(default_factory=dict, repr=False)

    def views(self, chunk) -> tuple[tuple, tuple]:
        """(quants, scales) binding tuples of one chunk."""
        buf, _, nrows = chunk
        qbytes, sc_off, sc_bytes, _ = chunk_layout(self.dtype, nrows, self.k)
        return (buf, 0, qbytes), (buf, sc_off, sc_bytes)

    @property
    def nbytes(self) -> int:
        return sum(b.size for b, _, _ in self.chunks) + (self.bias.size if self.bias is not None else 0)


def repack(blocks: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """GGML blocks (uint8, any shape with a whole number of blocks) -> (quants uint8 [nb, QB],
    scales uint16 [nb]): the GPU layout's two regions."""
    bb = GGML_BLOCK_BYTES[dtype]
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, bb)
    scales = np.ascontiguousarray(b[:, :2]).view("<u2").reshape(-1)
    quants = np.ascontiguousarray(b[:, 2:])
    return quants, scales


def rows_per_chunk(gpu: Gpu, dtype: str, n: int, k: int) -> int:
    """Rows per chunk so that a whole chunk buffer (quants, alignment pad, scales) is one binding."""
    per_row = (QUANT_BYTES[dtype] + 2) * (k // QK)
    limit = min(gpu.max_binding, gpu.max_buffer) - 2 * SC_ALIGN
    return max(1, min(n, limit // per_row))


def upload_quant(gpu: Gpu, blocks, n: int, k: int, dtype: str, label: str = "", bias=None,
                 keep_host: bool = False, embeddings: str = "gpu") -> QuantWeight:
    """Upload GGML blocks of ``W [n, k]`` as a QuantWeight.

    ``blocks``: uint8 ``[n, k/32*block_bytes]`` (or flat), or a callable ``(r0, r1) -> rows r0..r1-1``
    of it (read from the file slab by slab, so a big table never sits whole in host memory).
    ``bias``: an already uploaded f32 buffer or None. ``keep_host``: keep the raw blocks on the host
    (CPU embedding path)."""
    if dtype not in QTYPES:
        raise ValueError(f"{label}: unsupported quantisation {dtype!r} (expected one of {QTYPES})")
    if k % QK or k <= 0 or n <= 0:
        raise ValueError(f"{label}: a {dtype} matrix needs k a positive multiple of 32, got [{n}, {k}]")
    if embeddings not in ("gpu", "cpu"):
        raise ValueError(f"embeddings must be 'gpu' or 'cpu', got {embeddings!r}")
    nb = k // QK
    row_bytes = nb * GGML_BLOCK_BYTES[dtype]
    if callable(blocks):
        read = blocks
    else:
        flat = np.asarray(blocks, dtype=np.uint8).reshape(-1)
        if flat.size != n * row_bytes:
            raise ValueError(f"{label}: {flat.size} bytes of {dtype} blocks, [{n}, {k}] needs {n * row_bytes}")
        rows2d = flat.reshape(n, row_bytes)

        def read(r0, r1):
            return rows2d[r0:r1]
    host = np.empty((n, row_bytes), np.uint8) if keep_host else None
    step = rows_per_chunk(gpu, dtype, n, k)
    slab = max(2, UPLOAD_SLAB_BYTES // row_bytes)
    slab -= slab % 2  # even rows per slab: scale offsets stay 4-byte aligned when nb is odd
    qb = QUANT_BYTES[dtype]
    chunks = []
    for r0 in range(0, n, step):
        nr = min(step, n - r0)
        _, sc_off, _, total = chunk_layout(dtype, nr, k)
        buf = gpu.empty(total, f"{label}[{r0}:]")
        for s0 in range(r0, r0 + nr, slab):
            s1 = min(r0 + nr, s0 + slab)
            part = np.asarray(read(s0, s1), dtype=np.uint8)
            if part.size != (s1 - s0) * row_bytes:
                raise ValueError(f"{label}: rows {s0}..{s1}: got {part.size} bytes, expected {(s1 - s0) * row_bytes}")
            if host is not None:
                host[s0:s1] = part.reshape(s1 - s0, row_bytes)
            quants, scales = repack(part, dtype)
            gpu.write(buf, quants.reshape(-1), (s0 - r0) * nb * qb)
            gpu.write(buf, scales, sc_off + (s0 - r0) * nb * 2)  # a 2-byte pad is overwritten by the next slab
            del part, quants, scales
        chunks.append((buf, r0, nr))
    return QuantWeight(n, k, dtype, chunks, bias, host_blocks=host, embeddings=embeddings)


def dequantize_blocks(blocks: np.ndarray, n: int, k: int, dtype: str) -> np.ndarray:
    """Host reference dequantisation of GGML blocks -> f32 ``[n, k]`` (same values as the shaders)."""
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, GGML_BLOCK_BYTES[dtype])
    d = b[:, :2].copy().view("<f2").astype(np.float32)  # [nb, 1]
    if dtype == "q4_0":
        qs = b[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32) - 8
    else:
        q = b[:, 2:].view(np.int8).astype(np.int32)
    with np.errstate(invalid="ignore", over="ignore"):  # inf/nan scales of a damaged file stay inf/nan
        return (q.astype(np.float32) * d).reshape(n, k)


# ---------------------------------------------------------------------------------------- ops
def matvec_ok(x, *ws, batch_invariant: bool = False, decode: bool = False) -> bool:
    """Whether the decode kernel (linear_quant.wgsl matvec) takes ``x @ W^T`` for these weights:
    few rows (any number with ``decode``: one decoder step of many streams), 16-byte aligned
    activation rows, quantised weights. A row's result is the same for every row count."""
    return ((x.rows <= ops.MATVEC_GROUPED_MAX or decode) and not batch_invariant and x.off % 4 == 0
            and x.ld % 4 == 0 and all(getattr(w, "dtype", "") in QTYPES for w in ws))


def _sc(w: QuantWeight, chunk) -> int:
    """Offset of a chunk's scale region in 16-byte units (the shader's p.sc)."""
    return chunk_layout(w.dtype, chunk[2], w.k)[1] // 16


def _matvec_kernel(gpu: Gpu, w: QuantWeight, entry: str = "matvec", norm: bool = False):
    """The decode kernel and the output rows each workgroup covers. One pipeline serves every number
    of input rows (MATVEC_ROWS_PER_GROUP), so a row's result never depends on it."""
    kind = "lm_head" if w.n >= LM_HEAD_ROWS else entry
    lw, rg, rpt, ub = MATVEC_SPLITS[kind]
    assert lw & (lw - 1) == 0 and rg & (rg - 1) == 0 and lw * rg <= 256 and 1 <= rpt <= 4 and 1 <= ub <= 4, \
        (kind, MATVEC_SPLITS[kind])
    stage = kind in MATVEC_STAGE and norm and MATVEC_ROWS_PER_GROUP == 1 and w.k <= MATVEC_STAGE_K
    # workgroup memory: vec4 channels of partial sums (rows, SwiGLU's up rows, sum(x^2) unless staged),
    # or the staged x * g (K/4 + K/32 vec4s, padded)
    channels = 1 + (entry == "matvec_swiglu") + (norm and not stage)
    shm = max(256 * channels, MATVEC_STAGE_K // 4 + MATVEC_STAGE_K // 32 if stage else 0)
    kern = gpu.kernel("linear_quant", entry, Q8=w.dtype == "q8_0", MV_M=MATVEC_ROWS_PER_GROUP, MV_NORM=norm, MV_LW=lw, MV_RG=rg,
                      MV_RPT=rpt, MV_UB=ub, MV_STAGE=stage, MV_SHM=shm, MV_SSP=256 if stage else 1, F16_HW=F16_HW)
    return kern, rg * rpt


def _row_groups(m: int) -> int:
    """Params.mq: the groups of MATVEC_ROWS_PER_GROUP input rows a decode dispatch covers."""
    return -(-m // MATVEC_ROWS_PER_GROUP)


def linear(gpu: Gpu, x, w: QuantWeight, y, *, act: int = 0, accumulate: bool = False,
           batch_invariant: bool = False, norm=None, eps: float = 1e-5, decode: bool = False) -> None:
    """``y (+)= act(xn @ W^T + b)`` with W quantised; x ``[M, K]``, y ``[M, N]`` (``ops.Mat`` views);
    ``xn = x``, or ``RMSNorm(x) * norm`` folded into the decode kernel (only when
    ``matvec_ok(x, w)``; the caller normalises otherwise).

    ``batch_invariant``: always the tiled kernel, whose per-row result does not depend on M (the
    matrix-vector kernel sums K in another order)."""
    assert x.cols == w.k and y.cols == w.n and x.rows == y.rows, (x, w.n, w.k, y)
    if x.rows == 0:
        return
    # a few rows (up to ops.MATVEC_GROUPED_MAX, the dense path's threshold) take the decode kernel
    # rather than tiles that leave most of the GPU idle
    use_mv = matvec_ok(x, w, batch_invariant=batch_invariant, decode=decode)
    if norm is not None and not use_mv:
        raise ValueError("ops_quant.linear(norm=...) needs the matvec path (see matvec_ok)")
    aligned = x.off % 4 == 0 and x.ld % 4 == 0
    if not use_mv and aligned:
        # matmul.wgsl's register-blocked tiles, dequantising each K slice as it is staged
        ops.matmul_tiles(gpu, x, w, y, act=act, accumulate=accumulate, w_quant=8 if w.dtype == "q8_0" else 4,
                         scale_offset=lambda chunk: _sc(w, chunk))
        return
    if use_mv:
        kern, rows_per_group = _matvec_kernel(gpu, w, norm=norm is not None)
    else:  # x not 16-byte aligned: linear_quant.wgsl's 64x64 tiles
        kern = gpu.kernel("linear_quant", "matmul", Q8=w.dtype == "q8_0", F16_HW=F16_HW)
    for chunk in w.chunks:
        buf, row0, nrows = chunk
        params = pack_params(x.rows, nrows, w.k, x.ld, x.off, y.ld, y.off + row0, int(w.bias is not None), row0,
                             act, int(accumulate), int(norm is not None), float(eps), 0, 0, _sc(w, chunk), 0, 0,
                             _row_groups(x.rows))
        if use_mv:
            groups = groups_2d(_row_groups(x.rows) * -(-nrows // rows_per_group))
        else:
            groups = (-(-nrows // TILE), -(-x.rows // TILE))
        gpu.dispatch(kern, params, [x.buf, buf, w.bias if w.bias is not None else buf,
                                    norm if norm is not None else buf, y.buf, buf, buf], groups)


def swiglu_ffn_in(gpu: Gpu, x, w1: QuantWeight, w3: QuantWeight, out, *, norm, eps: float,
                  batch_invariant: bool = False, decode: bool = False) -> bool:
    """``out = silu(xn W1^T) * (xn W3^T)``, ``xn = RMSNorm(x) * norm``, in one decode dispatch.
    Returns False (nothing recorded) when the fused kernel does not apply."""
    if not (matvec_ok(x, w1, w3, batch_invariant=batch_invariant, decode=decode) and w1.dtype == w3.dtype
            and len(w1.chunks) == len(w3.chunks) == 1 and w1.n == w3.n and w1.k == w3.k
            and w1.bias is None and w3.bias is None):
        return False
    assert out.cols == w1.n and out.rows == x.rows
    kern, rows_per_group = _matvec_kernel(gpu, w1, "matvec_swiglu", norm=norm is not None)
    c1, c3 = w1.chunks[0], w3.chunks[0]
    params = pack_params(x.rows, w1.n, w1.k, x.ld, x.off, out.ld, out.off, 0, 0, 0, 0, int(norm is not None),
                         float(eps), 0, 0, _sc(w1, c1), _sc(w3, c3), 0, _row_groups(x.rows))
    gpu.dispatch(kern, params, [x.buf, c1[0], c1[0], norm if norm is not None else c1[0], out.buf, c3[0], c1[0]],
                 groups_2d(_row_groups(x.rows) * -(-w1.n // rows_per_group)))
    return True


def qkv_proj(gpu: Gpu, x, wq: QuantWeight, wk: QuantWeight, wv: QuantWeight, qkv, *, norm, eps: float,
             batch_invariant: bool = False, decode: bool = False) -> bool:
    """``qkv = [xn Wq^T | xn Wk^T | xn Wv^T]`` (no biases), ``xn = RMSNorm(x) * norm``, in one decode
    dispatch. Returns False (nothing recorded) when the fused kernel does not apply."""
    ws = (wq, wk, wv)
    if not (matvec_ok(x, *ws, batch_invariant=batch_invariant, decode=decode) and len({w.dtype for w in ws}) == 1
            and all(len(w.chunks) == 1 and w.bias is None and w.k == wq.k for w in ws)):
        return False
    n = wq.n + wk.n + wv.n
    assert qkv.cols == n and qkv.rows == x.rows
    kern, rows_per_group = _matvec_kernel(gpu, wq, "matvec_qkv", norm=norm is not None)
    cq, ck, cv = (w.chunks[0] for w in ws)
    params = pack_params(x.rows, n, wq.k, x.ld, x.off, qkv.ld, qkv.off, 0, 0, 0, 0, int(norm is not None),
                         float(eps), wq.n, wk.n, _sc(wq, cq), _sc(wk, ck), _sc(wv, cv), _row_groups(x.rows))
    # each workgroup within one of the three matrices
    groups = _row_groups(x.rows) * sum(-(-w.n // rows_per_group) for w in ws)
    gpu.dispatch(kern, params, [x.buf, cq[0], cq[0], norm if norm is not None else cq[0], qkv.buf, ck[0], cv[0]],
                 groups_2d(groups))
    return True


def embed(gpu: Gpu, tokens, tok_off: int, audio, apos0: int, acap: int, table: QuantWeight, out) -> None:
    """``out[r] = audio[(apos0 + r) % acap] + E[tokens[tok_off + r]]`` with a quantised table E."""
    assert out.ld == out.cols and out.cols == table.k
    n = out.rows * out.cols
    if n == 0:
        return
    groups = groups_2d(-(-n // 256))
    q8 = table.dtype == "q8_0"
    if table.embeddings == "cpu":
        from . import _native

        if table.host_blocks is None:
            raise ValueError("CPU embeddings need the table's host blocks (load with embeddings='cpu')")
        ids = gpu.read(tokens, np.uint32, out.rows, offset=4 * tok_off)  # the one readback per step
        rows_fn = _native.q8_0_rows if q8 else _native.q4_0_rows
        rows = rows_fn(table.host_blocks, table.k, ids.astype(np.int64))
        scratch = table._scratch.get("rows")
        if scratch is None or scratch.size < rows.nbytes:
            if scratch is not None:
                gpu.release(scratch)
            scratch = table._scratch["rows"] = gpu.empty(max(rows.nbytes, 4 * table.k * 64), "tok_embeddings.cpu_rows")
        gpu.write(scratch, rows)
        kern = gpu.kernel("embed_quant", "add_rows", Q8=q8)
        params = pack_params(out.rows, out.cols, 0, apos0 % acap, acap, 0, out.rows, 1, out.off)
        gpu.dispatch(kern, params, [tokens, audio, scratch, scratch, out.buf], groups)
        return
    kern = gpu.kernel("embed_quant", "embed", Q8=q8)
    for i, chunk in enumerate(table.chunks):
        _, row0, nrows = chunk
        qv, sv = table.views(chunk)
        params = pack_params(out.rows, out.cols, tok_off, apos0 % acap, acap, row0, nrows, int(i == 0), out.off)
        gpu.dispatch(kern, params, [tokens, audio, qv, sv, out.buf], groups,
                     step=((2, "token_slot"), (3, "audio_slot")))  # as ops.EMBED_STEP

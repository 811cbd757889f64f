"""One Python function per shader entry point, in the order of ``shaders/``.

Each op takes :class:`Mat` views of f32 activations and weight objects from ``weights.py``, picks
the kernel variant, packs the ``Params`` uniform and records the dispatch. No op allocates GPU
memory or reads back: the graph (``model.py``) owns every buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gpu import Gpu, groups_2d, pack_params

ACT_NONE, ACT_GELU, ACT_SILU = 0, 1, 2


@dataclass(frozen=True)
class Mat:
    """A row-major f32 matrix view ``[rows, cols]`` with row stride ``ld`` (elements), starting at
    element ``off`` of ``buf``."""

    buf: object
    rows: int
    cols: int
    ld: int
    off: int = 0

    @staticmethod
    def of(buf, rows: int, cols: int) -> "Mat":
        return Mat(buf, rows, cols, cols, 0)

    def take(self, r0: int, n: int) -> "Mat":
        """Rows ``r0 .. r0+n-1``."""
        return Mat(self.buf, n, self.cols, self.ld, self.off + r0 * self.ld)

    def cols_(self, c0: int, n: int) -> "Mat":
        """Columns ``c0 .. c0+n-1`` of every row."""
        return Mat(self.buf, self.rows, n, self.ld, self.off + c0)

    def reshape_rows(self, group: int) -> "Mat":
        """View ``group`` consecutive rows as one row (needs contiguous rows)."""
        assert self.ld == self.cols and self.rows % group == 0
        return Mat(self.buf, self.rows // group, self.cols * group, self.cols * group, self.off)


@dataclass
class DenseWeight:
    """``W [n, k]`` in BF16 pairs (``dtype='bf16'``) or F32, split into row chunks that each fit
    one storage binding; ``chunks`` = [(buffer, first_row, n_rows)]. Optional f32 bias ``[n]``."""

    n: int
    k: int
    dtype: str
    chunks: list
    bias: object = None

    @property
    def nbytes(self) -> int:
        return sum(b.size for b, _, _ in self.chunks) + (self.bias.size if self.bias is not None else 0)


def _flat_groups(n_items: int, per_group: int = 256) -> tuple[int, int]:
    return groups_2d(-(-n_items // per_group))


def _matvec_ok(x: Mat, w) -> bool:
    """The decode kernels (matvec.wgsl) need few rows, BF16 weights in whole 16-byte vectors and
    16-byte aligned activation rows."""
    return (x.rows <= 4 and getattr(w, "dtype", "") == "bf16" and w.k % 8 == 0 and x.off % 4 == 0
            and x.ld % 4 == 0)


MATVEC_ROWS = 4  # output columns per matvec workgroup (override ROWS): 4 beat 8 and 6 by 0.3 ms per step on an H100
# up to this many rows, stream the weights once per 4 rows; more (the decoder's 38-row prefill) take
# matmul.wgsl with split K: H100, 38-row prefill, best of 3: BF16 84 -> 65 ms, Q4_0 117 -> 62 ms
MATVEC_GROUPED_MAX = 16


def _row_groups(x: Mat, w, batch_invariant: bool, decode: bool = False):
    """Short batches (5 .. MATVEC_GROUPED_MAX rows, or any number of decode rows) as matvec passes of
    4 rows rather than a matmul with too few tiles to fill the GPU: the 4-row starts, or None for the
    normal path. (matvec.wgsl sums each row alike for every row count.)"""
    if batch_invariant or not (4 < x.rows <= MATVEC_GROUPED_MAX or (decode and x.rows > 4)):
        return None
    if not _matvec_ok(Mat(x.buf, 4, x.cols, x.ld, x.off), w):
        return None
    return range(0, x.rows, 4)


# 128-row matmul tiles only when they still give this many workgroups: 64-row tiles won on every
# encoder shape at 128 and 512 rows on an H100 (e.g. qkv 6144x1280 at 512 rows: 339 vs 406 us)
MATMUL_BM128_MIN_GROUPS = 512
MATMUL_BM128 = None  # force the tile rows (benchmarks); None: matmul_tile_rows decides
# K split of matmul.wgsl products (matmul_splits). H100, encoder shapes, GPU us per call at 192 / 512
# rows (.device probe): pieces of 512 for weights of <= 8192 rows: Q4_0 layer (qkv + wo + w1 + w3 + w2)
# at 192 rows 1508 (no split) -> 839 (<= 2048 rows) -> 672; BF16 at 512 rows 1485 / 1487 (no change);
# pieces of 256 or 1024, or 640 up to 8192 rows, were no better overall. Up to 16384 rows since the
# decoder prefill's 38 rows met the 9216-row w1 / w3 (GPU timestamps, Q4_0: 401 us a call unsplit, 72
# workgroups, 21 of the prefill's 35 ms; no encoder weight has more than 5120 rows).
MATMUL_SPLIT_K = 512
MATMUL_SPLIT_MAX_N = 16384


def matmul_tile_rows(m: int, n: int) -> int:
    """Rows per matmul.wgsl tile (override BM): 128 (more work per weight load) unless that leaves
    too few workgroups to fill the GPU; 64 then. Every output's K-sum runs in the same order either
    way, so the choice never changes a result (batch invariance holds)."""
    if MATMUL_BM128 is not None:
        return 128 if MATMUL_BM128 else 64
    return 128 if -(-n // 128) * -(-m // 128) >= MATMUL_BM128_MIN_GROUPS else 64


def matmul_splits(n: int, k: int) -> int:
    """K pieces of a matmul.wgsl product with an ``[n, k]`` weight: short batches of weights with few
    rows give few output tiles (1280 columns: 10 per row tile), so K is cut in MATMUL_SPLIT_K pieces
    summed by more workgroups. A function of the weight's shape only, never of M (batch invariance)."""
    return -(-k // MATMUL_SPLIT_K) if n <= MATMUL_SPLIT_MAX_N and k > MATMUL_SPLIT_K else 1


def matmul_tiles(gpu: Gpu, x: Mat, w, y: Mat, *, act: int = ACT_NONE, accumulate: bool = False,
                 w_quant: int = 0, scale_offset=None) -> None:
    """``y (+)= act(x @ W^T + b)`` with matmul.wgsl over each row chunk of W: BF16 (``w_quant`` 0) or
    Q4_0 / Q8_0 (4 / 8; ``scale_offset(chunk)`` gives the chunk's scale region in 16-byte units).
    x rows 16-byte aligned; K a multiple of 16 (32 quantised). Narrow weights split K
    (:func:`matmul_splits`): partial sums into ``gpu.scratch``, then ``reduce_splits``."""
    bias = w.bias
    splits = matmul_splits(w.n, w.k)
    for chunk in w.chunks:
        buf, row0, nrows = chunk
        sc = scale_offset(chunk) if scale_offset is not None else 0
        bm = matmul_tile_rows(x.rows, nrows)
        wb = [buf, bias if bias is not None else buf]
        if splits == 1:
            params = pack_params(x.rows, nrows, w.k, x.ld, x.off, y.ld, y.off + row0, int(bias is not None), row0,
                                 act, int(accumulate), sc, w.k, 1)
            gpu.dispatch(gpu.kernel("matmul", "matmul", BM=bm, W_QUANT=w_quant), params, [x.buf, *wb, y.buf],
                         (-(-nrows // 128), -(-x.rows // bm)))
            continue
        # rows per pass: the partial sums [splits, rows, nrows] fit one binding (a row's result does
        # not depend on its pass)
        step = max(1, min(x.rows, (gpu.max_binding - 16) // (4 * splits * nrows)))
        for r0 in range(0, x.rows, step):
            rows = min(step, x.rows - r0)
            # the used range (the buffer may exceed one binding), whole vec4s: reduce_splits reads it so
            nbytes = -(-4 * splits * rows * nrows // 16) * 16
            part = (gpu.scratch(nbytes), 0, nbytes)
            params = pack_params(rows, nrows, w.k, x.ld, x.off + r0 * x.ld, nrows, 0, 0, 0, 0, 0, sc,
                                 MATMUL_SPLIT_K, splits)
            gpu.dispatch(gpu.kernel("matmul", "matmul", BM=bm, W_QUANT=w_quant, SPLIT=True), params,
                         [x.buf, buf, buf, part], (-(-nrows // 128), -(-rows // bm), splits))
            params = pack_params(rows, nrows, w.k, nrows, 0, y.ld, y.off + r0 * y.ld + row0, int(bias is not None),
                                 row0, act, int(accumulate), 0, MATMUL_SPLIT_K, splits)
            gpu.dispatch(gpu.kernel("matmul", "reduce_splits"), params, [part, *wb, y.buf],
                         groups_2d(-(-rows * nrows // 256)))


def linear(gpu: Gpu, x: Mat, w, y: Mat, *, act: int = ACT_NONE, accumulate: bool = False,
           batch_invariant: bool = False, norm=None, eps: float = 1e-5, scratch: Mat | None = None,
           decode: bool = False) -> None:
    """``y (+)= act(xn @ W^T + b)``; x ``[M, K]``, W ``[N, K]``, y ``[M, N]``; ``xn = x`` or, with
    ``norm=g``, ``RMSNorm(x) * g`` (folded into the decode kernel, else computed into ``scratch``).

    ``batch_invariant``: never take a matvec kernel, so each row's result is bit-identical whatever
    M is (matmul sums K in the same order for every row; matvec sums in another order). The encoder
    and adapter use it: streaming batches positions differently from offline, and float rounding
    differences could otherwise flip near-tie tokens.

    ``decode``: rows are decoder steps (of one or many streams): the decode kernels for any number
    of rows, each row's result the same as alone."""
    assert x.cols == w.k and y.cols == w.n and x.rows == y.rows, (x, w.n, w.k, y)
    if x.rows == 0:
        return
    if getattr(w, "dtype", "") in ("q4_0", "q8_0"):
        from . import ops_quant  # the quantised kernels have their own shader family

        if norm is not None and not ops_quant.matvec_ok(x, w, batch_invariant=batch_invariant, decode=decode):
            assert scratch is not None, "linear(norm=...) on this path needs a scratch matrix"
            rms_norm(gpu, x, norm, scratch, eps)
            x, norm = scratch, None
        return ops_quant.linear(gpu, x, w, y, act=act, accumulate=accumulate, batch_invariant=batch_invariant,
                                norm=norm, eps=eps, decode=decode)
    groups = _row_groups(x, w, batch_invariant, decode)
    if groups is not None:
        for r in groups:
            n = min(4, x.rows - r)
            linear(gpu, x.take(r, n), w, y.take(r, n), act=act, accumulate=accumulate, norm=norm, eps=eps,
                   scratch=scratch.take(r, n) if scratch is not None else None)
        return
    fused = _matvec_ok(x, w) and not batch_invariant
    if norm is not None and not fused:
        assert scratch is not None, "linear(norm=...) on this path needs a scratch matrix"
        rms_norm(gpu, x, norm, scratch, eps)
        x, norm = scratch, None
    dtype = getattr(w, "dtype", "bf16")
    bias = w.bias
    if fused:
        k = gpu.kernel("matvec", "matvec", ROWS=MATVEC_ROWS)
        for buf, row0, nrows in w.chunks:
            params = pack_params(x.rows, nrows, w.k, x.off, x.ld, y.off + row0, y.ld, row0, int(bias is not None),
                                 act, int(accumulate), int(norm is not None), float(eps), 0, 0)
            gpu.dispatch(k, params, [x.buf, buf, bias if bias is not None else buf,
                                     norm if norm is not None else buf, y.buf, buf, buf],
                         groups_2d(-(-nrows // MATVEC_ROWS)))
        return
    bf16 = dtype == "bf16"
    if bf16 and w.k % 16 == 0 and x.off % 4 == 0 and x.ld % 4 == 0 and (x.rows > 4 or batch_invariant):
        matmul_tiles(gpu, x, w, y, act=act, accumulate=accumulate)
        return
    for buf, row0, nrows in w.chunks:
        use_mv = x.rows <= 4 and w.k % 2 == 0 and not batch_invariant
        k = gpu.kernel("linear", "matvec" if use_mv else "matmul", W_BF16=bf16)
        params = pack_params(x.rows, nrows, w.k, x.ld, x.off, y.ld, y.off + row0,
                             int(bias is not None), row0, act, int(accumulate))
        groups = groups_2d(-(-nrows // 8)) if use_mv else (-(-nrows // 64), -(-x.rows // 64))
        gpu.dispatch(k, params, [x.buf, buf, bias if bias is not None else buf, y.buf], groups)


def swiglu_ffn_in(gpu: Gpu, x: Mat, w1, w3, out: Mat, *, norm, eps: float, scratch: Mat, tmp: Mat,
                  batch_invariant: bool = False, decode: bool = False) -> None:
    """``out = silu(xn W1^T) * (xn W3^T)`` with ``xn = RMSNorm(x) * norm``: one fused kernel for
    decode rows; norm, two linears and ``swiglu`` otherwise (``tmp`` shaped like ``out``)."""
    if getattr(w1, "dtype", "") in ("q4_0", "q8_0"):
        from . import ops_quant

        if ops_quant.swiglu_ffn_in(gpu, x, w1, w3, out, norm=norm, eps=eps, batch_invariant=batch_invariant,
                                   decode=decode):
            return
    groups = _row_groups(x, w1, batch_invariant, decode)
    if groups is not None:
        for r in groups:
            n = min(4, x.rows - r)
            swiglu_ffn_in(gpu, x.take(r, n), w1, w3, out.take(r, n), norm=norm, eps=eps, scratch=scratch.take(r, n),
                          tmp=tmp.take(r, n))
        return
    if (_matvec_ok(x, w1) and not batch_invariant and getattr(w3, "dtype", "") == "bf16"
            and len(w1.chunks) == len(w3.chunks) == 1):
        k = gpu.kernel("matvec", "matvec_swiglu", ROWS=MATVEC_ROWS)
        params = pack_params(x.rows, w1.n, w1.k, x.off, x.ld, out.off, out.ld, 0, 0, 0, 0, 1, float(eps), 0, 0)
        b1, b3 = w1.chunks[0][0], w3.chunks[0][0]
        gpu.dispatch(k, params, [x.buf, b1, b1, norm, out.buf, b3, b3], groups_2d(-(-w1.n // MATVEC_ROWS)))
        return
    rms_norm(gpu, x, norm, scratch, eps)
    linear(gpu, scratch, w1, out, batch_invariant=batch_invariant)
    linear(gpu, scratch, w3, tmp, batch_invariant=batch_invariant)
    swiglu(gpu, out, tmp)


def qkv_proj(gpu: Gpu, x: Mat, wq, wk, wv, qkv: Mat, *, norm, eps: float, scratch: Mat,
             batch_invariant: bool = False, decode: bool = False) -> None:
    """``qkv = [xn Wq^T + bq | xn Wk^T | xn Wv^T + bv]`` with ``xn = RMSNorm(x) * norm``, into the
    column blocks of ``qkv [rows, nq + 2*nkv]``: one fused pass for decode rows (no biases), else a
    norm and three linears."""
    nq, nkv = wq.n, wk.n
    assert qkv.cols == nq + 2 * nkv and wv.n == nkv
    if getattr(wq, "dtype", "") in ("q4_0", "q8_0"):
        from . import ops_quant

        if ops_quant.qkv_proj(gpu, x, wq, wk, wv, qkv, norm=norm, eps=eps, batch_invariant=batch_invariant,
                              decode=decode):
            return
    groups = _row_groups(x, wq, batch_invariant, decode)
    if groups is not None:
        for r in groups:
            n = min(4, x.rows - r)
            qkv_proj(gpu, x.take(r, n), wq, wk, wv, qkv.take(r, n), norm=norm, eps=eps, scratch=scratch.take(r, n))
        return
    ws = (wq, wk, wv)
    if (_matvec_ok(x, wq) and not batch_invariant and all(getattr(w, "dtype", "") == "bf16" and len(w.chunks) == 1
                                                           and w.bias is None for w in ws)):
        k = gpu.kernel("matvec", "matvec_qkv", ROWS=MATVEC_ROWS)
        params = pack_params(x.rows, qkv.cols, wq.k, x.off, x.ld, qkv.off, qkv.ld, 0, 0, 0, 0, 1, float(eps), nq, nkv)
        bq, bk, bv = (w.chunks[0][0] for w in ws)
        gpu.dispatch(k, params, [x.buf, bq, bq, norm, qkv.buf, bk, bv], groups_2d(-(-qkv.cols // MATVEC_ROWS)))
        return
    rms_norm(gpu, x, norm, scratch, eps)
    linear(gpu, scratch, wq, qkv.cols_(0, nq), batch_invariant=batch_invariant)
    linear(gpu, scratch, wk, qkv.cols_(nq, nkv), batch_invariant=batch_invariant)
    linear(gpu, scratch, wv, qkv.cols_(nq + nkv, nkv), batch_invariant=batch_invariant)


def rope_qkv(gpu: Gpu, table, qkv: Mat, k_cache, v_cache, *, n_heads: int, n_kv_heads: int, head_dim: int,
             pos0: int, cap: int, kv_f16: bool = False) -> None:
    """Rotate the q and k heads of ``qkv [rows, (n_heads + 2 n_kv) * head_dim]`` (table ``[rows, hd/2, 2]``),
    keep q in place, and append rotated k and v at ring slots ``(pos0 + r) % cap`` (as f16 with ``kv_f16``)."""
    assert qkv.cols == (n_heads + 2 * n_kv_heads) * head_dim and head_dim % 2 == 0
    k = gpu.kernel("rope_qkv", "rope_qkv", KV_F16=kv_f16)
    n = qkv.rows * (n_heads + n_kv_heads) * (head_dim // 2)
    gpu.dispatch(k, pack_params(qkv.rows, n_heads, n_kv_heads, head_dim, qkv.ld, qkv.off, pos0 % cap, cap),
                 [table, qkv.buf, k_cache, v_cache, table], _flat_groups(n))


def rope_qkv_slots(gpu: Gpu, table, qkv: Mat, k_pool, v_pool, slots, *, n_heads: int, n_kv_heads: int,
                   head_dim: int, kv_f16: bool = False) -> None:
    """``rope_qkv`` for rows of many streams: row r's k and v go to slot ``slots[r]`` (u32 buffer) of
    the pools (each stream's ring a range of their slots)."""
    assert qkv.cols == (n_heads + 2 * n_kv_heads) * head_dim and head_dim % 2 == 0
    k = gpu.kernel("rope_qkv", "rope_qkv_slots", KV_F16=kv_f16)
    n = qkv.rows * (n_heads + n_kv_heads) * (head_dim // 2)
    gpu.dispatch(k, pack_params(qkv.rows, n_heads, n_kv_heads, head_dim, qkv.ld, qkv.off, 0, 1),
                 [table, qkv.buf, k_pool, v_pool, slots], _flat_groups(n))


def rms_norm(gpu: Gpu, x: Mat, g, y: Mat, eps: float) -> None:
    """``y = x * rsqrt(mean(x^2) + eps) * g`` row by row; g f32 ``[cols]``."""
    assert x.rows == y.rows and x.cols == y.cols
    k = gpu.kernel("rms_norm", "rms_norm")
    gpu.dispatch(k, pack_params(x.rows, x.cols, x.ld, x.off, y.ld, y.off, float(eps)), [x.buf, g, y.buf],
                 groups_2d(x.rows))


def rope(gpu: Gpu, table, v: Mat, n_heads: int, head_dim: int) -> None:
    """Rotate interleaved pairs of each head of ``v [rows, n_heads*head_dim]`` in place;
    ``table`` f32 ``[rows, head_dim/2, 2]`` holds (cos, sin) per row."""
    k = gpu.kernel("rope", "rope")
    n = v.rows * n_heads * (head_dim // 2)
    gpu.dispatch(k, pack_params(v.rows, n_heads, head_dim, v.ld, v.off), [table, v.buf], _flat_groups(n))


def kv_write(gpu: Gpu, k_new: Mat, v_new: Mat, k_cache, v_cache, pos0: int, cap: int) -> None:
    """Store rows of ``k_new``/``v_new [rows, width]`` (f32) at ring slots ``(pos0 + r) % cap``."""
    assert k_new.ld == v_new.ld and k_new.rows == v_new.rows and k_new.rows <= cap
    kern = gpu.kernel("kv_cache", "kv_write")
    n = k_new.rows * k_new.cols
    gpu.dispatch(kern, pack_params(k_new.rows, k_new.cols, k_new.ld, k_new.off, v_new.off, pos0 % cap, cap, 0, 1),
                 [k_new.buf, v_new.buf, k_cache, v_cache], _flat_groups(n))


def ring_copy(gpu: Gpu, src_k, src_v, src_cap: int, dst_k, dst_v, dst_cap: int, first: int, count: int,
              row_bytes: int) -> None:
    """Copy positions ``first .. first + count - 1`` of a key / value ring pair (position p at slot
    ``p % src_cap``, ``row_bytes`` per slot) into another pair (slot ``p % dst_cap``), bit for bit."""
    if count <= 0:
        return
    assert count <= min(src_cap, dst_cap) and row_bytes % 4 == 0
    width = row_bytes // 4
    params = pack_params(count, width, 0, 0, 0, first % dst_cap, dst_cap, first % src_cap, src_cap)
    gpu.dispatch(gpu.kernel("kv_cache", "ring_copy"), params, [src_k, src_v, dst_k, dst_v],
                 _flat_groups(count * width))


DECODE_CHUNK = 256  # keys per workgroup of attention_decode.wgsl
DECODE_VALUE_SPLIT = 4  # at most this many workgroups per (chunk, kv head), each a share of the value dims
DECODE_SPLIT_GROUPS = 128  # ... while the partial pass stays within this many workgroups


def decode_value_split(head_dim: int, n_chunks: int, n_kv_heads: int) -> int:
    """attention_decode.wgsl's value_split: DECODE_VALUE_SPLIT, halved until each share is an even
    number of dims and the pass has at most DECODE_SPLIT_GROUPS workgroups (or the split is 1)."""
    split = DECODE_VALUE_SPLIT
    while split > 1 and (head_dim % (2 * split) or n_chunks * n_kv_heads * split > DECODE_SPLIT_GROUPS):
        split //= 2
    return split


def decode_attention_scratch(gpu: Gpu, n_heads: int, head_dim: int, max_keys: int):
    """Scratch for split-K decode attention: ``[n_heads, ceil(max_keys / 256), head_dim + 2]`` f32."""
    return gpu.empty(4 * n_heads * (-(-max_keys // DECODE_CHUNK)) * (head_dim + 2), "attention.part")


ATTENTION_ROWS = 64  # attention.wgsl's BR: query rows per workgroup
ATTENTION_DIMS = 64  # ... and DV: output dims per workgroup


def _shader_pos(pos0: int, window: int, cap: int) -> int:
    """pos0 enters the shaders as u32: past 2^30 shift it down by a multiple of cap (slots are
    pos % cap) while keeping it >= window, so the window arithmetic is unchanged."""
    return pos0 - (((pos0 - window) // cap) * cap if pos0 >= (1 << 30) else 0)


def decode_attention_values(pos0: int, *, window: int, cap: int, n_heads: int, n_kv_heads: int,
                            head_dim: int, table_row: int = 0) -> dict:
    """The step values (``Gpu.dispatch(step=...)``) of a decode attention at position ``pos0`` whose
    rotation is row ``table_row`` of its table."""
    pos = _shader_pos(pos0, window, cap)
    n_chunks = -(-min(pos + 1, window) // DECODE_CHUNK)
    split = decode_value_split(head_dim, n_chunks, n_kv_heads)
    return {"attn_pos": pos, "attn_chunks": n_chunks, "attn_split": split, "attn_groups": n_chunks * split,
            "attn_merge_groups": n_heads if n_chunks > 1 else 0, "attn_table": table_row * head_dim // 4}


def attention(gpu: Gpu, q: Mat, k_cache, v_cache, out: Mat, *, n_heads: int, n_kv_heads: int, head_dim: int,
              pos0: int, window: int, cap: int, kv_f16: bool = False) -> None:
    """Causal sliding-window attention of ``q [rows, n_heads*head_dim]`` (positions pos0..) over the
    ring cache (f32, or f16 pairs with ``kv_f16``, as ``rope_qkv`` wrote it); writes
    ``out [rows, n_heads*head_dim]``."""
    assert head_dim <= 256 and n_heads % n_kv_heads == 0
    assert pos0 + q.rows <= cap or cap >= window + q.rows - 1, "KV ring too small for this many rows"
    pos = _shader_pos(pos0, window, cap)
    k = gpu.kernel("attention", "attention", KV_F16=kv_f16)
    params = pack_params(q.rows, n_heads, n_kv_heads, head_dim, pos, window, cap, q.ld, q.off,
                         out.ld, out.off, float(head_dim) ** -0.5)
    # attention.wgsl: a workgroup per (64 query rows, head, 64 output dims)
    groups = -(-q.rows // ATTENTION_ROWS) * n_heads * -(-head_dim // ATTENTION_DIMS)
    gpu.dispatch(k, params, [q.buf, k_cache, v_cache, out.buf, q.buf], groups_2d(groups))


def attention_blocks(gpu: Gpu, q: Mat, k_pool, v_pool, out: Mat, blocks, n_blocks: int, *, n_heads: int,
                     n_kv_heads: int, head_dim: int, window: int, cap: int, kv_f16: bool = False) -> None:
    """``attention`` for blocks of rows of many streams in one dispatch: ``blocks`` a u32 buffer of
    ``n_blocks`` (first row, rows <= ATTENTION_ROWS, position of the first row, ring base slot) whose
    keys sit at slots base + j % cap of the pools. Each row equals what ``attention`` gives it."""
    assert head_dim <= 256 and n_heads % n_kv_heads == 0
    k = gpu.kernel("attention", "attention_blocks", KV_F16=kv_f16, BLOCKS=True)
    params = pack_params(0, n_heads, n_kv_heads, head_dim, 0, window, cap, q.ld, q.off,
                         out.ld, out.off, float(head_dim) ** -0.5)
    groups = n_blocks * n_heads * -(-head_dim // ATTENTION_DIMS)
    gpu.dispatch(k, params, [q.buf, k_pool, v_pool, out.buf, (blocks, 0, 16 * n_blocks)], groups_2d(groups))


def decode_attention(gpu: Gpu, table, qkv: Mat, k_cache, v_cache, out: Mat, *, n_heads: int, n_kv_heads: int,
                     head_dim: int, pos0: int, window: int, cap: int, scratch, kv_f16: bool = False,
                     table_row: int = 0) -> None:
    """``rope_qkv`` + ``attention`` for one decode row in one split-K pass (attention_decode.wgsl):
    rotates the q and k heads of ``qkv [1, (n_heads + 2 n_kv) * head_dim]`` (row ``table_row`` of
    ``table [.., hd/2, 2]`` holds position pos0's rotation) as it reads them, appends k and v to the
    rings at slot ``pos0 % cap`` and writes ``out [1, n_heads*head_dim]``; qkv is left as it was.
    ``scratch``: ``decode_attention_scratch``."""
    assert qkv.rows == 1 and qkv.cols == (n_heads + 2 * n_kv_heads) * head_dim and qkv.off % 4 == 0
    assert head_dim <= 256 and head_dim % 4 == 0 and n_heads % n_kv_heads == 0
    assert pos0 + 1 <= cap or cap >= window, "KV ring too small for the window"
    v = decode_attention_values(pos0, window=window, cap=cap, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                head_dim=head_dim, table_row=table_row)
    assert scratch.size >= 4 * n_heads * v["attn_chunks"] * (head_dim + 2), "decode attention scratch too small"
    params = pack_params(n_heads, n_kv_heads, head_dim, v["attn_pos"], window, cap, v["attn_chunks"], qkv.off,
                         out.off, float(head_dim) ** -0.5, v["attn_split"], v["attn_table"])
    bufs = [qkv.buf, k_cache, v_cache, scratch, out.buf, table]
    step = ((3, "attn_pos"), (6, "attn_chunks"), (10, "attn_split"), (11, "attn_table"))
    gpu.dispatch(gpu.kernel("attention_decode", "partial", KV_F16=kv_f16, HEAD_DIM=head_dim), params, bufs,
                 (v["attn_groups"], n_kv_heads), step=step, step_groups="attn_groups")
    # one chunk: partial wrote the output and merge runs on 0 workgroups (no dispatch)
    gpu.dispatch(gpu.kernel("attention_decode", "merge", KV_F16=kv_f16, HEAD_DIM=head_dim), params, bufs,
                 (v["attn_merge_groups"], 1), step=step, step_groups="attn_merge_groups")


def swiglu(gpu: Gpu, a: Mat, b: Mat) -> None:
    """``a = silu(a) * b`` in place over contiguous ``[rows, cols]`` views."""
    assert a.ld == a.cols and b.ld == b.cols and a.off == b.off == 0 and a.rows * a.cols == b.rows * b.cols
    n = a.rows * a.cols
    gpu.dispatch(gpu.kernel("elementwise", "swiglu"), pack_params(n), [a.buf, b.buf], _flat_groups(n))


EMBED_STEP = ((2, "token_slot"), (3, "audio_slot"))  # embed*.wgsl Params fields tok_off, apos0 % acap


def embed(gpu: Gpu, tokens, tok_off: int, audio, apos0: int, acap: int, table: DenseWeight, out: Mat) -> None:
    """``out[r] = audio[(apos0 + r) % acap] + E[tokens[tok_off + r]]`` (token ids read on the GPU);
    ``out`` contiguous rows from any offset."""
    assert out.ld == out.cols
    n = out.rows * out.cols
    if table.dtype in ("q4_0", "q8_0"):
        from . import ops_quant

        return ops_quant.embed(gpu, tokens, tok_off, audio, apos0, acap, table, out)
    for i, (buf, row0, nrows) in enumerate(table.chunks):
        k = gpu.kernel("embed", "embed", W_BF16=table.dtype == "bf16")
        params = pack_params(out.rows, out.cols, tok_off, apos0 % acap, acap, row0, nrows, int(i == 0), out.off)
        gpu.dispatch(k, params, [tokens, audio, buf, out.buf], _flat_groups(n), step=EMBED_STEP)


class Argmax:
    """Greedy argmax over a logits vector into a GPU token log, with the chosen token's softmax
    probability beside it in the same buffer; owns its scratch buffers."""

    def __init__(self, gpu: Gpu, n: int):
        self.n = n
        self.n_parts = -(-n // 1024)
        self.part_v = gpu.empty(4 * self.n_parts, "argmax.part_v")
        self.part_i = gpu.empty(4 * self.n_parts, "argmax.part_i")
        self.part_s = gpu.empty(4 * self.n_parts, "argmax.part_s")

    def __call__(self, gpu: Gpu, logits, tokens, out_index: int, logits_off: int = 0, *,
                 probs_off: int | None = None) -> None:
        """``tokens[out_index] = argmax(x)`` for ``x = logits[logits_off : logits_off + n]``; with
        ``probs_off``, also ``tokens[probs_off + out_index] = softmax(x)[argmax]`` as f32 bits (one
        buffer, so one readback brings back both; the step replay patches only ``out_index``)."""
        params = pack_params(self.n, self.n_parts, out_index, logits_off,
                             0xFFFFFFFF if probs_off is None else probs_off)
        bufs = [logits, self.part_v, self.part_i, tokens, self.part_s]
        step = ((2, "next_token_slot"),)
        gpu.dispatch(gpu.kernel("argmax", "partial"), params, bufs, (self.n_parts, 1), step=step)
        gpu.dispatch(gpu.kernel("argmax", "finish"), params, bufs, (1, 1), step=step)


def rope_table(positions: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
    """(cos, sin) of ``pos * theta^(-2i/d)`` for interleaved RoPE, ``[len(positions), d/2, 2]`` f32.

    The angle is formed in float64 and reduced modulo 2*pi before the trig functions, so it stays
    accurate at any position (a float32 product loses ~pos * 6e-8 rad)."""
    inv_freq = 1.0 / (float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = np.mod(np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :], 2 * np.pi)
    return np.stack([np.cos(ang), np.sin(ang)], axis=-1).astype(np.float32)

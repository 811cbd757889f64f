"""The Q4_0 / Q8_0 shaders (linear_quant.wgsl, embed_quant.wgsl) against NumPy on the dequantised
weights, the GPU layout against its documentation, and GPU gather == CPU dequant embeddings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxtral_wgpu import ops, ops_quant as oq
from voxtral_wgpu.ops import ACT_GELU, ACT_NONE, ACT_SILU, Mat

QTYPES = ["q4_0", "q8_0"]
_erf = np.vectorize(math.erf, otypes=[np.float64])


def ggml_quantize(w: np.ndarray, dtype: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    return quantize(np.ascontiguousarray(w, np.float32), GGMLQuantizationType[dtype.upper()])


def act_ref(v: np.ndarray, act: int) -> np.ndarray:
    if act == ACT_GELU:
        return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))
    if act == ACT_SILU:
        return v / (1.0 + np.exp(-v))
    return v


@pytest.mark.parametrize("dtype", QTYPES)
def test_host_dequant_equals_gguf(dtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 96)).astype(np.float32)
    w[0, :32] = 0.0  # a zero block (d = 0)
    w[1, :32] *= 1e-6  # subnormal f16 scales
    q = ggml_quantize(w, dtype)
    ref = dequantize(q, GGMLQuantizationType[dtype.upper()]).reshape(w.shape)
    assert np.array_equal(oq.dequantize_blocks(q, 7, 96, dtype), ref)


@pytest.mark.parametrize("dtype", QTYPES)
@pytest.mark.parametrize("slab_rows", [0, 1, 3])
def test_gpu_layout_matches_its_documentation(gpu, monkeypatch, dtype, slab_rows):
    """Buffer = [quants of block r*NB+b | pad to 256 | f16 scales], as the browser build rebuilds it;
    also when uploaded a few rows at a time from a reader (an odd block count per row: 3)."""
    rng = np.random.default_rng(2)
    n, k = 5, 96
    q = ggml_quantize(rng.standard_normal((n, k)), dtype)
    if slab_rows:
        monkeypatch.setattr(oq, "UPLOAD_SLAB_BYTES", slab_rows * q.shape[1])
        w = oq.upload_quant(gpu, lambda r0, r1: q[r0:r1], n, k, dtype, "layout", keep_host=True)
        assert np.array_equal(w.host_blocks, q)
    else:
        w = oq.upload_quant(gpu, q, n, k, dtype, "layout")
    (buf, row0, nrows), = w.chunks
    raw = gpu.read(buf, np.uint8)
    bb, qb = oq.GGML_BLOCK_BYTES[dtype], oq.QUANT_BYTES[dtype]
    blocks = q.reshape(-1, bb)
    qbytes, sc_off, _, _ = oq.chunk_layout(dtype, n, k)
    assert qbytes == n * k // 32 * qb and sc_off % 256 == 0
    assert np.array_equal(raw[:qbytes].reshape(-1, qb), blocks[:, 2:])
    assert np.array_equal(raw[sc_off:sc_off + 2 * len(blocks)].reshape(-1, 2), blocks[:, :2])


def _run_linear(gpu, w_q, b, x, y0, *, act, accumulate, x_pad, y_pad, xo=3, batch_invariant=False):
    """x placed at element ``xo`` with row stride K + x_pad; y likewise at element 5."""
    M, K = x.shape
    N = w_q.n
    lda, ldy = K + x_pad, N + y_pad
    yo = 5
    xbuf = np.zeros(xo + M * lda, np.float32)
    xbuf[xo:].reshape(M, lda)[:, :K] = x
    ybuf = np.zeros(yo + M * ldy, np.float32)
    ybuf[yo:].reshape(M, ldy)[:, :N] = y0
    gx, gy = gpu.upload(xbuf), gpu.upload(ybuf)
    oq.linear(gpu, Mat(gx, M, K, lda, xo), w_q, Mat(gy, M, N, ldy, yo), act=act, accumulate=accumulate,
              batch_invariant=batch_invariant)
    out = gpu.read(gy, np.float32)[: len(ybuf)]
    got = out[yo:].reshape(M, ldy)[:, :N]
    # untouched padding stays untouched
    assert np.array_equal(out[:yo], ybuf[:yo])
    assert np.array_equal(out[yo:].reshape(M, ldy)[:, N:], ybuf[yo:].reshape(M, ldy)[:, N:])
    return got


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(QTYPES), M=st.one_of(st.integers(1, 4), st.integers(5, 70)), N=st.integers(1, 140),
       nb=st.integers(1, 10), act=st.sampled_from([ACT_NONE, ACT_GELU, ACT_SILU]), has_bias=st.booleans(),
       accumulate=st.booleans(), x_pad=st.sampled_from([0, 1, 4]), y_pad=st.integers(0, 2),
       xo=st.sampled_from([0, 3, 8]), batch_invariant=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_numpy_on_dequantised_weights(gpu, dtype, M, N, nb, act, has_bias, accumulate, x_pad, y_pad,
                                                      xo, batch_invariant, seed):
    """Both kernels (matvec for 16-byte aligned x rows, 4 rows per dispatch up to 16 rows; tiled
    otherwise and whenever batch-invariant), any epilogue."""
    rng = np.random.default_rng(seed)
    K = 32 * nb
    w = (rng.standard_normal((N, K)) / math.sqrt(K)).astype(np.float32)
    q = ggml_quantize(w, dtype)
    wd = oq.dequantize_blocks(q, N, K, dtype).astype(np.float64)
    b = (0.1 * rng.standard_normal(N)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y0 = rng.standard_normal((M, N)).astype(np.float32)
    wq = oq.upload_quant(gpu, q, N, K, dtype, "w", bias=gpu.upload(b) if has_bias else None)
    got = _run_linear(gpu, wq, b, x, y0, act=act, accumulate=accumulate, x_pad=x_pad, y_pad=y_pad, xo=xo,
                      batch_invariant=batch_invariant)
    ref = x.astype(np.float64) @ wd.T + (b if has_bias else 0.0)
    ref = act_ref(ref, act) + (y0 if accumulate else 0.0)
    scale = np.abs(x).astype(np.float64) @ np.abs(wd).T + np.abs(b) + np.abs(y0) + 1.0
    assert np.all(np.abs(got - ref) <= 2e-6 * scale), float(np.max(np.abs(got - ref) / scale))


def _check_tiled(gpu, dtype, M, N, K, act, seed, **placement):
    """A batch-invariant quantised linear with bias and accumulate against NumPy on the dequantised
    weights; returns (output, weight, bias, x, y0) for further calls."""
    rng = np.random.default_rng(seed)
    q = ggml_quantize(rng.standard_normal((N, K)) / math.sqrt(K), dtype)
    wd = oq.dequantize_blocks(q, N, K, dtype).astype(np.float64)
    b = (0.1 * rng.standard_normal(N)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    y0 = rng.standard_normal((M, N)).astype(np.float32)
    wq = oq.upload_quant(gpu, q, N, K, dtype, "w", bias=gpu.upload(b))
    got = _run_linear(gpu, wq, b, x, y0, act=act, accumulate=True, batch_invariant=True, **placement)
    ref = act_ref(x.astype(np.float64) @ wd.T + b, act) + y0
    scale = np.abs(x).astype(np.float64) @ np.abs(wd).T + np.abs(b) + np.abs(y0) + 1.0
    assert np.all(np.abs(got - ref) <= 2e-6 * scale), float(np.max(np.abs(got - ref) / scale))
    return got, wq, b, x, y0


@pytest.mark.parametrize("dtype", QTYPES)
@pytest.mark.parametrize("xo,x_pad", [(0, 4), (3, 1)], ids=["aligned-matmul.wgsl", "unaligned-linear_quant"])
def test_tiled_kernels_on_dequantised_weights(gpu, monkeypatch, dtype, xo, x_pad):
    """The batched kernels: matmul.wgsl's quantised variant (16-byte aligned x rows) and linear_quant's
    64x64 tiles (otherwise), over partial row and column tiles (M = 130, N = 131) and 7 blocks per row."""
    used = []
    kernel = gpu.kernel
    monkeypatch.setattr(gpu, "kernel", lambda name, entry, **o: used.append(name) or kernel(name, entry, **o))
    _check_tiled(gpu, dtype, 130, 131, 224, ACT_GELU, 11, x_pad=x_pad, y_pad=1, xo=xo)
    assert used == ["matmul" if xo % 4 == 0 else "linear_quant"]


@pytest.mark.parametrize("dtype", QTYPES)
def test_tiled_split_k_on_dequantised_weights(gpu, dtype):
    """matmul.wgsl's quantised variant with K split (37 blocks: pieces of 16, 16 and 5 blocks) and
    reduce_splits; rows bit-identical whatever M."""
    from voxtral_wgpu import ops

    assert ops.matmul_splits(131, 1184) == 3
    got, wq, b, x, y0 = _check_tiled(gpu, dtype, 70, 131, 1184, ACT_SILU, 12, x_pad=4, y_pad=2, xo=8)
    few = _run_linear(gpu, wq, b, x[3:6], y0[3:6], act=ACT_SILU, accumulate=True, x_pad=0, y_pad=0, xo=0,
                      batch_invariant=True)
    assert np.array_equal(few.view(np.uint32), got[3:6].view(np.uint32))


# (MV_LW, MV_RG, MV_RPT, MV_UB) of linear_quant.wgsl's decode kernels: the defaults' shape, one lane
# per row group along K (LW = 32 as the old kernel), a single row group of 256 lanes, lanes across
# rows only (LW = 1), 3 rows and 3 blocks a step, and tiny row groups
SPLITS = [(4, 8, 2, 2), (32, 8, 1, 1), (256, 1, 1, 2), (1, 64, 4, 4), (8, 32, 3, 3), (2, 2, 4, 1)]
KS = (32, 96, 160, 224)  # 1, 3, 5, 7 blocks per row
NS = (1, 3, 17, 131)


@pytest.mark.tuning
@pytest.mark.parametrize("dtype", QTYPES)
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "x".join(map(str, s)))
def test_matvec_work_splits(gpu, monkeypatch, dtype, split):
    """Every work split of the matvec kernel, M = 1..4, on awkward K (odd block counts, fewer blocks
    than lanes) and N (fewer rows than a workgroup covers, not a multiple of it), full epilogue."""
    rng = np.random.default_rng(sum(split))
    monkeypatch.setattr(oq, "MATVEC_SPLITS", dict.fromkeys(oq.MATVEC_SPLITS, split))
    for M in range(1, 5):
        for K, N in ((KS[M - 1], NS[(M + SPLITS.index(split)) % 4]), (KS[-M], NS[-M])):
            q = ggml_quantize(rng.standard_normal((N, K)), dtype)
            wd = oq.dequantize_blocks(q, N, K, dtype).astype(np.float64)
            b = rng.standard_normal(N).astype(np.float32)
            wq = oq.upload_quant(gpu, q, N, K, dtype, "w", bias=gpu.upload(b))
            x = rng.standard_normal((M, K)).astype(np.float32)
            y0 = rng.standard_normal((M, N)).astype(np.float32)
            got = _run_linear(gpu, wq, b, x, y0, act=ACT_SILU, accumulate=True, x_pad=4, y_pad=1, xo=4)
            ref = act_ref(x.astype(np.float64) @ wd.T + b, ACT_SILU) + y0
            assert np.abs(got - ref).max() < 1e-4, (M, K, N, np.abs(got - ref).max())


@pytest.mark.parametrize("dtype", QTYPES)
@pytest.mark.parametrize("M", [1, 4, 9])
def test_linear_over_several_chunks(gpu, monkeypatch, dtype, M):
    """Rows split over several bindings (the LM head under a small max binding) give the same result."""
    rng = np.random.default_rng(3)
    N, K = 203, 64
    w = rng.standard_normal((N, K)).astype(np.float32)
    q = ggml_quantize(w, dtype)
    b = rng.standard_normal(N).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    whole = oq.upload_quant(gpu, q, N, K, dtype, "whole", bias=gpu.upload(b))
    monkeypatch.setattr(gpu, "max_binding", 50 * K // 32 * (oq.QUANT_BYTES[dtype] + 2) + 512)  # 50 rows per binding
    parts = oq.upload_quant(gpu, q, N, K, dtype, "parts", bias=gpu.upload(b))
    assert len(whole.chunks) == 1 and [c[1:] for c in parts.chunks] == [(0, 50), (50, 50), (100, 50), (150, 50),
                                                                         (200, 3)]
    outs = []
    for wq in (whole, parts):
        gy = gpu.empty(4 * M * N)
        oq.linear(gpu, Mat.of(gpu.upload(x), M, K), wq, Mat.of(gy, M, N))
        outs.append(gpu.read(gy, np.float32, M * N))
    assert np.array_equal(outs[0], outs[1])
    ref = x.astype(np.float64) @ oq.dequantize_blocks(q, N, K, dtype).T.astype(np.float64) + b
    assert np.abs(outs[0].reshape(M, N) - ref).max() < 1e-4


@pytest.mark.parametrize("dtype", QTYPES)
def test_batch_invariant_rows_do_not_depend_on_m(gpu, dtype):
    """With batch_invariant, row r of x gives bit-identical output whether sent alone or with others."""
    rng = np.random.default_rng(6)
    N, K, M = 70, 160, 9
    wq = oq.upload_quant(gpu, ggml_quantize(rng.standard_normal((N, K)), dtype), N, K, dtype, "w")
    x = rng.standard_normal((M, K)).astype(np.float32)
    gx = gpu.upload(x)
    outs = []
    for rows in (M, 1, 3):
        gy = gpu.empty(4 * rows * N)
        oq.linear(gpu, Mat.of(gx, rows, K), wq, Mat.of(gy, rows, N), batch_invariant=True)
        outs.append(gpu.read(gy, np.float32, rows * N).reshape(rows, N))
    assert np.array_equal(outs[1], outs[0][:1]) and np.array_equal(outs[2], outs[0][:3])


def _embed_case(gpu, dtype, rng, vocab=300, dim=96, rows=5, acap=7):
    w = (0.1 * rng.standard_normal((vocab, dim))).astype(np.float32)
    w[3, :32] *= 1e-4  # subnormal f16 scales
    q = ggml_quantize(w, dtype)
    tokens = np.array([9, 3, 299, 0, 150, 3, 77, 1], np.uint32)
    audio = rng.standard_normal((acap, dim)).astype(np.float32)
    return q, tokens, audio


@pytest.mark.parametrize("dtype", QTYPES)
def test_embed_gpu_gather_equals_cpu_dequant(gpu, monkeypatch, dtype):
    pytest.importorskip("voxtral_wgpu._native")
    rng = np.random.default_rng(4)
    vocab, dim, rows, acap, tok_off, apos0 = 300, 96, 5, 7, 2, 5
    q, tokens, audio = _embed_case(gpu, dtype, rng, vocab, dim, rows, acap)
    gtok, gaudio = gpu.upload(tokens), gpu.upload(audio)
    ids = tokens[tok_off:tok_off + rows].astype(np.int64)
    expect = audio[(apos0 + np.arange(rows)) % acap] + oq.dequantize_blocks(q, vocab, dim, dtype)[ids]
    results = {}
    tables = {"gpu": oq.upload_quant(gpu, q, vocab, dim, dtype, "E"),
              "cpu": oq.upload_quant(gpu, q, vocab, dim, dtype, "E", keep_host=True, embeddings="cpu")}
    monkeypatch.setattr(gpu, "max_binding", 64 * dim // 32 * (oq.QUANT_BYTES[dtype] + 2) + 512)  # 64 rows
    tables["gpu-chunked"] = oq.upload_quant(gpu, q, vocab, dim, dtype, "E")
    assert len(tables["gpu-chunked"].chunks) == 5
    for mode, table in tables.items():
        out = gpu.empty(4 * rows * dim)
        oq.embed(gpu, gtok, tok_off, gaudio, apos0, acap, table, Mat.of(out, rows, dim))
        results[mode] = gpu.read(out, np.float32, rows * dim).reshape(rows, dim)
    assert np.array_equal(results["gpu"], expect)  # exact: (q - 8) * d and one f32 add
    assert np.array_equal(results["cpu"], results["gpu"])
    assert np.array_equal(results["gpu-chunked"], results["gpu"])


@pytest.mark.parametrize("dtype", QTYPES)
def test_native_rows_equal_shader_rows(dtype):
    """The C extension's dequantisation (browser path) equals the layout reference exactly."""
    native = pytest.importorskip("voxtral_wgpu._native")
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 128)).astype(np.float32)
    w[7] *= 1e-5
    q = ggml_quantize(w, dtype)
    fn = native.q4_0_rows if dtype == "q4_0" else native.q8_0_rows
    ids = [0, 7, 39, 7]
    assert np.array_equal(fn(q, 128, ids), oq.dequantize_blocks(q, 40, 128, dtype)[ids])


def test_upload_rejects_bad_shapes(gpu):
    with pytest.raises(ValueError, match="multiple of 32"):
        oq.upload_quant(gpu, np.zeros(18, np.uint8), 1, 16, "q4_0", "bad")
    with pytest.raises(ValueError, match="needs"):
        oq.upload_quant(gpu, np.zeros(17, np.uint8), 1, 32, "q4_0", "bad")
    with pytest.raises(ValueError, match="unsupported"):
        oq.upload_quant(gpu, np.zeros(18, np.uint8), 1, 32, "q5_0", "bad")


def _rms(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * g


@pytest.mark.parametrize("dtype", QTYPES)
@pytest.mark.parametrize("split", [None, *(pytest.param(v, marks=pytest.mark.tuning, id=i) for v, i in
                                            (("staged", "staged"), ((32, 8, 1, 1), "32x8x1x1"),
                                             ((1, 64, 3, 2), "1x64x3x2")))],
                         ids=lambda v: "default" if v is None else None)
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "plain"])
def test_fused_norm_swiglu_and_qkv_decode_kernels(gpu, monkeypatch, dtype, split, norm):
    """RMSNorm folded into the matvec (on or off; with one input row, x * g staged in workgroup memory
    by the kernels MATVEC_STAGE names, all of them with "staged"), SwiGLU (w1, w3) and stacked q/k/v
    in one dispatch each, with the default work splits (MATVEC_SPLITS) and others; unequal q/k/v sizes
    whose boundaries fall inside a workgroup's rows, and matrices smaller than one workgroup's rows."""
    if split == "staged":
        if not norm:
            pytest.skip("staging only applies with the norm")
        monkeypatch.setattr(oq, "MATVEC_STAGE", tuple(oq.MATVEC_SPLITS))
    elif split is not None:
        monkeypatch.setattr(oq, "MATVEC_SPLITS", dict.fromkeys(oq.MATVEC_SPLITS, split))
    rng = np.random.default_rng(7 + norm)
    eps = 1e-5
    monkeypatch.setattr(oq, "LM_HEAD_ROWS", 40)  # w1/w3 (45 rows) take the LM-head split here
    # (M, K, q/k/v sizes, FFN sizes): the FFN's 45 rows take the LM-head split; each M compiles
    # its own kernels, so only M = 1 (the decode step) runs every case
    cases = [(1, 96, [(37, 13, 20), (1, 3, 17)], [45, 3]),
             (4, 160, [(37, 13, 20)], [3]) if norm else (3, 224, [(37, 13, 20)], [3]),
             (2, 32, [(1, 3, 17)], [])]
    for M, K, qkv_sizes, ffn_sizes in cases:
        g = (1 + 0.2 * rng.standard_normal(K)).astype(np.float32)
        gg = gpu.upload(g) if norm else None

        def mk(n, K=K):
            q = ggml_quantize(rng.standard_normal((n, K)) / math.sqrt(K), dtype)
            return oq.upload_quant(gpu, q, n, K, dtype, "w"), oq.dequantize_blocks(q, n, K, dtype).astype(np.float64)

        x = (3 * rng.standard_normal((M, K))).astype(np.float32)
        xn = _rms(x, g, eps) if norm else x.astype(np.float64)
        gx = gpu.upload(x)
        out = gpu.empty(4 * M * 70)
        for n1, n2, n3 in qkv_sizes:  # q/k/v boundaries inside a workgroup's rows
            (wq, dq), (wk, dk), (wv, dv) = mk(n1), mk(n2), mk(n3)
            n = n1 + n2 + n3
            assert oq.qkv_proj(gpu, Mat.of(gx, M, K), wq, wk, wv, Mat.of(out, M, n), norm=gg, eps=eps)
            got = gpu.read(out, np.float32, M * n).reshape(M, n)
            assert np.abs(got - np.concatenate([xn @ dq.T, xn @ dk.T, xn @ dv.T], axis=1)).max() < 1e-4
        for nf in ffn_sizes:
            (w1, d1), (w3, d3) = mk(nf), mk(nf)
            y0 = rng.standard_normal((M, nf)).astype(np.float32)
            gpu.write(out, y0)
            oq.linear(gpu, Mat.of(gx, M, K), w1, Mat.of(out, M, nf), accumulate=True, norm=gg, eps=eps)
            got = gpu.read(out, np.float32, M * nf).reshape(M, nf)
            assert np.abs(got - (xn @ d1.T + y0)).max() < 1e-4
            assert oq.swiglu_ffn_in(gpu, Mat.of(gx, M, K), w1, w3, Mat.of(out, M, nf), norm=gg, eps=eps)
            a, b = xn @ d1.T, xn @ d3.T
            got = gpu.read(out, np.float32, M * nf).reshape(M, nf)
            assert np.abs(got - a / (1 + np.exp(-a)) * b).max() < 1e-4
    # not applicable: too many rows (unless they are decode rows) or unaligned x -> nothing recorded,
    # the caller falls back
    many = ops.MATVEC_GROUPED_MAX + 1
    xm = Mat.of(gpu.upload(np.zeros((many, K), np.float32)), many, K)
    ym = Mat.of(gpu.empty(4 * many * wq.n), many, wq.n)
    assert not oq.swiglu_ffn_in(gpu, xm, wq, wq, ym, norm=gg, eps=eps)
    assert oq.swiglu_ffn_in(gpu, xm, wq, wq, ym, norm=gg, eps=eps, decode=True)
    assert not oq.qkv_proj(gpu, Mat(gx, 1, K, K, 1), wq, wk, wv, Mat.of(out, 1, n), norm=gg, eps=eps)
    if norm:
        with pytest.raises(ValueError, match="matvec"):
            oq.linear(gpu, xm, wq, ym, norm=gg)


@pytest.mark.parametrize("dtype", QTYPES)
def test_decode_rows_equal_alone(gpu, monkeypatch, dtype):
    """Every decode kernel (q/k/v, SwiGLU, plain with bias and accumulation, the LM-head split) gives
    each input row the same bits whatever the number of rows in the dispatch (1 .. 37, groups of
    4 rows, a last group partly filled): one stream's decoder step equals its row in a batch."""
    monkeypatch.setattr(oq, "LM_HEAD_ROWS", 60)  # the 61-row matrix takes the LM-head split here
    rng = np.random.default_rng(11)
    K, eps = 160, 1e-5
    g = gpu.upload((1 + 0.2 * rng.standard_normal(K)).astype(np.float32))

    def mk(n):
        q = ggml_quantize(rng.standard_normal((n, K)) / math.sqrt(K), dtype)
        return oq.upload_quant(gpu, q, n, K, dtype, "w")

    wq, wk, wv, w1, w3, wh = mk(37), mk(13), mk(20), mk(45), mk(45), mk(61)
    wb = mk(29)
    wb.bias = gpu.upload(rng.standard_normal(29).astype(np.float32))
    M = 37
    x = (3 * rng.standard_normal((M, K))).astype(np.float32)
    y0 = rng.standard_normal((M, 70)).astype(np.float32)
    gx = gpu.upload(x)
    out = gpu.empty(4 * M * 70)

    def run(r0, m):
        xv = Mat(gx, m, K, K, r0 * K)
        res = []
        assert oq.qkv_proj(gpu, xv, wq, wk, wv, Mat.of(out, m, 70), norm=g, eps=eps, decode=True)
        res.append(gpu.read(out, np.float32, m * 70))
        assert oq.swiglu_ffn_in(gpu, xv, w1, w3, Mat.of(out, m, 45), norm=g, eps=eps, decode=True)
        res.append(gpu.read(out, np.float32, m * 45))
        gpu.write(out, y0[r0:r0 + m, :29])
        oq.linear(gpu, xv, wb, Mat.of(out, m, 29), accumulate=True, act=ACT_GELU, decode=True)
        res.append(gpu.read(out, np.float32, m * 29))
        oq.linear(gpu, xv, wh, Mat.of(out, m, 61), norm=g, eps=eps, decode=True)
        res.append(gpu.read(out, np.float32, m * 61))
        return [r.reshape(m, -1) for r in res]

    alone = [run(r, 1) for r in range(M)]
    for r0, m in ((0, M), (3, 2), (5, 5), (8, 8), (20, 13)):
        for k, got in enumerate(run(r0, m)):
            want = np.concatenate([alone[r0 + i][k] for i in range(m)])
            assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist(), (k, r0, m)


@pytest.mark.parametrize("dtype", QTYPES)
def test_norm_over_several_chunks(gpu, monkeypatch, dtype):
    """The folded RMSNorm on a matrix split into row chunks (the LM head under a small binding limit)."""
    rng = np.random.default_rng(9)
    N, K, eps = 131, 160, 1e-5
    q = ggml_quantize(rng.standard_normal((N, K)), dtype)
    monkeypatch.setattr(gpu, "max_binding", 40 * K // 32 * (oq.QUANT_BYTES[dtype] + 2) + 512)  # 40 rows
    wq = oq.upload_quant(gpu, q, N, K, dtype, "parts")
    assert len(wq.chunks) == 4
    g = (1 + 0.2 * rng.standard_normal(K)).astype(np.float32)
    for M in (1, 4):
        x = rng.standard_normal((M, K)).astype(np.float32)
        y = gpu.empty(4 * M * N)
        oq.linear(gpu, Mat.of(gpu.upload(x), M, K), wq, Mat.of(y, M, N), norm=gpu.upload(g), eps=eps)
        ref = _rms(x, g, eps) @ oq.dequantize_blocks(q, N, K, dtype).T.astype(np.float64)
        assert np.abs(gpu.read(y, np.float32, M * N).reshape(M, N) - ref).max() < 1e-4

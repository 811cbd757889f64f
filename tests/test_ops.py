"""Op-level GPU tests: every WGSL entry point (through its ops.py wrapper) against a float64 NumPy
reference (tests/op_reference.py), on awkward sizes, strides and offsets, plus hypothesis over shapes.

Tolerances (|gpu - ref| elementwise; "NaN never passes"):
  linear      1e-5 * (1 + |ref|) + 2e-6 * sqrt(K) * S,  S = sum_k |x_k W_nk| + |b_n|
              (f32 accumulation of K products; the GELU/SiLU epilogues have slope <= 1.13)
  conv stem   same as linear (it is linear with overlapping rows)
  rms_norm    1e-5 * |ref|   (pure relative: one rsqrt and two products per element)
  rope        (2e-6 + 1e-15 * max_pos) * (1 + |a| + |b|) per rotated pair (a, b): f32 rotation plus the
              float64 table's angle error, which grows like pos * 2^-53
  rope_table  6e-8 + 4 * 2^-53 * pos * inv_freq  against extended-precision angles
  attention   2e-5 * (1 + |ref|)
  swiglu      2e-5 * |ref| + 1e-6  (WGSL exp is only accurate to 3 + 2|x| ulp)
  embed       bit-exact against the f32 sum audio + E (WGSL '+' is correctly rounded)
  argmax, kv_write, ring_copy   exact
Every output buffer is pre-filled with a random guard pattern and the elements an op must not
write are checked bit-for-bit afterwards.

All tests share a handful of scratch buffers, so bind groups and pipelines are created once
(the Gpu caches both). Runs in well under a minute and a half on lavapipe (2 CPU cores).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import op_reference as ref
from voxtral_wgpu import ops
from voxtral_wgpu.gpu import (INCLUDE_RE, MAX_INVOCATIONS, MAX_GROUPS_PER_DIM, GpuError, groups_2d, pack_params,
                              read_shader, shader_dir)
from voxtral_wgpu.ops import ACT_GELU, ACT_NONE, ACT_SILU, DenseWeight, Mat

SCRATCH_BYTES = 8 << 20
SCRATCH_NAMES = ("x", "y", "b", "t", "a", "w0", "w1", "w2")
HSET = dict(deadline=None, derandomize=True)  # derandomized: reproducible CI runs


# ------------------------------------------------------------------------------------------ helpers
class Scratch:
    """Fixed 8 MiB storage buffers reused by every test (attribute access by role name)."""

    def __init__(self, gpu):
        self.gpu = gpu
        for n in SCRATCH_NAMES:
            setattr(self, n, gpu.empty(SCRATCH_BYTES, f"test.{n}"))

    def put(self, buf, arr, offset_bytes: int = 0):
        arr = np.ascontiguousarray(arr).ravel()
        assert offset_bytes + arr.nbytes <= SCRATCH_BYTES
        self.gpu.write(buf, arr, offset_bytes)

    def get(self, buf, count: int, dtype=np.float32):
        return self.gpu.read(buf, dtype, count)


@pytest.fixture(scope="module")
def S(gpu):
    return Scratch(gpu)


def assert_close(got, want, tol, what=""):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    tol = np.broadcast_to(np.asarray(tol, np.float64), want.shape)
    err = np.abs(got - want)
    bad = ~(err <= tol)  # NaN fails
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(err, nan=np.inf) / tol, -1)), want.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} elements out of tolerance; worst at {i}: "
            f"got {got[i]!r} want {want[i]!r} (|err| {err[i]:.3g} > tol {tol[i]:.3g})")


def assert_untouched(got, before, mask_written, what=""):
    """Bitwise equality outside the written region."""
    g = np.asarray(got, np.float32).view(np.uint32)
    b = np.asarray(before, np.float32).view(np.uint32)
    diff = (g != b) & ~mask_written
    if diff.any():
        idx = np.flatnonzero(diff)
        raise AssertionError(f"{what}: {idx.size} elements outside the output were modified, first at {idx[:8]}")


def strided_rows(full: np.ndarray, rows: int, cols: int, ld: int, off: int) -> np.ndarray:
    return np.stack([full[off + r * ld: off + r * ld + cols] for r in range(rows)]) if rows else np.zeros((0, cols))


def strided_mask(length: int, rows: int, cols: int, ld: int, off: int) -> np.ndarray:
    m = np.zeros(length, bool)
    for r in range(rows):
        m[off + r * ld: off + r * ld + cols] = True
    return m


# ------------------------------------------------------------------------------------------ linear
def run_linear(gpu, x: Mat, w: DenseWeight, y: Mat, *, act=ACT_NONE, accumulate=False, kernel="auto"):
    """ops.linear, or the same dispatches with the kernel forced (``matmul`` / ``matvec``)."""
    if kernel == "auto":
        return ops.linear(gpu, x, w, y, act=act, accumulate=accumulate)
    assert kernel in ("matmul", "matvec")
    if kernel == "matvec":
        assert x.rows <= 4 and w.k % 2 == 0, "matvec needs M <= 4 and even K"
    for buf, row0, nrows in w.chunks:
        k = gpu.kernel("linear", kernel, W_BF16=w.dtype == "bf16")
        params = pack_params(x.rows, nrows, w.k, x.ld, x.off, y.ld, y.off + row0, int(w.bias is not None), row0,
                             act, int(accumulate))
        groups = groups_2d(-(-nrows // 8)) if kernel == "matvec" else (-(-nrows // 64), -(-x.rows // 64))
        gpu.dispatch(k, params, [x.buf, buf, w.bias if w.bias is not None else buf, y.buf], groups)


def upload_weight(S, W32: np.ndarray, dtype: str, splits=None, bias: np.ndarray | None = None):
    """DenseWeight over the scratch buffers w0/w1/w2 (one chunk each, row sizes ``splits``) and the
    float64 matrix the GPU actually sees (BF16-rounded when dtype='bf16')."""
    n, k = W32.shape
    splits = list(splits or [n])
    assert sum(splits) == n and 1 <= len(splits) <= 3
    if dtype == "bf16":
        host = ref.f32_to_bf16(W32)
        W64 = ref.bf16_to_f64(host)
    else:
        host = np.ascontiguousarray(W32, np.float32)
        W64 = host.astype(np.float64)
    chunks, r0 = [], 0
    for buf, nr in zip((S.w0, S.w1, S.w2), splits):
        S.put(buf, host[r0:r0 + nr])
        chunks.append((buf, r0, nr))
        r0 += nr
    if bias is not None:
        S.put(S.b, bias.astype(np.float32))
    return DenseWeight(n, k, dtype, chunks, S.b if bias is not None else None), W64


def check_linear(gpu, S, *, M, N, K, dtype="bf16", bias=True, act=ACT_NONE, accumulate=False, ld_extra=0,
                 x_off=0, ldy_extra=0, y_off=0, splits=None, kernel="auto", seed=0):
    rng = np.random.default_rng(seed)
    ld, ldy = K + ld_extra, N + ldy_extra
    x_len = x_off + (M - 1) * ld + K + 5
    y_len = y_off + (M - 1) * ldy + N + 7
    xfull = rng.standard_normal(x_len).astype(np.float32)
    W32 = (rng.standard_normal((N, K)) / math.sqrt(K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    yfull = rng.standard_normal(y_len).astype(np.float32)
    w, W64 = upload_weight(S, W32, dtype, splits, b)
    S.put(S.x, xfull)
    S.put(S.y, yfull)
    run_linear(gpu, Mat(S.x, M, K, ld, x_off), w, Mat(S.y, M, N, ldy, y_off), act=act, accumulate=accumulate,
               kernel=kernel)
    got = S.get(S.y, y_len)

    X = strided_rows(xfull, M, K, ld, x_off).astype(np.float64)
    Y0 = strided_rows(yfull, M, N, ldy, y_off).astype(np.float64)
    want = ref.linear(X, W64, b, act, Y0 if accumulate else None)
    mag = np.abs(X) @ np.abs(W64).T + (np.abs(b.astype(np.float64))[None, :] if bias else 0.0)
    tol = 1e-5 * (1 + np.abs(want)) + 2e-6 * math.sqrt(K) * mag
    what = f"linear M={M} N={N} K={K} {dtype} bias={bias} act={act} acc={accumulate} kernel={kernel} splits={splits}"
    assert_close(strided_rows(got, M, N, ldy, y_off), want, tol, what)
    assert_untouched(got, yfull, strided_mask(y_len, M, N, ldy, y_off), what)


LIN_M = [1, 2, 3, 4, 5, 63, 65, 129]
LIN_K = [2, 30, 66, 130, 384]
LIN_N = [1, 7, 65, 200]


@pytest.mark.parametrize("M", LIN_M)
@pytest.mark.parametrize("K", LIN_K)
def test_linear_awkward_sizes(gpu, S, M, K):
    """Every (M, K) of the brief, N cycling through its list, both weight dtypes, auto kernel choice
    plus every kernel that can run the shape (matvec needs M <= 4)."""
    i, j = LIN_M.index(M), LIN_K.index(K)
    N = LIN_N[(i + j) % len(LIN_N)]
    dtype = "bf16" if (i + j) % 2 == 0 else "f32"
    kernels = ["auto", "matmul"] + (["matvec"] if M <= 4 else [])
    for n_k, kernel in enumerate(kernels):
        check_linear(gpu, S, M=M, N=N, K=K, dtype=dtype, bias=(i + n_k) % 2 == 0, act=(j + n_k) % 3,
                     accumulate=n_k == 1, seed=100 * i + 10 * j + n_k, kernel=kernel)


@pytest.mark.parametrize("kernel", ["matmul", "matvec"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("act", [ACT_NONE, ACT_GELU, ACT_SILU])
def test_linear_epilogues(gpu, S, kernel, dtype, act):
    """bias x act x accumulate on both kernels, with row strides and offsets on x and y."""
    for bias in (False, True):
        for acc in (False, True):
            check_linear(gpu, S, M=3, N=65, K=130, dtype=dtype, bias=bias, act=act, accumulate=acc, ld_extra=7,
                         x_off=13, ldy_extra=3, y_off=5, kernel=kernel, seed=7 * act + 2 * bias + acc)


def test_linear_gelu_silu_wide_range(gpu, S):
    """Pre-activations over [-30, 30] (saturated GELU/SiLU tails, erf approximation) on both kernels."""
    K, N = 2, 200
    W32 = np.zeros((N, K), np.float32)
    W32[:, 0] = np.linspace(-30, 30, N, dtype=np.float32)
    w, W64 = upload_weight(S, W32, "f32")
    x = np.array([1.0, 0.0, 0.5, 0.0, -0.25, 0.0, 0.01, 0.0], np.float32)  # 4 rows of [a, 0]
    for kernel in ("matvec", "matmul"):
        for act in (ACT_GELU, ACT_SILU):
            S.put(S.x, x)
            S.put(S.y, np.zeros(4 * N, np.float32))
            run_linear(gpu, Mat(S.x, 4, K, K), w, Mat.of(S.y, 4, N), act=act, kernel=kernel)
            got = S.get(S.y, 4 * N).reshape(4, N)
            want = ref.linear(x.reshape(4, K), W64, None, act)
            assert_close(got, want, 1e-6 * (1 + np.abs(want)), f"{kernel} act={act}")


def test_linear_kernel_choice(gpu, S, monkeypatch):
    """ops.linear takes a matvec kernel (linear.wgsl's, or matvec.wgsl's fused one where it applies)
    exactly when M <= 4 and K is even, a matmul (matmul.wgsl for BF16 with K % 16 == 0, else
    linear.matmul) otherwise and always with batch_invariant;
    one dispatch per weight chunk."""
    seen = []
    orig = gpu.dispatch
    monkeypatch.setattr(gpu, "dispatch", lambda k, *a, **kw: (seen.append(k.name), orig(k, *a, **kw))[1])
    for M, K in [(1, 30), (4, 66), (2, 64), (5, 66), (2, 31), (1, 3), (70, 64)]:
        for dtype in ("bf16", "f32"):
            seen.clear()
            check_linear(gpu, S, M=M, N=65, K=K, dtype=dtype, splits=[30, 20, 15], seed=M * K)
            assert len(seen) == 3 and len(set(seen)) == 1, seen
            assert seen[0].endswith(".matvec") == (M <= 4 and K % 2 == 0), (M, K, dtype, seen)
            assert seen[0] in ("linear.matmul", "matmul.matmul", "linear.matvec", "matvec.matvec"), seen
            seen.clear()
            x, w, y = Mat(S.x, M, K, K), DenseWeight(65, K, dtype, [(S.w0, 0, 65)]), Mat(S.y, M, 65, 65)
            ops.linear(gpu, x, w, y, batch_invariant=True)
            assert len(seen) == 1 and seen[0] in ("linear.matmul", "matmul.matmul"), seen


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_linear_batch_invariant(gpu, S, dtype):
    """batch_invariant=True: every row's result is bit-identical whatever M and the row's place in
    the batch (the encoder relies on it so streaming and offline batching agree exactly)."""
    rng = np.random.default_rng(1)
    K, N, M = 130, 65, 70
    w, _ = upload_weight(S, (rng.standard_normal((N, K)) / math.sqrt(K)).astype(np.float32), dtype,
                         bias=rng.standard_normal(N).astype(np.float32))
    X = rng.standard_normal((M, K)).astype(np.float32)
    S.put(S.x, X)
    ops.linear(gpu, Mat.of(S.x, M, K), w, Mat.of(S.y, M, N), act=ACT_GELU, batch_invariant=True)
    full = S.get(S.y, M * N).reshape(M, N)
    for r0, n in [(0, 1), (5, 3), (66, 4), (1, 64)]:
        ops.linear(gpu, Mat(S.x, n, K, K, r0 * K), w, Mat.of(S.y, n, N), act=ACT_GELU, batch_invariant=True)
        part = S.get(S.y, n * N).reshape(n, N)
        assert np.array_equal(part.view(np.uint32), full[r0:r0 + n].view(np.uint32)), (r0, n)


def test_linear_split_k(gpu, S, monkeypatch):
    """matmul.wgsl with K split (a narrow weight, K = 1184: pieces of 512, 512, 160): partial sums and
    reduce_splits, over 3 row chunks, with bias, GELU, accumulate and strided x / y; every row
    bit-identical whatever M and however many rows one pass takes (the partials' binding limit)."""
    assert ops.matmul_splits(200, 1184) == 3 and ops.matmul_splits(ops.MATMUL_SPLIT_MAX_N + 1, 1184) == 1
    seen = []
    orig = gpu.dispatch
    monkeypatch.setattr(gpu, "dispatch", lambda k, *a, **kw: (seen.append(k.name), orig(k, *a, **kw))[1])
    for M in (70, 130):  # (fewer rows take the matrix-vector kernel)
        seen.clear()
        check_linear(gpu, S, M=M, N=200, K=1184, bias=True, act=ACT_GELU, accumulate=M == 130, ld_extra=4, x_off=8,
                     ldy_extra=3, y_off=5, splits=[65, 70, 65], seed=M)
        assert seen == ["matmul.matmul", "matmul.reduce_splits"] * 3, seen
    rng = np.random.default_rng(2)
    K, N, M = 1184, 200, 70
    w, _ = upload_weight(S, (rng.standard_normal((N, K)) / math.sqrt(K)).astype(np.float32), "bf16",
                         bias=rng.standard_normal(N).astype(np.float32))
    S.put(S.x, rng.standard_normal((M, K)).astype(np.float32))
    ops.linear(gpu, Mat.of(S.x, M, K), w, Mat.of(S.y, M, N), act=ACT_SILU, batch_invariant=True)
    full = S.get(S.y, M * N).reshape(M, N)
    for r0, n, binding in [(0, 1, None), (5, 3, None), (66, 4, None), (0, 70, 4 * 3 * 200 * 8 + 16)]:
        if binding is not None:  # 8 rows of partial sums per pass
            monkeypatch.setattr(gpu, "max_binding", binding)
        ops.linear(gpu, Mat(S.x, n, K, K, r0 * K), w, Mat.of(S.y, n, N), act=ACT_SILU, batch_invariant=True)
        part = S.get(S.y, n * N).reshape(n, N)
        assert np.array_equal(part.view(np.uint32), full[r0:r0 + n].view(np.uint32)), (r0, n, binding)


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("kernel", ["matmul", "matvec"])
def test_linear_row_chunks(gpu, S, dtype, kernel):
    """A weight split into 2-3 row chunks, each its own buffer, one shared bias (b_off = row0),
    odd chunk sizes (BF16 chunks ending mid-word), with output offsets."""
    for splits in ([1, 199], [64, 1, 135], [65, 70, 65], [7, 193]):
        for acc in (False, True):
            check_linear(gpu, S, M=4 if kernel == "matvec" else 70, N=200, K=66, dtype=dtype, bias=True,
                         act=ACT_GELU, accumulate=acc, splits=splits, ld_extra=2, x_off=3, ldy_extra=11,
                         y_off=9, kernel=kernel, seed=sum(splits[:-1]) + acc)


def test_linear_matvec_2d_groups(gpu, S):
    """N/8 > 65535 workgroups: matvec splits its groups over x/y (groups_2d) and must skip the tail."""
    N, K = 8 * MAX_GROUPS_PER_DIM + 8 * 3 + 5, 2
    assert groups_2d(-(-N // 8))[1] > 1
    check_linear(gpu, S, M=1, N=N, K=K, dtype="bf16", bias=True, act=ACT_NONE, kernel="matvec", seed=5)


@pytest.mark.parametrize("stride,pad", [(1, 2), (2, 1)])
@pytest.mark.parametrize("c_in", [5, 8])
@pytest.mark.parametrize("T", [3, 9, 70])
def test_conv_stem_as_linear(gpu, S, stride, pad, c_in, T):
    """The encoder's causal conv stem is linear with overlapping rows: x time-major [T, C_in] with
    `pad` zero rows in front, row stride stride*C_in, K = 3*C_in, W reordered to [C_out, 3, C_in].
    conv0 is (stride 1, left pad 2), conv1 (stride 2, left pad 1); both with GELU, as in model.py."""
    rng = np.random.default_rng(stride * 1000 + c_in * 100 + T)
    c_out = 33
    x = rng.standard_normal((T, c_in)).astype(np.float32)
    wt = (rng.standard_normal((c_out, c_in, 3)) / math.sqrt(3 * c_in)).astype(np.float32)  # torch layout
    b = rng.standard_normal(c_out).astype(np.float32)
    lead = 11  # junk elements before the padded input: a non-zero x.off
    xfull = np.concatenate([rng.standard_normal(lead).astype(np.float32), np.zeros(pad * c_in, np.float32),
                            x.ravel(), rng.standard_normal(9).astype(np.float32)])
    t_out = (T + pad - 3) // stride + 1
    for dtype in ("bf16", "f32"):
        reordered = np.ascontiguousarray(wt.transpose(0, 2, 1)).reshape(c_out, 3 * c_in)
        w, W64 = upload_weight(S, reordered, dtype, bias=b)
        w_conv = W64.reshape(c_out, 3, c_in).transpose(0, 2, 1)  # the rounded weights in torch layout
        want = ref.gelu(ref.causal_conv1d(x, w_conv, b, stride, pad))
        assert want.shape[0] == t_out
        kernels = ["auto", "matmul"] + (["matvec"] if t_out <= 4 and (3 * c_in) % 2 == 0 else [])
        for kernel in kernels:
            ldy, yoff = c_out + 4, 6
            y_len = yoff + t_out * ldy
            yfull = rng.standard_normal(y_len).astype(np.float32)
            S.put(S.x, xfull)
            S.put(S.y, yfull)
            run_linear(gpu, Mat(S.x, t_out, 3 * c_in, stride * c_in, lead), w, Mat(S.y, t_out, c_out, ldy, yoff),
                       act=ACT_GELU, kernel=kernel)
            got = S.get(S.y, y_len)
            mag = np.abs(ref.causal_conv1d(np.abs(x), np.abs(w_conv), np.abs(b), stride, pad))
            tol = 1e-5 * (1 + np.abs(want)) + 2e-6 * math.sqrt(3 * c_in) * mag
            what = f"conv stride={stride} pad={pad} C_in={c_in} T={T} {dtype} {kernel}"
            assert_close(strided_rows(got, t_out, c_out, ldy, yoff), want, tol, what)
            assert_untouched(got, yfull, strided_mask(y_len, t_out, c_out, ldy, yoff), what)


@st.composite
def linear_cases(draw):
    M = draw(st.one_of(st.sampled_from(LIN_M), st.integers(1, 140)))
    K = draw(st.one_of(st.sampled_from(LIN_K), st.integers(1, 400)))
    N = draw(st.one_of(st.sampled_from(LIN_N), st.integers(1, 260)))
    kernels = ["auto", "matmul"] + (["matvec"] if M <= 4 and K % 2 == 0 else [])
    n_chunks = draw(st.integers(1, min(3, N)))
    cuts = sorted(draw(st.lists(st.integers(1, N - 1), min_size=n_chunks - 1, max_size=n_chunks - 1,
                                unique=True))) if n_chunks > 1 else []
    bounds = [0] + cuts + [N]
    return dict(M=M, N=N, K=K, dtype=draw(st.sampled_from(["bf16", "f32"])), bias=draw(st.booleans()),
                act=draw(st.sampled_from([ACT_NONE, ACT_GELU, ACT_SILU])), accumulate=draw(st.booleans()),
                ld_extra=draw(st.integers(0, 9)), x_off=draw(st.integers(0, 40)), ldy_extra=draw(st.integers(0, 5)),
                y_off=draw(st.integers(0, 40)), splits=[bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)],
                kernel=draw(st.sampled_from(kernels)), seed=draw(st.integers(0, 2**31)))


@settings(max_examples=40, **HSET)
@given(case=linear_cases())
def test_linear_property(gpu, S, case):
    check_linear(gpu, S, **case)


# ------------------------------------------------------------------------------------------ rms_norm
def check_rms(gpu, S, *, rows, dim, eps=1e-5, ldx_extra=0, x_off=0, ldy_extra=0, y_off=0, seed=0):
    rng = np.random.default_rng(seed)
    ldx, ldy = dim + ldx_extra, dim + ldy_extra
    x_len = x_off + (rows - 1) * ldx + dim + 3
    y_len = y_off + (rows - 1) * ldy + dim + 3
    scales = 10.0 ** rng.integers(-3, 4, size=rows)  # rows from 1e-3 (eps matters) to 1e3
    X = (rng.standard_normal((rows, dim)) * scales[:, None]).astype(np.float32)
    if rows > 2:
        X[1] = 0.0  # an all-zero row: y = 0 exactly
    xfull = rng.standard_normal(x_len).astype(np.float32)
    for r in range(rows):
        xfull[x_off + r * ldx: x_off + r * ldx + dim] = X[r]
    g = (1 + 0.3 * rng.standard_normal(dim)).astype(np.float32)
    yfull = rng.standard_normal(y_len).astype(np.float32)
    S.put(S.x, xfull)
    S.put(S.b, g)
    S.put(S.y, yfull)
    ops.rms_norm(gpu, Mat(S.x, rows, dim, ldx, x_off), S.b, Mat(S.y, rows, dim, ldy, y_off), eps)
    got = S.get(S.y, y_len)
    want = ref.rms_norm(X, g, eps)
    what = f"rms_norm rows={rows} dim={dim} eps={eps}"
    assert_close(strided_rows(got, rows, dim, ldy, y_off), want, 1e-5 * np.abs(want) + 1e-30, what)
    assert_untouched(got, yfull, strided_mask(y_len, rows, dim, ldy, y_off), what)


@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("dim", [1, 7, 300, 1281])
def test_rms_norm_sizes(gpu, S, rows, dim):
    check_rms(gpu, S, rows=rows, dim=dim, eps=1e-5, ldx_extra=3, x_off=5, ldy_extra=1, y_off=2, seed=rows * dim)


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1, 4.0])
def test_rms_norm_eps(gpu, S, eps):
    check_rms(gpu, S, rows=9, dim=65, eps=eps, seed=int(eps * 1e6))


def test_rms_norm_2d_groups(gpu, S):
    """More than 65535 rows: the row index comes from both workgroup dimensions."""
    check_rms(gpu, S, rows=MAX_GROUPS_PER_DIM + 2, dim=3, seed=3)


@settings(max_examples=25, **HSET)
@given(rows=st.integers(1, 40), dim=st.integers(1, 1400), eps=st.sampled_from([1e-6, 1e-5, 1e-2]),
       ldx_extra=st.integers(0, 17), x_off=st.integers(0, 50), ldy_extra=st.integers(0, 17), y_off=st.integers(0, 50),
       seed=st.integers(0, 2**31))
def test_rms_norm_property(gpu, S, rows, dim, eps, ldx_extra, x_off, ldy_extra, y_off, seed):
    check_rms(gpu, S, rows=rows, dim=dim, eps=eps, ldx_extra=ldx_extra, x_off=x_off, ldy_extra=ldy_extra,
              y_off=y_off, seed=seed)


# ------------------------------------------------------------------------------------------ rope
@pytest.mark.parametrize("head_dim", [2, 16, 64, 128, 256])
@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_table_accuracy(head_dim, theta):
    """ops.rope_table against extended-precision angles, at small and huge positions, and evidence
    that a naive f32 angle would not pass the same bound."""
    positions = np.array([0, 1, 2, 17, 10**6, 10**6 + 1, 10**9, 2**31 - 1, 2**31 + 3])
    table = ops.rope_table(positions, head_dim, theta)
    assert table.dtype == np.float32 and table.shape == (len(positions), head_dim // 2, 2)
    want = ref.rope_table(positions, head_dim, theta)
    inv_freq = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    bound = 6e-8 + 4 * 2.0**-53 * positions[:, None, None] * inv_freq[None, :, None]
    assert_close(table, want, bound, f"rope_table d={head_dim} theta={theta}")
    if head_dim >= 16:  # a float32 pos * inv_freq is far off at 1e6 and beyond
        naive_ang = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
        naive = np.stack([np.cos(naive_ang), np.sin(naive_ang)], -1).astype(np.float64)
        big = positions >= 10**6
        assert np.max(np.abs(naive - want)[big]) > 100 * np.max(bound[big])


def check_rope(gpu, S, *, rows, n_heads, head_dim, positions, theta=1e6, ld_extra=0, off=0, seed=0):
    rng = np.random.default_rng(seed)
    width = n_heads * head_dim
    ld = width + ld_extra
    length = off + (rows - 1) * ld + width + 3
    vfull = rng.standard_normal(length).astype(np.float32)
    V = strided_rows(vfull, rows, width, ld, off)
    S.put(S.b, ops.rope_table(positions, head_dim, theta))
    S.put(S.x, vfull)
    ops.rope(gpu, S.b, Mat(S.x, rows, width, ld, off), n_heads, head_dim)
    got = S.get(S.x, length)
    want = ref.rope(V, positions, n_heads, head_dim, theta)
    pair = np.repeat(np.abs(V.reshape(rows, -1, 2)).sum(-1), 2, axis=1)
    tol = (2e-6 + 1e-15 * max(int(p) for p in positions)) * (1 + pair)
    what = f"rope rows={rows} heads={n_heads} d={head_dim} pos0={positions[0]}"
    assert_close(strided_rows(got, rows, width, ld, off), want, tol, what)
    assert_untouched(got, vfull, strided_mask(length, rows, width, ld, off), what)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256, 48, 2])
@pytest.mark.parametrize("pos0", [0, 10**6, 10**9, 2**31 + 5])
def test_rope(gpu, S, head_dim, pos0):
    rows = 7
    check_rope(gpu, S, rows=rows, n_heads=3, head_dim=head_dim, positions=np.arange(pos0, pos0 + rows),
               ld_extra=5, off=3, seed=head_dim + pos0 % 1000)


@settings(max_examples=25, **HSET)
@given(rows=st.integers(1, 40), n_heads=st.integers(1, 8), half=st.integers(8, 128),
       pos0=st.one_of(st.integers(0, 5000), st.sampled_from([10**6, 10**9, 2**31 + 11])),
       theta=st.sampled_from([1e4, 1e6]), ld_extra=st.integers(0, 9), off=st.integers(0, 30),
       seed=st.integers(0, 2**31))
def test_rope_property(gpu, S, rows, n_heads, half, pos0, theta, ld_extra, off, seed):
    rng = np.random.default_rng(seed)
    positions = pos0 + np.cumsum(rng.integers(0, 3, rows))  # any per-row position, repeats allowed
    check_rope(gpu, S, rows=rows, n_heads=n_heads, head_dim=2 * half, positions=positions, theta=theta,
               ld_extra=ld_extra, off=off, seed=seed)


# ------------------------------------------------------------------------------------------ kv_write + attention
def run_attention_stream(gpu, S, *, n_heads, n_kv_heads, head_dim, window, chunks, start=0, cap=None,
                         ldq_extra=0, q_off=0, ldo_extra=0, o_off=0, kv_extra=0, seed=0):
    """Write keys/values chunk by chunk into the ring (kv_write) and attend each chunk's queries,
    checking every chunk's output and, at the end, the cache contents slot by slot.

    Keys the first chunk can see (start-window+1 .. start-1) are written first, in pieces <= cap."""
    rng = np.random.default_rng(seed)
    width, qw = n_kv_heads * head_dim, n_heads * head_dim
    if cap is None:
        cap = window + max(chunks) - 1
    ldk = 2 * width + kv_extra
    ldq, ldo = qw + ldq_extra, qw + ldo_extra
    keys, values = {}, {}
    last_written = {}  # slot -> position

    def write(p0, rows):
        k = rng.standard_normal((rows, width)).astype(np.float32)
        v = rng.standard_normal((rows, width)).astype(np.float32)
        full = rng.standard_normal(kv_extra + rows * ldk).astype(np.float32)
        for r in range(rows):
            base = kv_extra + r * ldk
            full[base: base + width] = k[r]
            full[base + width: base + 2 * width] = v[r]
            keys[p0 + r], values[p0 + r] = k[r], v[r]
            last_written[(p0 + r) % cap] = p0 + r
        S.put(S.w2, full)
        ops.kv_write(gpu, Mat(S.w2, rows, width, ldk, kv_extra), Mat(S.w2, rows, width, ldk, kv_extra + width),
                     S.w0, S.w1, p0, cap)

    first = max(0, start - window + 1)
    for p in range(first, start, cap):
        write(p, min(cap, start - p))

    pos = start
    for rows in chunks:
        write(pos, rows)
        q_len = q_off + (rows - 1) * ldq + qw + 2
        o_len = o_off + (rows - 1) * ldo + qw + 2
        qfull = rng.standard_normal(q_len).astype(np.float32)
        ofull = rng.standard_normal(o_len).astype(np.float32)
        S.put(S.x, qfull)
        S.put(S.y, ofull)
        ops.attention(gpu, Mat(S.x, rows, qw, ldq, q_off), S.w0, S.w1, Mat(S.y, rows, qw, ldo, o_off),
                      n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, pos0=pos, window=window, cap=cap)
        got = S.get(S.y, o_len)
        Q = strided_rows(qfull, rows, qw, ldq, q_off)
        want = ref.attention(Q, keys, values, range(pos, pos + rows), n_heads, n_kv_heads, head_dim, window)
        what = (f"attention heads={n_heads}/{n_kv_heads} d={head_dim} window={window} cap={cap} "
                f"pos0={pos} rows={rows}")
        assert_close(strided_rows(got, rows, qw, ldo, o_off), want, 2e-5 * (1 + np.abs(want)), what)
        assert_untouched(got, ofull, strided_mask(o_len, rows, qw, ldo, o_off), what)
        pos += rows

    kc = S.get(S.w0, cap * width).reshape(cap, width)
    vc = S.get(S.w1, cap * width).reshape(cap, width)
    for slot, p in last_written.items():
        assert np.array_equal(kc[slot], keys[p]) and np.array_equal(vc[slot], values[p]), f"kv slot {slot} pos {p}"


@pytest.mark.parametrize("src_cap,dst_cap,first,count,width", [
    (7, 5, 3, 5, 3),               # both rings wrap, odd width
    (12, 749, 10**6 + 3, 12, 16),  # source full, destination much larger, huge positions
    (1261, 749, 2**31 + 11, 749, 1024),  # the encoder's shapes at 512 rows (f16, 32 x 64 heads)
    (9, 9, 0, 1, 1),
])
def test_ring_copy(gpu, S, src_cap, dst_cap, first, count, width):
    """ring_copy: positions first .. first + count - 1 land at slot p % dst_cap bit for bit (NaN
    patterns included); every other destination word keeps its value."""
    rng = np.random.default_rng(src_cap + first)
    src_k = rng.integers(0, 2**32, (src_cap, width), dtype=np.uint32)
    src_v = rng.integers(0, 2**32, (src_cap, width), dtype=np.uint32)
    src_k[0, 0] = 0x7FA00001  # a signalling NaN as f32 (a float copy could quiet it)
    src_v[-1, -1] = 0xFFFF7E01  # f16 pair: NaN, finite
    dst_k = rng.integers(0, 2**32, (dst_cap, width), dtype=np.uint32)
    dst_v = rng.integers(0, 2**32, (dst_cap, width), dtype=np.uint32)
    for buf, a in ((S.w0, src_k), (S.w1, src_v), (S.x, dst_k), (S.y, dst_v)):
        S.put(buf, a)
    ops.ring_copy(gpu, S.w0, S.w1, src_cap, S.x, S.y, dst_cap, first, count, 4 * width)
    want_k, want_v = dst_k.copy(), dst_v.copy()
    for pos in range(first, first + count):
        want_k[pos % dst_cap], want_v[pos % dst_cap] = src_k[pos % src_cap], src_v[pos % src_cap]
    assert np.array_equal(S.get(S.x, dst_cap * width, np.uint32).reshape(dst_cap, width), want_k)
    assert np.array_equal(S.get(S.y, dst_cap * width, np.uint32).reshape(dst_cap, width), want_v)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
def test_attention_gqa_ring_wrap(gpu, S, groups, head_dim):
    """GQA group sizes x head dims; window 6 over a minimal ring (cap = window + rows - 1 = 12)
    that wraps several times; strided q/out with offsets."""
    n_kv = 2 if groups <= 2 else 1
    run_attention_stream(gpu, S, n_heads=n_kv * groups, n_kv_heads=n_kv, head_dim=head_dim, window=6,
                         chunks=[5, 1, 7, 1, 7, 3, 2], ldq_extra=3, q_off=5, ldo_extra=2, o_off=7, kv_extra=3,
                         seed=groups * head_dim)


def test_attention_window_one(gpu, S):
    """window == 1: every query sees only its own key, out == v[pos]."""
    run_attention_stream(gpu, S, n_heads=4, n_kv_heads=2, head_dim=32, window=1, chunks=[1, 5, 1, 70, 3], seed=1)


def test_attention_window_larger_than_context(gpu, S):
    """window far above the number of positions: plain causal attention from position 0."""
    run_attention_stream(gpu, S, n_heads=4, n_kv_heads=1, head_dim=64, window=1000, chunks=[10, 1, 30, 70, 1],
                         seed=2)


def test_attention_small_ring_whole_sequence(gpu, S):
    """The other legal ring: cap < window + rows - 1 but the whole stream fits (pos0 + rows <= cap)."""
    run_attention_stream(gpu, S, n_heads=2, n_kv_heads=2, head_dim=16, window=1000, chunks=[20, 1, 27], cap=48,
                         seed=3)


@pytest.mark.parametrize("window", [3, 16, 129, 300])
def test_attention_70_rows(gpu, S, window):
    """Prefill-sized chunks (70 rows) with windows below, around and above the 128-key tile."""
    run_attention_stream(gpu, S, n_heads=8, n_kv_heads=2, head_dim=64, window=window, chunks=[70, 70, 1, 70],
                         ldq_extra=1, q_off=1, seed=window)


@pytest.mark.parametrize("start", [2**30 - 3, 2**30, 2**31 + 5, 2**32 + 7, 10**12 + 1])
def test_attention_huge_positions(gpu, S, start):
    """pos0 past 2^30 (the wrapper shifts it by a multiple of cap, keeping pos0 % cap and the
    window arithmetic); 2^30 - 3 crosses the threshold mid-stream."""
    run_attention_stream(gpu, S, n_heads=4, n_kv_heads=2, head_dim=32, window=9, chunks=[2, 5, 1, 8, 3],
                         start=start, seed=start % 997)


@pytest.mark.slow  # 65600 workgroups: ~2 min on lavapipe, so pass 1 only
def test_attention_2d_groups(gpu, S):
    """More than 65535 workgroups (row blocks x heads x dim slices): (block, head) comes from both
    workgroup dimensions."""
    rows, n_heads, head_dim = 3, 65600, 2
    assert groups_2d(-(-rows // ops.ATTENTION_ROWS) * n_heads * -(-head_dim // ops.ATTENTION_DIMS))[1] > 1
    run_attention_stream(gpu, S, n_heads=n_heads, n_kv_heads=1, head_dim=head_dim, window=2, chunks=[rows],
                         start=1, seed=4)


@st.composite
def attention_cases(draw):
    n_kv = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    head_dim = draw(st.one_of(st.sampled_from([16, 32, 64, 128, 256]), st.integers(1, 128).map(lambda h: 2 * h)))
    window = draw(st.one_of(st.integers(1, 40), st.sampled_from([127, 128, 129, 200])))
    chunks = draw(st.lists(st.integers(1, 70), min_size=1, max_size=3))
    start = draw(st.one_of(st.integers(0, 300), st.sampled_from([2**30 - 2, 2**31 + 1, 2**33 + 3])))
    return dict(n_heads=n_kv * groups, n_kv_heads=n_kv, head_dim=head_dim, window=window, chunks=chunks,
                start=start, cap=window + max(chunks) - 1 + draw(st.integers(0, 5)),
                ldq_extra=draw(st.integers(0, 5)), q_off=draw(st.integers(0, 9)), ldo_extra=draw(st.integers(0, 5)),
                o_off=draw(st.integers(0, 9)), kv_extra=draw(st.integers(0, 5)), seed=draw(st.integers(0, 2**31)))


@settings(max_examples=25, **HSET)
@given(case=attention_cases())
def test_attention_property(gpu, S, case):
    run_attention_stream(gpu, S, **case)


# ------------------------------------------------------------------------------------------ rope_qkv + attention
F16_MAX = 65504.0


def read_kv(S, buf, cap, width, kv_f16):
    """The ring as float64 ``[cap, width]`` (f32 bits, or f16 pairs with kv_f16)."""
    if kv_f16:
        return S.get(buf, cap * width // 2, np.uint32).view(np.float16).astype(np.float64).reshape(cap, width)
    return S.get(buf, cap * width).astype(np.float64).reshape(cap, width)


def run_rope_qkv_attention(gpu, S, *, n_heads, n_kv_heads, head_dim, window, chunks, start=0, cap=None,
                           kv_f16=False, decode=True, ld_extra=0, off=0, o_off=0, theta=1e6, scale=1.0, q_scale=1.0,
                           seed=0, table_row=0):
    """The graph's attention block on a fused qkv row block: ``rope_qkv`` rotates q in place and appends
    rotated k and v to the ring (f32 or f16), then ``attention`` reads it; single rows with ``decode``
    (and an aligned row) take ``decode_attention`` instead, which does both in one split-K pass and
    leaves the row as it was, reading its rotation from row ``table_row`` of the table (earlier rows
    hold noise). Checks q, every written ring slot and every chunk's output against NumPy."""
    rng = np.random.default_rng(seed)
    nq, width = n_heads * head_dim, n_kv_heads * head_dim
    cols = nq + 2 * width
    ld = cols + ld_extra
    if cap is None:
        cap = window + max(chunks) - 1
    scratch = ops.decode_attention_scratch(gpu, n_heads, head_dim, window) if decode else None
    keys, values = {}, {}
    store_tol = (lambda w: 1e-3 * np.abs(w) + 1e-7) if kv_f16 else (lambda w: 2e-6 * (1 + np.abs(w)))
    try:
        def step(p0, rows, attend):
            positions = np.arange(p0, p0 + rows)
            length = off + (rows - 1) * ld + cols + 3
            full = (scale * rng.standard_normal(length)).astype(np.float32)
            for r in range(rows):
                full[off + r * ld:off + r * ld + nq] *= np.float32(q_scale)
            X = strided_rows(full, rows, cols, ld, off)
            fused = decode and attend and rows == 1 and off % 4 == 0
            noise = rng.standard_normal((table_row if fused else 0, head_dim)).astype(np.float32)
            S.put(S.b, np.concatenate([noise.ravel(), ops.rope_table(positions, head_dim, theta).ravel()]))
            S.put(S.x, full)
            qkv = Mat(S.x, rows, cols, ld, off)
            what = (f"{'decode_attention' if fused else 'rope_qkv'} heads={n_heads}/{n_kv_heads} d={head_dim} "
                    f"f16={kv_f16} pos0={p0} rows={rows}")
            q_rot = ref.rope(X[:, :nq], positions, n_heads, head_dim, theta)
            o_len = o_off + rows * nq + 2
            ofull = rng.standard_normal(o_len).astype(np.float32)
            S.put(S.y, ofull)
            out_mat = Mat(S.y, rows, nq, nq, o_off)
            if fused:
                ops.decode_attention(gpu, S.b, qkv, S.w0, S.w1, out_mat, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                     head_dim=head_dim, pos0=p0, window=window, cap=cap, scratch=scratch,
                                     kv_f16=kv_f16, table_row=table_row)
                got = S.get(S.x, length)
                assert np.array_equal(got.view(np.uint32), full.view(np.uint32)), what + " changed the qkv row"
                Q = q_rot  # the kernel rotates q as it reads it
            else:
                ops.rope_qkv(gpu, S.b, qkv, S.w0, S.w1, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                             pos0=p0, cap=cap, kv_f16=kv_f16)
                got = S.get(S.x, length)
                q_tol = (2e-6 + 1e-15 * int(positions[-1])) * (1 + np.abs(q_rot) + np.abs(X[:, :nq]).max())
                assert_close(strided_rows(got, rows, nq, ld, off), q_rot, q_tol, what + " q")
                Q = strided_rows(got, rows, nq, ld, off)  # the rotated q the kernel read
            k_want = ref.rope(X[:, nq:nq + width], positions, n_kv_heads, head_dim, theta)
            v_want = X[:, nq + width:].astype(np.float64)
            if kv_f16:  # stores clamp to the finite f16 range
                k_want, v_want = np.clip(k_want, -F16_MAX, F16_MAX), np.clip(v_want, -F16_MAX, F16_MAX)
            kc, vc = read_kv(S, S.w0, cap, width, kv_f16), read_kv(S, S.w1, cap, width, kv_f16)
            slots = positions % cap
            k_tol = store_tol(k_want) + (1e-15 * int(positions[-1])) * (1 + np.abs(k_want))
            assert_close(kc[slots], k_want, k_tol, what + " k ring")
            assert_close(vc[slots], v_want, store_tol(v_want), what + " v ring")
            if kv_f16:
                assert np.array_equal(vc[slots], v_want.astype(np.float16).astype(np.float64)), what + " v rounding"
            for r, p in enumerate(positions):
                keys[int(p)], values[int(p)] = kc[slots[r]], vc[slots[r]]
            if not attend:
                return
            if not fused:
                ops.attention(gpu, qkv.cols_(0, nq), S.w0, S.w1, out_mat, n_heads=n_heads, n_kv_heads=n_kv_heads,
                              head_dim=head_dim, pos0=p0, window=window, cap=cap, kv_f16=kv_f16)
            out = S.get(S.y, o_len)
            want = ref.attention(Q, keys, values, range(p0, p0 + rows), n_heads, n_kv_heads, head_dim, window)
            assert_close(strided_rows(out, rows, nq, nq, o_off), want, 2e-5 * (1 + np.abs(want)), what + " attention")
            assert_untouched(out, ofull, strided_mask(o_len, rows, nq, nq, o_off), what)

        first = max(0, start - window + 1)
        for p in range(first, start, cap):
            step(p, min(cap, start - p), attend=False)
        pos = start
        for rows in chunks:
            step(pos, rows, attend=True)
            pos += rows
    finally:
        if scratch is not None:
            gpu.release(scratch)


@pytest.mark.parametrize("kv_f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("groups,head_dim", [(1, 16), (2, 64), (4, 128), (8, 32), (3, 256), (2, 12)])
def test_rope_qkv_attention_ring(gpu, S, kv_f16, groups, head_dim):
    """Prefill chunks and single decode rows (split-K kernel) over a small wrapping ring, strided qkv."""
    run_rope_qkv_attention(gpu, S, n_heads=2 * groups, n_kv_heads=2, head_dim=head_dim, window=6,
                           chunks=[5, 1, 7, 1, 1, 3, 1], kv_f16=kv_f16, ld_extra=3, off=4, o_off=2,
                           seed=groups * head_dim + kv_f16)


@pytest.mark.parametrize("kv_f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("start,window", [(0, 300), (600, 700), (2**31 + 3, 513), (10**12 + 1, 257)])
def test_decode_attention_long_context(gpu, S, kv_f16, start, window):
    """Single-row steps over several 256-key chunks (split-K merge), incl. huge positions."""
    run_rope_qkv_attention(gpu, S, n_heads=8, n_kv_heads=2, head_dim=64, window=window, chunks=[1, 1, 40, 1],
                           start=start, kv_f16=kv_f16, seed=start % 1009 + window)


@pytest.mark.parametrize("split,head_dim,want", [(4, 64, 4), (4, 12, 2), (4, 256, 4), (2, 64, 2), (8, 64, 8),
                                                 (8, 128, 8)])
def test_decode_attention_value_splits(gpu, S, monkeypatch, split, head_dim, want):
    """attention_decode.wgsl with its value dims shared by several workgroups per (chunk, kv head):
    the default (4; halved where a share would be an odd number of dims) and others, over two
    256-key chunks and a single one."""
    monkeypatch.setattr(ops, "DECODE_VALUE_SPLIT", split)
    assert ops.decode_value_split(head_dim, 2, 2) == want
    run_rope_qkv_attention(gpu, S, n_heads=8, n_kv_heads=2, head_dim=head_dim, window=300, chunks=[1, 1, 40, 1],
                           start=250, kv_f16=split == 2 or head_dim == 256, seed=split + head_dim)


@pytest.mark.parametrize("table_row", [1, 63])
def test_decode_attention_table_row(gpu, S, table_row):
    """Decode steps read their rotation from a row of the host's ring of tables (model.STEP_TABLE_RING)."""
    run_rope_qkv_attention(gpu, S, n_heads=4, n_kv_heads=2, head_dim=32, window=300, chunks=[5, 1, 1, 1],
                           start=260, seed=table_row, table_row=table_row)


def test_rope_qkv_f16_clamps_to_finite(gpu, S):
    """Values past the f16 range are stored as +-65504, never inf (WGSL packing of them is indeterminate)."""
    run_rope_qkv_attention(gpu, S, n_heads=2, n_kv_heads=1, head_dim=16, window=4, chunks=[3, 1], kv_f16=True,
                           scale=3e5, decode=False, seed=7)
    kc = read_kv(S, S.w0, 6, 16, True)
    assert np.isfinite(kc[:4]).all() and (np.abs(kc[:4]) == F16_MAX).any()


def test_decode_attention_f16_clamps_to_finite(gpu, S):
    """decode_attention stores (and attends to) the step's k and v clamped to +-65504 like rope_qkv."""
    run_rope_qkv_attention(gpu, S, n_heads=2, n_kv_heads=1, head_dim=16, window=8, chunks=[3, 1, 1], kv_f16=True,
                           scale=3e5, q_scale=1e-9, seed=8)
    kc, vc = read_kv(S, S.w0, 10, 16, True), read_kv(S, S.w1, 10, 16, True)
    assert np.isfinite(kc[3:5]).all() and (np.abs(kc[3:5]) == F16_MAX).any() and (np.abs(vc[3:5]) == F16_MAX).any()


# ------------------------------------------------------------------------------------------ swiglu
def check_swiglu(gpu, n, seed, abuf, bbuf):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * 4).astype(np.float32)
    special = np.array([0.0, -0.0, -100.0, -88.0, -20.0, 20.0, 88.0, 100.0], np.float32)
    a[: min(n, special.size)] = special[: min(n, special.size)]
    b = rng.standard_normal(n).astype(np.float32)
    guard = rng.standard_normal(5).astype(np.float32)
    gpu.write(abuf, np.concatenate([a, guard]))
    gpu.write(bbuf, b)
    ops.swiglu(gpu, Mat.of(abuf, 1, n), Mat.of(bbuf, 1, n))
    got = gpu.read(abuf, np.float32, n + 5)
    want = ref.swiglu(a, b)
    assert_close(got[:n], want, 2e-5 * np.abs(want) + 1e-6, f"swiglu n={n}")
    assert np.array_equal(got[n:].view(np.uint32), guard.view(np.uint32)), "swiglu wrote past n"


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 4097, 100003])
def test_swiglu(gpu, S, n):
    check_swiglu(gpu, n, n, S.x, S.a)


def test_swiglu_2d_groups(gpu):
    """n > 65535 * 256 elements: the flat index spans both workgroup dimensions."""
    n = MAX_GROUPS_PER_DIM * 256 + 300
    a, b = gpu.empty(4 * (n + 5), "swiglu.a"), gpu.empty(4 * n, "swiglu.b")
    try:
        check_swiglu(gpu, n, 9, a, b)
    finally:
        gpu.forget(a, b)
        a.destroy()
        b.destroy()


# ------------------------------------------------------------------------------------------ embed
def check_embed(gpu, S, *, rows, dim, vocab, dtype, splits, tok_off, apos0, acap, seed):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab + 3, size=rows).astype(np.uint32)  # a few ids outside the table
    toks[: min(rows, 2)] = [0, vocab - 1][: min(rows, 2)]
    tok_buf = rng.integers(0, 2**32, size=tok_off + rows + 4, dtype=np.uint64).astype(np.uint32)
    tok_buf[tok_off: tok_off + rows] = toks
    audio = rng.standard_normal((acap, dim)).astype(np.float32)
    table32 = rng.standard_normal((vocab, dim)).astype(np.float32)
    w, T64 = upload_weight(S, table32, dtype, splits)
    out0 = rng.standard_normal(rows * dim + 5).astype(np.float32)
    S.put(S.t, tok_buf)
    S.put(S.a, audio)
    S.put(S.y, out0)
    ops.embed(gpu, S.t, tok_off, S.a, apos0, acap, w, Mat.of(S.y, rows, dim))
    got = S.get(S.y, rows * dim + 5)
    # exact: audio + E in f32, or audio alone for ids outside the table
    want = np.stack([audio[(apos0 + r) % acap] + (T64[t].astype(np.float32) if t < vocab else np.float32(0))
                     for r, t in enumerate(toks)])
    assert np.allclose(want, ref.embed(toks, audio, apos0, T64), rtol=1e-6, atol=1e-6)
    what = f"embed rows={rows} dim={dim} {dtype} splits={splits} apos0={apos0} acap={acap}"
    assert np.array_equal(got[: rows * dim].reshape(rows, dim).view(np.uint32), want.view(np.uint32)), what
    assert np.array_equal(got[rows * dim:].view(np.uint32), out0[rows * dim:].view(np.uint32)), what


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("splits", [[50], [17, 33], [1, 30, 19]])
def test_embed(gpu, S, dtype, splits):
    for rows, dim, tok_off, apos0, acap in [(1, 7, 0, 0, 3), (10, 7, 5, 37, 12), (70, 300, 3, 10**9 + 7, 75),
                                            (33, 65, 11, 5, 6)]:
        check_embed(gpu, S, rows=rows, dim=dim, vocab=50, dtype=dtype, splits=splits, tok_off=tok_off, apos0=apos0,
                    acap=acap, seed=rows + dim + len(splits))


def test_embed_later_chunk_leaves_other_rows(gpu, S):
    """A non-first chunk (first_chunk = 0) adds E rows only where the token is inside the chunk and
    leaves every other row bit-for-bit (here: NaN-free random 'previous' values)."""
    rng = np.random.default_rng(11)
    rows, dim, row0, n_rows = 9, 13, 20, 10
    toks = np.array([0, 20, 29, 30, 19, 25, 100, 21, 2**31], np.uint32)
    table = rng.standard_normal((n_rows, dim)).astype(np.float32)
    prev = rng.standard_normal(rows * dim).astype(np.float32)
    S.put(S.t, toks)
    S.put(S.a, rng.standard_normal(dim).astype(np.float32))
    S.put(S.w0, table)
    S.put(S.y, prev)
    k = gpu.kernel("embed", "embed", W_BF16=False)
    gpu.dispatch(k, pack_params(rows, dim, 0, 0, 1, row0, n_rows, 0), [S.t, S.a, S.w0, S.y],
                 groups_2d(-(-rows * dim // 256)))
    got = S.get(S.y, rows * dim).reshape(rows, dim)
    want = prev.reshape(rows, dim).copy()
    for r, t in enumerate(toks):
        if row0 <= t < row0 + n_rows:
            want[r] = want[r] + table[t - row0]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@settings(max_examples=15, **HSET)
@given(rows=st.integers(1, 70), dim=st.integers(1, 300), vocab=st.integers(3, 90), dtype=st.sampled_from(["bf16", "f32"]),
       n_chunks=st.integers(1, 3), tok_off=st.integers(0, 20), apos0=st.integers(0, 10**10), acap=st.integers(1, 80),
       seed=st.integers(0, 2**31))
def test_embed_property(gpu, S, rows, dim, vocab, dtype, n_chunks, tok_off, apos0, acap, seed):
    n_chunks = min(n_chunks, vocab)
    cuts = sorted(np.random.default_rng(seed).choice(np.arange(1, vocab), n_chunks - 1, replace=False).tolist())
    bounds = [0] + cuts + [vocab]
    check_embed(gpu, S, rows=rows, dim=dim, vocab=vocab, dtype=dtype,
                splits=[bounds[i + 1] - bounds[i] for i in range(n_chunks)], tok_off=tok_off, apos0=apos0,
                acap=acap, seed=seed)


# ------------------------------------------------------------------------------------------ argmax
_ARGMAX: dict = {}


def run_argmax(gpu, S, logits: np.ndarray, out_index: int, log_len: int = 64) -> np.ndarray:
    n = logits.size
    if n not in _ARGMAX:
        _ARGMAX[n] = ops.Argmax(gpu, n)
    log0 = np.arange(1000, 1000 + log_len, dtype=np.uint32)
    S.put(S.x, logits.astype(np.float32))
    S.put(S.t, log0)
    _ARGMAX[n](gpu, S.x, S.t, out_index)
    got = S.get(S.t, log_len, np.uint32)
    others = np.arange(log_len) != out_index
    assert np.array_equal(got[others], log0[others]), "argmax wrote outside tokens[out_index]"
    return got


@pytest.mark.parametrize("n", [1, 2, 255, 1023, 1024, 1025, 4097, 131072, 300000])
def test_argmax_random(gpu, S, n):
    rng = np.random.default_rng(n)
    for trial in range(5):
        x = (rng.standard_normal(n) * 10).astype(np.float32)
        if trial == 3:
            x[-1] = 100.0  # the maximum in the last block (the last partial of `finish`'s stride)
        if trial == 4:
            x[n // 2] = x[-1] = 100.0  # a tie between a middle and the last block
        got = run_argmax(gpu, S, x, out_index=trial * 7 % 64)
        assert got[trial * 7 % 64] == ref.argmax(x), (n, trial)


def test_argmax_ties_and_extremes(gpu, S):
    """Ties pick the first index (torch.argmax), inside one 1024-block and across blocks; -inf,
    +inf and FLT_MAX values; a constant vector."""
    fmax = np.finfo(np.float32).max
    n = 5000
    cases = []
    x = np.zeros(n, np.float32); x[[3000, 1500, 4999]] = 7.0; cases.append(x)  # ties across blocks
    x = np.zeros(n, np.float32); x[[700, 300, 900]] = 7.0; cases.append(x)  # ties inside a block
    x = np.full(n, -np.inf, np.float32); x[4321] = -1e30; cases.append(x)
    x = np.full(n, -np.inf, np.float32); x[17] = np.inf; x[18] = np.inf; cases.append(x)
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32); x[2222] = fmax; x[3333] = fmax; cases.append(x)
    cases.append(np.full(n, 3.0, np.float32))
    for i, x in enumerate(cases):
        got = run_argmax(gpu, S, x, out_index=i)
        assert got[i] == ref.argmax(x), f"case {i}: got {got[i]} want {ref.argmax(x)}"


def test_argmax_nothing_above_initial_best(gpu, S):
    """Logits that never beat the shader's starting value (-3.4e38): all -inf, all -FLT_MAX, and a
    whole 1024-block of -inf before the maximum. torch.argmax gives the first index of the max;
    the shader used to write its 'no candidate' sentinel 0xffffffff instead (fixed in argmax.wgsl)."""
    fmax = np.finfo(np.float32).max
    cases = [np.full(5000, -fmax, np.float32), np.full(5000, -np.inf, np.float32), np.full(1, -np.inf, np.float32),
             np.full(3, -np.inf, np.float32)]
    x = np.full(2048, -np.inf, np.float32); x[1030] = -fmax; cases.append(x)
    x = np.full(2048, -np.inf, np.float32); x[5] = -3.3e38; x[1500] = -fmax; cases.append(x)
    for i, x in enumerate(cases):
        got = run_argmax(gpu, S, x, out_index=i)
        assert got[i] == ref.argmax(x), f"case {i}: got {got[i]} want {ref.argmax(x)}"


def test_argmax_feeds_embed_on_gpu(gpu, S):
    """Decode-step chaining without a host round trip: argmax writes tokens[5] and the embed
    dispatched right after it (same submission) reads that id."""
    rng = np.random.default_rng(5)
    vocab, dim = 300, 16
    table = rng.standard_normal((vocab, dim)).astype(np.float32)
    w, _ = upload_weight(S, table, "f32", [100, 200])
    audio = rng.standard_normal((4, dim)).astype(np.float32)
    logits = rng.standard_normal(vocab).astype(np.float32)
    am = ops.Argmax(gpu, vocab)
    S.put(S.x, logits)
    S.put(S.a, audio)
    S.put(S.t, np.zeros(8, np.uint32))
    am(gpu, S.x, S.t, 5)
    ops.embed(gpu, S.t, 5, S.a, 6, 4, w, Mat.of(S.y, 1, dim))
    got = S.get(S.y, dim)
    tok = int(np.argmax(logits))
    assert np.array_equal(got, audio[6 % 4] + table[tok])


# ------------------------------------------------------------------------------------------ shader sources
def _shader_files():
    """The shader modules (files named _*.wgsl are included by them, not modules)."""
    return sorted(p for p in shader_dir().glob("*.wgsl") if not p.name.startswith("_"))


def _included_files():
    return sorted(shader_dir().glob("_*.wgsl"))


def _resolve(expr: str, consts: dict) -> int:
    expr = expr.strip()
    if expr in consts:
        return consts[expr]
    return int(re.fullmatch(r"(\d+)[ui]?", expr).group(1))


def _type_bytes(ty: str, consts: dict) -> int:
    """Size of a WGSL workgroup variable type: scalars, vecN, atomic and (nested) fixed arrays."""
    ty = ty.strip()
    scalars = {"f32": 4, "u32": 4, "i32": 4, "f16": 2}
    if ty in scalars:
        return scalars[ty]
    m = re.fullmatch(r"vec([234])<\s*(\w+)\s*>", ty) or re.fullmatch(r"vec([234])([fuih])", ty)
    if m:
        n = int(m.group(1))
        elem = {"f": "f32", "u": "u32", "i": "i32", "h": "f16"}.get(m.group(2), m.group(2))
        return (4 if n == 3 else n) * scalars[elem]
    m = re.fullmatch(r"atomic<\s*(\w+)\s*>", ty)
    if m:
        return 4
    m = re.fullmatch(r"array<\s*(.+)\s*,\s*(\w+)\s*>", ty)
    if m:
        return _type_bytes(m.group(1), consts) * _resolve(m.group(2), consts)
    raise AssertionError(f"unparsed workgroup type {ty!r}")


@pytest.mark.parametrize("path", _shader_files(), ids=lambda p: p.name)
def test_shader_source_rules(path: Path):
    """WebGPU core only: <= 256 invocations per workgroup (override/const names resolved), <= 16 KiB
    of workgroup memory (upper bound: every module-scope workgroup var summed), <= 8 storage buffers,
    no `enable` directive unless in a *_f16 variant file, and a header comment at the top. Checked
    on the module as compiled, its included files spliced in."""
    assert path.read_text().startswith("//"), f"{path.name} must start with a header comment"
    src = read_shader(path)
    assert re.search(r"^//.*Bindings", src, re.M), f"{path.name}: header comment lists no Bindings"
    enables = re.findall(r"^\s*enable\s+(\w+)\s*;", src, re.M)
    if path.stem.endswith("_f16"):
        assert set(enables) <= {"f16"}, enables
    else:
        assert not enables, f"{path.name} enables {enables}: not WebGPU core"
    consts = {}
    for name, value in re.findall(r"(?:const|override)\s+(\w+)\s*(?::\s*\w+)?\s*=\s*(\d+)[ui]?\s*;", src):
        consts[name] = int(value)
    sizes = re.findall(r"@workgroup_size\(([^)]*)\)", src)
    assert sizes, f"{path.name} declares no entry point"
    for s in sizes:
        dims = [_resolve(d, consts) for d in s.split(",") if d.strip()]
        assert 1 <= len(dims) <= 3 and math.prod(dims) <= MAX_INVOCATIONS, (path.name, s, dims)
    wg_vars = re.findall(r"var<workgroup>\s*\w+\s*:\s*([^;]+);", src)
    assert len(wg_vars) == len(re.findall(r"var<workgroup>", src))
    bytes_wg = sum(_type_bytes(t, consts) for t in wg_vars)
    assert bytes_wg <= 16384, (path.name, bytes_wg)
    n_storage = len(re.findall(r"var<\s*storage", src))
    assert n_storage <= 8, (path.name, n_storage)


@pytest.mark.parametrize("path", _included_files(), ids=lambda p: p.name)
def test_included_shader_files(path: Path):
    """An included file: a header comment that says what it needs from the includer, functions only
    (no entry point, binding, workgroup variable, override or enable), included by some module."""
    src = path.read_text()
    assert src.startswith("//") and re.search(r"^//.*Bindings", src, re.M), path.name
    code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith("//"))
    for what in ("@compute", "@group", "@binding", "var<workgroup>", "override", "enable", "#include"):
        assert what not in code, (path.name, what)
    assert re.search(r"^fn \w+", code, re.M), path.name
    users = [m.name for m in _shader_files() if path.name in INCLUDE_RE.findall(m.read_text())]
    assert users, f"{path.name} is included by no shader"


def test_shader_include_errors(tmp_path):
    """A missing included file, or an included file that includes another, is a clear error."""
    (tmp_path / "a.wgsl").write_text('// a\n// #include "_b.wgsl"\nfn a() {}\n')
    with pytest.raises(FileNotFoundError, match="a.wgsl: included file .*_b.wgsl"):
        read_shader(tmp_path / "a.wgsl")
    (tmp_path / "_b.wgsl").write_text('// b\n// #include "_c.wgsl"\n')
    with pytest.raises(GpuError, match="_b.wgsl: an included file includes nothing"):
        read_shader(tmp_path / "a.wgsl")
    (tmp_path / "_b.wgsl").write_text("fn b() {}\n")
    assert read_shader(tmp_path / "a.wgsl") == "// a\nfn b() {}\n\nfn a() {}\n"


def test_every_entry_point_compiles(gpu):
    """Each @compute entry point builds a pipeline (both W_BF16 variants where declared)."""
    for path in _shader_files():
        src = path.read_text()
        entries = re.findall(r"@compute\s+@workgroup_size\([^)]*\)\s*fn\s+(\w+)", src)
        assert entries, path.name
        flags = re.findall(r"override\s+(\w+)\s*:\s*bool", src)
        variants = [dict(zip(flags, bits)) for bits in itertools.product([True, False], repeat=len(flags))]
        for e in entries:
            for v in variants:
                k = gpu.kernel(path.stem, e, **v)
                assert k.params_size % 16 == 0 and k.n_storage >= 1

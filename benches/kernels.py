"""Per-kernel timings at the real decoder shapes: ``python benches/kernels.py [--rows 4 8 16] [--quant q4_0]``.

Each op is recorded ``--reps`` times into one submission and timed between two syncs, so a figure
includes the barrier between dependent dispatches (what the decode loop pays). Bandwidth counts
the weight bytes each call must read once: BF16 words, or for Q4_0/Q8_0 (the same decoder matrices
in ops_quant's repacked blocks, made on the GPU like the bench's synthetic GGUF weights) the quant
bytes plus the f16 block scales (18 / 34 bytes per 32 weights).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from voxtral_wgpu import ops, ops_quant
from voxtral_wgpu.bench import synthetic_quant
from voxtral_wgpu.gpu import Gpu
from voxtral_wgpu.ops import Mat
from voxtral_wgpu.weights import Uploader


def timed(gpu, fn, reps):
    fn()
    gpu.sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    gpu.sync()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[8])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--quant", nargs="*", default=list(ops_quant.QTYPES), choices=ops_quant.QTYPES,
                    help="quantised weight types to time on the decoder matrices (none: BF16 only)")
    a = ap.parse_args()
    gpu = Gpu()
    print("adapter:", gpu.description)
    up = Uploader(gpu)
    rng = np.random.default_rng(0)

    def weight(n, k):
        return up.dense(rng.integers(0, 1 << 16, size=(n, k), dtype=np.uint16) & 0xBFFF, "BF16", f"w{n}x{k}")

    D, H, Q, KV, V = 3072, 9216, 4096, 1024, 131072
    wq, wk, wv, wo = weight(Q, D), weight(KV, D), weight(KV, D), weight(D, Q)
    w1, w3, w2 = weight(H, D), weight(H, D), weight(D, H)
    emb = weight(V, D)
    x = Mat.of(gpu.upload(rng.standard_normal(H).astype(np.float32)), 1, D)
    xh = Mat.of(x.buf, 1, H)
    xq = Mat.of(x.buf, 1, Q)
    g = gpu.upload(np.ones(H, np.float32))
    y = Mat.of(gpu.empty(4 * V), 1, V)
    qkv = Mat.of(gpu.empty(4 * (Q + 2 * KV)), 1, Q + 2 * KV)
    f1, f3, scratch = Mat.of(gpu.empty(4 * H), 1, H), Mat.of(gpu.empty(4 * H), 1, H), Mat.of(gpu.empty(4 * D), 1, D)
    res = []
    for rows in a.rows:
        ops.MATVEC_ROWS = rows
        cases = [
            ("qkv (norm) 6144x3072", (Q + 2 * KV) * D * 2,
             lambda: ops.qkv_proj(gpu, x, wq, wk, wv, qkv, norm=g, eps=1e-5, scratch=scratch)),
            ("wo 3072x4096 (+res)", D * Q * 2, lambda: ops.linear(gpu, xq, wo, y.cols_(0, D), accumulate=True)),
            ("w1|w3 swiglu (norm) 2x9216x3072", 2 * H * D * 2,
             lambda: ops.swiglu_ffn_in(gpu, x, w1, w3, f1, norm=g, eps=1e-5, scratch=scratch, tmp=f3)),
            ("w2 3072x9216 (+res)", D * H * 2, lambda: ops.linear(gpu, xh, w2, y.cols_(0, D), accumulate=True)),
            ("lm head 131072x3072 (norm)", V * D * 2,
             lambda: ops.linear(gpu, x, emb, y, norm=g, eps=1e-5, scratch=scratch)),
        ]
        for name, nbytes, fn in cases:
            dt = timed(gpu, fn, a.reps)
            res.append((rows, name, dt * 1e6, nbytes / dt / 1e9))
    # the same decode calls on quantised weights (ops.* hands them to ops_quant's matvec kernels, as
    # in the graph); one input row, so --rows (the BF16 matvec's output rows per workgroup) is moot
    for qt in a.quant:
        def qweight(n, k, qt=qt):
            return synthetic_quant(gpu, n, k, qt, f"{qt}.w{n}x{k}", std=k ** -0.5)

        def qbytes(*ws, qt=qt):  # quants + f16 scales each call reads
            return sum(w.n * w.k // ops_quant.QK * (ops_quant.QUANT_BYTES[qt] + 2) for w in ws)

        qq, qk, qv, qo = qweight(Q, D), qweight(KV, D), qweight(KV, D), qweight(D, Q)
        q1, q3, q2 = qweight(H, D), qweight(H, D), qweight(D, H)
        qemb = qweight(V, D)
        gpu.sync()
        assert ops_quant.matvec_ok(x, qq), "the decode kernels should take these calls"
        cases = [
            (f"{qt} qkv (norm) 6144x3072", qbytes(qq, qk, qv),
             lambda: ops.qkv_proj(gpu, x, qq, qk, qv, qkv, norm=g, eps=1e-5, scratch=scratch)),
            (f"{qt} wo 3072x4096 (+res)", qbytes(qo), lambda: ops.linear(gpu, xq, qo, y.cols_(0, D), accumulate=True)),
            (f"{qt} w1|w3 swiglu (norm) 2x9216x3072", qbytes(q1, q3),
             lambda: ops.swiglu_ffn_in(gpu, x, q1, q3, f1, norm=g, eps=1e-5, scratch=scratch, tmp=f3)),
            (f"{qt} w2 3072x9216 (+res)", qbytes(q2), lambda: ops.linear(gpu, xh, q2, y.cols_(0, D), accumulate=True)),
            (f"{qt} lm head 131072x3072 (norm)", qbytes(qemb),
             lambda: ops.linear(gpu, x, qemb, y, norm=g, eps=1e-5, scratch=scratch)),
        ]
        for name, nbytes, fn in cases:
            dt = timed(gpu, fn, a.reps)
            res.append(("-", name, dt * 1e6, nbytes / dt / 1e9))
        gpu.release(*[b for w in (qq, qk, qv, qo, q1, q3, q2, qemb) for b, _, _ in w.chunks])
    # attention at several context lengths (one decode row, 32 heads, GQA 8)
    kc, vc = gpu.empty(4 * 8192 * KV), gpu.empty(4 * 8192 * KV)
    part = ops.decode_attention_scratch(gpu, 32, 128, 8192)
    att = Mat.of(gpu.empty(4 * Q), 1, Q)
    table = gpu.upload(ops.rope_table(np.arange(1), 128, 1e6))
    for ctx in (64, 1024, 8192):
        fn = lambda ctx=ctx: ops.decode_attention(gpu, table, qkv, kc, vc, att, n_heads=32, n_kv_heads=8,
                                                 head_dim=128, pos0=ctx - 1, window=8192, cap=8192, scratch=part)
        dt = timed(gpu, fn, a.reps)
        res.append(("-", f"attention ctx {ctx}", dt * 1e6, 2 * ctx * KV * 4 / dt / 1e9))
    # encoder-shaped matmuls: GFLOP/s in the last column
    e1, e2 = weight(5120, 1280), weight(1280, 5120)
    xe = Mat.of(gpu.empty(4 * 1024 * 5120), 1024, 5120)
    ye = Mat.of(gpu.empty(4 * 1024 * 5120), 1024, 5120)
    for m in (128, 512, 1024):
        for name, w_, xin, yout in (("enc w1 5120x1280", e1, xe.take(0, m).cols_(0, 1280), ye.take(0, m)),
                                    ("enc w2 1280x5120", e2, Mat(xe.buf, m, 5120, 5120), Mat(ye.buf, m, 1280, 1280))):
            xin = Mat(xin.buf, m, w_.k, w_.k)
            dt = timed(gpu, lambda: ops.linear(gpu, xin, w_, yout, batch_invariant=True), max(a.reps // 4, 5))
            res.append((m, name, dt * 1e6, 2 * m * w_.n * w_.k / dt / 1e9))
    # encoder attention: S rows, 32 heads x 64, window 750
    ekc, evc = gpu.empty(4 * 2048 * 2048), gpu.empty(4 * 2048 * 2048)
    for S in (128, 512):
        q_ = Mat.of(gpu.empty(4 * S * 2048), S, 2048)
        o_ = Mat.of(gpu.empty(4 * S * 2048), S, 2048)
        fn = lambda q_=q_, o_=o_, S=S: ops.attention(gpu, q_, ekc, evc, o_, n_heads=32, n_kv_heads=32, head_dim=64,
                                                   pos0=1000, window=750, cap=2047)
        dt = timed(gpu, fn, max(a.reps // 4, 5))
        res.append((S, "enc attention window 750", dt * 1e6, 4 * S * 32 * 750 * 64 / dt / 1e9))
    print(f"{'rows':>4}  {'kernel':<38} {'us':>9} {'GB/s|GF/s':>8}")
    for rows, name, us, gbs in res:
        print(f"{rows!s:>4}  {name:<38} {us:9.1f} {gbs:8.0f}")


if __name__ == "__main__":
    main()

// linear_quant_v1.wgsl — the previous Q4_0 / Q8_0 decode matvec kernels (entry points matvec,
// matvec_qkv, matvec_swiglu), kept verbatim beside linear_quant.wgsl's rewrite only so the two can be
// A/B-timed on a GPU (ops_quant.MATVEC_IMPL = "v1", benches/quant_matvec.py --impl v1). The browser
// build never loads it. Delete it (and MATVEC_IMPL) once the rewrite is measured.
//
// What follows is linear_quant.wgsl as of commit 6650daf without its matmul entry point.
//
// linear_quant.wgsl — linear layers with GGML Q4_0 / Q8_0 weights, dequantised on the fly.
//
//   matmul, matvec:           y[m, n] = act( sum_k xn[m, k] * W[n, k] + b[b_off + n] )  (+ y[m, n] if accumulate)
//   matvec_swiglu:            y[m, n] = silu( sum_k xn[m, k] * W[n, k] ) * ( sum_k xn[m, k] * Wb[n, k] )
//   matvec_qkv:               y[m, n] = sum_k xn[m, k] * [W; Wb; Wc][n, k]  (rows n < n1 from W,
//                             n < n1 + n2 from Wb, the rest from Wc)
//   xn = x, or with norm != 0 (matvec only) xn = x * inverseSqrt(mean_k(x^2) + eps) * g (RMSNorm folded in)
//
// The Params fields and the epilogue (act: 0 identity, 1 GELU erf form, 2 SiLU; bias; accumulate)
// are linear.wgsl's; matvec_swiglu / matvec_qkv mirror matvec.wgsl's entry points. K is a multiple
// of 32. One dispatch covers one row chunk of W: the caller passes N = rows of the chunk,
// y_off += row0, b_off = row0.
//
// Weight layout: one buffer per row chunk, repacked once at load time from GGML blocks
// (voxtral_wgpu/ops_quant.py), bound as one array<vec4<u32>>:
//   block (r, b) = weights r*K + 32b .. +31 of the chunk, NB = K/32 blocks per row, blk = r*NB + b
//   quants from the start of the buffer, QB bytes per block:
//         Q4_0 (QB = 16): byte j = element j in the low nibble, element j+16 in the high nibble,
//                         weight = (q - 8) * d       -> vec4 blk
//         Q8_0 (QB = 32): byte j = element j as int8, weight = q * d -> vec4s 2*blk, 2*blk + 1
//   f16 scales from byte offset sc_off = QB*nrows*NB rounded up to 256 (passed in vec4 units:
//   sc, sc_b, sc_c): scale of block i in half (i & 1) of u32 word i >> 1 of that region.
//   The f16 -> f32 conversion uses integer ops (exact for subnormals on every device).
//
// Bindings
//   0  params  uniform   Params
//   1  x       vec4<f32> [M rows at stride lda] from element x_off (matvec: x_off, lda multiples of 4)
//   2  w       vec4<u32> weight chunk (quants, then scales from vec4 p.sc)
//   3  bias    f32       [..] read when has_bias != 0 (bind anything otherwise)
//   4  g       vec4<f32> [K/4] RMSNorm weight (norm != 0)
//   5  y       f32       [M, ldy] from element y_off
//   6  wb      vec4<u32> second weight chunk (matvec_swiglu: [N, K] up projection; matvec_qkv: k, [n2, K])
//   7  wc      vec4<u32> third weight chunk (matvec_qkv: v)
//
// Work split
//   matvec (M <= 4, decode): 256 invocations; MV_LANES of them share a group of MV_RPT consecutive
//     output rows and stride over the K/32 blocks of those rows (consecutive 16-byte loads across
//     lanes: coalesced), each reusing a block's 32 x values for its MV_RPT rows and loading
//     MV_UNROLL blocks ahead; then a tree reduction over the lanes in workgroup memory.
//     256 / MV_LANES * MV_RPT rows per workgroup, groups split over x/y. With norm, each workgroup
//     first reduces sum(x^2) over the row itself (x is a few KiB and stays in cache).
//   matmul (M > 4: encoder, adapter, prefill): 64x64 output tile per workgroup, 256 invocations
//     each computing 4x4; K walked in slices of 16 (half a block): the W slice is dequantised into
//     workgroup memory once per slice (8 KiB total with the x slice). groups = (ceil(N/64), ceil(M/64)).

override Q8: bool = false;
override F16_HW: bool = false;  // scales through unpack2x16float (a driver may flush f16 subnormals)

struct Params {
    M: u32,
    N: u32,
    K: u32,
    lda: u32,
    x_off: u32,
    ldy: u32,
    y_off: u32,
    has_bias: u32,
    b_off: u32,
    act: u32,
    accumulate: u32,
    norm: u32,
    eps: f32,
    n1: u32,
    n2: u32,
    sc: u32,
    sc_b: u32,
    sc_c: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> wb: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> wc: array<vec4<u32>>;

// IEEE half bits -> f32, exact for normals, subnormals, zeros and infinities.
fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * 5.9604644775390625e-8));  // m * 2^-24
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

fn half_of(word: u32, blk: u32) -> f32 {
    if (F16_HW) {
        let s2 = unpack2x16float(word);
        return select(s2.x, s2.y, (blk & 1u) == 1u);
    }
    return half_to_f32(select(word & 0xffffu, word >> 16u, (blk & 1u) == 1u));
}

fn word_at(v: vec4<u32>, i: u32) -> u32 {
    return v[i & 3u];
}

// which = 0: w, 1: wb, 2: wc
fn quants(which: u32, i: u32) -> vec4<u32> {
    if (which == 1u) {
        return wb[i];
    }
    if (which == 2u) {
        return wc[i];
    }
    return w[i];
}

fn scale_of(which: u32, blk: u32) -> f32 {
    let i = blk >> 1u;  // u32 word of the scale region
    var base = p.sc;
    if (which == 1u) {
        base = p.sc_b;
    } else if (which == 2u) {
        base = p.sc_c;
    }
    return half_of(word_at(quants(which, base + (i >> 2u)), i), blk);
}

// Signed bytes of a word as a vec4 of f32 (Q8_0 quants).
fn i8x4(v: u32) -> vec4<f32> {
    let s = bitcast<vec4<i32>>(vec4<u32>(v << 24u, v << 16u, v << 8u, v)) >> vec4<u32>(24u);
    return vec4<f32>(s);
}

// Low / high nibbles of a word (elements 4w..4w+3 / 16+4w..16+4w+3 of a Q4_0 block) minus 8.
fn lo4(v: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(v, v >> 8u, v >> 16u, v >> 24u) & vec4<u32>(0xfu))) - vec4<f32>(8.0);
}
fn hi4(v: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(v >> 4u, v >> 12u, v >> 20u, v >> 28u) & vec4<u32>(0xfu))) - vec4<f32>(8.0);
}

// dot of 8 weights of a block (word j: Q4_0 both nibble halves of v0; Q8_0 v0 then v1) with the
// activations xa (elements 4j..4j+3) and xc (elements 16+4j..16+4j+3), unscaled
fn wdot(v0: u32, v1: u32, xa: vec4<f32>, xc: vec4<f32>) -> f32 {
    if (Q8) {
        return dot(i8x4(v0), xa) + dot(i8x4(v1), xc);
    }
    return dot(lo4(v0), xa) + dot(hi4(v0), xc);
}

// erf with |error| < 1.2e-7 (Numerical Recipes erfc, Chebyshev fit); WGSL has no erf built-in.
fn erf_approx(v: f32) -> f32 {
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
            t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
            t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, v >= 0.0);
}

fn epilogue(m: u32, n: u32, acc: f32) {
    var v = acc;
    if (p.has_bias != 0u) {
        v = v + bias[p.b_off + n];
    }
    if (p.act == 1u) {
        v = 0.5 * v * (1.0 + erf_approx(v * 0.70710678118654752));
    } else if (p.act == 2u) {
        v = v / (1.0 + exp(-v));
    }
    let i = p.y_off + m * p.ldy + n;
    if (p.accumulate != 0u) {
        v = v + y[i];
    }
    y[i] = v;
}

// ------------------------------------------------------------------------------------ matvec
override MV_M: u32 = 1u;       // rows of x (1..4), a constant so the accumulators stay in registers
override MV_LANES: u32 = 32u;  // invocations sharing one group of output rows (power of two, <= 256)
override MV_RPT: u32 = 2u;     // output rows per invocation (1..4), sharing each x block
override MV_UNROLL: u32 = 2u;  // blocks per row loaded before any is used (1..2): more loads in flight
var<workgroup> red: array<vec4<f32>, 256>;
var<workgroup> red_b: array<vec4<f32>, 256>;

// inverseSqrt(mean(x^2) + eps) of each of the M rows of x, reduced over the workgroup.
fn norm_prologue(tid: u32) {
    var ss = vec4<f32>(0.0);
    let k4 = p.K / 4u;
    for (var m = 0u; m < MV_M; m++) {
        let base = (p.x_off + m * p.lda) / 4u;
        var s = 0.0;
        for (var j = tid; j < k4; j += 256u) {
            let v = x4[base + j];
            s += dot(v, v);
        }
        ss[m] = s;
    }
    red[tid] = ss;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (tid < s) {
            red[tid] += red[tid + s];
        }
        workgroupBarrier();
    }
}

// activations 4i..4i+3 of x4 index xi (k index 4*gi), normalised when p.norm != 0
fn xload(xi: u32, gi: u32, inv: f32) -> vec4<f32> {
    if (p.norm != 0u) {
        return x4[xi] * inv * g[gi];
    }
    return x4[xi];
}

// sum the lanes of each row group (red, and red_b when two) in workgroup memory
fn reduce_lanes(tid: u32, lane: u32, two: bool) {
    workgroupBarrier();
    for (var s = MV_LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            red[tid] += red[tid + s];
            if (two) {
                red_b[tid] += red_b[tid + s];
            }
        }
        workgroupBarrier();
    }
}

// MODE of the entry points below: 0 = W alone, 2 = stacked q/k/v rows from W, Wb, Wc
fn matvec_body(mode: u32, group: u32, tid: u32) {
    if (p.norm != 0u) {
        norm_prologue(tid);
    }
    // red[0] holds the sums of squares; every invocation reads it before red is reused below
    let inv = inverseSqrt(red[0] / f32(p.K) + vec4<f32>(p.eps));
    workgroupBarrier();
    let lane = tid % MV_LANES;
    let r0 = group * (256u / MV_LANES) * MV_RPT + (tid / MV_LANES) * MV_RPT;
    let nb = p.K / 32u;
    var acc: array<vec4<f32>, 4>;  // [m], component r
    if (r0 < p.N) {
        let nr = min(MV_RPT, p.N - r0);
        for (var b0 = lane; b0 < nb; b0 += MV_LANES * MV_UNROLL) {
            var q0: array<vec4<u32>, 8>;  // [u * 4 + r]; Q8: first 16 bytes
            var q1: array<vec4<u32>, 8>;  // Q8: last 16 bytes
            var d: array<vec4<f32>, 2>;   // [u], component r
            for (var u = 0u; u < MV_UNROLL; u++) {
                let b = b0 + u * MV_LANES;
                for (var r = 0u; r < MV_RPT; r++) {
                    if (b < nb && r < nr) {
                        var which = 0u;
                        var row = r0 + r;
                        if (mode == 2u) {
                            if (row >= p.n1 + p.n2) {
                                which = 2u;
                                row -= p.n1 + p.n2;
                            } else if (row >= p.n1) {
                                which = 1u;
                                row -= p.n1;
                            }
                        }
                        let blk = row * nb + b;
                        if (Q8) {
                            q0[u * 4u + r] = quants(which, 2u * blk);
                            q1[u * 4u + r] = quants(which, 2u * blk + 1u);
                        } else {
                            q0[u * 4u + r] = quants(which, blk);
                        }
                        d[u][r] = scale_of(which, blk);
                    }
                }
            }
            for (var m = 0u; m < MV_M; m++) {
                for (var u = 0u; u < MV_UNROLL; u++) {
                    let b = b0 + u * MV_LANES;
                    if (b < nb) {
                        let xb = (p.x_off + m * p.lda) / 4u + b * 8u;  // x_off, lda multiples of 4 (host checks)
                        var t = vec4<f32>(0.0);
                        for (var j = 0u; j < 4u; j++) {
                            let xa = xload(xb + j, b * 8u + j, inv[m]);
                            let xc = xload(xb + 4u + j, b * 8u + 4u + j, inv[m]);
                            for (var r = 0u; r < MV_RPT; r++) {
                                t[r] += wdot(q0[u * 4u + r][j], q1[u * 4u + r][j], xa, xc);
                            }
                        }
                        acc[m] += d[u] * t;
                    }
                }
            }
        }
    }
    for (var m = 0u; m < MV_M; m++) {
        red[tid] = acc[m];
        reduce_lanes(tid, lane, false);
        if (lane == 0u) {
            for (var r = 0u; r < MV_RPT; r++) {
                let n = r0 + r;
                if (n < p.N) {
                    if (mode == 0u) {
                        epilogue(m, n, red[tid][r]);
                    } else {
                        y[p.y_off + m * p.ldy + n] = red[tid][r];
                    }
                }
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) tid: u32) {
    matvec_body(0u, wid.x + wid.y * nwg.x, tid);
}

@compute @workgroup_size(256)
fn matvec_qkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) tid: u32) {
    matvec_body(2u, wid.x + wid.y * nwg.x, tid);
}

// SwiGLU: rows of W (gate) and Wb (up) side by side, one block (MV_UNROLL ignored) at a time
@compute @workgroup_size(256)
fn matvec_swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) tid: u32) {
    if (p.norm != 0u) {
        norm_prologue(tid);
    }
    // red[0] holds the sums of squares; every invocation reads it before red is reused below
    let inv = inverseSqrt(red[0] / f32(p.K) + vec4<f32>(p.eps));
    workgroupBarrier();
    let group = wid.x + wid.y * nwg.x;
    let lane = tid % MV_LANES;
    let r0 = group * (256u / MV_LANES) * MV_RPT + (tid / MV_LANES) * MV_RPT;
    let nb = p.K / 32u;
    var acc: array<vec4<f32>, 4>;
    var acc_b: array<vec4<f32>, 4>;
    if (r0 < p.N) {
        let nr = min(MV_RPT, p.N - r0);
        for (var b = lane; b < nb; b += MV_LANES) {
            var q0: array<vec4<u32>, 4>;
            var q1: array<vec4<u32>, 4>;
            var u0: array<vec4<u32>, 4>;
            var u1: array<vec4<u32>, 4>;
            var d = vec4<f32>(0.0);
            var e = vec4<f32>(0.0);
            for (var r = 0u; r < MV_RPT; r++) {
                if (r < nr) {
                    let blk = (r0 + r) * nb + b;
                    if (Q8) {
                        q0[r] = w[2u * blk];
                        q1[r] = w[2u * blk + 1u];
                        u0[r] = wb[2u * blk];
                        u1[r] = wb[2u * blk + 1u];
                    } else {
                        q0[r] = w[blk];
                        u0[r] = wb[blk];
                    }
                    d[r] = scale_of(0u, blk);
                    e[r] = scale_of(1u, blk);
                }
            }
            for (var m = 0u; m < MV_M; m++) {
                let xb = (p.x_off + m * p.lda) / 4u + b * 8u;
                var t = vec4<f32>(0.0);
                var tb = vec4<f32>(0.0);
                for (var j = 0u; j < 4u; j++) {
                    let xa = xload(xb + j, b * 8u + j, inv[m]);
                    let xc = xload(xb + 4u + j, b * 8u + 4u + j, inv[m]);
                    for (var r = 0u; r < MV_RPT; r++) {
                        t[r] += wdot(q0[r][j], q1[r][j], xa, xc);
                        tb[r] += wdot(u0[r][j], u1[r][j], xa, xc);
                    }
                }
                acc[m] += d * t;
                acc_b[m] += e * tb;
            }
        }
    }
    for (var m = 0u; m < MV_M; m++) {
        red[tid] = acc[m];
        red_b[tid] = acc_b[m];
        reduce_lanes(tid, lane, true);
        if (lane == 0u) {
            for (var r = 0u; r < MV_RPT; r++) {
                let n = r0 + r;
                if (n < p.N) {
                    let a = red[tid][r];
                    y[p.y_off + m * p.ldy + n] = a / (1.0 + exp(-a)) * red_b[tid][r];
                }
            }
        }
        workgroupBarrier();
    }
}

// linear_quant.wgsl — linear layers with GGML Q4_0 / Q8_0 weights, dequantised on the fly.
//
//   matmul, matvec:           y[m, n] = act( sum_k xn[m, k] * W[n, k] + b[b_off + n] )  (+ y[m, n] if accumulate)
//   matvec_swiglu:            y[m, n] = silu( sum_k xn[m, k] * W[n, k] ) * ( sum_k xn[m, k] * Wb[n, k] )
//   matvec_qkv:               y[m, n] = sum_k xn[m, k] * [W; Wb; Wc][n, k]  (rows n < n1 from W,
//                             n < n1 + n2 from Wb, the rest from Wc)
//   xn = x, or with MV_NORM (matvec entry points only) xn = x * inverseSqrt(mean_k(x^2) + eps) * g
//   (RMSNorm folded in, as inv[m] * sum_k (x * g)[m, k] * W[n, k]: inv comes from a sum of squares
//   taken over the x the kernel reads anyway, so no prologue has to finish before the weights load)
//
// The Params fields are linear.wgsl's and the epilogue (act: 0 identity, 1 GELU erf form, 2 SiLU;
// bias; accumulate) is _epilogue.wgsl's, shared with it; matvec_swiglu / matvec_qkv mirror matvec.wgsl's entry points. K is a multiple
// of 32. One dispatch covers one row chunk of W: the caller passes N = rows of the chunk,
// y_off += row0, b_off = row0. p.norm is informational here: the matvec kernels take MV_NORM.
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
//   The f16 -> f32 conversion uses integer ops (_half.wgsl's half_bits: exact for subnormals on
//   every device).
//
// Bindings
//   0  params  uniform   Params
//   1  x       vec4<f32> [M rows at stride lda] from element x_off (matvec: x_off, lda multiples of 4)
//   2  w       vec4<u32> weight chunk (quants, then scales from vec4 p.sc)
//   3  bias    f32       [..] read when has_bias != 0 (bind anything otherwise)
//   4  g       vec4<f32> [K/4] RMSNorm weight (MV_NORM)
//   5  y       f32       [M, ldy] from element y_off
//   6  wb      vec4<u32> second weight chunk (matvec_swiglu: [N, K] up projection; matvec_qkv: k, [n2, K])
//   7  wc      vec4<u32> third weight chunk (matvec_qkv: v)
//
// Work split
//   matvec* (decode, any M): a workgroup takes MV_M input rows (a group; p.mq groups of them) and
//     R = MV_RG * MV_RPT output rows of one matrix; workgroup index = row group + mq * row block, so
//     the mq workgroups reading one block of W run together (one DRAM read, the rest from L2). The
//     host compiles MV_M = 1 for every row count: one row per workgroup, so a stream's row runs the
//     same code (staging included) alone or in a batch of any size, and is bit-identical in both.
//     256 invocations handle the R output rows:
//     The rows form MV_RG row groups of MV_RPT rows each (row group rg: rows rg, rg + MV_RG, ...);
//     each row group is shared by L = 256 / MV_RG invocations that split its K/32 blocks (lane kl
//     takes blocks kl, kl + L, ...). Invocation tid = lw + MV_LW * (rg + MV_RG * s), kl = lw + MV_LW * s:
//     MV_LW neighbouring invocations read neighbouring blocks of a row (coalesced 16-byte loads)
//     while the next ones read the same blocks of other rows, so a warp's loads of x touch only
//     MV_LW-ish distinct blocks (x, with g, is most of the load traffic); each x block is then reused
//     from registers for the invocation's MV_RPT rows (and both SwiGLU matrices). Each loop step
//     issues the loads of MV_UB blocks of every row before any arithmetic. Rows past the matrix
//     re-read its last row (never stored) and blocks past K the last block with scale 0, so the
//     inner code has no branches. The partial sums (and sum(x^2) with MV_NORM) meet in workgroup
//     memory; R invocations each add their row's L partials and run the epilogue: one barrier per
//     input row. MV_STAGE (norm, MV_M = 1, K <= 3072; pays where R is large): the workgroup first
//     writes x * g and sum(x^2) to workgroup memory (one more barrier, after the first step's weight
//     loads are issued) and the loop reads x * g from there.
//     matvec / matvec_swiglu: mq * ceil(N / R) workgroups; matvec_qkv: mq * (ceil(n1 / R) +
//     ceil(n2 / R) + ceil((N - n1 - n2) / R)), each workgroup within one of the three matrices.
//     Split over x/y.
//     Quants become floats without int->float conversions (quarter-rate on some GPUs): a 4-bit field
//     q at bit 4i of a 16-bit half word, OR'ed into the bits of 2^23, reads as 2^23 + q * 16^i
//     exactly, and one subtraction of 2^23 + 8 * 16^i gives (q - 8) * 16^i (Q8_0: bytes biased to
//     q + 128, 8-bit fields, q * 256^i); the power of two of each field position is undone per block.
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
    mq: u32,  // matvec*: groups of MV_M input rows (0 counts as 1), one per workgroup of a row block
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> wb: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> wc: array<vec4<u32>>;

// #include "_half.wgsl"

fn half_of(word: u32, blk: u32) -> f32 {
    if (F16_HW) {
        let s2 = unpack2x16float(word);
        return select(s2.x, s2.y, (blk & 1u) == 1u);
    }
    return half_bits(select(word & 0xffffu, word >> 16u, (blk & 1u) == 1u));
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

// #include "_epilogue.wgsl"

// ------------------------------------------------------------------------------------ matvec
// Every count below is an override, so the driver sees constant trip counts; the code is written
// straight-line (guards on overrides, constant vector components) because Naga bounds every loop
// with a counter, which can keep a driver from unrolling it and turn register arrays indexed by the
// loop variable into local-memory spills.
override MV_M: u32 = 1u;         // rows of x per workgroup (1..4); p.M rows in all, in p.mq groups
override MV_NORM: bool = false;  // RMSNorm folded in (g at binding 4)
override MV_LW: u32 = 4u;        // neighbouring invocations on neighbouring blocks of one row group (power of two)
override MV_RG: u32 = 8u;        // row groups per workgroup (power of two, MV_LW * MV_RG <= 256)
override MV_RPT: u32 = 2u;       // rows per row group = per invocation (1..4)
override MV_UB: u32 = 1u;        // blocks of each row loaded per loop step (1..4)
override MV_STAGE: bool = false; // MV_NORM, K <= 3072: x * g of row 0 staged once per workgroup (see shm)

// Workgroup memory (at most 14.6 KiB), used twice:
//  - with MV_STAGE, x * g of input row 0 (K <= 3072), block b's 8 vec4 at 9b .. 9b + 7 (one vec4
//    of padding per block, so the few neighbouring blocks a warp reads fall in different banks);
//    ssp: each invocation's part of sum(x^2), ssp2: 16 sums of 16 of those;
//  - after the main loop, the partial sums of one input row: vec4 channel c of invocation t at
//    c * 256 + t: the MV_RPT rows, then SwiGLU's up-projection rows, then sum(x^2) in .x (MV_NORM,
//    unless staging took it).
// Sizes from the host (ops_quant._matvec_kernel), so a kernel reserves only what it uses: workgroup
// memory per workgroup bounds how many workgroups an SM holds and how much of it is left as cache.
override MV_SHM: u32 = 864u;  // vec4s: max(256 * channels, 864 with MV_STAGE)
override MV_SSP: u32 = 256u;  // 256 with MV_STAGE, else 1
var<workgroup> shm: array<vec4<f32>, MV_SHM>;
var<workgroup> ssp: array<f32, MV_SSP>;
var<workgroup> ssp2: array<f32, 16>;

// Accumulators (rows in components; ssq: sum(x^2) per input row in components). Private variables,
// not arrays, so no driver has to index registers.
var<private> acc0: vec4<f32>;
var<private> acc1: vec4<f32>;
var<private> acc2: vec4<f32>;
var<private> acc3: vec4<f32>;
var<private> up0: vec4<f32>;
var<private> up1: vec4<f32>;
var<private> up2: vec4<f32>;
var<private> up3: vec4<f32>;
var<private> ssq: vec4<f32>;
// first input row of this workgroup's group of MV_M rows (rows mbase .. min(mbase + MV_M, M) - 1)
var<private> mbase: u32;

const MAGIC: u32 = 0x4b000000u;  // 2^23 as f32 bits
// Q4_0: fields 0xf, 0xf0, 0xf00, 0xf000 of a 16-bit half word -> (q - 8) * 16^i after subtracting
const Q4_MASK = vec4<u32>(0xfu, 0xf0u, 0xf00u, 0xf000u);
const Q4_OFF = vec4<f32>(8388616.0, 8388736.0, 8390656.0, 8421376.0);  // 2^23 + 8 * 16^i
const Q4_UNSCALE = vec4<f32>(1.0, 0.0625, 0.00390625, 0.000244140625);  // 16^-i
// Q8_0 (bytes biased by +128 first): fields 0xff, 0xff00 of each half word -> q * 256^i
const Q8_MASK = vec4<u32>(0xffu, 0xff00u, 0xffu, 0xff00u);
const Q8_OFF = vec4<f32>(8388736.0, 8421376.0, 8388736.0, 8421376.0);  // 2^23 + 128 * 256^i
const Q8_UNSCALE = vec4<f32>(1.0, 0.00390625, 1.0, 0.00390625);

// which = 0: w, 1: wb, 2: wc (a constant wherever these are inlined)
fn ldq(which: u32, i: u32) -> vec4<u32> {
    if (which == 1u) {
        return wb[i];
    }
    if (which == 2u) {
        return wc[i];
    }
    return w[i];
}

// scale of block blk: one 4-byte load of its u32 word
fn ld_scale(which: u32, blk: u32) -> f32 {
    var i = p.sc * 4u + (blk >> 1u);
    var word: u32;
    if (which == 1u) {
        i = p.sc_b * 4u + (blk >> 1u);
        word = wb[i >> 2u][i & 3u];
    } else if (which == 2u) {
        i = p.sc_c * 4u + (blk >> 1u);
        word = wc[i >> 2u][i & 3u];
    } else {
        word = w[i >> 2u][i & 3u];
    }
    if (F16_HW) {
        let s2 = unpack2x16float(word);
        return select(s2.x, s2.y, (blk & 1u) == 1u);
    }
    return half_bits(select(word & 0xffffu, word >> 16u, (blk & 1u) == 1u));
}

// one block of one row: quants (Q8: q0 then q1) and scale (0 for a block past K)
struct Blk {
    q0: vec4<u32>,
    q1: vec4<u32>,
    d: f32,
}

fn ld_block(which: u32, blk: u32, valid: bool) -> Blk {
    var o: Blk;
    if (Q8) {
        o.q0 = ldq(which, 2u * blk);
        o.q1 = ldq(which, 2u * blk + 1u);
    } else {
        o.q0 = ldq(which, blk);
    }
    o.d = select(0.0, ld_scale(which, blk), valid);
    return o;
}

// the blocks one loop step needs: rows r0..r3 of W (and of Wb for SwiGLU)
struct Step {
    w0: Blk,
    w1: Blk,
    w2: Blk,
    w3: Blk,
    u0: Blk,
    u1: Blk,
    u2: Blk,
    u3: Blk,
}

fn ld_step(which: u32, swiglu: bool, rows: vec4<u32>, b: u32, nb: u32) -> Step {
    let valid = b < nb;
    let base = rows * nb + vec4<u32>(min(b, nb - 1u));
    var s: Step;
    s.w0 = ld_block(which, base.x, valid);
    if (MV_RPT > 1u) {
        s.w1 = ld_block(which, base.y, valid);
    }
    if (MV_RPT > 2u) {
        s.w2 = ld_block(which, base.z, valid);
    }
    if (MV_RPT > 3u) {
        s.w3 = ld_block(which, base.w, valid);
    }
    if (swiglu) {
        s.u0 = ld_block(1u, base.x, valid);
        if (MV_RPT > 1u) {
            s.u1 = ld_block(1u, base.y, valid);
        }
        if (MV_RPT > 2u) {
            s.u2 = ld_block(1u, base.z, valid);
        }
        if (MV_RPT > 3u) {
            s.u3 = ld_block(1u, base.w, valid);
        }
    }
    return s;
}

// 32 activations of one block (times g with MV_NORM) and their raw sum of squares
struct Xb {
    v: array<vec4<f32>, 8>,
    ss: f32,
}

fn ld_x(m: u32, b: u32) -> Xb {
    var o: Xb;
    if (MV_STAGE && m == 0u) {  // x * g from workgroup memory; sum(x^2) was taken while staging
        let j = 9u * b;
        o.v = array<vec4<f32>, 8>(shm[j], shm[j + 1u], shm[j + 2u], shm[j + 3u], shm[j + 4u], shm[j + 5u],
                                  shm[j + 6u], shm[j + 7u]);
        return o;
    }
    let i = (p.x_off + (mbase + m) * p.lda) / 4u + 8u * b;  // x_off, lda multiples of 4 (host checks)
    o.v = array<vec4<f32>, 8>(x4[i], x4[i + 1u], x4[i + 2u], x4[i + 3u], x4[i + 4u], x4[i + 5u], x4[i + 6u],
                              x4[i + 7u]);
    if (MV_NORM) {
        o.ss = dot(o.v[0], o.v[0]) + dot(o.v[1], o.v[1]) + dot(o.v[2], o.v[2]) + dot(o.v[3], o.v[3]) +
               dot(o.v[4], o.v[4]) + dot(o.v[5], o.v[5]) + dot(o.v[6], o.v[6]) + dot(o.v[7], o.v[7]);
        let j = 8u * b;
        o.v = array<vec4<f32>, 8>(o.v[0] * g[j], o.v[1] * g[j + 1u], o.v[2] * g[j + 2u], o.v[3] * g[j + 3u],
                                  o.v[4] * g[j + 4u], o.v[5] * g[j + 5u], o.v[6] * g[j + 6u], o.v[7] * g[j + 7u]);
    }
    return o;
}

// Q4_0 word (byte i: element i in the low nibble, 16 + i in the high one, of its group of 4):
// t += (q - 8) * 16^k * x for the 4 fields of each 16-bit half, components in field order.
fn q4_word(v: u32, lo: vec4<f32>, hi: vec4<f32>, t: vec4<f32>) -> vec4<f32> {
    let a = bitcast<vec4<f32>>((vec4<u32>(v) & Q4_MASK) | vec4<u32>(MAGIC)) - Q4_OFF;
    let b = bitcast<vec4<f32>>((vec4<u32>(v >> 16u) & Q4_MASK) | vec4<u32>(MAGIC)) - Q4_OFF;
    return fma(a, vec4<f32>(lo.x, hi.x, lo.y, hi.y), fma(b, vec4<f32>(lo.z, hi.z, lo.w, hi.w), t));
}

// Q8_0 word (4 signed bytes, elements 4j..4j+3): t += q * 256^k * x
fn q8_word(v: u32, xv: vec4<f32>, t: vec4<f32>) -> vec4<f32> {
    let u = v ^ 0x80808080u;  // int8 q -> q + 128 in each byte
    let a = bitcast<vec4<f32>>((vec4<u32>(u, u, u >> 16u, u >> 16u) & Q8_MASK) | vec4<u32>(MAGIC)) - Q8_OFF;
    return fma(a, xv, t);
}

// d * sum of the block's 32 weights times x
fn block_dot(k: Blk, x: array<vec4<f32>, 8>) -> f32 {
    if (Q8) {
        var t = q8_word(k.q0.x, x[0], vec4<f32>(0.0));
        t = q8_word(k.q0.y, x[1], t);
        t = q8_word(k.q0.z, x[2], t);
        t = q8_word(k.q0.w, x[3], t);
        t = q8_word(k.q1.x, x[4], t);
        t = q8_word(k.q1.y, x[5], t);
        t = q8_word(k.q1.z, x[6], t);
        t = q8_word(k.q1.w, x[7], t);
        return k.d * dot(t, Q8_UNSCALE);
    }
    var t = q4_word(k.q0.x, x[0], x[4], vec4<f32>(0.0));
    t = q4_word(k.q0.y, x[1], x[5], t);
    t = q4_word(k.q0.z, x[2], x[6], t);
    t = q4_word(k.q0.w, x[3], x[7], t);
    return k.d * dot(t, Q4_UNSCALE);
}

fn rows_dot(k0: Blk, k1: Blk, k2: Blk, k3: Blk, x: array<vec4<f32>, 8>) -> vec4<f32> {
    var t = vec4<f32>(block_dot(k0, x), 0.0, 0.0, 0.0);
    if (MV_RPT > 1u) {
        t.y = block_dot(k1, x);
    }
    if (MV_RPT > 2u) {
        t.z = block_dot(k2, x);
    }
    if (MV_RPT > 3u) {
        t.w = block_dot(k3, x);
    }
    return t;
}

fn use_step(s: Step, swiglu: bool, b: u32, nb: u32) {
    let bc = min(b, nb - 1u);
    let live = select(0.0, 1.0, b < nb);  // sum(x^2) counts each block once
    let x0 = ld_x(0u, bc);
    acc0 += rows_dot(s.w0, s.w1, s.w2, s.w3, x0.v);
    if (swiglu) {
        up0 += rows_dot(s.u0, s.u1, s.u2, s.u3, x0.v);
    }
    ssq.x += live * x0.ss;
    if (MV_M > 1u && mbase + 1u < p.M) {
        let x1 = ld_x(1u, bc);
        acc1 += rows_dot(s.w0, s.w1, s.w2, s.w3, x1.v);
        if (swiglu) {
            up1 += rows_dot(s.u0, s.u1, s.u2, s.u3, x1.v);
        }
        ssq.y += live * x1.ss;
    }
    if (MV_M > 2u && mbase + 2u < p.M) {
        let x2 = ld_x(2u, bc);
        acc2 += rows_dot(s.w0, s.w1, s.w2, s.w3, x2.v);
        if (swiglu) {
            up2 += rows_dot(s.u0, s.u1, s.u2, s.u3, x2.v);
        }
        ssq.z += live * x2.ss;
    }
    if (MV_M > 3u && mbase + 3u < p.M) {
        let x3 = ld_x(3u, bc);
        acc3 += rows_dot(s.w0, s.w1, s.w2, s.w3, x3.v);
        if (swiglu) {
            up3 += rows_dot(s.u0, s.u1, s.u2, s.u3, x3.v);
        }
        ssq.w += live * x3.ss;
    }
}

// invocation holding lane j (0 <= j < L) of row group rg (lanes past L wrap: read, weighted 0)
fn lane_of(j: u32, rg: u32) -> u32 {
    let jj = j % (256u / MV_RG);
    return jj % MV_LW + MV_LW * (rg + MV_RG * (jj / MV_LW));
}

// Input row m: every invocation stores its partials, then invocation t < R adds the L partials of
// output row row0 + t (row group t % MV_RG, row t / MV_RG of it) and writes it.
fn finish_row(m: u32, a: vec4<f32>, u: vec4<f32>, ss: f32, swiglu: bool, tid: u32, row0: u32, nseg: u32,
              col0: u32) {
    let staged = MV_STAGE && m == 0u;  // sum(x^2) from ssp2
    let ch_ss = select(256u, 512u, swiglu);
    shm[tid] = a;
    if (swiglu) {
        shm[256u + tid] = u;
    }
    if (MV_NORM && !staged) {
        shm[ch_ss + tid] = vec4<f32>(ss, 0.0, 0.0, 0.0);
    }
    workgroupBarrier();
    if (tid < MV_RPT * MV_RG) {
        let r = tid / MV_RG;
        let rg = tid % MV_RG;
        let lanes = 256u / MV_RG;
        // four independent partial sums per step, so four loads are in flight (L is a power of two)
        let q = select(1u, 4u, lanes >= 4u);
        let live = select(vec4<f32>(1.0, 0.0, 0.0, 0.0), vec4<f32>(1.0), q > 1u);
        var sa = vec4<f32>(0.0);
        var su = vec4<f32>(0.0);
        var s2 = vec4<f32>(0.0);
        for (var j = 0u; j < lanes; j += q) {
            let k = vec4<u32>(lane_of(j, rg), lane_of(j + 1u, rg), lane_of(j + 2u, rg), lane_of(j + 3u, rg));
            sa += live * vec4<f32>(shm[k.x][r], shm[k.y][r], shm[k.z][r], shm[k.w][r]);
            if (swiglu) {
                su += live * vec4<f32>(shm[256u + k.x][r], shm[256u + k.y][r], shm[256u + k.z][r],
                                       shm[256u + k.w][r]);
            }
            if (MV_NORM && !staged) {
                s2 += live * vec4<f32>(shm[ch_ss + k.x].x, shm[ch_ss + k.y].x, shm[ch_ss + k.z].x,
                                       shm[ch_ss + k.w].x);
            }
        }
        if (staged) {
            for (var j = 0u; j < 16u; j += 4u) {
                s2 += vec4<f32>(ssp2[j], ssp2[j + 1u], ssp2[j + 2u], ssp2[j + 3u]);
            }
        }
        let sum_a = (sa.x + sa.y) + (sa.z + sa.w);
        let sum_u = (su.x + su.y) + (su.z + su.w);
        let sum_s = (s2.x + s2.y) + (s2.z + s2.w);
        let n = row0 + tid;
        if (n < nseg) {
            var inv = 1.0;
            if (MV_NORM) {
                inv = inverseSqrt(sum_s / f32(p.K) + p.eps);
            }
            if (swiglu) {
                let ga = sum_a * inv;
                y[p.y_off + (mbase + m) * p.ldy + col0 + n] = ga / (1.0 + exp(-ga)) * (sum_u * inv);
            } else {
                epilogue(mbase + m, col0 + n, sum_a * inv);
            }
        }
    }
}

// x * g of the workgroup's first input row into shm, sum(x^2) into ssp / ssp2 (read after the next barrier)
fn stage_x(tid: u32) {
    let base = (p.x_off + mbase * p.lda) / 4u;
    var ss = 0.0;
    for (var i = tid; i < p.K / 4u; i += 256u) {
        let v = x4[base + i];
        ss += dot(v, v);
        shm[i + (i >> 3u)] = v * g[i];
    }
    ssp[tid] = ss;
    workgroupBarrier();
    if (tid < 16u) {
        var t = vec4<f32>(0.0);
        for (var j = 16u * tid; j < 16u * tid + 16u; j += 4u) {
            t += vec4<f32>(ssp[j], ssp[j + 1u], ssp[j + 2u], ssp[j + 3u]);
        }
        ssp2[tid] = (t.x + t.y) + (t.z + t.w);
    }
}

// one loop step's loads: MV_UB blocks (b, b + L, ..) of every row
struct Steps {
    s0: Step,
    s1: Step,
    s2: Step,
    s3: Step,
}

fn ld_steps(which: u32, swiglu: bool, rows: vec4<u32>, b: u32, lanes: u32, nb: u32) -> Steps {
    var o: Steps;
    o.s0 = ld_step(which, swiglu, rows, b, nb);
    if (MV_UB > 1u) {
        o.s1 = ld_step(which, swiglu, rows, b + lanes, nb);
    }
    if (MV_UB > 2u) {
        o.s2 = ld_step(which, swiglu, rows, b + 2u * lanes, nb);
    }
    if (MV_UB > 3u) {
        o.s3 = ld_step(which, swiglu, rows, b + 3u * lanes, nb);
    }
    return o;
}

// one loop step's weights; `which` is uniform over the workgroup, and each branch inlines the
// loads from one buffer with no further branches
fn ld_which(which: u32, swiglu: bool, rows: vec4<u32>, b: u32, lanes: u32, nb: u32) -> Steps {
    if (which == 1u) {
        return ld_steps(1u, swiglu, rows, b, lanes, nb);
    }
    if (which == 2u) {
        return ld_steps(2u, swiglu, rows, b, lanes, nb);
    }
    return ld_steps(0u, swiglu, rows, b, lanes, nb);
}

// Rows row0 .. row0 + R - 1 of matrix `which` (nseg rows; output columns col0 + row).
fn mv(which: u32, swiglu: bool, tid: u32, row0: u32, nseg: u32, col0: u32, mb: u32) {
    mbase = mb;
    let lanes = 256u / MV_RG;  // L
    let rg = (tid / MV_LW) % MV_RG;
    let kl = tid % MV_LW + MV_LW * (tid / (MV_LW * MV_RG));
    let nb = p.K / 32u;
    let rows = min(vec4<u32>(row0 + rg) + vec4<u32>(0u, 1u, 2u, 3u) * MV_RG, vec4<u32>(nseg - 1u));
    let step = lanes * MV_UB;
    // each step's weight loads are issued as a whole before its arithmetic; with MV_STAGE the first
    // step's go out before the staging barrier
    var s: Steps;
    if (MV_STAGE) {
        s = ld_which(which, swiglu, rows, kl, lanes, nb);
        stage_x(tid);
    }
    for (var b0 = kl; b0 < nb; b0 += step) {
        if (!MV_STAGE || b0 != kl) {
            s = ld_which(which, swiglu, rows, b0, lanes, nb);
        }
        use_step(s.s0, swiglu, b0, nb);
        if (MV_UB > 1u) {
            use_step(s.s1, swiglu, b0 + lanes, nb);
        }
        if (MV_UB > 2u) {
            use_step(s.s2, swiglu, b0 + 2u * lanes, nb);
        }
        if (MV_UB > 3u) {
            use_step(s.s3, swiglu, b0 + 3u * lanes, nb);
        }
    }
    if (MV_STAGE) {
        workgroupBarrier();  // the staged x is read before the partial sums overwrite it
    }
    finish_row(0u, acc0, up0, ssq.x, swiglu, tid, row0, nseg, col0);
    if (MV_M > 1u && mb + 1u < p.M) {  // uniform over the workgroup
        workgroupBarrier();  // row 0's partials are read before row 1's overwrite them
        finish_row(1u, acc1, up1, ssq.y, swiglu, tid, row0, nseg, col0);
    }
    if (MV_M > 2u && mb + 2u < p.M) {  // uniform over the workgroup
        workgroupBarrier();
        finish_row(2u, acc2, up2, ssq.z, swiglu, tid, row0, nseg, col0);
    }
    if (MV_M > 3u && mb + 3u < p.M) {  // uniform over the workgroup
        workgroupBarrier();
        finish_row(3u, acc3, up3, ssq.w, swiglu, tid, row0, nseg, col0);
    }
}

// Workgroup `flat` -> its block of output rows. The groups of input rows vary fastest, so the
// workgroups that read one block of W run together and the later ones find it in L2.
fn row_block(flat: u32) -> u32 {
    return flat / max(p.mq, 1u);
}

// ... and its first input row (a value, not the private mbase: barriers are guarded by it, and
// WGSL's uniformity analysis counts private variables as non-uniform)
fn first_row(flat: u32) -> u32 {
    return (flat % max(p.mq, 1u)) * MV_M;
}

@compute @workgroup_size(256)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) tid: u32) {
    let flat = wid.x + wid.y * nwg.x;
    let row0 = row_block(flat) * MV_RG * MV_RPT;
    if (row0 < p.N) {
        mv(0u, false, tid, row0, p.N, 0u, first_row(flat));
    }
}

@compute @workgroup_size(256)
fn matvec_swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) tid: u32) {
    let flat = wid.x + wid.y * nwg.x;
    let row0 = row_block(flat) * MV_RG * MV_RPT;
    if (row0 < p.N) {
        mv(0u, true, tid, row0, p.N, 0u, first_row(flat));
    }
}

// q rows from workgroups [0, g1), k rows from [g1, g1 + g2), v rows after: `which` is uniform per
// workgroup.
@compute @workgroup_size(256)
fn matvec_qkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) tid: u32) {
    let r = MV_RG * MV_RPT;
    let flat = wid.x + wid.y * nwg.x;
    let group = row_block(flat);
    let n3 = p.N - p.n1 - p.n2;
    let g1 = (p.n1 + r - 1u) / r;
    let g2 = (p.n2 + r - 1u) / r;
    let g3 = (n3 + r - 1u) / r;
    if (group < g1 + g2 + g3) {
        var which = 0u;
        var row0 = group * r;
        var nseg = p.n1;
        var col0 = 0u;
        if (group >= g1 + g2) {
            which = 2u;
            row0 = (group - g1 - g2) * r;
            nseg = n3;
            col0 = p.n1 + p.n2;
        } else if (group >= g1) {
            which = 1u;
            row0 = (group - g1) * r;
            nseg = p.n2;
            col0 = p.n1;
        }
        mv(which, false, tid, row0, nseg, col0, first_row(flat));
    }
}

// ------------------------------------------------------------------------------------ matmul
const TILE: u32 = 64u;
const KS: u32 = 16u;
// staging: x slice [KS][TILE / 4] in shm[0..255], W slice [KS][TILE / 4] in shm[256..511] (the
// matvec's workgroup array, so the module's workgroup memory stays within 16 KiB; matmul pipelines
// keep the default MV_SHM >= 512)

// the 4 outputs of row m from column n, each through the epilogue
fn store4(m: u32, n: u32, v: vec4<f32>) {
    if (m >= p.M) {
        return;
    }
    if (n < p.N) { epilogue(m, n, v.x); }
    if (n + 1u < p.N) { epilogue(m, n + 1u, v.y); }
    if (n + 2u < p.N) { epilogue(m, n + 2u, v.z); }
    if (n + 3u < p.N) { epilogue(m, n + 3u, v.w); }
}

@compute @workgroup_size(256)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let n0 = wid.x * TILE;
    let m0 = wid.y * TILE;
    let tm = (tid / 16u) * 4u;
    let tn = (tid % 16u) * 4u;
    let nb = p.K / 32u;
    // accumulators of rows tm + 0..3, columns tn..tn+3: named vec4s, not an array indexed in loops
    // (drivers kept such arrays in local memory: the BF16 matmul ran 3-5x slower that way on an H100)
    var r0 = vec4<f32>(0.0);
    var r1 = vec4<f32>(0.0);
    var r2 = vec4<f32>(0.0);
    var r3 = vec4<f32>(0.0);
    // W staging: invocation = (row wr of the tile, word ww of the half block) -> 4 weights
    let wr = tid / 4u;
    let ww = tid % 4u;
    for (var k0 = 0u; k0 < p.K; k0 += KS) {
        // x slice: 4 elements per invocation
        for (var j = 0u; j < 4u; j++) {
            let e = tid * 4u + j;
            let r = e / KS;
            let c = e % KS;
            var xv = 0.0;
            if (m0 + r < p.M) {
                let i = p.x_off + (m0 + r) * p.lda + k0 + c;
                xv = x4[i >> 2u][i & 3u];
            }
            shm[c * 16u + r / 4u][r % 4u] = xv;
        }
        // W slice: elements k0 .. k0+15 of row n0 + wr, dequantised
        var wv = vec4<f32>(0.0);
        if (n0 + wr < p.N) {
            let blk = (n0 + wr) * nb + k0 / 32u;
            let half = (k0 / 16u) & 1u;
            let d = scale_of(0u, blk);
            if (Q8) {
                wv = i8x4(w[2u * blk + half][ww]) * d;
            } else {
                let v = w[blk][ww];
                wv = select(lo4(v), hi4(v), half == 1u) * d;
            }
        }
        shm[256u + (4u * ww) * 16u + wr / 4u][wr % 4u] = wv.x;
        shm[256u + (4u * ww + 1u) * 16u + wr / 4u][wr % 4u] = wv.y;
        shm[256u + (4u * ww + 2u) * 16u + wr / 4u][wr % 4u] = wv.z;
        shm[256u + (4u * ww + 3u) * 16u + wr / 4u][wr % 4u] = wv.w;
        workgroupBarrier();
        for (var c = 0u; c < KS; c++) {
            let a = shm[c * 16u + tm / 4u];
            let b = shm[256u + c * 16u + tn / 4u];
            r0 += a.x * b;
            r1 += a.y * b;
            r2 += a.z * b;
            r3 += a.w * b;
        }
        workgroupBarrier();
    }
    store4(m0 + tm, n0 + tn, r0);
    store4(m0 + tm + 1u, n0 + tn, r1);
    store4(m0 + tm + 2u, n0 + tn, r2);
    store4(m0 + tm + 3u, n0 + tn, r3);
}

// matmul.wgsl — batched linear layers (encoder, adapter, prefill), register-blocked, with BF16 or
// GGML Q4_0 / Q8_0 weights (W_QUANT), dequantised as each K slice is staged.
//
//   y[m, n] = act( sum_k x[x_off + m*lda + k] * W[n, k] + b[n] )  (+ y[m, n] if accumulate)
//   act: 0 identity, 1 GELU (erf), 2 SiLU — the same contract as linear.wgsl.
//
// Each output's K-sum runs in the same order whatever M is (and whatever BM), so a row's result does
// not depend on how rows were batched (streaming equals offline bit for bit).
//
// Bindings
//   0  params  uniform    Params
//   1  x       vec4<f32>  [M rows at stride lda] from element x_off (x_off, lda multiples of 4)
//   2  w       vec4<u32>  W_QUANT 0: [N, K/8] BF16 words (K a multiple of 16);
//                         W_QUANT 4 / 8: a Q4_0 / Q8_0 row chunk as linear_quant.wgsl reads it (K a
//                         multiple of 32): 16 / 32 bytes of quants per 32-weight block (block
//                         r * K/32 + b), then f16 scales from vec4 p.sc (scale i in half i & 1 of u32
//                         word i >> 1); weight = (q - 8) * d (Q4_0: byte j holds element j in the low
//                         nibble, j + 16 in the high one) or q * d (Q8_0, signed bytes)
//   3  bias    f32        [N] from b_off (has_bias)
//   4  y       f32        [M, ldy] from y_off
//
// Work split: a BM x 128 output tile per workgroup of 256 invocations, each computing (BM/16) x 8
// outputs in vec4 registers; K walked in slices of 16 staged in workgroup memory (x slice
// transposed; 2 x 8 KiB), each weight row's 16 values dequantised once per slice (exactly: a 4- or
// 8-bit integer times an f16 scale is an f32). groups = (ceil(N/128), ceil(M/BM)).
// Split K (SPLIT, for weights with few rows, whose tiles alone leave most of the GPU idle): workgroup
// z of groups (.., .., splits) sums K elements z * k_split .. + k_split - 1 and stores the raw sum
// at y[y_off + (z * M + m) * ldy + n]; reduce_splits then adds the splits in z order and applies
// the epilogue. k_split is fixed per weight (never per M), so batching still changes nothing.

override BM: u32 = 128u;  // 64 or 128: rows per tile (64 gives more workgroups for short batches)
override W_QUANT: u32 = 0u;  // 0: BF16 weights, 4: Q4_0, 8: Q8_0
override SPLIT: bool = false;  // partial sums over K pieces (see Work split)

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
    sc: u32,  // quantised weights: the chunk's scale region, in vec4 (16-byte) units
    k_split: u32,  // SPLIT: K elements per split
    splits: u32,   // reduce_splits: number of partial sums per output
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

const BN: u32 = 128u;
const BK: u32 = 16u;
// Workgroup memory as vec4 so each invocation's 4+4 rows and 4+4 columns load in four 16-byte reads
// without bank conflicts (rows 4ty..4ty+3 and 64+4ty.., columns 4tx.. and 64+4tx..).
var<workgroup> xs: array<vec4<f32>, 512>;  // [BK][BM/4]
var<workgroup> ws: array<vec4<f32>, 512>;  // [BK][BN/4]

// #include "_half.wgsl"

// f16 scale of quant block blk
fn block_scale(blk: u32) -> f32 {
    let i = p.sc * 4u + (blk >> 1u);  // u32 word of the scale region
    let word = w[i >> 2u][i & 3u];
    return half_bits(select(word & 0xffffu, word >> 16u, (blk & 1u) == 1u));
}

// the low nibbles of a word's 4 bytes, as floats
fn nibbles(v: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(v, v >> 8u, v >> 16u, v >> 24u) & vec4<u32>(0xfu));
}

// a word's 4 signed bytes, as floats
fn sbytes(v: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(v << 24u, v << 16u, v << 8u, v)) >> vec4<u32>(24u));
}

// #include "_epilogue.wgsl"

// outputs (m, n0 .. n0+3): through the epilogue, or with SPLIT the raw partial sums of split z
fn store4(m: u32, n0: u32, v4: vec4<f32>, z: u32) {
    if (m >= p.M) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + j;
        if (n < p.N) {
            if (SPLIT) {
                y[p.y_off + (z * p.M + m) * p.ldy + n] = v4[j];
            } else {
                epilogue(m, n, v4[j]);
            }
        }
    }
}

@compute @workgroup_size(256)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let n0 = wid.x * BN;
    let m0 = wid.y * BM;
    let tx = tid % 16u;
    let ty = tid / 16u;
    let bm4 = BM / 4u;
    // accumulators r{i}{j}: row 4ty + i (i < 4) or 64 + 4ty + i - 4 (i >= 4), columns 4tx.. (j = 0) or
    // 64 + 4tx.. (j = 1). Separate variables, not an array indexed in a loop: drivers kept such an
    // array in local memory, and the kernel ran at ~2 TFLOP/s (H100).
    var r00 = vec4<f32>(0.0); var r01 = vec4<f32>(0.0); var r10 = vec4<f32>(0.0); var r11 = vec4<f32>(0.0);
    var r20 = vec4<f32>(0.0); var r21 = vec4<f32>(0.0); var r30 = vec4<f32>(0.0); var r31 = vec4<f32>(0.0);
    var r40 = vec4<f32>(0.0); var r41 = vec4<f32>(0.0); var r50 = vec4<f32>(0.0); var r51 = vec4<f32>(0.0);
    var r60 = vec4<f32>(0.0); var r61 = vec4<f32>(0.0); var r70 = vec4<f32>(0.0); var r71 = vec4<f32>(0.0);
    let k8 = p.K / 8u;
    var k_end = p.K;
    var k_start = 0u;
    if (SPLIT) {
        k_start = wid.z * p.k_split;
        k_end = min(p.K, k_start + p.k_split);
    }
    for (var k0 = k_start; k0 < k_end; k0 += BK) {
        // x slice [BM rows, 16 k] = BM*4 vec4 reads, stored transposed (k-major)
        for (var e = tid; e < BM * 4u; e += 256u) {
            let r = e / 4u;
            let q = e % 4u;
            var v = vec4<f32>(0.0);
            if (m0 + r < p.M) {
                v = x[(p.x_off + (m0 + r) * p.lda + k0) / 4u + q];
            }
            let i = r / 4u;
            let c = r % 4u;
            xs[(4u * q) * bm4 + i][c] = v.x;
            xs[(4u * q + 1u) * bm4 + i][c] = v.y;
            xs[(4u * q + 2u) * bm4 + i][c] = v.z;
            xs[(4u * q + 3u) * bm4 + i][c] = v.w;
        }
        // weight slice [128 rows, 16 k]: values 8h .. 8h+7 of row r per invocation
        {
            let r = tid / 2u;
            let h = tid % 2u;
            var lo = vec4<f32>(0.0);  // values 8h .. 8h+3 of the slice
            var hi = vec4<f32>(0.0);  // values 8h+4 .. 8h+7
            if (n0 + r < p.N) {
                if (W_QUANT == 0u) {
                    let q = w[(n0 + r) * k8 + k0 / 8u + h];
                    lo = vec4<f32>(bitcast<f32>(q.x << 16u), bitcast<f32>(q.x & 0xffff0000u),
                                   bitcast<f32>(q.y << 16u), bitcast<f32>(q.y & 0xffff0000u));
                    hi = vec4<f32>(bitcast<f32>(q.z << 16u), bitcast<f32>(q.z & 0xffff0000u),
                                   bitcast<f32>(q.w << 16u), bitcast<f32>(q.w & 0xffff0000u));
                } else {
                    let blk = (n0 + r) * (p.K / 32u) + k0 / 32u;
                    let half = (k0 / 16u) & 1u;  // which 16 of the block's 32 weights
                    let d = block_scale(blk);
                    if (W_QUANT == 4u) {
                        // slice value e = element e (low nibbles) or 16 + e (high) = byte e
                        let v = w[blk];
                        let w0 = select(v.x, v.z, h == 1u) >> (4u * half);
                        let w1 = select(v.y, v.w, h == 1u) >> (4u * half);
                        lo = (nibbles(w0) - vec4<f32>(8.0)) * d;
                        hi = (nibbles(w1) - vec4<f32>(8.0)) * d;
                    } else {
                        let v = w[2u * blk + half];  // bytes 16 half .. +15 = the slice
                        lo = sbytes(select(v.x, v.z, h == 1u)) * d;
                        hi = sbytes(select(v.y, v.w, h == 1u)) * d;
                    }
                }
            }
            let c = 8u * h;
            let i = r / 4u;
            let cc = r % 4u;
            ws[(c + 0u) * 32u + i][cc] = lo.x;
            ws[(c + 1u) * 32u + i][cc] = lo.y;
            ws[(c + 2u) * 32u + i][cc] = lo.z;
            ws[(c + 3u) * 32u + i][cc] = lo.w;
            ws[(c + 4u) * 32u + i][cc] = hi.x;
            ws[(c + 5u) * 32u + i][cc] = hi.y;
            ws[(c + 6u) * 32u + i][cc] = hi.z;
            ws[(c + 7u) * 32u + i][cc] = hi.w;
        }
        workgroupBarrier();
        for (var c = 0u; c < BK; c++) {
            let a0 = xs[c * bm4 + ty];
            let b0 = ws[c * 32u + tx];
            let b1 = ws[c * 32u + 16u + tx];
            r00 += a0.x * b0; r01 += a0.x * b1;
            r10 += a0.y * b0; r11 += a0.y * b1;
            r20 += a0.z * b0; r21 += a0.z * b1;
            r30 += a0.w * b0; r31 += a0.w * b1;
            if (BM == 128u) {
                let a1 = xs[c * bm4 + 16u + ty];
                r40 += a1.x * b0; r41 += a1.x * b1;
                r50 += a1.y * b0; r51 += a1.y * b1;
                r60 += a1.z * b0; r61 += a1.z * b1;
                r70 += a1.w * b0; r71 += a1.w * b1;
            }
        }
        workgroupBarrier();
    }
    let m = m0 + 4u * ty;
    let n = n0 + 4u * tx;
    store4(m, n, r00, wid.z); store4(m, n + 64u, r01, wid.z);
    store4(m + 1u, n, r10, wid.z); store4(m + 1u, n + 64u, r11, wid.z);
    store4(m + 2u, n, r20, wid.z); store4(m + 2u, n + 64u, r21, wid.z);
    store4(m + 3u, n, r30, wid.z); store4(m + 3u, n + 64u, r31, wid.z);
    if (BM == 128u) {
        store4(m + 64u, n, r40, wid.z); store4(m + 64u, n + 64u, r41, wid.z);
        store4(m + 65u, n, r50, wid.z); store4(m + 65u, n + 64u, r51, wid.z);
        store4(m + 66u, n, r60, wid.z); store4(m + 66u, n + 64u, r61, wid.z);
        store4(m + 67u, n, r70, wid.z); store4(m + 67u, n + 64u, r71, wid.z);
    }
}

// y[m, n] = epilogue( sum over z of part[z][m][n] ), the split partial sums (x from x_off, row stride
// lda, split stride M * lda) added in z order; one invocation per output, groups_2d(ceil(M*N / 256))
@compute @workgroup_size(256)
fn reduce_splits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) tid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + tid;
    if (i >= p.M * p.N) {
        return;
    }
    let m = i / p.N;
    let n = i % p.N;
    var v = 0.0;
    for (var z = 0u; z < p.splits; z++) {
        let j = p.x_off + (z * p.M + m) * p.lda + n;
        v += x[j >> 2u][j & 3u];
    }
    epilogue(m, n, v);
}

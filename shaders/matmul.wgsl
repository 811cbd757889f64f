// matmul.wgsl — batched linear layers (encoder, adapter, prefill) with BF16 weights, register-blocked.
//
//   y[m, n] = act( sum_k x[x_off + m*lda + k] * W[n, k] + b[n] )  (+ y[m, n] if accumulate)
//   act: 0 identity, 1 GELU (erf), 2 SiLU — the same contract as linear.wgsl.
//
// Each output's K-sum runs in the same order whatever M is, so a row's result does not depend on
// how rows were batched (streaming equals offline bit for bit).
//
// Bindings
//   0  params  uniform    Params
//   1  x       vec4<f32>  [M rows at stride lda] from element x_off (x_off, lda multiples of 4)
//   2  w       vec4<u32>  [N, K/8] BF16 words (K a multiple of 16)
//   3  bias    f32        [N] from b_off (has_bias)
//   4  y       f32        [M, ldy] from y_off
//
// Work split: a BM x 128 output tile per workgroup of 256 invocations, each computing (BM/16) x 8
// outputs in vec4 registers; K walked in slices of 16 staged in workgroup memory (x slice
// transposed; 2 x 8 KiB). groups = (ceil(N/128), ceil(M/BM)).

override BM: u32 = 128u;  // 64 or 128: rows per tile (64 gives more workgroups for short batches)

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

fn erf_approx(v: f32) -> f32 {  // |error| < 1.2e-7 (same as linear.wgsl)
    let z = abs(v);
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
            t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
            t * (-0.82215223 + t * 0.17087277)))))))));
    return select(r - 1.0, 1.0 - r, v >= 0.0);
}

fn epilogue(m: u32, n0: u32, v4: vec4<f32>) {
    if (m >= p.M) {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let n = n0 + j;
        if (n < p.N) {
            var v = v4[j];
            if (p.has_bias != 0u) {
                v += bias[p.b_off + n];
            }
            if (p.act == 1u) {
                v = 0.5 * v * (1.0 + erf_approx(v * 0.70710678118654752));
            } else if (p.act == 2u) {
                v = v / (1.0 + exp(-v));
            }
            let o = p.y_off + m * p.ldy + n;
            if (p.accumulate != 0u) {
                v += y[o];
            }
            y[o] = v;
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
    // accumulators: rows (4ty + i | 64 + 4ty + i) x columns (4tx.. | 64 + 4tx..)
    var c00 = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    var c01 = c00;
    var c10 = c00;
    var c11 = c00;
    let k8 = p.K / 8u;
    for (var k0 = 0u; k0 < p.K; k0 += BK) {
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
        // weight slice [128 rows, 16 k] = 2 vec4<u32> per row: one per invocation
        {
            let r = tid / 2u;
            let h = tid % 2u;
            var q = vec4<u32>(0u);
            if (n0 + r < p.N) {
                q = w[(n0 + r) * k8 + k0 / 8u + h];
            }
            let c = 8u * h;
            let i = r / 4u;
            let cc = r % 4u;
            ws[(c + 0u) * 32u + i][cc] = bitcast<f32>(q.x << 16u);
            ws[(c + 1u) * 32u + i][cc] = bitcast<f32>(q.x & 0xffff0000u);
            ws[(c + 2u) * 32u + i][cc] = bitcast<f32>(q.y << 16u);
            ws[(c + 3u) * 32u + i][cc] = bitcast<f32>(q.y & 0xffff0000u);
            ws[(c + 4u) * 32u + i][cc] = bitcast<f32>(q.z << 16u);
            ws[(c + 5u) * 32u + i][cc] = bitcast<f32>(q.z & 0xffff0000u);
            ws[(c + 6u) * 32u + i][cc] = bitcast<f32>(q.w << 16u);
            ws[(c + 7u) * 32u + i][cc] = bitcast<f32>(q.w & 0xffff0000u);
        }
        workgroupBarrier();
        for (var c = 0u; c < BK; c++) {
            let a0 = xs[c * bm4 + ty];
            let b0 = ws[c * 32u + tx];
            let b1 = ws[c * 32u + 16u + tx];
            for (var i = 0u; i < 4u; i++) {
                c00[i] += a0[i] * b0;
                c01[i] += a0[i] * b1;
            }
            if (BM == 128u) {
                let a1 = xs[c * bm4 + 16u + ty];
                for (var i = 0u; i < 4u; i++) {
                    c10[i] += a1[i] * b0;
                    c11[i] += a1[i] * b1;
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        epilogue(m0 + 4u * ty + i, n0 + 4u * tx, c00[i]);
        epilogue(m0 + 4u * ty + i, n0 + 64u + 4u * tx, c01[i]);
        if (BM == 128u) {
            epilogue(m0 + 64u + 4u * ty + i, n0 + 4u * tx, c10[i]);
            epilogue(m0 + 64u + 4u * ty + i, n0 + 64u + 4u * tx, c11[i]);
        }
    }
}

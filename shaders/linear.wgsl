// linear.wgsl — dense linear layer with BF16 (or F32) weights and a fused epilogue.
//
//   y[m, n] = act( sum_k x[x_off + m*lda + k] * W[n, k] + b[n] )  (+ y[m, n] if accumulate)
//
// act: 0 = identity, 1 = GELU (exact, erf form as torch.nn.functional.gelu), 2 = SiLU.
// `lda` lets one call read overlapping rows: the causal conv stem is this op with
// lda = stride * C_in and K = 3 * C_in over a time-major input (weights reordered to [C_out, 3, C_in]).
//
// Bindings
//   0  params  uniform  Params
//   1  x       f32      [M rows at stride lda] starting at element x_off
//   2  w       u32      [N, K] weights: BF16 pairs packed little-endian (element e is the low half of
//                       word e/2 when e is even) when W_BF16, else raw F32 bits. BF16 -> F32 is exact
//                       (shift by 16), so weights stay 16-bit in memory and need no shader feature.
//   3  bias    f32      [N] from element b_off (read only when has_bias != 0; bind any buffer otherwise)
//   4  y       f32      [M, ldy] starting at element y_off, written (or accumulated) columns 0..N-1
//
// Work split
//   matmul: 64x64 output tile per workgroup, 256 invocations each computing a 4x4 block; K walked in
//           slices of 16 staged through workgroup memory (8 KiB). groups = (ceil(N/64), ceil(M/64)).
//   matvec: for M <= 4 (decode). One workgroup = 8 output columns n; 32 invocations per column stride
//           along K reading consecutive weight words (coalesced), then a tree reduction in workgroup
//           memory. groups = (ceil(N/8) split over x/y). Needs K even (BF16 pairs per word).

override W_BF16: bool = true;

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
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

fn weight(e: u32) -> f32 {
    if (W_BF16) {
        let word = w[e >> 1u];
        if ((e & 1u) == 0u) {
            return bitcast<f32>(word << 16u);
        }
        return bitcast<f32>(word & 0xffff0000u);
    }
    return bitcast<f32>(w[e]);
}

// #include "_epilogue.wgsl"

const TILE: u32 = 64u;
const KS: u32 = 16u;
var<workgroup> xs: array<f32, 1024>;  // [KS][TILE]
var<workgroup> ws: array<f32, 1024>;  // [KS][TILE]

@compute @workgroup_size(256)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let n0 = wid.x * TILE;
    let m0 = wid.y * TILE;
    let tm = (tid / 16u) * 4u;  // this invocation's 4 rows within the tile
    let tn = (tid % 16u) * 4u;  // and 4 columns
    var acc: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = 0u; k0 < p.K; k0 += KS) {
        // stage a [TILE x KS] slice of x and of W: 4 elements per invocation each
        for (var j = 0u; j < 4u; j++) {
            let e = tid * 4u + j;  // 0..1023
            let r = e / KS;
            let c = e % KS;
            let k = k0 + c;
            var xv = 0.0;
            if (m0 + r < p.M && k < p.K) {
                xv = x[p.x_off + (m0 + r) * p.lda + k];
            }
            xs[c * TILE + r] = xv;
            var wv = 0.0;
            if (n0 + r < p.N && k < p.K) {
                wv = weight((n0 + r) * p.K + k);
            }
            ws[c * TILE + r] = wv;
        }
        workgroupBarrier();
        for (var c = 0u; c < KS; c++) {
            let a = vec4<f32>(xs[c * TILE + tm], xs[c * TILE + tm + 1u], xs[c * TILE + tm + 2u], xs[c * TILE + tm + 3u]);
            let b = vec4<f32>(ws[c * TILE + tn], ws[c * TILE + tn + 1u], ws[c * TILE + tn + 2u], ws[c * TILE + tn + 3u]);
            for (var i = 0u; i < 4u; i++) {
                acc[i * 4u + 0u] += a[i] * b.x;
                acc[i * 4u + 1u] += a[i] * b.y;
                acc[i * 4u + 2u] += a[i] * b.z;
                acc[i * 4u + 3u] += a[i] * b.w;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            let m = m0 + tm + i;
            let n = n0 + tn + j;
            if (m < p.M && n < p.N) {
                epilogue(m, n, acc[i * 4u + j]);
            }
        }
    }
}

const MV_ROWS: u32 = 8u;   // output columns per workgroup
const MV_LANES: u32 = 32u; // invocations per output column
const MV_MAX_M: u32 = 4u;
var<workgroup> red: array<f32, 1024>;  // [MV_MAX_M][256]

@compute @workgroup_size(256)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) tid: u32) {
    let group = wid.x + wid.y * nwg.x;
    let n = group * MV_ROWS + tid / MV_LANES;
    let lane = tid % MV_LANES;
    var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    if (n < p.N) {
        let half_k = p.K / 2u;
        let row = n * half_k;  // first weight word of row n (K even)
        for (var j = lane; j < half_k; j += MV_LANES) {
            var w0: f32;
            var w1: f32;
            if (W_BF16) {
                let word = w[row + j];
                w0 = bitcast<f32>(word << 16u);
                w1 = bitcast<f32>(word & 0xffff0000u);
            } else {
                w0 = bitcast<f32>(w[2u * (row + j)]);
                w1 = bitcast<f32>(w[2u * (row + j) + 1u]);
            }
            for (var m = 0u; m < p.M; m++) {
                let xi = p.x_off + m * p.lda + 2u * j;
                acc[m] += x[xi] * w0 + x[xi + 1u] * w1;
            }
        }
    }
    for (var m = 0u; m < MV_MAX_M; m++) {
        red[m * 256u + tid] = acc[m];
    }
    workgroupBarrier();
    for (var s = MV_LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            for (var m = 0u; m < MV_MAX_M; m++) {
                red[m * 256u + tid] += red[m * 256u + tid + s];
            }
        }
        workgroupBarrier();
    }
    if (lane == 0u && n < p.N) {
        for (var m = 0u; m < p.M; m++) {
            epilogue(m, n, red[m * 256u + tid]);
        }
    }
}

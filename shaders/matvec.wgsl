// matvec.wgsl — decode-time linear layers (M <= 4 rows) with BF16 weights, fused prologue/epilogue.
//
//   matvec:         y[m, n] = act( sum_k xn[m, k] * W[n, k] + b[n] )  (+ y[m, n] if accumulate)
//   matvec_swiglu:  y[m, n] = silu( sum_k xn[m, k] * W[n, k] ) * ( sum_k xn[m, k] * Wb[n, k] )
//   matvec_qkv:     y[m, n] = sum_k xn[m, k] * [W; Wb; Wc][n, k]   (three matrices stacked by rows:
//                   n < n1 from W, n < n1 + n2 from Wb, the rest from Wc: q, k and v in one pass)
//   where xn = x                                             when norm == 0
//         xn = x * inverseSqrt(mean_k(x^2) + eps) * g        when norm == 1 (RMSNorm folded in)
//
// Folding the norm, the SwiGLU and the residual add into the weight-streaming kernel saves the
// dispatches (and their barriers) between them: a decoder layer is 6 dispatches, not 14. The
// weights keep their checkpoint layout (no load-time concatenation), so the GGUF path can mirror it.
//
// Bindings
//   0  params  uniform   Params
//   1  x       vec4<f32> [M, ldx/4] from element x_off (x_off, ldx multiples of 4)
//   2  w       vec4<u32> [N, K/8]: BF16 words, 8 weights per vec4 (K a multiple of 8)
//   3  bias    f32       [N] from b_off (has_bias)
//   4  g       f32       [K] RMSNorm weight (norm == 1)
//   5  y       f32       [M, ldy] from y_off
//   6  wb      vec4<u32> [.., K/8] second weight (matvec_swiglu: [N, K/8]; matvec_qkv: [n2, K/8])
//   7  wc      vec4<u32> [.., K/8] third weight (matvec_qkv: [N - n1 - n2, K/8])
//
// Work split: ROWS output columns per workgroup of 256 invocations, LANES = 256 / ROWS per column;
// a column's lanes read consecutive 16-byte weight vectors (coalesced), accumulate in f32, then
// reduce through workgroup memory. With norm, every workgroup first reduces sum(x^2) itself (x is
// a few KiB and stays in cache). groups = ceil(N / ROWS), split over x/y.

override ROWS: u32 = 8u;

struct Params {
    M: u32,
    N: u32,
    K: u32,
    x_off: u32,
    ldx: u32,
    y_off: u32,
    ldy: u32,
    b_off: u32,
    has_bias: u32,
    act: u32,
    accumulate: u32,
    norm: u32,
    eps: f32,
    n1: u32,
    n2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> g: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read> wb: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> wc: array<vec4<u32>>;

const MAX_M: u32 = 4u;
var<workgroup> red: array<vec4<f32>, 256>;  // per-invocation partial sums, one lane per m
var<workgroup> inv_rms: vec4<f32>;

fn lo(v: u32) -> f32 {
    return bitcast<f32>(v << 16u);
}

fn hi(v: u32) -> f32 {
    return bitcast<f32>(v & 0xffff0000u);
}

// dot of 8 activations (two vec4) with the 8 BF16 weights packed in one vec4<u32>
fn dot8(a: vec4<f32>, b: vec4<f32>, q: vec4<u32>) -> f32 {
    return dot(a, vec4<f32>(lo(q.x), hi(q.x), lo(q.y), hi(q.y))) + dot(b, vec4<f32>(lo(q.z), hi(q.z), lo(q.w), hi(q.w)));
}

// #include "_epilogue.wgsl"

// Sum of squares of each of the M rows of x, reduced over the workgroup -> inv_rms.
fn norm_prologue(tid: u32) {
    var ss = vec4<f32>(0.0);
    let k4 = p.K / 4u;
    for (var m = 0u; m < p.M; m++) {
        let base = (p.x_off + m * p.ldx) / 4u;
        var s = 0.0;
        for (var j = tid; j < k4; j += 256u) {
            let v = x[base + j];
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
    if (tid == 0u) {
        inv_rms = inverseSqrt(red[0] / f32(p.K) + vec4<f32>(p.eps));
    }
    workgroupBarrier();
}

// activations 8j..8j+7 of row m, normalised when p.norm != 0
fn xpair(m: u32, j: u32, inv: f32) -> array<vec4<f32>, 2> {
    let base = (p.x_off + m * p.ldx) / 4u + 2u * j;
    var a = x[base];
    var b = x[base + 1u];
    if (p.norm != 0u) {
        a = a * inv * g[2u * j];
        b = b * inv * g[2u * j + 1u];
    }
    return array<vec4<f32>, 2>(a, b);
}

fn reduce_lanes(tid: u32, lane: u32, lanes: u32) {
    workgroupBarrier();
    for (var s = lanes / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            red[tid] += red[tid + s];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn matvec(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) tid: u32) {
    let lanes = 256u / ROWS;
    let n = (wid.x + wid.y * nwg.x) * ROWS + tid / lanes;
    let lane = tid % lanes;
    if (p.norm != 0u) {
        norm_prologue(tid);
    }
    let inv = inv_rms;
    var acc = vec4<f32>(0.0);
    if (n < p.N) {
        let k8 = p.K / 8u;
        let row = n * k8;
        for (var j = lane; j < k8; j += lanes) {
            let q = w[row + j];
            for (var m = 0u; m < p.M; m++) {
                let xs = xpair(m, j, inv[m]);
                acc[m] += dot8(xs[0], xs[1], q);
            }
        }
    }
    red[tid] = acc;
    reduce_lanes(tid, lane, lanes);
    if (lane == 0u && n < p.N) {
        let r = red[tid];
        for (var m = 0u; m < p.M; m++) {
            epilogue(m, n, r[m]);
        }
    }
}

var<workgroup> red3: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn matvec_swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) tid: u32) {
    let lanes = 256u / ROWS;
    let n = (wid.x + wid.y * nwg.x) * ROWS + tid / lanes;
    let lane = tid % lanes;
    if (p.norm != 0u) {
        norm_prologue(tid);
    }
    let inv = inv_rms;
    var acc1 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    if (n < p.N) {
        let k8 = p.K / 8u;
        let row = n * k8;
        for (var j = lane; j < k8; j += lanes) {
            let q1 = w[row + j];
            let q3 = wb[row + j];
            for (var m = 0u; m < p.M; m++) {
                let xs = xpair(m, j, inv[m]);
                acc1[m] += dot8(xs[0], xs[1], q1);
                acc3[m] += dot8(xs[0], xs[1], q3);
            }
        }
    }
    red[tid] = acc1;
    red3[tid] = acc3;
    workgroupBarrier();
    for (var s = lanes / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            red[tid] += red[tid + s];
            red3[tid] += red3[tid + s];
        }
        workgroupBarrier();
    }
    if (lane == 0u && n < p.N) {
        let a = red[tid];
        let b = red3[tid];
        for (var m = 0u; m < p.M; m++) {
            y[p.y_off + m * p.ldy + n] = a[m] / (1.0 + exp(-a[m])) * b[m];
        }
    }
}

@compute @workgroup_size(256)
fn matvec_qkv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) tid: u32) {
    let lanes = 256u / ROWS;
    let n = (wid.x + wid.y * nwg.x) * ROWS + tid / lanes;
    let lane = tid % lanes;
    if (p.norm != 0u) {
        norm_prologue(tid);
    }
    let inv = inv_rms;
    var acc = vec4<f32>(0.0);
    if (n < p.N) {
        let k8 = p.K / 8u;
        for (var j = lane; j < k8; j += lanes) {
            var q: vec4<u32>;
            if (n < p.n1) {
                q = w[n * k8 + j];
            } else if (n < p.n1 + p.n2) {
                q = wb[(n - p.n1) * k8 + j];
            } else {
                q = wc[(n - p.n1 - p.n2) * k8 + j];
            }
            for (var m = 0u; m < p.M; m++) {
                let xs = xpair(m, j, inv[m]);
                acc[m] += dot8(xs[0], xs[1], q);
            }
        }
    }
    red[tid] = acc;
    reduce_lanes(tid, lane, lanes);
    if (lane == 0u && n < p.N) {
        let r = red[tid];
        for (var m = 0u; m < p.M; m++) {
            y[p.y_off + m * p.ldy + n] = r[m];
        }
    }
}

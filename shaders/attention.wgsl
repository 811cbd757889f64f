// attention.wgsl — causal sliding-window attention over a ring-buffer KV cache (GQA).
//
//   out[r, h, :] = sum_j softmax_j( q[r, h, :] . k[j, h / group, :] * scale ) v[j, h / group, :]
//   over key positions j with  pos - window < j <= pos,  pos = pos0 + r   (the window counts the
//   query itself: spec §4.2 / HF masking `kv_idx > q_idx - sliding_window`), group = n_heads / n_kv_heads.
//
// Key position j lives in cache slot j % cap; the caller writes the new keys first and keeps
// cap >= window + rows - 1 so no visible key has been overwritten.
//
// Bindings
//   0  params  uniform  Params
//   1  q       f32      [rows, ldq] from q_off; head h at columns h*head_dim
//   2  kc      u32      [cap, n_kv_heads*head_dim] f32 bits, or f16 pairs with KV_F16 (rope_qkv.wgsl)
//   3  vc      u32      like kc
//   4  out     f32      [rows, ldo] from o_off; head h at columns h*head_dim
//
// Work split: one workgroup of 128 invocations per (row, head). Keys are walked in tiles of 128:
// each invocation scores one key, then every invocation owns output dims tid and tid+128 and
// accumulates p_j * v_j with an online (running-max) softmax. head_dim <= 256.

struct Params {
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    window: u32,
    cap: u32,
    ldq: u32,
    q_off: u32,
    ldo: u32,
    o_off: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<u32>;
@group(0) @binding(3) var<storage, read> vc: array<u32>;

override KV_F16: bool = false;

fn k_at(i: u32) -> f32 {
    if (KV_F16) {
        return unpack2x16float(kc[i / 2u])[i % 2u];
    }
    return bitcast<f32>(kc[i]);
}

fn v_at(i: u32) -> f32 {
    if (KV_F16) {
        return unpack2x16float(vc[i / 2u])[i % 2u];
    }
    return bitcast<f32>(vc[i]);
}
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const T: u32 = 128u;
var<workgroup> qs: array<f32, 256>;
var<workgroup> prob: array<f32, 128>;

@compute @workgroup_size(128)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) tid: u32) {
    let flat = wid.x + wid.y * nwg.x;
    if (flat >= p.rows * p.n_heads) {
        return;  // whole workgroup leaves together
    }
    let r = flat / p.n_heads;
    let h = flat % p.n_heads;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let hd = p.head_dim;
    let kv_ld = p.n_kv_heads * hd;
    let qb = p.q_off + r * p.ldq + h * hd;
    for (var d = tid; d < hd; d += T) {
        qs[d] = q[qb + d];
    }
    let pos = p.pos0 + r;
    var lo = 0u;
    if (pos + 1u > p.window) {
        lo = pos + 1u - p.window;
    }
    var m = -3.0e38;
    var l = 0.0;
    var acc0 = 0.0;
    var acc1 = 0.0;
    workgroupBarrier();
    for (var t0 = lo; t0 <= pos; t0 += T) {
        let j = t0 + tid;
        var s = -3.0e38;
        if (j <= pos) {
            let kb = (j % p.cap) * kv_ld + kvh * hd;
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) {
                dot += qs[d] * k_at(kb + d);
            }
            s = dot * p.scale;
        }
        prob[tid] = s;
        workgroupBarrier();
        let n = min(T, pos + 1u - t0);
        var mt = m;
        for (var i = 0u; i < n; i++) {
            mt = max(mt, prob[i]);
        }
        workgroupBarrier();
        prob[tid] = select(0.0, exp(s - mt), j <= pos);
        workgroupBarrier();
        let corr = exp(m - mt);
        l = l * corr;
        acc0 = acc0 * corr;
        acc1 = acc1 * corr;
        for (var i = 0u; i < n; i++) {
            let pj = prob[i];
            l += pj;
            let vb = ((t0 + i) % p.cap) * kv_ld + kvh * hd;
            if (tid < hd) {
                acc0 += pj * v_at(vb + tid);
            }
            if (tid + T < hd) {
                acc1 += pj * v_at(vb + tid + T);
            }
        }
        m = mt;
        workgroupBarrier();
    }
    let ob = p.o_off + r * p.ldo + h * hd;
    if (tid < hd) {
        out[ob + tid] = acc0 / l;
    }
    if (tid + T < hd) {
        out[ob + tid + T] = acc1 / l;
    }
}

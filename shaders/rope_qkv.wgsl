// rope_qkv.wgsl — RoPE on q and k, and the KV-cache append, in one pass over a fused qkv row block.
//
//   qkv[r] = [q (n_heads*hd) | k (n_kv*hd) | v (n_kv*hd)]        (one row per position pos0 + r)
//   q heads: rotated in place;  k heads: rotated, written to kc[(pos0 + r) % cap];
//   v: copied to vc[(pos0 + r) % cap].
//   rotation (interleaved pairs, spec §1.2): (a, b) <- (a cos - b sin, a sin + b cos) with (cos, sin)
//   from the host's float64 table of the row's position (see rope.wgsl).
//   KV ring elements: f32 (bits stored as u32), or with KV_F16 two f16 per u32 (pack2x16float,
//   element 2i in the low half), clamped to the finite f16 range first (out-of-range packing is
//   indeterminate in WGSL). Each invocation owns an even/odd pair, so a pair is one u32 store.
//
// Bindings
//   0  params  uniform  Params
//   1  table   f32      [rows, hd/2, 2]
//   2  qkv     f32      [rows, ld] from element off
//   3  kc      u32      [cap, n_kv*hd] f32 bits, or [cap, n_kv*hd/2] f16 pairs with KV_F16
//   4  vc      u32      like kc
//   5  slots   u32      [rows] rope_qkv_slots only (bind anything for rope_qkv): row r's k and v go to
//                       ring slot slots[r] instead of (pos0 + r) % cap (the engine's encoder: many
//                       streams' rows, each stream's ring in one pool)
//
// Work split: one invocation per (row, pair) over the q and k heads (n_heads + n_kv pairs of hd/2
// each), the same invocation also copying v's two elements at that pair index when it lies in a k
// head; 256 per workgroup, flat index over x/y.

struct Params {
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    ld: u32,
    off: u32,
    pos0: u32,
    cap: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(3) var<storage, read_write> kc: array<u32>;
@group(0) @binding(4) var<storage, read_write> vc: array<u32>;
@group(0) @binding(5) var<storage, read> slots: array<u32>;

override KV_F16: bool = false;
const F16_MAX: f32 = 65504.0;

fn store_k(i: u32, a: f32, b: f32) {  // elements i, i+1 (i even)
    if (KV_F16) {
        kc[i / 2u] = pack2x16float(clamp(vec2<f32>(a, b), vec2<f32>(-F16_MAX), vec2<f32>(F16_MAX)));
    } else {
        kc[i] = bitcast<u32>(a);
        kc[i + 1u] = bitcast<u32>(b);
    }
}

fn store_v(i: u32, a: f32, b: f32) {
    if (KV_F16) {
        vc[i / 2u] = pack2x16float(clamp(vec2<f32>(a, b), vec2<f32>(-F16_MAX), vec2<f32>(F16_MAX)));
    } else {
        vc[i] = bitcast<u32>(a);
        vc[i + 1u] = bitcast<u32>(b);
    }
}

@compute @workgroup_size(256)
fn rope_qkv(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    rotate(gid.x + gid.y * nwg.x * 256u, false);
}

@compute @workgroup_size(256)
fn rope_qkv_slots(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    rotate(gid.x + gid.y * nwg.x * 256u, true);
}

fn rotate(idx: u32, slotted: bool) {
    let half_d = p.head_dim / 2u;
    let per_row = (p.n_heads + p.n_kv_heads) * half_d;
    if (idx >= p.rows * per_row) {
        return;
    }
    let r = idx / per_row;
    let rem = idx % per_row;
    let h = rem / half_d;  // q heads first, then k heads
    let i = rem % half_d;
    let t = (r * half_d + i) * 2u;
    let c = table[t];
    let s = table[t + 1u];
    let e = p.off + r * p.ld + h * p.head_dim + 2u * i;
    let a = qkv[e];
    let b = qkv[e + 1u];
    let ra = a * c - b * s;
    let rb = a * s + b * c;
    if (h < p.n_heads) {
        qkv[e] = ra;
        qkv[e + 1u] = rb;
    } else {
        let kv_w = p.n_kv_heads * p.head_dim;
        let col = (h - p.n_heads) * p.head_dim + 2u * i;
        var slot = (p.pos0 + r) % p.cap;
        if (slotted) {
            slot = slots[r];
        }
        let dst = slot * kv_w + col;
        store_k(dst, ra, rb);
        let v = e + kv_w;  // v sits kv_w columns after k in the row
        store_v(dst, qkv[v], qkv[v + 1u]);
    }
}

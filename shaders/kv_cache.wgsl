// kv_cache.wgsl — append new keys and values to a ring-buffer KV cache.
//
//   kc[(pos0 + r) % cap, c] = k[k_off + r*ldk + c],  vc[...] = v[v_off + r*ldk + c]   for r < rows, c < width
//
// Bindings
//   0  params  uniform  Params
//   1  k       f32      [rows, ldk] from k_off
//   2  v       f32      [rows, ldk] from v_off
//   3  kc      f32      [cap, width]
//   4  vc      f32      [cap, width]
//
// Work split: one invocation per (row, column); 256 per workgroup, flat index over x/y.

struct Params {
    rows: u32,
    width: u32,
    ldk: u32,
    k_off: u32,
    v_off: u32,
    pos0: u32,
    cap: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> kc: array<f32>;
@group(0) @binding(4) var<storage, read_write> vc: array<f32>;

@compute @workgroup_size(256)
fn kv_write(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.rows * p.width) {
        return;
    }
    let r = idx / p.width;
    let c = idx % p.width;
    let dst = ((p.pos0 + r) % p.cap) * p.width + c;
    kc[dst] = k[p.k_off + r * p.ldk + c];
    vc[dst] = v[p.v_off + r * p.ldk + c];
}

// kv_cache.wgsl — ring-buffer KV caches: append new rows, and copy positions between two rings.
//
//   kv_write:   kc[(slot0 + r) % cap, c] = k[k_off + r*ld + c],  vc[...] = v[v_off + r*ld + c]
//   ring_copy:  kc[(slot0 + r) % cap, c] = k[((src_slot0 + r) % src_cap) * width + c],  vc likewise from v
//               (the same positions of a ring with another capacity: the encoder keeps each layer's
//               last window - 1 positions in a ring of its own and attends through one shared ring)
//   for r < rows, c < width. Words are copied as u32 bits: f32 values and f16 pairs alike, exactly
//   (a float copy could quiet NaN bit patterns).
//
// Bindings
//   0  params  uniform  Params
//   1  k       u32      kv_write: [rows, ld] from k_off; ring_copy: source key ring [src_cap, width]
//   2  v       u32      kv_write: [rows, ld] from v_off; ring_copy: source value ring [src_cap, width]
//   3  kc      u32      destination key ring [cap, width]
//   4  vc      u32      destination value ring [cap, width]
//
// Work split: one invocation per (row, word); 256 per workgroup, flat index over x/y.

struct Params {
    rows: u32,
    width: u32,      // u32 words per row
    ld: u32,         // kv_write: row stride of k and v
    k_off: u32,      // kv_write: first element of k / v
    v_off: u32,
    slot0: u32,      // destination slot of row 0 (< cap)
    cap: u32,
    src_slot0: u32,  // ring_copy: source slot of row 0 (< src_cap)
    src_cap: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> k: array<u32>;
@group(0) @binding(2) var<storage, read> v: array<u32>;
@group(0) @binding(3) var<storage, read_write> kc: array<u32>;
@group(0) @binding(4) var<storage, read_write> vc: array<u32>;

fn ring_slot(slot0: u32, r: u32, cap: u32) -> u32 {  // (slot0 + r) % cap without u32 overflow, r < cap
    let s = slot0 + r;
    return select(s, s - cap, s >= cap);
}

@compute @workgroup_size(256)
fn kv_write(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.rows * p.width) {
        return;
    }
    let r = idx / p.width;
    let c = idx % p.width;
    let dst = ring_slot(p.slot0, r, p.cap) * p.width + c;
    kc[dst] = k[p.k_off + r * p.ld + c];
    vc[dst] = v[p.v_off + r * p.ld + c];
}

@compute @workgroup_size(256)
fn ring_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.rows * p.width) {
        return;
    }
    let r = idx / p.width;
    let c = idx % p.width;
    let src = ring_slot(p.src_slot0, r, p.src_cap) * p.width + c;
    let dst = ring_slot(p.slot0, r, p.cap) * p.width + c;
    kc[dst] = k[src];
    vc[dst] = v[src];
}

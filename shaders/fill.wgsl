// fill.wgsl — deterministic pseudo-random weights, generated on the GPU (benchmarks only).
//
//   word i of `out` holds two BF16 values (mode 0) or one F32 value (mode 1), each uniform in
//   [-scale, scale) from a 32-bit integer hash of (seed, element index) — full-size synthetic
//   checkpoints cost no host memory or PCIe traffic.
//
// Bindings
//   0  params  uniform  Params
//   1  out     u32      [n_words]
//
// Work split: one invocation per word; 256 per workgroup, flat index over x/y.

struct Params {
    n_words: u32,
    seed: u32,
    scale: f32,
    mode: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

fn hash(x: u32) -> u32 {  // lowbias32 (Chris Wellons)
    var v = x;
    v ^= v >> 16u;
    v *= 0x7feb352du;
    v ^= v >> 15u;
    v *= 0x846ca68bu;
    v ^= v >> 16u;
    return v;
}

fn uniform_at(e: u32) -> f32 {
    let h = hash(e ^ hash(p.seed));
    return (f32(h >> 8u) * (1.0 / 8388608.0) - 1.0) * p.scale;
}

@compute @workgroup_size(256)
fn fill(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n_words) {
        return;
    }
    if (p.mode == 0u) {
        let a = bitcast<u32>(uniform_at(2u * i)) >> 16u;
        let b = bitcast<u32>(uniform_at(2u * i + 1u)) & 0xffff0000u;
        out[i] = a | b;
    } else {
        out[i] = bitcast<u32>(uniform_at(i));
    }
}

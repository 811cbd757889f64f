// fill.wgsl — deterministic pseudo-random weights, generated on the GPU (benchmarks only).
//
//   word i of `out` holds, by p.mode:
//     0  two BF16 values, each uniform in [-scale, scale)
//     1  one F32 value, uniform in [-scale, scale)
//     2  two f16 block scales (low half: element 2i), each +-scale * (1 + u/4), u uniform in
//        [-1, 1), sign random: the scale region of a Q4_0/Q8_0 weight chunk (ops_quant.py layout);
//        the caller keeps scale * [0.75, 1.25] inside the normal f16 range
//     3  32 random bits: Q4_0/Q8_0 quant bytes (every nibble / int8 value equally likely)
//   from a 32-bit integer hash of (seed, element index) — full-size synthetic checkpoints cost no
//   host memory or PCIe traffic.
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

fn bits_at(e: u32) -> u32 {
    return hash(e ^ hash(p.seed));
}

fn uniform_of(h: u32) -> f32 {  // [-1, 1) from the top 24 bits
    return f32(h >> 8u) * (1.0 / 8388608.0) - 1.0;
}

fn uniform_at(e: u32) -> f32 {
    return uniform_of(bits_at(e)) * p.scale;
}

fn block_scale_at(e: u32) -> f32 {
    let h = bits_at(e);
    let sign = select(1.0, -1.0, (h & 1u) == 1u);  // bit 0: not among the 24 bits of the magnitude
    return sign * p.scale * (1.0 + 0.25 * uniform_of(h));
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
    } else if (p.mode == 1u) {
        out[i] = bitcast<u32>(uniform_at(i));
    } else if (p.mode == 2u) {
        out[i] = pack2x16float(vec2<f32>(block_scale_at(2u * i), block_scale_at(2u * i + 1u)));
    } else {
        out[i] = bits_at(i);
    }
}

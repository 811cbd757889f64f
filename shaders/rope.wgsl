// rope.wgsl — rotary position embedding, interleaved ("GPT-J") pairs, in place.
//
//   (v[2i], v[2i+1]) <- (v[2i] cos a - v[2i+1] sin a,  v[2i] sin a + v[2i+1] cos a),  a = pos * theta^(-2i/d)
//
// The Mistral-native checkpoint orders q/k rows for interleaved pairs (spec §1.2), so no weight
// permutation is needed. cos/sin come from a host-made table computed in float64 with the angle
// reduced modulo 2*pi, so positions stay exact however long a stream runs (a f32 pos * freq loses
// ~pos * 6e-8 rad).
//
// Bindings
//   0  params  uniform  Params
//   1  table   f32      [rows, head_dim/2, 2] (cos, sin) for each row's position
//   2  v       f32      [rows, ld] from element off; heads of head_dim at columns 0..n_heads*head_dim
//
// Work split: one invocation per (row, head, pair); 256 per workgroup, flat index over x/y.

struct Params {
    rows: u32,
    n_heads: u32,
    head_dim: u32,
    ld: u32,
    off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256)
fn rope(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    let half_d = p.head_dim / 2u;
    let per_row = p.n_heads * half_d;
    if (idx >= p.rows * per_row) {
        return;
    }
    let r = idx / per_row;
    let rem = idx % per_row;
    let h = rem / half_d;
    let i = rem % half_d;
    let t = (r * half_d + i) * 2u;
    let c = table[t];
    let s = table[t + 1u];
    let e = p.off + r * p.ld + h * p.head_dim + 2u * i;
    let a = v[e];
    let b = v[e + 1u];
    v[e] = a * c - b * s;
    v[e + 1u] = a * s + b * c;
}

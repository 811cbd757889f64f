// elementwise.wgsl — small per-element ops of the graph.
//
// swiglu:    a[r, i] = silu(a[r, i]) * b[r, i]   in place               (SwiGLU FFN, spec §4.2/§5.2)
//            a = x W1^T and b = x W3^T, both [rows, dim] contiguous.
//
// Bindings
//   0  params  uniform  Params
//   1  a       f32      [n]   gate in, result out
//   2  b       f32      [n]   up
//
// Work split: one invocation per element; 256 per workgroup, flat index over x/y.

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

@compute @workgroup_size(256)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let g = a[i];
    a[i] = g / (1.0 + exp(-g)) * b[i];
}

// argmax.wgsl — greedy token choice on the GPU.
//
//   token = argmax_i logits[i]   (first index among equal maxima, as torch.argmax)
//
// Two passes: `partial` reduces blocks of 1024 logits to (value, index) pairs, `finish` reduces
// those pairs in one workgroup and writes the token id into tokens[out_index], where the next
// decode step's embedding gather reads it (no host round trip).
//
// Bindings
//   0  params   uniform  Params
//   1  logits   f32      [n] from element logits_off
//   2  part_v   f32      [ceil(n/1024)]   (read_write scratch)
//   3  part_i   u32      [ceil(n/1024)]   (read_write scratch)
//   4  tokens   u32      [..]             token log; tokens[out_index] is written by `finish`
//
// Work split: `partial` one workgroup of 256 per 1024 logits (4 per invocation), tree reduction;
// `finish` one workgroup of 256 striding over the partials.

struct Params {
    n: u32,
    n_parts: u32,
    out_index: u32,
    logits_off: u32,  // element of logits where this vector starts (a stream's row in a batch)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> part_v: array<f32>;
@group(0) @binding(3) var<storage, read_write> part_i: array<u32>;
@group(0) @binding(4) var<storage, read_write> tokens: array<u32>;

var<workgroup> rv: array<f32, 256>;
var<workgroup> ri: array<u32, 256>;

const NONE: u32 = 0xffffffffu;  // "no candidate yet" (scratch slots and invocations past n)

// (v, i) beats (bv, bi): a larger value, or an equal one at a smaller index. Any real index beats
// NONE whatever its value, so logits that are all -inf (or all -FLT_MAX) still give index 0.
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return i != NONE && (bi == NONE || v > bv || (v == bv && i < bi));
}

fn reduce(tid: u32) {
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (tid < s && better(rv[tid + s], ri[tid + s], rv[tid], ri[tid])) {
            rv[tid] = rv[tid + s];
            ri[tid] = ri[tid + s];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    var bv = -3.4e38;
    var bi = NONE;
    for (var j = 0u; j < 4u; j++) {
        let i = wid.x * 1024u + j * 256u + tid;
        if (i < p.n && better(logits[p.logits_off + i], i, bv, bi)) {
            bv = logits[p.logits_off + i];
            bi = i;
        }
    }
    rv[tid] = bv;
    ri[tid] = bi;
    workgroupBarrier();
    reduce(tid);
    if (tid == 0u) {
        part_v[wid.x] = rv[0];
        part_i[wid.x] = ri[0];
    }
}

@compute @workgroup_size(256)
fn finish(@builtin(local_invocation_index) tid: u32) {
    var bv = -3.4e38;
    var bi = NONE;
    for (var i = tid; i < p.n_parts; i += 256u) {
        if (better(part_v[i], part_i[i], bv, bi)) {
            bv = part_v[i];
            bi = part_i[i];
        }
    }
    rv[tid] = bv;
    ri[tid] = bi;
    workgroupBarrier();
    reduce(tid);
    if (tid == 0u) {
        tokens[p.out_index] = ri[0];
    }
}

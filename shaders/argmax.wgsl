// argmax.wgsl — greedy token choice on the GPU, with the chosen token's probability.
//
//   token = argmax_i logits[i]   (first index among equal maxima, as torch.argmax)
//   prob  = softmax(logits)[token] = 1 / sum_i exp(logits[i] - logits[token])
//
// Two passes: `partial` reduces blocks of 1024 logits to (value, index, sum) triples, `finish`
// reduces those in one workgroup and writes the token id into tokens[out_index], where the next
// decode step's embedding gather reads it (no host round trip). The probability rides along in the
// same reductions (no extra pass): every (value, index) candidate carries sum exp(x - value) over
// the logits it has seen, rescaled by exp(old - new) when a larger value takes over (the online
// softmax), and `finish` writes 1 / sum as f32 bits into tokens[probs_off + out_index]: the token
// ring and its probability ring are one buffer, so the host's existing readback of the ring brings
// both back. probs_off = 0xffffffff writes no probability.
//
// Non-finite logits: the index is chosen exactly as without the probability. exp(x - value) is
// taken as 1 where x == value, so all -inf gives 1/n and +inf maxima share the mass equally (-inf
// entries get none); a NaN logit gives a NaN probability.
//
// Bindings
//   0  params   uniform  Params
//   1  logits   f32      [n] from element logits_off
//   2  part_v   f32      [ceil(n/1024)]   (read_write scratch)
//   3  part_i   u32      [ceil(n/1024)]   (read_write scratch)
//   4  tokens   u32      [..]             token log; tokens[out_index] is written by `finish`, and
//                                         tokens[probs_off + out_index] (f32 bits) unless probs_off
//                                         is 0xffffffff
//   5  part_s   f32      [ceil(n/1024)]   (read_write scratch) each block's sum exp(x - part_v)
//
// Work split: `partial` one workgroup of 256 per 1024 logits (4 per invocation), tree reduction;
// `finish` one workgroup of 256 striding over the partials.

struct Params {
    n: u32,
    n_parts: u32,
    out_index: u32,
    logits_off: u32,  // element of logits where this vector starts (a stream's row in a batch)
    probs_off: u32,   // word of tokens where the probability ring starts; 0xffffffff: none
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> part_v: array<f32>;
@group(0) @binding(3) var<storage, read_write> part_i: array<u32>;
@group(0) @binding(4) var<storage, read_write> tokens: array<u32>;
@group(0) @binding(5) var<storage, read_write> part_s: array<f32>;

var<workgroup> rv: array<f32, 256>;
var<workgroup> ri: array<u32, 256>;
var<workgroup> rs: array<f32, 256>;

const NONE: u32 = 0xffffffffu;  // "no candidate yet" (scratch slots and invocations past n)

// (v, i) beats (bv, bi): a larger value, or an equal one at a smaller index. Any real index beats
// NONE whatever its value, so logits that are all -inf (or all -FLT_MAX) still give index 0.
fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return i != NONE && (bi == NONE || v > bv || (v == bv && i < bi));
}

// exp(a - m): the weight of a sum taken relative to `a` in a sum relative to `m`. Equal values
// weigh 1 (so -inf - -inf and inf - inf, NaN otherwise, count as equal terms).
fn rescale(a: f32, m: f32) -> f32 {
    return select(exp(a - m), 1.0, a == m);
}

// The sum of a candidate (bv, bi, bs) after merging another (v, i, s), relative to the winner's
// value. A side with no candidate (NONE) adds nothing (its placeholder value could overflow exp).
fn merged_sum(v: f32, i: u32, s: f32, bv: f32, bi: u32, bs: f32, take: bool) -> f32 {
    let m = select(bv, v, take);
    let a = select(0.0, bs * rescale(bv, m), bi != NONE);
    let b = select(0.0, s * rescale(v, m), i != NONE);
    return a + b;
}

fn reduce(tid: u32) {
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (tid < s) {
            let take = better(rv[tid + s], ri[tid + s], rv[tid], ri[tid]);
            rs[tid] = merged_sum(rv[tid + s], ri[tid + s], rs[tid + s], rv[tid], ri[tid], rs[tid], take);
            if (take) {
                rv[tid] = rv[tid + s];
                ri[tid] = ri[tid + s];
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    var bv = -3.4e38;
    var bi = NONE;
    var bs = 0.0;
    for (var j = 0u; j < 4u; j++) {
        let i = wid.x * 1024u + j * 256u + tid;
        if (i < p.n) {
            let v = logits[p.logits_off + i];
            let take = better(v, i, bv, bi);
            bs = merged_sum(v, i, 1.0, bv, bi, bs, take);
            if (take) {
                bv = v;
                bi = i;
            }
        }
    }
    rv[tid] = bv;
    ri[tid] = bi;
    rs[tid] = bs;
    workgroupBarrier();
    reduce(tid);
    if (tid == 0u) {
        part_v[wid.x] = rv[0];
        part_i[wid.x] = ri[0];
        part_s[wid.x] = rs[0];
    }
}

@compute @workgroup_size(256)
fn finish(@builtin(local_invocation_index) tid: u32) {
    var bv = -3.4e38;
    var bi = NONE;
    var bs = 0.0;
    for (var i = tid; i < p.n_parts; i += 256u) {
        let take = better(part_v[i], part_i[i], bv, bi);
        bs = merged_sum(part_v[i], part_i[i], part_s[i], bv, bi, bs, take);
        if (take) {
            bv = part_v[i];
            bi = part_i[i];
        }
    }
    rv[tid] = bv;
    ri[tid] = bi;
    rs[tid] = bs;
    workgroupBarrier();
    reduce(tid);
    if (tid == 0u) {
        tokens[p.out_index] = ri[0];
        if (p.probs_off != NONE) {
            // the winner's own term is exactly 1, so the sum is >= 1 and the probability in (0, 1]
            tokens[p.probs_off + p.out_index] = bitcast<u32>(1.0 / rs[0]);
        }
    }
}

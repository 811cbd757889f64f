// attention_decode.wgsl — one query row (a decode step) over a long KV ring: split-K ("flash decoding"),
// with rope_qkv's work for that row folded in.
//
//   out[h, :] = sum_j softmax_j( rot(q[h]) . k[j, h / G] * scale ) v[j, h / G],   pos - window < j <= pos
//   (G = n_heads / n_kv_heads; the window counts the query itself, as attention.wgsl).
//   The row's own key and value (j = pos) come from the unrotated qkv row, not the ring: k[pos] =
//   rot(k_row), v[pos] = v_row, rounded as the ring stores them (f16 with KV_F16, clamped to the
//   finite range) and written to ring slot pos % cap here, for later steps; rot is rope_qkv.wgsl's
//   interleaved-pair rotation with the host's (cos, sin) table of position pos. No other workgroup
//   of the dispatch reads that slot (it held position pos - cap, outside the window), so the
//   rope_qkv dispatch of a decode step is gone (26 a step) and the qkv row is left unchanged.
//
// The visible keys are cut into chunks of 256. `partial` gives each (chunk, kv head) one workgroup
// that scores its keys against all G query heads sharing that kv head (K and V are read once per
// group, not once per query head) and writes the chunk's (max, sum, unnormalised output);
// `merge` rescales and sums the chunks per head. A step at context 8192 thus runs 32 x 8
// workgroups instead of 32 serial ones. With a single chunk (context <= 256) `partial` writes the
// output itself (merge's exp(0) = 1 rescaling is exact, so the result is the same) and merge is not run.
//
// Bindings
//   0  params  uniform    Params
//   1  qkv     vec4<f32>  the step's row [q (n_heads*hd) | k (n_kv*hd) | v (n_kv*hd)] from element
//                         q_off (q_off, hd multiples of 4), unrotated
//   2  kc      vec2<u32>  [cap, n_kv*hd] key ring (position j in slot j % cap): f32 bits, 4 per two
//                         vec2s, or with KV_F16 f16 pairs, 4 per vec2 (layout: rope_qkv.wgsl)
//   3  vc      u32        [cap, n_kv*hd] value ring, f32 bits or f16 pairs
//   4  part    f32        [n_heads, n_chunks, hd + 2] scratch: (max, sum, acc[hd]) per chunk
//   5  out     f32        [n_heads*hd] from o_off
//   6  table   vec4<f32>  [hd/4] from vec4 t_off: (cos, sin) of pairs 2i, 2i + 1 of position pos
//
// Work split: partial: groups (n_chunks * value_split, n_kv_heads), 256 invocations; scoring (query
// heads taken 4 at a time) gives each key two invocations with half the dims each (one key per pair
// up to 128 keys, two adjacent keys per pair above: H100, f16 ring, one key per invocation before,
// context 64 / 150 / 1024: 13.1-13.6 / 13.4-13.6 / 24.4-24.6 -> 11.5-12.0 / 12.7-13.3 / 23.4-23.7 us);
// the value_split workgroups of one (chunk, kv head) all
// score the chunk (the keys come from L2 for all but the first) and each accumulates hd / value_split
// of the value dims: with few chunks the value walk is a chain of load latencies on a few SMs (one
// chunk x 8 kv heads = 8 workgroups), so more workgroups with shorter walks finish sooner; with
// many chunks the repeated scoring costs more than it saves (ops.decode_value_split: H100, f16
// ring, split 4: context 150 14.6 -> 12.3 us, 1024 28.4 -> 22.1, but 8192 57.9 -> 98). For the
// values, hd/(2 value_split) invocations per key row (two dims each, all 4
// heads) and 256 / that many key groups striding over the chunk's keys: every invocation's value loads are
// independent and coalesced along the row, and the key groups' partial sums are added in workgroup
// memory at the end; each invocation issues eight (then four) keys' loads before using any. (A tiled copy of
// values into workgroup memory, or one invocation walking all keys per dim, both serialise on load
// latency: H100, context 1024, f16 ring: 47 -> 29 us a call with the four-key unroll.) merge: groups (n_heads), 64 invocations over hd.

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos: u32,
    window: u32,
    cap: u32,
    n_chunks: u32,
    q_off: u32,
    o_off: u32,
    scale: f32,
    value_split: u32,  // workgroups per (chunk, kv head); hd / value_split is even
    t_off: u32,  // this step's (cos, sin) row in table, in vec4 units (the host keeps a ring of rows)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> kc: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read_write> vc: array<u32>;

override KV_F16: bool = false;
// head_dim as a pipeline constant (must equal p.head_dim): the score loop over hd/4 key vectors and
// the value phase's divisions get fixed trip counts and divisors, so drivers unroll them and keep
// every key load in flight (with a runtime bound each loaded key waited for the previous one).
override HEAD_DIM: u32 = 128u;
override DH: u32 = (HEAD_DIM / 4u + 1u) / 2u;  // key vectors per half in the score loop

fn key4(i4: u32) -> vec4<f32> {  // key elements 4*i4 .. 4*i4+3
    if (KV_F16) {
        let w = kc[i4];
        return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
    }
    return bitcast<vec4<f32>>(vec4<u32>(kc[2u * i4], kc[2u * i4 + 1u]));
}

const F16_MAX: f32 = 65504.0;

// (a, b) <- (a cos - b sin, a sin + b cos) on the pairs (x, y) and (z, w); t = (cos0, sin0, cos1, sin1)
fn rotate4(v: vec4<f32>, t: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(v.x * t.x - v.y * t.y, v.x * t.y + v.y * t.x, v.z * t.z - v.w * t.w, v.z * t.w + v.w * t.z);
}

fn stored2(v: vec2<f32>) -> vec2<f32> {  // what the ring gives back for v
    if (KV_F16) {
        return unpack2x16float(pack2x16float(clamp(v, vec2<f32>(-F16_MAX), vec2<f32>(F16_MAX))));
    }
    return v;
}

fn row_key4(k_row: u32, d: u32) -> vec4<f32> {  // the step's own key, elements 4d .. 4d+3, as stored
    let r = rotate4(q[k_row + d], table[p.t_off + d]);
    return vec4<f32>(stored2(r.xy), stored2(r.zw));
}

fn store_key4(i4: u32, v: vec4<f32>) {  // v as stored2 gave it: f16 packing is exact
    if (KV_F16) {
        kc[i4] = vec2<u32>(pack2x16float(v.xy), pack2x16float(v.zw));
    } else {
        kc[2u * i4] = bitcast<vec2<u32>>(v.xy);
        kc[2u * i4 + 1u] = bitcast<vec2<u32>>(v.zw);
    }
}

fn store_v_pair(i: u32, v: vec2<f32>) {  // elements i, i + 1 (i even), v as stored2 gave it
    if (KV_F16) {
        vc[i / 2u] = pack2x16float(v);
    } else {
        vc[i] = bitcast<u32>(v.x);
        vc[i + 1u] = bitcast<u32>(v.y);
    }
}

fn v_pair(i: u32) -> vec2<f32> {  // value elements i, i + 1 (i even)
    if (KV_F16) {
        return unpack2x16float(vc[i / 2u]);
    }
    return bitcast<vec2<f32>>(vec2<u32>(vc[i], vc[i + 1u]));
}
@group(0) @binding(4) var<storage, read_write> part: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read> table: array<vec4<f32>>;

const CHUNK: u32 = 256u;
const HB: u32 = 4u;  // query heads per pass
// Workgroup memory, 12 KiB in all (qs does three jobs, separated by barriers):
//   prob  the step's own key [hd/4] while scoring, then [key] -> the 4 heads' probabilities
//   qs    the 4 query heads [HB][hd/4] while scoring (vec4 0..255) beside the softmax reductions
//         (256..511); then the key groups' partial sums: vec4 2 * (kg * np + lane) + i holds dim
//         2 * lane + i of key group kg, 4 heads
var<workgroup> prob: array<vec4<f32>, 256>;
var<workgroup> qs: array<vec4<f32>, 512>;

fn wrap(sl: u32) -> u32 {  // ring slot of k0 % cap + i, i < n_keys <= cap: one wrap at most
    return select(sl, sl - p.cap, sl >= p.cap);
}

fn first_key() -> u32 {
    if (p.pos + 1u > p.window) {
        return p.pos + 1u - p.window;
    }
    return 0u;
}

@compute @workgroup_size(256)
fn partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let c = wid.x / p.value_split;
    let vsplit = wid.x % p.value_split;
    let kvh = wid.y;
    let hd = HEAD_DIM;
    let dv = hd / p.value_split;  // value dims of this workgroup: vsplit * dv ..
    let hd4 = hd / 4u;
    let group = p.n_heads / p.n_kv_heads;
    let kv_w4 = p.n_kv_heads * hd4;
    let kv_w = p.n_kv_heads * hd;
    let k0 = first_key() + c * CHUNK;
    let n_keys = min(CHUNK, p.pos + 1u - k0);
    let has_row = k0 + n_keys - 1u == p.pos;  // this chunk ends with the step's own key (the last chunk)
    let n_ring = n_keys - select(0u, 1u, has_row);  // the row's own key and value are not in the ring yet
    let q4 = p.q_off / 4u;
    let k_row = q4 + (p.n_heads + kvh) * hd4;  // this kv head's k in the qkv row (vec4 index)
    // value phase layout: key group kg = tid / np takes keys kg, kg + ng, ...; its invocation `lane`
    // owns dims 2*lane and 2*lane + 1 of all 4 heads
    let np = dv / 2u;  // invocations per key row
    let ng = 256u / np;  // key groups
    let kg = tid / np;
    let lane = tid - kg * np;
    let s0 = k0 % p.cap;
    let col = kvh * hd + vsplit * dv + 2u * lane;
    // the row's own value (the same for every pass below)
    let e_own = p.q_off + (p.n_heads + p.n_kv_heads) * hd + col;  // v of the qkv row (even element)
    let v4_own = q[e_own / 4u];
    let v_own = stored2(select(v4_own.xy, v4_own.zw, (e_own & 2u) != 0u));
    // the step's own key and value into the ring, for later steps (one workgroup per kv head; no
    // workgroup of this dispatch reads that slot from the ring)
    if (has_row && vsplit == 0u) {
        if (tid < hd4) {
            store_key4((p.pos % p.cap) * kv_w4 + kvh * hd4 + tid, row_key4(k_row, tid));
        }
    }
    if (has_row && kg == 0u) {
        store_v_pair((p.pos % p.cap) * kv_w + col, v_own);
    }
    // scoring split: invocations kk and kk + 128 take the same key(s), half the dims each (hf, dims
    // d0 .. d0 + DH - 1): key kk of the chunk, or keys 2kk and 2kk + 1 when it has more than 128
    // (adjacent pairs, so only one warp has invocations with fewer keys than the rest)
    let kk = tid % 128u;
    let hf = tid / 128u;
    let d0 = hf * DH;
    let pairs = n_keys > 128u;
    let key1 = select(kk, 2u * kk, pairs);
    let key2 = 2u * kk + 1u;
    let own1 = k0 + key1 == p.pos;
    let own2 = k0 + key2 == p.pos;
    let kb1 = ((k0 + key1) % p.cap) * kv_w4 + kvh * hd4;
    let kb2 = ((k0 + key2) % p.cap) * kv_w4 + kvh * hd4;
    for (var h0 = 0u; h0 < group; h0 += HB) {
        let nh = min(HB, group - h0);
        // stage the (up to) 4 query heads of this pass, rotated
        for (var i = tid; i < HB * hd4; i += 256u) {
            let hh = i / hd4;
            var v = vec4<f32>(0.0);
            if (hh < nh) {
                v = rotate4(q[q4 + (kvh * group + h0 + hh) * hd4 + i % hd4], table[p.t_off + i % hd4]);
            }
            qs[i] = v;
        }
        // the step's own key, rotated and rounded as stored, into prob (free until the softmax), by
        // hd/4 invocations at once
        if (has_row && tid < hd4) {
            prob[tid] = row_key4(k_row, tid);
        }
        workgroupBarrier();
        // scores: each invocation takes half the dims of its key(s) (half the chain of q reads and
        // key loads of one invocation per key; with pairs each q vector read serves both keys); the
        // halves meet in qs[256..], free while scoring
        var sc1 = vec4<f32>(0.0);
        var sc2 = vec4<f32>(0.0);
        if (pairs && key2 < n_keys) {  // two keys (separate loops: a branch inside kept loads from batching)
            for (var i = 0u; i < DH; i++) {
                let d = min(d0 + i, hd4 - 1u);
                let on = select(0.0, 1.0, d0 + i < hd4);  // an odd hd/4 leaves half 1 one step short
                let k1 = select(key4(kb1 + d), prob[d], own1) * on;
                let k2 = select(key4(kb2 + d), prob[d], own2) * on;
                let qa = qs[d];
                let qb = qs[hd4 + d];
                let qc = qs[2u * hd4 + d];
                let qd = qs[3u * hd4 + d];
                sc1 += vec4<f32>(dot(qa, k1), dot(qb, k1), dot(qc, k1), dot(qd, k1));
                sc2 += vec4<f32>(dot(qa, k2), dot(qb, k2), dot(qc, k2), dot(qd, k2));
            }
        } else if (key1 < n_keys) {
            for (var i = 0u; i < DH; i++) {
                let d = min(d0 + i, hd4 - 1u);
                let k1 = select(key4(kb1 + d), prob[d], own1) * select(0.0, 1.0, d0 + i < hd4);
                sc1 += vec4<f32>(dot(qs[d], k1), dot(qs[hd4 + d], k1), dot(qs[2u * hd4 + d], k1),
                                 dot(qs[3u * hd4 + d], k1));
            }
        }
        if (hf == 1u) {
            qs[256u + key1] = sc1;
            if (pairs) {
                qs[256u + key2] = sc2;
            }
        }
        workgroupBarrier();
        if (hf == 0u) {
            qs[256u + key1] = select(vec4<f32>(-3.0e38), (sc1 + qs[256u + key1]) * p.scale, key1 < n_keys);
            // the second key, or without pairs key kk + 128 (none: every key < 128)
            let k2s = select(kk + 128u, key2, pairs);
            qs[256u + k2s] = select(vec4<f32>(-3.0e38), (sc2 + qs[256u + k2s]) * p.scale, pairs && key2 < n_keys);
        }
        workgroupBarrier();
        let s = qs[256u + tid];  // key k0 + tid
        workgroupBarrier();
        // softmax over the chunk
        for (var st = 128u; st > 0u; st >>= 1u) {
            if (tid < st) {
                qs[256u + tid] = max(qs[256u + tid], qs[256u + tid + st]);
            }
            workgroupBarrier();
        }
        let m = qs[256u];
        workgroupBarrier();
        var pr = vec4<f32>(0.0);
        if (tid < n_keys) {
            pr = exp(s - m);
        }
        prob[tid] = pr;
        qs[256u + tid] = pr;
        workgroupBarrier();
        for (var st = 128u; st > 0u; st >>= 1u) {
            if (tid < st) {
                qs[256u + tid] = qs[256u + tid] + qs[256u + tid + st];
            }
            workgroupBarrier();
        }
        let l = qs[256u];
        workgroupBarrier();
        // accumulate: every invocation's value loads are independent (no per-key barrier or tile
        // copy), then the key groups' partial sums meet in qs
        var a0 = vec4<f32>(0.0);  // dim 2*lane, heads 0..3
        var a1 = vec4<f32>(0.0);  // dim 2*lane + 1
        if (kg < ng) {
            var i = kg;
            for (; i + 7u * ng < n_ring; i += 8u * ng) {  // eight keys' loads in flight
                let va = v_pair(wrap(s0 + i) * kv_w + col);
                let vb = v_pair(wrap(s0 + i + ng) * kv_w + col);
                let vc2 = v_pair(wrap(s0 + i + 2u * ng) * kv_w + col);
                let vd = v_pair(wrap(s0 + i + 3u * ng) * kv_w + col);
                let ve = v_pair(wrap(s0 + i + 4u * ng) * kv_w + col);
                let vf = v_pair(wrap(s0 + i + 5u * ng) * kv_w + col);
                let vg = v_pair(wrap(s0 + i + 6u * ng) * kv_w + col);
                let vh = v_pair(wrap(s0 + i + 7u * ng) * kv_w + col);
                let pa = prob[i];
                let pb = prob[i + ng];
                let pc = prob[i + 2u * ng];
                let pd = prob[i + 3u * ng];
                let pe = prob[i + 4u * ng];
                let pf = prob[i + 5u * ng];
                let pg = prob[i + 6u * ng];
                let ph = prob[i + 7u * ng];
                a0 += pa * va.x + pb * vb.x + pc * vc2.x + pd * vd.x + pe * ve.x + pf * vf.x + pg * vg.x + ph * vh.x;
                a1 += pa * va.y + pb * vb.y + pc * vc2.y + pd * vd.y + pe * ve.y + pf * vf.y + pg * vg.y + ph * vh.y;
            }
            for (; i + 3u * ng < n_ring; i += 4u * ng) {  // four
                let va = v_pair(wrap(s0 + i) * kv_w + col);
                let vb = v_pair(wrap(s0 + i + ng) * kv_w + col);
                let vc2 = v_pair(wrap(s0 + i + 2u * ng) * kv_w + col);
                let vd = v_pair(wrap(s0 + i + 3u * ng) * kv_w + col);
                let pa = prob[i];
                let pb = prob[i + ng];
                let pc = prob[i + 2u * ng];
                let pd = prob[i + 3u * ng];
                a0 += pa * va.x + pb * vb.x + pc * vc2.x + pd * vd.x;
                a1 += pa * va.y + pb * vb.y + pc * vc2.y + pd * vd.y;
            }
            for (; i < n_ring; i += ng) {
                let v2 = v_pair(wrap(s0 + i) * kv_w + col);
                let pr = prob[i];
                a0 += pr * v2.x;
                a1 += pr * v2.y;
            }
            if (has_row && kg == 0u) {  // key group 0 adds the row's own value
                let pr = prob[n_ring];
                a0 += pr * v_own.x;
                a1 += pr * v_own.y;
            }
            qs[2u * (kg * np + lane)] = a0;
            qs[2u * (kg * np + lane) + 1u] = a1;
        }
        workgroupBarrier();
        // sum the key groups: output element e = (head hh, dim d) of this pass
        for (var e = tid; e < nh * dv; e += 256u) {
            let hh = e / dv;
            let dl = e - hh * dv;
            var acc = 0.0;
            for (var g = 0u; g < ng; g++) {
                acc += qs[2u * g * np + dl][hh];
            }
            let d = vsplit * dv + dl;
            let h = kvh * group + h0 + hh;
            if (p.n_chunks == 1u) {
                out[p.o_off + h * hd + d] = acc / l[hh];  // what merge would write
            } else {
                part[(h * p.n_chunks + c) * (hd + 2u) + 2u + d] = acc;
            }
        }
        if (tid < nh && vsplit == 0u) {
            let pb = ((kvh * group + h0 + tid) * p.n_chunks + c) * (hd + 2u);
            part[pb] = m[tid];
            part[pb + 1u] = l[tid];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(64)
fn merge(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let h = wid.x;
    let hd = HEAD_DIM;
    let stride = hd + 2u;
    let base = h * p.n_chunks * stride;
    var m = -3.0e38;
    for (var c = 0u; c < p.n_chunks; c++) {
        m = max(m, part[base + c * stride]);
    }
    var l = 0.0;
    for (var c = 0u; c < p.n_chunks; c++) {
        l += part[base + c * stride + 1u] * exp(part[base + c * stride] - m);
    }
    for (var d = tid; d < hd; d += 64u) {
        var a = 0.0;
        for (var c = 0u; c < p.n_chunks; c++) {
            a += part[base + c * stride + 2u + d] * exp(part[base + c * stride] - m);
        }
        out[p.o_off + h * hd + d] = a / l;
    }
}

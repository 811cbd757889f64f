// attention.wgsl — causal sliding-window attention over a ring-buffer KV cache (GQA).
//
//   out[r, h, :] = sum_j softmax_j( q[r, h, :] . k[j, h / group, :] * scale ) v[j, h / group, :]
//   over key positions j with  pos - window < j <= pos,  pos = pos0 + r   (the window counts the
//   query itself: spec §4.2 / HF masking `kv_idx > q_idx - sliding_window`), group = n_heads / n_kv_heads.
//
// Key position j lives in cache slot j % cap; the caller writes the new keys first and keeps
// cap >= window + rows - 1 so no visible key has been overwritten.
//
// Bindings
//   0  params  uniform  Params
//   1  q       f32      [rows, ldq] from q_off; head h at columns h*head_dim
//   2  kc      u32      [cap, n_kv_heads*head_dim] f32 bits, or f16 pairs with KV_F16 (rope_qkv.wgsl)
//   3  vc      u32      like kc
//   4  out     f32      [rows, ldo] from o_off; head h at columns h*head_dim
//
// Work split: one workgroup of 256 invocations per (block of R query rows, head), R = min(16,
// 1024 / head_dim). The block walks the keys any of its rows can see in tiles of TK keys, the tiles
// aligned to multiples of TK in absolute key position; each tile of K, then of V, is copied once into
// workgroup memory and used by all R rows (a workgroup per row re-read the whole window from L2 for
// every row: 6 GB per encoder layer of 512 rows). Per tile: R x TK scores, the row's online
// (running-max) softmax update by one invocation per row, then R x head_dim outputs, <= 4 per
// invocation. A row's result does not depend on the other rows of its block: tiles outside its
// window change nothing (scale 1, add 0), so batching never changes it (streaming == offline).
// head_dim <= 256.

struct Params {
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    window: u32,
    cap: u32,
    ldq: u32,
    q_off: u32,
    ldo: u32,
    o_off: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<u32>;
@group(0) @binding(3) var<storage, read> vc: array<u32>;

override KV_F16: bool = false;

fn k_at(i: u32) -> f32 {
    if (KV_F16) {
        return unpack2x16float(kc[i / 2u])[i % 2u];
    }
    return bitcast<f32>(kc[i]);
}

fn v_at(i: u32) -> f32 {
    if (KV_F16) {
        return unpack2x16float(vc[i / 2u])[i % 2u];
    }
    return bitcast<f32>(vc[i]);
}
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const KV_TILE: u32 = 2048u;  // f32 of the K/V tile: TK keys at a padded stride of head_dim + 1
const Q_BLOCK: u32 = 1024u;  // f32 of the R query rows
const P_TILE: u32 = 512u;    // f32 of the R x TK scores / probabilities
const MAX_R: u32 = 16u;
var<workgroup> kv: array<f32, KV_TILE>;
var<workgroup> qs: array<f32, Q_BLOCK>;
var<workgroup> pr: array<f32, P_TILE>;
var<workgroup> row_l: array<f32, MAX_R>;
var<workgroup> row_m: array<f32, MAX_R>;
var<workgroup> row_c: array<f32, MAX_R>;

const MASKED: f32 = -3.0e38;

// keys t0 .. t0 + TK - 1 of kv head kvh (values with `values`) into kv at the padded stride hs;
// those outside lo..hi are never used: zeros
fn stage_tile(values: bool, t0: u32, lo: u32, hi: u32, kvh: u32, tid: u32, TK: u32, hd: u32, hs: u32, kv_ld: u32) {
    for (var e = tid; e < TK * hd; e += 256u) {
        let jj = e / hd;
        let d = e - jj * hd;
        let j = t0 + jj;
        var v = 0.0;
        if (j >= lo && j <= hi) {
            let i = (j % p.cap) * kv_ld + kvh * hd + d;
            if (values) {  // (not select: it would load both)
                v = v_at(i);
            } else {
                v = k_at(i);
            }
        }
        kv[jj * hs + d] = v;
    }
}

// output e of the block's [R, hd] after this tile: rescaled by the row's correction, plus p . v
fn pv_update(a: f32, e: u32, R: u32, hd: u32, hs: u32, TK: u32) -> f32 {
    if (e >= R * hd) {
        return a;
    }
    let rr = e / hd;
    let d = e - rr * hd;
    var v = a * row_c[rr];
    for (var jj = 0u; jj < TK; jj++) {
        v += pr[rr * TK + jj] * kv[jj * hs + d];
    }
    return v;
}

fn store_out(a: f32, e: u32, R: u32, hd: u32, nr: u32, r0: u32, h: u32) {
    if (e < R * hd) {
        let rr = e / hd;
        if (rr < nr) {
            out[p.o_off + (r0 + rr) * p.ldo + h * hd + (e - rr * hd)] = a / row_l[rr];
        }
    }
}

@compute @workgroup_size(256)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) tid: u32) {
    let hd = p.head_dim;
    let R = min(MAX_R, Q_BLOCK / hd);
    let hs = hd + 1u;  // padded K/V row stride: a warp's scores read distinct banks
    let TK = min(P_TILE / R, KV_TILE / hs);
    let flat = wid.x + wid.y * nwg.x;
    let n_blocks = (p.rows + R - 1u) / R;
    if (flat >= n_blocks * p.n_heads) {
        return;  // whole workgroup leaves together
    }
    let b = flat / p.n_heads;
    let h = flat % p.n_heads;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let kv_ld = p.n_kv_heads * hd;
    let r0 = b * R;
    let nr = min(R, p.rows - r0);
    // keys of the block: from the first row's window start to the last row's position
    let pos_first = p.pos0 + r0;
    let hi = pos_first + nr - 1u;
    var lo = 0u;
    if (pos_first + 1u > p.window) {
        lo = pos_first + 1u - p.window;
    }
    for (var e = tid; e < R * hd; e += 256u) {
        let rr = e / hd;
        var v = 0.0;
        if (rr < nr) {
            v = q[p.q_off + (r0 + rr) * p.ldq + h * hd + (e - rr * hd)];
        }
        qs[e] = v;
    }
    if (tid < MAX_R) {
        row_l[tid] = 0.0;
        row_m[tid] = MASKED;
    }
    // outputs e = tid + 256 i (i < 4) of the block's [R, hd], in named variables (an array indexed
    // in a loop can end up in local memory)
    var acc0 = 0.0;
    var acc1 = 0.0;
    var acc2 = 0.0;
    var acc3 = 0.0;
    for (var t0 = (lo / TK) * TK; t0 <= hi; t0 += TK) {
        stage_tile(false, t0, lo, hi, kvh, tid, TK, hd, hs, kv_ld);  // K tile
        workgroupBarrier();
        // scores of the R x TK (row, key) pairs; keys outside a row's window are MASKED
        for (var e = tid; e < R * TK; e += 256u) {
            let rr = e / TK;
            let jj = e - rr * TK;
            let j = t0 + jj;
            let pos = pos_first + rr;
            var s = MASKED;
            if (rr < nr && j <= pos && j + p.window > pos) {
                var dot = 0.0;
                for (var d = 0u; d < hd; d++) {
                    dot += qs[rr * hd + d] * kv[jj * hs + d];
                }
                s = dot * p.scale;
            }
            pr[e] = s;
        }
        workgroupBarrier();
        // V tile over the K tile, while one invocation per row updates that row's softmax
        stage_tile(true, t0, lo, hi, kvh, tid, TK, hd, hs, kv_ld);
        if (tid < R) {
            let m = row_m[tid];
            var mt = m;
            for (var jj = 0u; jj < TK; jj++) {
                mt = max(mt, pr[tid * TK + jj]);
            }
            var sum = 0.0;
            for (var jj = 0u; jj < TK; jj++) {
                let s = pr[tid * TK + jj];
                let pj = select(0.0, exp(s - mt), s != MASKED);
                pr[tid * TK + jj] = pj;
                sum += pj;
            }
            let corr = exp(m - mt);
            row_c[tid] = corr;
            row_l[tid] = row_l[tid] * corr + sum;
            row_m[tid] = mt;
        }
        workgroupBarrier();
        acc0 = pv_update(acc0, tid, R, hd, hs, TK);
        acc1 = pv_update(acc1, tid + 256u, R, hd, hs, TK);
        acc2 = pv_update(acc2, tid + 512u, R, hd, hs, TK);
        acc3 = pv_update(acc3, tid + 768u, R, hd, hs, TK);
        workgroupBarrier();
    }
    store_out(acc0, tid, R, hd, nr, r0, h);
    store_out(acc1, tid + 256u, R, hd, nr, r0, h);
    store_out(acc2, tid + 512u, R, hd, nr, r0, h);
    store_out(acc3, tid + 768u, R, hd, nr, r0, h);
}

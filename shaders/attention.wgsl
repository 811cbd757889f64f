// attention.wgsl — causal sliding-window attention over a ring-buffer KV cache (GQA), in blocks of
// 64 query rows x 64-key tiles (encoder batches, decoder prefill).
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
//   5  blocks  vec4<u32> [n_blocks] attention_blocks only (bind anything for attention): per block of
//                       query rows (first row, rows <= 64, position of the first row, ring base slot)
//
// attention_blocks: the blocks of many streams in one dispatch (the engine's encoder). Block b's
// rows are rows row0 .. row0 + rows - 1 of q / out, at positions pos .. pos + rows - 1 of one stream
// whose keys live at slots base + (j % cap) of kc / vc (each stream's ring of cap slots in one pool).
// p.rows, p.pos0 are unused there; groups: n_blocks * n_heads * ceil(head_dim / 64). Each row is
// computed exactly as by `attention` (the same function, the same tiles of absolute key positions).
//
// Work split: one workgroup of 256 invocations per (block of BR = 64 query rows, head, slice of
// DV = 64 output dims): ceil(rows / 64) * n_heads * ceil(head_dim / 64) workgroups. The block walks
// the keys any of its rows can see in tiles of BK = 64 keys, aligned to multiples of 64 in absolute
// key position (flash-attention style, running max and sum per row). Invocation (rq, kj) =
// (tid / 16, tid % 16) owns rows 4rq .. 4rq+3 of the block for the whole walk:
//   - scores of those rows with keys 4kj .. 4kj+3 of the tile (16 in registers), accumulated over
//     head dims in chunks of DC = 16: the chunk of q and of k is staged in workgroup memory
//     transposed ([dim][row], [dim][key]), so each dim costs two vec4 reads for 16 FMAs;
//   - the tile's softmax update of its 4 rows: row maxima and sums meet in workgroup memory among
//     the 16 invocations of a row quad, which all keep the rows' running max and sum;
//   - outputs of its 4 rows at dims 4kj .. 4kj+3 of the slice, from the probabilities (through
//     workgroup memory, 16 keys at a time) and the V rows of those 16 keys.
// Workgroup memory 12.5 KiB (the WebGPU core limit is 16 KiB). A row's result does not depend on the
// other rows of its block: key tiles outside its window change nothing (max unchanged, scale 1, add
// exactly 0) and its sums run in a fixed order, so batching never changes it (streaming == offline).
// head_dim <= 256, any value.

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
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> blocks: array<vec4<u32>>;

override KV_F16: bool = false;
override BLOCKS: bool = false;  // true for attention_blocks (keys at ring_base + j % cap): `attention` compiles without it

const BR: u32 = 64u;  // query rows per workgroup
const BK: u32 = 64u;  // keys per tile
const DC: u32 = 16u;  // head dims per score chunk
const DV: u32 = 64u;  // output dims per workgroup
const PK: u32 = 16u;  // keys per probability / V sub-tile
const QS: u32 = 17u;  // vec4 stride of a staged dim row (64 values + 1 vec4 against bank conflicts)
const KO: u32 = DC * QS;  // staged k chunk after the q chunk
const PS: u32 = 5u;   // vec4 stride of a probability row (16 keys + 1 vec4)
const MASKED: f32 = -3.0e38;

// sa: the q and k chunks while scoring; then the row-max partials (256 vec4); then the
// probabilities of PK keys of the tile ([BR rows][PS vec4])
// sv: the row-sum partials (256 vec4); then the V rows of PK keys ([PK keys][16 vec4 of dims])
var<workgroup> sa: array<vec4<f32>, 544>;
var<workgroup> sv: array<vec4<f32>, 256>;
var<private> ring_base: u32;  // attention_blocks: slot of key position j is ring_base + j % p.cap

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

// Loads of 4 consecutive head dims are written out per component (no loop indexing a vector:
// a driver may keep such a vector in local memory); lanes past head_dim read a neighbour (in
// bounds or clamped, never used) and are zeroed.
fn dims_ok(d: u32) -> vec4<bool> {
    return vec4<u32>(d) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(p.head_dim);
}

// head dims d .. d+3 of the key at position j (0 past head_dim or outside lo..hi)
fn k4(j: u32, lo: u32, hi: u32, kvh: u32, d: u32) -> vec4<f32> {
    var slot = j % p.cap;
    if (BLOCKS) {
        slot += ring_base;
    }
    let i = slot * p.n_kv_heads * p.head_dim + kvh * p.head_dim + d;
    let v = vec4<f32>(k_at(i), k_at(i + 1u), k_at(i + 2u), k_at(i + 3u));
    return select(vec4<f32>(0.0), v, dims_ok(d) & vec4<bool>(j >= lo && j <= hi));
}

fn v4(j: u32, lo: u32, hi: u32, kvh: u32, d: u32) -> vec4<f32> {
    var slot = j % p.cap;
    if (BLOCKS) {
        slot += ring_base;
    }
    let i = slot * p.n_kv_heads * p.head_dim + kvh * p.head_dim + d;
    let v = vec4<f32>(v_at(i), v_at(i + 1u), v_at(i + 2u), v_at(i + 3u));
    return select(vec4<f32>(0.0), v, dims_ok(d) & vec4<bool>(j >= lo && j <= hi));
}

// dims d .. d+3 of query row r of the block (0 past head_dim or past the rows)
fn q4(r: u32, nr: u32, qrow0: u32, d: u32) -> vec4<f32> {
    let i = qrow0 + r * p.ldq + d;
    let v = vec4<f32>(q[i], q[i + 1u], q[i + 2u], q[i + 3u]);
    return select(vec4<f32>(0.0), v, dims_ok(d) & vec4<bool>(r < nr));
}

fn max4(v: vec4<f32>) -> f32 {
    return max(max(v.x, v.y), max(v.z, v.w));
}

fn sum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// scaled scores of one row, MASKED where the key is outside the row's window (or the row is past
// the block's rows)
fn masked(s: vec4<f32>, keys: vec4<u32>, pos: u32, live: bool) -> vec4<f32> {
    let ok = (keys <= vec4<u32>(pos)) & (keys + vec4<u32>(p.window) > vec4<u32>(pos)) & vec4<bool>(live);
    return select(vec4<f32>(MASKED), s * p.scale, ok);
}

fn probs(s: vec4<f32>, m: f32) -> vec4<f32> {
    return select(vec4<f32>(0.0), exp(s - vec4<f32>(m)), s != vec4<f32>(MASKED));
}

// row r of the block (first row r0), dims d .. d+3 of head h
fn store_row(r0: u32, r: u32, nr: u32, h: u32, d: u32, v: vec4<f32>) {
    if (r < nr) {
        let i = p.o_off + (r0 + r) * p.ldo + h * p.head_dim + d;
        let ok = dims_ok(d);
        if (ok.x) { out[i] = v.x; }
        if (ok.y) { out[i + 1u] = v.y; }
        if (ok.z) { out[i + 2u] = v.z; }
        if (ok.w) { out[i + 3u] = v.w; }
    }
}

@compute @workgroup_size(256)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) tid: u32) {
    let n_slices = (p.head_dim + DV - 1u) / DV;
    let flat = wid.x + wid.y * nwg.x;
    let n_blocks = (p.rows + BR - 1u) / BR;
    if (flat >= n_blocks * p.n_heads * n_slices) {
        return;  // whole workgroup leaves together
    }
    let r0 = (flat / (n_slices * p.n_heads)) * BR;
    attend(tid, flat % (n_slices * p.n_heads), r0, min(BR, p.rows - r0), p.pos0 + r0);
}

@compute @workgroup_size(256)
fn attention_blocks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) tid: u32) {
    let n_slices = (p.head_dim + DV - 1u) / DV;
    let flat = wid.x + wid.y * nwg.x;
    if (flat >= arrayLength(&blocks) * p.n_heads * n_slices) {
        return;
    }
    let b = blocks[flat / (n_slices * p.n_heads)];  // a uniform load: b.y, b.z bound the key walk
    ring_base = b.w;
    attend(tid, flat % (n_slices * p.n_heads), b.x, b.y, b.z);
}

// Head and output slice `hs` (h * n_slices + slice) of the query rows r0 .. r0 + nr - 1 (nr <= BR)
// of q / out, at positions pos_first .. pos_first + nr - 1.
fn attend(tid: u32, hs: u32, r0: u32, nr: u32, pos_first: u32) {
    let hd = p.head_dim;
    let n_slices = (hd + DV - 1u) / DV;
    let slice = hs % n_slices;
    let h = hs / n_slices;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let qrow0 = p.q_off + r0 * p.ldq + h * hd;
    // keys of the block: from the first row's window start to the last row's position
    let hi = pos_first + nr - 1u;
    var lo = 0u;
    if (pos_first + 1u > p.window) {
        lo = pos_first + 1u - p.window;
    }

    let rq = tid / 16u;
    let kj = tid % 16u;
    let dv = slice * DV + 4u * kj;  // this invocation's output dims dv .. dv+3 (and V staging dims)
    let row = 4u * rq;
    let pos = vec4<u32>(pos_first + row) + vec4<u32>(0u, 1u, 2u, 3u);
    // staging: row / key st of the chunk, its dims 4 * (tid % 4) .. +3
    let st = tid / 4u;
    let sd = 4u * (tid % 4u);

    var m = vec4<f32>(MASKED);  // running max of rows row + 0..3
    var l = vec4<f32>(0.0);     // running sum
    var o0 = vec4<f32>(0.0);    // outputs of row + 0, dims dv .. dv+3 (named, not an array)
    var o1 = vec4<f32>(0.0);
    var o2 = vec4<f32>(0.0);
    var o3 = vec4<f32>(0.0);
    // global loads run one staging ahead (each is issued before the FMAs of the staging before it):
    // the q and k chunk, the V rows of the next PK keys
    var t0 = (lo / BK) * BK;
    var qn = q4(st, nr, qrow0, sd);
    var kn = k4(t0 + st, lo, hi, kvh, sd);
    var vn = vec4<f32>(0.0);
    for (; t0 <= hi; t0 += BK) {
        // scores s_a[b]: row + a, key t0 + 4kj + b
        var s0 = vec4<f32>(0.0);
        var s1 = vec4<f32>(0.0);
        var s2 = vec4<f32>(0.0);
        var s3 = vec4<f32>(0.0);
        for (var dc = 0u; dc < hd; dc += DC) {
            workgroupBarrier();  // the previous chunk (or the previous tile's PV) is read
            let c = sd * QS + st / 4u;  // dims sd .. sd+3 are rows c, c + QS, .. of the chunk
            let cc = st % 4u;
            sa[c][cc] = qn.x;
            sa[c + QS][cc] = qn.y;
            sa[c + 2u * QS][cc] = qn.z;
            sa[c + 3u * QS][cc] = qn.w;
            sa[KO + c][cc] = kn.x;
            sa[KO + c + QS][cc] = kn.y;
            sa[KO + c + 2u * QS][cc] = kn.z;
            sa[KO + c + 3u * QS][cc] = kn.w;
            workgroupBarrier();
            if (dc + DC < hd) {
                qn = q4(st, nr, qrow0, dc + DC + sd);
                kn = k4(t0 + st, lo, hi, kvh, dc + DC + sd);
            } else {
                vn = v4(t0 + tid / 16u, lo, hi, kvh, dv);
            }
            for (var c = 0u; c < DC; c++) {
                let qq = sa[c * QS + rq];
                let kk = sa[KO + c * QS + kj];
                s0 = fma(vec4<f32>(qq.x), kk, s0);
                s1 = fma(vec4<f32>(qq.y), kk, s1);
                s2 = fma(vec4<f32>(qq.z), kk, s2);
                s3 = fma(vec4<f32>(qq.w), kk, s3);
            }
        }
        let keys = vec4<u32>(t0 + 4u * kj) + vec4<u32>(0u, 1u, 2u, 3u);
        s0 = masked(s0, keys, pos.x, row < nr);
        s1 = masked(s1, keys, pos.y, row + 1u < nr);
        s2 = masked(s2, keys, pos.z, row + 2u < nr);
        s3 = masked(s3, keys, pos.w, row + 3u < nr);
        // the rows' maxima over the tile: 16 partials per row quad
        workgroupBarrier();  // the last chunk is read
        sa[tid] = vec4<f32>(max4(s0), max4(s1), max4(s2), max4(s3));
        workgroupBarrier();
        var mt = m;
        for (var i = 0u; i < 16u; i++) {
            mt = max(mt, sa[rq * 16u + i]);
        }
        let p0 = probs(s0, mt.x);
        let p1 = probs(s1, mt.y);
        let p2 = probs(s2, mt.z);
        let p3 = probs(s3, mt.w);
        sv[tid] = vec4<f32>(sum4(p0), sum4(p1), sum4(p2), sum4(p3));
        workgroupBarrier();
        var ts = vec4<f32>(0.0);
        for (var i = 0u; i < 16u; i++) {
            ts += sv[rq * 16u + i];
        }
        let corr = exp(m - mt);
        l = l * corr + ts;
        m = mt;
        o0 *= corr.x;
        o1 *= corr.y;
        o2 *= corr.z;
        o3 *= corr.w;
        // outputs: PK keys at a time, their probabilities and V rows through workgroup memory
        for (var k0 = 0u; k0 < BK; k0 += PK) {
            workgroupBarrier();  // the sums / the previous sub-tile are read
            if (4u * kj / PK == k0 / PK) {  // owners of keys k0 .. k0 + PK - 1
                let c = kj % (PK / 4u);
                sa[row * PS + c] = p0;
                sa[(row + 1u) * PS + c] = p1;
                sa[(row + 2u) * PS + c] = p2;
                sa[(row + 3u) * PS + c] = p3;
            }
            sv[tid] = vn;  // key tid / 16 of the PK, dims dv .. dv+3
            workgroupBarrier();
            if (k0 + PK < BK) {
                vn = v4(t0 + k0 + PK + tid / 16u, lo, hi, kvh, dv);
            } else {  // the next tile's first chunk (zeros past the last tile)
                qn = q4(st, nr, qrow0, sd);
                kn = k4(t0 + BK + st, lo, hi, kvh, sd);
            }
            for (var c = 0u; c < PK / 4u; c++) {
                let v0 = sv[(4u * c) * 16u + kj];
                let v1 = sv[(4u * c + 1u) * 16u + kj];
                let v2 = sv[(4u * c + 2u) * 16u + kj];
                let v3 = sv[(4u * c + 3u) * 16u + kj];
                let a0 = sa[row * PS + c];
                let a1 = sa[(row + 1u) * PS + c];
                let a2 = sa[(row + 2u) * PS + c];
                let a3 = sa[(row + 3u) * PS + c];
                o0 = fma(vec4<f32>(a0.w), v3, fma(vec4<f32>(a0.z), v2, fma(vec4<f32>(a0.y), v1, fma(vec4<f32>(a0.x), v0, o0))));
                o1 = fma(vec4<f32>(a1.w), v3, fma(vec4<f32>(a1.z), v2, fma(vec4<f32>(a1.y), v1, fma(vec4<f32>(a1.x), v0, o1))));
                o2 = fma(vec4<f32>(a2.w), v3, fma(vec4<f32>(a2.z), v2, fma(vec4<f32>(a2.y), v1, fma(vec4<f32>(a2.x), v0, o2))));
                o3 = fma(vec4<f32>(a3.w), v3, fma(vec4<f32>(a3.z), v2, fma(vec4<f32>(a3.y), v1, fma(vec4<f32>(a3.x), v0, o3))));
            }
        }
    }
    store_row(r0, row, nr, h, dv, o0 / l.x);
    store_row(r0, row + 1u, nr, h, dv, o1 / l.y);
    store_row(r0, row + 2u, nr, h, dv, o2 / l.z);
    store_row(r0, row + 3u, nr, h, dv, o3 / l.w);
}

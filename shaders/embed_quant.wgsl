// embed_quant.wgsl — decoder input from a Q4_0 / Q8_0 token table: audio embedding + token row.
//
// embed (GPU gather, the native default):
//   out[r, c] = audio[((apos0 + r) % acap), c] + E[tokens[tok_off + r] - row0, c]
//   for rows whose token lies in this table chunk [row0, row0 + n_rows); with first_chunk == 0 only
//   those rows are touched (accumulated), as in embed.wgsl. E[t, c] = (q - 8) * d (Q4_0) or q * d
//   (Q8_0), computed exactly in f32, so it equals the host dequantisation bit for bit.
// add_rows (browser-style CPU path): the host dequantised the rows; binding 3 then holds them as
//   f32 bit patterns [rows, dim] and binding 4 is unused:
//   out[r, c] = audio[((apos0 + r) % acap), c] + rows[r, c]
//
// Table layout: as linear_quant.wgsl (per chunk: quants of block t*NB + b, QB = 16 / 32 bytes per
// block, then f16 scales two per word), NB = dim / 32; here both are read as u32 words.
//
// Bindings
//   0  params  uniform  Params
//   1  tokens  u32      token ids
//   2  audio   f32      [acap, dim] audio-embedding ring
//   3  qs      u32      quants (embed) / f32 rows (add_rows)
//   4  sc      u32      f16 scale pairs (embed)
//   5  out     f32      [rows, dim] from element out_off
//
// Work split: one invocation per (row, column); 256 per workgroup, flat index over x/y.

override Q8: bool = false;

struct Params {
    rows: u32,
    dim: u32,
    tok_off: u32,
    apos0: u32,
    acap: u32,
    row0: u32,
    n_rows: u32,
    first_chunk: u32,
    out_off: u32,  // element of out where row 0 starts (a stream's row in a batch)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
@group(0) @binding(2) var<storage, read> audio: array<f32>;
@group(0) @binding(3) var<storage, read> qs: array<u32>;
@group(0) @binding(4) var<storage, read> sc: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

// #include "_half.wgsl"

fn table_at(t: u32, c: u32) -> f32 {
    let blk = t * (p.dim / 32u) + c / 32u;
    let j = c % 32u;
    let word = sc[blk >> 1u];
    let d = half_bits(select(word & 0xffffu, word >> 16u, (blk & 1u) == 1u));
    if (Q8) {
        let v = qs[blk * 8u + j / 4u];
        let q = bitcast<i32>(v << (24u - 8u * (j % 4u))) >> 24u;
        return f32(q) * d;
    }
    let v = qs[blk * 4u + (j % 16u) / 4u];
    let byte = (v >> (8u * (j % 4u))) & 0xffu;
    let q = (byte >> (4u * (j / 16u))) & 0xfu;
    return f32(i32(q) - 8) * d;
}

fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = flat_index(gid, nwg);
    if (idx >= p.rows * p.dim) {
        return;
    }
    let r = idx / p.dim;
    let c = idx % p.dim;
    let tok = tokens[p.tok_off + r];
    let inside = tok >= p.row0 && tok < p.row0 + p.n_rows;
    var e = 0.0;
    if (inside) {
        e = table_at(tok - p.row0, c);
    }
    let o = p.out_off + r * p.dim + c;
    if (p.first_chunk != 0u) {
        out[o] = audio[((p.apos0 + r) % p.acap) * p.dim + c] + e;
    } else if (inside) {
        out[o] = out[o] + e;
    }
}

@compute @workgroup_size(256)
fn add_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = flat_index(gid, nwg);
    if (idx >= p.rows * p.dim) {
        return;
    }
    let r = idx / p.dim;
    let c = idx % p.dim;
    out[p.out_off + idx] = audio[((p.apos0 + r) % p.acap) * p.dim + c] + bitcast<f32>(qs[idx]);
}

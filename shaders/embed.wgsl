// embed.wgsl — decoder input: audio embedding plus the token embedding, gathered on the GPU.
//
//   out[r, :] = audio[((apos0 + r) % acap), :] + E[tokens[tok_off + r] - row0, :]
//   for the rows whose token falls in this table chunk [row0, row0 + n_rows); other rows untouched
//   when add_audio == 0 (a second chunk only adds its token rows).
//
// The token ids come from a GPU buffer (the prompt uploaded once, then each step's argmax), so a
// decode step never waits for the host. The table may be split into row chunks to respect the
// device's max binding size; the caller dispatches once per chunk, the first with add_audio = 1
// writing audio + (token or 0), later chunks accumulating their tokens.
//
// Bindings
//   0  params  uniform  Params
//   1  tokens  u32      [..] token ids
//   2  audio   f32      [acap, dim] audio-embedding ring
//   3  table   u32      [n_rows, dim] BF16 pairs (or F32 bits when !W_BF16)
//   4  out     f32      [rows, dim] from element out_off
//
// Work split: one invocation per (row, column); 256 per workgroup, flat index over x/y.

override W_BF16: bool = true;

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
@group(0) @binding(3) var<storage, read> table: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

fn table_at(e: u32) -> f32 {
    if (W_BF16) {
        let word = table[e >> 1u];
        return select(bitcast<f32>(word & 0xffff0000u), bitcast<f32>(word << 16u), (e & 1u) == 0u);
    }
    return bitcast<f32>(table[e]);
}

@compute @workgroup_size(256)
fn embed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.rows * p.dim) {
        return;
    }
    let r = idx / p.dim;
    let c = idx % p.dim;
    let tok = tokens[p.tok_off + r];
    var e = 0.0;
    let inside = tok >= p.row0 && tok < p.row0 + p.n_rows;
    if (inside) {
        e = table_at((tok - p.row0) * p.dim + c);
    }
    let o = p.out_off + r * p.dim + c;
    if (p.first_chunk != 0u) {
        out[o] = audio[((p.apos0 + r) % p.acap) * p.dim + c] + e;
    } else if (inside) {
        out[o] = out[o] + e;
    }
}

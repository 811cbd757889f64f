// ops.js — the browser mirror of voxtral_wgpu/ops.py (and, below, ops_quant.py): one function per
// shader entry point, the same kernel-choice rules and the same Params field order. Float fields
// are wrapped with f() (JS numbers carry no int/float type).
import { f, groups2d, packParams } from "./gpu.js";

export const ACT_NONE = 0, ACT_GELU = 1, ACT_SILU = 2;

/** A row-major f32 matrix view [rows, cols] with row stride ld (elements) from element off of buf. */
export class Mat {
  constructor(buf, rows, cols, ld, off = 0) { Object.assign(this, { buf, rows, cols, ld, off }); }
  static of(buf, rows, cols) { return new Mat(buf, rows, cols, cols, 0); }
  take(r0, n) { return new Mat(this.buf, n, this.cols, this.ld, this.off + r0 * this.ld); }
  cols_(c0, n) { return new Mat(this.buf, this.rows, n, this.ld, this.off + c0); }
  reshapeRows(group) {
    if (this.ld !== this.cols || this.rows % group) throw new Error("reshapeRows needs contiguous rows");
    return new Mat(this.buf, this.rows / group, this.cols * group, this.cols * group, this.off);
  }
}

/** W [n, k] in BF16 pairs ('bf16') or F32 ('f32') row chunks [[buffer, row0, nrows]], optional f32 bias. */
export class DenseWeight {
  constructor(n, k, dtype, chunks, bias = null) { Object.assign(this, { n, k, dtype, chunks, bias }); }
}

const cdiv = (a, b) => Math.ceil(a / b);
const flatGroups = (nItems, perGroup = 256) => groups2d(cdiv(nItems, perGroup));

function matvecOk(x, w) {
  return x.rows <= 4 && w.dtype === "bf16" && w.k % 8 === 0 && x.off % 4 === 0 && x.ld % 4 === 0;
}

export const MATVEC_ROWS = 4; // ops.MATVEC_ROWS
export const MATVEC_GROUPED_MAX = 16; // ops.MATVEC_GROUPED_MAX: more rows (the prefill) take matmul.wgsl with split K

function rowGroups(x, w, batchInvariant) {
  if (batchInvariant || !(x.rows > 4 && x.rows <= MATVEC_GROUPED_MAX)) return null;
  if (!matvecOk(new Mat(x.buf, 4, x.cols, x.ld, x.off), w)) return null;
  const r = [];
  for (let i = 0; i < x.rows; i += 4) r.push(i);
  return r;
}

const isQuant = (w) => w.dtype === "q4_0" || w.dtype === "q8_0";

export function linear(gpu, x, w, y, { act = ACT_NONE, accumulate = false, batchInvariant = false, norm = null, eps = 1e-5, scratch = null } = {}) {
  if (x.cols !== w.k || y.cols !== w.n || x.rows !== y.rows) throw new Error(`linear: shapes x[${x.rows},${x.cols}] W[${w.n},${w.k}] y[${y.rows},${y.cols}]`);
  if (x.rows === 0) return;
  const groups = rowGroups(x, w, batchInvariant);
  if (groups) {
    for (const r of groups) {
      const n = Math.min(4, x.rows - r);
      linear(gpu, x.take(r, n), w, y.take(r, n), { act, accumulate, norm, eps, scratch: scratch ? scratch.take(r, n) : null });
    }
    return;
  }
  const fused = matvecOk(x, w) && !batchInvariant;
  if (norm !== null && !fused) {
    if (!scratch) throw new Error("linear(norm=...) on this path needs a scratch matrix");
    rmsNorm(gpu, x, norm, scratch, eps);
    x = scratch; norm = null;
  }
  const dtype = w.dtype || "bf16";
  if (isQuant(w)) return quantLinear(gpu, x, w, y, { act, accumulate, batchInvariant });
  const bias = w.bias;
  if (fused) {
    const k = gpu.kernel("matvec", "matvec", { ROWS: MATVEC_ROWS });
    for (const [buf, row0, nrows] of w.chunks) {
      const params = packParams(x.rows, nrows, w.k, x.off, x.ld, y.off + row0, y.ld, row0, Number(bias !== null),
        act, Number(accumulate), Number(norm !== null), f(eps), 0, 0);
      gpu.dispatch(k, params, [x.buf, buf, bias ?? buf, norm ?? buf, y.buf, buf, buf], groups2d(cdiv(nrows, MATVEC_ROWS)));
    }
    return;
  }
  const bf16 = dtype === "bf16";
  if (bf16 && w.k % 16 === 0 && x.off % 4 === 0 && x.ld % 4 === 0 && (x.rows > 4 || batchInvariant)) {
    matmulTiles(gpu, x, w, y, { act, accumulate });
    return;
  }
  for (const [buf, row0, nrows] of w.chunks) {
    const useMv = x.rows <= 4 && w.k % 2 === 0 && !batchInvariant;
    const k = gpu.kernel("linear", useMv ? "matvec" : "matmul", { W_BF16: bf16 });
    const params = packParams(x.rows, nrows, w.k, x.ld, x.off, y.ld, y.off + row0, Number(bias !== null), row0, act, Number(accumulate));
    const g = useMv ? groups2d(cdiv(nrows, 8)) : [cdiv(nrows, 64), cdiv(x.rows, 64)];
    gpu.dispatch(k, params, [x.buf, buf, bias ?? buf, y.buf], g);
  }
}

export function swigluFfnIn(gpu, x, w1, w3, out, { norm, eps, scratch, tmp, batchInvariant = false }) {
  const groups = rowGroups(x, w1, batchInvariant);
  if (groups) {
    for (const r of groups) {
      const n = Math.min(4, x.rows - r);
      swigluFfnIn(gpu, x.take(r, n), w1, w3, out.take(r, n), { norm, eps, scratch: scratch.take(r, n), tmp: tmp.take(r, n) });
    }
    return;
  }
  if (matvecOk(x, w1) && !batchInvariant && w3.dtype === "bf16" && w1.chunks.length === 1 && w3.chunks.length === 1) {
    const k = gpu.kernel("matvec", "matvec_swiglu", { ROWS: MATVEC_ROWS });
    const params = packParams(x.rows, w1.n, w1.k, x.off, x.ld, out.off, out.ld, 0, 0, 0, 0, 1, f(eps), 0, 0);
    const b1 = w1.chunks[0][0], b3 = w3.chunks[0][0];
    gpu.dispatch(k, params, [x.buf, b1, b1, norm, out.buf, b3, b3], groups2d(cdiv(w1.n, MATVEC_ROWS)));
    return;
  }
  rmsNorm(gpu, x, norm, scratch, eps);
  linear(gpu, scratch, w1, out, { batchInvariant });
  linear(gpu, scratch, w3, tmp, { batchInvariant });
  swiglu(gpu, out, tmp);
}

export function qkvProj(gpu, x, wq, wk, wv, qkv, { norm, eps, scratch, batchInvariant = false }) {
  const nq = wq.n, nkv = wk.n;
  if (qkv.cols !== nq + 2 * nkv || wv.n !== nkv) throw new Error("qkvProj: shapes");
  const groups = rowGroups(x, wq, batchInvariant);
  if (groups) {
    for (const r of groups) {
      const n = Math.min(4, x.rows - r);
      qkvProj(gpu, x.take(r, n), wq, wk, wv, qkv.take(r, n), { norm, eps, scratch: scratch.take(r, n) });
    }
    return;
  }
  const ws = [wq, wk, wv];
  if (matvecOk(x, wq) && !batchInvariant && ws.every((w) => w.dtype === "bf16" && w.chunks.length === 1 && w.bias === null)) {
    const k = gpu.kernel("matvec", "matvec_qkv", { ROWS: MATVEC_ROWS });
    const params = packParams(x.rows, qkv.cols, wq.k, x.off, x.ld, qkv.off, qkv.ld, 0, 0, 0, 0, 1, f(eps), nq, nkv);
    const [bq, bk, bv] = ws.map((w) => w.chunks[0][0]);
    gpu.dispatch(k, params, [x.buf, bq, bq, norm, qkv.buf, bk, bv], groups2d(cdiv(qkv.cols, MATVEC_ROWS)));
    return;
  }
  rmsNorm(gpu, x, norm, scratch, eps);
  linear(gpu, scratch, wq, qkv.cols_(0, nq), { batchInvariant });
  linear(gpu, scratch, wk, qkv.cols_(nq, nkv), { batchInvariant });
  linear(gpu, scratch, wv, qkv.cols_(nq + nkv, nkv), { batchInvariant });
}

export function ropeQkv(gpu, table, qkv, kCache, vCache, { nHeads, nKvHeads, headDim, pos0, cap, kvF16 = false }) {
  const k = gpu.kernel("rope_qkv", "rope_qkv", { KV_F16: kvF16 });
  const n = qkv.rows * (nHeads + nKvHeads) * (headDim / 2);
  gpu.dispatch(k, packParams(qkv.rows, nHeads, nKvHeads, headDim, qkv.ld, qkv.off, pos0 % cap, cap),
    [table, qkv.buf, kCache, vCache, table], flatGroups(n)); // binding 5: rope_qkv_slots only
}

/** Copy positions first .. first + count - 1 of a key / value ring pair (slot p % srcCap, rowBytes a
 * slot) into another pair (slot p % dstCap), bit for bit (kv_cache.wgsl ring_copy; ops.ring_copy). */
export function ringCopy(gpu, srcK, srcV, srcCap, dstK, dstV, dstCap, first, count, rowBytes) {
  if (count <= 0) return;
  const width = rowBytes / 4;
  gpu.dispatch(gpu.kernel("kv_cache", "ring_copy"), packParams(count, width, 0, 0, 0, first % dstCap, dstCap, first % srcCap, srcCap),
    [srcK, srcV, dstK, dstV], flatGroups(count * width));
}

export function rmsNorm(gpu, x, g, y, eps) {
  const k = gpu.kernel("rms_norm", "rms_norm");
  gpu.dispatch(k, packParams(x.rows, x.cols, x.ld, x.off, y.ld, y.off, f(eps)), [x.buf, g, y.buf], groups2d(x.rows));
}

export const DECODE_CHUNK = 256;
export const DECODE_VALUE_SPLIT = 4; // ops.py's: at most this many workgroups per (chunk, kv head), each a share of the value dims
export const DECODE_SPLIT_GROUPS = 128; // ... while the partial pass stays within this many workgroups

export function decodeValueSplit(headDim, nChunks, nKvHeads) {
  let split = DECODE_VALUE_SPLIT;
  while (split > 1 && (headDim % (2 * split) || nChunks * nKvHeads * split > DECODE_SPLIT_GROUPS)) split /= 2;
  return split;
}

export function decodeAttentionScratch(gpu, nHeads, headDim, maxKeys) {
  return gpu.empty(4 * nHeads * cdiv(maxKeys, DECODE_CHUNK) * (headDim + 2), "attention.part");
}

/** ops.py's _shader_pos: pos0 as the shaders' u32, shifted down by a multiple of cap past 2^30
 *  (slots are pos % cap) while staying >= window. */
function shaderPos(pos0, window, cap) {
  return pos0 - (pos0 >= 2 ** 30 ? Math.floor((pos0 - window) / cap) * cap : 0);
}

/** Rows per matmul.wgsl tile (override BM), as ops.matmul_tile_rows: 128 unless that leaves too few workgroups. */
function matmulTileRows(m, n) {
  return cdiv(n, 128) * cdiv(m, 128) >= 512 ? 128 : 64;
}

const MATMUL_SPLIT_K = 512; // ops.MATMUL_SPLIT_K: K elements per split of a matmul
const MATMUL_SPLIT_MAX_N = 16384; // ... for weights with at most this many rows

/** K pieces of a matmul.wgsl product with an [n, k] weight (ops.matmul_splits): a function of the shape only. */
function matmulSplits(n, k) {
  return n <= MATMUL_SPLIT_MAX_N && k > MATMUL_SPLIT_K ? cdiv(k, MATMUL_SPLIT_K) : 1;
}

/** y (+)= act(x W^T + b) with matmul.wgsl over each row chunk of W, BF16 or quantised (ops.matmul_tiles). */
function matmulTiles(gpu, x, w, y, { act = ACT_NONE, accumulate = false, wQuant = 0, scaleOffset = null } = {}) {
  const bias = w.bias ?? null;
  const splits = matmulSplits(w.n, w.k);
  for (const chunk of w.chunks) {
    const [buf, row0, nrows] = chunk;
    const sc = scaleOffset ? scaleOffset(chunk) : 0;
    const bm = matmulTileRows(x.rows, nrows);
    if (splits === 1) {
      const params = packParams(x.rows, nrows, w.k, x.ld, x.off, y.ld, y.off + row0, Number(bias !== null), row0,
        act, Number(accumulate), sc, w.k, 1);
      gpu.dispatch(gpu.kernel("matmul", "matmul", { BM: bm, W_QUANT: wQuant }), params, [x.buf, buf, bias ?? buf, y.buf],
        [cdiv(nrows, 128), cdiv(x.rows, bm)]);
      continue;
    }
    // rows per pass: the partial sums [splits, rows, nrows] fit one binding
    const step = Math.max(1, Math.min(x.rows, Math.floor((gpu.maxBinding - 16) / (4 * splits * nrows))));
    for (let r0 = 0; r0 < x.rows; r0 += step) {
      const rows = Math.min(step, x.rows - r0);
      // the used range (the buffer may exceed one binding), whole vec4s: reduce_splits reads it so
      const nbytes = Math.ceil((4 * splits * rows * nrows) / 16) * 16;
      const part = [gpu.scratch(nbytes), 0, nbytes];
      let params = packParams(rows, nrows, w.k, x.ld, x.off + r0 * x.ld, nrows, 0, 0, 0, 0, 0, sc, MATMUL_SPLIT_K, splits);
      gpu.dispatch(gpu.kernel("matmul", "matmul", { BM: bm, W_QUANT: wQuant, SPLIT: true }), params, [x.buf, buf, buf, part],
        [cdiv(nrows, 128), cdiv(rows, bm), splits]);
      params = packParams(rows, nrows, w.k, nrows, 0, y.ld, y.off + r0 * y.ld + row0, Number(bias !== null), row0,
        act, Number(accumulate), 0, MATMUL_SPLIT_K, splits);
      gpu.dispatch(gpu.kernel("matmul", "reduce_splits"), params, [part, buf, bias ?? buf, y.buf], groups2d(cdiv(rows * nrows, 256)));
    }
  }
}

const ATTENTION_ROWS = 64; // attention.wgsl's BR: query rows per workgroup
const ATTENTION_DIMS = 64; // ... and DV: output dims per workgroup

export function attention(gpu, q, kCache, vCache, out, { nHeads, nKvHeads, headDim, pos0, window, cap, kvF16 = false }) {
  const pos = shaderPos(pos0, window, cap);
  const k = gpu.kernel("attention", "attention", { KV_F16: kvF16 });
  const params = packParams(q.rows, nHeads, nKvHeads, headDim, pos, window, cap, q.ld, q.off, out.ld, out.off, f(headDim ** -0.5));
  // attention.wgsl: a workgroup per (64 query rows, head, 64 output dims), as ops.py
  const groups = Math.ceil(q.rows / ATTENTION_ROWS) * nHeads * Math.ceil(headDim / ATTENTION_DIMS);
  gpu.dispatch(k, params, [q.buf, kCache, vCache, out.buf, q.buf], groups2d(groups)); // binding 5: attention_blocks only
}

/** ropeQkv + attention for one decode row in one split-K pass (ops.py's decode_attention): rotates q and
 *  k as it reads them (table row tableRow), appends k and v at slot pos0 % cap, leaves the qkv row as it was. */
export function decodeAttention(gpu, table, qkv, kCache, vCache, out, { nHeads, nKvHeads, headDim, pos0, window, cap, scratch, kvF16 = false, tableRow = 0 }) {
  if (qkv.rows !== 1 || qkv.off % 4 !== 0 || headDim % 4 !== 0) throw new Error("decodeAttention: one aligned qkv row");
  const pos = shaderPos(pos0, window, cap);
  const nChunks = cdiv(Math.min(pos + 1, window), DECODE_CHUNK);
  const split = decodeValueSplit(headDim, nChunks, nKvHeads);
  const params = packParams(nHeads, nKvHeads, headDim, pos, window, cap, nChunks, qkv.off, out.off, f(headDim ** -0.5), split, tableRow * headDim / 4);
  const bufs = [qkv.buf, kCache, vCache, scratch, out.buf, table];
  gpu.dispatch(gpu.kernel("attention_decode", "partial", { KV_F16: kvF16, HEAD_DIM: headDim }), params, bufs, [nChunks * split, nKvHeads]);
  if (nChunks > 1) gpu.dispatch(gpu.kernel("attention_decode", "merge", { KV_F16: kvF16, HEAD_DIM: headDim }), params, bufs, [nHeads, 1]); // one chunk: partial wrote it
}

export function swiglu(gpu, a, b) {
  const n = a.rows * a.cols;
  gpu.dispatch(gpu.kernel("elementwise", "swiglu"), packParams(n), [a.buf, b.buf], flatGroups(n));
}

export function embed(gpu, tokens, tokOff, audio, apos0, acap, table, out) {
  const n = out.rows * out.cols;
  if (isQuant(table)) return quantEmbed(gpu, tokens, tokOff, audio, apos0, acap, table, out);
  table.chunks.forEach(([buf, row0, nrows], i) => {
    const k = gpu.kernel("embed", "embed", { W_BF16: table.dtype === "bf16" });
    const params = packParams(out.rows, out.cols, tokOff, apos0 % acap, acap, row0, nrows, Number(i === 0));
    gpu.dispatch(k, params, [tokens, audio, buf, out.buf], flatGroups(n));
  });
}

/** Greedy argmax over a logits vector into the GPU token log, with the chosen token's softmax
 * probability (f32 bits) at tokens[probsOff + outIndex] unless probsOff is null; owns its scratch. */
export class Argmax {
  constructor(gpu, n) {
    this.n = n;
    this.nParts = cdiv(n, 1024);
    this.partV = gpu.empty(4 * this.nParts, "argmax.part_v");
    this.partI = gpu.empty(4 * this.nParts, "argmax.part_i");
    this.partS = gpu.empty(4 * this.nParts, "argmax.part_s");
  }
  run(gpu, logits, tokens, outIndex, { probsOff = null } = {}) {
    const params = packParams(this.n, this.nParts, outIndex, 0, probsOff === null ? 0xffffffff : probsOff);
    const bufs = [logits, this.partV, this.partI, tokens, this.partS];
    gpu.dispatch(gpu.kernel("argmax", "partial"), params, bufs, [this.nParts, 1]);
    gpu.dispatch(gpu.kernel("argmax", "finish"), params, bufs, [1, 1]);
  }
}

/** (cos, sin) of pos * theta^(-2i/d), angle in float64 reduced mod 2 pi: Float32Array [n, d/2, 2]. */
export function ropeTable(p0, n, headDim, theta) {
  const half = headDim / 2;
  const out = new Float32Array(n * half * 2);
  const twoPi = 2 * Math.PI;
  for (let r = 0; r < n; r++) {
    for (let i = 0; i < half; i++) {
      const invFreq = 1.0 / theta ** ((2 * i) / headDim);
      let a = ((p0 + r) * invFreq) % twoPi;
      if (a < 0) a += twoPi;
      out[(r * half + i) * 2] = Math.cos(a);
      out[(r * half + i) * 2 + 1] = Math.sin(a);
    }
  }
  return out;
}

// ============================================================== ops_quant.py (Q4_0 / Q8_0)
export const QUANT_BYTES = { q4_0: 16, q8_0: 32 };
export const GGML_BLOCK_BYTES = { q4_0: 18, q8_0: 34 };
export const QK = 32;
export const SC_ALIGN = 256;
export const MATVEC_MAX_M = 4;
// (MV_LW, MV_RG, MV_RPT, MV_UB) per decode kernel: ops_quant.MATVEC_SPLITS (a workgroup covers
// MV_RG * MV_RPT output rows); MATVEC_STAGE: kinds staging x * g per workgroup (norm, K <= 3072); one input
// row per workgroup (MV_M = 1, Params.mq = rows), as ops_quant.MATVEC_ROWS_PER_GROUP
export const MATVEC_SPLITS = { matvec: [4, 4, 3, 2], matvec_qkv: [2, 8, 3, 1], matvec_swiglu: [2, 8, 3, 1], lm_head: [2, 8, 4, 1] };
export const MATVEC_STAGE = ["matvec_qkv"];
export const MATVEC_STAGE_K = 3072;
export const LM_HEAD_ROWS = 65536;
export const F16_HW = false;
export const TILE = 64;

const align = (n, a) => Math.ceil(n / a) * a;

/** [quantBytes, scaleOffset, scaleBytes, bufferBytes] of a chunk of nrows rows. */
export function chunkLayout(dtype, nrows, k) {
  const nb = nrows * (k / QK);
  const qbytes = QUANT_BYTES[dtype] * nb;
  const scOff = align(qbytes, SC_ALIGN);
  const scBytes = align(2 * nb, 16);
  return [qbytes, scOff, scBytes, scOff + scBytes];
}

export class QuantWeight {
  constructor(n, k, dtype, chunks, bias = null) { Object.assign(this, { n, k, dtype, chunks, bias }); }
  views(chunk) {
    const [buf, , nrows] = chunk;
    const [qbytes, scOff, scBytes] = chunkLayout(this.dtype, nrows, this.k);
    return [[buf, 0, qbytes], [buf, scOff, scBytes]];
  }
}

/** Rows per chunk so that a whole chunk buffer (quants, alignment pad, scales) is one binding: the
 *  kernels bind it whole (ops_quant.rows_per_chunk). */
export function rowsPerChunk(gpu, dtype, n, k) {
  const perRow = (QUANT_BYTES[dtype] + 2) * (k / QK);
  const limit = Math.min(gpu.maxBinding, gpu.maxBuffer) - 2 * SC_ALIGN;
  return Math.max(1, Math.min(n, Math.floor(limit / perRow)));
}

/** Upload GGML blocks of W [n, k]: readRows(r0, r1) -> Uint8Array of those rows' GGML bytes
 *  (read slab by slab, so a big table never sits whole in host memory). The repack splits each
 *  block's f16 scale from its quants, as ops_quant.upload_quant does. */
export async function uploadQuant(gpu, readRows, n, k, dtype, label = "", bias = null, slabBytes = 16 << 20) {
  const nb = k / QK;
  const bb = GGML_BLOCK_BYTES[dtype], qb = QUANT_BYTES[dtype];
  const rowBytes = nb * bb;
  const step = rowsPerChunk(gpu, dtype, n, k);
  let slab = Math.max(2, Math.floor(slabBytes / rowBytes));
  slab -= slab % 2;
  const chunks = [];
  for (let r0 = 0; r0 < n; r0 += step) {
    const nr = Math.min(step, n - r0);
    const [, scOff, , total] = chunkLayout(dtype, nr, k);
    const buf = gpu.empty(total, `${label}[${r0}:]`);
    for (let s0 = r0; s0 < r0 + nr; s0 += slab) {
      const s1 = Math.min(r0 + nr, s0 + slab);
      const part = await readRows(s0, s1);
      const nblk = (s1 - s0) * nb;
      if (part.byteLength !== nblk * bb) throw new Error(`${label}: rows ${s0}..${s1}: got ${part.byteLength} bytes`);
      const quants = new Uint8Array(nblk * qb);
      const scales = new Uint8Array(nblk * 2);
      for (let i = 0; i < nblk; i++) {
        scales[2 * i] = part[i * bb]; scales[2 * i + 1] = part[i * bb + 1];
        quants.set(part.subarray(i * bb + 2, i * bb + bb), i * qb);
      }
      gpu.write(buf, quants, (s0 - r0) * nb * qb);
      gpu.write(buf, scales, scOff + (s0 - r0) * nb * 2);
    }
    chunks.push([buf, r0, nr]);
  }
  return new QuantWeight(n, k, dtype, chunks, bias);
}

function quantMatvecOk(x, ws, batchInvariant = false) {
  return x.rows <= MATVEC_MAX_M && !batchInvariant && x.off % 4 === 0 && x.ld % 4 === 0 && ws.every(isQuant);
}

const sc = (w, chunk) => chunkLayout(w.dtype, chunk[2], w.k)[1] / 16;

function quantMatvecKernel(gpu, w, m, entry = "matvec", norm = false) {
  const kind = w.n >= LM_HEAD_ROWS ? "lm_head" : entry;
  const [lw, rg, rpt, ub] = MATVEC_SPLITS[kind];
  const stage = MATVEC_STAGE.includes(kind) && norm && w.k <= MATVEC_STAGE_K;
  // workgroup memory: vec4 channels of partial sums, or the staged x * g (ops_quant._matvec_kernel)
  const channels = 1 + Number(entry === "matvec_swiglu") + Number(norm && !stage);
  const shm = Math.max(256 * channels, stage ? MATVEC_STAGE_K / 4 + MATVEC_STAGE_K / 32 : 0);
  const kern = gpu.kernel("linear_quant", entry, {
    Q8: w.dtype === "q8_0", MV_M: 1, MV_NORM: norm, MV_LW: lw, MV_RG: rg, MV_RPT: rpt, MV_UB: ub, MV_STAGE: stage,
    MV_SHM: shm, MV_SSP: stage ? 256 : 1, F16_HW,
  });
  return [kern, rg * rpt];
}

export function quantLinear(gpu, x, w, y, { act = 0, accumulate = false, batchInvariant = false, norm = null, eps = 1e-5 } = {}) {
  if (x.rows === 0) return;
  const useMv = quantMatvecOk(x, [w], batchInvariant);
  if (norm !== null && !useMv) throw new Error("quantLinear(norm=...) needs the matvec path");
  if (!useMv && x.off % 4 === 0 && x.ld % 4 === 0) {
    // matmul.wgsl's register-blocked tiles, dequantising each K slice as it is staged (ops_quant.linear)
    matmulTiles(gpu, x, w, y, { act, accumulate, wQuant: w.dtype === "q8_0" ? 8 : 4, scaleOffset: (chunk) => sc(w, chunk) });
    return;
  }
  let kern, rowsPerGroup;
  if (useMv) [kern, rowsPerGroup] = quantMatvecKernel(gpu, w, x.rows, "matvec", norm !== null);
  else kern = gpu.kernel("linear_quant", "matmul", { Q8: w.dtype === "q8_0", F16_HW }); // x not 16-byte aligned
  for (const chunk of w.chunks) {
    const [buf, row0, nrows] = chunk;
    const params = packParams(x.rows, nrows, w.k, x.ld, x.off, y.ld, y.off + row0, Number(w.bias !== null), row0,
      act, Number(accumulate), Number(norm !== null), f(eps), 0, 0, sc(w, chunk), 0, 0, x.rows);
    // matvec: a workgroup per input row (Params.mq) and block of output rows
    const groups = useMv ? groups2d(x.rows * cdiv(nrows, rowsPerGroup)) : [cdiv(nrows, TILE), cdiv(x.rows, TILE)];
    gpu.dispatch(kern, params, [x.buf, buf, w.bias ?? buf, norm ?? buf, y.buf, buf, buf], groups);
  }
}

export function quantEmbed(gpu, tokens, tokOff, audio, apos0, acap, table, out) {
  const n = out.rows * out.cols;
  if (n === 0) return;
  const groups = groups2d(cdiv(n, 256));
  const kern = gpu.kernel("embed_quant", "embed", { Q8: table.dtype === "q8_0" });
  table.chunks.forEach((chunk, i) => {
    const [, row0, nrows] = chunk;
    const [qv, sv] = table.views(chunk);
    const params = packParams(out.rows, out.cols, tokOff, apos0 % acap, acap, row0, nrows, Number(i === 0));
    gpu.dispatch(kern, params, [tokens, audio, qv, sv, out.buf], groups);
  });
}

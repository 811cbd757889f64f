// gguf.js — GGUF reader over a list of byte shards (NAME.gguf.part-000, -001, ... or one file),
// never one ArrayBuffer over 1 GB: every read takes bytes from whichever shards hold them.
// Mirrors voxtral_wgpu/gguf_loader.py's GgufFile (counts and offsets checked before use).

export const GGML_TYPES = { 0: ["F32", 1, 4], 1: ["F16", 1, 2], 2: ["Q4_0", 32, 18], 8: ["Q8_0", 32, 34], 30: ["BF16", 1, 2] };
const MAX_BYTES = 1 << 30;

export class GgufError extends Error {}

/** Byte stream over shards (Uint8Array each, none over 1 GB). */
export class ShardStream {
  constructor(shards) {
    this.shards = shards;
    this.starts = [];
    let s = 0;
    for (const b of shards) {
      if (b.byteLength > MAX_BYTES) throw new GgufError("a shard over 1 GB: split the model into smaller shards");
      this.starts.push(s);
      s += b.byteLength;
    }
    this.size = s;
  }
  /** Bytes [offset, offset+n) as a Uint8Array (a view when one shard holds them, else a copy). */
  read(offset, n) {
    if (offset < 0 || n < 0 || offset + n > this.size) throw new GgufError(`read of [${offset}, ${offset + n}) past the end (${this.size} bytes): truncated file?`);
    let i = this.starts.length - 1;
    while (i > 0 && this.starts[i] > offset) i--;
    const local = offset - this.starts[i];
    if (local + n <= this.shards[i].byteLength) return this.shards[i].subarray(local, local + n);
    const out = new Uint8Array(n);
    let done = 0;
    while (done < n) {
      const sh = this.shards[i], lo = offset + done - this.starts[i];
      const take = Math.min(n - done, sh.byteLength - lo);
      out.set(sh.subarray(lo, lo + take), done);
      done += take; i++;
    }
    return out;
  }
}

export class GgufFile {
  constructor(shards) {
    this.stream = new ShardStream(shards);
    this.pos = 0;
    this._parse();
  }
  _take(n) { const b = this.stream.read(this.pos, n); this.pos += n; return b; }
  _dv(n) { const b = this._take(n); return new DataView(b.buffer, b.byteOffset, n); }
  u32() { return this._dv(4).getUint32(0, true); }
  u64() {
    const v = this._dv(8).getBigUint64(0, true);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new GgufError("corrupt GGUF header: 64-bit count too large");
    return Number(v);
  }
  string() {
    const n = this.u64();
    if (n > this.stream.size - this.pos) throw new GgufError("corrupt GGUF header: string past the end");
    return new TextDecoder().decode(this._take(n));
  }
  value(t, depth = 0) {
    const s = { 0: ["getUint8", 1], 1: ["getInt8", 1], 2: ["getUint16", 2], 3: ["getInt16", 2], 4: ["getUint32", 4],
      5: ["getInt32", 4], 6: ["getFloat32", 4], 7: ["getUint8", 1], 10: ["getBigUint64", 8], 11: ["getBigInt64", 8], 12: ["getFloat64", 8] }[t];
    if (s) {
      const v = this._dv(s[1])[s[0]](0, true);
      return typeof v === "bigint" ? Number(v) : t === 7 ? v !== 0 : v;
    }
    if (t === 8) return this.string();
    if (t === 9) {
      if (depth > 3) throw new GgufError("corrupt GGUF header: arrays nested too deep");
      const et = this.u32(), n = this.u64();
      if (n > this.stream.size - this.pos) throw new GgufError("corrupt GGUF header: array past the end");
      const out = [];
      for (let i = 0; i < n; i++) out.push(this.value(et, depth + 1));
      return out;
    }
    throw new GgufError(`unknown GGUF value type ${t}`);
  }
  _parse() {
    const magic = new TextDecoder().decode(this._take(4));
    if (magic !== "GGUF") throw new GgufError(`not a GGUF file (magic ${JSON.stringify(magic)})`);
    const version = this.u32();
    if (version !== 2 && version !== 3) throw new GgufError(`unsupported GGUF version ${version}`);
    const nTensors = this.u64(), nKv = this.u64();
    if (nTensors > this.stream.size / 24 || nKv > this.stream.size / 13) throw new GgufError("corrupt GGUF header: counts");
    this.metadata = {};
    for (let i = 0; i < nKv; i++) { const key = this.string(); this.metadata[key] = this.value(this.u32()); }
    const alignment = this.metadata["general.alignment"] ?? 32;
    const infos = [];
    for (let i = 0; i < nTensors; i++) {
      const name = this.string();
      const nd = this.u32();
      if (nd < 1 || nd > 4) throw new GgufError(`tensor ${name}: ${nd} dimensions`);
      const ne = []; for (let j = 0; j < nd; j++) ne.push(this.u64());
      const type = this.u32(), offset = this.u64();
      infos.push([name, ne, type, offset]);
    }
    this.dataStart = Math.ceil(this.pos / alignment) * alignment;
    this.tensors = {};
    for (const [name, ne, type, offset] of infos) {
      const t = GGML_TYPES[type];
      if (!t) throw new GgufError(`tensor ${name} has unsupported ggml type ${type}`);
      const [typeName, block, typeSize] = t;
      if (ne[0] % block) throw new GgufError(`tensor ${name}: rows not a multiple of the block`);
      const nEl = ne.reduce((a, b) => a * b, 1);
      const nbytes = (nEl / block) * typeSize;
      if (this.dataStart + offset + nbytes > this.stream.size) throw new GgufError(`tensor ${name} past the end: truncated file?`);
      this.tensors[name] = { name, type, typeName, shape: [...ne].reverse(), offset: this.dataStart + offset, nbytes };
    }
  }
  readRaw(name) { const t = this.tensors[name]; return this.stream.read(t.offset, t.nbytes); }
  readRowsRaw(name, r0, r1) {
    const t = this.tensors[name];
    const rowBytes = t.nbytes / t.shape[0];
    return this.stream.read(t.offset + r0 * rowBytes, (r1 - r0) * rowBytes);
  }
  /** Small tensors as Float32Array (F32 / F16 / BF16). */
  readF32(name) {
    const t = this.tensors[name];
    const raw = this.readRaw(name);
    const n = t.typeName === "F32" ? t.nbytes / 4 : t.nbytes / 2;
    const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    const out = new Float32Array(n);
    if (t.typeName === "F32") for (let i = 0; i < n; i++) out[i] = dv.getFloat32(4 * i, true);
    else if (t.typeName === "BF16") { const u = new Uint32Array(out.buffer); for (let i = 0; i < n; i++) u[i] = dv.getUint16(2 * i, true) << 16; }
    else if (t.typeName === "F16") for (let i = 0; i < n; i++) out[i] = halfToFloat(dv.getUint16(2 * i, true));
    else return dequantizeBlocks(raw, t.typeName);
    return out;
  }
}

/** GGML Q4_0 / Q8_0 blocks -> Float32Array: (q - 8) * d / q * d in f32, as ops_quant.dequantize_blocks. */
export function dequantizeBlocks(raw, typeName) {
  const bb = typeName === "Q4_0" ? 18 : 34;
  const nb = raw.byteLength / bb;
  const out = new Float32Array(nb * 32);
  for (let b = 0; b < nb; b++) {
    const o = b * bb;
    const d = Math.fround(halfToFloat(raw[o] | (raw[o + 1] << 8)));
    for (let j = 0; j < 32; j++) {
      let q;
      if (bb === 18) q = j < 16 ? (raw[o + 2 + j] & 15) - 8 : (raw[o + 2 + j - 16] >> 4) - 8;
      else q = (raw[o + 2 + j] << 24) >> 24;
      out[b * 32 + j] = Math.fround(q * d);
    }
  }
  return out;
}

export function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 31, m = h & 1023;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** Fetch a model's shards with progress: url, or url.part-000, -001, ... when the server lists them.
 *  `shardUrls`: explicit list; `sizes`: their byte counts when known (the server's manifest), else
 *  each shard's HEAD Content-Length. Each shard is cached with the Cache API when available; a shard
 *  whose bytes do not add up to its size is an error (a cached one is dropped and fetched again), so a
 *  truncated download or a stale cache entry never becomes weights. */
export async function fetchShards(shardUrls, onProgress = () => {}, { cacheName = "voxtral-wgpu-model", sizes = null } = {}) {
  const cache = (typeof caches !== "undefined" && location.protocol !== "http:" || location.hostname === "127.0.0.1" || location.hostname === "localhost")
    ? await caches.open(cacheName).catch(() => null) : null;
  const expected = sizes ?? await Promise.all(shardUrls.map(async (u) => {
    const r = await fetch(u, { method: "HEAD" });
    if (!r.ok) throw new GgufError(`${u}: HTTP ${r.status}`);
    return Number(r.headers.get("Content-Length") || 0);
  }));
  const total = expected.reduce((a, b) => a + b, 0);
  let done = 0;
  const out = [];
  const read = async (u, resp, want) => { // the body, checked against `want` bytes (0: unknown)
    const n = want || Number(resp.headers.get("Content-Length") || 0);
    if (n > MAX_BYTES) throw new GgufError(`${u}: a shard over 1 GB (${n} bytes): split the model into smaller shards`);
    const buf = new Uint8Array(n || 0), chunks = [];
    const reader = resp.body.getReader();
    let off = 0;
    for (;;) {
      const { done: end, value } = await reader.read();
      if (end) break;
      if (n && off + value.byteLength > n) { await reader.cancel(); return { error: `more than the ${n} bytes expected` }; }
      if (n) buf.set(value, off); else chunks.push(value);
      off += value.byteLength; done += value.byteLength;
      onProgress(done, total);
    }
    if (n && off !== n) return { error: `${off} bytes of the ${n} expected`, got: off };
    if (n) return { bytes: buf };
    const b = new Uint8Array(off); let o = 0; for (const c of chunks) { b.set(c, o); o += c.byteLength; }
    return { bytes: b };
  };
  for (let i = 0; i < shardUrls.length; i++) {
    const u = shardUrls[i];
    const cached = cache ? await cache.match(u) : null;
    if (cached) {
      const r = await read(u, cached, expected[i]);
      if (r.bytes) { out.push(r.bytes); continue; }
      done -= r.got ?? 0; // stale or truncated cache entry: drop it and download
      await cache.delete(u);
    }
    const resp = await fetch(u);
    if (!resp.ok) throw new GgufError(`${u}: HTTP ${resp.status}`);
    if (cache) { try { await cache.put(u, resp.clone()); } catch (e) { /* quota: just don't cache */ } }
    const r = await read(u, resp, expected[i]);
    if (!r.bytes) {
      if (cache) await cache.delete(u);
      throw new GgufError(`${u}: ${r.error} (truncated or changed download)`);
    }
    out.push(r.bytes);
  }
  return out;
}

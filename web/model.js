// model.js — the browser mirror of voxtral_wgpu/model.py (and gguf_loader._build): the Voxtral
// Realtime graph as lists of op calls. Same names, same buffers, same schedule; only decode() and
// the token readback are async (WebGPU maps buffers asynchronously).
import * as ops from "./ops.js";
import { ACT_GELU, Mat } from "./ops.js";

export const MEL_FRAMES_PER_POSITION = 8;
export const ENC_FRAMES_PER_POSITION = 4;
export const CONV0_CONTEXT = 3;
export const MAX_CHUNK_POSITIONS = 32;
export const OFFLINE_CHUNK_POSITIONS = 128;
export const TOKEN_RING = 4096;
// as model.py: the ring's buffer holds the ids, then each generated id's probability (f32 bits), so
// one readback brings back both
export const TOKEN_RING_WORDS = 2 * TOKEN_RING;
export const READBACK_STEPS = 16;
export const SAMPLES_PER_TOKEN = 1280;
export const N_MELS = 128;

// ------------------------------------------------------------------ config (config.py)
export function configFromGguf(meta) {
  const sec = (s, d) => {
    const o = {};
    for (const [k, def] of Object.entries(d)) o[k] = meta[`voxtral_wgpu.${s}.${k}`] ?? def;
    return o;
  };
  return {
    encoder: sec("encoder", { dim: 1280, n_layers: 32, n_heads: 32, n_kv_heads: 32, head_dim: 64, hidden_dim: 5120, norm_eps: 1e-5,
      rope_theta: 1e6, sliding_window: 750, num_mel_bins: 128, downsample_factor: 4 }),
    decoder: sec("decoder", { dim: 3072, n_layers: 26, n_heads: 32, n_kv_heads: 8, head_dim: 128, hidden_dim: 9216, norm_eps: 1e-5,
      rope_theta: 1e6, sliding_window: 8192, vocab_size: 131072, ada_dim: 32 }),
  };
}

// ------------------------------------------------------------------ weights (gguf_loader._build)
const ENC = "mm_streams_embeddings.embedding_module.whisper_encoder";
const MM = "mm_streams_embeddings.embedding_module";

/** Load the weights of a GgufFile (our quantizer's layout: Mistral-native names) onto the GPU.
 *  Host copies are dropped as soon as each tensor is queued. */
export async function loadWeights(gpu, gf, cfg, onProgress = () => {}) {
  const names = Object.keys(gf.tensors);
  let done = 0;
  const tick = () => onProgress(++done, names.length);
  const has = (n) => n in gf.tensors;
  const vec = (n) => { const a = gf.readF32(n); tick(); return a; };
  const gpuVec = (n, label) => gpu.upload(vec(n), label);
  const dense = (data, n, k, label, bias) => {
    const limit = Math.min(gpu.maxBinding, gpu.maxBuffer);
    const rpc = Math.max(1, Math.floor(limit / (k * 4)));
    const chunks = [];
    for (let r0 = 0; r0 < n; r0 += rpc) {
      const nr = Math.min(rpc, n - r0);
      const buf = gpu.empty(nr * k * 4, `${label}[${r0}:]`);
      gpu.write(buf, data.subarray(r0 * k, (r0 + nr) * k));
      chunks.push([buf, r0, nr]);
    }
    return new ops.DenseWeight(n, k, "f32", chunks, bias ? gpu.upload(bias, label + ".bias") : null);
  };
  const mat = async (n_, label, biasName = null) => {
    const name = has(n_) ? n_ : (n_ === `${MM}.tok_embeddings.weight` && has("tok_embeddings.weight") ? "tok_embeddings.weight" : n_);
    const t = gf.tensors[name];
    if (!t) throw new Error(`missing tensor ${n_}`);
    const [n, k] = t.shape;
    if (t.typeName === "Q4_0" || t.typeName === "Q8_0") {
      const bias = biasName ? gpuVec(biasName, label + ".bias") : null;
      const w = await ops.uploadQuant(gpu, (r0, r1) => gf.readRowsRaw(name, r0, r1), n, k, t.typeName.toLowerCase(), label, bias);
      tick();
      return w;
    }
    const bias = biasName ? vec(biasName) : null;
    const w = dense(gf.readF32(name), n, k, label, bias);  // BF16/F16 widened to f32 (small models only)
    tick();
    return w;
  };
  const conv = (wName, bName, label) => {
    const t = gf.tensors[wName];
    const [o, c, kk] = t.shape; // [out, in, 3] -> [out, 3*in] with tap-major columns
    const r = gf.readF32(wName);
    const re = new Float32Array(o * kk * c);
    for (let a = 0; a < o; a++) for (let j = 0; j < kk; j++) for (let b = 0; b < c; b++) re[(a * kk + j) * c + b] = r[(a * c + b) * kk + j];
    tick();
    return dense(re, o, kk * c, label, vec(bName));
  };
  const e = cfg.encoder, d = cfg.decoder;
  const conv0 = conv(`${ENC}.conv_layers.0.conv.weight`, `${ENC}.conv_layers.0.conv.bias`, "conv0");
  const conv1 = conv(`${ENC}.conv_layers.1.conv.weight`, `${ENC}.conv_layers.1.conv.bias`, "conv1");
  const encLayers = [];
  for (let i = 0; i < e.n_layers; i++) {
    const p = `${ENC}.transformer.layers.${i}`;
    encLayers.push({
      attention_norm: gpuVec(`${p}.attention_norm.weight`, `enc${i}.attention_norm`),
      wq: await mat(`${p}.attention.wq.weight`, `enc${i}.wq`, `${p}.attention.wq.bias`),
      wk: await mat(`${p}.attention.wk.weight`, `enc${i}.wk`),
      wv: await mat(`${p}.attention.wv.weight`, `enc${i}.wv`, `${p}.attention.wv.bias`),
      wo: await mat(`${p}.attention.wo.weight`, `enc${i}.wo`, `${p}.attention.wo.bias`),
      ffn_norm: gpuVec(`${p}.ffn_norm.weight`, `enc${i}.ffn_norm`),
      w1: await mat(`${p}.feed_forward.w1.weight`, `enc${i}.w1`),
      w2: await mat(`${p}.feed_forward.w2.weight`, `enc${i}.w2`, `${p}.feed_forward.w2.bias`),
      w3: await mat(`${p}.feed_forward.w3.weight`, `enc${i}.w3`),
    });
    await gpu.sync(); // let the browser release staging memory as we go
  }
  const encNorm = gpuVec(`${ENC}.transformer.norm.weight`, "enc.norm");
  const adapter0 = await mat(`${MM}.audio_language_projection.0.weight`, "adapter0");
  const adapter2 = await mat(`${MM}.audio_language_projection.2.weight`, "adapter2");
  const tok = await mat(`${MM}.tok_embeddings.weight`, "tok_embeddings");
  const decLayers = [];
  for (let i = 0; i < d.n_layers; i++) {
    const p = `layers.${i}`;
    decLayers.push({
      attention_norm: gpuVec(`${p}.attention_norm.weight`, `dec${i}.attention_norm`),
      wq: await mat(`${p}.attention.wq.weight`, `dec${i}.wq`),
      wk: await mat(`${p}.attention.wk.weight`, `dec${i}.wk`),
      wv: await mat(`${p}.attention.wv.weight`, `dec${i}.wv`),
      wo: await mat(`${p}.attention.wo.weight`, `dec${i}.wo`),
      ffn_norm_host: vec(`${p}.ffn_norm.weight`),
      w1: await mat(`${p}.feed_forward.w1.weight`, `dec${i}.w1`),
      w2: await mat(`${p}.feed_forward.w2.weight`, `dec${i}.w2`),
      w3: await mat(`${p}.feed_forward.w3.weight`, `dec${i}.w3`),
      ada_down: vec(`${p}.ada_rms_norm_t_cond.0.weight`),
      ada_up: vec(`${p}.ada_rms_norm_t_cond.2.weight`),
    });
    await gpu.sync();
  }
  const norm = gpuVec("norm.weight", "norm");
  await gpu.sync();
  return { cfg, conv0, conv1, encLayers, encNorm, adapter0, adapter2, tokEmbeddings: tok, decLayers, norm };
}

// ------------------------------------------------------------------ ada scales (float64 host math)
export function timeEmbedding(t, dim, theta = 10000.0) {
  const half = dim / 2;
  const out = new Float64Array(dim);
  for (let i = 0; i < half; i++) {
    const inv = Math.exp((-Math.log(theta) * i) / half);
    out[i] = Math.cos(t * inv);
    out[half + i] = Math.sin(t * inv);
  }
  return out;
}

/** erf in float64 (Taylor series below 2.5, continued fraction for erfc above): ~1e-15. */
export function erf(x) {
  const ax = Math.abs(x);
  if (ax < 2.5) {
    let sum = 0, term = x, n = 0;
    while (Math.abs(term) > 1e-17 * Math.abs(sum) || n < 3) {
      sum += term / (2 * n + 1);
      n++;
      term *= (-x * x) / n;
      if (n > 200) break;
    }
    return (2 / Math.sqrt(Math.PI)) * sum;
  }
  // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...)))) (Lentz, backward)
  let f = ax;
  for (let k = 60; k >= 1; k--) f = ax + (k / 2) / f;
  const erfc = Math.exp(-ax * ax) / Math.sqrt(Math.PI) / f;
  return x > 0 ? 1 - erfc : erfc - 1;
}

export function adaScales(weights, nDelay) {
  const d = weights.cfg.decoder;
  const t = timeEmbedding(nDelay, d.dim);
  return weights.decLayers.map((layer) => {
    const h = new Float64Array(d.ada_dim);
    for (let a = 0; a < d.ada_dim; a++) {
      let s = 0;
      for (let j = 0; j < d.dim; j++) s += layer.ada_down[a * d.dim + j] * t[j];
      h[a] = 0.5 * s * (1 + erf(s / Math.SQRT2));
    }
    const out = new Float64Array(d.dim);
    for (let j = 0; j < d.dim; j++) {
      let s = 0;
      for (let a = 0; a < d.ada_dim; a++) s += layer.ada_up[j * d.ada_dim + a] * h[a];
      out[j] = 1 + s;
    }
    return out;
  });
}

export function delayMsToTokens(ms) { return Math.round(ms / 80); }

/** Zero samples (left, right) around n samples for offline decoding (audio.padding). */
export function padding(nSamples, nDelay, nLeftPadTokens = 32) {
  const align = (SAMPLES_PER_TOKEN - (nSamples % SAMPLES_PER_TOKEN)) % SAMPLES_PER_TOKEN;
  return [nLeftPadTokens * SAMPLES_PER_TOKEN, align + (nDelay + 1 + 10) * SAMPLES_PER_TOKEN];
}

export class Model {
  constructor(gpu, weights, tokenizer, { transcriptionDelayMs = null, kvCache = null } = {}) {
    this.gpu = gpu;
    this.weights = weights;
    this.cfg = weights.cfg;
    this.tokenizer = tokenizer;
    this.defaultDelayMs = transcriptionDelayMs ?? tokenizer.audio.transcription_delay_ms ?? 480;
    this.nLeftPad = tokenizer.audio.streaming_n_left_pad_tokens ?? 32;
    this._ffnNorms = new Map();
    this.argmax = new ops.Argmax(gpu, this.cfg.decoder.vocab_size);
    // KV caches as in model.py: f16 for quantised models (half the session memory), f32 for BF16;
    // lean (f16) sessions also encode files in smaller batches (the encoder ring is window + batch - 1 rows)
    const quantized = ["q4_0", "q8_0"].includes(weights.tokEmbeddings?.dtype);
    this.kvCache = kvCache ?? (quantized ? "f16" : "f32");
    if (!["f32", "f16"].includes(this.kvCache)) throw new Error(`kvCache must be f32 or f16, not ${kvCache}`);
    this.kvF16 = this.kvCache === "f16";
    this.offlineChunkPositions = OFFLINE_CHUNK_POSITIONS;
  }
  ffnNorms(nDelay) {
    if (!this._ffnNorms.has(nDelay)) {
      const scales = adaScales(this.weights, nDelay);
      this._ffnNorms.set(nDelay, this.weights.decLayers.map((layer, i) => {
        const g = new Float32Array(layer.ffn_norm_host.length);
        for (let j = 0; j < g.length; j++) g[j] = layer.ffn_norm_host[j] * scales[i][j];
        return this.gpu.upload(g, `ffn_norm${i}`);
      }));
    }
    return this._ffnNorms.get(nDelay);
  }
  prompt(nDelay) {
    const t = this.tokenizer;
    return [t.bosId, ...Array(this.nLeftPad + nDelay).fill(t.streamingPadId)];
  }
}

export class Session {
  constructor(model, nDelay, { chunkPositions = MAX_CHUNK_POSITIONS } = {}) {
    this.model = model;
    this.chunkPositions = chunkPositions;
    this.gpu = model.gpu;
    this.cfg = model.cfg;
    this.nDelay = nDelay;
    this.promptIds = model.prompt(nDelay);
    this.ffnNorms = model.ffnNorms(nDelay);
    this.kvF16 = model.kvF16;
    this.kvBytes = this.kvF16 ? 2 : 4;  // per cached element
    if (this.cfg.encoder.downsample_factor !== ENC_FRAMES_PER_POSITION) throw new Error("downsample_factor unsupported");
    this.enc = this._encoderState();
    this.dec = this._decoderState();
    this._melPending = new Float32Array(0);
    this._melContext = new Float32Array(CONV0_CONTEXT * N_MELS);
    this.positionsEncoded = 0;
    this.nextPos = 0;
    this.prefilled = false;
    this.totalPositions = null;
    this.tokensReadUntil = this.promptIds.length;
    this.generated = [];
    this.generatedProbs = []; // softmax probability of each generated id, aligned with it
    this.done = false;
    this.eos = false;
    this.stopOnEos = true;
  }

  _encoderState() {
    const g = this.gpu, e = this.cfg.encoder, f = 4, fkv = this.kvBytes;
    const S = ENC_FRAMES_PER_POSITION * this.chunkPositions;
    const eq = e.n_heads * e.head_dim, ekv = e.n_kv_heads * e.head_dim;
    const cap = e.sliding_window + S - 1; // the shared ring (model.py _EncoderState: why)
    const hist = e.sliding_window - 1; // each layer's last positions, kept for the next chunk
    return {
      mel: g.empty(f * (CONV0_CONTEXT + 2 * S) * e.num_mel_bins, "enc.mel"),
      g0: g.empty(f * (1 + 2 * S) * e.dim, "enc.g0"),
      h: g.empty(f * S * e.dim, "enc.h"), xb: g.empty(f * S * e.dim, "enc.xb"),
      qkv: g.empty(f * S * (eq + 2 * ekv), "enc.qkv"), att: g.empty(f * S * eq, "enc.att"),
      f1: g.empty(f * S * e.hidden_dim, "enc.f1"), f3: g.empty(f * S * e.hidden_dim, "enc.f3"),
      out: g.empty(f * S * e.dim, "enc.out"),
      a1: g.empty(f * this.chunkPositions * this.cfg.decoder.dim, "adapter.a1"),
      rope: g.empty(f * S * e.head_dim, "enc.rope"),
      kHist: Array.from({ length: e.n_layers }, (_, i) => g.empty(fkv * Math.max(hist, 1) * ekv, `enc.k_hist${i}`)),
      vHist: Array.from({ length: e.n_layers }, (_, i) => g.empty(fkv * Math.max(hist, 1) * ekv, `enc.v_hist${i}`)),
      hist,
      kWork: g.empty(fkv * cap * ekv, "enc.k_work"), vWork: g.empty(fkv * cap * ekv, "enc.v_work"),
      cap,
    };
  }

  _decoderState() {
    const g = this.gpu, d = this.cfg.decoder, f = 4, fkv = this.kvBytes;
    const R = this.promptIds.length;
    const dq = d.n_heads * d.head_dim, dkv = d.n_kv_heads * d.head_dim;
    const acap = this.chunkPositions + R + 1;
    const maxCap = d.sliding_window + R - 1;
    const cap = Math.min(maxCap, Math.max(256, R));
    const tokens = g.empty(4 * TOKEN_RING_WORDS, "dec.tokens");
    g.write(tokens, new Uint32Array(this.promptIds));
    return {
      x: g.empty(f * R * d.dim, "dec.x"), xb: g.empty(f * R * d.dim, "dec.xb"),
      qkv: g.empty(f * R * (dq + 2 * dkv), "dec.qkv"),
      part: ops.decodeAttentionScratch(g, d.n_heads, d.head_dim, d.sliding_window),
      att: g.empty(f * R * dq, "dec.att"),
      f1: g.empty(f * R * d.hidden_dim, "dec.f1"), f3: g.empty(f * R * d.hidden_dim, "dec.f3"),
      z: g.empty(f * d.dim, "dec.z"), logits: g.empty(f * d.vocab_size, "dec.logits"),
      rope: g.empty(f * R * d.head_dim, "dec.rope"),
      audio: g.empty(f * acap * d.dim, "dec.audio"), acap, tokens,
      kCache: Array.from({ length: d.n_layers }, (_, i) => g.empty(fkv * cap * dkv, `dec.k_cache${i}`)),
      vCache: Array.from({ length: d.n_layers }, (_, i) => g.empty(fkv * cap * dkv, `dec.v_cache${i}`)),
      cap, maxCap,
    };
  }

  _growDecoderCache(positionsNeeded) {
    const st = this.dec;
    if (positionsNeeded <= st.cap || st.cap >= st.maxCap) return;
    let newCap = st.cap;
    while (newCap < positionsNeeded && newCap < st.maxCap) newCap = Math.min(2 * newCap, st.maxCap);
    this._resizeDecoderCache(newCap, { keep: true });
  }

  /** Reallocate the decoder KV ring with newCap slots; `keep` copies the cached positions over (no
   *  wrap has happened yet, so slot == position), else the old ring is freed first. (model.py) */
  _resizeDecoderCache(newCap, { keep }) {
    const d = this.cfg.decoder, st = this.dec;
    const dkv = d.n_kv_heads * d.head_dim;
    const old = [...st.kCache, ...st.vCache];
    const free = () => {
      this.gpu.flush();
      this.gpu.forget(...old);
      for (const b of old) { this.gpu.bytesAllocated -= b.size; b.destroy(); }
    };
    if (!keep) free();
    for (const caches of [st.kCache, st.vCache]) {
      caches.forEach((buf, i) => {
        const nb = this.gpu.empty(this.kvBytes * newCap * dkv, buf.label);
        if (keep) this.gpu.copy(buf, 0, nb, 0, this.kvBytes * st.cap * dkv);
        caches[i] = nb;
      });
    }
    if (keep) free();
    st.cap = newCap;
  }

  release() {
    if (this._released) return;
    this._released = true;
    this.done = true;
    this.gpu.flush();
    const bufs = [];
    for (const st of [this.enc, this.dec]) for (const v of Object.values(st)) for (const b of Array.isArray(v) ? v : [v]) if (b instanceof GPUBuffer) bufs.push(b);
    this.gpu.forget(...bufs);
    for (const b of bufs) { this.gpu.bytesAllocated -= b.size; b.destroy(); }
  }

  // ------------------------------------------------------------------ input
  pushMel(frames) {
    if (!frames.length) return;
    const m = new Float32Array(this._melPending.length + frames.length);
    m.set(this._melPending); m.set(frames, this._melPending.length);
    this._melPending = m;
  }
  /** The input ends at totalPositions positions (all their mel frames pushed). */
  close(totalPositions) {
    this.totalPositions = totalPositions;
    const needed = Math.min(this.dec.maxCap, totalPositions);
    // nothing cached yet (offline: close() comes first): size the ring once instead of doubling it
    // later, when the old and the new ring would both be held
    if (!this.prefilled && needed > this.dec.cap) this._resizeDecoderCache(needed, { keep: false });
  }

  // ------------------------------------------------------------------ encoder + adapter
  encodeAvailable() {
    for (;;) {
      const whole = Math.floor(this._melPending.length / N_MELS / MEL_FRAMES_PER_POSITION);
      const room = this.dec.acap - (this.positionsEncoded - this.nextPos);
      const n = Math.min(whole, this.chunkPositions, room);
      if (n <= 0) return;
      const cut = n * MEL_FRAMES_PER_POSITION * N_MELS;
      const mel = this._melPending.slice(0, cut);
      this._melPending = this._melPending.slice(cut);
      this._encodeChunk(mel, n);
    }
  }

  _encodeChunk(mel, n) {
    const g = this.gpu, e = this.cfg.encoder, st = this.enc, w = this.model.weights;
    const T = MEL_FRAMES_PER_POSITION * n, S = ENC_FRAMES_PER_POSITION * n;
    const p0 = this.positionsEncoded * ENC_FRAMES_PER_POSITION;
    const eq = e.n_heads * e.head_dim, ekv = e.n_kv_heads * e.head_dim;
    const withCtx = new Float32Array(this._melContext.length + mel.length);
    withCtx.set(this._melContext); withCtx.set(mel, this._melContext.length);
    g.write(st.mel, withCtx);
    this._melContext = withCtx.slice(withCtx.length - CONV0_CONTEXT * N_MELS);
    ops.linear(g, new Mat(st.mel, T + 1, 3 * e.num_mel_bins, e.num_mel_bins), w.conv0, Mat.of(st.g0, T + 1, e.dim), { act: ACT_GELU, batchInvariant: true });
    if (this.positionsEncoded === 0) g.clear(st.g0, 0, 4 * e.dim);
    const h = Mat.of(st.h, S, e.dim);
    ops.linear(g, new Mat(st.g0, S, 3 * e.dim, 2 * e.dim), w.conv1, h, { act: ACT_GELU, batchInvariant: true });

    g.write(st.rope, ops.ropeTable(p0, S, e.head_dim, e.rope_theta));
    const xb = Mat.of(st.xb, S, e.dim), qkv = Mat.of(st.qkv, S, eq + 2 * ekv);
    const att = Mat.of(st.att, S, eq), f1 = Mat.of(st.f1, S, e.hidden_dim), f3 = Mat.of(st.f3, S, e.hidden_dim);
    const rowBytes = this.kvBytes * ekv;
    const seen = Math.min(p0, st.hist), kept = Math.min(S, st.hist);
    w.encLayers.forEach((layer, i) => {
      ops.qkvProj(g, h, layer.wq, layer.wk, layer.wv, qkv, { norm: layer.attention_norm, eps: e.norm_eps, scratch: xb, batchInvariant: true });
      ops.ringCopy(g, st.kHist[i], st.vHist[i], st.hist, st.kWork, st.vWork, st.cap, p0 - seen, seen, rowBytes);
      ops.ropeQkv(g, st.rope, qkv, st.kWork, st.vWork, { nHeads: e.n_heads, nKvHeads: e.n_kv_heads, headDim: e.head_dim, pos0: p0, cap: st.cap, kvF16: this.kvF16 });
      ops.attention(g, qkv.cols_(0, eq), st.kWork, st.vWork, att, { nHeads: e.n_heads, nKvHeads: e.n_kv_heads, headDim: e.head_dim, pos0: p0, window: e.sliding_window, cap: st.cap, kvF16: this.kvF16 });
      ops.ringCopy(g, st.kWork, st.vWork, st.cap, st.kHist[i], st.vHist[i], st.hist, p0 + S - kept, kept, rowBytes);
      ops.linear(g, att, layer.wo, h, { accumulate: true, batchInvariant: true });
      ops.swigluFfnIn(g, h, layer.w1, layer.w3, f1, { norm: layer.ffn_norm, eps: e.norm_eps, scratch: xb, tmp: f3, batchInvariant: true });
      ops.linear(g, f1, layer.w2, h, { accumulate: true, batchInvariant: true });
    });
    const out = Mat.of(st.out, S, e.dim);
    ops.rmsNorm(g, h, w.encNorm, out, e.norm_eps);

    const d = this.cfg.decoder;
    const a1 = Mat.of(st.a1, n, d.dim);
    ops.linear(g, out.reshapeRows(ENC_FRAMES_PER_POSITION), w.adapter0, a1, { act: ACT_GELU, batchInvariant: true });
    const ring = Mat.of(this.dec.audio, this.dec.acap, d.dim);
    const first = this.positionsEncoded % this.dec.acap;
    const head = Math.min(n, this.dec.acap - first);
    ops.linear(g, a1.take(0, head), w.adapter2, ring.take(first, head), { batchInvariant: true });
    if (head < n) ops.linear(g, a1.take(head, n - head), w.adapter2, ring.take(0, n - head), { batchInvariant: true });
    this.positionsEncoded += n;
  }

  // ------------------------------------------------------------------ decoder
  _decoderRows(p0, rows, { head }) {
    const g = this.gpu, d = this.cfg.decoder, st = this.dec, w = this.model.weights;
    const dq = d.n_heads * d.head_dim, dkv = d.n_kv_heads * d.head_dim;
    this._growDecoderCache(p0 + rows);
    const x = Mat.of(st.x, rows, d.dim);
    ops.embed(g, st.tokens, p0 % TOKEN_RING, st.audio, p0, st.acap, w.tokEmbeddings, x);
    g.write(st.rope, ops.ropeTable(p0, rows, d.head_dim, d.rope_theta));
    const xb = Mat.of(st.xb, rows, d.dim), qkv = Mat.of(st.qkv, rows, dq + 2 * dkv);
    const att = Mat.of(st.att, rows, dq), f1 = Mat.of(st.f1, rows, d.hidden_dim), f3 = Mat.of(st.f3, rows, d.hidden_dim);
    w.decLayers.forEach((layer, i) => {
      ops.qkvProj(g, x, layer.wq, layer.wk, layer.wv, qkv, { norm: layer.attention_norm, eps: d.norm_eps, scratch: xb });
      const heads = { nHeads: d.n_heads, nKvHeads: d.n_kv_heads, headDim: d.head_dim };
      if (rows === 1) { // decode: one kernel rotates q and k, appends k and v to the rings and attends
        ops.decodeAttention(g, st.rope, qkv, st.kCache[i], st.vCache[i], att, { ...heads, pos0: p0, window: d.sliding_window, cap: st.cap, scratch: st.part, kvF16: this.kvF16 });
      } else {
        ops.ropeQkv(g, st.rope, qkv, st.kCache[i], st.vCache[i], { ...heads, pos0: p0, cap: st.cap, kvF16: this.kvF16 });
        ops.attention(g, qkv.cols_(0, dq), st.kCache[i], st.vCache[i], att, { ...heads, pos0: p0, window: d.sliding_window, cap: st.cap, kvF16: this.kvF16 });
      }
      ops.linear(g, att, layer.wo, x, { accumulate: true });
      ops.swigluFfnIn(g, x, layer.w1, layer.w3, f1, { norm: this.ffnNorms[i], eps: d.norm_eps, scratch: xb, tmp: f3 });
      ops.linear(g, f1, layer.w2, x, { accumulate: true });
    });
    if (head) {
      ops.linear(g, x.take(rows - 1, 1), w.tokEmbeddings, Mat.of(st.logits, 1, d.vocab_size), { norm: w.norm, eps: d.norm_eps, scratch: Mat.of(st.z, 1, d.dim) });
      this.model.argmax.run(g, st.logits, st.tokens, (p0 + rows) % TOKEN_RING, { probsOff: TOKEN_RING });
    }
  }

  /** Run every decoder step whose audio embedding exists; resolves to the newly generated ids. */
  async decode() {
    const nBefore = this.generated.length;
    const L = this.promptIds.length;
    while (!this.done) {
      this.encodeAvailable();
      if (!this.prefilled) {
        if (this.positionsEncoded < L) break;
        this._decoderRows(0, L - 1, { head: false });
        this.nextPos = L - 1;
        this.prefilled = true;
      }
      let limit = this.positionsEncoded;
      if (this.totalPositions !== null) limit = Math.min(limit, this.totalPositions - 1);
      if (this.nextPos >= limit) {
        await this._readTokens();
        if (this.totalPositions !== null && this.nextPos >= this.totalPositions - 1) this.done = true;
        break;
      }
      this._decoderRows(this.nextPos, 1, { head: true });
      this.nextPos += 1;
      this.gpu.flush();
      if (this.nextPos - this.tokensReadUntil >= READBACK_STEPS) await this._readTokens();
    }
    return this.generated.slice(nBefore);
  }

  async _readTokens() {
    const first = this.tokensReadUntil, last = this.nextPos;
    if (last < first || this.done) return;
    const ring = await this.gpu.read(this.dec.tokens, Uint32Array, TOKEN_RING_WORDS);
    const probs = new Float32Array(ring.buffer, ring.byteOffset + 4 * TOKEN_RING, TOKEN_RING);
    this.tokensReadUntil = last + 1;
    const eos = this.model.tokenizer.eosId;
    for (let p = first; p <= last; p++) {
      const t = ring[p % TOKEN_RING];
      if (t === eos && this.stopOnEos) { this.done = true; this.eos = true; break; }
      this.generatedProbs.push(probs[p % TOKEN_RING]);
      this.generated.push(t);
    }
  }
}

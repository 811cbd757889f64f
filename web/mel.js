// mel.js — log-mel front end, a port of csrc/mel.c (float64 math, float32 output): periodic Hann
// window of 400, hop 160, reflect padding of 200 at both ends, |DFT|^2 of bins 0..200, Slaney mel
// filterbank (128 filters, area-normalised), log10 floored at 1e-10, clamped to max - 8 with
// max fixed at 1.5, then (v + 4) / 4. The DFT is a direct real DFT in float64 (tables of
// cos/sin), which equals the C code's split-radix FFT far below the 1e-4 tolerance.
export const SAMPLE_RATE = 16000, N_FFT = 400, HOP = 160, PAD = 200, N_MEL = 128, N_BINS = 201;

let TABLES = null;

function hzToMel(f) { return f < 1000 ? (3 * f) / 200 : 15 + Math.log(f / 1000) * (27 / Math.log(6.4)); }
function melToHz(m) { return m < 15 ? (200 * m) / 3 : 1000 * Math.exp((m - 15) * (Math.log(6.4) / 27)); }

function tables() {
  if (TABLES) return TABLES;
  const window = new Float64Array(N_FFT);
  for (let j = 0; j < N_FFT; j++) window[j] = 0.5 - 0.5 * Math.cos((2 * Math.PI * j) / N_FFT);
  const cos = new Float64Array(N_FFT), sin = new Float64Array(N_FFT);
  for (let j = 0; j < N_FFT; j++) { cos[j] = Math.cos((2 * Math.PI * j) / N_FFT); sin[j] = Math.sin((2 * Math.PI * j) / N_FFT); }
  const edges = new Float64Array(N_MEL + 2);
  const melMax = hzToMel(SAMPLE_RATE / 2);
  for (let j = 0; j < N_MEL + 2; j++) edges[j] = melToHz((melMax * j) / (N_MEL + 1));
  const fb = [];
  for (let m = 0; m < N_MEL; m++) {
    const lo = edges[m], mid = edges[m + 1], hi = edges[m + 2], enorm = 2 / (hi - lo);
    let k0 = -1, k1 = -1;
    const w = new Float64Array(N_BINS);
    for (let k = 0; k < N_BINS; k++) {
      const fk = k * (SAMPLE_RATE / N_FFT);
      const up = (fk - lo) / (mid - lo), down = (hi - fk) / (hi - mid);
      let v = up < down ? up : down;
      if (v < 0) v = 0;
      w[k] = v * enorm;
      if (w[k] > 0) { if (k0 < 0) k0 = k; k1 = k + 1; }
    }
    if (k0 < 0) k0 = k1 = 0;
    fb.push([k0, w.slice(k0, k1)]);
  }
  TABLES = { window, cos, sin, fb };
  return TABLES;
}

function reflect(i, n) {
  if (i >= 0 && i < n) return i;
  if (n === 1) return 0;
  const period = 2 * (n - 1);
  let j = i % period;
  if (j < 0) j += period;
  return j < n ? j : period - j;
}

/** Float32Array of n samples (16 kHz) -> Float32Array [floor(n / 160), 128] row-major. */
export function logMel(x) {
  return logMelRange(x, 0, Math.floor(x.length / HOP), 0, x.length);
}

/** Streaming front end: feed() any number of samples, get the frames whose windows are complete
 *  (the right reflection is only known at finish(): frames near the end wait for it). Output equals
 *  logMel() of the whole signal frame for frame. Only the samples later frames can still read are
 *  kept, so memory and the per-feed cost stay bounded however long the stream runs. */
export class MelStream {
  constructor() {
    this.kept = new Float32Array(0); // samples base .. total-1
    this.base = 0;
    this.total = 0;
    this.emitted = 0;
  }
  feed(x) {
    const s = new Float32Array(this.kept.length + x.length);
    s.set(this.kept); s.set(x, this.kept.length);
    this.kept = s;
    this.total += x.length;
    return this._emit(false);
  }
  finish() { return this._emit(true); }
  _emit(final) {
    const n = this.total;
    // frame t reads samples t*160 - 200 .. t*160 + 199 (reflected at the ends); before the end is
    // known only frames whose window lies inside the samples so far are final
    let ready = final ? Math.floor(n / HOP) : Math.max(0, Math.floor((n - N_FFT + PAD) / HOP) + 1);
    ready = Math.min(ready, Math.floor(n / HOP));
    if (ready <= this.emitted) return new Float32Array(0);
    const out = logMelRange(this.kept, this.emitted, ready, this.base, n);
    this.emitted = ready;
    // later frames start at >= emitted*160 - 200; reflections at the end stay within the last 400
    // samples; a window of margin keeps short signals (multiple reflections) whole
    const keepFrom = Math.max(0, this.emitted * HOP - PAD - N_FFT);
    if (keepFrom > this.base) {
      this.kept = this.kept.slice(keepFrom - this.base);
      this.base = keepFrom;
    }
    return out;
  }
}

/** Frames t0..t1-1 of logMel() of a signal of n samples, of which x holds samples base.. (frames
 *  inside the signal do not depend on its end). */
function logMelRange(x, t0, t1, base, n) {
  const T = tables();
  const out = new Float32Array((t1 - t0) * N_MEL);
  const y = new Float64Array(N_FFT), pw = new Float64Array(N_BINS);
  for (let t = t0; t < t1; t++) {
    const start = t * HOP - PAD;
    for (let j = 0; j < N_FFT; j++) y[j] = T.window[j] * x[reflect(start + j, n) - base];
    for (let k = 0; k < N_BINS; k++) {
      let re = 0, im = 0, idx = 0;
      for (let j = 0; j < N_FFT; j++) { re += y[j] * T.cos[idx]; im -= y[j] * T.sin[idx]; idx += k; if (idx >= N_FFT) idx -= N_FFT; }
      pw[k] = re * re + im * im;
    }
    for (let m = 0; m < N_MEL; m++) {
      const [k0, w] = T.fb[m];
      let acc = 0;
      for (let k = 0; k < w.length; k++) acc += w[k] * pw[k0 + k];
      let v = 1.5 - 8.0;
      if (acc >= 3.162e-7) { v = Math.log10(acc); if (v < 1.5 - 8.0) v = 1.5 - 8.0; }
      out[(t - t0) * N_MEL + m] = (v + 4) / 4;
    }
  }
  return out;
}

// upload.js — transcribe an audio file in the page: the browser decodes it (any format and rate it
// supports) straight to 16 kHz (decodeAudioData of an OfflineAudioContext resamples to the context's
// rate), channels are averaged to mono as voxtral_wgpu.audio does, then the offline graph runs exactly
// like api.transcribe. Shared by the page (app.js) and the browser test (test/test.mjs).
import { logMel } from "./mel.js";
import { Session, padding, delayMsToTokens, MEL_FRAMES_PER_POSITION, SAMPLES_PER_TOKEN, N_MELS } from "./model.js";

/** Decoded mono samples at 16 kHz (Float32Array) of an encoded file's bytes. */
export async function decodeAudioFile(arrayBuffer) {
  const ctx = new OfflineAudioContext({ numberOfChannels: 1, length: 1, sampleRate: 16000 });
  let buf;
  try {
    buf = await ctx.decodeAudioData(arrayBuffer);
  } catch (e) {
    throw new Error(`this file could not be decoded as audio (${e.message || e})`);
  }
  const n = buf.length, c = buf.numberOfChannels;
  if (c === 1) return buf.getChannelData(0).slice();
  // the mean of the channels in float32, as numpy's x.mean(axis=1, dtype=float32) in load_audio
  const chans = Array.from({ length: c }, (_, i) => buf.getChannelData(i));
  const out = new Float32Array(n);
  for (let j = 0; j < n; j++) {
    let acc = chans[0][j];
    for (let i = 1; i < c; i++) acc = Math.fround(acc + chans[i][j]);
    out[j] = acc / c;
  }
  return out;
}

/** Offline transcription of 16 kHz mono `samples`: resolves to the token ids (EOS stops it, as
 *  api.transcribe). `onIds(ids)` gets each batch of new ids, `onStats(steps, seconds)` the progress. */
export async function transcribeSamples(model, samples, { onIds = () => {}, onStats = () => {} } = {}) {
  const nDelay = delayMsToTokens(model.defaultDelayMs);
  const [l, r] = padding(samples.length, nDelay, model.nLeftPad);
  const padded = new Float32Array(l + samples.length + r);
  padded.set(samples, l);
  const mel = logMel(padded);
  const s = new Session(model, nDelay, { chunkPositions: model.offlineChunkPositions });
  s.close(padded.length / SAMPLES_PER_TOKEN);
  const chunk = MEL_FRAMES_PER_POSITION * model.offlineChunkPositions * N_MELS;
  const ids = [];
  try {
    const step = async () => {
      const got = await s.decode();
      ids.push(...got);
      if (got.length) onIds(got);
      onStats(Math.max(s.nextPos - s.promptIds.length + 1, 0), samples.length / 16000);
    };
    for (let i = 0; i < mel.length && !s.done; i += chunk) {
      s.pushMel(mel.subarray(i, i + chunk));
      await step();
    }
    if (!s.done) await step();
  } finally {
    s.release();
  }
  return ids;
}

// mic.js — live transcription from the microphone: getUserMedia -> AudioWorklet (worklet.js) at a
// 16 kHz AudioContext (the browser resamples) -> MelStream -> a streaming Session, text out as the
// decoder produces it. Shared by the page (app.js) and the browser test (test/test.mjs).
import { MelStream } from "./mel.js";
import { Session, padding, delayMsToTokens, MEL_FRAMES_PER_POSITION, SAMPLES_PER_TOKEN } from "./model.js";

/** Start streaming. `onIds(ids)` gets each batch of new token ids; `onStats(steps, seconds)` the
 *  decoder's progress. `keepSamples`: also keep every sample the worklet delivered (tests).
 *  Returns { stop() -> Promise<all ids>, samples() -> Float32Array, fed() -> samples so far }. */
export async function startMicrophone(model, { onIds = () => {}, onStats = () => {}, keepSamples = false } = {}) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
  const ctx = new AudioContext({ sampleRate: 16000 }); // the browser resamples the microphone to 16 kHz
  await ctx.audioWorklet.addModule(new URL("./worklet.js", import.meta.url));
  const node = new AudioWorkletNode(ctx, "capture");
  const mute = new GainNode(ctx, { gain: 0 }); // keeps the node pulled by the graph; plays nothing
  ctx.createMediaStreamSource(stream).connect(node).connect(mute).connect(ctx.destination);
  if (ctx.state !== "running") await ctx.resume();
  const nDelay = delayMsToTokens(model.defaultDelayMs);
  const s = new Session(model, nDelay);
  const melS = new MelStream();
  s.pushMel(melS.feed(new Float32Array(model.nLeftPad * SAMPLES_PER_TOKEN))); // the left padding, as offline
  const kept = [];
  let fed = 0, busy = null, stopped = false;
  const pump = () => { // one decode at a time; audio that arrives meanwhile waits in the session
    if (busy) return;
    busy = (async () => {
      try {
        const ids = await s.decode();
        if (ids.length) onIds(ids);
        onStats(s.nextPos - s.promptIds.length + 1, fed / 16000);
      } finally { busy = null; }
    })();
  };
  node.port.onmessage = (e) => {
    if (stopped) return;
    fed += e.data.length;
    if (keepSamples) kept.push(e.data);
    s.pushMel(melS.feed(e.data));
    pump();
  };
  return {
    fed: () => fed,
    samples: () => { const all = new Float32Array(fed); let o = 0; for (const c of kept) { all.set(c, o); o += c.length; } return all; },
    stop: async () => {
      stopped = true;
      node.port.onmessage = null;
      stream.getTracks().forEach((t) => t.stop());
      await ctx.close();
      while (busy) await busy;
      // the offline right padding (align to 80 ms, delay + 11 positions): the stream ends as a file would
      const [, right] = padding(fed, nDelay, model.nLeftPad);
      s.pushMel(melS.feed(new Float32Array(right)));
      s.pushMel(melS.finish());
      s.close(Math.floor(melS.emitted / MEL_FRAMES_PER_POSITION));
      const ids = await s.decode();
      if (ids.length) onIds(ids);
      const all = s.generated.slice();
      s.release();
      return all;
    },
  };
}

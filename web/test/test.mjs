// Browser test driver: loads the fixture (tiny Q4 GGUF, tekken.json, audio), runs the graph
// offline exactly like api.transcribe, and POSTs {ids, mel...} to /result for the Python side to check.
import { Gpu } from "../gpu.js";
import { GgufFile, fetchShards } from "../gguf.js";
import { Model, Session, loadWeights, configFromGguf, padding, delayMsToTokens, MEL_FRAMES_PER_POSITION, SAMPLES_PER_TOKEN, N_MELS } from "../model.js";
import { Tekken } from "../tokenizer.js";
import { MelStream } from "../mel.js";

const log = (s) => { document.getElementById("log").textContent += s + "\n"; };
const q = new URLSearchParams(location.search);
const fx = q.get("fixture") || "/fixture/";
const out = { errors: [] };
const t0 = performance.now();
try {
  const gpu = await Gpu.create({ shaderBase: "/shaders/" });
  out.adapter = gpu.description;
  // a smaller binding limit than the adapter's: weights split into row chunks as the 4B model's
  // embedding table must be under the default 128 MiB
  if (q.get("max_binding")) gpu.maxBinding = Number(q.get("max_binding"));
  const shards = await fetchShards([fx + "model.gguf"]);
  if (q.get("shard_checks")) {
    // a shard whose bytes do not add up to the size the manifest gives: one byte short of the file
    // (the cached copy from the fetch above is dropped, the download fails too) and one byte more
    out.shard_checks = [];
    for (const extra of [-1, 1]) {
      try {
        await fetchShards([fx + "model.gguf"], () => {}, { sizes: [shards[0].byteLength + extra] });
        out.shard_checks.push("no error");
      } catch (e) { out.shard_checks.push(String(e.message || e)); }
    }
  }
  const gf = new GgufFile(shards);
  const cfg = configFromGguf(gf.metadata);
  const tok = await Tekken.fetch(fx + "tekken.json");
  const weights = await loadWeights(gpu, gf, cfg);
  const model = new Model(gpu, weights, tok);
  out.load_s = (performance.now() - t0) / 1000;
  out.tok_chunks = weights.tokEmbeddings.chunks.length;
  const samples = new Float32Array(await (await fetch(fx + "audio.f32")).arrayBuffer());
  const nDelay = delayMsToTokens(model.defaultDelayMs);
  const [left, right] = padding(samples.length, nDelay, model.nLeftPad);
  const padded = new Float32Array(left + samples.length + right);
  padded.set(samples, left);
  let mel;
  if (q.get("mel") === "python") mel = new Float32Array(await (await fetch(fx + "mel.f32")).arrayBuffer());
  else { const { logMel } = await import("../mel.js"); mel = logMel(padded); }
  out.mel = Array.from(mel.subarray(0, 0)); // filled below when asked
  if (q.get("return_mel")) out.mel = Array.from(mel);
  const nPositions = padded.length / SAMPLES_PER_TOKEN;
  const t1 = performance.now();
  let s;
  if (q.get("mic")) {
    // the page's microphone path itself (mic.js: getUserMedia -> AudioWorklet -> MelStream -> Session),
    // on Chromium's fake capture device playing a file; the samples the worklet delivered go back
    // with the ids so the Python side can transcribe exactly those
    const { startMicrophone } = await import("../mic.js");
    const m = await startMicrophone(model, { keepSamples: true });
    const want = Number(q.get("mic")) * 16000;
    const deadline = performance.now() + 60000;
    while (m.fed() < want && performance.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    out.ids = await m.stop();
    out.mic_samples = Array.from(m.samples());
    out.text = tok.decode(out.ids);
    out.decode_s = (performance.now() - t1) / 1000;
    await gpu.sync();
    out.errors.push(...gpu.errors);
    log(JSON.stringify({ ids: out.ids, fed: out.mic_samples.length }));
  } else if (q.get("upload")) {
    // the page's file-upload path (upload.js: decodeAudioData to 16 kHz mono, offline transcription)
    // on each named fixture file; the decoded samples go back with the ids
    const { decodeAudioFile, transcribeSamples } = await import("../upload.js");
    out.uploads = [];
    for (const name of q.get("upload").split(",")) {
      const t2 = performance.now();
      const samples = await decodeAudioFile(await (await fetch(fx + name)).arrayBuffer());
      const ids = await transcribeSamples(model, samples);
      out.uploads.push({ name, ids, samples: Array.from(samples), decode_s: (performance.now() - t2) / 1000 });
    }
    await gpu.sync();
    out.errors.push(...gpu.errors);
    log(JSON.stringify(out.uploads.map((u) => ({ name: u.name, ids: u.ids }))));
  } else if (q.get("stream")) {
    // the microphone path without the worklet: MelStream + a streaming session fed in uneven chunks
    s = new Session(model, nDelay);
    const melS = new MelStream();
    let i = 0, k = 0;
    while (i < padded.length) {
      const n = Math.min(padded.length - i, [1280, 777, 3001, 160, 4093][k++ % 5]);
      s.pushMel(melS.feed(padded.subarray(i, i + n)));
      await s.decode();
      i += n;
    }
    s.pushMel(melS.finish());
    s.close(nPositions);
    await s.decode();
    out.kept_samples = melS.kept.length;
  } else {
    s = new Session(model, nDelay, { chunkPositions: model.offlineChunkPositions });
    s.close(nPositions);
    const chunk = MEL_FRAMES_PER_POSITION * model.offlineChunkPositions * N_MELS;
    for (let i = 0; i < mel.length; i += chunk) {
      s.pushMel(mel.subarray(i, i + chunk));
      await s.decode();
      if (s.done) break;
    }
  }
  if (s) {
    await s.decode();
    out.ids = s.generated;
    out.probs = Array.from(s.generatedProbs);
    out.text = tok.decode(s.generated);
    out.steps = s.nextPos - s.promptIds.length + 1;
    out.decode_s = (performance.now() - t1) / 1000;
    s.release();
    await gpu.sync();
    out.errors.push(...gpu.errors);
    log(JSON.stringify({ ids: out.ids, text: out.text }));
  }
} catch (e) {
  out.errors.push(String(e && e.stack || e));
  log("ERROR " + e);
}
await fetch("/result", { method: "POST", body: JSON.stringify(out) });

// app.js — the page: load the model (progress bar, Cache API), transcribe an uploaded file
// (upload.js: decoded to mono 16 kHz) or the microphone (mic.js: AudioWorklet), with tokens/s and
// real-time factor. Orchestration only: the graph is model.js.
import { Gpu } from "./gpu.js";
import { GgufFile, fetchShards } from "./gguf.js";
import { startMicrophone } from "./mic.js";
import { Model, loadWeights, configFromGguf } from "./model.js";
import { Tekken } from "./tokenizer.js";
import { decodeAudioFile, transcribeSamples } from "./upload.js";

const $ = (id) => document.getElementById(id);
const msg = (s) => { $("msg").textContent = s; };
let model = null, tok = null;

async function load() {
  if (!navigator.gpu) { msg("This browser has no WebGPU (navigator.gpu is missing). Use a recent Chrome/Edge, or Firefox/Safari with WebGPU enabled."); return; }
  const manResp = await fetch("model/manifest.json");
  if (!manResp.ok) { msg(`No model is served here (model/manifest.json: HTTP ${manResp.status}). Start the page with: voxtral-wgpu web --model MODEL.gguf`); return; }
  const man = await manResp.json();
  const mem = navigator.deviceMemory;
  if (mem && mem * 2 ** 30 < man.bytes * 1.5) msg(`Warning: this device reports ${mem} GB of memory; the model needs about ${(man.bytes / 2 ** 30).toFixed(1)} GB of GPU memory.`);
  const gpu = await Gpu.create({ shaderBase: "shaders/" });
  if (gpu.maxBuffer < 128 * 2 ** 20) { msg("The WebGPU adapter's buffer limit is too small for this model."); return; }
  const t0 = performance.now();
  const shards = await fetchShards(man.shards, (d, t) => { $("bar").value = t ? d / t : 0; $("pct").textContent = `${(d / 2 ** 20).toFixed(0)} / ${(t / 2 ** 20).toFixed(0)} MiB`; }, { sizes: man.sizes });
  const gf = new GgufFile(shards);
  tok = await Tekken.fetch(man.tokenizer);
  const weights = await loadWeights(gpu, gf, configFromGguf(gf.metadata), (d, t) => { $("pct").textContent = `uploading ${d}/${t}`; });
  shards.length = 0; // host copies released once on the GPU
  model = new Model(gpu, weights, tok);
  $("loading").hidden = true; $("controls").hidden = false;
  $("stats").textContent = `loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s on ${gpu.description}`;
}

function stats(steps, seconds, t0) {
  const dt = (performance.now() - t0) / 1000;
  $("stats").textContent = `${steps} steps, ${(steps / dt).toFixed(1)} tokens/s, real-time factor ${(dt / Math.max(seconds, 1e-9)).toFixed(2)}`;
}

async function transcribeFile(file) {
  const samples = await decodeAudioFile(await file.arrayBuffer());
  const dec = tok.stream(); $("text").textContent = "";
  const t0 = performance.now();
  let last = [0, 0];
  await transcribeSamples(model, samples, {
    onIds: (ids) => { for (const id of ids) $("text").textContent += dec.push(id); },
    onStats: (steps, seconds) => { last = [steps, seconds]; stats(steps, seconds, t0); },
  });
  $("text").textContent += dec.flush();
  stats(...last, t0);
  $("stats").textContent += ` — done (${file.name}, ${last[1].toFixed(1)} s of audio)`;
}

let mic = null;
async function toggleMic() {
  if (mic) { const m = mic; mic = null; await m.stop(); $("text").textContent += m.dec.flush(); $("mic").textContent = "Start microphone"; return; }
  const dec = tok.stream(); $("text").textContent = "";
  const t0 = performance.now();
  const m = await startMicrophone(model, {
    onIds: (ids) => { for (const id of ids) $("text").textContent += dec.push(id); },
    onStats: (steps, seconds) => { const dt = (performance.now() - t0) / 1000;
      $("stats").textContent = `${steps} steps, ${(steps / dt).toFixed(1)} tokens/s, ${seconds.toFixed(1)} s of audio`; },
  });
  mic = { ...m, dec };
  $("mic").textContent = "Stop microphone";
}

$("file").addEventListener("change", (e) => e.target.files[0] && transcribeFile(e.target.files[0]).catch((err) => msg(String(err))));
$("mic").addEventListener("click", () => toggleMic().catch((err) => msg(String(err))));
load().catch((e) => msg(`Loading failed: ${e.message || e}`));

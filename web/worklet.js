// AudioWorklet: forwards mono input blocks (the context's rate) to the main thread.
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const ch = inputs[0];
    if (ch && ch.length) {
      const n = ch[0].length, mono = new Float32Array(n);
      for (const c of ch) for (let i = 0; i < n; i++) mono[i] += c[i] / ch.length;
      this.port.postMessage(mono, [mono.buffer]);
    }
    return true;
  }
}
registerProcessor("capture", Capture);

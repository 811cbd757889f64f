// gpu.js — the browser mirror of voxtral_wgpu/gpu.py: device, buffers, cached pipelines and
// batched dispatch over the SAME shaders/*.wgsl files (fetched, never copied).
//
// Binding layouts are parsed from each shader's `@group(0) @binding(n) var<...>` declarations with
// gpu.py's regex; binding 0 is always the Params uniform, bound with a dynamic offset into one
// uniform arena per submission, so bind groups depend only on the storage buffers and are cached.

export const MAX_INVOCATIONS = 256;
export const MAX_GROUPS_PER_DIM = 65535;
export const UNIFORM_SLOT = 256;
export const ARENA_BYTES = 1 << 20;

const BINDING_RE = /@group\(0\)\s*@binding\((\d+)\)\s*var<\s*(storage|uniform)\s*(?:,\s*(read_write|read))?\s*>\s*(\w+)/g;

// `// #include "_name.wgsl"` on a line of its own: replaced by that file (gpu.py's INCLUDE_RE; WGSL has no include)
const INCLUDE_RE = /^\/\/\s*#include\s+"(_\w+\.wgsl)"[ \t]*$/gm;

export const SHADERS = ["argmax", "attention", "attention_decode", "elementwise", "embed", "embed_quant", "fill",
  "kv_cache", "linear", "linear_quant", "matmul", "matvec", "rms_norm", "rope", "rope_qkv"];

export class GpuError extends Error {}

let nextId = 1;
const bufId = (b) => b._vid || (b._vid = nextId++);

export class Gpu {
  static async create({ shaderBase = "shaders/", powerPreference = "high-performance", shaders = SHADERS } = {}) {
    if (!navigator.gpu) throw new GpuError("WebGPU is not available in this browser (navigator.gpu is missing)");
    const adapter = await navigator.gpu.requestAdapter({ powerPreference });
    if (!adapter) throw new GpuError("no WebGPU adapter found");
    const l = adapter.limits;
    const device = await adapter.requestDevice({
      requiredLimits: {
        maxBufferSize: l.maxBufferSize,
        maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
        maxStorageBuffersPerShaderStage: Math.min(l.maxStorageBuffersPerShaderStage, 10),
        maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      },
    });
    const fetched = new Map(); // file name -> promise of its text (each included file fetched once)
    const fetchText = (name) => {
      if (!fetched.has(name)) {
        fetched.set(name, fetch(`${shaderBase}${name}`).then((r) => {
          if (!r.ok) throw new GpuError(`${name}: HTTP ${r.status}`);
          return r.text();
        }));
      }
      return fetched.get(name);
    };
    const sources = {};
    await Promise.all(shaders.map(async (s) => {
      const text = await fetchText(`${s}.wgsl`);
      const bodies = {};
      for (const m of text.matchAll(INCLUDE_RE)) {
        const body = await fetchText(m[1]);
        if (body.match(INCLUDE_RE)) throw new GpuError(`${m[1]}: an included file includes nothing itself`);
        bodies[m[1]] = body;
      }
      sources[s] = text.replace(INCLUDE_RE, (_, name) => bodies[name]);
    }));
    return new Gpu(adapter, device, sources);
  }

  constructor(adapter, device, sources) {
    this.adapter = adapter;
    this.device = device;
    this.queue = device.queue;
    this.limits = device.limits;
    this.maxBinding = Number(device.limits.maxStorageBufferBindingSize);
    this.maxBuffer = Number(device.limits.maxBufferSize);
    const info = adapter.info || {};
    this.description = `${info.vendor || "?"} ${info.architecture || ""} ${info.description || ""}`.trim();
    this._sources = sources;
    this._modules = new Map();
    this._kernels = new Map();
    this._bindGroups = new Map();
    this._scratch = null;
    this._arena = device.createBuffer({ size: ARENA_BYTES, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST, label: "params-arena" });
    this._arenaData = new Uint8Array(ARENA_BYTES);
    this._arenaLen = 0;
    this._encoder = null;
    this._pass = null;
    this._pending = new Set();
    this._lastPipeline = null;
    this.bytesAllocated = 0;
    this.dispatchCount = 0;
    this.errors = [];
    device.addEventListener?.("uncapturederror", (e) => { this.errors.push(e.error.message); console.error(e.error.message); });
  }

  // ------------------------------------------------------------------ buffers
  empty(nbytes, label = "") {
    nbytes = Math.max(16, Math.ceil(nbytes / 16) * 16);
    if (nbytes > this.maxBuffer) throw new GpuError(`buffer ${label} of ${nbytes} bytes exceeds maxBufferSize ${this.maxBuffer}`);
    const buf = this.device.createBuffer({ size: nbytes, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST, label });
    this.bytesAllocated += nbytes;
    return buf;
  }

  /** A storage buffer of at least `nbytes` shared by every caller (split-K partial sums), as gpu.py's
   * scratch: work runs in recording order; it grows to the largest request (MiB steps), never shrinks. */
  scratch(nbytes) {
    if (this._scratch === null || this._scratch.size < nbytes) {
      const size = Math.min(Math.ceil(nbytes / 2 ** 20) * 2 ** 20, this.maxBuffer);
      if (this._scratch !== null) {
        this.flush();
        this.forget(this._scratch);
        this.bytesAllocated -= this._scratch.size;
        this._scratch.destroy();
      }
      this._scratch = this.empty(size, "scratch");
    }
    return this._scratch;
  }

  upload(typed, label = "") {
    const buf = this.empty(typed.byteLength, label);
    if (typed.byteLength) this.write(buf, typed);
    return buf;
  }

  /** Queue a host->GPU copy, after any recorded work that uses `buf` (program order). */
  write(buf, typed, offset = 0) {
    if (this._pending.has(buf)) this.flush();
    let bytes = new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength);
    if (bytes.byteLength % 4) {
      const padded = new Uint8Array(Math.ceil(bytes.byteLength / 4) * 4);
      padded.set(bytes);
      bytes = padded;
    }
    if (bytes.byteLength) this.queue.writeBuffer(buf, offset, bytes);
  }

  /** Submit pending work and copy `nbytes` back (async). Returns an ArrayBuffer. */
  async readBytes(buf, nbytes = buf.size, offset = 0) {
    this.flush();
    const size = Math.ceil(nbytes / 4) * 4;
    const staging = this.device.createBuffer({ size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    const enc = this.device.createCommandEncoder();
    enc.copyBufferToBuffer(buf, offset, staging, 0, size);
    this.queue.submit([enc.finish()]);
    await staging.mapAsync(GPUMapMode.READ);
    const out = staging.getMappedRange().slice(0, nbytes);
    staging.unmap();
    staging.destroy();
    return out;
  }

  async read(buf, Type = Float32Array, count = null, offset = 0) {
    const n = count === null ? (buf.size - offset) / Type.BYTES_PER_ELEMENT : count;
    return new Type(await this.readBytes(buf, n * Type.BYTES_PER_ELEMENT, offset));
  }

  copy(src, srcOffset, dst, dstOffset, nbytes) {
    if (!nbytes) return;
    this._endPass();
    this._getEncoder().copyBufferToBuffer(src, srcOffset, dst, dstOffset, nbytes);
    this._pending.add(src); this._pending.add(dst);
  }

  clear(buf, offset = 0, nbytes = undefined) {
    this._endPass();
    this._getEncoder().clearBuffer(buf, offset, nbytes);
    this._pending.add(buf);
  }

  // ------------------------------------------------------------------ kernels
  source(shader) {
    const s = this._sources[shader];
    if (s === undefined) throw new GpuError(`shader ${shader}.wgsl was not loaded`);
    return s;
  }

  kernel(shader, entry, overrides = {}) {
    const key = `${shader}.${entry}|${JSON.stringify(overrides)}`;
    let k = this._kernels.get(key);
    if (k) return k;
    const src = this.source(shader);
    if (!this._modules.has(shader)) this._modules.set(shader, this.device.createShaderModule({ code: src, label: shader }));
    const bindings = new Map();
    for (const m of src.matchAll(BINDING_RE)) bindings.set(Number(m[1]), [m[2], m[3] || "read", m[4]]);
    if (!bindings.has(0) || bindings.get(0)[0] !== "uniform") throw new GpuError(`${shader}.wgsl: binding 0 must be the Params uniform`);
    const entries = [...bindings.keys()].sort((a, b) => a - b).map((b) => {
      const [space, access] = bindings.get(b);
      if (space === "uniform") return { binding: b, visibility: GPUShaderStage.COMPUTE, buffer: { type: "uniform", hasDynamicOffset: true } };
      return { binding: b, visibility: GPUShaderStage.COMPUTE, buffer: { type: access === "read_write" ? "storage" : "read-only-storage" } };
    });
    const layout = this.device.createBindGroupLayout({ entries, label: `${shader}.${entry}` });
    const constants = {};
    for (const [n, v] of Object.entries(overrides)) constants[n] = Number(v);
    const pipeline = this.device.createComputePipeline({
      layout: this.device.createPipelineLayout({ bindGroupLayouts: [layout] }),
      compute: { module: this._modules.get(shader), entryPoint: entry, constants },
      label: `${shader}.${entry}`,
    });
    const size = paramsSize(src, shader);
    k = { name: `${shader}.${entry}`, pipeline, layout, nStorage: bindings.size - 1, paramsSize: size,
          slot: Math.ceil(size / UNIFORM_SLOT) * UNIFORM_SLOT, id: nextId++ };
    this._kernels.set(key, k);
    return k;
  }

  // ------------------------------------------------------------------ dispatch
  /** Record `kernel` over `groups` with `params` (Uint8Array from packParams) and `buffers` at
   *  bindings 1.. (a GPUBuffer, or [buffer, offset, size]). */
  dispatch(kernel, params, buffers, groups) {
    if (buffers.length !== kernel.nStorage) throw new GpuError(`${kernel.name}: ${buffers.length} buffers given, shader declares ${kernel.nStorage}`);
    if (params.byteLength > kernel.paramsSize) throw new GpuError(`${kernel.name}: params of ${params.byteLength} bytes exceed the shader's ${kernel.paramsSize}`);
    const gx = groups[0], gy = groups.length > 1 ? groups[1] : 1, gz = groups.length > 2 ? groups[2] : 1;
    if (gx === 0 || gy === 0 || gz === 0) return;
    if (gx > MAX_GROUPS_PER_DIM || gy > MAX_GROUPS_PER_DIM || gz > MAX_GROUPS_PER_DIM) throw new GpuError(`${kernel.name}: dispatch ${groups} too large`);
    if (this._arenaLen + kernel.slot > ARENA_BYTES) this.flush();
    const offset = this._arenaLen;
    this._arenaData.set(params, offset);
    this._arenaData.fill(0, offset + params.byteLength, offset + kernel.slot);
    this._arenaLen += kernel.slot;
    const bg = this._bindGroup(kernel, buffers);
    const p = this._getPass();
    if (this._lastPipeline !== kernel.pipeline) { p.setPipeline(kernel.pipeline); this._lastPipeline = kernel.pipeline; }
    p.setBindGroup(0, bg, [offset]);
    p.dispatchWorkgroups(gx, gy, gz);
    this.dispatchCount++;
    for (const b of buffers) this._pending.add(Array.isArray(b) ? b[0] : b);
  }

  _bindGroup(kernel, buffers) {
    const key = kernel.id + ":" + buffers.map((b) => (Array.isArray(b) ? `${bufId(b[0])}/${b[1]}/${b[2]}` : bufId(b))).join(",");
    let bg = this._bindGroups.get(key);
    if (!bg) {
      const entries = [{ binding: 0, resource: { buffer: this._arena, offset: 0, size: kernel.paramsSize } }];
      buffers.forEach((b, i) => {
        const [buf, o, s] = Array.isArray(b) ? b : [b, 0, b.size];
        entries.push({ binding: i + 1, resource: { buffer: buf, offset: o, size: s } });
      });
      bg = this.device.createBindGroup({ layout: kernel.layout, entries });
      this._bindGroups.set(key, bg);
    }
    return bg;
  }

  /** Drop cached bind groups that use any of `buffers` (call before destroying them). */
  forget(...buffers) {
    const ids = new Set(buffers.map((b) => String(bufId(b))));
    for (const key of [...this._bindGroups.keys()]) {
      const parts = key.split(":")[1].split(",").map((s) => s.split("/")[0]);
      if (parts.some((p) => ids.has(p))) this._bindGroups.delete(key);
    }
  }

  _getEncoder() { return this._encoder || (this._encoder = this.device.createCommandEncoder()); }
  _getPass() { return this._pass || (this._pass = this._getEncoder().beginComputePass()); }
  _endPass() { if (this._pass) { this._pass.end(); this._pass = null; this._lastPipeline = null; } }

  flush() {
    if (!this._encoder) return;
    this._endPass();
    if (this._arenaLen) this.queue.writeBuffer(this._arena, 0, this._arenaData, 0, this._arenaLen);
    this.queue.submit([this._encoder.finish()]);
    this._encoder = null;
    this._arenaLen = 0;
    this._pending.clear();
  }

  async sync() { this.flush(); await this.queue.onSubmittedWorkDone(); }
}

/** Size of `struct Params` (u32/i32/f32 scalars and array<vec4<..>, N> tails), as gpu.py computes it. */
export function paramsSize(src, shader) {
  const m = src.match(/struct\s+Params\s*\{([^}]*)\}/);
  if (!m) throw new GpuError(`${shader}.wgsl has no struct Params`);
  let size = 0;
  const body = m[1].replace(/\/\/[^\n]*/g, ""); // comments may hold commas
  for (let field of body.split(",")) {
    field = field.trim();
    if (!field) continue;
    const ty = field.split(":").slice(1).join(":").trim();
    if (ty === "u32" || ty === "i32" || ty === "f32") size += 4;
    else {
      const am = ty.match(/^array<\s*vec4<\s*(?:f32|u32|i32)\s*>\s*,\s*(\d+)\s*>$/);
      if (!am) throw new GpuError(`${shader}.wgsl: unsupported Params field type ${ty}`);
      size = Math.ceil(size / 16) * 16 + 16 * Number(am[1]);
    }
  }
  return Math.max(16, Math.ceil(size / 16) * 16);
}

/** Float marker for packParams: JS numbers carry no int/float distinction, so f32 fields are
 *  wrapped: packParams(rows, cols, f(eps)). Everything else packs as u32 (negative is an error). */
export class F32 { constructor(v) { this.v = v; } }
export const f = (v) => new F32(v);

export function packParams(...fields) {
  const out = new Uint8Array(fields.length * 4);
  const dv = new DataView(out.buffer);
  fields.forEach((x, i) => {
    if (x instanceof F32) dv.setFloat32(4 * i, x.v, true);
    else {
      const v = typeof x === "boolean" ? Number(x) : x;
      if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new GpuError(`packParams: field ${i} = ${x} is not a u32`);
      dv.setUint32(4 * i, v, true);
    }
  });
  return out;
}

/** Split n workgroups over (x, y) so x stays <= 65535 (gpu.py groups_2d). */
export function groups2d(n) {
  if (n <= MAX_GROUPS_PER_DIM) return [Math.max(n, 0), 1];
  const y = Math.ceil(n / MAX_GROUPS_PER_DIM);
  return [Math.ceil(n / y), y];
}

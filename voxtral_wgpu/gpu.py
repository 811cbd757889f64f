"""The GPU runtime: device, buffers, cached pipelines and batched dispatch.

Everything the graph needs from wgpu goes through :class:`Gpu`:

* ``Gpu.kernel(shader, entry, **overrides)`` compiles a WGSL entry point once and caches it,
  keyed by (file, entry point, override constants). The bind-group layout is read off the
  shader's own ``@group(0) @binding(n) var<...>`` declarations, so Python never restates it.
* ``Gpu.dispatch(kernel, params, buffers, groups)`` records one dispatch into the open compute
  pass. Binding 0 of every shader is its ``Params`` uniform; all dispatches of a submission share
  one uniform *arena* bound with a dynamic offset, so bind groups depend only on the storage
  buffers and are cached: the decode loop creates no GPU objects after the first step.
* ``Gpu.write`` uploads through the queue; it submits pending work first when that work reads
  the buffer being overwritten, so host writes are always ordered like program order.
* ``Gpu.flush`` submits; ``Gpu.read`` flushes and maps.
* ``with Gpu.exclusive():`` around every public model call (a transcription, a stream's feed):
  calls from several threads take turns on the one recording state, and an exception anywhere in
  the block (a KeyboardInterrupt included) drops what the call had recorded, so the next call
  starts from a clean encoder.
* ``with Gpu.capture() as plan:`` records a step's dispatches (they also run) into a
  :class:`StepPlan`; ``Gpu.replay(plan, values)`` records them again with three raw wgpu-native calls
  each. Dispatches whose Params depend on the step (a KV slot, a position) name those fields with
  ``dispatch(..., step=...)`` and the replay patches them from ``values``: the decode loop pays for
  the Python op layer once per session instead of once per token.

Buffers are plain ``wgpu.GPUBuffer`` objects; shapes and dtypes live with the callers
(``ops.py``, ``model.py``).
"""

from __future__ import annotations

import collections
import os
import re
import struct
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wgpu

MAX_INVOCATIONS = 256  # WebGPU core limit we promise to stay under (maxComputeInvocationsPerWorkgroup)
MAX_GROUPS_PER_DIM = 65535  # WebGPU core maxComputeWorkgroupsPerDimension
UNIFORM_SLOT = 256  # dynamic-offset granularity (minUniformBufferOffsetAlignment <= 256 everywhere)
ARENA_BYTES = 1 << 20  # 4096 dispatches per submission before an automatic flush

_BINDING_RE = re.compile(
    r"@group\(0\)\s*@binding\((\d+)\)\s*var<\s*(storage|uniform)\s*(?:,\s*(read_write|read))?\s*>\s*(\w+)"
)
_WORKGROUP_RE = re.compile(r"@workgroup_size\(([^)]*)\)")

STORAGE = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
_ZEROS = bytes(4096)

# wgpu-native's C functions, for the three pass commands of the dispatch hot path (wgpu-py wraps
# every call in Python error-capture machinery that costs more than the call). Falls back to
# wgpu-py's methods if the backend layout differs.
try:
    from wgpu.backends.wgpu_native._ffi import ffi as _ffi
    from wgpu.backends.wgpu_native._ffi import lib as _raw

    for _name in ("wgpuComputePassEncoderSetPipeline", "wgpuComputePassEncoderSetBindGroup",
                  "wgpuComputePassEncoderDispatchWorkgroups"):
        getattr(_raw, _name)
except Exception:  # pragma: no cover - other wgpu-py versions
    _ffi = _raw = None
    if os.environ.get("VOXTRAL_WGPU_DEBUG"):
        raise


def shader_dir() -> Path:
    """The WGSL sources: installed inside the package, or the repository's top-level shaders/."""
    env = os.environ.get("VOXTRAL_WGPU_SHADERS")
    candidates = ([Path(env)] if env else []) + [
        Path(__file__).resolve().parent / "shaders",
        Path(__file__).resolve().parent.parent / "shaders",
    ]
    for c in candidates:
        if (c / "linear.wgsl").is_file():
            return c
    raise FileNotFoundError(f"voxtral_wgpu's WGSL shaders were not found (looked in {[str(c) for c in candidates]})")


# `// #include "_name.wgsl"` on a line of its own: replaced by that file of the same directory (WGSL
# has no include; web/gpu.js does the same). Included files start with "_", hold functions only, and
# include nothing themselves.
INCLUDE_RE = re.compile(r'^//\s*#include\s+"(_\w+\.wgsl)"[ \t]*$', re.M)


def read_shader(path: Path) -> str:
    """The WGSL of ``path`` with its include lines replaced by the files they name."""
    def splice(m: re.Match) -> str:
        inc = path.parent / m.group(1)
        try:
            body = inc.read_text()
        except OSError as e:
            raise FileNotFoundError(f"{path.name}: included file {inc} cannot be read ({e})") from None
        if INCLUDE_RE.search(body):
            raise GpuError(f"{inc.name}: an included file includes nothing itself")
        return body

    return INCLUDE_RE.sub(splice, path.read_text())


@dataclass
class StepPlan:
    """Dispatches recorded by :meth:`Gpu.capture`, replayed by :meth:`Gpu.replay`.

    ``image``: the Params of every dispatch laid out as in the uniform arena (each at ``offsets[i]``);
    ``patches``: (u32 word of ``image``, step value name) pairs; ``group_names[i]``: the step value
    that replaces dispatch ``i``'s x workgroup count, or None."""

    kernels: list
    bind_groups: list
    offsets: list
    groups: list
    group_names: list
    image: bytearray
    patches: list
    buffer_ids: set
    keep: list  # the bind groups' (buffer) owners, alive as long as the plan


@dataclass(frozen=True)
class Kernel:
    """One compiled compute entry point and how to bind it."""

    name: str
    pipeline: wgpu.GPUComputePipeline
    layout: wgpu.GPUBindGroupLayout
    n_storage: int  # storage bindings 1..n_storage, in binding order
    params_size: int  # bytes of the Params uniform struct (binding 0)
    slot: int  # bytes it takes in the uniform arena (params_size rounded up to UNIFORM_SLOT)


class PendingRead:
    """A copy into a mappable buffer, recorded and submitted by :meth:`Gpu.read_later`. ``result()``
    maps it: immediate once the GPU has run the copy (wgpu-py's poll thread first polls without
    waiting), else it waits for the queue like :meth:`Gpu.read`."""

    def __init__(self, staging: wgpu.GPUBuffer, dtype, count: int):
        self._staging, self._dtype, self._count = staging, np.dtype(dtype), count

    def result(self) -> np.ndarray:
        if self._staging is None:
            raise GpuError("PendingRead.result() called twice")
        staging, self._staging = self._staging, None
        # mapped only now: a map requested right after the submit would keep wgpu-py's poll thread
        # in a blocking device poll while the host records and submits the next steps
        staging.map_async("READ_NOSYNC").sync_wait()
        raw = staging.read_mapped()
        staging.destroy()
        return np.frombuffer(raw, np.uint8)[: self._count * self._dtype.itemsize].view(self._dtype).copy()


class _SharedStaging:
    """One mappable buffer holding several copies (:meth:`Gpu.read_later_many`), mapped once."""

    def __init__(self, staging: wgpu.GPUBuffer):
        self._staging, self._data = staging, None

    def data(self) -> np.ndarray:
        if self._data is None:
            self._staging.map_async("READ_NOSYNC").sync_wait()
            self._data = np.frombuffer(self._staging.read_mapped(), np.uint8).copy()
            self._staging.destroy()
        return self._data


class PendingSlice:
    """One copy of a :meth:`Gpu.read_later_many`: ``result()`` as :class:`PendingRead`'s."""

    def __init__(self, shared: _SharedStaging, offset: int, dtype, count: int):
        self._shared, self._offset, self._dtype, self._count = shared, offset, np.dtype(dtype), count

    def result(self) -> np.ndarray:
        raw = self._shared.data()[self._offset:self._offset + self._count * self._dtype.itemsize]
        return raw.view(self._dtype).copy()


class GpuError(RuntimeError):
    pass


class Gpu:
    """A wgpu device plus the bookkeeping that keeps dispatching cheap."""

    def __init__(self, *, power_preference: str = "high-performance", adapter=None):
        if adapter is None:
            adapter = wgpu.gpu.request_adapter_sync(power_preference=power_preference)
        if adapter is None:
            raise GpuError(
                "no WebGPU adapter found: install a Vulkan, Metal or DX12 driver "
                "(on Linux without a GPU: Mesa's lavapipe, package mesa-vulkan-drivers)"
            )
        self.adapter = adapter
        limits = adapter.limits
        # Ask for what the adapter offers on the limits that bound model size; keep the rest default.
        wanted = {
            "max-buffer-size": limits["max-buffer-size"],
            "max-storage-buffer-binding-size": limits["max-storage-buffer-binding-size"],
            "max-storage-buffers-per-shader-stage": min(limits["max-storage-buffers-per-shader-stage"], 10),
            "max-compute-workgroup-storage-size": limits["max-compute-workgroup-storage-size"],
        }
        self.device = adapter.request_device_sync(required_limits=wanted)
        self.queue = self.device.queue
        self.limits = dict(self.device.limits)
        self.max_binding = int(self.limits["max-storage-buffer-binding-size"])
        self.max_buffer = int(self.limits["max-buffer-size"])
        info = adapter.info
        self.description = f"{info.get('device', '?')} ({info.get('backend_type', '?')})"
        self._shader_dir = shader_dir()
        self._sources: dict[str, str] = {}
        self._modules: dict[tuple, wgpu.GPUShaderModule] = {}
        self._kernels: dict[tuple, Kernel] = {}
        self._bind_groups: dict[tuple, tuple] = {}
        self._arena = self.device.create_buffer(
            size=ARENA_BYTES, usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST, label="params-arena"
        )
        self._arena_data = bytearray()
        self._sync_buf = self.device.create_buffer(size=16, usage=STORAGE, label="sync")
        self._encoder = None
        self._pass = None
        self._pending_buffers: set[int] = set()
        self._last_pipeline = None
        self._capturing: list | None = None
        self.step_suffix = ""  # appended to the step value names of dispatches captured meanwhile
        self._scratch: wgpu.GPUBuffer | None = None
        self._offset_cell = _ffi.new("uint32_t[1]") if _ffi is not None else None
        # One caller records at a time: the encoder, pass, arena and pending set are shared by every
        # session on this device. Held per public call (exclusive()), never per dispatch.
        self.lock = threading.RLock()
        self._depth = 0  # exclusive() blocks open in the thread that holds the lock
        self._clean = True  # False from an outermost exclusive() entry until its state is known good
        self._deferred: collections.deque = collections.deque()  # run_soon() callables not yet run
        self.bytes_allocated = 0  # bytes of the storage buffers this Gpu holds now (for memory reports)
        self.bytes_peak = 0  # the most bytes_allocated has been (reset with reset_peak())
        self.dispatch_count = 0
        self.submits = 0  # command buffers submitted so far (flush)

    # ------------------------------------------------------------------ buffers
    def empty(self, nbytes: int, label: str = "") -> wgpu.GPUBuffer:
        nbytes = max(16, -(-int(nbytes) // 16) * 16)
        if nbytes > self.max_buffer:
            raise GpuError(f"buffer {label!r} of {nbytes} bytes exceeds this device's max-buffer-size {self.max_buffer}")
        buf = self.device.create_buffer(size=nbytes, usage=STORAGE, label=label)
        self.bytes_allocated += nbytes
        self.bytes_peak = max(self.bytes_peak, self.bytes_allocated)
        # A buffer that is dropped without release() (its owner was interrupted half-built) is freed
        # by wgpu-py when collected; this keeps bytes_allocated true to that as well.
        fin = buf._voxtral_accounted = weakref.finalize(buf, self._unaccount, nbytes)
        fin.atexit = False
        return buf

    def _unaccount(self, nbytes: int) -> None:
        self.bytes_allocated -= nbytes

    def release(self, *buffers: wgpu.GPUBuffer) -> None:
        """Free buffers made by :meth:`empty`/:meth:`upload` now (work recorded with them is submitted
        first; their cached bind groups are dropped, or they would keep the memory alive)."""
        if not buffers:
            return
        try:
            self.flush()
        finally:  # a failed submit still frees them
            try:
                self.forget(*buffers)
                for b in buffers:
                    fin = getattr(b, "_voxtral_accounted", None)  # None: not made by empty(), not counted
                    if fin is not None:
                        fin()  # bytes_allocated -= size, once (a second release counts nothing)
                    b.destroy()
            except BaseException:
                # interrupted half-way (a KeyboardInterrupt): the caller may never come back, and the
                # bind-group cache would keep the rest alive, so the next exclusive() call finishes it
                self._deferred.append(lambda: self.release(*buffers))
                raise

    def scratch(self, nbytes: int) -> wgpu.GPUBuffer:
        """A storage buffer of at least ``nbytes`` shared by every caller (split-K partial sums): work
        runs in recording order, so one user has read it before the next one writes. It grows to the
        largest request (in MiB steps) and is never shrunk; don't keep it in a captured step plan."""
        if self._scratch is None or self._scratch.size < nbytes:
            if self._scratch is not None:
                self.release(self._scratch)
            self._scratch = self.empty(min(-(-nbytes // (1 << 20)) << 20, self.max_buffer), "scratch")
        return self._scratch

    def reset_peak(self) -> int:
        """Start a new peak-memory measurement; returns the previous peak."""
        peak, self.bytes_peak = self.bytes_peak, self.bytes_allocated
        return peak

    def upload(self, array: np.ndarray, label: str = "") -> wgpu.GPUBuffer:
        data = np.ascontiguousarray(array)
        buf = self.empty(data.nbytes, label)
        if data.nbytes:
            self.queue.write_buffer(buf, 0, data)
        return buf

    def write(self, buf: wgpu.GPUBuffer, array, offset: int = 0) -> None:
        """Queue a host->GPU copy. Work already recorded that uses ``buf`` is submitted first,
        so the copy lands after it, as program order says."""
        if id(buf) in self._pending_buffers:
            self.flush()
        data = np.ascontiguousarray(array)
        if data.nbytes % 4:
            data = np.concatenate([data.view(np.uint8).ravel(), np.zeros(4 - data.nbytes % 4, np.uint8)])
        self.write_ahead(buf, data, offset)

    def write_ahead(self, buf: wgpu.GPUBuffer, array, offset: int = 0) -> None:
        """Queue a host->GPU copy that lands before the work recorded since the last flush (at the
        next submit) instead of after it, so nothing is submitted early: only for bytes that no
        unsubmitted work reads (a ring slot of its own, say). Work submitted earlier still reads the
        old bytes: the queue runs the copy after it."""
        data = np.ascontiguousarray(array)
        assert data.nbytes % 4 == 0 and offset % 4 == 0
        self.queue.write_buffer(buf, offset, data)

    def read(self, buf: wgpu.GPUBuffer, dtype=np.float32, count: int | None = None, offset: int = 0) -> np.ndarray:
        """Submit pending work and copy ``count`` elements back (blocking)."""
        n = (buf.size - offset) // np.dtype(dtype).itemsize if count is None else count
        if n == 0:
            self.flush()
            return np.zeros(0, dtype)
        return self.read_later(buf, dtype, n, offset).result()

    def read_later(self, buf: wgpu.GPUBuffer, dtype=np.uint32, count: int = 1, offset: int = 0) -> PendingRead:
        """Record a copy of ``count`` elements of ``buf`` and submit everything recorded, without
        waiting: a readback that does not drain the queue when its result is taken a few steps later."""
        padded = -(-count * np.dtype(dtype).itemsize // 4) * 4  # copies move whole 4-byte words
        staging = self.device.create_buffer(size=padded, label="read-later",
                                            usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        self.copy(buf, offset, staging, 0, padded)
        self.flush()
        return PendingRead(staging, dtype, count)

    def read_later_many(self, parts: list, dtype=np.uint32) -> list:
        """:meth:`read_later` of several buffers, ``parts`` = [(buffer, count)], through one staging
        buffer and one submit (the engine's token rings: one readback a tick for every stream)."""
        item = np.dtype(dtype).itemsize
        offsets, total = [], 0
        for _, count in parts:
            offsets.append(total)
            total += -(-count * item // 4) * 4
        if not parts:
            return []
        staging = self.device.create_buffer(size=total, label="read-later-many",
                                            usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        for (buf, count), off in zip(parts, offsets):
            self.copy(buf, 0, staging, off, -(-count * item // 4) * 4)
        self.flush()
        shared = _SharedStaging(staging)
        return [PendingSlice(shared, off, dtype, count) for (_, count), off in zip(parts, offsets)]

    def copy(self, src, src_offset: int, dst, dst_offset: int, nbytes: int) -> None:
        """Record a GPU-side copy (between dispatches, in order)."""
        if nbytes == 0:
            return
        self._end_pass()
        self._get_encoder().copy_buffer_to_buffer(src, src_offset, dst, dst_offset, nbytes)
        self._pending_buffers.update((id(src), id(dst)))

    def clear(self, buf, offset: int = 0, nbytes: int | None = None) -> None:
        self._end_pass()
        self._get_encoder().clear_buffer(buf, offset, nbytes)
        self._pending_buffers.add(id(buf))

    # ------------------------------------------------------------------ kernels
    def source(self, shader: str) -> str:
        if shader not in self._sources:
            self._sources[shader] = read_shader(self._shader_dir / f"{shader}.wgsl")
        return self._sources[shader]

    def kernel(self, shader: str, entry: str, **overrides: float) -> Kernel:
        key = (shader, entry, *overrides.items())
        k = self._kernels.get(key)
        if k is not None:
            return k
        src = self.source(shader)
        if shader not in self._modules:
            self._modules[shader] = self.device.create_shader_module(code=src, label=shader)
        bindings = {int(b): (space, access or "read", name) for b, space, access, name in _BINDING_RE.findall(src)}
        if 0 not in bindings or bindings[0][0] != "uniform":
            raise GpuError(f"{shader}.wgsl: binding 0 must be the Params uniform")
        entries = []
        for b in sorted(bindings):
            space, access, _ = bindings[b]
            if space == "uniform":
                entries.append({"binding": b, "visibility": wgpu.ShaderStage.COMPUTE,
                                "buffer": {"type": "uniform", "has_dynamic_offset": True}})
            else:
                kind = "storage" if access == "read_write" else "read-only-storage"
                entries.append({"binding": b, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": kind}})
        layout = self.device.create_bind_group_layout(entries=entries, label=f"{shader}.{entry}")
        pipeline = self.device.create_compute_pipeline(
            layout=self.device.create_pipeline_layout(bind_group_layouts=[layout]),
            compute={"module": self._modules[shader], "entry_point": entry, "constants": dict(overrides)},
            label=f"{shader}.{entry}",
        )
        size = _params_size(src, shader)
        k = Kernel(f"{shader}.{entry}", pipeline, layout, n_storage=len(bindings) - 1, params_size=size,
                   slot=-(-size // UNIFORM_SLOT) * UNIFORM_SLOT)
        self._kernels[key] = k
        return k

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, kernel: Kernel, params: bytes, buffers: list, groups, *, step: tuple = (),
                 step_groups: str | None = None) -> None:
        """Record ``kernel`` over ``groups`` workgroups with ``params`` in its uniform and
        ``buffers`` at bindings 1.. (a buffer, or a (buffer, offset, size) tuple).

        ``step``: ``(field index, name)`` pairs of Params fields that vary from step to step, and
        ``step_groups`` the name of the value that gives the x workgroup count: a :meth:`replay` of a
        captured step sets them from its ``values`` (a count of 0 skips the dispatch there, as here).

        This runs ~150 times per decoder step, so it stays lean: bind groups are cached, the
        pipeline is set only when it changes, and the pass commands go straight to wgpu-native
        (pass-encoding errors surface when the command buffer is finished, as WebGPU specifies)."""
        if len(buffers) != kernel.n_storage:
            raise GpuError(f"{kernel.name}: {len(buffers)} buffers given, shader declares {kernel.n_storage}")
        if len(params) > kernel.params_size:
            raise GpuError(f"{kernel.name}: params of {len(params)} bytes exceed the shader's {kernel.params_size}")
        gx, gy = groups[0], (groups[1] if len(groups) > 1 else 1)
        gz = groups[2] if len(groups) > 2 else 1
        if gx > MAX_GROUPS_PER_DIM or gy > MAX_GROUPS_PER_DIM or gz > MAX_GROUPS_PER_DIM:
            raise GpuError(f"{kernel.name}: dispatch {groups} exceeds {MAX_GROUPS_PER_DIM} workgroups per dimension")
        if self._capturing is not None:
            if self.step_suffix:  # one plan, several rows with values of their own (the engine's step)
                step = tuple((field, name + self.step_suffix) for field, name in step)
                step_groups = step_groups + self.step_suffix if step_groups is not None else None
            self._capturing.append((kernel, params, self._bind_group(kernel, buffers), (gx, gy, gz), step,
                                    step_groups, buffers))
        if gx == 0 or gy == 0 or gz == 0:
            return
        slot = kernel.slot
        if len(self._arena_data) + slot > ARENA_BYTES:
            self.flush()
        offset = len(self._arena_data)
        self._arena_data += params
        self._arena_data += _ZEROS[: slot - len(params)]
        self._record(self._get_pass(), kernel, self._bind_group(kernel, buffers), offset, gx, gy, gz)
        self.dispatch_count += 1
        pending = self._pending_buffers
        for b in buffers:
            pending.add(id(b) if not isinstance(b, tuple) else id(b[0]))

    # ------------------------------------------------------------------ step plans
    @contextmanager
    def capture(self):
        """Record the dispatches made inside the block (they are also recorded for execution, as
        usual) into the :class:`StepPlan` this yields, complete when the block exits."""
        if self._capturing is not None:
            raise GpuError("capture() blocks do not nest")
        self._capturing = records = []
        plan = StepPlan([], [], [], [], [], bytearray(), [], set(), [])
        try:
            yield plan
        finally:
            self._capturing = None
        for kernel, params, bg, groups, step, step_groups, buffers in records:
            offset = len(plan.image)
            plan.kernels.append(kernel)
            plan.bind_groups.append(bg)
            plan.offsets.append(offset)
            plan.groups.append(groups)
            plan.group_names.append(step_groups)
            plan.image += params
            plan.image += _ZEROS[: kernel.slot - len(params)]
            plan.patches.extend((offset // 4 + field, name) for field, name in step)
            plan.buffer_ids.update(id(b) if not isinstance(b, tuple) else id(b[0]) for b in buffers)
            plan.keep.append(buffers)
        if len(plan.image) > ARENA_BYTES:
            raise GpuError(f"a step plan of {len(plan.image)} bytes of Params exceeds the {ARENA_BYTES}-byte arena")

    def replay(self, plan: StepPlan, values: dict) -> None:
        """Record ``plan``'s dispatches again with their ``step`` fields and counts from ``values``."""
        image = plan.image
        if plan.patches:
            image = bytearray(image)
            words = memoryview(image).cast("I")
            for word, name in plan.patches:
                words[word] = values[name]
            words.release()
        if len(self._arena_data) + len(image) > ARENA_BYTES:
            self.flush()
        base = len(self._arena_data)
        self._arena_data += image
        p = self._get_pass()
        n = 0
        for kernel, bg, offset, (gx, gy, gz), gname in zip(plan.kernels, plan.bind_groups, plan.offsets,
                                                          plan.groups, plan.group_names):
            if gname is not None:
                gx = values[gname]
            if gx == 0 or gy == 0 or gz == 0:
                continue
            self._record(p, kernel, bg, base + offset, gx, gy, gz)
            n += 1
        self.dispatch_count += n
        self._pending_buffers |= plan.buffer_ids

    def _record(self, p, kernel: Kernel, bg, offset: int, gx: int, gy: int, gz: int) -> None:
        """The pass commands of one dispatch: pipeline (when it changes), bind group at its Params
        offset, workgroups — straight to wgpu-native where available."""
        if _raw is not None:
            h = p._internal
            if self._last_pipeline is not kernel.pipeline:
                _raw.wgpuComputePassEncoderSetPipeline(h, kernel.pipeline._internal)
                self._last_pipeline = kernel.pipeline
            self._offset_cell[0] = offset
            _raw.wgpuComputePassEncoderSetBindGroup(h, 0, bg._internal, 1, self._offset_cell)
            _raw.wgpuComputePassEncoderDispatchWorkgroups(h, gx, gy, gz)
        else:
            p.set_pipeline(kernel.pipeline)
            p.set_bind_group(0, bg, [offset])
            p.dispatch_workgroups(gx, gy, gz)

    def _bind_group(self, kernel: Kernel, buffers: list) -> wgpu.GPUBindGroup:
        key = (id(kernel.layout),) + tuple(id(b) if not isinstance(b, tuple) else (id(b[0]), b[1], b[2])
                                           for b in buffers)
        cached = self._bind_groups.get(key)
        if cached is None:
            norm = [b if isinstance(b, tuple) else (b, 0, b.size) for b in buffers]
            entries = [{"binding": 0, "resource": {"buffer": self._arena, "offset": 0, "size": kernel.params_size}}]
            for i, (b, o, s) in enumerate(norm):
                entries.append({"binding": i + 1, "resource": {"buffer": b, "offset": o, "size": s}})
            bg = self.device.create_bind_group(layout=kernel.layout, entries=entries)
            # the key holds ids: keep the buffers alive as long as the cached group exists
            cached = self._bind_groups[key] = (bg, [b for b, _, _ in norm])
        return cached[0]

    def forget(self, *buffers) -> None:
        """Drop cached bind groups that use any of ``buffers`` (call before releasing them)."""
        ids = {id(b) for b in buffers}

        def uses(key):
            return any((e[0] if isinstance(e, tuple) else e) in ids for e in key[1:])

        for key in [k for k in self._bind_groups if uses(k)]:
            del self._bind_groups[key]

    def _get_encoder(self):
        if self._encoder is None:
            self._encoder = self.device.create_command_encoder()
        return self._encoder

    def _get_pass(self):
        if self._pass is None:
            self._pass = self._get_encoder().begin_compute_pass()
        return self._pass

    def _end_pass(self):
        if self._pass is not None:
            self._pass.end()
            self._pass = None
            self._last_pipeline = None

    def flush(self) -> None:
        """Submit everything recorded so far. Whatever happens (a validation error, a
        KeyboardInterrupt between finish() and submit()), the encoder is gone afterwards: a finished
        encoder kept for the next call would fail every later call ("Encoding must not have ended")."""
        encoder = self._encoder
        if encoder is None:
            return
        try:
            self._end_pass()
            if self._arena_data:
                self.queue.write_buffer(self._arena, 0, bytes(self._arena_data))
            self.queue.submit([encoder.finish()])
            self.submits += 1
        finally:
            self._drop_recording()

    def _drop_recording(self) -> None:
        """Forget the open encoder and pass with what they recorded (it never runs)."""
        self._encoder = None
        self._pass = None
        self._last_pipeline = None
        self._arena_data = bytearray()
        self._pending_buffers.clear()

    def discard(self) -> None:
        """Drop everything recorded and not submitted, and end any capture(): the state after an
        exception in the middle of recording (a half-recorded op, a pass begun but not stored...)."""
        self._capturing = None
        self._drop_recording()

    # ------------------------------------------------------------------ calls from several threads
    @contextmanager
    def exclusive(self):
        """Hold the device's recording state for one public call (a transcription, a stream's
        feed/finish/close): calls from other threads wait, so they serialise. Nested blocks in the
        same thread are free. The outermost block submits what it recorded on the way out, so no
        call leaves work for the next; if an exception (a KeyboardInterrupt included) leaves it,
        the call's unsubmitted work is dropped instead and the device stays usable."""
        with self.lock:
            outer = self._depth == 0
            if outer:
                if not self._clean:  # the last call's cleanup was itself interrupted
                    self.discard()
                self._clean = False  # until this call's state is known good again
            self._depth += 1
            try:
                if outer:
                    self._run_deferred()
                yield self
                if outer:
                    self.flush()
            except BaseException:
                if outer:
                    self.discard()
                    self._clean = True
                raise
            finally:
                self._depth -= 1
            if outer:
                self._clean = True

    def run_soon(self, fn) -> None:
        """Run ``fn()`` (which takes exclusive() itself) now if no call is recording, else at the start
        of the next outermost exclusive() block. For garbage-collector callbacks (a dropped stream's
        release): they may run in any thread, in the middle of another call's recording."""
        self._deferred.append(fn)
        if self.lock.acquire(blocking=False):
            try:
                # depth 0 and no encoder: nobody is recording (an unguarded user between dispatches
                # has nothing open a release's flush could submit half-done)
                if self._depth == 0 and self._encoder is None and self._capturing is None:
                    with self.exclusive():
                        pass
            finally:
                self.lock.release()

    def _run_deferred(self) -> None:
        while self._deferred:
            self._deferred.popleft()()  # popped first: one that raises is not retried forever

    def sync(self) -> None:
        """Flush and wait until the GPU is idle."""
        # A 16-byte readback waits for all submitted work (wgpu-py 0.32's on_submitted_work_done
        # callback signature does not match wgpu-native's, so it cannot be used).
        self.read(self._sync_buf, np.uint8, 4)


def _params_size(src: str, shader: str) -> int:
    """Size of ``struct Params`` in the shader, from its field list (u32/i32/f32 scalars and
    ``array<vec4<f32>, N>`` tails only, so the layout is the packed C layout rounded to 16)."""
    m = re.search(r"struct\s+Params\s*\{([^}]*)\}", src)
    if not m:
        raise GpuError(f"{shader}.wgsl has no struct Params")
    size = 0
    body = re.sub(r"//[^\n]*", "", m.group(1))  # comments may hold commas
    for field in body.split(","):
        field = field.strip()
        if not field:
            continue
        ty = field.split(":", 1)[1].strip()
        if ty in ("u32", "i32", "f32"):
            size += 4
        else:
            am = re.fullmatch(r"array<\s*vec4<\s*(?:f32|u32|i32)\s*>\s*,\s*(\d+)\s*>", ty)
            if not am:
                raise GpuError(f"{shader}.wgsl: unsupported Params field type {ty!r}")
            size = -(-size // 16) * 16 + 16 * int(am.group(1))
    return max(16, -(-size // 16) * 16)


_PACKERS: dict[tuple, struct.Struct] = {}


def pack_params(*fields) -> bytes:
    """Pack a Params struct: ints as u32, floats as f32 (negative ints are an error: every Params
    field is unsigned). Called for every dispatch, so the layout is cached per pattern of types."""
    kinds = tuple(map(type, fields))
    packer = _PACKERS.get(kinds)
    if packer is None:
        packer = _PACKERS[kinds] = struct.Struct("<" + "".join("f" if issubclass(t, float) else "I" for t in kinds))
    return packer.pack(*fields)


def groups_2d(n: int) -> tuple[int, int]:
    """Split ``n`` workgroups over (x, y) so x stays <= 65535; shaders rebuild the flat index as
    ``wid.x + wid.y * num_workgroups.x`` and skip indices >= n."""
    if n <= MAX_GROUPS_PER_DIM:
        return (max(n, 0), 1)
    y = -(-n // MAX_GROUPS_PER_DIM)
    return (-(-n // y), y)

"""GPU time of the Q4_0 / Q8_0 decode matvecs (linear_quant.wgsl) at the decoder's shapes, per work
split and kernel version.

    python benches/quant_matvec.py [--q8] [--splits JSON] [--trials 5] [--json FILE]
    python benches/quant_matvec.py --small          # tiny shapes: checks the bench itself (lavapipe)

Each decoder matrix is called as the graph calls it (model.py ``_decoder_rows``, one input row):
``ops_quant.qkv_proj`` with the attention norm folded in, ``ops_quant.linear`` for wo and w2
accumulating into the residual, ``ops_quant.swiglu_ffn_in`` with the FFN norm, and the tied LM head
``ops_quant.linear`` with the final norm; "floor" is a one-workgroup matvec (what any dependent
dispatch costs). A measurement records ``--reps`` calls into one compute pass (dependent dispatches,
as in a step: each call writes the buffer the next one writes) cycling over enough copies of the
weights that the L2 cache (50 MB on an H100) cannot hold them (``--rotate-mb``: the real step streams
~1.9 GB), then submits it. The time is the pass's GPU duration from timestamp queries when the
adapter has ``timestamp-query`` (else submit to idle, wall clock); "wall" (submit to idle of the
already recorded pass, per call) is printed beside it. Each case first runs its calls for
``--warmup-s`` (GPU clocks), then ``--trials`` rounds over all variants, interleaved so drift hits
them alike; the best round of each is reported. GB/s counts the bytes each call must read: quants
+ f16 scales, 18 (Q4_0) / 34 (Q8_0) per 32 weights.

Variants: the default ``ops_quant.MATVEC_SPLITS`` (linear_quant.wgsl); ``--splits`` adds more:
a JSON list of splits tried on every matrix, or an object ``{"matvec_qkv": [...], ...}`` keyed by
``ops_quant.MATVEC_SPLITS`` kind (``matvec`` = wo and w2, ``matvec_qkv``, ``matvec_swiglu``,
``lm_head``). A split is (MV_LW, MV_RG, MV_RPT, MV_UB), e.g. ``--splits '[[4,8,2,1],[4,16,4,2]]'``.
``--stage`` / ``--f16-hw`` time every variant with other ``ops_quant.MATVEC_STAGE`` / ``F16_HW``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import wgpu

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from voxtral_wgpu import ops_quant as oq  # noqa: E402
from voxtral_wgpu.bench import synthetic_quant  # noqa: E402
from voxtral_wgpu.gpu import Gpu  # noqa: E402
from voxtral_wgpu.ops import Mat  # noqa: E402


class _Adapter:
    """The adapter, asking for ``timestamp-query`` when Gpu requests its device."""

    def __init__(self, adapter, features):
        self._a, self._features = adapter, features

    def __getattr__(self, name):
        return getattr(self._a, name)

    def request_device_sync(self, **kw):
        return self._a.request_device_sync(required_features=self._features, **kw)


class TimedGpu(Gpu):
    """Gpu whose next compute pass can carry begin/end timestamp writes (gpu.py is left as it is)."""

    def __init__(self):
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
        self.has_ts = "timestamp-query" in adapter.features
        super().__init__(adapter=_Adapter(adapter, ["timestamp-query"] if self.has_ts else []))
        self._ts_next = False
        self.period_ns = 1.0
        if self.has_ts:
            self.qset = self.device.create_query_set(type="timestamp", count=2)
            self.qbuf = self.device.create_buffer(size=16, usage=wgpu.BufferUsage.QUERY_RESOLVE
                                                  | wgpu.BufferUsage.COPY_SRC)
            try:  # wgpu-native's ticks -> ns factor (1.0 on NVIDIA / Mesa; WebGPU itself reports ns)
                from wgpu.backends.wgpu_native._ffi import lib

                self.period_ns = float(lib.wgpuQueueGetTimestampPeriod(self.queue._internal)) or 1.0
            except Exception:
                pass

    def _get_pass(self):
        if self._pass is None and self._ts_next:
            self._ts_next = False
            self._pass = self._get_encoder().begin_compute_pass(timestamp_writes={
                "query_set": self.qset, "beginning_of_pass_write_index": 0, "end_of_pass_write_index": 1})
        return super()._get_pass()

    def time_pass(self, record) -> tuple[float | None, float]:
        """(GPU ns from timestamps or None, wall seconds submit -> idle) of one pass holding what
        ``record()`` records."""
        self.sync()
        self._ts_next = self.has_ts
        record()
        timed_pass = self._pass
        self._end_pass()
        if self.has_ts:
            self._get_encoder().resolve_query_set(self.qset, 0, 2, self.qbuf, 0)
        t0 = time.perf_counter()
        self.flush()
        self.sync()
        wall = time.perf_counter() - t0
        assert timed_pass is not None and not self._ts_next, "the recording was split over several passes"
        if not self.has_ts:
            return None, wall
        t = np.frombuffer(self.queue.read_buffer(self.qbuf, 0, 16), np.uint64)
        return float(t[1] - t[0]) * self.period_ns, wall


def parse_variants(splits_arg):
    """[(label, {kind: split})]; an empty dict means the module defaults."""
    out = [("default", {})]
    if splits_arg:
        spec = json.loads(splits_arg)
        if isinstance(spec, list):
            spec = {"*": spec}
        for kind, splits in spec.items():
            for s in splits:
                s = tuple(int(v) for v in s)
                if len(s) != 4:
                    raise SystemExit(f"split {s}: 4 values (MV_LW, MV_RG, MV_RPT, MV_UB)")
                kinds = list(oq.MATVEC_SPLITS) if kind == "*" else [kind]
                out.append(("x".join(map(str, s)), {k: s for k in kinds}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--q8", action="store_true", help="Q8_0 weights (default Q4_0)")
    ap.add_argument("--small", action="store_true", help="tiny shapes, to check the bench on a software adapter")
    ap.add_argument("--reps", type=int, default=200, help="calls per measured pass")
    ap.add_argument("--trials", type=int, default=5, help="measurements per variant; the best is reported")
    ap.add_argument("--rotate-mb", type=float, default=256.0, help="weight copies cycled per pass, in MB at least")
    ap.add_argument("--splits", default="", help="more splits (JSON, see the module docstring)")
    ap.add_argument("--only", nargs="*", default=None, help="case names to run (floor qkv wo swiglu w2 lm_head)")
    ap.add_argument("--warmup-s", type=float, default=0.5,
                    help="seconds of each case's calls before its measurements (clocks ramp up)")
    ap.add_argument("--f16-hw", default="off", choices=["off", "on", "both"],
                    help="ops_quant.F16_HW (scales through unpack2x16float) for every variant, or both ways")
    ap.add_argument("--stage", default="default", choices=["default", "all", "none", "both"],
                    help="kernels staging x * g in workgroup memory (ops_quant.MATVEC_STAGE): its default, all "
                         "norm kernels, none, or both default and none")
    ap.add_argument("--json", default="", help="write the results here")
    a = ap.parse_args()

    dtype = "q8_0" if a.q8 else "q4_0"
    ways = {"off": [False], "on": [True], "both": [False, True]}
    stage_default = tuple(oq.MATVEC_STAGE)
    stages = {"default": [stage_default], "all": [tuple(oq.MATVEC_SPLITS)], "none": [()],
              "both": [stage_default, ()]}[a.stage]
    variants = []  # (label, {kind: split}, (F16_HW, MATVEC_STAGE))
    for label, over in parse_variants(a.splits):
        for hw in ways[a.f16_hw]:
            for st in stages:
                tag = (" f16hw" if hw else "") + ("" if st == stage_default else " stage:" + (",".join(st) or "none"))
                variants.append((label + tag, over, (hw, st)))
    gpu = TimedGpu()
    print(f"adapter: {gpu.description}; timing: {'timestamp queries' if gpu.has_ts else 'submit to idle'}"
          f"{f' (period {gpu.period_ns} ns)' if gpu.period_ns != 1.0 else ''}; {dtype}", flush=True)
    if a.small:
        D, Q, KV, H, V = 128, 128, 32, 384, 4096
        oq.LM_HEAD_ROWS = V  # the tiny LM head still takes the "lm_head" split
    else:
        D, Q, KV, H, V = 3072, 4096, 1024, 9216, 131072
    eps = 1e-5
    rng = np.random.default_rng(0)
    xbuf = gpu.upload(rng.standard_normal(H).astype(np.float32))  # activations (x, att, f1 views of it)
    g = gpu.upload((1 + 0.1 * rng.standard_normal(H)).astype(np.float32))
    res = Mat.of(gpu.empty(4 * D), 1, D)  # residual stream
    out = gpu.empty(4 * max(V, Q + 2 * KV, H))
    x = Mat.of(xbuf, 1, D)
    qkv = Mat.of(out, 1, Q + 2 * KV)
    f1 = Mat.of(out, 1, H)
    logits = Mat.of(out, 1, V)

    # name, MATVEC_SPLITS kind, matrix shapes, call(weights)
    cases = [
        # one workgroup: what a dependent dispatch costs whatever the kernel does
        ("floor", "matvec", [(16, 32)], lambda ws: oq.linear(gpu, Mat.of(xbuf, 1, 32), ws[0], res.cols_(0, 16),
                                                             accumulate=True)),
        ("qkv", "matvec_qkv", [(Q, D), (KV, D), (KV, D)],
         lambda ws: oq.qkv_proj(gpu, x, *ws, qkv, norm=g, eps=eps)),
        ("wo", "matvec", [(D, Q)], lambda ws: oq.linear(gpu, Mat.of(xbuf, 1, Q), ws[0], res, accumulate=True)),
        ("swiglu", "matvec_swiglu", [(H, D), (H, D)],
         lambda ws: oq.swiglu_ffn_in(gpu, x, ws[0], ws[1], f1, norm=g, eps=eps)),
        ("w2", "matvec", [(D, H)], lambda ws: oq.linear(gpu, Mat.of(xbuf, 1, H), ws[0], res, accumulate=True)),
        ("lm_head", "lm_head", [(V, D)], lambda ws: oq.linear(gpu, x, ws[0], logits, norm=g, eps=eps)),
    ]
    if a.only:
        cases = [c for c in cases if c[0] in a.only]
    per_block = oq.QUANT_BYTES[dtype] + 2
    defaults = dict(oq.MATVEC_SPLITS)
    rows = []
    for name, kind, shapes, call in cases:
        nbytes = sum(n * k // oq.QK * per_block for n, k in shapes)
        copies = 1 if a.small or name == "floor" else min(64, math.ceil(a.rotate_mb * 1e6 / nbytes))
        copies = max(copies, 2) if nbytes < 100e6 else copies  # the LM head alone outgrows L2
        weights = [[synthetic_quant(gpu, n, k, dtype, f"{name}{c}.{i}", std=k ** -0.5)
                    for i, (n, k) in enumerate(shapes)] for c in range(copies)]
        gpu.sync()
        todo = []
        for label, over, flags in variants:
            if over and kind not in over:
                continue
            todo.append((label, {**defaults, **over}, flags))

        def select(table, flags):
            oq.MATVEC_SPLITS, (oq.F16_HW, oq.MATVEC_STAGE) = table, flags

        for label, table, flags in todo:  # compile, bind groups
            select(table, flags)
            for ws in weights:
                assert call(ws) is not False, f"{name}: the fused decode kernel did not take the call"

        def record(weights=weights, call=call):
            for i in range(a.reps):
                call(weights[i % len(weights)])

        t_end = time.perf_counter() + a.warmup_s
        while time.perf_counter() < t_end:  # the GPU at its working clocks on this very work
            gpu.time_pass(record)
        best = {}
        for _ in range(a.trials):  # trials interleaved over the variants, so drift hits all alike
            for label, table, flags in todo:
                select(table, flags)
                t_gpu, wall = gpu.time_pass(record)
                t = (t_gpu * 1e-9 if t_gpu is not None else wall) / a.reps
                if label not in best or t < best[label][0]:
                    best[label] = (t, wall / a.reps)
        for label, table, flags in todo:
            t, wall = best[label]
            split = table[kind]
            row = {"case": name, "kind": kind, "variant": label, "split": list(split), "dtype": dtype,
                   "f16_hw": flags[0], "stage": list(flags[1]), "us": t * 1e6, "wall_us": wall * 1e6,
                   "GBps": nbytes / t / 1e9, "bytes": nbytes, "copies": copies, "reps": a.reps,
                   "timing": "timestamps" if gpu.has_ts else "wall"}
            rows.append(row)
            print(f"{name:8s} {label:24s} split {'x'.join(map(str, split)):10s} {row['us']:9.2f} us "
                  f"{row['GBps']:9.2f} GB/s   (wall {row['wall_us']:8.2f} us, {copies} copies)", flush=True)
        gpu.release(*[b for ws in weights for w in ws for b, _, _ in w.chunks])
    oq.MATVEC_SPLITS, oq.F16_HW, oq.MATVEC_STAGE = defaults, False, stage_default
    if a.json:
        Path(a.json).write_text(json.dumps({"adapter": gpu.description, "dtype": dtype, "results": rows}, indent=1))


if __name__ == "__main__":
    main()

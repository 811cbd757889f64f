"""Where a decode step's time goes on this machine: ``python benches/host_profile.py [--dtype q4_0] [--profile]``.

Full-size synthetic model (``--dtype`` as the bench's); times 64 steps with a sync after each and
prints the split between recording (Python + wgpu pass commands), submit (finish + queue.submit,
wgpu-core validation) and waiting for the GPU (the GPU's time for the step, as it starts at the
submit). ``--profile``: 64 more steps under cProfile, top functions by own time.
``--set ops_quant.MATVEC_SPLITS='{"matvec": [32, 1, 1]}'`` (repeatable) overrides a module constant
first (dicts are merged into the current value): A/B tests of tuning knobs on the real step
(``--set model.STEP_REPLAY=false``: every step through the Python op layer, no recorded replay)."""

import argparse
import cProfile
import importlib
import json
import pstats
import time

import numpy as np

from voxtral_wgpu.api import Model
from voxtral_wgpu.bench import synthetic_tokenizer, synthetic_weights
from voxtral_wgpu.config import ModelConfig
from voxtral_wgpu.gpu import Gpu
from voxtral_wgpu.model import Session

ap = argparse.ArgumentParser()
ap.add_argument("--dtype", default="bf16", choices=("bf16", "q4_0", "q8_0"))
ap.add_argument("--kv-cache", default=None, choices=("f32", "f16"))
ap.add_argument("--profile", action="store_true")
ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=JSON")
ap.add_argument("--skip", action="append", default=[], metavar="MODULE.FUNC",
                help="replace an op by a no-op after warm-up (timing experiment: what the step spends on it)")
args = ap.parse_args()
for item in args.set:
    name, value = item.split("=", 1)
    mod_name, attr = name.rsplit(".", 1)
    mod = importlib.import_module(f"voxtral_wgpu.{mod_name}")
    new = json.loads(value)
    old = getattr(mod, attr)
    if isinstance(old, dict):
        new = {**old, **{k: tuple(v) if isinstance(v, list) else v for k, v in new.items()}}
    setattr(mod, attr, new)
gpu = Gpu()
cfg = ModelConfig()
model = Model(gpu, synthetic_weights(gpu, cfg, dtype=args.dtype), synthetic_tokenizer(cfg.decoder.vocab_size),
              kv_cache=args.kv_cache)
from voxtral_wgpu._native import log_mel  # noqa: E402

mel = log_mel(np.concatenate([np.zeros(40960, np.float32), 0.1 * np.random.default_rng(0).standard_normal(160000).astype(np.float32),
                              np.zeros(21760, np.float32)]))
s = Session(model, 6)
s.stop_on_eos = False
s.push_mel(mel)
s.encode_available()
s._decoder_rows(0, 38, head=False)
s.prefilled, s.next_pos = True, 38
for _ in range(5):
    s._decode_step(s.next_pos)
    s.next_pos += 1
gpu.sync()


def steps(n, profiler=None):
    rec = sub = wait = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        s._decode_step(s.next_pos)
        t1 = time.perf_counter()
        gpu.flush()
        if profiler:
            profiler.disable()
        t2 = time.perf_counter()
        gpu.sync()
        t3 = time.perf_counter()
        s.next_pos += 1
        rec, sub, wait = rec + t1 - t0, sub + t2 - t1, wait + t3 - t2
    return rec / n, sub / n, wait / n


for name in args.skip:
    mod_name, attr = name.rsplit(".", 1)
    setattr(importlib.import_module(f"voxtral_wgpu.{mod_name}"), attr, lambda *a, **k: True)
s._step_plan = None  # record the step again: with the skipped ops (and after --set changes)
n0 = gpu.dispatch_count
rec, sub, wait = steps(64)
print(f"{args.dtype}, KV {model.kv_cache} {' '.join(args.set)} {' '.join('-' + n for n in args.skip)}: per step record {1e3 * rec:.2f} ms, submit {1e3 * sub:.2f} ms, "
      f"wait (GPU) {1e3 * wait:.2f} ms; {(gpu.dispatch_count - n0) / 64:.0f} dispatches per step")
if args.profile:
    pr = cProfile.Profile()
    steps(64, pr)
    pstats.Stats(pr).sort_stats("tottime").print_stats(15)

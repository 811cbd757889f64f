"""Where a decode step's host time goes on this machine: ``python benches/host_profile.py``.

Full-size synthetic BF16 model; records 64 steps under cProfile with a sync after each step and
prints the split between recording (Python + wgpu pass commands), submit (finish + queue.submit,
wgpu-core validation) and waiting for the GPU."""

import cProfile
import pstats
import time

import numpy as np

from voxtral_wgpu.api import Model
from voxtral_wgpu.bench import synthetic_tokenizer, synthetic_weights
from voxtral_wgpu.config import ModelConfig
from voxtral_wgpu.gpu import Gpu
from voxtral_wgpu.model import Session

gpu = Gpu()
cfg = ModelConfig()
model = Model(gpu, synthetic_weights(gpu, cfg), synthetic_tokenizer(cfg.decoder.vocab_size))
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
    s._decoder_rows(s.next_pos, 1, head=True)
    s.next_pos += 1
gpu.sync()
rec = sub = wait = 0.0
pr = cProfile.Profile()
for _ in range(64):
    t0 = time.perf_counter()
    pr.enable()
    s._decoder_rows(s.next_pos, 1, head=True)
    t1 = time.perf_counter()
    gpu.flush()
    pr.disable()
    t2 = time.perf_counter()
    gpu.sync()
    t3 = time.perf_counter()
    s.next_pos += 1
    rec, sub, wait = rec + t1 - t0, sub + t2 - t1, wait + t3 - t2
n = 64
print(f"per step: record {1e3 * rec / n:.2f} ms, submit {1e3 * sub / n:.2f} ms, wait {1e3 * wait / n:.2f} ms; "
      f"{gpu.dispatch_count} dispatches so far")
pstats.Stats(pr).sort_stats("tottime").print_stats(15)

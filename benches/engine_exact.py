#!/usr/bin/env python3
"""Full-size synthetic Q4_0: engine streams (different delays, chunkings, join times) vs transcribe() alone."""
import json, sys
import numpy as np
from voxtral_wgpu.api import Model
from voxtral_wgpu.bench import synthetic_tokenizer, synthetic_weights
from voxtral_wgpu.config import ModelConfig
from voxtral_wgpu.engine import Engine
from voxtral_wgpu.gpu import Gpu
gpu = Gpu(); cfg = ModelConfig()
model = Model(gpu, synthetic_weights(gpu, cfg, dtype=sys.argv[1]), synthetic_tokenizer(cfg.decoder.vocab_size))
rng = np.random.default_rng(5)
clips = [(0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in (4.0, 6.5, 5.2, 3.3)]
delays = [480, 80, 960, 480]
alone = [model.transcribe(c, transcription_delay_ms=d, stop_on_eos=False).token_ids for c, d in zip(clips, delays)]
with Engine(model, max_streams=8) as eng:
    ss = []
    for k, (c, d) in enumerate(zip(clips, delays)):
        s = eng.create_stream(transcription_delay_ms=d); s._slot.session.stop_on_eos = False; ss.append(s)
    sizes = [1280, 3000, 777, 16000]
    pos = [0] * 4
    while any(p < len(c) for p, c in zip(pos, clips)):
        for i, s in enumerate(ss):
            if pos[i] < len(clips[i]):
                s.feed(clips[i][pos[i]:pos[i] + sizes[i]]); pos[i] += sizes[i]
    for s in ss: s.finish()
res = [s.token_ids == a for s, a in zip(ss, alone)]
print(json.dumps({"exact": res, "tokens": [len(a) for a in alone], "adapter": gpu.description}))

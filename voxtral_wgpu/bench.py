"""``python -m voxtral_wgpu.bench``: speed and memory of the full-size model on this machine's GPU.

With no ``--weights`` it builds synthetic full-size weights (the real shapes, 4.43 B parameters,
pseudo-random values generated on the GPU by ``shaders/fill.wgsl``), so it needs no download:
``--dtype bf16`` (default) as the published checkpoint, or ``--dtype q4_0`` / ``q8_0`` laid out as a
GGUF from ``voxtral-wgpu quantize`` loads (every linear matrix and the token table / LM head in
repacked quantised blocks; conv weights, biases and norms F32). Random weights emit random tokens,
so EOS is ignored and every position is decoded.

Reports: adapter/backend, load time, encoder ms per second of audio, prefill ms, decoder ms per
step (median, p90 with a sync after each step; and pipelined throughput), tokens/s, offline
real-time factor and peak GPU memory (bytes of buffers held) per audio length, GPU memory held at
the end, host RSS. ``--compare-hf`` runs HF transformers (bf16, CUDA) on the same shapes and audio
lengths.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import time

import numpy as np

from .config import ModelConfig
from .gpu import Gpu, groups_2d, pack_params
from .ops_quant import QK, QTYPES, QuantWeight, chunk_layout, dequantize_blocks, rows_per_chunk
from .weights import DecoderLayer, EncoderLayer, Uploader, Weights

DTYPES = ("bf16",) + QTYPES
F16_MIN_NORMAL, F16_MAX = 2.0 ** -14, 65504.0
SCALE_JITTER = 0.25  # fill.wgsl mode 2: block scales vary by +-25% around the chosen magnitude


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_tokenizer(vocab_size: int, num_special: int = 1000):
    """A tekken-shaped tokenizer with ``vocab_size`` ids (pieces are arbitrary bytes)."""
    from .tokenizer import Tekken

    names = {0: "<unk>", 1: "<s>", 2: "</s>", 32: "[STREAMING_PAD]", 33: "[STREAMING_WORD]"}
    special = [{"rank": i, "token_str": names.get(i, f"<SPECIAL_{i}>"), "is_control": True}
               for i in range(num_special)]
    vocab = [{"rank": r, "token_bytes": base64.b64encode(bytes([r % 256]) * (1 + r // 256 % 3)).decode(),
              "token_str": None} for r in range(vocab_size - num_special)]
    data = {"config": {"default_vocab_size": vocab_size, "default_num_special_tokens": num_special,
                       "version": "v13", "pattern": ""},
            "vocab": vocab, "special_tokens": special}
    return Tekken.from_dict(data, source="synthetic")


class _Filler:
    """Fills GPU buffers with pseudo-random values (see shaders/fill.wgsl for the modes)."""

    BF16, F32, F16_SCALES, BITS = 0, 1, 2, 3

    def __init__(self, gpu: Gpu):
        self.gpu = gpu
        self.seed = 1

    def __call__(self, binding, nbytes: int, scale: float, mode: int) -> None:
        """``binding``: a buffer or a (buffer, offset, size) tuple of at least ``nbytes`` bytes."""
        n_words = nbytes // 4
        self.seed += 1
        k = self.gpu.kernel("fill", "fill")
        self.gpu.dispatch(k, pack_params(n_words, self.seed, float(scale), mode), [binding],
                          groups_2d(-(-n_words // 256)))


def _quant_rms(dtype: str) -> float:
    """RMS of the dequantised weight ``(q - 8) * d`` / ``q * d`` over uniform random quants and the
    fill's block scales (random sign, magnitude ``d * (1 + u/4)``), in units of ``d``."""
    q = np.arange(16) - 8 if dtype == "q4_0" else np.arange(-128, 128)
    return math.sqrt(float(np.mean(q.astype(np.float64) ** 2)) * (1 + SCALE_JITTER ** 2 / 3))


def synthetic_quant(gpu: Gpu, n: int, k: int, dtype: str, label: str, *, std: float, bias=None,
                    fill: _Filler | None = None) -> QuantWeight:
    """``W [n, k]`` as a Q4_0/Q8_0 QuantWeight in ops_quant's repacked GPU layout, the chunks that
    ``upload_quant`` makes, filled on the GPU: random quant bytes and f16 block scales chosen so the
    dequantised weights have standard deviation ~``std``. ``bias``: an uploaded f32 buffer or None."""
    fill = fill or _Filler(gpu)
    if dtype not in QTYPES or k % QK or k <= 0 or n <= 0:
        raise ValueError(f"{label}: cannot make a {dtype} matrix of shape [{n}, {k}]")
    d = std / _quant_rms(dtype)
    lo, hi = d * (1 - SCALE_JITTER), d * (1 + SCALE_JITTER)
    if not (lo >= F16_MIN_NORMAL and hi <= F16_MAX):
        raise ValueError(f"{label}: block scales {lo:.3g}..{hi:.3g} (std {std:.3g}) leave the normal f16 range")
    chunks = []
    step = rows_per_chunk(gpu, dtype, n, k)
    for r0 in range(0, n, step):
        nr = min(step, n - r0)
        qbytes, sc_off, sc_bytes, total = chunk_layout(dtype, nr, k)
        buf = gpu.empty(total, f"{label}[{r0}:]")
        fill((buf, 0, qbytes), qbytes, 0.0, _Filler.BITS)
        fill((buf, sc_off, sc_bytes), sc_bytes, d, _Filler.F16_SCALES)
        chunks.append((buf, r0, nr))
    return QuantWeight(n, k, dtype, chunks, bias)


def _as_stored(a: np.ndarray, dtype: str) -> np.ndarray:
    """A host matrix as a GGUF of ``dtype`` holds it and the loader reads it back (dequantised f32)."""
    if dtype == "bf16" or a.shape[-1] % QK:
        return a
    import gguf

    blocks = gguf.quants.quantize(np.ascontiguousarray(a, np.float32), gguf.GGMLQuantizationType[dtype.upper()])
    return dequantize_blocks(blocks, a.shape[0], a.shape[1], dtype)


def synthetic_weights(gpu: Gpu, cfg: ModelConfig, *, dtype: str = "bf16", seed: int = 0) -> Weights:
    """Full-size weights with random values (std ~ 1/sqrt(fan_in); token table std 0.17/sqrt(3)),
    generated on the GPU.

    ``dtype="bf16"``: as the published checkpoint loads (BF16 matrices, convs included).
    ``"q4_0"`` / ``"q8_0"``: as a GGUF from ``voxtral-wgpu quantize`` loads (gguf_loader): every
    linear matrix whose rows are whole 32-weight blocks, the token table (also the LM head) included,
    is a QuantWeight; conv weights, biases, norms and any other matrix are F32. The decoder's ada
    matrices stay on the host as the loader leaves them (dequantised f32)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    quant = dtype in QTYPES
    up = Uploader(gpu)
    fill = _Filler(gpu)
    rng = np.random.default_rng(seed)

    def dense(n, k, label, bias=False, scale=None, conv=False):
        """``scale``: the half-range of BF16's uniform values; other types get the same std."""
        scale = scale if scale is not None else math.sqrt(3.0 / k)
        b = 0.02 * rng.standard_normal(n) if bias else None
        if quant and not conv and k % QK == 0:
            w = synthetic_quant(gpu, n, k, dtype, label, std=scale / math.sqrt(3.0),
                                bias=up.vector(b, label + ".bias") if bias else None, fill=fill)
            up.nbytes += sum(buf.size for buf, _, _ in w.chunks)
            return w
        kind = "f32" if quant else "bf16"  # a GGUF keeps convs (and matrices of odd row length) F32
        w = up.allocate_dense(n, k, kind, label)
        for buf, _, nrows in w.chunks:
            if kind == "bf16":
                fill(buf, nrows * k * 2, scale, _Filler.BF16)
            else:
                fill(buf, nrows * k * 4, scale, _Filler.F32)
        if bias:
            w.bias = up.vector(b, label + ".bias")
        return w

    def norm(n, label):
        return up.vector(1.0 + 0.1 * rng.standard_normal(n), label)

    def host(a):
        return _as_stored(a.astype(np.float32), dtype)

    e, d = cfg.encoder, cfg.decoder
    eq, ekv = e.n_heads * e.head_dim, e.n_kv_heads * e.head_dim
    dq, dkv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    enc_layers = [EncoderLayer(norm(e.dim, "an"), dense(eq, e.dim, "wq", True), dense(ekv, e.dim, "wk"),
                               dense(ekv, e.dim, "wv", True), dense(e.dim, eq, "wo", True), norm(e.dim, "fn"),
                               dense(e.hidden_dim, e.dim, "w1"), dense(e.dim, e.hidden_dim, "w2", True),
                               dense(e.hidden_dim, e.dim, "w3")) for _ in range(e.n_layers)]
    dec_layers = [DecoderLayer(norm(d.dim, "an"), dense(dq, d.dim, "wq"), dense(dkv, d.dim, "wk"),
                               dense(dkv, d.dim, "wv"), dense(d.dim, dq, "wo"),
                               (1.0 + 0.1 * rng.standard_normal(d.dim)).astype(np.float32),
                               dense(d.hidden_dim, d.dim, "w1"), dense(d.dim, d.hidden_dim, "w2"),
                               dense(d.hidden_dim, d.dim, "w3"),
                               host(rng.standard_normal((d.ada_dim, d.dim)) / math.sqrt(d.dim)),
                               host(0.1 * rng.standard_normal((d.dim, d.ada_dim)) / math.sqrt(d.ada_dim)))
                  for _ in range(d.n_layers)]
    w = Weights(cfg, dense(e.dim, 3 * e.num_mel_bins, "conv0", True, conv=True),
                dense(e.dim, 3 * e.dim, "conv1", True, conv=True),
                enc_layers, norm(e.dim, "enc_norm"), dense(d.dim, cfg.adapter_in, "adapter0"),
                dense(d.dim, d.dim, "adapter2"), dense(d.vocab_size, d.dim, "tok", scale=0.17), dec_layers,
                norm(d.dim, "norm"), nbytes=up.nbytes, source=f"synthetic-{dtype}",
                extra={"embeddings": "gpu"} if quant else {})
    gpu.sync()
    return w


def _size(nbytes: int) -> str:
    """GiB; MiB or KiB below 0.1 GiB / 0.1 MiB (tiny test models)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale / 10:
            return f"{nbytes / scale:.2f} {unit}" if unit == "GiB" else f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def measure(model, seconds_list, *, steps: int = 64, encoder_seconds=(10.0, 60.0, 300.0), log=print) -> dict:
    """Time the stages of ``model`` (a voxtral_wgpu Model)."""
    from ._native import log_mel
    from .audio import padding
    from .model import MEL_FRAMES_PER_POSITION, OFFLINE_CHUNK_POSITIONS, Session

    gpu = model.gpu
    n_delay = model.default_delay_ms // 80
    rng = np.random.default_rng(1)
    res: dict = {}

    def audio_of(seconds):
        return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)

    def mel_of(samples):
        left, right = padding(len(samples), n_delay)
        return log_mel(np.concatenate([np.zeros(left, np.float32), samples, np.zeros(right, np.float32)]))

    # warm-up: compile every pipeline once
    s = Session(model, n_delay)
    s.stop_on_eos = False
    s.push_mel(mel_of(audio_of(2.0)))
    s.decode()
    s.release()
    gpu.sync()

    # encoder throughput: audio through encoder + adapter only, in transcribe()'s batches, at each of
    # encoder_seconds (the sliding window fills after 15 s: attention per frame stops growing there)
    def encoder_ms_per_audio_s(seconds):
        mel = mel_of(audio_of(seconds))
        s = Session(model, n_delay, chunk_positions=getattr(model, "offline_chunk_positions", OFFLINE_CHUNK_POSITIONS))
        s.push_mel(mel)
        gpu.sync()
        t = time.perf_counter()
        total = len(mel) // MEL_FRAMES_PER_POSITION
        while s.positions_encoded < total:
            s.next_pos = s.positions_encoded  # consume the ring without decoding
            s.encode_available()
        gpu.sync()
        enc_s = time.perf_counter() - t
        s.release()
        return 1000 * enc_s / (total * 0.08), total

    for i, sec in enumerate(encoder_seconds):
        ms, total = encoder_ms_per_audio_s(sec)
        res[f"encoder_ms_per_audio_s_{sec:g}s"] = ms
        if i == 0:
            res["encoder_ms_per_audio_s"] = ms
        log(f"encoder, {sec:g} s of audio: {ms:.1f} ms per second of audio ({total} positions)")
    mel = mel_of(audio_of(10.0))
    total = len(mel) // MEL_FRAMES_PER_POSITION

    # prefill and per-step latency (sync after every step)
    s = Session(model, n_delay)
    s.stop_on_eos = False
    s.push_mel(mel)
    s.encode_available()
    gpu.sync()
    L = len(s.prompt_ids)
    t = time.perf_counter()
    s._decoder_rows(0, L - 1, head=False)
    s.prefilled = True
    s.next_pos = L - 1
    gpu.sync()
    res["prefill_ms"] = 1000 * (time.perf_counter() - t)
    lat = []
    for _ in range(min(steps, total - L)):
        t = time.perf_counter()
        s._decode_step(s.next_pos)
        s.next_pos += 1
        gpu.sync()
        lat.append(1000 * (time.perf_counter() - t))
        s.encode_available()
        gpu.sync()
    res["step_ms_median"], res["step_ms_p90"] = _pct(lat, 50), _pct(lat, 90)
    log(f"prefill: {res['prefill_ms']:.1f} ms; step (synced): median {res['step_ms_median']:.2f} ms, "
        f"p90 {res['step_ms_p90']:.2f} ms")

    # pipelined decode throughput (no sync between steps), fresh session, steady state: the first
    # step (recorded op by op for the replays, once per session and decoder ring size) runs untimed;
    # the median of three sessions (one run of 64 steps moved by ~4 % from run to run on an H100)
    s.release()
    runs = []
    for _ in range(3):
        s = Session(model, n_delay)
        s.stop_on_eos = False
        s.push_mel(mel)
        s.encode_available()
        s._decoder_rows(0, L - 1, head=False)
        s.prefilled = True
        s.next_pos = L - 1
        s._decode_step(s.next_pos)
        s.next_pos += 1
        gpu.sync()
        n = min(steps, s.positions_encoded - s.next_pos)
        t = time.perf_counter()
        for i in range(n):  # submitted as Session.decode() submits them
            s._step(first=i == 0)
        gpu.sync()
        runs.append(1000 * (time.perf_counter() - t) / max(n, 1))
        s.release()
    res["step_ms_pipelined_runs"] = runs
    res["step_ms_pipelined"] = _pct(runs, 50)
    res["tokens_per_s"] = 1000 / res["step_ms_pipelined"]
    log(f"step (pipelined): {res['step_ms_pipelined']:.2f} ms = {res['tokens_per_s']:.0f} tokens/s (median of "
        f"{', '.join(f'{r:.2f}' for r in runs)} ms)")

    # offline real-time factor (whole transcribe, EOS ignored so every position decodes) and the
    # peak of GPU buffers held during it (weights + the session's caches and activations)
    for sec in seconds_list:
        a = audio_of(sec)
        gpu.sync()
        gpu.reset_peak()
        t = time.perf_counter()
        tr = model.transcribe(a, stop_on_eos=False, progress=False)
        dt = time.perf_counter() - t
        res[f"rtf_{sec:g}s"] = dt / sec
        res[f"steps_{sec:g}s"] = len(tr.token_ids)
        res[f"gpu_peak_bytes_{sec:g}s"] = gpu.bytes_peak
        log(f"offline {sec:g} s: {dt:.2f} s, RTF {dt / sec:.4f}, {len(tr.token_ids)} tokens, "
            f"peak GPU memory {_size(gpu.bytes_peak)}")
    # scaling with session length: step time at the context a 1, 10 or 60 minute session reaches
    # (positions jumped to directly; the decoder attends to min(position, 8192) cached keys)
    for minutes in (1, 10, 60):
        pos = int(minutes * 60 / 0.08) + L
        s = Session(model, n_delay)
        s.stop_on_eos = False
        s.push_mel(mel[: L * MEL_FRAMES_PER_POSITION])
        s.encode_available()
        s._decoder_rows(0, L - 1, head=False)
        s._grow_decoder_cache(pos + 1)
        gpu.sync()
        ts = []
        for i in range(16):
            t = time.perf_counter()
            s._decode_step(pos + i)
            gpu.sync()
            ts.append(1000 * (time.perf_counter() - t))
        res[f"step_ms_at_{minutes}min"] = _pct(ts, 50)
        res[f"dec_kv_bytes_at_{minutes}min"] = sum(b.size for b in s.dec.k_cache + s.dec.v_cache)
        log(f"step at {minutes} min of context: {res[f'step_ms_at_{minutes}min']:.2f} ms (synced), decoder KV "
            f"{_size(res[f'dec_kv_bytes_at_{minutes}min'])}")
        s.release()

    # streaming: 10 s fed in 80 ms chunks as fast as the model takes them; per-token latency is
    # the time from the feed() that completed a token's position to that token's return
    stream = model.create_stream()
    stream._session.stop_on_eos = False  # random weights: decode every position
    a = audio_of(10.0)
    for i in range(0, len(a), 1280):
        stream.feed(a[i:i + 1280])
    stream.finish()
    lat = [1000 * x for x in stream.latencies]
    res["stream_latency_ms_median"], res["stream_latency_ms_p90"] = _pct(lat, 50), _pct(lat, 90)
    log(f"streaming (80 ms chunks, unpaced): per-token latency median {res['stream_latency_ms_median']:.1f} ms, "
        f"p90 {res['stream_latency_ms_p90']:.1f} ms over {len(lat)} tokens")
    res["gpu_bytes"] = gpu.bytes_allocated  # held at the end: weights, kernels' buffers, the stream's session
    res["host_rss_bytes"] = rss_bytes()
    return res


def compare_hf(seconds_list, log=print) -> dict:
    """HF transformers peer: same shapes, bf16 on CUDA, greedy generate with EOS disabled."""
    import torch
    from transformers import (VoxtralRealtimeConfig, VoxtralRealtimeFeatureExtractor,
                              VoxtralRealtimeForConditionalGeneration)

    if not torch.cuda.is_available():
        raise RuntimeError("--compare-hf needs torch with CUDA")
    audio_cfg = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, head_dim=64, num_mel_bins=128, rms_norm_eps=1e-5, sliding_window=750,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    text_cfg = dict(vocab_size=131072, hidden_size=3072, intermediate_size=9216, num_hidden_layers=26,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                    sliding_window=8192, max_position_embeddings=131072, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cfg = VoxtralRealtimeConfig(audio_config=audio_cfg, text_config=text_cfg, default_num_delay_tokens=6)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VoxtralRealtimeForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 11
    fe = VoxtralRealtimeFeatureExtractor()
    res = {"device": torch.cuda.get_device_name(0), "dtype": "bf16"}

    def run(seconds):
        rng = np.random.default_rng(1)
        n = int(seconds * 16000)
        audio = (0.1 * rng.standard_normal(n)).astype(np.float32)
        align = (1280 - n % 1280) % 1280
        padded = np.concatenate([np.zeros(40960, np.float32), audio, np.zeros(align + 17 * 1280, np.float32)])
        mel = fe(padded, sampling_rate=16000, return_tensors="pt")["input_features"].to("cuda", torch.bfloat16)
        ids = torch.tensor([[1] + [32] * 38], device="cuda")
        n_pos = mel.shape[-1] // 8
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, input_features=mel, num_delay_tokens=6, do_sample=False,
                                 max_length=n_pos, min_length=n_pos)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        steps = out.shape[1] - 39
        return dt, steps, torch.cuda.max_memory_allocated()

    run(2.0)
    for sec in seconds_list:
        dt, steps, peak = run(sec)
        res[f"rtf_{sec:g}s"] = dt / sec
        res[f"step_ms_{sec:g}s"] = 1000 * dt / max(steps, 1)
        res[f"gpu_peak_bytes_{sec:g}s"] = peak  # torch's allocated tensors (weights included)
        log(f"HF peer {sec:g} s: {dt:.2f} s, RTF {dt / sec:.3f}, {1000 * dt / max(steps, 1):.1f} ms/step, "
            f"peak GPU memory {_size(peak)}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m voxtral_wgpu.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="real model (directory or .gguf) instead of synthetic weights")
    ap.add_argument("--kv-cache", choices=("f32", "f16"), default=None,
                    help="attention cache storage (default: f32 for BF16, f16 for quantised weights)")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="synthetic weights: bf16 (as the published checkpoint, default) or q4_0 / q8_0 "
                         "(as a GGUF from `voxtral-wgpu quantize`)")
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0], help="audio lengths for offline RTF")
    ap.add_argument("--steps", type=int, default=64, help="decoder steps to time")
    ap.add_argument("--encoder-seconds", type=float, nargs="+", default=[10.0, 60.0, 300.0],
                    help="audio lengths for the encoder's ms per second of audio (the first is the headline row)")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--compare-hf", action="store_true", help="also run the HF transformers peer (needs CUDA)")
    ap.add_argument("--streams", type=int, nargs="+", default=None, metavar="N",
                    help="instead of the single-stream figures: N live streams through one Engine, fed at real "
                         "time (voxtral_wgpu/engine/bench.py), for each N given")
    ap.add_argument("--stream-seconds", type=float, default=30.0, help="seconds of audio per stream with --streams")
    ap.add_argument("--params", default=None, help="params.json of other dimensions for the synthetic model "
                                                   "(default: the published 4B shapes)")
    args = ap.parse_args(argv)
    if args.weights and args.dtype:
        ap.error("--dtype picks the synthetic weights' type; a --weights model has its own")
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    from .api import Model, load

    gpu = Gpu()
    t = time.perf_counter()
    if args.weights:
        model = load(args.weights, gpu=gpu, progress=False, kv_cache=args.kv_cache)
        kind = "file"
    else:
        cfg = ModelConfig.from_file(args.params) if args.params else ModelConfig()
        dtype = args.dtype or "bf16"
        w = synthetic_weights(gpu, cfg, dtype=dtype)
        model = Model(gpu, w, synthetic_tokenizer(cfg.decoder.vocab_size), kv_cache=args.kv_cache)
        kind = f"synthetic-{dtype}"
    gpu.sync()
    wdtype = getattr(model.weights.tok_embeddings, "dtype", "?")  # bf16 / q4_0 / q8_0 (f32 for F32 files)
    res = {"adapter": gpu.description, "weights": kind, "weights_dtype": wdtype,
           "kv_cache": getattr(model, "kv_cache", "f32"), "load_s": time.perf_counter() - t,
           "weight_bytes": model.weights.nbytes}
    log(f"adapter: {gpu.description}; weights {kind} ({wdtype}), {_size(model.weights.nbytes)}, "
        f"loaded in {res['load_s']:.1f} s; KV cache {res['kv_cache']}")
    if args.streams:
        from .engine.bench import measure_streams

        if min(args.streams) < 1 or not args.stream_seconds > 0:
            ap.error("--streams takes positive counts and --stream-seconds a positive duration")
        res["streams"] = measure_streams(model, args.streams, args.stream_seconds, log=log)
        if args.json:
            print(json.dumps(res))
        return 0
    res.update(measure(model, args.seconds, steps=args.steps, encoder_seconds=args.encoder_seconds, log=log))
    peaks = ", ".join(f"{_size(res[f'gpu_peak_bytes_{sec:g}s'])} ({sec:g} s)" for sec in args.seconds)
    log(f"GPU memory (buffers): {_size(res['gpu_bytes'])} held at the end, peak during offline transcription "
        f"{peaks}; host RSS {_size(res['host_rss_bytes'])}")
    if args.compare_hf:
        hf = compare_hf(args.seconds, log=log)
        res["hf"] = hf
        for sec in args.seconds:
            k, m = f"rtf_{sec:g}s", f"gpu_peak_bytes_{sec:g}s"
            line = f"vs HF (bf16) at {sec:g} s, voxtral_wgpu {wdtype}: speed-up {hf[k] / res[k]:.1f}x (RTF)"
            if m in hf:
                line += f", peak GPU memory {res[m] / hf[m]:.2f}x HF's"
            log(line)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

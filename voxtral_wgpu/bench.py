"""``python -m voxtral_wgpu.bench``: speed and memory of the full-size model on this machine's GPU.

With no ``--weights`` it builds synthetic full-size weights (the real shapes, 4.43 B parameters,
pseudo-random values generated on the GPU by ``shaders/fill.wgsl``), so it needs no download.
Random weights emit random tokens, so EOS is ignored and every position is decoded.

Reports: adapter/backend, load time, encoder ms per second of audio, prefill ms, decoder ms per
step (median, p90 with a sync after each step; and pipelined throughput), tokens/s, offline
real-time factor per audio length, GPU memory (bytes of buffers created), host RSS.
``--compare-hf`` runs HF transformers (bf16, CUDA) on the same shapes and audio lengths.
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
from .weights import DecoderLayer, EncoderLayer, Uploader, Weights


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
    """Fills GPU buffers with pseudo-random values (see shaders/fill.wgsl)."""

    def __init__(self, gpu: Gpu):
        self.gpu = gpu
        self.seed = 1

    def __call__(self, buf, nbytes: int, scale: float, bf16: bool) -> None:
        n_words = nbytes // 4
        self.seed += 1
        k = self.gpu.kernel("fill", "fill")
        self.gpu.dispatch(k, pack_params(n_words, self.seed, float(scale), 0 if bf16 else 1), [buf],
                          groups_2d(-(-n_words // 256)))


def synthetic_weights(gpu: Gpu, cfg: ModelConfig, *, seed: int = 0) -> Weights:
    """Full-size BF16 weights with random values (std ~ 1/sqrt(fan_in)), generated on the GPU."""
    up = Uploader(gpu)
    fill = _Filler(gpu)
    rng = np.random.default_rng(seed)

    def dense(n, k, label, bias=False, scale=None):
        w = up.allocate_dense(n, k, "bf16", label)
        for buf, _, nrows in w.chunks:
            fill(buf, nrows * k * 2, scale if scale is not None else math.sqrt(3.0 / k), True)
        if bias:
            w.bias = up.vector(0.02 * rng.standard_normal(n), label + ".bias")
        return w

    def norm(n, label):
        return up.vector(1.0 + 0.1 * rng.standard_normal(n), label)

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
                               (rng.standard_normal((d.ada_dim, d.dim)) / math.sqrt(d.dim)).astype(np.float32),
                               (0.1 * rng.standard_normal((d.dim, d.ada_dim)) / math.sqrt(d.ada_dim)).astype(np.float32))
                  for _ in range(d.n_layers)]
    w = Weights(cfg, dense(e.dim, 3 * e.num_mel_bins, "conv0", True), dense(e.dim, 3 * e.dim, "conv1", True),
                enc_layers, norm(e.dim, "enc_norm"), dense(d.dim, cfg.adapter_in, "adapter0"),
                dense(d.dim, d.dim, "adapter2"), dense(d.vocab_size, d.dim, "tok", scale=0.17), dec_layers,
                norm(d.dim, "norm"), nbytes=up.nbytes, source="synthetic")
    gpu.sync()
    return w


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def measure(model, seconds_list, *, steps: int = 64, log=print) -> dict:
    """Time the stages of ``model`` (a voxtral_wgpu Model)."""
    from ._native import log_mel
    from .audio import SAMPLES_PER_TOKEN, padding
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

    # encoder throughput: 10 s of audio through encoder + adapter only
    mel = mel_of(audio_of(10.0))
    s = Session(model, n_delay, chunk_positions=OFFLINE_CHUNK_POSITIONS)
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
    res["encoder_ms_per_audio_s"] = 1000 * enc_s / (total * 0.08)
    log(f"encoder: {res['encoder_ms_per_audio_s']:.1f} ms per second of audio ({total} positions)")

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
        s._decoder_rows(s.next_pos, 1, head=True)
        s.next_pos += 1
        gpu.sync()
        lat.append(1000 * (time.perf_counter() - t))
        s.encode_available()
        gpu.sync()
    res["step_ms_median"], res["step_ms_p90"] = _pct(lat, 50), _pct(lat, 90)
    log(f"prefill: {res['prefill_ms']:.1f} ms; step (synced): median {res['step_ms_median']:.2f} ms, "
        f"p90 {res['step_ms_p90']:.2f} ms")

    # pipelined decode throughput (no sync between steps), fresh session
    s.release()
    s = Session(model, n_delay)
    s.stop_on_eos = False
    s.push_mel(mel)
    s.encode_available()
    s._decoder_rows(0, L - 1, head=False)
    s.prefilled = True
    s.next_pos = L - 1
    gpu.sync()
    n = min(steps, s.positions_encoded - s.next_pos)
    t = time.perf_counter()
    for _ in range(n):
        s._decoder_rows(s.next_pos, 1, head=True)
        s.next_pos += 1
        gpu.flush()
    gpu.sync()
    res["step_ms_pipelined"] = 1000 * (time.perf_counter() - t) / max(n, 1)
    s.release()
    res["tokens_per_s"] = 1000 / res["step_ms_pipelined"]
    log(f"step (pipelined): {res['step_ms_pipelined']:.2f} ms = {res['tokens_per_s']:.0f} tokens/s")

    # offline real-time factor (whole transcribe, EOS ignored so every position decodes)
    for sec in seconds_list:
        a = audio_of(sec)
        gpu.sync()
        t = time.perf_counter()
        tr = model.transcribe(a, stop_on_eos=False, progress=False)
        dt = time.perf_counter() - t
        res[f"rtf_{sec:g}s"] = dt / sec
        res[f"steps_{sec:g}s"] = len(tr.token_ids)
        log(f"offline {sec:g} s: {dt:.2f} s, RTF {dt / sec:.4f}, {len(tr.token_ids)} tokens")
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
            s._decoder_rows(pos + i, 1, head=True)
            gpu.sync()
            ts.append(1000 * (time.perf_counter() - t))
        res[f"step_ms_at_{minutes}min"] = _pct(ts, 50)
        res[f"dec_kv_bytes_at_{minutes}min"] = 2 * len(s.dec.k_cache) * s.dec.cap * 4 * model.cfg.decoder.n_kv_heads * model.cfg.decoder.head_dim
        log(f"step at {minutes} min of context: {res[f'step_ms_at_{minutes}min']:.2f} ms (synced), decoder KV "
            f"{res[f'dec_kv_bytes_at_{minutes}min'] / 2**20:.0f} MiB")
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
    res["gpu_bytes"] = gpu.bytes_allocated
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
    res = {"device": torch.cuda.get_device_name(0)}

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
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, input_features=mel, num_delay_tokens=6, do_sample=False,
                                 max_length=n_pos, min_length=n_pos)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        steps = out.shape[1] - 39
        return dt, steps

    run(2.0)
    for sec in seconds_list:
        dt, steps = run(sec)
        res[f"rtf_{sec:g}s"] = dt / sec
        res[f"step_ms_{sec:g}s"] = 1000 * dt / max(steps, 1)
        log(f"HF peer {sec:g} s: {dt:.2f} s, RTF {dt / sec:.3f}, {1000 * dt / max(steps, 1):.1f} ms/step")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m voxtral_wgpu.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="real model (directory or .gguf) instead of synthetic weights")
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0], help="audio lengths for offline RTF")
    ap.add_argument("--steps", type=int, default=64, help="decoder steps to time")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--compare-hf", action="store_true", help="also run the HF transformers peer (needs CUDA)")
    ap.add_argument("--params", default=None, help="params.json of other dimensions for the synthetic model "
                                                   "(default: the published 4B shapes)")
    args = ap.parse_args(argv)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    from .api import Model, load

    gpu = Gpu()
    t = time.perf_counter()
    if args.weights:
        model = load(args.weights, gpu=gpu, progress=False)
        kind = "file"
    else:
        cfg = ModelConfig.from_file(args.params) if args.params else ModelConfig()
        w = synthetic_weights(gpu, cfg)
        model = Model(gpu, w, synthetic_tokenizer(cfg.decoder.vocab_size))
        kind = "synthetic-bf16"
    gpu.sync()
    res = {"adapter": gpu.description, "weights": kind, "load_s": time.perf_counter() - t,
           "weight_bytes": model.weights.nbytes}
    log(f"adapter: {gpu.description}; weights {kind}, {model.weights.nbytes / 2**30:.2f} GiB, "
        f"loaded in {res['load_s']:.1f} s")
    res.update(measure(model, args.seconds, steps=args.steps, log=log))
    log(f"GPU memory (buffers): {res['gpu_bytes'] / 2**30:.2f} GiB; host RSS {res['host_rss_bytes'] / 2**30:.2f} GiB")
    if args.compare_hf:
        hf = compare_hf(args.seconds, log=log)
        res["hf"] = hf
        for sec in args.seconds:
            k = f"rtf_{sec:g}s"
            log(f"speed-up vs HF at {sec:g} s: {hf[k] / res[k]:.1f}x (RTF)")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

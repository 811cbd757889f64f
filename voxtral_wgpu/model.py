"""The Voxtral Realtime graph: encoder, adapter and decoder as lists of op calls.

One :class:`Session` is one transcription, offline or streaming: it receives log-mel frames as
they become available and decodes every position whose audio is complete. Offline transcription
is the same session fed the whole padded signal at once, so streaming equals offline by
construction (spec §6.3).

Shapes are written ``[rows, cols]`` with the real model's sizes in comments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import wgpu

from . import ops
from .audio import delay_ms_to_tokens
from .config import ModelConfig
from .gpu import Gpu
from .ops import ACT_GELU, Mat
from .weights import Weights

MEL_FRAMES_PER_POSITION = 8  # 80 ms of 10 ms hops
ENC_FRAMES_PER_POSITION = 4  # after the stride-2 conv
CONV0_CONTEXT = 3  # mel frames carried into a chunk: conv0 (k3, left pad 2) + one frame to rebuild g0[-1]
MAX_CHUNK_POSITIONS = 32  # default positions per encoder batch (128 encoder rows); larger inputs are split
# Whole files: bigger encoder batches keep the GPU busy (512 rows). Quantised models used 48 while
# every encoder layer kept a ring of window + batch - 1 rows (the 2.7 GiB target); with one shared
# ring (_EncoderState) H100, Q4_0, 30 s through the encoder / peak of a 60 s transcription: 48
# positions 0.369 s / 2.643 GiB, 96: 0.306 s / 2.675, 112: 0.292 s / 2.685, 128: 0.275 s / 2.695 GiB.
OFFLINE_CHUNK_POSITIONS = 128
TOKEN_RING = 4096  # token-id ring on the GPU (prompt + generated), read back every READBACK_STEPS
# The ring's buffer holds the ids in its first TOKEN_RING words and each generated id's softmax
# probability (f32 bits, written by the same argmax) in the next TOKEN_RING, so every readback of
# the ring brings back both; a readback copies TOKEN_RING_WORDS words.
TOKEN_RING_WORDS = 2 * TOKEN_RING
READBACK_STEPS = 16  # ... each copy taken READBACK_STEPS steps after it was recorded, so no read drains the queue
KV_CACHE_TYPES = ("f32", "f16")
STEP_REPLAY = True  # decode steps replay the first step's recorded dispatches (Session._decode_step)
# Decode steps go to the GPU STEPS_PER_SUBMIT at a time (the first of a run alone, so the GPU starts
# at once): each submit costs GPU time besides the host's (H100, Q4_0, pipelined: 1.96 ms a step
# submitted one by one, 1.93 by 2 or 4). Each step's rotation (cos, sin) row therefore sits in a ring
# row of its own (p % STEP_TABLE_RING), written ahead of the steps recorded before it, instead of one
# row rewritten before every step, which forced a submit a step.
STEPS_PER_SUBMIT = 4
STEP_TABLE_RING = 64
# Batched passes (encoder chunks, the decoder prefill) are submitted every LAYERS_PER_SUBMIT layers, so
# the GPU starts while the host records the rest (recording took ~20 ms per 128-position encoder chunk
# and ~30 ms for the prefill's 443 dispatches, H100 host; the GPU idled through it).
LAYERS_PER_SUBMIT = 4


def time_embedding(t: float, dim: int, theta: float = 10000.0) -> np.ndarray:
    """Sinusoidal embedding of the delay, ``[cos(t*f), sin(t*f)]`` (cos first; spec §5.1)."""
    half = dim // 2
    inv = np.exp(-math.log(theta) * np.arange(half, dtype=np.float64) / half)
    return np.concatenate([np.cos(t * inv), np.sin(t * inv)])


def gelu64(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ada_scales(weights: Weights, n_delay: int) -> list[np.ndarray]:
    """Per decoder layer ``1 + W_up GELU(W_down t_cond)`` for this delay (float64 on the host)."""
    t_cond = time_embedding(float(n_delay), weights.cfg.decoder.dim)
    out = []
    for layer in weights.dec_layers:
        h = gelu64(layer.ada_down.astype(np.float64) @ t_cond)
        out.append(1.0 + layer.ada_up.astype(np.float64) @ h)
    return out


def encoder_layers(gpu: Gpu, weights: Weights, h: Mat, xb: Mat, qkv: Mat, att: Mat, f1: Mat, f3: Mat,
                   attend) -> None:
    """The encoder's transformer layers (spec §4.2) over the rows of ``h`` ``[rows, 1280]``, in place.
    ``attend(i)`` records layer i's attention from the rotated-to-be q | k | v in ``qkv``: the rows'
    keys and values into their ring(s), then ``att`` (one session's ring in ``Session``, every
    stream's ring in the engine's pools). Every linear is ``batch_invariant``: a row's result must not
    depend on how positions were batched (streaming chunks, offline batches, many streams' rows),
    or streaming would drift from offline by float rounding and flip near-tie tokens."""
    e = weights.cfg.encoder
    for i, layer in enumerate(weights.enc_layers):
        ops.qkv_proj(gpu, h, layer.wq, layer.wk, layer.wv, qkv, norm=layer.attention_norm, eps=e.norm_eps,
                     scratch=xb, batch_invariant=True)
        attend(i)
        ops.linear(gpu, att, layer.wo, h, accumulate=True, batch_invariant=True)
        ops.swiglu_ffn_in(gpu, h, layer.w1, layer.w3, f1, norm=layer.ffn_norm, eps=e.norm_eps, scratch=xb, tmp=f3,
                          batch_invariant=True)
        ops.linear(gpu, f1, layer.w2, h, accumulate=True, batch_invariant=True)
        if i % LAYERS_PER_SUBMIT == LAYERS_PER_SUBMIT - 1:
            gpu.flush()  # the GPU starts on these layers while the host records the rest


class Model:
    """A loaded model on one GPU: weights, shared kernels and per-delay constants."""

    def __init__(self, gpu: Gpu, weights: Weights, tokenizer, *, transcription_delay_ms: int | None = None,
                 kv_cache: str | None = None):
        self.gpu = gpu
        self.weights = weights
        self.cfg: ModelConfig = weights.cfg
        self.tokenizer = tokenizer
        default_ms = (transcription_delay_ms if transcription_delay_ms is not None
                      else tokenizer.audio.transcription_delay_ms)
        delay_ms_to_tokens(default_ms)  # a clear error for NaN, inf or an off-grid delay (tekken.json's too)
        self.default_delay_ms = int(default_ms)
        self.n_left_pad = int(tokenizer.audio.streaming_n_left_pad_tokens)
        self._ffn_norms: dict[int, list] = {}
        self.argmax = ops.Argmax(gpu, self.cfg.decoder.vocab_size)
        # KV caches (encoder and decoder): f32 keeps BF16 models at float32 parity with the reference;
        # f16 halves the largest session buffers (and attention's reads) and is the default for
        # quantised models, whose weights already carry more error than f16 storage adds. Lean
        # sessions also encode files in smaller batches: the encoder ring holds window + batch - 1 rows.
        if kv_cache is None:
            kv_cache = "f16" if weights.quantized else "f32"
        if kv_cache not in KV_CACHE_TYPES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_TYPES)}, not {kv_cache!r}")
        self.kv_cache = kv_cache
        self.kv_f16 = kv_cache == "f16"
        self.offline_chunk_positions = OFFLINE_CHUNK_POSITIONS  # transcribe()'s encoder batch (positions)

    def ffn_norms(self, n_delay: int) -> list:
        """Decoder FFN norm weights with the delay's ada scale folded in (``g * (1 + s)``), on the GPU."""
        if n_delay not in self._ffn_norms:
            scales = ada_scales(self.weights, n_delay)
            self._ffn_norms[n_delay] = [
                self.gpu.upload((layer.ffn_norm_host.astype(np.float64) * s).astype(np.float32), f"ffn_norm{i}")
                for i, (layer, s) in enumerate(zip(self.weights.dec_layers, scales))
            ]
        return self._ffn_norms[n_delay]

    def prompt(self, n_delay: int) -> list[int]:
        """``[BOS] + [STREAMING_PAD] * (n_left_pad + n_delay)``: 39 ids at 480 ms (spec §6.1)."""
        t = self.tokenizer
        return [t.bos_id] + [t.streaming_pad_id] * (self.n_left_pad + n_delay)


@dataclass
class _EncoderState:
    """Buffers of the incremental encoder; S = 4 * chunk_positions rows at most (128 by default)."""

    mel: object  # f32 [CONV0_CONTEXT + 2S, 128]  mel frames, carried context first
    g0: object  # f32 [1 + 2S, enc_dim]  GELU(conv0) incl. the carried frame g0[-1]
    h: object  # f32 [S, 1280]  residual stream
    xb: object  # f32 [S, 1280]  normed input of attention / FFN
    qkv: object  # f32 [S, 2048 + 2*2048]  q | k | v of each row
    att: object  # f32 [S, 2048]
    f1: object  # f32 [S, 5120]
    f3: object  # f32 [S, 5120]
    out: object  # f32 [S, 1280]  after the final norm = [S/4, 5120] adapter input
    a1: object  # f32 [S/4, 3072]  adapter hidden
    rope: object  # f32 [S, head_dim/2, 2]
    # Keys and values, f32 or f16 (Model.kv_cache), rows of n_kv_heads*head_dim, position p at slot
    # p % capacity. A chunk's queries see window - 1 earlier positions and the chunk's own, so each
    # layer keeps only its last window - 1 positions (k_hist / v_hist, capacity hist); the chunk
    # attends through one ring shared by all layers (k_work / v_work, capacity cap = window + S - 1:
    # the layer's history is copied in, the chunk's rows written, and the new rows copied back out).
    # A ring of window + S - 1 rows per layer held 118 MiB more at S = 512 with f16 (32 layers).
    k_hist: list  # per layer [hist, kv width]
    v_hist: list
    hist: int
    k_work: object  # [cap, kv width]
    v_work: object
    cap: int


@dataclass
class _DecoderState:
    x: object  # f32 [R, 3072] residual stream, R = prompt length (prefill rows)
    xb: object  # f32 [R, 3072]
    qkv: object  # f32 [R, 4096 + 2*1024]  q | k | v of each row
    part: object  # f32 split-K attention scratch [32, window/256, 130]
    att: object  # f32 [R, 4096]
    f1: object  # f32 [R, 9216]
    f3: object  # f32 [R, 9216]
    z: object  # f32 [1, 3072] final-normed last row
    logits: object  # f32 [vocab]
    rope: object  # f32 [R, head_dim/2, 2]
    step_rope: object  # f32 [STEP_TABLE_RING, head_dim/2, 2]: decode step p's rotation in row p % STEP_TABLE_RING
    audio: object  # f32 [acap, 3072] audio-embedding ring
    acap: int
    tokens: object  # u32 [TOKEN_RING_WORDS]: token id at decoder position p in slot p % TOKEN_RING, its
    #                 softmax probability (f32 bits; generated ids only) in slot TOKEN_RING + p % TOKEN_RING
    k_cache: list  # per layer [cap, 1024], f32 or f16 (Model.kv_cache)
    v_cache: list
    cap: int
    max_cap: int


class Session:
    """One transcription: incremental encoder, adapter, and greedy decoder.

    ``push_mel(frames)`` accepts any number of log-mel frames ``[n, 128]``; ``close(n_positions)``
    declares the end (offline: the padded length in positions). ``decode()`` runs every decoder
    step whose audio embedding exists and returns the new token ids.
    """

    def __init__(self, model: Model, n_delay: int, *, chunk_positions: int = MAX_CHUNK_POSITIONS,
                 encoder: bool = True):
        """``encoder=False``: no encoder buffers; someone else (the engine's batched encoder) turns this
        session's mel into audio embeddings, ``chunk_positions`` at a time at most."""
        self.model = model
        # positions per encoder batch; results do not depend on it (every encoder op is batch-invariant)
        self.chunk_positions = int(chunk_positions)
        self.gpu = model.gpu
        self.cfg = model.cfg
        self.n_delay = n_delay
        self.prompt_ids = model.prompt(n_delay)
        self.ffn_norms = model.ffn_norms(n_delay)
        self.kv_f16 = model.kv_f16
        self.kv_bytes = 2 if self.kv_f16 else 4  # per cached element
        e = self.cfg.encoder
        if e.downsample_factor != ENC_FRAMES_PER_POSITION:
            raise ValueError(f"downsample_factor {e.downsample_factor} unsupported: the 12.5 Hz decoder clock "
                             f"needs {ENC_FRAMES_PER_POSITION} encoder frames per position")
        self.enc = self._encoder_state() if encoder else None
        self.dec = self._decoder_state()
        self._mel_pending = np.zeros((0, e.num_mel_bins), np.float32)
        self._mel_context = np.zeros((CONV0_CONTEXT, e.num_mel_bins), np.float32)
        self.positions_encoded = 0  # audio embeddings produced
        self.next_pos = 0  # next decoder position to run (its output is the token at next_pos + 1)
        self.prefilled = False
        self.total_positions: int | None = None  # known once the input is closed
        self.tokens_read_until = len(self.prompt_ids)  # first decoder position not yet read back
        self._token_reads: list = []  # (first, last, PendingRead): token-ring copies not yet taken
        self.generated: list[int] = []
        self.generated_probs: list[float] = []  # softmax probability of each generated id, aligned with it
        self.done = False
        self.eos = False  # True when decoding stopped on EOS (not on the position limit)
        self.taps: dict | None = None  # set to {} to collect per-chunk stage outputs (parity tests, debugging)
        self.stop_on_eos = True  # benchmarks on random weights turn this off to decode every position
        self._step_plan = None  # the recorded decode step (see _decode_step)
        self._table_submit, self._table_slots = -1, set()  # step_rope rows written since that submit

    # ------------------------------------------------------------------ allocation
    def _encoder_state(self) -> _EncoderState:
        g, e = self.gpu, self.cfg.encoder
        S = ENC_FRAMES_PER_POSITION * self.chunk_positions
        f, fkv = 4, self.kv_bytes
        eq, ekv = e.n_heads * e.head_dim, e.n_kv_heads * e.head_dim
        cap = e.sliding_window + S - 1  # every key a chunk's queries can see survives the chunk's writes
        hist = e.sliding_window - 1  # earlier positions the next chunk's first query sees
        return _EncoderState(
            mel=g.empty(f * (CONV0_CONTEXT + 2 * S) * e.num_mel_bins, "enc.mel"),
            g0=g.empty(f * (1 + 2 * S) * e.dim, "enc.g0"),
            h=g.empty(f * S * e.dim, "enc.h"), xb=g.empty(f * S * e.dim, "enc.xb"),
            qkv=g.empty(f * S * (eq + 2 * ekv), "enc.qkv"),
            att=g.empty(f * S * eq, "enc.att"),
            f1=g.empty(f * S * e.hidden_dim, "enc.f1"), f3=g.empty(f * S * e.hidden_dim, "enc.f3"),
            out=g.empty(f * S * e.dim, "enc.out"),
            a1=g.empty(f * self.chunk_positions * self.cfg.decoder.dim, "adapter.a1"),
            rope=g.empty(f * S * e.head_dim, "enc.rope"),
            k_hist=[g.empty(fkv * max(hist, 1) * ekv, f"enc.k_hist{i}") for i in range(e.n_layers)],
            v_hist=[g.empty(fkv * max(hist, 1) * ekv, f"enc.v_hist{i}") for i in range(e.n_layers)],
            hist=hist,
            k_work=g.empty(fkv * cap * ekv, "enc.k_work"), v_work=g.empty(fkv * cap * ekv, "enc.v_work"),
            cap=cap,
        )

    def _decoder_state(self) -> _DecoderState:
        g, d = self.gpu, self.cfg.decoder
        R = len(self.prompt_ids)
        f, fkv = 4, self.kv_bytes
        dq, dkv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
        acap = self.chunk_positions + R + 1
        max_cap = d.sliding_window + R - 1  # the prefill's R rows are written before they attend
        cap = min(max_cap, max(256, R))  # grows (doubling) up to max_cap as the session lengthens
        tokens = g.empty(4 * TOKEN_RING_WORDS, "dec.tokens")
        g.write(tokens, np.asarray(self.prompt_ids, np.uint32))
        return _DecoderState(
            x=g.empty(f * R * d.dim, "dec.x"), xb=g.empty(f * R * d.dim, "dec.xb"),
            qkv=g.empty(f * R * (dq + 2 * dkv), "dec.qkv"),
            part=ops.decode_attention_scratch(g, d.n_heads, d.head_dim, d.sliding_window),
            att=g.empty(f * R * dq, "dec.att"),
            f1=g.empty(f * R * d.hidden_dim, "dec.f1"), f3=g.empty(f * R * d.hidden_dim, "dec.f3"),
            z=g.empty(f * d.dim, "dec.z"), logits=g.empty(f * d.vocab_size, "dec.logits"),
            rope=g.empty(f * R * d.head_dim, "dec.rope"),
            step_rope=g.empty(f * STEP_TABLE_RING * d.head_dim, "dec.step_rope"),
            audio=g.empty(f * acap * d.dim, "dec.audio"), acap=acap, tokens=tokens,
            k_cache=[g.empty(fkv * cap * dkv, f"dec.k_cache{i}") for i in range(d.n_layers)],
            v_cache=[g.empty(fkv * cap * dkv, f"dec.v_cache{i}") for i in range(d.n_layers)],
            cap=cap, max_cap=max_cap,
        )

    def _grow_decoder_cache(self, positions_needed: int) -> None:
        """Double the decoder KV ring (up to ``max_cap``) before it would wrap early."""
        st = self.dec
        if positions_needed <= st.cap or st.cap >= st.max_cap:
            return
        new_cap = st.cap
        while new_cap < positions_needed and new_cap < st.max_cap:
            new_cap = min(2 * new_cap, st.max_cap)
        self._resize_decoder_cache(new_cap, keep=True)

    def _resize_decoder_cache(self, new_cap: int, *, keep: bool) -> None:
        """Reallocate the decoder KV ring with ``new_cap`` slots; ``keep`` copies the cached positions
        over (no wrap has happened yet, so slot == position), else the old ring is freed first."""
        st = self.dec
        dkv = self.cfg.decoder.n_kv_heads * self.cfg.decoder.head_dim
        old = st.k_cache + st.v_cache
        if not keep:
            self.gpu.release(*old)
        for caches in (st.k_cache, st.v_cache):
            for i, buf in enumerate(caches):
                caches[i] = self.gpu.empty(self.kv_bytes * new_cap * dkv, buf.label)
                if keep:
                    self.gpu.copy(buf, 0, caches[i], 0, self.kv_bytes * st.cap * dkv)
        if keep:
            self.gpu.release(*old)
        st.cap = new_cap
        self._step_plan = None  # it binds the old rings

    def release(self) -> None:
        """Free this session's GPU buffers (idempotent); the session is unusable afterwards.
        The Gpu's bind-group cache keeps buffers alive, so without this every session would leak them.
        Holds the Gpu's lock (Gpu.exclusive): safe from any thread, and from a dropped stream's finalizer."""
        with self.gpu.exclusive():
            if getattr(self, "_released", False):
                return
            self.done = True
            self._step_plan = None
            self._token_reads = []
            fields = [v for st in (self.enc, self.dec) if st is not None for v in vars(st).values()]
            self.gpu.release(*[b for v in fields for b in (v if isinstance(v, list) else [v])
                               if isinstance(b, wgpu.GPUBuffer)])
            self._released = True  # only now: a release interrupted half-way is done again by the next call

    # ------------------------------------------------------------------ input
    def push_mel(self, frames: np.ndarray) -> None:
        if len(frames):
            self._mel_pending = np.concatenate([self._mel_pending, np.asarray(frames, np.float32)])

    def close(self, total_positions: int) -> None:
        """The input ends at ``total_positions`` positions (all their mel frames pushed)."""
        self.total_positions = total_positions
        needed = min(self.dec.max_cap, total_positions)
        if not self.prefilled and needed > self.dec.cap:
            # nothing is cached yet (offline: close() comes first), so size the decoder ring once
            # instead of doubling it later, when the old and the new ring would both be held
            self._resize_decoder_cache(needed, keep=False)

    # ------------------------------------------------------------------ encoder + adapter
    def encode_available(self) -> None:
        """Run the encoder and adapter over every complete position while the audio ring has room."""
        while True:
            whole = len(self._mel_pending) // MEL_FRAMES_PER_POSITION
            room = self.dec.acap - (self.positions_encoded - self.next_pos)
            n = min(whole, self.chunk_positions, room)
            if n <= 0:
                return
            mel = self._mel_pending[: n * MEL_FRAMES_PER_POSITION]
            self._mel_pending = self._mel_pending[n * MEL_FRAMES_PER_POSITION:]
            self._encode_chunk(mel, n)
            self.gpu.flush()  # the GPU starts on this chunk while the host records the next work

    def _encode_chunk(self, mel: np.ndarray, n: int) -> None:
        """``n`` positions of mel ``[8n, 128]`` -> ``n`` audio embeddings in the decoder's ring.

        Every linear here is ``batch_invariant``: a row's result must not depend on how the
        positions were batched (streaming chunks vs offline's 32-position batches), or streaming would
        drift from offline by float rounding and flip near-tie tokens."""
        g, e, st = self.gpu, self.cfg.encoder, self.enc
        w = self.model.weights
        T = MEL_FRAMES_PER_POSITION * n  # mel frames = conv0 outputs
        S = ENC_FRAMES_PER_POSITION * n  # encoder rows
        p0 = self.positions_encoded * ENC_FRAMES_PER_POSITION  # absolute encoder position of row 0
        eq, ekv = e.n_heads * e.head_dim, e.n_kv_heads * e.head_dim

        # conv stem (causal, spec §4.1): rows of the mel buffer are [3 carried frames, T new frames];
        # conv0 output row j is g0[j - 1] (the first one rebuilds the carried g0[-1]).
        g.write(st.mel, np.concatenate([self._mel_context, mel]))
        self._mel_context = np.concatenate([self._mel_context, mel])[-CONV0_CONTEXT:]
        ops.linear(g, Mat(st.mel, T + 1, 3 * e.num_mel_bins, e.num_mel_bins), w.conv0,
                   Mat.of(st.g0, T + 1, e.dim), act=ACT_GELU, batch_invariant=True)
        if self.positions_encoded == 0:
            g.clear(st.g0, 0, 4 * e.dim)  # conv1's causal left pad is zero, not conv0(zeros)
        h = Mat.of(st.h, S, e.dim)
        ops.linear(g, Mat(st.g0, S, 3 * e.dim, 2 * e.dim), w.conv1, h, act=ACT_GELU, batch_invariant=True)
        self._tap("conv_stem", st.h, S, e.dim)

        # transformer (spec §4.2)
        g.write(st.rope, ops.rope_table(np.arange(p0, p0 + S), e.head_dim, e.rope_theta))
        xb, qkv = Mat.of(st.xb, S, e.dim), Mat.of(st.qkv, S, eq + 2 * ekv)
        att, f1, f3 = Mat.of(st.att, S, eq), Mat.of(st.f1, S, e.hidden_dim), Mat.of(st.f3, S, e.hidden_dim)
        row_bytes = self.kv_bytes * ekv
        seen = min(p0, st.hist)  # earlier positions the chunk's queries see, p0 - seen .. p0 - 1
        kept = min(S, st.hist)  # the chunk's positions the next chunk sees

        def attend(i: int) -> None:  # through the shared ring: layer i's history in, the chunk's rows out
            ops.ring_copy(g, st.k_hist[i], st.v_hist[i], st.hist, st.k_work, st.v_work, st.cap, p0 - seen, seen,
                          row_bytes)
            ops.rope_qkv(g, st.rope, qkv, st.k_work, st.v_work, n_heads=e.n_heads, n_kv_heads=e.n_kv_heads,
                         head_dim=e.head_dim, pos0=p0, cap=st.cap, kv_f16=self.kv_f16)
            ops.attention(g, qkv.cols_(0, eq), st.k_work, st.v_work, att, n_heads=e.n_heads,
                          n_kv_heads=e.n_kv_heads, head_dim=e.head_dim, pos0=p0, window=e.sliding_window, cap=st.cap,
                          kv_f16=self.kv_f16)
            ops.ring_copy(g, st.k_work, st.v_work, st.cap, st.k_hist[i], st.v_hist[i], st.hist, p0 + S - kept, kept,
                          row_bytes)

        encoder_layers(g, w, h, xb, qkv, att, f1, f3, attend)
        out = Mat.of(st.out, S, e.dim)
        ops.rms_norm(g, h, w.enc_norm, out, e.norm_eps)
        self._tap("encoder", st.out, S, e.dim)

        # adapter (spec §4.3): 4 consecutive frames -> one row, Linear -> GELU -> Linear, into the ring
        d = self.cfg.decoder
        a1 = Mat.of(st.a1, n, d.dim)
        ops.linear(g, out.reshape_rows(ENC_FRAMES_PER_POSITION), w.adapter0, a1, act=ACT_GELU, batch_invariant=True)
        self._adapter_out(a1)

    def _adapter_out(self, a1: Mat) -> None:
        """The adapter's second linear over ``a1 [n, 3072]`` (its hidden rows of the next n positions)
        into the audio-embedding ring, wrapping at its end; those n positions are then encoded."""
        g, w, d, n = self.gpu, self.model.weights, self.cfg.decoder, a1.rows
        ring = Mat.of(self.dec.audio, self.dec.acap, d.dim)
        first = self.positions_encoded % self.dec.acap
        head = min(n, self.dec.acap - first)
        ops.linear(g, a1.take(0, head), w.adapter2, ring.take(first, head), batch_invariant=True)
        if head < n:
            ops.linear(g, a1.take(head, n - head), w.adapter2, ring.take(0, n - head), batch_invariant=True)
        if self.taps is not None:
            rows = [(self.positions_encoded + r) % self.dec.acap for r in range(n)]
            full = self.gpu.read(self.dec.audio, np.float32, self.dec.acap * d.dim).reshape(self.dec.acap, d.dim)
            self.taps.setdefault("adapter", []).append(full[rows])
        self.positions_encoded += n

    def _tap(self, name: str, buf, rows: int, cols: int) -> None:
        if self.taps is not None:
            self.taps.setdefault(name, []).append(self.gpu.read(buf, np.float32, rows * cols).reshape(rows, cols))

    # ------------------------------------------------------------------ decoder
    def _decoder_rows(self, p0: int, rows: int, *, head: bool) -> None:
        """Decoder forward over positions ``p0 .. p0+rows-1``; with ``head``, the argmax of the
        last row's logits becomes the token at position ``p0 + rows`` (on the GPU)."""
        g, d, st = self.gpu, self.cfg.decoder, self.dec
        w = self.model.weights
        dq, dkv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
        assert p0 % TOKEN_RING + rows <= TOKEN_RING
        self._grow_decoder_cache(p0 + rows)
        x = Mat.of(st.x, rows, d.dim)
        ops.embed(g, st.tokens, p0 % TOKEN_RING, st.audio, p0, st.acap, w.tok_embeddings, x)
        if rows == 1:
            self._write_step_table(p0)
        else:
            g.write(st.rope, ops.rope_table(np.arange(p0, p0 + rows), d.head_dim, d.rope_theta))
        xb, qkv = Mat.of(st.xb, rows, d.dim), Mat.of(st.qkv, rows, dq + 2 * dkv)
        att, f1, f3 = Mat.of(st.att, rows, dq), Mat.of(st.f1, rows, d.hidden_dim), Mat.of(st.f3, rows, d.hidden_dim)
        heads = dict(n_heads=d.n_heads, n_kv_heads=d.n_kv_heads, head_dim=d.head_dim)
        for i, layer in enumerate(w.dec_layers):
            ops.qkv_proj(g, x, layer.wq, layer.wk, layer.wv, qkv, norm=layer.attention_norm, eps=d.norm_eps, scratch=xb)
            if rows == 1:  # decode: one kernel rotates q and k, appends k and v to the rings and attends
                ops.decode_attention(g, st.step_rope, qkv, st.k_cache[i], st.v_cache[i], att, **heads, pos0=p0,
                                     window=d.sliding_window, cap=st.cap, scratch=st.part, kv_f16=self.kv_f16,
                                     table_row=p0 % STEP_TABLE_RING)
            else:
                ops.rope_qkv(g, st.rope, qkv, st.k_cache[i], st.v_cache[i], **heads, pos0=p0, cap=st.cap,
                             kv_f16=self.kv_f16)
                ops.attention(g, qkv.cols_(0, dq), st.k_cache[i], st.v_cache[i], att, **heads, pos0=p0,
                              window=d.sliding_window, cap=st.cap, kv_f16=self.kv_f16)
            ops.linear(g, att, layer.wo, x, accumulate=True)
            # the FFN norm weight carries the delay's ada scale (spec §5.1)
            ops.swiglu_ffn_in(g, x, layer.w1, layer.w3, f1, norm=self.ffn_norms[i], eps=d.norm_eps, scratch=xb, tmp=f3)
            ops.linear(g, f1, layer.w2, x, accumulate=True)
            if rows > 1 and i % LAYERS_PER_SUBMIT == LAYERS_PER_SUBMIT - 1:  # (decode steps: see decode())
                g.flush()
        if head:
            # final norm folded into the tied LM head: logits = RMSNorm(x_last) * g @ E^T
            ops.linear(g, x.take(rows - 1, 1), w.tok_embeddings, Mat.of(st.logits, 1, d.vocab_size),
                       norm=w.norm, eps=d.norm_eps, scratch=Mat.of(st.z, 1, d.dim))
            self.model.argmax(g, st.logits, st.tokens, (p0 + rows) % TOKEN_RING, probs_off=TOKEN_RING)

    def _decode_step(self, p: int) -> None:
        """One decoder step at position ``p``: the token at ``p + 1`` lands in the GPU token ring.

        The first step (at each decoder ring size) runs the graph above while ``Gpu.capture`` records
        it; later steps replay that recording with this position's step values (``_step_values``):
        the same dispatches and Params, minus the per-op Python work (~10 µs a dispatch)."""
        self._grow_decoder_cache(p + 1)
        if not STEP_REPLAY or getattr(self.model.weights.tok_embeddings, "embeddings", "gpu") == "cpu":
            # (CPU embeddings read the step's token back on the host: not a fixed list of dispatches)
            self._decoder_rows(p, 1, head=True)
            return
        if self._step_plan is None:
            with self.gpu.capture() as plan:
                self._decoder_rows(p, 1, head=True)
            self._step_plan = plan
            return
        self._write_step_table(p)
        self.gpu.replay(self._step_plan, self._step_values(p))

    def _step(self, first: bool) -> None:
        """The decode step at ``next_pos``, then the next position; submitted as a run of steps is:
        the first alone (the GPU starts at once), then every STEPS_PER_SUBMIT positions."""
        self._decode_step(self.next_pos)
        self.next_pos += 1
        if first or self.next_pos % STEPS_PER_SUBMIT == 0:
            self.gpu.flush()  # the GPU runs these steps while the host records the next

    def _write_step_table(self, p: int) -> None:
        """Row p % STEP_TABLE_RING of ``step_rope`` := position p's rotation, written ahead of the
        unsubmitted steps (``Gpu.write_ahead``): those use other rows, unless one uses this row, and
        then they are submitted first."""
        g, d = self.gpu, self.cfg.decoder
        slot = p % STEP_TABLE_RING
        if self._table_submit != g.submits:
            self._table_submit, self._table_slots = g.submits, set()
        if slot in self._table_slots:
            g.flush()
            self._table_submit, self._table_slots = g.submits, set()
        self._table_slots.add(slot)
        g.write_ahead(self.dec.step_rope, ops.rope_table(np.arange(p, p + 1), d.head_dim, d.rope_theta),
                      4 * slot * d.head_dim)

    def _step_values(self, p: int) -> dict:
        """What differs between decode steps (the ``step=`` Params fields of the ops in ``_decoder_rows``)."""
        st, d = self.dec, self.cfg.decoder
        return {"token_slot": p % TOKEN_RING, "next_token_slot": (p + 1) % TOKEN_RING, "audio_slot": p % st.acap,
                **ops.decode_attention_values(p, window=d.sliding_window, cap=st.cap, n_heads=d.n_heads,
                                              n_kv_heads=d.n_kv_heads, head_dim=d.head_dim,
                                              table_row=p % STEP_TABLE_RING)}

    def decode(self, *, wait: bool = True) -> list[int]:
        """Run every decoder step whose audio embedding exists; return the newly generated ids.

        ``wait=False`` (more input follows at once, as in ``transcribe``): when the steps run out
        before the input's end, return without waiting for the GPU to finish them; their ids come
        with a later call. The host then records the next chunk while the GPU still runs this one,
        instead of the GPU idling while the host records (60 s offline on an H100: ~0.25 s)."""
        n_before = len(self.generated)
        L = len(self.prompt_ids)
        first = True
        while not self.done:
            self.encode_available()
            if not self.prefilled:
                if self.positions_encoded < L:
                    break
                self._decoder_rows(0, L - 1, head=False)  # prompt positions 0..L-2 fill the KV cache
                self.gpu.flush()
                self.next_pos = L - 1
                self.prefilled = True
            # HF generate stops at max_length = total positions, so the last step runs at total - 2.
            limit = self.positions_encoded
            if self.total_positions is not None:
                limit = min(limit, self.total_positions - 1)
            if self.next_pos >= limit:  # nothing runnable until more audio arrives
                at_end = self.total_positions is not None and self.next_pos >= self.total_positions - 1
                if wait or at_end:
                    self._read_tokens()  # everything up to next_pos (waits for the GPU)
                    self.done = self.done or at_end
                break
            self._step(first)
            first = False
            if self.next_pos - self._tokens_requested_until() >= READBACK_STEPS:
                self._request_tokens()
                if len(self._token_reads) > 1:  # the previous copy ran long ago: no wait
                    self._take_tokens(*self._token_reads.pop(0))
        return self.generated[n_before:]

    def teacher_forced_logits(self, ids: list[int]) -> np.ndarray:
        """Logits ``[len(ids) - L, vocab]`` at positions ``L-1 .. len(ids)-2`` when the decoder is fed
        ``ids`` (prompt first) instead of its own argmax: the parity check against HF's full forward.
        Needs the mel of those positions pushed; use on a fresh session."""
        L = len(self.prompt_ids)
        if list(ids[:L]) != self.prompt_ids:
            raise ValueError("ids must start with this session's prompt")
        vocab = self.cfg.decoder.vocab_size
        out = []
        for p in range(L - 1, len(ids) - 1):
            self.encode_available()
            if self.positions_encoded <= p:
                raise ValueError(f"no audio pushed for position {p}")
            if not self.prefilled:
                self._decoder_rows(0, L - 1, head=False)
                self.prefilled = True
            self.gpu.write(self.dec.tokens, np.asarray([ids[p]], np.uint32), 4 * (p % TOKEN_RING))
            self._decode_step(p)
            out.append(self.gpu.read(self.dec.logits, np.float32, vocab))
            self.next_pos = p + 1
        return np.stack(out) if out else np.zeros((0, vocab), np.float32)

    def _tokens_requested_until(self) -> int:
        return self._token_reads[-1][1] + 1 if self._token_reads else self.tokens_read_until

    def _request_tokens(self) -> None:
        """Record a copy of the token ring for positions not yet requested, up to ``next_pos`` (the
        token at position p is the output of step p-1), taken later by ``_take_tokens``."""
        first = self._tokens_requested_until()
        if self.next_pos >= first:
            read = self.gpu.read_later(self.dec.tokens, np.uint32, TOKEN_RING_WORDS)  # ids and probabilities
            self._token_reads.append((first, self.next_pos, read))

    def _read_tokens(self) -> None:
        """Take the tokens of every position up to ``next_pos`` (waiting for the GPU); stop at EOS."""
        if not self.done:
            self._request_tokens()
        while self._token_reads:
            self._take_tokens(*self._token_reads.pop(0))

    def _take_tokens(self, first: int, last: int, read) -> None:
        ring = read.result()
        if self.done:
            return
        probs = ring[TOKEN_RING:].view(np.float32)  # the copy holds both halves (TOKEN_RING_WORDS)
        slots = [p % TOKEN_RING for p in range(first, last + 1)]
        self.tokens_read_until = last + 1
        eos = self.model.tokenizer.eos_id
        for k in slots:
            t = int(ring[k])
            if t == eos and self.stop_on_eos:
                self.done = True
                self.eos = True
                break
            # the probability first: a reader on another thread (an engine stream) that copies
            # `generated` and then `generated_probs` finds a probability for every id it copied
            self.generated_probs.append(float(probs[k]))
            self.generated.append(t)

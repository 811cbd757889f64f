"""The encoder and adapter over the new positions of many streams in one pass.

``Session._encode_chunk`` laid out for many sessions: every stream's newly complete positions (at
most ``positions`` each) become consecutive rows of one batch. The conv stem runs per stream (its
input carries the stream's last mel frames); the transformer layers run once over all rows, with
the matmul kernels that give a row the same bits in any batch (``batch_invariant``); the keys and
values of each stream live in a ring of its own inside one pool per layer (slot ``base + p % cap``),
written by ``rope_qkv_slots`` and read by ``attention_blocks`` (blocks of one stream's rows), which
compute each row exactly as ``rope_qkv`` / ``attention`` do for the stream alone. The adapter writes
each stream's audio embeddings into its session's ring. So a stream's embeddings are those of
``Model.transcribe()`` whatever the batch.

Memory: the pools hold ``window + 4 * positions - 1`` key and value rows per stream and layer for
``max_streams`` streams, made once (32 layers x 2 x 781 rows x 2048 x 2 bytes = 205 MB a stream for
the real model with f16 caches and 8 positions a tick).
"""

from __future__ import annotations

import numpy as np

from .. import ops
from ..model import CONV0_CONTEXT, ENC_FRAMES_PER_POSITION, MEL_FRAMES_PER_POSITION, encoder_layers
from ..ops import ACT_GELU, Mat
from .batch import allocate

POSITIONS_PER_TICK = 8  # encoder positions a stream gets per tick at most (the batch's rows: 32 a stream)


class BatchEncoder:
    """Buffers for ``max_streams`` streams' encoder passes, ``positions`` positions each at most."""

    def __init__(self, model, max_streams: int, positions: int = POSITIONS_PER_TICK):
        g, e, d = model.gpu, model.cfg.encoder, model.cfg.decoder
        self.model, self.gpu = model, g
        self.max_streams, self.positions = max_streams, positions
        S = ENC_FRAMES_PER_POSITION * positions  # rows of one stream
        T = MEL_FRAMES_PER_POSITION * positions
        R = max_streams * S
        self.cap = e.sliding_window + S - 1  # a stream's ring: every key its rows can see survives their writes
        eq, ekv = e.n_heads * e.head_dim, e.n_kv_heads * e.head_dim
        kv_bytes = 2 if model.kv_f16 else 4
        f = 4
        bufs = dict(
            mel=f * max_streams * (CONV0_CONTEXT + T) * e.num_mel_bins, g0=f * max_streams * (1 + T) * e.dim,
            h=f * R * e.dim, xb=f * R * e.dim, qkv=f * R * (eq + 2 * ekv), att=f * R * eq,
            f1=f * R * e.hidden_dim, f3=f * R * e.hidden_dim, out=f * R * e.dim,
            a1=f * max_streams * positions * d.dim, rope=f * R * e.head_dim, slots=4 * R,
            blocks=16 * max_streams * -(-S // ops.ATTENTION_ROWS))
        ring = kv_bytes * max_streams * self.cap * ekv
        for i in range(e.n_layers):
            bufs[f"k{i}"] = bufs[f"v{i}"] = ring
        made = allocate(g, bufs, "engine.enc")
        for name, buf in made.items():
            setattr(self, name, buf)
        self.k_pool = [made[f"k{i}"] for i in range(e.n_layers)]
        self.v_pool = [made[f"v{i}"] for i in range(e.n_layers)]
        self._buffers = list(made.values())
        self.nbytes = sum(b.size for b in self._buffers)
        self.bytes_per_stream = 2 * e.n_layers * kv_bytes * self.cap * ekv

    def release(self) -> None:
        self.gpu.release(*self._buffers)

    def encode(self, items: list) -> None:
        """``items``: (pool index, session, n) with ``n`` <= ``positions`` complete positions pending in
        the session; their audio embeddings land in the sessions' rings."""
        g, w = self.gpu, self.model.weights
        e, d = self.model.cfg.encoder, self.model.cfg.decoder
        eq, ekv = e.n_heads * e.head_dim, e.n_kv_heads * e.head_dim
        # host side: each stream's mel (carried frames first), rows, positions, ring slots, blocks
        mels, layout, tables, slots, blocks = [], [], [], [], []
        mel_row = g0_row = row = 0
        for index, sess, n in items:
            T, S = MEL_FRAMES_PER_POSITION * n, ENC_FRAMES_PER_POSITION * n
            mel = sess._mel_pending[:T]
            sess._mel_pending = sess._mel_pending[T:]
            mels.append(np.concatenate([sess._mel_context, mel]))
            sess._mel_context = mels[-1][-CONV0_CONTEXT:]
            p0 = sess.positions_encoded * ENC_FRAMES_PER_POSITION
            base = index * self.cap
            layout.append((sess, n, mel_row, g0_row, row))
            tables.append(ops.rope_table(np.arange(p0, p0 + S), e.head_dim, e.rope_theta))
            slots.append(base + (p0 + np.arange(S)) % self.cap)
            for r in range(0, S, ops.ATTENTION_ROWS):
                blocks.append((row + r, min(ops.ATTENTION_ROWS, S - r), p0 + r, base))
            mel_row += CONV0_CONTEXT + T
            g0_row += 1 + T
            row += S
        R = row
        g.write(self.mel, np.concatenate(mels))
        g.write(self.rope, np.concatenate(tables))
        g.write(self.slots, np.concatenate(slots).astype(np.uint32))
        g.write(self.blocks, np.asarray(blocks, np.uint32))

        # conv stem per stream (spec §4.1): conv0 output row j is g0[j - 1], the first one rebuilding
        # the carried g0[-1] (zero at the stream's start: conv1's causal left pad)
        h = Mat.of(self.h, R, e.dim)
        for sess, n, m0, g0, r0 in layout:
            T, S = MEL_FRAMES_PER_POSITION * n, ENC_FRAMES_PER_POSITION * n
            ops.linear(g, Mat(self.mel, T + 1, 3 * e.num_mel_bins, e.num_mel_bins, m0 * e.num_mel_bins), w.conv0,
                       Mat(self.g0, T + 1, e.dim, e.dim, g0 * e.dim), act=ACT_GELU, batch_invariant=True)
            if sess.positions_encoded == 0:
                g.clear(self.g0, 4 * g0 * e.dim, 4 * e.dim)
            ops.linear(g, Mat(self.g0, S, 3 * e.dim, 2 * e.dim, g0 * e.dim), w.conv1, h.take(r0, S), act=ACT_GELU,
                       batch_invariant=True)

        # transformer (spec §4.2), every row of every stream at once
        xb, qkv = Mat.of(self.xb, R, e.dim), Mat.of(self.qkv, R, eq + 2 * ekv)
        att, f1, f3 = Mat.of(self.att, R, eq), Mat.of(self.f1, R, e.hidden_dim), Mat.of(self.f3, R, e.hidden_dim)
        heads = dict(n_heads=e.n_heads, n_kv_heads=e.n_kv_heads, head_dim=e.head_dim)
        kv_f16 = self.model.kv_f16

        def attend(i: int) -> None:  # each row's key and value into its stream's ring of the pool
            ops.rope_qkv_slots(g, self.rope, qkv, self.k_pool[i], self.v_pool[i], self.slots, **heads, kv_f16=kv_f16)
            ops.attention_blocks(g, qkv.cols_(0, eq), self.k_pool[i], self.v_pool[i], att, self.blocks, len(blocks),
                                 **heads, window=e.sliding_window, cap=self.cap, kv_f16=kv_f16)

        encoder_layers(g, w, h, xb, qkv, att, f1, f3, attend)
        out = Mat.of(self.out, R, e.dim)
        ops.rms_norm(g, h, w.enc_norm, out, e.norm_eps)

        # adapter (spec §4.3): 4 consecutive frames -> one row, Linear -> GELU -> Linear, into each ring
        a1 = Mat.of(self.a1, R // ENC_FRAMES_PER_POSITION, d.dim)
        ops.linear(g, out.reshape_rows(ENC_FRAMES_PER_POSITION), w.adapter0, a1, act=ACT_GELU, batch_invariant=True)
        for sess, n, _, _, r0 in layout:
            sess._adapter_out(a1.take(r0 // ENC_FRAMES_PER_POSITION, n))
        g.flush()

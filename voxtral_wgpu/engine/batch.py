"""One decoder step for many sessions at once: the rows of every stream through the same weights.

The step is ``Session._decoder_rows(p, 1)`` of each session, laid out as one batch of rows: the
linear layers (q/k/v, wo, the SwiGLU FFN, w2, the LM head) run once over all rows with the decode
kernels, which give each row the bits it gets alone (``ops.linear(..., decode=True)``: one pipeline
for every row count, the same per-row summation order); what belongs to one stream (its token and
audio rings, its rotation, its KV caches, its argmax into its token ring) runs per row on that
stream's buffers. So a stream's tokens are those of ``Model.transcribe()`` whatever its companions.
Rows are ordered by delay: the FFN norm carries the delay's ada scale (spec §5.1), one dispatch per
delay present.

As ``Session._decode_step`` does for one stream, the first step of a batch records its dispatches
(``Gpu.capture``) and later steps of the same sessions replay them with each row's step values
(positions, ring slots; named ``value#row``), which saves the Python op layer (~10 µs a dispatch):
a step of N rows is about 130 + 55 N dispatches.
"""

from __future__ import annotations

from .. import ops
from ..model import STEP_REPLAY, STEP_TABLE_RING, TOKEN_RING
from ..ops import Mat


def allocate(gpu, sizes: dict, prefix: str) -> dict:
    """GPU buffers ``{name: bytes}`` labelled ``prefix.name``; all or none (a failure frees those made)."""
    made = {}
    try:
        for name, nbytes in sizes.items():
            made[name] = gpu.empty(nbytes, f"{prefix}.{name}")
    except BaseException:
        gpu.release(*made.values())
        raise
    return made


class DecodeBatch:
    """Activation buffers for up to ``rows`` decoder rows, and the batched step over sessions."""

    def __init__(self, model, rows: int):
        g, d = model.gpu, model.cfg.decoder
        self.model, self.gpu, self.rows = model, g, int(rows)
        R = self.rows
        dq, dkv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
        self._buffers = allocate(g, dict(
            x=4 * R * d.dim, xb=4 * R * d.dim, qkv=4 * R * (dq + 2 * dkv), att=4 * R * dq, f1=4 * R * d.hidden_dim,
            f3=4 * R * d.hidden_dim, z=4 * R * d.dim, logits=4 * R * d.vocab_size), "batch")
        for name, buf in self._buffers.items():
            setattr(self, name, buf)
        self.nbytes = sum(b.size for b in self._buffers.values())
        self._plan = self._plan_key = None

    def release(self) -> None:
        self.forget()
        self.gpu.release(*self._buffers.values())

    def forget(self) -> None:
        """Drop the recorded step (call before a session's buffers are released: it binds them)."""
        self._plan = self._plan_key = None

    def step(self, sessions: list, advance=None) -> None:
        """Decode position ``s.next_pos`` of every session (at most ``rows``; all prefilled); each token
        lands in its session's GPU token ring, read back later. Only the sessions in ``advance`` (default
        all) move on to their next position: the others' rows are placeholders that keep the batch (and
        its recorded step) the same from step to step. A placeholder row writes only what the real step
        at that position writes again before anything reads it: the position's key and value, the
        token after it, its rotation row; it reads an audio-ring row that may be stale."""
        assert 0 < len(sessions) <= self.rows
        g = self.gpu
        sessions = sorted(sessions, key=lambda s: s.n_delay)
        for s in sessions:
            s._grow_decoder_cache(s.next_pos + 1)
            s._write_step_table(s.next_pos)
        key = tuple((id(s), s.dec.cap) for s in sessions)
        replayable = STEP_REPLAY and getattr(self.model.weights.tok_embeddings, "embeddings", "gpu") != "cpu"
        if replayable and key == self._plan_key:
            values = {}
            for i, s in enumerate(sessions):
                values.update((f"{name}#{i}", v) for name, v in s._step_values(s.next_pos).items())
            g.replay(self._plan, values)
        elif replayable:
            self.forget()
            with g.capture() as plan:
                self._record(sessions)
            self._plan, self._plan_key = plan, key
        else:  # CPU embeddings read each step's token back: not a fixed list of dispatches
            self._record(sessions)
        for s in sessions:
            if advance is None or s in advance:
                s.next_pos += 1

    def _record(self, sessions: list) -> None:
        """The step's graph; per-row dispatches name their step values ``value#row``."""
        g, d, w = self.gpu, self.model.cfg.decoder, self.model.weights
        n = len(sessions)
        dq, dkv = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
        x = Mat.of(self.x, n, d.dim)
        xb, qkv = Mat.of(self.xb, n, d.dim), Mat.of(self.qkv, n, dq + 2 * dkv)
        att = Mat.of(self.att, n, dq)
        f1, f3 = Mat.of(self.f1, n, d.hidden_dim), Mat.of(self.f3, n, d.hidden_dim)
        heads = dict(n_heads=d.n_heads, n_kv_heads=d.n_kv_heads, head_dim=d.head_dim)
        for i, s in enumerate(sessions):
            p, st = s.next_pos, s.dec
            g.step_suffix = f"#{i}"
            ops.embed(g, st.tokens, p % TOKEN_RING, st.audio, p, st.acap, w.tok_embeddings, x.take(i, 1))
        g.step_suffix = ""
        # rows of one delay are consecutive: (first row, rows, FFN norm weights of that delay)
        groups = []
        for i, s in enumerate(sessions):
            if groups and groups[-1][2] is s.ffn_norms:
                groups[-1][1] += 1
            else:
                groups.append([i, 1, s.ffn_norms])
        for li, layer in enumerate(w.dec_layers):
            ops.qkv_proj(g, x, layer.wq, layer.wk, layer.wv, qkv, norm=layer.attention_norm, eps=d.norm_eps,
                         scratch=xb, decode=True)
            for i, s in enumerate(sessions):
                p, st = s.next_pos, s.dec
                g.step_suffix = f"#{i}"
                ops.decode_attention(g, st.step_rope, qkv.take(i, 1), st.k_cache[li], st.v_cache[li], att.take(i, 1),
                                     **heads, pos0=p, window=d.sliding_window, cap=st.cap, scratch=st.part,
                                     kv_f16=s.kv_f16, table_row=p % STEP_TABLE_RING)
            g.step_suffix = ""
            ops.linear(g, att, layer.wo, x, accumulate=True, decode=True)
            for r0, rows, norms in groups:
                ops.swiglu_ffn_in(g, x.take(r0, rows), layer.w1, layer.w3, f1.take(r0, rows), norm=norms[li],
                                  eps=d.norm_eps, scratch=xb.take(r0, rows), tmp=f3.take(r0, rows), decode=True)
            ops.linear(g, f1, layer.w2, x, accumulate=True, decode=True)
        # final norm folded into the tied LM head, then each row's argmax into its stream's ring
        ops.linear(g, x, w.tok_embeddings, Mat.of(self.logits, n, d.vocab_size), norm=w.norm, eps=d.norm_eps,
                   scratch=Mat.of(self.z, n, d.dim), decode=True)
        for i, s in enumerate(sessions):
            g.step_suffix = f"#{i}"
            self.model.argmax(g, self.logits, s.dec.tokens, (s.next_pos + 1) % TOKEN_RING,
                              logits_off=i * d.vocab_size, probs_off=TOKEN_RING)
        g.step_suffix = ""

"""float64 NumPy references for the WGSL ops (tests/test_ops.py), written from the shader header
formulas and the model spec, independent of voxtral_wgpu.

Nothing here touches the GPU. Angles for RoPE are formed in extended precision (np.longdouble,
80-bit on x86-64) and reduced modulo a 2*pi that is correct to that precision, so the reference
is better than the float64 table it is compared against.
"""

from __future__ import annotations

import math

import numpy as np

TWO_PI_LD = np.longdouble("6.28318530717958647692528676655900576839")
_erf = np.vectorize(math.erf, otypes=[np.float64])


# ------------------------------------------------------------------------------------------ BF16
def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round f32 to the nearest BF16 (ties to even) and return the uint16 words (no NaN inputs)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_to_f64(words: np.ndarray) -> np.ndarray:
    return (np.asarray(words, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


# ------------------------------------------------------------------------------------ activations
def gelu(v: np.ndarray) -> np.ndarray:
    """Exact GELU (erf form, torch.nn.functional.gelu default)."""
    v = np.asarray(v, dtype=np.float64)
    return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))


def silu(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(over="ignore"):
        return v / (1.0 + np.exp(-v))


ACTS = {0: lambda v: v, 1: gelu, 2: silu}


# ------------------------------------------------------------------------------------------ ops
def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, act: int = 0,
           y0: np.ndarray | None = None) -> np.ndarray:
    """``y0 + act(x @ w.T + b)`` in float64; x [M, K], w [N, K]."""
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    if b is not None:
        z = z + np.asarray(b, np.float64)[None, :]
    z = ACTS[act](z)
    if y0 is not None:
        z = z + np.asarray(y0, np.float64)
    return z


def causal_conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad_left: int) -> np.ndarray:
    """torch-style conv1d over time of a time-major input with zero left padding only.

    x [T, C_in], w [C_out, C_in, k], b [C_out] -> [T_out, C_out],
    T_out = floor((T + pad_left - k) / stride) + 1."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    k = w.shape[2]
    xp = np.concatenate([np.zeros((pad_left, x.shape[1])), x])
    t_out = (xp.shape[0] - k) // stride + 1
    out = np.tile(np.asarray(b, np.float64), (t_out, 1))
    for t in range(t_out):
        for j in range(k):
            out[t] += w[:, :, j] @ xp[t * stride + j]
    return out


def rms_norm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * inv * np.asarray(g, np.float64)


def rope_angles(positions, head_dim: int, theta: float) -> np.ndarray:
    """``pos * theta^(-2i/d) mod 2*pi`` in extended precision, [len(positions), d/2] (longdouble)."""
    pos = np.array([np.longdouble(int(p)) for p in np.ravel(positions)], dtype=np.longdouble)
    expo = np.arange(0, head_dim, 2).astype(np.longdouble) / np.longdouble(head_dim)
    inv_freq = np.longdouble(1) / np.power(np.longdouble(theta), expo)
    return np.mod(pos[:, None] * inv_freq[None, :], TWO_PI_LD)


def rope_table(positions, head_dim: int, theta: float) -> np.ndarray:
    """(cos, sin) [len(positions), d/2, 2] float64 from the extended-precision angles."""
    a = rope_angles(positions, head_dim, theta)
    return np.stack([np.cos(a), np.sin(a)], axis=-1).astype(np.float64)


def rope(v: np.ndarray, positions, n_heads: int, head_dim: int, theta: float) -> np.ndarray:
    """Interleaved RoPE: pairs (2i, 2i+1) of every head rotated by pos * theta^(-2i/d).
    v [rows, n_heads*head_dim] -> same shape (float64)."""
    rows = v.shape[0]
    t = rope_table(positions, head_dim, theta)  # [rows, d/2, 2]
    c, s = t[..., 0][:, None, :], t[..., 1][:, None, :]
    vh = np.asarray(v, np.float64).reshape(rows, n_heads, head_dim // 2, 2)
    a, b = vh[..., 0], vh[..., 1]
    out = np.stack([a * c - b * s, a * s + b * c], axis=-1)
    return out.reshape(rows, n_heads * head_dim)


def attention(q: np.ndarray, keys: dict, values: dict, positions, n_heads: int, n_kv_heads: int,
              head_dim: int, window: int) -> np.ndarray:
    """Causal sliding-window GQA attention in float64.

    q [rows, n_heads*head_dim]; keys/values map absolute position j -> [n_kv_heads*head_dim];
    row r (position p) attends to every j with p - window < j <= p, j >= 0; query head h uses
    kv head h // (n_heads // n_kv_heads); scale head_dim^-0.5."""
    group = n_heads // n_kv_heads
    out = np.zeros((q.shape[0], n_heads * head_dim))
    for r, p in enumerate(positions):
        js = range(max(0, p - window + 1), p + 1)
        K = np.stack([keys[j] for j in js]).astype(np.float64).reshape(len(js), n_kv_heads, head_dim)
        V = np.stack([values[j] for j in js]).astype(np.float64).reshape(len(js), n_kv_heads, head_dim)
        K = np.repeat(K, group, axis=1)  # [n, n_heads, hd]
        V = np.repeat(V, group, axis=1)
        qh = q[r].astype(np.float64).reshape(n_heads, head_dim)
        s = np.einsum("hd,nhd->hn", qh, K) / math.sqrt(head_dim)
        s -= s.max(axis=1, keepdims=True)
        pr = np.exp(s)
        pr /= pr.sum(axis=1, keepdims=True)
        out[r] = np.einsum("hn,nhd->hd", pr, V).reshape(-1)
    return out


def swiglu(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return silu(a) * np.asarray(b, np.float64)


def embed(tokens, audio: np.ndarray, apos0: int, table: np.ndarray) -> np.ndarray:
    """``audio[(apos0 + r) % acap] + E[tokens[r]]``; token ids outside the table add nothing."""
    acap = audio.shape[0]
    out = np.zeros((len(tokens), audio.shape[1]))
    for r, t in enumerate(tokens):
        out[r] = audio[(apos0 + r) % acap].astype(np.float64)
        if 0 <= t < table.shape[0]:
            out[r] += table[t]
    return out


def argmax(x: np.ndarray) -> int:
    """torch.argmax semantics for non-NaN input: the first index of the maximum."""
    return int(np.argmax(np.asarray(x)))

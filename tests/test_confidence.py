"""Per-token confidence: the softmax probability of each generated id, computed by the argmax
kernel beside the index and read back with the token ring.

* the kernel against NumPy (float64) on awkward sizes, ties, infinities and FLT_MAX;
* free-running transcription against HF's logits on tiny models: softmax of HF's logits at our ids;
* Word.probability / Segment.avg_logprob / JSON output derived from those probabilities;
* an engine stream's probabilities equal transcribe()'s.
"""

from __future__ import annotations

import numpy as np
import pytest

from voxtral_wgpu import ops

SCRATCH = 4 << 20  # bytes: room for 300000 logits
LOG_LEN = 64  # token slots; the probability ring follows them (probs_off = LOG_LEN)
FMAX = np.finfo(np.float32).max


@pytest.fixture(scope="module")
def bufs(gpu):
    return gpu.empty(SCRATCH, "conf.logits"), gpu.empty(8 * LOG_LEN, "conf.tokens")


_ARGMAX: dict = {}


def run(gpu, bufs, x: np.ndarray, out_index: int) -> tuple[int, float]:
    """(id, probability) the kernel writes for logits ``x``; checks it writes nothing else."""
    logits, tokens = bufs
    n = x.size
    if n not in _ARGMAX:
        _ARGMAX[n] = ops.Argmax(gpu, n)
    log0 = np.arange(1000, 1000 + 2 * LOG_LEN, dtype=np.uint32)
    gpu.write(logits, x.astype(np.float32))
    gpu.write(tokens, log0)
    _ARGMAX[n](gpu, logits, tokens, out_index, probs_off=LOG_LEN)
    got = gpu.read(tokens, np.uint32, 2 * LOG_LEN)
    others = np.ones(2 * LOG_LEN, bool)
    others[[out_index, LOG_LEN + out_index]] = False
    assert np.array_equal(got[others], log0[others]), "the kernel wrote outside its two slots"
    return int(got[out_index]), float(got[LOG_LEN:].view(np.float32)[out_index])


def ref_prob(x: np.ndarray) -> tuple[int, float]:
    """torch.argmax's index and softmax(x)[index] in float64, with the kernel's documented
    convention for non-finite maxima: entries equal to the maximum weigh 1 each (all -inf: 1/n;
    k entries of +inf: 1/k)."""
    k = int(np.argmax(x))
    x64 = x.astype(np.float64)
    m = x64[k]
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(x64 == m, 1.0, np.exp(x64 - m))
    return k, float(1.0 / terms.sum())


@pytest.mark.parametrize("n", [1, 2, 255, 1023, 1024, 1025, 4097, 131072, 300000])
def test_probability_random_sizes(gpu, bufs, n):
    """Logit scales from flat (probabilities near 1/n, the sum over every block matters) to peaked
    (near 1); sizes around the 1024-block and 256-part boundaries."""
    rng = np.random.default_rng(n)
    for trial, scale in enumerate([0.1, 1.0, 10.0, 40.0]):
        x = (rng.standard_normal(n) * scale).astype(np.float32)
        i, p = run(gpu, bufs, x, out_index=trial * 13 % LOG_LEN)
        k, want = ref_prob(x)
        assert i == k, (n, trial)
        assert p == pytest.approx(want, rel=2e-5), (n, trial)


def test_probability_ties_and_extremes(gpu, bufs):
    n = 5000
    rng = np.random.default_rng(0)
    cases = []
    x = np.zeros(n, np.float32); x[[3000, 1500, 4999]] = 7.0; cases.append(x)  # ties across blocks
    x = np.zeros(n, np.float32); x[[700, 300, 900]] = 7.0; cases.append(x)  # ties inside a block
    x = np.full(n, -np.inf, np.float32); x[4321] = -1e30; cases.append(x)  # one finite: probability 1
    x = np.full(n, -np.inf, np.float32); x[17] = x[18] = np.inf; cases.append(x)  # two +inf: 1/2 each
    x = rng.standard_normal(n).astype(np.float32); x[2222] = x[3333] = FMAX; cases.append(x)  # x - max overflows
    x = rng.standard_normal(n).astype(np.float32); x[[5, 1030, 4000]] = -np.inf; cases.append(x)  # -inf weigh 0
    x = rng.standard_normal(n).astype(np.float32); x[4100] = np.inf; cases.append(x)  # +inf takes all
    x = np.full(n, -FMAX, np.float32); x[::7] = FMAX; cases.append(x)  # huge both ways
    cases.append(np.full(n, 3.0, np.float32))  # constant: 1/n
    cases.append(np.full(n, -np.inf, np.float32))  # all -inf: 1/n by convention
    cases.append(np.full(2048, -FMAX, np.float32))  # all at the kernel's starting value
    x = np.full(2048, -np.inf, np.float32); x[1500] = -FMAX; cases.append(x)  # a whole block of -inf first
    cases.append(np.full(1, -np.inf, np.float32))
    for c, x in enumerate(cases):
        i, p = run(gpu, bufs, x, out_index=c)
        k, want = ref_prob(x)
        assert i == k, f"case {c}: index {i}, want {k}"
        assert p == pytest.approx(want, rel=2e-5), f"case {c}: probability {p}, want {want}"


def test_nan_logit_gives_nan_probability(gpu, bufs):
    x = np.random.default_rng(1).standard_normal(3000).astype(np.float32)
    x[1234] = np.nan
    assert np.isnan(run(gpu, bufs, x, out_index=3)[1])


def test_without_probs_off_only_the_token_is_written(gpu, bufs):
    """Callers that want no probability (probs_off=None) get today's kernel output exactly."""
    logits, tokens = bufs
    x = np.random.default_rng(2).standard_normal(3000).astype(np.float32)
    am = ops.Argmax(gpu, x.size)
    log0 = np.arange(7, 7 + 2 * LOG_LEN, dtype=np.uint32)
    gpu.write(logits, x)
    gpu.write(tokens, log0)
    am(gpu, logits, tokens, 9)
    want = log0.copy()
    want[9] = np.argmax(x)
    assert np.array_equal(gpu.read(tokens, np.uint32, 2 * LOG_LEN), want)

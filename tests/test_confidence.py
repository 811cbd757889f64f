"""Per-token confidence: the softmax probability of each generated id, computed by the argmax
kernel beside the index and read back with the token ring.

* the kernel against NumPy (float64) on awkward sizes, ties, infinities and FLT_MAX;
* free-running transcription against HF's logits on tiny models: softmax of HF's logits at our ids;
* Word.probability / Segment.avg_logprob / JSON output derived from those probabilities;
* an engine stream's probabilities equal transcribe()'s.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_reference import TINY_FULL, TINY_SW, speechlike_audio
from test_model import TINY_ODD
from test_stream import CLIPS, P, W, ids_of, tok, write_fast_model  # noqa: F401  (tok: a fixture)

import voxtral_wgpu
from voxtral_wgpu import ops
from voxtral_wgpu.stream import timed_text
from voxtral_wgpu.subtitles import render

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


# ------------------------------------------------------------------------------ against HF
def _softmax_at(logits: np.ndarray, ids) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return np.exp(z[np.arange(len(ids)), ids]) / np.exp(z).sum(axis=1)


@pytest.mark.parametrize("spec,delay", [(TINY_SW, 480), (TINY_ODD, 160), (TINY_FULL, 1040)],
                         ids=["sw-480", "odd-160", "full-1040"])
def test_probabilities_match_hf_logits(tiny_model, spec, delay):
    """Each generated id's probability equals softmax(HF's logits)[id] under teacher forcing with our
    ids (so a near-tie that flips an id still compares like with like): log-probabilities within
    2e-4 (the logits agree to ~1e-4 of their range, test_model.py; on lavapipe both agree to 3e-6).
    Random tiny models spread their mass thinly (p ~ 0.01), so these probabilities need the whole
    vocabulary's sum to be right, not just the winner's logit."""
    model, ref = tiny_model(spec, delay)
    audio = speechlike_audio(2.7, seed=5)
    tr = model.transcribe(audio, transcription_delay_ms=delay)
    ids = tr.token_ids
    assert len(tr.token_probs) == len(ids) > 10
    prompt = ref.prompt_ids()
    mel = ref.mel(ref.pad(audio))
    hf = ref.logits(prompt + ids, mel)[len(prompt) - 1: len(prompt) - 1 + len(ids)]
    want = _softmax_at(hf, ids)
    got = np.asarray(tr.token_probs, np.float64)
    assert np.abs(np.log(got) - np.log(want)).max() < 2e-4  # lavapipe: 3e-6
    assert want.max() > 1.5 * want.min()  # the probabilities differ from step to step: the check has teeth


# ------------------------------------------------------------------------------ words, segments, JSON
def test_word_probability_and_segment_avg_logprob(tok):
    """A word's probability is the mean of its text tokens' probabilities (not its marker's, nor the
    pads'); a segment's avg_logprob the mean log-probability of its words' text tokens."""
    ids = [P, W] + ids_of("Hi") + [P] + ids_of(" you.") + [P] * 30 + ids_of(" Ok") + [P, P]
    probs = [0.5 + 0.01 * i for i in range(len(ids))]
    words, segs = timed_text(tok, ids, token_probs=probs)
    hi, you, ok = [2, 3], list(range(5, 10)), list(range(40, 43))
    assert [w.text for w in words] == ["Hi", "you.", "Ok"]
    for w, idx in zip(words, (hi, you, ok)):
        assert w.probability == pytest.approx(np.mean([probs[i] for i in idx]))
    assert [s.text for s in segs] == ["Hi you.", "Ok"]
    assert segs[0].avg_logprob == pytest.approx(np.mean(np.log([probs[i] for i in hi + you])))
    assert segs[1].avg_logprob == pytest.approx(np.mean(np.log([probs[i] for i in ok])))
    # without probabilities (a hand-made transcript): unknown, not invented
    words, segs = timed_text(tok, ids)
    assert all(w.probability is None for w in words) and all(s.avg_logprob is None for s in segs)


@pytest.fixture(scope="module")
def fast_model(gpu, tmp_path_factory):
    return voxtral_wgpu.load(write_fast_model(tmp_path_factory.mktemp("conf_model")), gpu=gpu, progress=False)


def test_transcription_and_json_output(fast_model, tmp_path, monkeypatch):
    """transcribe() fills token_probs, Word.probability and Segment.avg_logprob; the CLI's JSON
    output carries them (rounded to 6 decimals)."""
    import soundfile as sf

    from voxtral_wgpu import cli

    audio = CLIPS["speech1.3"]
    tr = fast_model.transcribe(audio)
    assert len(tr.token_probs) == len(tr.token_ids) and tr.words and tr.segments
    assert all(0.0 < p <= 1.0 for p in tr.token_probs)
    assert all(w.probability is not None for w in tr.words)
    assert all(s.avg_logprob is not None and s.avg_logprob <= 0.0 for s in tr.segments)
    d = json.loads(render(tr, "json"))
    assert d["token_probs"] == pytest.approx(tr.token_probs, abs=1e-6)
    assert [s["avg_logprob"] for s in d["segments"]] == pytest.approx([s.avg_logprob for s in tr.segments], abs=1e-6)
    assert [w["probability"] for s in d["segments"] for w in s["words"]] == pytest.approx(
        [w.probability for w in tr.words], abs=1e-6)

    wav = tmp_path / "a.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    monkeypatch.setattr(cli, "load_model", lambda args: fast_model)  # the loaded one, not a second load
    assert cli.main(["transcribe", str(wav), "-f", "json", "-o", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "a.json").read_text())
    assert doc["token_ids"] == tr.token_ids
    assert doc["token_probs"] == pytest.approx(tr.token_probs, abs=1e-6)
    assert all("probability" in w for s in doc["segments"] for w in s["words"])


def test_stream_and_engine_stream_probabilities_equal_transcribe(fast_model):
    """A Stream and an engine stream (batched decode, one readback per tick) carry the same
    probabilities as transcribe(), bit for bit, like their ids."""
    from voxtral_wgpu.engine import Engine

    audio = CLIPS["speech1.3"]
    tr = fast_model.transcribe(audio)
    s = fast_model.create_stream()
    for i in range(0, len(audio), 3000):
        s.feed(audio[i:i + 3000])
    s.finish()
    assert s.result().token_probs == tr.token_probs
    with Engine(fast_model, max_streams=4) as engine:
        streams = [engine.create_stream() for _ in range(2)]
        for i in range(0, len(audio), 2500):
            for st in streams:
                st.feed(audio[i:i + 2500])
        results = []
        for st in streams:
            st.finish()
            results.append(st.result())
    for r in results:
        assert r.token_ids == tr.token_ids
        assert r.token_probs == tr.token_probs
        assert [w.probability for w in r.words] == [w.probability for w in tr.words]
        assert [s.avg_logprob for s in r.segments] == [s.avg_logprob for s in tr.segments]

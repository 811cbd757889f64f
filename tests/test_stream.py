"""Streaming: Stream.feed/finish equal offline transcribe() for any chunking and delay, bad input,
end of stream, constant memory over long streams, timed words/segments and the subtitle writers.

The model here is a random-weight checkpoint written directly with numpy (no torch): the real
structure at the smallest dims and a vocabulary of 40 specials + 256 byte tokens, because on
lavapipe a decoder step costs ~2 ms per dispatch plus ~0.2 ms per LM-head workgroup, and these
tests run thousands of steps. Parity with the HF reference is tests/test_hf_reference.py's job;
here the reference is our own offline path, which must be matched bit for bit.

Environment:
    VOXTRAL_STREAM_EXAMPLES   hypothesis examples for the chunking property (default 12)
    VOXTRAL_LONG_STREAM_S     seconds of audio in the long-stream memory test (default 80;
                              3600 for the one-hour run: ~9 min on lavapipe)
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_reference import TinySpec, params_json, speechlike_audio, synth_audio
from tekken_fixture import build_tekken

import voxtral_wgpu
from voxtral_wgpu import audio as audio_mod
from voxtral_wgpu import model as model_mod
from voxtral_wgpu.stream import (Segment, StreamClosedError, TextAssembler, Word, segments_from_words, timed_text,
                                 token_time, words_from_tokens)
from voxtral_wgpu.subtitles import cue_times, format_timestamp, render, write_transcript

FAST = TinySpec(enc_dim=64, enc_layers=1, enc_heads=2, enc_head_dim=32, enc_hidden=64, enc_window=40,
                dec_dim=64, dec_layers=1, dec_heads=2, dec_kv_heads=1, dec_head_dim=32, dec_hidden=64,
                dec_window=20, seed=7)
N_SPECIAL = 40  # ids 0..39: <unk> <s> </s> ... [STREAMING_PAD]=32 [STREAMING_WORD]=33
N_INNER = 256  # the 256 single-byte tokens: id 40 + b is byte b
DELAYS = list(range(80, 2401, 80))


# ------------------------------------------------------------------------------------------------
# a fast random checkpoint
# ------------------------------------------------------------------------------------------------
def _bf16(a: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def write_fast_model(out: Path, spec: TinySpec = FAST) -> Path:
    """Mistral-native checkpoint (BF16 safetensors, params.json, tekken.json) with random weights:
    norms 1+0.2N, biases 0.1N, embeddings embed_std*N, matrices N/sqrt(fan_in)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    vocab = N_SPECIAL + N_INNER
    E = "mm_streams_embeddings.embedding_module.whisper_encoder."
    M = "mm_streams_embeddings.embedding_module."
    t: dict[str, np.ndarray] = {}

    def mat(name, *shape):
        t[name] = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))

    def vec(name, n):
        t[name] = 0.1 * rng.standard_normal(n)

    def norm(name, n):
        t[name] = 1 + 0.2 * rng.standard_normal(n)

    ed, dd = spec.enc_dim, spec.dec_dim
    ea = spec.enc_heads * spec.enc_head_dim
    qa, ka = spec.dec_heads * spec.dec_head_dim, spec.dec_kv_heads * spec.dec_head_dim
    mat(E + "conv_layers.0.conv.weight", ed, 128, 3)
    vec(E + "conv_layers.0.conv.bias", ed)
    mat(E + "conv_layers.1.conv.weight", ed, ed, 3)
    vec(E + "conv_layers.1.conv.bias", ed)
    for i in range(spec.enc_layers):
        p = f"{E}transformer.layers.{i}."
        for w, n, k in (("wq", ea, ed), ("wk", ea, ed), ("wv", ea, ed), ("wo", ed, ea)):
            mat(p + f"attention.{w}.weight", n, k)
        for b, n in (("wq", ea), ("wv", ea), ("wo", ed)):
            vec(p + f"attention.{b}.bias", n)
        norm(p + "attention_norm.weight", ed)
        norm(p + "ffn_norm.weight", ed)
        mat(p + "feed_forward.w1.weight", spec.enc_hidden, ed)
        mat(p + "feed_forward.w3.weight", spec.enc_hidden, ed)
        mat(p + "feed_forward.w2.weight", ed, spec.enc_hidden)
        vec(p + "feed_forward.w2.bias", ed)
    norm(E + "transformer.norm.weight", ed)
    mat(M + "audio_language_projection.0.weight", dd, 4 * ed)
    mat(M + "audio_language_projection.2.weight", dd, dd)
    t[M + "tok_embeddings.weight"] = spec.embed_std * rng.standard_normal((vocab, dd))
    for i in range(spec.dec_layers):
        p = f"layers.{i}."
        mat(p + "attention.wq.weight", qa, dd)
        mat(p + "attention.wk.weight", ka, dd)
        mat(p + "attention.wv.weight", ka, dd)
        mat(p + "attention.wo.weight", dd, qa)
        norm(p + "attention_norm.weight", dd)
        norm(p + "ffn_norm.weight", dd)
        mat(p + "feed_forward.w1.weight", spec.dec_hidden, dd)
        mat(p + "feed_forward.w3.weight", spec.dec_hidden, dd)
        mat(p + "feed_forward.w2.weight", dd, spec.dec_hidden)
        mat(p + "ada_rms_norm_t_cond.0.weight", 32, dd)
        mat(p + "ada_rms_norm_t_cond.2.weight", dd, 32)
    norm("norm.weight", dd)

    header, blobs, off = {}, [], 0
    for name in sorted(t):
        raw = _bf16(t[name]).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(t[name].shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (out / "consolidated.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    params = params_json(spec)
    params["vocab_size"] = vocab
    params["multimodal"]["whisper_model_args"]["encoder_args"]["vocab_size"] = vocab
    (out / "params.json").write_text(json.dumps(params))
    tk = build_tekken(N_INNER)
    tk["config"]["default_vocab_size"] = vocab
    tk["config"]["default_num_special_tokens"] = N_SPECIAL
    tk["special_tokens"] = tk["special_tokens"][:N_SPECIAL]
    (out / "tekken.json").write_text(json.dumps(tk))
    return out


@pytest.fixture(scope="module")
def model(gpu, tmp_path_factory):
    d = write_fast_model(tmp_path_factory.mktemp("fast_model"))
    return voxtral_wgpu.load(d, gpu=gpu, progress=False)


CLIPS = {
    "speech0.4": speechlike_audio(0.4, seed=11, tail_silence_s=0.1),
    "speech1.3": speechlike_audio(1.3, seed=12, tail_silence_s=0.2),
    "chirp2.1": synth_audio(2.1, seed=13),
}

_OFFLINE: dict = {}


def offline(model, clip: str, delay_ms: int):
    """(Transcription, audio embeddings [positions, dim]) of the offline path, cached."""
    key = (clip, delay_ms)
    if key not in _OFFLINE:
        tr = model.transcribe(CLIPS[clip], transcription_delay_ms=delay_ms)
        _OFFLINE[key] = (tr, offline_embeddings(model, CLIPS[clip], delay_ms))
    return _OFFLINE[key]


def offline_embeddings(model, audio: np.ndarray, delay_ms: int) -> np.ndarray:
    """Audio embeddings as Model.transcribe computes them: whole-signal log-mel, 32-position batches."""
    from voxtral_wgpu._native import log_mel

    n_delay = audio_mod.delay_ms_to_tokens(delay_ms)
    left, right = audio_mod.padding(len(audio), n_delay)
    mel = log_mel(np.concatenate([np.zeros(left, np.float32), audio, np.zeros(right, np.float32)]))
    s = model_mod.Session(model, n_delay)
    s.taps = {}
    s.close(len(mel) // 8)
    chunk = 8 * model_mod.MAX_CHUNK_POSITIONS
    for i in range(0, len(mel), chunk):
        s.push_mel(mel[i:i + chunk])
        s.decode()
    s.decode()
    emb = np.concatenate(s.taps["adapter"])
    s.release()
    return emb


def chunk_plan(n: int, sizes: list[int], max_chunks: int = 3000) -> list[tuple[int, int]]:
    """Split [0, n) by cycling through ``sizes``; past ``max_chunks`` the rest is one chunk."""
    out, i, k = [], 0, 0
    while i < n:
        size = sizes[k % len(sizes)] if len(out) < max_chunks else n - i
        out.append((i, min(n, i + size)))
        i += size
        k += 1
    return out


def run_stream(model, audio: np.ndarray, plan, delay_ms: int, *, taps: bool = False):
    s = model.create_stream(transcription_delay_ms=delay_ms)
    if taps:
        s._session.taps = {}
    events = []
    for a, b in plan:
        events += s.feed(audio[a:b])
        assert len(s._session._mel_pending) < model_mod.MEL_FRAMES_PER_POSITION  # all complete positions used
    events += s.finish()
    emb = np.concatenate(s._session.taps["adapter"]) if taps else None
    return s, events, emb


def check_events(s, events, tr):
    assert "".join(e.text for e in events) == s.text == tr.text
    ids = [t for e in events for t in e.token_ids]
    assert ids == s.token_ids[:len(ids)]
    dur = s.duration_s
    prev = 0.0
    for e in events:
        assert e.text  # never empty
        assert 0.0 <= e.start <= e.end <= dur + 1e-9
        assert e.start >= prev - 1e-9
        prev = e.start
    assert len(s.latencies) == len(s.token_ids)
    assert all(x >= 0 for x in s.latencies)


# ------------------------------------------------------------------------------------------------
# streaming == offline
# ------------------------------------------------------------------------------------------------
chunk_sizes = st.lists(st.one_of(st.integers(1, 50), st.integers(51, 3000), st.integers(3001, 60000)),
                       min_size=1, max_size=12)


@settings(max_examples=int(os.environ.get("VOXTRAL_STREAM_EXAMPLES", "12")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(clip=st.sampled_from(sorted(CLIPS)), delay=st.sampled_from(DELAYS), sizes=chunk_sizes)
def test_stream_equals_offline(model, clip, delay, sizes):
    """For any chunking and delay: the same audio embeddings bit for bit, the same token ids, and
    deltas that add up to the offline text."""
    tr, emb_ref = offline(model, clip, delay)
    audio = CLIPS[clip]
    s, events, emb = run_stream(model, audio, chunk_plan(len(audio), sizes), delay, taps=True)
    # encoding runs ahead of decoding (up to the audio ring's room) until EOS stops the session, so
    # the two paths may have encoded different numbers of positions; those both encoded are equal
    n = min(len(emb), len(emb_ref))
    assert n >= len(tr.token_ids) and abs(len(emb) - len(emb_ref)) <= model_mod.MAX_CHUNK_POSITIONS
    assert np.array_equal(emb[:n].view(np.uint32), emb_ref[:n].view(np.uint32))
    assert s.token_ids == tr.token_ids
    check_events(s, events, tr)
    r = s.result()
    assert r.words == tr.words and r.segments == tr.segments and r.token_ids == tr.token_ids


@pytest.mark.parametrize("delay", [80, 480, 2400])
def test_chunk_extremes(model, delay):
    """One sample per feed for the first 0.7 s, then everything else in one chunk; and the whole
    clip in a single feed."""
    audio = CLIPS["chirp2.1"]
    tr, _ = offline(model, "chirp2.1", delay)
    plan = [(i, i + 1) for i in range(11200)] + [(11200, len(audio))]
    s, events, _ = run_stream(model, audio, plan, delay)
    assert s.token_ids == tr.token_ids
    check_events(s, events, tr)
    s2, events2, _ = run_stream(model, audio, [(0, len(audio))], delay)
    assert s2.token_ids == tr.token_ids
    check_events(s2, events2, tr)


def test_first_token_needs_9000_samples(model):
    """Spec §3.4: the first decoder step needs the first 9000 real samples at 480 ms."""
    audio = CLIPS["chirp2.1"]
    s = model.create_stream(transcription_delay_ms=480)
    s.feed(audio[:8999])
    assert s.token_ids == []
    s.feed(audio[8999:9000])
    assert len(s.token_ids) == 1
    s.feed(audio[9000:9000 + 1279])
    assert len(s.token_ids) == 1
    s.feed(audio[10279:10280])  # every further 1280 samples unlock one position
    assert len(s.token_ids) == 2
    s.close()


def test_transcribe_stream_generator(model):
    audio = CLIPS["speech1.3"]
    tr, _ = offline(model, "speech1.3", 480)
    gen = model.transcribe_stream(audio[i:i + 700] for i in range(0, len(audio), 700))
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert "".join(e.text for e in events) == tr.text
    assert result.token_ids == tr.token_ids and result.text == tr.text and result.words == tr.words


def test_latency_clock(model):
    """A token's latency runs from the feed() that completed its position: with the first 9000
    samples in one feed, the first token's latency is that call's own duration."""
    audio = CLIPS["chirp2.1"]
    s = model.create_stream(transcription_delay_ms=480)
    t0 = time.perf_counter()
    s.feed(audio[:9000])
    dt = time.perf_counter() - t0
    assert len(s.latencies) == 1 and 0 <= s.latencies[0] <= dt
    time.sleep(0.05)
    t1 = time.perf_counter()
    s.feed(audio[9000:9000 + 3 * 1280])  # three more positions, all completed by this call
    dt = time.perf_counter() - t1
    assert len(s.latencies) == 4 and all(0 <= x <= dt for x in s.latencies[1:])
    s.finish()
    assert len(s.latencies) == len(s.token_ids)
    r = s.result().timings
    assert r["latency_median_s"] is not None and r["latency_p90_s"] >= r["latency_median_s"]


# ------------------------------------------------------------------------------------------------
# bad input, end of stream
# ------------------------------------------------------------------------------------------------
def test_bad_input_leaves_stream_valid(model):
    audio = CLIPS["speech1.3"]
    tr, _ = offline(model, "speech1.3", 480)
    s = model.create_stream()
    events = s.feed(audio[:5000])
    bad = audio[5000:6000].copy()
    bad[[7, 9, 400]] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match=r"3 non-finite .* index 7"):
        s.feed(bad)
    with pytest.raises(ValueError, match=r"shape \(500, 2\)"):
        s.feed(np.stack([audio[5000:5500]] * 2, axis=1))
    with pytest.raises(ValueError, match="shape"):
        s.feed(np.float32(0.5))
    with pytest.raises(TypeError):
        s.feed(audio[5000:6000].tobytes())
    with pytest.raises(TypeError, match="dtype"):
        s.feed(np.zeros(10, np.uint16))
    with pytest.raises(TypeError):
        s.feed(np.zeros(10, np.complex64))
    with pytest.raises(TypeError):
        s.feed("not audio")
    assert s.feed(np.zeros(0, np.float32)) == [] and s.feed([]) == []
    assert s.duration_s == 5000 / 16000
    # int16 PCM is scaled by 1/32768 (the clips are on the int16 grid, so this is exact)
    pcm = np.round(audio[5000:9000] * 32768).astype(np.int16)
    events += s.feed(pcm)
    events += s.feed(list(map(float, audio[9000:9100])))  # a list of floats is accepted
    events += s.feed(audio[9100:].astype(np.float64))
    events += s.finish()
    assert s.token_ids == tr.token_ids
    check_events(s, events, tr)


def test_feed_after_finish(model):
    s = model.create_stream()
    s.feed(CLIPS["speech0.4"])
    s.finish()
    with pytest.raises(StreamClosedError, match="after finish"):
        s.feed(CLIPS["speech0.4"])
    with pytest.raises(RuntimeError, match="twice"):
        s.finish()
    assert isinstance(StreamClosedError(), RuntimeError)
    s2 = model.create_stream()
    s2.close()
    with pytest.raises(StreamClosedError):
        s2.feed(np.zeros(10, np.float32))


def test_finish_without_audio(model):
    tr = model.transcribe(np.zeros(0, np.float32))
    s = model.create_stream()
    events = s.finish()
    assert s.token_ids == tr.token_ids and "".join(e.text for e in events) == tr.text


def test_release_returns_gpu_memory(model, gpu):
    before = gpu.bytes_allocated
    s = model.create_stream()
    assert gpu.bytes_allocated > before
    s.feed(CLIPS["speech0.4"])
    s.finish()
    assert gpu.bytes_allocated == before


def test_eos_ends_stream(model):
    """When the model emits EOS the stream stops exactly where offline decoding stops; later audio
    is accepted and ignored without piling up. (EOS is played by an id the random model emits
    mid-utterance: the tokenizer's eos_id is pointed at it for the test.)"""
    audio = CLIPS["chirp2.1"]
    full, _ = offline(model, "chirp2.1", 160)
    ids = full.token_ids
    k = next(i for i in range(5, len(ids)) if ids[i] not in ids[:i])
    tok = model.tokenizer
    saved = tok.eos_id
    tok.eos_id = ids[k]
    try:
        tr = model.transcribe(audio, transcription_delay_ms=160)
        assert tr.token_ids == ids[:k]
        s = model.create_stream(transcription_delay_ms=160)
        events = []
        for i in range(0, len(audio), 1000):
            events += s.feed(audio[i:i + 1000])
        assert s.eos
        pending = len(s._session._mel_pending)
        for _ in range(20):
            assert s.feed(audio[:4000]) == []
        assert len(s._session._mel_pending) == pending
        events += s.finish()
        assert s.token_ids == tr.token_ids
        assert "".join(e.text for e in events) == s.text == tr.text
    finally:
        tok.eos_id = saved


# ------------------------------------------------------------------------------------------------
# long streams: constant memory, positions past every window and ring
# ------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def long_audio_chunk(i: int, n: int) -> np.ndarray:
    """Chunk ``i`` of a deterministic endless signal: speech-like bursts and silences."""
    return speechlike_audio(n / 16000, seed=1000 + i % 97, tail_silence_s=0.3)


def test_long_stream_constant_memory(model, gpu, monkeypatch):
    """A long stream keeps GPU bytes and host memory flat after warm-up, runs far past the decoder
    window (20 positions here), the encoder window (40 frames), the audio-embedding ring and the
    token ring (shrunk to 128 positions so that it wraps many times), and its ids equal offline
    transcribe() on a prefix of the same audio.

    Default 80 s of audio; VOXTRAL_LONG_STREAM_S=3600 runs the one-hour version (~9 min on lavapipe,
    45k tokens at 12 ms each; GPU bytes constant, RSS +5.3 MiB after warm-up)."""
    monkeypatch.setattr(model_mod, "TOKEN_RING", 128)
    seconds = float(os.environ.get("VOXTRAL_LONG_STREAM_S", "80"))
    compare_s = min(seconds, 40.0)
    chunk = 2 * 16000  # 2 s per feed: large enough encoder batches to keep lavapipe fast
    n_chunks = int(seconds * 16000) // chunk
    delay = 480
    n_delay = 6
    s = model.create_stream(transcription_delay_ms=delay)
    prefix = []
    gpu_bytes, rss = [], []
    t0 = time.perf_counter()
    for i in range(n_chunks):
        x = long_audio_chunk(i, chunk)
        if (i * chunk) < compare_s * 16000:
            prefix.append(x)
        s.feed(x)
        sess = s._session
        assert len(sess._mel_pending) < 8 and len(s._arrivals) <= 2
        assert sess.dec.cap == sess.dec.max_cap  # the decoder ring is at its final size (window 20)
        gpu_bytes.append(gpu.bytes_allocated)
        rss.append(_rss_bytes())
    elapsed = time.perf_counter() - t0
    n_tok = len(s.token_ids)
    warm = max(1, n_chunks // 8)
    rss_growth = rss[-1] - rss[warm]
    print(f"\nlong stream: {n_chunks * chunk / 16000:.0f} s audio, {n_tok} tokens in {elapsed:.1f} s "
          f"({elapsed / max(n_tok, 1) * 1e3:.1f} ms/token); GPU bytes {gpu_bytes[warm]} -> {gpu_bytes[-1]}; "
          f"RSS {rss[warm] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB (max {max(rss[warm:]) / 2**20:.1f}; "
          f"at 1/4, 1/2, 3/4: {', '.join(f'{rss[n_chunks * q // 4 - 1] / 2**20:.1f}' for q in (1, 2, 3))})")
    assert gpu_bytes[warm:] == [gpu_bytes[warm]] * (n_chunks - warm)
    # only the output kept by the stream grows (ids, latencies: ~70 bytes a token; one hour of audio
    # measured +5.3 MiB after warm-up for 45k tokens)
    assert rss_growth < 8 * 2**20 + 256 * n_tok, rss_growth
    assert sess.next_pos > 2 * 128 or seconds < 30  # the token ring wrapped
    s.finish()

    # the stream's ids for positions whose 40-sample look-ahead is still inside the prefix equal
    # offline decoding of that prefix
    audio = np.concatenate(prefix)
    tr = model.transcribe(audio, transcription_delay_ms=delay)
    k = len(audio) // 1280 - 1 - n_delay
    assert k > 300
    assert s.token_ids[:k] == tr.token_ids[:k]


# ------------------------------------------------------------------------------------------------
# timed words, segments, subtitle formats (no GPU)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from voxtral_wgpu.tokenizer import Tekken

    d = tmp_path_factory.mktemp("tok")
    tk = build_tekken(N_INNER)
    tk["config"]["default_vocab_size"] = N_SPECIAL + N_INNER
    tk["config"]["default_num_special_tokens"] = N_SPECIAL
    tk["special_tokens"] = tk["special_tokens"][:N_SPECIAL]
    (d / "tekken.json").write_text(json.dumps(tk))
    return Tekken.from_file(d / "tekken.json")


def ids_of(text: str) -> list[int]:
    return [N_SPECIAL + b for b in text.encode()]


P, W = 32, 33


def test_words_and_segments(tok):
    ids = [P, W] + ids_of("Hi") + [P] + ids_of(" you.") + [P] * 30 + ids_of(" Ok") + [P, P]
    words = words_from_tokens(tok, ids)
    assert [w.text for w in words] == ["Hi", "you.", "Ok"]
    assert words[0].start == token_time(1)[0] == 0.08 and words[0].end == token_time(3)[1] == 0.32
    assert words[1].start == 0.40 and words[1].end == token_time(9)[1]
    segs = segments_from_words(words)
    assert [s.text for s in segs] == ["Hi you.", "Ok"]  # split after sentence-final punctuation
    assert segs[0].start == 0.08 and segs[0].end == words[1].end and segs[0].words == tuple(words[:2])
    # a pause splits too; so does length
    w2 = [Word("a", 0.0, 0.1), Word("b", 0.2, 0.3), Word("c", 2.0, 2.1)]
    assert [s.text for s in segments_from_words(w2)] == ["a b", "c"]
    many = [Word("word", 0.1 * i, 0.1 * i + 0.08) for i in range(40)]
    assert all(len(s.text) <= 84 for s in segments_from_words(many))
    # times clamp to the duration (text written during the right padding)
    w3 = words_from_tokens(tok, [P] * 10 + ids_of(" end"), duration_s=0.5)
    assert w3 == [Word("end", 0.5, 0.5)]
    # a multi-byte character split over tokens stays one character
    assert [w.text for w in words_from_tokens(tok, ids_of(" h\u00e9 x"))] == ["h\u00e9", "x"]
    words, segs = timed_text(tok, [])
    assert words == [] and segs == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["", " ", "  ", "\n", "a", "b ", " c", "d\n", "\u00e9", " \u00e9 ", "\t"]),
                max_size=30))
def test_text_assembler(pieces):
    asm = TextAssembler()
    printed = ""
    for p in pieces:
        out = asm.push(p)
        printed += out
        assert printed == asm.text
    assert printed == "".join(pieces).strip()


def _transcription(tok):
    from voxtral_wgpu.api import Transcription

    ids = [P, W] + ids_of("Hello") + [P] + ids_of(" world.") + [P] * 40 + ids_of(" Next <b> & c") + [P] * 3
    words, segs = timed_text(tok, ids, duration_s=6.0)
    return Transcription(text=tok.decode(ids).strip(), token_ids=ids, duration_s=6.0, words=words, segments=segs)


def test_srt(tok):
    t = _transcription(tok)
    srt = render(t, "srt")
    blocks = srt.strip().split("\n\n")
    assert len(blocks) == len(t.segments) == 2
    for i, b in enumerate(blocks, 1):
        n, times, text = b.split("\n")
        assert n == str(i)
        m = re.fullmatch(r"(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)", times)
        assert m
        a = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4]) / 1000
        z = int(m[5]) * 3600 + int(m[6]) * 60 + int(m[7]) + int(m[8]) / 1000
        seg = t.segments[i - 1]
        assert abs(a - seg.start) < 1e-3 and z >= seg.end - 1e-3 and z <= 6.0
        assert text == seg.text
    assert blocks[0].split("\n")[2] == "Hello world."
    assert blocks[0].split("\n")[1] == "00:00:00,080 --> 00:00:01,200"  # "." is token 14: ends at 15 * 0.08
    assert blocks[1].split("\n")[1] == "00:00:04,400 --> 00:00:05,440"
    # a cue stays up at least 1 s (MIN_CUE_S) unless the next one starts earlier or the audio ends
    segs = [Segment("a", 0.0, 0.2), Segment("b", 0.5, 0.6), Segment("c", 3.0, 3.1), Segment("d", 3.3, 3.4)]
    assert cue_times(segs, 3.6) == [(0.0, 0.5), (0.5, 1.5), (3.0, 3.3), (3.3, 3.6)]
    assert format_timestamp(3723.4567) == "01:02:03,457"


def test_vtt(tok):
    t = _transcription(tok)
    vtt = render(t, "vtt")
    assert vtt.startswith("WEBVTT\n\n")
    cues = vtt[len("WEBVTT\n\n"):].strip().split("\n\n")
    assert len(cues) == 2
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d --> \d\d:\d\d:\d\d\.\d\d\d", cues[0].split("\n")[0])
    assert cues[1].split("\n")[1] == "Next &lt;b&gt; &amp; c"


def test_json_and_txt(tok, tmp_path):
    t = _transcription(tok)
    d = json.loads(render(t, "json"))
    assert d["text"] == t.text and d["token_ids"] == t.token_ids and d["duration_s"] == 6.0
    assert [s["text"] for s in d["segments"]] == ["Hello world.", "Next <b> & c"]
    assert [w["word"] for s in d["segments"] for w in s["words"]] == [w.text for w in t.words]
    assert all(set(w) == {"word", "start", "end"} for s in d["segments"] for w in s["words"])
    write_transcript(t, "txt", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == t.text + "\n"
    buf = io.StringIO()
    write_transcript(t, "srt", buf)
    assert buf.getvalue() == render(t, "srt")
    with pytest.raises(ValueError, match="unknown output format"):
        render(t, "doc")


def test_offline_transcription_has_timed_words(model):
    tr, _ = offline(model, "speech1.3", 480)
    assert tr.words == words_from_tokens(model.tokenizer, tr.token_ids, duration_s=tr.duration_s,
                                         token_probs=tr.token_probs)
    for w in tr.words:
        assert 0 <= w.start <= w.end <= tr.duration_s
    assert " ".join(s.text for s in tr.segments).split() == " ".join(w.text for w in tr.words).split()


# ------------------------------------------------------------------------------------------------
# CLI pieces
# ------------------------------------------------------------------------------------------------
def test_file_chunks_equal_load_audio(tmp_path):
    import soundfile as sf

    from voxtral_wgpu.cli_stream import file_chunks

    x = CLIPS["chirp2.1"]
    sf.write(tmp_path / "a.wav", x, 16000, subtype="PCM_16")
    chunks = list(file_chunks(tmp_path / "a.wav", 1000))
    assert all(len(c) == 1000 for c in chunks[:-1])
    assert np.array_equal(np.concatenate(chunks), audio_mod.load_audio(tmp_path / "a.wav"))
    sf.write(tmp_path / "b.wav", np.stack([x, x], 1), 48000, subtype="FLOAT")  # resampled on the fly
    y = np.concatenate(list(file_chunks(tmp_path / "b.wav", 777)))
    assert abs(len(y) - len(x) / 3) <= 2


def test_stream_command(model, tmp_path, capsys, monkeypatch):
    import argparse

    import soundfile as sf

    from voxtral_wgpu import cli_stream

    x = CLIPS["speech1.3"]
    sf.write(tmp_path / "a.wav", x, 16000, subtype="PCM_16")
    monkeypatch.setattr(cli_stream, "_load", lambda args: model)
    parser = argparse.ArgumentParser()
    cli_stream.add_stream_commands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["stream", str(tmp_path / "a.wav"), "--chunk-ms", "200", "-o", str(tmp_path / "o.json")])
    assert args.func(args) == 0
    out = capsys.readouterr()
    tr, _ = offline(model, "speech1.3", 480)
    lines = [ln for ln in out.out.splitlines() if ln]
    assert all(re.match(r"\[\d\d:\d\d:\d\d\.\d\d\d --> \d\d:\d\d:\d\d\.\d\d\d\] ", ln) for ln in lines)
    assert "real time" in out.err and "latency" in out.err
    assert json.loads((tmp_path / "o.json").read_text())["token_ids"] == tr.token_ids


def test_listen_without_microphone(capsys, monkeypatch):
    """`listen` fails with a clear message when sounddevice, PortAudio or an input device is missing."""
    import argparse
    import builtins

    from voxtral_wgpu import cli_stream

    parser = argparse.ArgumentParser()
    cli_stream.add_stream_commands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["listen", "--model", "nowhere"])
    real_import = builtins.__import__

    def no_sounddevice(name, *a, **k):
        if name == "sounddevice":
            raise ImportError("No module named 'sounddevice'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_sounddevice)
    assert args.func(args) == 2
    assert "sounddevice" in capsys.readouterr().err
    monkeypatch.setattr(builtins, "__import__", real_import)
    try:
        import sounddevice as sd  # noqa: F401
    except (ImportError, OSError):
        return
    try:
        sd.query_devices(kind="input")
        pytest.skip("this machine has an audio input device")
    except Exception:
        pass
    assert args.func(args) == 2
    assert "no audio input device" in capsys.readouterr().err

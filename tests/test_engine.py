"""The engine: many streams on one GPU, each stream's ids equal to ``Model.transcribe()``'s alone.

The models are test_stream.py's fast random checkpoint (BF16) and its Q4_0 GGUF; the reference is
our own offline path (which tests/test_hf_reference.py ties to HF), matched bit for bit whatever the
companions, join order, chunking and delays.
"""

from __future__ import annotations

import asyncio
import gc
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_stream import CLIPS, write_fast_model

import voxtral_wgpu
from voxtral_wgpu.engine import Engine, EngineError, EngineFullError, batch as batch_mod
from voxtral_wgpu.quantize import quantize
from voxtral_wgpu.stream import StreamClosedError

DELAYS = (80, 480, 960, 2400)


@pytest.fixture(scope="module", params=["bf16", "q4_0"])
def model(request, gpu, tmp_path_factory):
    d = write_fast_model(tmp_path_factory.mktemp("engine_model"))
    if request.param == "bf16":
        return voxtral_wgpu.load(d, gpu=gpu, progress=False)
    path = quantize(d, d / "model.gguf", qtype="q4_0")[0]
    return voxtral_wgpu.load(path, gpu=gpu, progress=False, tokenizer=d / "tekken.json")


_ALONE: dict = {}


def alone(model, clip: str, delay: int) -> list[int]:
    key = (id(model), clip, delay)
    if key not in _ALONE:
        _ALONE[key] = model.transcribe(CLIPS[clip], transcription_delay_ms=delay).token_ids
    return _ALONE[key]


stream_sets = st.lists(st.tuples(st.sampled_from(sorted(CLIPS)), st.sampled_from(DELAYS),
                                 st.integers(1, 6000), st.integers(0, 6)), min_size=1, max_size=5)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(streams=stream_sets)
def test_streams_in_one_engine_equal_alone(model, streams):
    """Random stream sets (clip, delay, chunk size, round in which the stream joins), fed round-robin
    one chunk per round: every stream's ids equal transcribe()'s on its audio alone."""
    with Engine(model, max_streams=8) as engine:
        todo = [dict(clip=c, delay=d, size=n, join=j, pos=0, s=None) for c, d, n, j in streams]
        rnd = 0
        while any(t["s"] is None or t["pos"] < len(CLIPS[t["clip"]]) for t in todo):
            for t in todo:
                if t["s"] is None and rnd >= t["join"]:
                    t["s"] = engine.create_stream(transcription_delay_ms=t["delay"])
                if t["s"] is not None and t["pos"] < len(CLIPS[t["clip"]]):
                    audio = CLIPS[t["clip"]]
                    t["s"].feed(audio[t["pos"]:t["pos"] + t["size"]])
                    t["pos"] += t["size"]
            rnd += 1
        for t in todo:
            events = t["s"].finish()
            assert t["s"].token_ids == alone(model, t["clip"], t["delay"])
            tr = model.transcribe(CLIPS[t["clip"]], transcription_delay_ms=t["delay"])
            assert t["s"].text == tr.text
            assert isinstance(events, list)


def test_transcribe_many_equals_transcribe(model):
    audios = [CLIPS[c] for c in sorted(CLIPS)] * 2
    with Engine(model, max_streams=4) as engine:
        got = engine.transcribe_many(audios, transcription_delay_ms=960)
    for a, tr in zip(audios, got):
        ref = model.transcribe(a, transcription_delay_ms=960)
        assert tr.token_ids == ref.token_ids and tr.text == ref.text


def test_model_transcribe_many(model, tmp_path):
    """Model.transcribe_many (an engine for the call; paths and arrays) equals transcribe() one by one."""
    import soundfile as sf

    path = tmp_path / "a.wav"
    sf.write(path, CLIPS["speech1.3"], 16000, subtype="FLOAT")
    audios = [str(path), CLIPS["chirp2.1"], CLIPS["speech0.4"]]
    got = model.transcribe_many(audios, transcription_delay_ms=80, max_streams=2)
    assert [tr.token_ids for tr in got] == [model.transcribe(a, transcription_delay_ms=80).token_ids for a in audios]
    assert model.transcribe_many([]) == []


def test_bad_chunk_is_that_streams_error(model):
    with Engine(model) as engine:
        good = engine.create_stream()
        bad = engine.create_stream()
        audio = CLIPS["speech1.3"]
        good.feed(audio[:5000])
        bad.feed(audio[:5000])
        with pytest.raises(ValueError, match="NaN"):
            bad.feed(np.full(100, np.nan, np.float32))
        with pytest.raises(ValueError):
            bad.feed(np.zeros((10, 2), np.float32))
        with pytest.raises(TypeError):
            bad.feed("not audio")
        good.feed(audio[5000:])
        bad.feed(audio[5000:])  # the rejected chunks changed nothing
        good.finish()
        bad.finish()
        assert good.token_ids == bad.token_ids == alone(model, "speech1.3", 480)


def test_full_engine_and_closed_streams(model, gpu):
    base = gpu.bytes_allocated
    engine = Engine(model, max_streams=2)
    a, b = engine.create_stream(), engine.create_stream()
    with pytest.raises(EngineFullError, match="max_streams"):
        engine.create_stream()
    a.close()
    c = engine.create_stream()  # a's place is free again
    with pytest.raises(StreamClosedError):
        a.feed(np.zeros(10, np.float32))
    with pytest.raises(StreamClosedError):
        a.finish()
    b.feed(CLIPS["speech0.4"])
    c.feed(CLIPS["speech0.4"])
    engine.close()  # open streams end cleanly
    with pytest.raises(EngineError, match="closed"):
        b.finish()
    with pytest.raises((EngineError, StreamClosedError)):
        c.feed(np.zeros(10, np.float32))
    with pytest.raises(EngineError, match="closed"):
        engine.create_stream()
    assert gpu.bytes_allocated == base


def test_dropped_streams_give_their_memory_back(model, gpu):
    with Engine(model, max_streams=4) as engine:
        s = engine.create_stream()
        s.feed(CLIPS["speech0.4"])
        s.finish()
        gc.collect()
        base = gpu.bytes_allocated  # the engine's own buffers, after one stream came and went
        for _ in range(12):  # more than max_streams: each dropped stream's place comes back
            s = engine.create_stream()
            s.feed(CLIPS["speech0.4"][:4000])
            del s
            gc.collect()
        engine.create_stream().finish()
        gc.collect()
        assert engine.stats()["streams"] <= 1
    assert gpu.bytes_allocated < base


def test_scheduler_failure_reaches_every_stream(model, monkeypatch):
    def broken(self, sessions, advance=None):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(batch_mod.DecodeBatch, "step", broken)
    with Engine(model) as engine:
        streams = [engine.create_stream() for _ in range(3)]
        for s in streams:
            try:
                s.feed(CLIPS["speech1.3"])
            except EngineError as e:  # the scheduler may fail before the later feeds
                assert "injected failure" in str(e)
        for s in streams:
            with pytest.raises(EngineError, match="injected failure"):
                s.finish()
        with pytest.raises(EngineError, match="injected failure"):
            engine.create_stream()
    monkeypatch.undo()
    assert model.transcribe(CLIPS["speech0.4"]).token_ids == alone(model, "speech0.4", 480)


def test_streams_fed_from_threads_with_transcribe_beside(model):
    """Streams fed from their own threads while another thread calls model.transcribe()."""
    clips = sorted(CLIPS)
    results, errors = {}, []
    with Engine(model) as engine:
        def feed(i):
            try:
                clip = clips[i % len(clips)]
                s = engine.create_stream(transcription_delay_ms=DELAYS[i % len(DELAYS)])
                audio = CLIPS[clip]
                for k in range(0, len(audio), 997 * (i + 1)):
                    s.feed(audio[k:k + 997 * (i + 1)])
                s.finish()
                results[i] = (clip, DELAYS[i % len(DELAYS)], s.token_ids)
            except BaseException as e:  # reported below
                errors.append(e)

        def offline():
            try:
                results["offline"] = model.transcribe(CLIPS["chirp2.1"]).token_ids
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=feed, args=(i,)) for i in range(4)] + [threading.Thread(target=offline)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert results.pop("offline") == alone(model, "chirp2.1", 480)
    for clip, delay, ids in results.values():
        assert ids == alone(model, clip, delay)


def test_asyncio_forms(model):
    async def main(engine):
        s = engine.create_stream()
        audio = CLIPS["speech1.3"]

        async def consume():
            return [d async for d in s.adeltas()]

        task = asyncio.create_task(consume())
        for k in range(0, len(audio), 1600):
            await s.afeed(audio[k:k + 1600])
            await asyncio.sleep(0)
        tail = await s.afinish()
        streamed = await asyncio.wait_for(task, 30)
        return s, streamed, tail

    with Engine(model) as engine:
        s, streamed, tail = asyncio.run(main(engine))
    assert s.token_ids == alone(model, "speech1.3", 480)
    assert "".join(d.text for d in streamed + tail) == s.text


def test_engine_arguments(model):
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="max_streams"):
            Engine(model, max_streams=bad)
    with Engine(model) as engine:
        with pytest.raises(ValueError):
            engine.create_stream(transcription_delay_ms=100)  # not a multiple of 80


@pytest.mark.parametrize("kv_f16", [False, True], ids=["f32", "f16"])
def test_attention_blocks_equal_per_stream_attention(gpu, kv_f16):
    """rope_qkv_slots + attention_blocks over the rows of several streams (own positions, some past
    one 64-row block, a huge position, each stream's ring in one pool) give every row the bits
    rope_qkv + attention give it on that stream's own ring, over two chunks (history in the ring)."""
    from voxtral_wgpu import ops
    from voxtral_wgpu.ops import Mat

    rng = np.random.default_rng(3 + kv_f16)
    n_heads, n_kv, hd, window = 4, 2, 32, 70
    width = (n_heads + 2 * n_kv) * hd
    starts, chunks = [0, 37, 2**20 + 5], [(5, 3), (70, 1), (12, 66)]
    cap = window + max(max(c) for c in chunks) - 1
    kvw = n_kv * hd * (2 if kv_f16 else 4)
    pool_k, pool_v = gpu.empty(len(starts) * cap * kvw), gpu.empty(len(starts) * cap * kvw)
    solo_k = [gpu.empty(cap * kvw) for _ in starts]
    solo_v = [gpu.empty(cap * kvw) for _ in starts]
    heads = dict(n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd)
    for c in range(2):
        rows = [ch[c] for ch in chunks]
        pos0 = [s + (chunks[i][0] if c else 0) for i, s in enumerate(starts)]
        data = [(rng.standard_normal((n, width)) * 2).astype(np.float32) for n in rows]
        tables = [ops.rope_table(np.arange(p, p + n), hd, 1e6) for p, n in zip(pos0, rows)]
        want = []
        for i, (x, t) in enumerate(zip(data, tables)):
            q, out, tb = gpu.upload(x), gpu.empty(4 * len(x) * n_heads * hd), gpu.upload(t)
            ops.rope_qkv(gpu, tb, Mat.of(q, len(x), width), solo_k[i], solo_v[i], **heads, pos0=pos0[i], cap=cap,
                         kv_f16=kv_f16)
            ops.attention(gpu, Mat(q, len(x), n_heads * hd, width, 0), solo_k[i], solo_v[i],
                          Mat.of(out, len(x), n_heads * hd), **heads, pos0=pos0[i], window=window, cap=cap,
                          kv_f16=kv_f16)
            want.append(gpu.read(out, np.float32, len(x) * n_heads * hd))
        R, row, slots, blocks = sum(rows), 0, [], []
        for i, (n, p) in enumerate(zip(rows, pos0)):
            slots.append(i * cap + (p + np.arange(n)) % cap)
            for r in range(0, n, ops.ATTENTION_ROWS):
                blocks.append((row + r, min(ops.ATTENTION_ROWS, n - r), p + r, i * cap))
            row += n
        q, out = gpu.upload(np.concatenate(data)), gpu.empty(4 * R * n_heads * hd)
        ops.rope_qkv_slots(gpu, gpu.upload(np.concatenate(tables)), Mat.of(q, R, width), pool_k, pool_v,
                           gpu.upload(np.concatenate(slots).astype(np.uint32)), **heads, kv_f16=kv_f16)
        ops.attention_blocks(gpu, Mat(q, R, n_heads * hd, width, 0), pool_k, pool_v, Mat.of(out, R, n_heads * hd),
                             gpu.upload(np.asarray(blocks, np.uint32)), len(blocks), **heads, window=window, cap=cap,
                             kv_f16=kv_f16)
        got = gpu.read(out, np.float32, R * n_heads * hd)
        assert got.view(np.uint32).tolist() == np.concatenate(want).view(np.uint32).tolist(), c


def test_engine_too_big_for_the_device_is_a_clear_error(model, gpu, monkeypatch):
    base = gpu.bytes_allocated
    monkeypatch.setattr(gpu, "max_buffer", 1 << 16)  # the encoder's pools no longer fit one buffer
    with pytest.raises(EngineError, match="max_streams=64"):
        Engine(model, max_streams=64)
    assert gpu.bytes_allocated == base


def test_eos_ends_an_engine_stream(model):
    """A stream whose model emits EOS stops where transcribe() stops; later audio is accepted and
    ignored without piling up (EOS played by an id the random model emits: eos_id pointed at it)."""
    import time as _time

    audio = CLIPS["chirp2.1"]
    ids = alone(model, "chirp2.1", 160)
    k = next(i for i in range(5, len(ids)) if ids[i] not in ids[:i])
    tok = model.tokenizer
    saved = tok.eos_id
    tok.eos_id = ids[k]
    try:
        with Engine(model) as engine:
            s = engine.create_stream(transcription_delay_ms=160)
            for i in range(0, len(audio), 1000):
                s.feed(audio[i:i + 1000])
            deadline = _time.monotonic() + 60
            while not s.eos and _time.monotonic() < deadline:
                _time.sleep(0.01)
            assert s.eos
            sess = s._slot.session
            pending = len(sess._mel_pending)
            for _ in range(20):
                s.feed(audio[:4000])
            _time.sleep(0.1)
            assert len(sess._mel_pending) == pending and not s._slot.frames
            s.finish()
            assert s.token_ids == ids[:k]
    finally:
        tok.eos_id = saved

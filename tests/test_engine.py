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
    def broken(self, sessions):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(batch_mod.DecodeBatch, "step", broken)
    with Engine(model) as engine:
        streams = [engine.create_stream() for _ in range(3)]
        for s in streams:
            s.feed(CLIPS["speech1.3"])
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

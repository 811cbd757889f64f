"""Parity of the whole graph with HF transformers on tiny random-weight models.

Stages are compared on the same input (the HF mel is fed to our encoder so encoder errors are not
mixed with mel errors); free-running greedy ids must equal HF ``generate`` exactly, except after a
step whose HF top-1/top-2 margin is below what float32 reordering can flip.
"""

from __future__ import annotations

import numpy as np
import pytest

from hf_reference import TINY_FULL, TINY_SW, TinySpec, build_eos_model, synth_audio, speechlike_audio
from voxtral_wgpu.model import MAX_CHUNK_POSITIONS, MEL_FRAMES_PER_POSITION, Session

# Odd shapes on purpose: head_dim 48/24, GQA 3:1, 3 layers, hidden sizes not multiples of 64,
# windows crossed by the test audio in both stacks.
TINY_ODD = TinySpec(enc_dim=72, enc_layers=3, enc_heads=2, enc_head_dim=48, enc_hidden=100, enc_window=57,
                    dec_dim=88, dec_layers=3, dec_heads=6, dec_kv_heads=2, dec_head_dim=24, dec_hidden=130,
                    dec_window=45, n_inner=1100, seed=7)

MARGIN = 1e-3  # HF top-2 margin under which an id may legitimately differ (float32 summation order)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def _session_with_taps(model, ref, mel):
    s = Session(model, ref.n_delay)
    s.taps = {}
    s.close(len(mel) // MEL_FRAMES_PER_POSITION)
    s.push_mel(mel)
    return s


# encoder windows of 1 and 2 positions: no earlier key kept between chunks (window - 1 = 0), or one
TINY_ENC_WIN1 = TinySpec(enc_window=1, seed=11)
TINY_ENC_WIN2 = TinySpec(enc_window=2, seed=12)


@pytest.mark.parametrize("spec", [TINY_SW, TINY_FULL, TINY_ODD, TINY_ENC_WIN1, TINY_ENC_WIN2],
                         ids=["sw", "full", "odd", "enc-win1", "enc-win2"])
def test_encoder_stages_match_hf(tiny_model, spec):
    model, ref = tiny_model(spec)
    audio = synth_audio(3.3)  # 104 positions: several encoder chunks, windows crossed
    mel = ref.mel(ref.pad(audio))
    s = _session_with_taps(model, ref, mel)
    s.encode_available()
    while s.positions_encoded < len(mel) // MEL_FRAMES_PER_POSITION:
        s.next_pos = s.positions_encoded  # pretend the decoder consumed the ring
        s.encode_available()
    stem = np.concatenate(s.taps["conv_stem"])
    enc = np.concatenate(s.taps["encoder"])
    emb = np.concatenate(s.taps["adapter"])
    assert len(s.taps["encoder"]) > 1, "the test must cross encoder chunk boundaries"
    assert rel_err(stem, ref.conv_stem(mel)) < 2e-5
    assert rel_err(enc, ref.encoder(mel)) < 1e-4
    assert rel_err(emb, ref.audio_embeds(mel)) < 1e-4


def test_mel_matches_hf(tiny_model):
    from voxtral_wgpu._native import log_mel

    _, ref = tiny_model(TINY_SW)
    padded = ref.pad(synth_audio(2.0))
    assert np.abs(log_mel(padded) - ref.mel(padded)).max() < 1e-4


@pytest.mark.parametrize("spec,delay", [(TINY_SW, 480), (TINY_ODD, 160), (TINY_FULL, 1040)],
                         ids=["sw-480", "odd-160", "full-1040"])
def test_teacher_forced_logits_match_hf(tiny_model, spec, delay):
    model, ref = tiny_model(spec, delay)
    audio = synth_audio(2.0, seed=3)
    mel = ref.mel(ref.pad(audio))
    gen = ref.generate_full(audio)
    ids = gen.full_ids
    s = Session(model, ref.n_delay)
    s.push_mel(mel)
    ours = s.teacher_forced_logits(ids)
    theirs = ref.logits(ids, mel)[len(gen.prompt_ids) - 1: len(ids) - 1]
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < 1e-4
    np.testing.assert_allclose(model.ffn_norms(ref.n_delay)[0] is not None, True)


@pytest.mark.parametrize("spec", [TINY_SW, TINY_ODD], ids=["sw", "odd"])
def test_f16_kv_cache_close_to_hf(tiny_ref, gpu, spec):
    """``kv_cache="f16"`` on BF16 weights (the GGUF default): logits within f16 storage rounding of
    HF's, greedy ids equal up to a step whose HF margin f16 rounding can flip."""
    import voxtral_wgpu

    ref = tiny_ref(spec, 480)
    model = voxtral_wgpu.load(ref.out_dir, gpu=gpu, progress=False, kv_cache="f16")
    assert model.kv_cache == "f16"
    audio = synth_audio(2.0, seed=3)
    mel = ref.mel(ref.pad(audio))
    gen = ref.generate_full(audio)
    s = Session(model, ref.n_delay)
    assert s.enc.k_work.size < 4 * s.enc.cap * spec.enc_heads * spec.enc_head_dim  # really 16-bit
    s.push_mel(mel)
    ours = s.teacher_forced_logits(gen.full_ids)
    s.release()
    theirs = ref.logits(gen.full_ids, mel)[len(gen.prompt_ids) - 1: len(gen.full_ids) - 1]
    err = rel_err(ours, theirs)
    assert 1e-6 < err < 3e-3, err
    got = model.transcribe(audio).token_ids
    k = next((i for i, (a, b) in enumerate(zip(got, gen.ids)) if a != b), None)
    assert k is None or gen.margins[k] < 2e-2, (k, got, gen.ids)


def _assert_ids_match(ours: list[int], gen) -> None:
    """Equal ids, or equal up to a step whose HF margin is a near-tie (after which both diverge)."""
    if ours == gen.ids:
        return
    k = next((i for i, (a, b) in enumerate(zip(ours, gen.ids)) if a != b), min(len(ours), len(gen.ids)))
    assert k < len(gen.margins) and gen.margins[k] < MARGIN, (
        f"ids differ at step {k} where HF's top-2 margin is {gen.margins[k] if k < len(gen.margins) else None}:"
        f"\n ours {ours}\n   hf {gen.ids}")


@pytest.mark.parametrize("spec,delay", [(TINY_SW, 480), (TINY_FULL, 480), (TINY_SW, 80), (TINY_ODD, 2400),
                                        (TINY_ODD, 720)],
                         ids=["sw-480", "full-480", "sw-80", "odd-2400", "odd-720"])
def test_greedy_ids_match_hf_generate(tiny_model, spec, delay):
    model, ref = tiny_model(spec, delay)
    audio = synth_audio(1.5) if spec is not TINY_ODD else speechlike_audio(2.7, seed=5)
    gen = ref.generate_full(audio)
    tr = model.transcribe(audio, transcription_delay_ms=delay)
    _assert_ids_match(tr.token_ids, gen)
    assert tr.text == model.tokenizer.decode(tr.token_ids).strip()
    if tr.token_ids == gen.ids:
        assert tr.text == ref.decode(gen.ids).strip()


def test_delay_override_per_call_equals_model_default(tiny_model, tiny_ref):
    import voxtral_wgpu

    model, ref = tiny_model(TINY_SW, 480)
    audio = synth_audio(1.5, seed=11)
    other = tiny_ref(TINY_SW, 960)  # same weights, tekken.json says 960 ms
    m960 = voxtral_wgpu.load(other.out_dir, gpu=model.gpu, progress=False)
    assert m960.default_delay_ms == 960
    a = m960.transcribe(audio)
    b = model.transcribe(audio, transcription_delay_ms=960)
    assert a.token_ids == b.token_ids
    _assert_ids_match(a.token_ids, other.generate_full(audio))


def test_long_audio_crosses_chunks_and_windows(tiny_model):
    """Longer than the audio ring, the encoder chunk and both sliding windows; offline ids = HF."""
    model, ref = tiny_model(TINY_SW)
    audio = speechlike_audio(3.0 + MAX_CHUNK_POSITIONS * 0.08 * 2, seed=2)
    _assert_ids_match(model.transcribe(audio).token_ids, ref.generate_full(audio))


def test_stops_at_eos(gpu, tmp_path):
    import voxtral_wgpu

    audio = synth_audio(1.5, seed=4)
    ref = build_eos_model(TINY_SW, tmp_path, audio, eos_step=7)
    gen = ref.generate_full(audio)
    assert gen.eos and len(gen.ids) == 7
    model = voxtral_wgpu.load(tmp_path, gpu=gpu, progress=False)
    tr = model.transcribe(audio)
    assert tr.token_ids == gen.ids  # EOS excluded, nothing after it


def test_transcribe_file_equals_array(tiny_model, tmp_path):
    import soundfile as sf

    model, _ = tiny_model(TINY_SW)
    audio = synth_audio(1.2, seed=9)
    path = tmp_path / "a.wav"
    sf.write(path, audio, 16000, subtype="PCM_16")  # int16-grid audio survives exactly
    assert model.transcribe(str(path)).token_ids == model.transcribe(audio).token_ids


def test_empty_and_tiny_audio(tiny_model):
    model, ref = tiny_model(TINY_SW)
    for n in (0, 1, 1279, 1281):
        audio = synth_audio(1.0)[:n]
        _assert_ids_match(model.transcribe(audio).token_ids, ref.generate_full(audio))


def test_bad_audio_is_rejected(tiny_model, tmp_path):
    model, _ = tiny_model(TINY_SW)
    with pytest.raises(ValueError, match="NaN|non-finite|finite"):
        model.transcribe(np.array([0.0, np.nan, 0.1], np.float32))
    with pytest.raises(ValueError, match="mono|shape"):
        model.transcribe(np.zeros((100, 2), np.float32))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(ValueError, match="bad.wav"):
        model.transcribe(str(bad))
    with pytest.raises(FileNotFoundError):
        model.transcribe(str(tmp_path / "missing.flac"))
    with pytest.raises(ValueError, match="multiple of 80"):
        model.transcribe(np.zeros(100, np.float32), transcription_delay_ms=500)


def test_close_before_decoding_sizes_decoder_ring_once(tiny_model, gpu):
    """Offline sessions learn their length first: the decoder ring is allocated at its final size
    (never doubled, so the old and new rings are never held together) and ids are unchanged."""
    model, ref = tiny_model(TINY_FULL, 480)
    audio = synth_audio(2.0, seed=9)
    mel = ref.mel(ref.pad(audio))
    n_positions = len(mel) // MEL_FRAMES_PER_POSITION
    runs = {}
    for sized in (False, True):
        s = Session(model, ref.n_delay)
        s.stop_on_eos = False
        s.push_mel(mel)
        total = 700 if sized else None  # a long session's length, known up front
        if sized:
            s.close(total)
            assert s.dec.cap == 700 and s.dec.k_cache[0].size >= s.kv_bytes * 700 * TINY_FULL.dec_kv_heads * TINY_FULL.dec_head_dim
        before = gpu.bytes_allocated
        ids = s.decode()
        runs[sized] = (ids, s.dec.cap)
        assert gpu.bytes_allocated == before or not sized  # sized up front: nothing allocated while decoding
        s.release()
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) > 0
    assert runs[True][1] == 700 and runs[False][1] == 256  # the unsized one kept its initial ring
    assert n_positions < 256


def test_decode_without_waiting_gives_the_same_ids_later(tiny_model):
    """transcribe() feeds a file chunk by chunk with decode(wait=False), which returns before the
    GPU has run the chunk's steps: their ids come with later calls, the same ids in the same order."""
    model, ref = tiny_model(TINY_SW)
    audio = speechlike_audio(5.0, seed=5)
    mel = ref.mel(ref.pad(audio))
    n_positions = len(mel) // MEL_FRAMES_PER_POSITION
    chunk = MEL_FRAMES_PER_POSITION * 20
    runs = {}
    for wait in (True, False):
        s = Session(model, ref.n_delay)
        s.stop_on_eos = False
        s.close(n_positions)
        parts = []
        for i in range(0, len(mel), chunk):
            s.push_mel(mel[i:i + chunk])
            parts.append(s.decode(wait=wait))
        parts.append(s.decode())
        assert s.done
        runs[wait] = parts
        s.release()
    flat = {w: [t for part in parts for t in part] for w, parts in runs.items()}
    assert flat[False] == flat[True] == model.transcribe(audio, stop_on_eos=False).token_ids
    assert len(flat[True]) == n_positions - len(model.prompt(ref.n_delay))
    ahead = np.cumsum([len(p) for p in runs[True]])
    late = np.cumsum([len(p) for p in runs[False]])
    assert (late <= ahead).all() and (late < ahead).any()  # not waiting: ids arrive later, never earlier


@pytest.mark.parametrize("spec, seconds", [(TINY_FULL, 18.0), (TINY_SW, 8.0)])
def test_replayed_decode_steps_equal_the_op_by_op_graph(tiny_model, monkeypatch, spec, seconds):
    """Decode steps replayed from the first step's recording (model.STEP_REPLAY) give bit-identical
    caches and ids to running the ops one by one: across the decoder ring growing (256 -> 512 slots,
    a new recording), multi-chunk split-K attention (context > 256) with its value split changing from
    4 to 2 workgroups per (chunk, kv head) there, the ring and the token ring wrapping (small window;
    token ring shrunk to 128)."""
    import voxtral_wgpu.model as model_mod
    from voxtral_wgpu import ops

    model, ref = tiny_model(spec, 480)
    monkeypatch.setattr(model_mod, "TOKEN_RING", 128)
    monkeypatch.setattr(ops, "DECODE_SPLIT_GROUPS", 4 * spec.dec_kv_heads)
    mel = ref.mel(ref.pad(speechlike_audio(seconds, seed=5)))
    out = {}
    for replay in (False, True):
        monkeypatch.setattr(model_mod, "STEP_REPLAY", replay)
        s = Session(model, ref.n_delay)
        s.stop_on_eos = False
        s.push_mel(mel)  # not closed: the ring grows while decoding
        before = model.gpu.dispatch_count
        ids = s.decode()
        dispatches = model.gpu.dispatch_count - before
        caches = [model.gpu.read(b, np.uint8) for b in (s.dec.k_cache[-1], s.dec.v_cache[0], s.dec.tokens)]
        out[replay] = (ids, caches, dispatches, s.next_pos, s.dec.cap)
        s.release()
    (ids0, c0, n0, pos0, cap0), (ids1, c1, n1, pos1, cap1) = out[False], out[True]
    assert pos0 == pos1 > 128 and cap0 == cap1 and n0 == n1  # same positions, same dispatches
    if spec is TINY_FULL:
        assert pos1 > 256 and cap1 == 512  # grew past 256: re-recorded, and attention split over 2 chunks
    else:
        assert cap1 < pos1  # the decoder ring wrapped
    assert ids0 == ids1 and len(ids1) == pos1 - len(s.prompt_ids) + 1
    for a, b in zip(c0, c1):
        np.testing.assert_array_equal(a, b)

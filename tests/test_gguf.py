"""GGUF: the quantizer (bit-identical to gguf.quants), byte shards, the three loadable layouts, a
reader that fails cleanly on damaged files, and Q4_0 / Q8_0 transcription against HF transformers
running the same dequantised weights."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_reference import TINY_SW, load_native_state, synth_audio
from voxtral_wgpu.gguf_loader import GgufFile, load_gguf, resolve_config, resolve_tensors
from voxtral_wgpu.quantize import quantize
from voxtral_wgpu.weights import WeightsError

# TINY_SW with every matrix row a whole number of 32-weight blocks (dec_dim 80 -> 64)
SPEC = TINY_SW.replace(dec_dim=64)
LOGITS_TOL = 1e-4  # max |ours - HF| / max |HF| on the same dequantised weights (float32 both)
# the same with f16 KV caches (GGUF's default): each cached k/v carries up to 2^-11 relative rounding,
# measured 5.0e-4 on this model; ids may then differ only after a near-tie
LOGITS_TOL_KV16 = 3e-3
MARGIN_KV16 = 2e-2


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ref(tiny_ref):
    return tiny_ref(SPEC)


@pytest.fixture(scope="module")
def q4(ref, tmp_path_factory) -> Path:
    """Layout (a): our quantizer's Q4_0 file, with tekken.json beside it and no params.json."""
    d = tmp_path_factory.mktemp("q4")
    shutil.copy(ref.out_dir / "tekken.json", d)
    paths = quantize(ref.out_dir, d / "model.gguf", qtype="q4_0")
    assert paths == [d / "model.gguf"]
    return d / "model.gguf"


def dequantized_reference(gguf_path: Path, out_dir: Path, delay_ms: int = 480):
    """An HF model whose weights are the GGUF's dequantised values (a Reference like build_model's)."""
    from hf_reference import Reference, n_delay_tokens, native_to_hf_state, new_hf_model, write_tekken_for

    with GgufFile(gguf_path) as f:
        native = {name: f.read_f32(name) for name in f.tensors}
    model = new_hf_model(SPEC, n_delay_tokens(delay_ms))
    model.load_state_dict(native_to_hf_state(native, model, SPEC), strict=True)
    write_tekken_for(out_dir, SPEC.n_inner, delay_ms)
    return Reference(SPEC, model, Path(out_dir), delay_ms)


def snapshot(gpu, w) -> dict:
    """Every byte the loaded weights hold (GPU buffers read back, host arrays), by field path."""
    out = {}

    def put(key, x):
        if x is None:
            out[key] = None
        elif isinstance(x, np.ndarray):
            out[key] = (x.dtype.str, x.shape, x.tobytes())
        elif hasattr(x, "chunks"):
            out[key] = (x.dtype, x.n, x.k, [(r0, nr) for _, r0, nr in x.chunks])
            for i, (b, _, _) in enumerate(x.chunks):
                out[f"{key}[{i}]"] = gpu.read(b, np.uint8).tobytes()
            put(key + ".bias", x.bias)
        else:
            out[key] = gpu.read(x, np.uint8).tobytes()

    for fld in dataclasses.fields(w):
        v = getattr(w, fld.name)
        if fld.name in ("enc_layers", "dec_layers"):
            for i, layer in enumerate(v):
                for lf in dataclasses.fields(layer):
                    put(f"{fld.name}[{i}].{lf.name}", getattr(layer, lf.name))
        elif fld.name not in ("cfg", "nbytes", "source", "extra"):
            put(fld.name, v)
    return out


# ------------------------------------------------------------------------------------ quantizer
@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_quantizer_output_is_bit_identical_to_gguf_quants(ref, q4, tmp_path, qtype):
    import gguf

    path = q4 if qtype == "q4_0" else quantize(ref.out_dir, tmp_path / "m.gguf", qtype=qtype)[0]
    src = load_native_state(ref.out_dir)  # BF16 widened to f32, Mistral-native names
    rd = gguf.GGUFReader(path)
    qt = gguf.GGMLQuantizationType[qtype.upper()]
    assert {t.name for t in rd.tensors} == set(src)
    for t in rd.tensors:
        x = src[t.name]
        if x.ndim == 2:
            assert t.tensor_type == qt, t.name
            expect = gguf.quants.quantize(x, qt)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            expect = x
        assert [int(v) for v in reversed(t.shape)] == list(x.shape), t.name
        assert np.asarray(t.data).tobytes() == expect.tobytes(), t.name
    # our reader agrees with gguf's on every tensor and on the metadata we rely on
    with GgufFile(path) as f:
        for t in rd.tensors:
            assert f.read_raw(t.name).tobytes() == np.asarray(t.data).tobytes()
        assert f.metadata["general.architecture"] == "voxtral_realtime"
        assert f.metadata["voxtral_wgpu.quantization"] == qtype
        assert f.metadata["voxtral_wgpu.encoder.dim"] == SPEC.enc_dim
        assert f.metadata["voxtral_wgpu.decoder.sliding_window"] == SPEC.dec_window
        assert f.metadata["voxtral_wgpu.audio.transcription_delay_ms"] == 480
        assert json.loads(f.metadata["voxtral_wgpu.params_json"])["dim"] == SPEC.dec_dim


def test_shards_round_trip(gpu, ref, q4, tmp_path):
    shutil.copy(q4.parent / "tekken.json", tmp_path)
    parts = quantize(ref.out_dir, tmp_path / "model.gguf", shard_size="64KB")
    assert len(parts) > 2 and [p.name for p in parts] == [f"model.gguf.part-{i:03d}" for i in range(len(parts))]
    assert all(p.stat().st_size == 65536 for p in parts[:-1])
    assert b"".join(p.read_bytes() for p in parts) == q4.read_bytes()
    assert not (tmp_path / "model.gguf").exists()
    single, _ = load_gguf(gpu, q4, progress=False)
    for path in (parts[0], tmp_path / "model.gguf"):  # the first shard, or the stream's name
        sharded, tok = load_gguf(gpu, path, progress=False)
        assert tok == tmp_path / "tekken.json"
        assert sharded.extra["gguf_files"] == [str(p) for p in parts]
        assert snapshot(gpu, sharded) == snapshot(gpu, single)
    parts[1].unlink()  # a gap: a clear error, not a short read
    with pytest.raises(WeightsError, match="part-001"):
        load_gguf(gpu, parts[0], progress=False)


# ------------------------------------------------------------------------------------ layouts
_GGML_ENC = {"attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
             "attention.wq.bias": "attn_q.bias", "attention.wk.weight": "attn_k.weight",
             "attention.wv.weight": "attn_v.weight", "attention.wv.bias": "attn_v.bias",
             "attention.wo.weight": "attn_o.weight", "attention.wo.bias": "attn_o.bias",
             "ffn_norm.weight": "ffn_norm.weight", "feed_forward.w1.weight": "ffn_w1.weight",
             "feed_forward.w2.weight": "ffn_w2.weight", "feed_forward.w2.bias": "ffn_w2.bias",
             "feed_forward.w3.weight": "ffn_w3.weight"}
_GGML_DEC = {"attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
             "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
             "attention.wo.weight": "attn_o.weight", "ffn_norm.weight": "ffn_norm.weight",
             "feed_forward.w1.weight": "ffn_w1.weight", "feed_forward.w2.weight": "ffn_w2.weight",
             "feed_forward.w3.weight": "ffn_w3.weight", "ada_rms_norm_t_cond.0.weight": "ada0.weight",
             "ada_rms_norm_t_cond.2.weight": "ada2.weight"}


def ggml_name(native: str) -> str:
    """Mistral-native -> ggml-project (voxtral.cpp) tensor name."""
    enc = "mm_streams_embeddings.embedding_module.whisper_encoder."
    mm = "mm_streams_embeddings.embedding_module."
    if native.startswith(enc + "conv_layers."):
        i, rest = native[len(enc + "conv_layers."):].split(".conv.")
        return f"enc.conv{i}.{rest}"
    if native == enc + "transformer.norm.weight":
        return "enc.norm.weight"
    if native.startswith(enc + "transformer.layers."):
        i, rest = native[len(enc + "transformer.layers."):].split(".", 1)
        return f"enc.blk.{i}.{_GGML_ENC[rest]}"
    if native.startswith(mm + "audio_language_projection."):
        return "adapter." + native[len(mm + "audio_language_projection."):]
    if native == mm + "tok_embeddings.weight":
        return "tok_embeddings.weight"
    if native.startswith("layers."):
        i, rest = native[len("layers."):].split(".", 1)
        return f"dec.blk.{i}.{_GGML_DEC[rest]}"
    return native  # norm.weight


def rewrite(src: Path, dst: Path, *, rename=lambda n: n, small_type=lambda n, a: a, metadata=(), extra=(),
            drop=(), retype=None) -> Path:
    """Write ``src``'s tensors into a new GGUF: renamed, small tensors re-typed, quantised matrices
    copied block for block, chosen metadata only (the other projects' layouts)."""
    import gguf

    w = gguf.GGUFWriter(dst, arch="voxtral_realtime")
    for key, kind, v in metadata:
        getattr(w, f"add_{kind}")(key, v)
    with GgufFile(src) as f:
        for name, t in f.tensors.items():
            if name in drop:
                continue
            if retype and name in retype:
                qt = retype[name]
                w.add_tensor(rename(name), gguf.quants.quantize(f.read_f32(name), qt), raw_dtype=qt)
            elif t.type_name in ("Q4_0", "Q8_0"):
                raw = f.read_raw(name).reshape(t.shape[0], -1)
                w.add_tensor(rename(name), raw, raw_dtype=gguf.GGMLQuantizationType[t.type_name])
            else:
                w.add_tensor(rename(name), small_type(name, f.read_f32(name)))
    for name, arr in extra:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def f16_norms(name: str, a: np.ndarray) -> np.ndarray:
    """F16 for norm weights (exact for these bf16 values), F32 for the rest: the seed's mix."""
    if name.endswith("norm.weight"):
        h = a.astype(np.float16)
        assert np.array_equal(h.astype(np.float32), a)
        return h
    return a


def seed_layout(q4: Path, d: Path, **kw) -> Path:
    """Layout (b): native names, Q4_0 matrices, F16/F32 small tensors, no metadata, params.json beside."""
    d.mkdir(exist_ok=True)
    shutil.copy(q4.parent / "tekken.json", d)
    return rewrite(q4, d / "seed.gguf", small_type=f16_norms, **kw)


def ggml_layout(q4: Path, d: Path) -> Path:
    """Layout (c): voxtral.cpp names and voxtral.* metadata (int32 / float32, as it reads them)."""
    d.mkdir(exist_ok=True)
    shutil.copy(q4.parent / "tekken.json", d)
    meta = [("voxtral.vocab_size", "int32", SPEC.vocab), ("voxtral.audio.downsample_factor", "int32", 4),
            ("voxtral.ada_rms_norm_t_cond", "bool", True)]
    for sec, vals in (("encoder", dict(dim=SPEC.enc_dim, n_layers=SPEC.enc_layers, n_heads=SPEC.enc_heads,
                                       head_dim=SPEC.enc_head_dim, hidden_dim=SPEC.enc_hidden,
                                       n_kv_heads=SPEC.enc_heads)),
                      ("decoder", dict(dim=SPEC.dec_dim, n_layers=SPEC.dec_layers, n_heads=SPEC.dec_heads,
                                       head_dim=SPEC.dec_head_dim, hidden_dim=SPEC.dec_hidden,
                                       n_kv_heads=SPEC.dec_kv_heads))):
        meta += [(f"voxtral.{sec}.{k}", "int32", v) for k, v in vals.items()]
        meta += [(f"voxtral.{sec}.norm_eps", "float32", 1e-5), (f"voxtral.{sec}.rope_theta", "float32", 1e6)]
    meta.append(("voxtral.tokenizer.special_token_ranks", "array", [1, 2, 32, 33]))
    mel = np.zeros((201, 128), np.float32)
    return rewrite(q4, d / "ggml.gguf", rename=ggml_name, small_type=f16_norms, metadata=meta,
                   extra=[("audio.mel_filters", mel)])


def test_three_layouts_load_to_the_same_weights(gpu, ref, q4, tmp_path):
    ours, _ = load_gguf(gpu, q4, progress=False)
    assert ours.extra["gguf_layout"] == "voxtral_wgpu"
    b = seed_layout(q4, tmp_path / "b")
    shutil.copy(ref.out_dir / "params.json", tmp_path / "b")
    c = ggml_layout(q4, tmp_path / "c")
    shutil.copy(ref.out_dir / "params.json", tmp_path / "c")  # sliding windows: not in voxtral.* metadata
    want = snapshot(gpu, ours)
    for path, layout in ((b, "native"), (c, "ggml")):
        w, tok = load_gguf(gpu, path, progress=False)
        assert w.extra["gguf_layout"] == layout and tok == path.parent / "tekken.json"
        assert w.cfg == ours.cfg, layout
        assert snapshot(gpu, w) == want, layout
    # without params.json: the ggml metadata plus the published sliding windows
    (tmp_path / "c" / "params.json").unlink()
    w, _ = load_gguf(gpu, c, progress=False)
    assert w.cfg.encoder.sliding_window == 750 and w.cfg.decoder.sliding_window == 8192
    assert w.cfg.decoder.dim == SPEC.dec_dim and "GGUF metadata" in w.extra["config_source"]


def test_loader_errors_name_the_tensor_and_type(gpu, ref, q4, tmp_path):
    import gguf

    # no metadata and no params.json: the published hyper-parameters do not fit the tiny tensors
    b = seed_layout(q4, tmp_path / "b")
    with pytest.raises(WeightsError, match="published"):
        load_gguf(gpu, b, progress=False)
    shutil.copy(ref.out_dir / "params.json", tmp_path / "b")
    params = json.loads((ref.out_dir / "params.json").read_text())
    params["hidden_dim"] += 32
    (tmp_path / "b" / "params.json").write_text(json.dumps(params))
    with pytest.raises(WeightsError, match=r"layers\.0\.feed_forward\.w1\.weight.*shape"):
        load_gguf(gpu, b, progress=False)
    shutil.copy(ref.out_dir / "params.json", tmp_path / "b")

    miss = seed_layout(q4, tmp_path / "m", drop={"norm.weight"})
    shutil.copy(ref.out_dir / "params.json", tmp_path / "m")
    with pytest.raises(WeightsError, match="missing tensor 'norm.weight'"):
        load_gguf(gpu, miss, progress=False)

    wq = "layers.1.attention.wq.weight"
    bad = seed_layout(q4, tmp_path / "t", retype={wq: gguf.GGMLQuantizationType.Q5_0})
    shutil.copy(ref.out_dir / "params.json", tmp_path / "t")
    with pytest.raises(WeightsError, match=rf"{wq}.*Q5_0"):
        load_gguf(gpu, bad, progress=False)

    (tmp_path / "b" / "tekken.json").unlink()
    with pytest.raises(FileNotFoundError, match="tekken.json"):
        load_gguf(gpu, b, progress=False)
    w, tok = load_gguf(gpu, b, tokenizer=q4.parent / "tekken.json", progress=False)
    assert tok == q4.parent / "tekken.json"
    with pytest.raises(FileNotFoundError):
        load_gguf(gpu, tmp_path / "nothing.gguf", progress=False)


# ------------------------------------------------------------------------------------ damaged files
def _open_everything(path: Path) -> None:
    """Everything the loader does before the GPU: parse, hyper-parameters, names, every tensor read."""
    with GgufFile(path) as f:
        cfg, source = resolve_config(f, None)
        try:
            resolve_tensors(f, cfg, source)
        except WeightsError:
            pass
        for name in f.tensors:
            f.read_raw(name)
            if f.tensors[name].nbytes < (1 << 16):
                f.read_f32(name)


_HEADER = {}


def _header_end(q4: Path) -> int:
    if q4 not in _HEADER:
        with GgufFile(q4) as f:
            _HEADER[q4] = f.data_start
    return _HEADER[q4]


@st.composite
def damage(draw, size: int, header: int):
    kind = draw(st.sampled_from(["truncate", "bytes", "u64"]))
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, size - 1)))
    pos = draw(st.integers(0, header - 1))
    if kind == "bytes":
        return ("bytes", pos, draw(st.binary(min_size=1, max_size=8)))
    v = draw(st.sampled_from([2**64 - 1, 2**63, 2**32, 2**32 - 1, 2**31, 10**12, 0, 1, 5]))
    return ("u64", pos, v.to_bytes(8, "little"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_raise_clear_errors(q4, tmp_path, data):
    good = q4.read_bytes()
    d = data.draw(damage(len(good), _header_end(q4)))
    buf = bytearray(good)
    if d[0] == "truncate":
        buf = buf[: d[1]]
    else:
        buf[d[1]: d[1] + len(d[2])] = d[2]
        buf = buf[: len(good)]
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(buf))
    tracemalloc.start()
    try:
        _open_everything(path)
    except WeightsError as e:
        assert "damaged.gguf" in str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 32 * len(good) + (8 << 20), f"{peak} bytes allocated for a {len(good)}-byte file"


def test_truncated_tensor_is_named(q4, tmp_path):
    with GgufFile(q4) as f:
        last = max(f.tensors.values(), key=lambda t: t.offset)
    path = tmp_path / "cut.gguf"
    path.write_bytes(q4.read_bytes()[: last.offset + last.nbytes - 1])
    with pytest.raises(WeightsError, match=rf"cut\.gguf.*{last.name}.*truncated"):
        GgufFile(path)


# ------------------------------------------------------------------------------------ transcription
def _teacher_forced(model, ref, ids, mel):
    from voxtral_wgpu.model import Session

    s = Session(model, ref.n_delay)
    s.push_mel(mel)
    return s.teacher_forced_logits(ids)


def test_q4_transcription_matches_hf_on_dequantised_weights(gpu, q4, tmp_path, monkeypatch):
    import voxtral_wgpu

    hf = dequantized_reference(q4, tmp_path / "hf")
    audio = synth_audio(1.5)
    mel = hf.mel(hf.pad(audio))
    gen = hf.generate_full(audio)
    models = {}
    # input embeddings: GPU gather / C-extension dequant (browser style); KV caches f32 / f16 (default)
    for emb, kv in (("gpu", "f32"), ("cpu", "f32"), ("gpu", None)):
        monkeypatch.setenv("VOXTRAL_WGPU_EMBEDDINGS", emb)
        models[emb, kv] = voxtral_wgpu.load(q4, gpu=gpu, progress=False, kv_cache=kv)
    monkeypatch.delenv("VOXTRAL_WGPU_EMBEDDINGS")
    assert models["cpu", "f32"].weights.extra["embeddings"] == "cpu"
    assert models["gpu", None].kv_cache == "f16" and models["gpu", "f32"].kv_cache == "f32"
    ids = {key: m.transcribe(audio).token_ids for key, m in models.items()}
    assert ids["gpu", "f32"] == gen.ids, (ids["gpu", "f32"], gen.ids)
    assert ids["cpu", "f32"] == ids["gpu", "f32"]
    theirs = hf.logits(gen.full_ids, mel)[len(gen.prompt_ids) - 1: len(gen.full_ids) - 1]
    ours = {key: _teacher_forced(m, hf, gen.full_ids, mel) for key, m in models.items()}
    err = rel_err(ours["gpu", "f32"], theirs)
    err16 = rel_err(ours["gpu", None], theirs)
    print(f"Q4_0 teacher-forced logits: max |diff| {np.abs(ours['gpu', 'f32'] - theirs).max():.3g}, "
          f"relative {err:.3g} (f16 KV: {err16:.3g}); {len(gen.ids)} greedy ids equal")
    assert err < LOGITS_TOL
    assert np.array_equal(ours["cpu", "f32"], ours["gpu", "f32"])  # CPU dequant == GPU gather, bit for bit
    assert 0 < err16 < LOGITS_TOL_KV16  # f16 storage really is in use, and costs little
    k = next((i for i, (a, b) in enumerate(zip(ids["gpu", None], gen.ids)) if a != b), None)
    assert k is None or gen.margins[k] < MARGIN_KV16, (k, ids["gpu", None], gen.ids)


def test_q8_logits_match_hf_on_dequantised_weights(gpu, ref, q4, tmp_path):
    import voxtral_wgpu

    shutil.copy(q4.parent / "tekken.json", tmp_path)
    path = quantize(ref.out_dir, tmp_path / "q8.gguf", qtype="q8_0")[0]
    hf = dequantized_reference(path, tmp_path / "hf")
    audio = synth_audio(1.2, seed=5)
    mel = hf.mel(hf.pad(audio))
    gen = hf.generate_full(audio)
    model = voxtral_wgpu.load(path, gpu=gpu, progress=False, kv_cache="f32")
    ours = _teacher_forced(model, hf, gen.full_ids, mel)
    theirs = hf.logits(gen.full_ids, mel)[len(gen.prompt_ids) - 1: len(gen.full_ids) - 1]
    assert rel_err(ours, theirs) < LOGITS_TOL


def test_cli_embeddings_and_kv_cache_flags(gpu, ref, q4, tmp_path, capsys):
    """``--embeddings cpu --kv-cache f32`` reach load(): the CLI's ids equal the API's with the same
    settings; ``--embeddings cpu`` on a BF16 checkpoint is a clear error."""
    import soundfile as sf

    import voxtral_wgpu
    from voxtral_wgpu.cli import main

    audio = synth_audio(1.2, seed=4)
    wav = tmp_path / "clip.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")
    assert main(["transcribe", str(wav), "--model", str(q4), "--embeddings", "cpu", "--kv-cache", "f32",
                 "-f", "json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    want = voxtral_wgpu.load(q4, gpu=gpu, progress=False, embeddings="cpu", kv_cache="f32").transcribe(audio)
    assert doc["token_ids"] == want.token_ids and len(want.token_ids) > 0
    assert main(["transcribe", str(wav), "--model", str(ref.out_dir), "--embeddings", "cpu"]) == 2
    assert "GGUF models only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kv_cache must be one of f32, f16"):
        voxtral_wgpu.load(q4, gpu=gpu, progress=False, kv_cache="bf16")

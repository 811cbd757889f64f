"""Loading Mistral-native checkpoints: clear errors for every kind of bad model directory, the HF
cache layout, and the CLI on a tiny model."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest

from hf_reference import TINY_SW, synth_audio

ENC = "mm_streams_embeddings.embedding_module.whisper_encoder"


def _copy_model(ref, tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(ref.out_dir, d)
    return d


def _rewrite_safetensors(path, edit):
    """Load the raw header+tensors, apply ``edit(header: dict, blobs: dict)``, write back."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    data = raw[8 + n:]
    blobs = {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in header.items()}
    edit(header, blobs)
    out, off = {}, 0
    for k, v in header.items():
        b = blobs[k]
        out[k] = {"dtype": v["dtype"], "shape": v["shape"], "data_offsets": [off, off + len(b)]}
        off += len(b)
    if meta is not None:
        out["__metadata__"] = meta
    h = json.dumps(out).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs[k] for k in header))


@pytest.fixture(scope="module")
def ref(tiny_ref):
    return tiny_ref(TINY_SW)


def _load(d, gpu):
    import voxtral_wgpu

    return voxtral_wgpu.load(d, gpu=gpu, progress=False)


def test_missing_tensor_is_named(ref, tmp_path, gpu):
    from voxtral_wgpu.weights import WeightsError

    d = _copy_model(ref, tmp_path)
    name = "layers.1.feed_forward.w3.weight"
    _rewrite_safetensors(d / "consolidated.safetensors", lambda h, b: (h.pop(name), b.pop(name)))
    with pytest.raises(WeightsError, match="missing tensor 'layers.1.feed_forward.w3.weight'"):
        _load(d, gpu)


def test_unexpected_tensor_is_named(ref, tmp_path, gpu):
    from voxtral_wgpu.weights import WeightsError

    d = _copy_model(ref, tmp_path)

    def add(h, b):
        h["layers.7.extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        b["layers.7.extra.weight"] = bytes(8)

    _rewrite_safetensors(d / "consolidated.safetensors", add)
    with pytest.raises(WeightsError, match="layers.7.extra.weight"):
        _load(d, gpu)


def test_wrong_shape_and_dtype_are_named(ref, tmp_path, gpu):
    from voxtral_wgpu.weights import WeightsError

    d = _copy_model(ref, tmp_path, "shape")
    name = f"{ENC}.transformer.layers.0.attention.wq.bias"

    def reshape(h, b):
        h[name]["shape"] = [h[name]["shape"][0] // 2]
        b[name] = b[name][: len(b[name]) // 2]

    _rewrite_safetensors(d / "consolidated.safetensors", reshape)
    with pytest.raises(WeightsError, match=r"wq.bias' has shape \[64\], params.json implies \[128\]"):
        _load(d, gpu)

    d = _copy_model(ref, tmp_path, "dtype")

    def to_i32(h, b):
        h["norm.weight"]["dtype"] = "I32"
        b["norm.weight"] = bytes(len(b["norm.weight"]) * 2)

    _rewrite_safetensors(d / "consolidated.safetensors", to_i32)
    with pytest.raises(WeightsError, match="'norm.weight' has dtype I32"):
        _load(d, gpu)


def test_params_json_disagreeing_with_tensors(ref, tmp_path, gpu):
    from voxtral_wgpu.weights import WeightsError

    d = _copy_model(ref, tmp_path)
    p = json.loads((d / "params.json").read_text())
    p["hidden_dim"] += 8
    (d / "params.json").write_text(json.dumps(p))
    with pytest.raises(WeightsError, match="params.json implies"):
        _load(d, gpu)
    p.pop("dim")
    (d / "params.json").write_text(json.dumps(p))
    with pytest.raises(ValueError, match="params.json: missing key 'dim'"):
        _load(d, gpu)
    (d / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        _load(d, gpu)


def test_missing_files(ref, tmp_path, gpu):
    d = _copy_model(ref, tmp_path, "notok")
    (d / "tekken.json").unlink()
    with pytest.raises(FileNotFoundError, match="tekken.json"):
        _load(d, gpu)
    d = _copy_model(ref, tmp_path, "noweights")
    (d / "consolidated.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="consolidated.safetensors"):
        _load(d, gpu)
    d = _copy_model(ref, tmp_path, "noparams")
    (d / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        _load(d, gpu)
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "nowhere", gpu)


@pytest.mark.parametrize("cut", [4, 20, 1000, -7])
def test_truncated_or_corrupt_safetensors(ref, tmp_path, gpu, cut):
    from voxtral_wgpu.weights import WeightsError

    d = _copy_model(ref, tmp_path)
    f = d / "consolidated.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:cut])
    with pytest.raises(WeightsError, match="consolidated.safetensors"):
        _load(d, gpu)


def test_corrupt_header(ref, tmp_path, gpu):
    from voxtral_wgpu.weights import WeightsError

    d = _copy_model(ref, tmp_path)
    f = d / "consolidated.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:12] = b"\xff\xfe{["
    f.write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        _load(d, gpu)
    f.write_bytes(struct.pack("<Q", 1 << 40) + bytes(raw[8:]))
    with pytest.raises(WeightsError, match="corrupt safetensors header"):
        _load(d, gpu)


def test_loads_from_hf_cache_layout(ref, tmp_path, gpu, monkeypatch):
    """A repo id resolves through the local Hugging Face cache (nothing is downloaded)."""
    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny-voxtral" / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    for f in ("params.json", "consolidated.safetensors", "tekken.json"):
        shutil.copy(ref.out_dir / f, snap / f)
    (cache / "models--someorg--tiny-voxtral" / "refs").mkdir()
    (cache / "models--someorg--tiny-voxtral" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    m = _load("someorg/tiny-voxtral", gpu)
    assert m.cfg.decoder.dim == TINY_SW.dec_dim
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        _load("someorg/not-there", gpu)


@pytest.mark.gpu
def test_cli_transcribe_json_and_txt(ref, tmp_path):
    import soundfile as sf

    audio = synth_audio(1.2, seed=21)
    wav = tmp_path / "clip.wav"
    sf.write(wav, audio, 16000, subtype="PCM_16")
    out = subprocess.run([sys.executable, "-m", "voxtral_wgpu", "transcribe", str(wav), "--model", str(ref.out_dir),
                          "--output-format", "json", "--no-progress"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)  # not the repo root: the installed package must be the one imported
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    gen = ref.generate_full(audio)
    assert doc["token_ids"] == gen.ids
    assert doc["text"] == ref.decode(gen.ids).strip()
    bad = subprocess.run([sys.executable, "-m", "voxtral_wgpu", "transcribe", str(tmp_path / "none.wav"), "--model",
                          str(ref.out_dir)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode != 0 and "none.wav" in bad.stderr
    nomodel = subprocess.run([sys.executable, "-m", "voxtral_wgpu", "transcribe", str(wav), "--model",
                              str(tmp_path / "nomodel")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert nomodel.returncode == 2 and "does not exist" in nomodel.stderr

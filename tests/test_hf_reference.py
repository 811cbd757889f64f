"""Tests of the HF reference oracle helper (tests/hf_reference.py) itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mistral_common")

import hf_reference as H  # noqa: E402

AUDIO_S = 1.5


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    cache = {}

    def get(spec=H.TINY_SW, delay_ms=480):
        key = (spec, delay_ms)
        if key not in cache:
            cache[key] = H.build_model(spec, tmp_path_factory.mktemp("ref"), delay_ms=delay_ms)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def audio():
    return H.synth_audio(AUDIO_S)


# ----------------------------------------------------------------------------- pure helpers

def test_synth_audio_int16_grid_and_deterministic():
    a = H.synth_audio(AUDIO_S)
    assert a.dtype == np.float32 and a.shape == (24000,)
    assert np.array_equal(a, H.synth_audio(AUDIO_S))
    assert np.array_equal(np.round(a.astype(np.float64) * 32768), a.astype(np.float64) * 32768)
    s = H.speechlike_audio(3.0, seed=0)
    assert s.shape == (48000,) and np.array_equal(s, H.speechlike_audio(3.0, seed=0))
    assert np.array_equal(np.round(s.astype(np.float64) * 32768), s.astype(np.float64) * 32768)
    assert np.all(s[-int(0.8 * 16000):] == 0) and np.abs(s).max() > 0.1


def test_padding_arithmetic_matches_mistral_common():
    from mistral_common.tokens.tokenizers.audio import AudioConfig, AudioSpectrogramConfig, AudioEncoder, \
        SpecialAudioIDs

    for delay in (80, 160, 480, 960, 2400):
        cfg = AudioConfig(sampling_rate=16000, frame_rate=12.5,
                          encoding_config=AudioSpectrogramConfig(num_mel_bins=128, hop_length=160, window_size=400),
                          transcription_format="streaming", transcription_delay_ms=delay,
                          streaming_look_ahead_ms=2.5, streaming_look_back_ms=52.5, streaming_n_left_pad_tokens=32)
        ae = AudioEncoder(cfg, SpecialAudioIDs(None, None, 32, None, None))
        assert cfg.get_num_delay_tokens() == H.n_delay_tokens(delay) == delay // 80
        for n in (0, 1, 1279, 1280, 1281, 24000, 24001):
            assert tuple(ae._get_streaming_pad(n)) == H.streaming_pad_amounts(n, delay)


# ----------------------------------------------------------------------------- checkpoint

def test_native_checkpoint_layout(refs):
    ref = refs()
    spec = ref.spec
    st = H.load_native_state(ref.out_dir)
    assert all(v.dtype == np.float32 for v in st.values())
    n_expected = (13 * spec.enc_layers + 4 + 1) + 2 + 1 + (11 * spec.dec_layers + 1)
    assert len(st) == n_expected
    hdr_len = int.from_bytes((ref.out_dir / "consolidated.safetensors").read_bytes()[:8], "little")
    hdr = json.loads((ref.out_dir / "consolidated.safetensors").read_bytes()[8:8 + hdr_len])
    assert {v["dtype"] for k, v in hdr.items() if k != "__metadata__"} == {"BF16"}
    E = H.ENC
    assert st[f"{E}.transformer.layers.0.attention.wq.weight"].shape == (spec.enc_heads * spec.enc_head_dim,
                                                                       spec.enc_dim)
    assert f"{E}.transformer.layers.0.attention.wq.bias" in st
    assert f"{E}.transformer.layers.0.attention.wk.bias" not in st
    assert st["layers.0.attention.wk.weight"].shape == (spec.dec_kv_heads * spec.dec_head_dim, spec.dec_dim)
    assert st["layers.0.ada_rms_norm_t_cond.0.weight"].shape == (32, spec.dec_dim)
    assert st[f"{H.MM}.tok_embeddings.weight"].shape == (spec.vocab, spec.dec_dim)
    assert "output.weight" not in st

    P = json.loads((ref.out_dir / "params.json").read_text())
    ea = P["multimodal"]["whisper_model_args"]["encoder_args"]
    assert (P["dim"], P["n_layers"], P["n_heads"], P["n_kv_heads"], P["head_dim"], P["hidden_dim"]) == (
        spec.dec_dim, spec.dec_layers, spec.dec_heads, spec.dec_kv_heads, spec.dec_head_dim, spec.dec_hidden)
    assert P["sliding_window"] == spec.dec_window and ea["sliding_window"] == spec.enc_window
    assert P["rope_theta"] == ea["rope_theta"] == 1e6
    assert P["tied_embeddings"] is True and P["ada_rms_norm_t_cond"] is True and P["ada_rms_norm_t_cond_dim"] == 32
    assert P["vocab_size"] == spec.vocab
    assert ea["audio_encoding_args"]["num_mel_bins"] == 128
    assert P["multimodal"]["whisper_model_args"]["downsample_args"] == {"downsample_factor": 4}
    tk = json.loads((ref.out_dir / "tekken.json").read_text())
    assert tk["audio"]["transcription_delay_ms"] == 480
    assert tk["config"]["default_vocab_size"] == spec.vocab


@pytest.mark.parametrize("spec", [
    H.TINY_SW,
    # GQA 4:1, head_dim 16, odd-ish widths
    H.TinySpec(enc_dim=72, enc_heads=8, enc_head_dim=16, enc_hidden=88, enc_window=33,
               dec_dim=72, dec_heads=8, dec_kv_heads=2, dec_head_dim=16, dec_hidden=136, dec_window=11, seed=7),
    # head_dim 64, single decoder KV head, 1 layer each
    H.TinySpec(enc_layers=1, enc_heads=2, enc_head_dim=64, dec_layers=1, dec_heads=2, dec_kv_heads=1,
               dec_head_dim=64, n_inner=300, seed=5),
], ids=["tiny_sw", "gqa4_hd16", "hd64_kv1"])
def test_mistral_file_roundtrip_exact(refs, audio, spec):
    """BF16 Mistral file -> un-permute -> fresh HF model: identical weights and logits."""
    ref = refs(spec)
    st = H.load_native_state(ref.out_dir)
    fresh = H.new_hf_model(spec, ref.n_delay)
    sd = H.native_to_hf_state(st, fresh)
    fresh.load_state_dict(sd, strict=True)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.lm_head.weight.data_ptr() == fresh.model.language_model.embed_tokens.weight.data_ptr()
    mel = ref.mel(ref.pad(audio))
    ids = ref.prompt_ids() + ref.generate(audio)
    want = ref.logits(ids, mel)
    m = ref._mel_t(mel)[..., : len(ids) * 8]
    with torch.no_grad():
        got = fresh(input_ids=torch.tensor([ids]), input_features=m, num_delay_tokens=ref.n_delay).logits[0]
    assert np.array_equal(got.numpy(), want)


# ----------------------------------------------------------------------------- features / shapes

def test_mel_silence(refs):
    mel = refs().mel(np.zeros(12800, np.float32))
    assert mel.shape == (80, 128)
    np.testing.assert_allclose(mel, -0.625, atol=1e-7)


def test_stage_shapes_1p5s(refs, audio):
    ref = refs()
    s = ref.spec
    padded = ref.pad(audio)
    assert padded.shape == (40960 + 24000 + 1280 - 24000 % 1280 + 17 * 1280,) == (87040,)
    assert np.all(padded[:40960] == 0) and np.array_equal(padded[40960:64960], audio) and np.all(padded[64960:] == 0)
    T = padded.shape[0] // 160
    mel = ref.mel(padded)
    assert mel.shape == (T, 128) == (544, 128) and mel.dtype == np.float32
    stem = ref.conv_stem(mel)
    enc = ref.encoder(mel)
    layers = ref.encoder_layers(mel)
    assert stem.shape == enc.shape == (T // 2, s.enc_dim)
    assert len(layers) == s.enc_layers and all(x.shape == (T // 2, s.enc_dim) for x in layers)
    ad = ref.adapter(enc)
    assert ad.shape == (T // 8, s.dec_dim) == (68, s.dec_dim)
    np.testing.assert_allclose(ref.audio_embeds(mel), ad, atol=1e-6)
    assert ref.t_cond().shape == (s.dec_dim,)
    assert ref.ada_scales().shape == (s.dec_layers, s.dec_dim)
    ids = ref.prompt_ids() + [32] * (T // 8 - len(ref.prompt_ids()))
    assert ref.logits(ids, mel).shape == (T // 8, s.vocab)
    assert ref.final_hidden(ids, mel).shape == (T // 8, s.dec_dim)
    dl = ref.decoder_layers(ids, mel)
    assert len(dl) == s.dec_layers and all(x.shape == (T // 8, s.dec_dim) for x in dl)
    assert all(np.isfinite(x).all() for x in [mel, stem, enc, ad, *layers, *dl])


# ----------------------------------------------------------------------------- delays / generation

CANONICAL_NAMES = {3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
                   7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>",
                   12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]",
                   17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 24: "[AUDIO]",
                   25: "[BEGIN_AUDIO]", 34: "[TRANSCRIBE]", 35: "[ARGS]", 36: "[CALL_ID]"}


@pytest.mark.parametrize("delay_ms", [80, 480, 2400])
def test_prompt_and_generate_for_delay(refs, audio, tmp_path, delay_ms):
    """Prompt = [BOS] + [PAD]*(32+n); HF generate honours num_delay_tokens for any delay; the HF
    processor (from a tekken.json with that delay) derives the same prompt, delay and mel."""
    ref = refs(H.TINY_SW, delay_ms)
    n = delay_ms // 80
    assert ref.n_delay == n
    assert ref.prompt_ids() == [1] + [32] * (32 + n)
    assert ref.pad(audio).shape[0] == 40960 + 24000 + 1280 - 24000 % 1280 + (n + 11) * 1280
    # a wrong config default must not matter: num_delay_tokens is passed explicitly everywhere
    ref.model.config.default_num_delay_tokens = 99
    try:
        g = ref.generate_full(audio)
    finally:
        ref.model.config.default_num_delay_tokens = n
    mel = ref.mel(ref.pad(audio))
    P = len(g.prompt_ids)
    assert P == 33 + n and g.n_positions == mel.shape[0] // 8
    assert not g.eos and len(g.ids) == g.n_positions - P == 29  # 19 audio tokens + 10 buffer
    assert g.logits.shape == (29, ref.spec.vocab) and g.margins.shape == (29,)
    tf = ref.logits(g.full_ids, mel)[P - 1: P - 1 + len(g.ids)]
    np.testing.assert_allclose(tf, g.logits, atol=2e-5)
    sure = g.margins > 1e-3
    assert np.array_equal(tf.argmax(1)[sure], np.array(g.ids)[sure])
    assert isinstance(ref.decode(g.ids), str)

    if delay_ms != 480:
        from transformers import MistralCommonBackend, VoxtralRealtimeFeatureExtractor, VoxtralRealtimeProcessor

        tk = json.loads((ref.out_dir / "tekken.json").read_text())
        for st in tk["special_tokens"]:  # instruct tokenizers need these control tokens named
            st["token_str"] = CANONICAL_NAMES.get(st["rank"], st["token_str"])
        (tmp_path / "tekken.json").write_text(json.dumps(tk))
        proc = VoxtralRealtimeProcessor(VoxtralRealtimeFeatureExtractor(),
                                        MistralCommonBackend.from_pretrained(str(tmp_path)))
        inp = proc(audio, return_tensors="pt")  # int16-grid audio survives the processor's WAV trip
        assert inp["input_ids"][0].tolist() == ref.prompt_ids()
        assert int(inp["num_delay_tokens"]) == n
        assert np.array_equal(inp["input_features"][0].T.numpy(), mel)


@pytest.mark.parametrize("spec", [H.TINY_SW, H.TINY_FULL], ids=["tiny_sw", "tiny_full"])
def test_generate_known_ids(refs, audio, spec):
    """Pinned greedy ids at 480 ms (identical to the shared oracle's run_oracle.py output)."""
    g = refs(spec).generate_full(audio)
    want = {
        H.TINY_SW: [1430] * 4 + [1805] * 8 + [1406] + [1371] * 5 + [127] * 2 + [1555] * 8 + [997],
        H.TINY_FULL: [502] * 4 + [1371] * 4 + [1430] * 21,
    }[spec]
    assert g.ids == want
    assert g.margins.min() > 0.01


def test_eos_model(tmp_path):
    a = H.speechlike_audio(3.0, seed=0)
    ref = H.build_eos_model(H.TINY_SW, tmp_path, a, eos_step=20)
    g = ref.generate_full(a)
    assert g.eos and len(g.ids) == 20 and H.EOS not in g.ids
    assert g.logits.shape[0] == 21 and g.logits[-1].argmax() == H.EOS
    assert g.full_ids[-1] == H.EOS and len(g.full_ids) == len(g.prompt_ids) + 21
    mel = ref.mel(ref.pad(a))
    P = len(g.prompt_ids)
    tf = ref.logits(g.full_ids, mel)[P - 1: P - 1 + 21]
    np.testing.assert_allclose(tf, g.logits, atol=2e-5)
    # the written checkpoint holds the modified EOS row
    st = H.load_native_state(tmp_path)
    assert np.array_equal(st[f"{H.MM}.tok_embeddings.weight"][H.EOS],
                          ref.model.model.language_model.embed_tokens.weight[H.EOS].detach().numpy())


# ----------------------------------------------------------------------------- independent float64 check

def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_interleaved(x, theta=1e6):
    """x [T, H, hd]; rotate pairs (x[2i], x[2i+1]) by angle pos * theta^(-2i/hd)."""
    T, _, hd = x.shape
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * c - b * s, a * s + b * c], -1).reshape(x.shape)


def _attn(x, W, p, nh, nkv, hd, window, bias):
    T = x.shape[0]
    q = x @ W[p + "wq.weight"].T + (W[p + "wq.bias"] if bias else 0)
    k = x @ W[p + "wk.weight"].T
    v = x @ W[p + "wv.weight"].T + (W[p + "wv.bias"] if bias else 0)
    q = _rope_interleaved(q.reshape(T, nh, hd))
    k = _rope_interleaved(k.reshape(T, nkv, hd))
    v = v.reshape(T, nkv, hd)
    grp = torch.arange(nh) // (nh // nkv)  # query head h -> kv head h // group
    sc = torch.einsum("ihd,jhd->hij", q, k[:, grp]) / math.sqrt(hd)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    sc = sc.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    o = torch.einsum("hij,jhd->ihd", sc.softmax(-1), v[:, grp]).reshape(T, nh * hd)
    return o @ W[p + "wo.weight"].T + (W[p + "wo.bias"] if bias else 0)


def _ffn(x, W, p, bias):
    h = torch.nn.functional.silu(x @ W[p + "w1.weight"].T) * (x @ W[p + "w3.weight"].T)
    return h @ W[p + "w2.weight"].T + (W[p + "w2.bias"] if bias else 0)


def native_f64_forward(out_dir, mel, ids, n_delay):
    """Independent float64 model reading only params.json + consolidated.safetensors (interleaved RoPE)."""
    F = torch.nn.functional
    P = json.loads((out_dir / "params.json").read_text())
    ea = P["multimodal"]["whisper_model_args"]["encoder_args"]
    W = {k: torch.from_numpy(v).double() for k, v in H.load_native_state(out_dir).items()}
    E, M = H.ENC, H.MM
    x = torch.from_numpy(mel).double().T[None]
    x = F.gelu(F.conv1d(F.pad(x, (2, 0)), W[f"{E}.conv_layers.0.conv.weight"], W[f"{E}.conv_layers.0.conv.bias"]))
    x = F.gelu(F.conv1d(F.pad(x, (1, 0)), W[f"{E}.conv_layers.1.conv.weight"], W[f"{E}.conv_layers.1.conv.bias"],
                        stride=2))[0].T
    for i in range(ea["n_layers"]):
        p = f"{E}.transformer.layers.{i}."
        x = x + _attn(_rms(x, W[p + "attention_norm.weight"]), W, p + "attention.", ea["n_heads"], ea["n_heads"],
                      ea["head_dim"], ea["sliding_window"], True)
        x = x + _ffn(_rms(x, W[p + "ffn_norm.weight"]), W, p + "feed_forward.", True)
    enc = _rms(x, W[f"{E}.transformer.norm.weight"])
    a = enc.reshape(-1, enc.shape[1] * 4)
    aud = F.gelu(a @ W[f"{M}.audio_language_projection.0.weight"].T) @ W[f"{M}.audio_language_projection.2.weight"].T
    emb = W[f"{M}.tok_embeddings.weight"]
    h = emb[torch.tensor(ids)] + aud[: len(ids)]
    D = P["dim"]
    inv = torch.exp(-math.log(10000.0) * torch.arange(D // 2, dtype=torch.float64) / (D // 2))
    t_cond = torch.cat([(n_delay * inv).cos(), (n_delay * inv).sin()])
    for i in range(P["n_layers"]):
        p = f"layers.{i}."
        h = h + _attn(_rms(h, W[p + "attention_norm.weight"]), W, p + "attention.", P["n_heads"], P["n_kv_heads"],
                      P["head_dim"], P["sliding_window"], False)
        scale = 1 + F.gelu(t_cond @ W[p + "ada_rms_norm_t_cond.0.weight"].T) @ W[p + "ada_rms_norm_t_cond.2.weight"].T
        h = h + _ffn(_rms(h, W[p + "ffn_norm.weight"]) * scale, W, p + "feed_forward.", False)
    logits = _rms(h, W["norm.weight"]) @ emb.T
    return enc.numpy(), aud.numpy(), logits.numpy()


@pytest.mark.parametrize("spec", [H.TINY_SW, H.TinySpec(dec_heads=8, dec_kv_heads=2, dec_head_dim=16, seed=3)],
                         ids=["tiny_sw", "gqa4"])
def test_independent_float64_reference(refs, audio, spec):
    """Guards the name map, the q/k interleave permutation and the sliding windows in both stacks."""
    ref = refs(spec)
    mel = ref.mel(ref.pad(audio))
    ids = ref.prompt_ids() + ref.generate(audio)
    enc, aud, lg = native_f64_forward(ref.out_dir, mel, ids, ref.n_delay)
    np.testing.assert_allclose(ref.encoder(mel), enc, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ref.adapter(ref.encoder(mel)), aud, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ref.logits(ids, mel), lg, atol=1e-4, rtol=0)

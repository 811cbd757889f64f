"""voxtral_wgpu.tokenizer against mistral-common's own Tekkenizer on a realistic fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from tekken_fixture import build_tekken, write_tekken

from voxtral_wgpu.tokenizer import AudioConfig, StreamingDecoder, Tekken

N_INNER = 1048
VOCAB = 1000 + N_INNER
BYTE = lambda b: 1000 + b  # noqa: E731  ids 1000..1255 are the single bytes 0x00..0xFF


@pytest.fixture(scope="module")
def tek_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tekken(tmp_path_factory.mktemp("tekken"), N_INNER)


@pytest.fixture(scope="module")
def tok(tek_path: Path) -> Tekken:
    return Tekken.from_file(tek_path)


@pytest.fixture(scope="module")
def mc(tek_path: Path) -> Tekkenizer:
    return Tekkenizer.from_file(tek_path)


def mc_decode(mc: Tekkenizer, ids: list[int]) -> str:
    return mc.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)


text_ids = st.lists(st.integers(1000, VOCAB - 1), max_size=60)
any_ids = st.lists(st.integers(0, VOCAB - 1), max_size=60)
# Byte tokens only: maximises sequences that split / corrupt multi-byte UTF-8 characters.
byte_ids = st.lists(st.integers(0, 255).map(BYTE), max_size=40)


# ---- loading ---------------------------------------------------------------------------------


def test_fields(tok: Tekken, mc: Tekkenizer) -> None:
    assert (tok.num_special, tok.vocab_size) == (1000, VOCAB) == (mc.num_special_tokens, mc.n_words)
    assert (tok.bos_id, tok.eos_id, tok.streaming_pad_id, tok.streaming_word_id) == (1, 2, 32, 33)
    assert tok.bos_id == mc.bos_id and tok.eos_id == mc.eos_id
    assert tok.streaming_pad_id == mc.get_special_token("[STREAMING_PAD]")
    assert tok.special_token_id("[STREAMING_WORD]") == 33
    assert tok.audio == AudioConfig()  # the fixture carries the real model's values = the defaults
    assert (tok.audio.sampling_rate, tok.audio.frame_rate, tok.audio.num_mel_bins) == (16000, 12.5, 128)
    assert (tok.audio.hop_length, tok.audio.window_size, tok.audio.transcription_delay_ms) == (160, 400, 480)
    assert (tok.audio.streaming_n_left_pad_tokens, tok.audio.streaming_look_ahead_ms) == (32, 2.5)
    assert tok.audio.streaming_look_back_ms == 52.5
    assert mc.audio is not None and mc.audio.transcription_delay_ms == tok.audio.transcription_delay_ms


def test_from_model_directory(tek_path: Path) -> None:
    assert Tekken.from_file(tek_path.parent).vocab_size == VOCAB
    assert Tekken.from_file(str(tek_path)).path == tek_path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tekken.json") as e:
        Tekken.from_file(tmp_path / "nope" / "tekken.json")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(FileNotFoundError, match="model directory needs tekken.json"):
        Tekken.from_file(tmp_path)  # a directory without tekken.json


def test_invalid_json(tmp_path: Path) -> None:
    p = tmp_path / "tekken.json"
    p.write_text('{"config": {', encoding="utf-8")
    with pytest.raises(ValueError, match="invalid JSON") as e:
        Tekken.from_file(p)
    assert str(p) in str(e.value)
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=str(p).replace("\\", "\\\\")):
        Tekken.from_file(p)
    p.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON object"):
        Tekken.from_file(p)


@pytest.mark.parametrize("key", ["vocab", "config"])
def test_missing_key(tmp_path: Path, key: str) -> None:
    data = build_tekken(300)
    del data[key]
    p = tmp_path / "tekken.json"
    p.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=f"missing required key '{key}'") as e:
        Tekken.from_file(p)
    assert str(p) in str(e.value)


def test_bad_vocab_entries(tmp_path: Path) -> None:
    p = tmp_path / "tekken.json"
    data = build_tekken(300)
    data["config"]["default_vocab_size"] = 1000 + 301  # needs one more entry than there are
    p.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="default_vocab_size"):
        Tekken.from_file(p)
    data = build_tekken(300)
    data["vocab"][7] = {"rank": 7, "token_str": None}
    p.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="vocab entry 7"):
        Tekken.from_file(p)
    data = build_tekken(300)
    data["special_tokens"][3] = {"rank": 5000, "token_str": "x", "is_control": True}
    p.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"special_tokens\[3\]"):
        Tekken.from_file(p)
    data = build_tekken(300)
    data["audio"]["sampling_rate"] = "16k"
    p.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match="audio.sampling_rate"):
        Tekken.from_file(p)


def test_vocab_truncated_to_default_vocab_size(tmp_path: Path) -> None:
    # The real file has ~150k entries but only default_vocab_size - 1000 = 130072 are used.
    data = build_tekken(N_INNER)
    data["config"]["default_vocab_size"] = 1000 + 500
    p = tmp_path / "tekken.json"
    p.write_text(json.dumps(data), encoding="utf-8")
    tok, mc = Tekken.from_file(p), Tekkenizer.from_file(p)
    assert tok.vocab_size == mc.n_words == 1500
    assert tok.token_bytes(1499) == mc.id_to_byte_piece(1499)
    with pytest.raises(ValueError, match="out of range"):
        tok.token_bytes(1500)


def test_defaults_without_optional_sections(tmp_path: Path) -> None:
    data = build_tekken(300)
    del data["special_tokens"], data["audio"], data["config"]["default_num_special_tokens"]
    p = tmp_path / "tekken.json"
    p.write_text(json.dumps(data), encoding="utf-8")
    tok = Tekken.from_file(p)
    assert (tok.num_special, tok.vocab_size) == (1000, 1300)
    assert (tok.bos_id, tok.eos_id, tok.streaming_pad_id, tok.streaming_word_id) == (1, 2, 32, None)
    assert tok.id_to_piece(1) == "<s>" and tok.id_to_piece(500) == "<SPECIAL_500>"
    assert tok.audio == AudioConfig()


def test_partial_audio_section(tmp_path: Path) -> None:
    data = build_tekken(300)
    data["audio"] = {"transcription_delay_ms": 960, "audio_encoding_config": {"num_mel_bins": 80}}
    tok = Tekken.from_dict(data)
    assert tok.audio.transcription_delay_ms == 960 and tok.audio.num_mel_bins == 80
    assert tok.audio.hop_length == 160 and tok.audio.sampling_rate == 16000


# ---- decoding --------------------------------------------------------------------------------


def test_every_token_matches_mistral_common(tok: Tekken, mc: Tekkenizer) -> None:
    for i in range(VOCAB):
        assert tok.token_bytes(i) == mc.id_to_byte_piece(i), i
        assert tok.id_to_piece(i) == mc.id_to_piece(i), i
    assert tok.id_to_piece(32) == "[STREAMING_PAD]" and tok.token_bytes(32) == b""
    assert tok.token_bytes(BYTE(0)) == b"\x00"  # id 1000 is byte 0x00 (spec §1.4)


def test_ids_out_of_range(tok: Tekken) -> None:
    for bad in (VOCAB, VOCAB + 10, -1):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([1000, bad])
        with pytest.raises(ValueError, match="out of range"):
            tok.stream().push(bad)
    with pytest.raises(TypeError, match="integer"):
        tok.decode([1000.0])  # type: ignore[list-item]


def test_numpy_ids(tok: Tekken, mc: Tekkenizer) -> None:
    ids = mc.encode(" Hello, wörld", bos=True, eos=True)
    assert tok.decode(np.array(ids, dtype=np.int32)) == tok.decode(ids) == " Hello, wörld"


@settings(max_examples=300, deadline=None)
@given(ids=text_ids)
def test_decode_text_ids_matches_mistral_common(tok: Tekken, mc: Tekkenizer, ids: list[int]) -> None:
    assert tok.decode(ids) == mc_decode(mc, ids)


@settings(max_examples=300, deadline=None)
@given(ids=byte_ids)
def test_decode_split_utf8_matches_mistral_common(tok: Tekken, mc: Tekkenizer, ids: list[int]) -> None:
    assert tok.decode(ids) == mc_decode(mc, ids)


@settings(max_examples=200, deadline=None)
@given(ids=any_ids)
def test_decode_skips_specials(tok: Tekken, mc: Tekkenizer, ids: list[int]) -> None:
    assert tok.decode(ids) == mc_decode(mc, [i for i in ids if i >= 1000])


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.tuples(st.text(max_size=12), st.sampled_from([1, 2, 32, 33, 500])), max_size=8))
def test_decode_real_text_with_specials(tok: Tekken, mc: Tekkenizer, words: list[tuple[str, int]]) -> None:
    # Specials between whole characters: identical to mistral-common with specials left in.
    ids = [1]
    for text, special in words:
        ids += mc.encode(text, bos=False, eos=False) + [special]
    assert tok.decode(ids) == mc_decode(mc, ids) == "".join(t for t, _ in words)


def test_special_inside_a_character(tok: Tekken, mc: Tekkenizer) -> None:
    e_acute = [BYTE(0xC3), BYTE(0xA9)]  # "é" as two byte tokens
    assert tok.decode(e_acute) == mc_decode(mc, e_acute) == "é"
    split = [e_acute[0], 32, e_acute[1]]
    # Documented deviation: the character survives a [STREAMING_PAD] in between; mistral-common
    # decodes the two runs separately and gives two replacement characters.
    assert tok.decode(split) == "é"
    assert mc_decode(mc, split) == "\ufffd\ufffd"
    emoji = [BYTE(b) for b in "🎤".encode()]
    assert tok.decode(emoji[:2] + [33] + emoji[2:]) == "🎤"
    assert tok.decode(emoji[:3]) == "\ufffd"  # an unfinished character at the end


# ---- streaming -------------------------------------------------------------------------------


def stream_all(tok: Tekken, ids: list[int]) -> tuple[list[str], str]:
    dec = tok.stream()
    return [dec.push(i) for i in ids], dec.flush()


@settings(max_examples=400, deadline=None)
@given(ids=st.one_of(any_ids, byte_ids, st.lists(st.sampled_from([32, 33, *range(1000 + 0x80, 1256)]))))
def test_stream_equals_decode(tok: Tekken, ids: list[int]) -> None:
    parts, tail = stream_all(tok, ids)
    assert "".join(parts) + tail == tok.decode(ids)


def test_stream_holds_back_partial_characters(tok: Tekken) -> None:
    dec = StreamingDecoder(tok)
    emoji = [BYTE(b) for b in "🎤".encode()]
    assert [dec.push(i) for i in [BYTE(ord("a")), *emoji[:2], 32, *emoji[2:]]] == ["a", "", "", "", "", "🎤"]
    assert dec.push(emoji[0]) == ""
    assert dec.flush() == "\ufffd"
    # reusable after flush
    assert dec.push(BYTE(0xC3)) == "" and dec.push(BYTE(0xA9)) == "é" and dec.flush() == ""


def test_stream_text(tok: Tekken, mc: Tekkenizer) -> None:
    text = " Ich höre 日本語 und 🎤 — ok."
    ids = [1, 32, 32, *mc.encode(text, bos=False, eos=False), 2]
    parts, tail = stream_all(tok, ids)
    assert "".join(parts) + tail == text and "\ufffd" not in "".join(parts)

"""voxtral-wgpu eval: dataset layouts, text normalisation, WER / CER equal to jiwer's on the same
normalised text, error rows for unreadable audio, the batched-engine hook, and the whole command on
tiny random-weight models (BF16 and its Q8_0 GGUF)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from test_stream import write_fast_model

from voxtral_wgpu import cli
from voxtral_wgpu import normalize as norm
from voxtral_wgpu.api import Transcription
from voxtral_wgpu.evaluate import (DatasetError, Utterance, evaluate, format_table, load_dataset, score,
                                   token_agreement)
from voxtral_wgpu.quantize import quantize

jiwer = pytest.importorskip("jiwer")


def tone(seconds=0.6, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# datasets in the three layouts
# ------------------------------------------------------------------------------------------------
def write_librispeech(root: Path) -> Path:
    """test-clean/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt with flac beside it, two chapters."""
    for spk, ch, n in (("19", "198", 2), ("26", "495", 1)):
        d = root / "test-clean" / spk / ch
        d.mkdir(parents=True)
        lines = []
        for i in range(n):
            uid = f"{spk}-{ch}-{i:04d}"
            sf.write(d / f"{uid}.flac", tone(seed=i), 16000, format="FLAC")
            lines.append(f"{uid} THE {'FIRST SECOND'.split()[i]} CHAPTER")
        (d / f"{spk}-{ch}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


def write_fleurs(root: Path) -> Path:
    """en_us/test.tsv + en_us/audio/test/*.wav (the layout of the extracted FLEURS archives)."""
    d = root / "en_us"
    (d / "audio" / "test").mkdir(parents=True)
    rows = []
    for i, raw in enumerate(["Mr. Smith paid $5.", "It's twenty-five percent."]):
        name = f"{1000 + i}.wav"
        sf.write(d / "audio" / "test" / name, tone(seed=10 + i), 16000)
        rows.append("\t".join([str(i), name, raw, raw.lower(), "x", "9600", "MALE"]))
    (d / "test.tsv").write_text("\n".join(rows) + "\n")
    return d


def write_manifest(root: Path, with_bad: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(2):
        sf.write(root / f"m{i}.wav", tone(seed=20 + i), 16000)
        rows.append({"audio": f"m{i}.wav", "text": f"Hello number {i}.", "language": "en"})
    if with_bad:
        (root / "broken.flac").write_bytes(b"this is not a flac file")
        rows.append({"audio": "broken.flac", "text": "unreadable", "id": "broken"})
    p = root / "set.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_layouts(tmp_path):
    fmt, utts = load_dataset(write_librispeech(tmp_path / "ls"))
    assert fmt == "librispeech"
    assert [u.id for u in utts] == ["19-198-0000", "19-198-0001", "26-495-0000"]
    assert utts[1].text == "THE SECOND CHAPTER" and utts[1].audio.suffix == ".flac" and utts[1].audio.exists()

    fmt, utts = load_dataset(write_fleurs(tmp_path / "fl"))
    assert fmt == "fleurs" and len(utts) == 2
    assert utts[0].text == "Mr. Smith paid $5." and utts[0].language == "en" and utts[0].audio.exists()

    fmt, utts = load_dataset(write_manifest(tmp_path / "mf"), limit=2)
    assert fmt == "manifest" and [u.text for u in utts] == ["Hello number 0.", "Hello number 1."]
    assert all(u.audio.exists() for u in utts)


def test_bad_datasets_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "a.wav", "text": "x"}\n{not json\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:2: not JSON"):
        load_dataset(bad)
    tsv = tmp_path / "test.tsv"
    tsv.write_text("only-one-column\n")
    with pytest.raises(DatasetError, match=r"test\.tsv:1: expected FLEURS columns"):
        load_dataset(tsv)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no \\*.trans.txt"):
        load_dataset(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------
# normalisation and scoring
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b", [
    ("Mr. Smith paid $5.", "mister smith paid five dollars"),
    ("It's twenty-five percent!", "it is 25%"),
    ("Um, the colour [noise] of the (laughs) car", "the color of the car"),
    ("In nineteen ninety-nine, the twenty first", "in 1999 the 21st"),
    ("one hundred and five people; 1,000 more", "105 people 1000 more"),
    ("He won't go, café.", "he will not go cafe"),
])
def test_english_normalizer(a, b):
    assert norm.english(a) == norm.english(b)


def test_basic_normalizer_keeps_accents():
    assert norm.basic("Ça va? Très bien, [rire] MERCI!") == "ça va très bien merci"
    assert norm.for_language("en_us") == "english" and norm.for_language("fr") == "basic"


PAIRS = [("the cat sat on the mat", "the cat sat on a mat"),
         ("hello world", "hello big wide world"),
         ("one two three four", "one three four"),
         ("completely different", ""),
         ("same words here", "same words here")]


class ScriptedModel:
    """Stands in for a Model: returns fixed hypotheses in order (no GPU); records the calls."""

    def __init__(self, hyps, label="scripted"):
        self.hyps, self.label, self.calls = list(hyps), label, []

    def transcribe(self, audio, *, transcription_delay_ms=None, progress=None):
        self.calls.append("transcribe")
        text = self.hyps.pop(0)
        return Transcription(text=text, token_ids=[len(w) for w in text.split()], duration_s=len(audio) / 16000,
                             transcription_delay_ms=transcription_delay_ms or 480)


def test_wer_and_cer_equal_jiwer(tmp_path):
    utts = []
    for i, (ref, _) in enumerate(PAIRS):
        sf.write(tmp_path / f"{i}.wav", tone(seed=i), 16000)
        utts.append(Utterance(str(i), tmp_path / f"{i}.wav", ref, "en"))
    model = ScriptedModel([h for _, h in PAIRS])
    (s,) = evaluate([model], utts, normalizer="none", progress=False)
    refs, hyps = [r for r, _ in PAIRS], [h for _, h in PAIRS]
    assert s.wer == pytest.approx(jiwer.wer(refs, hyps))
    assert s.cer == pytest.approx(jiwer.cer(refs, hyps))
    o = jiwer.process_words(refs, hyps)
    assert (s.substitutions, s.deletions, s.insertions) == (o.substitutions, o.deletions, o.insertions)
    for r, h in PAIRS:  # and one pair at a time
        c = score(r, h)
        assert (c["substitutions"] + c["deletions"] + c["insertions"]) / c["ref_words"] == pytest.approx(
            jiwer.wer(r, h))


def test_wer_after_normalisation(tmp_path):
    sf.write(tmp_path / "a.wav", tone(), 16000)
    u = [Utterance("a", tmp_path / "a.wav", "Mr. Smith paid five dollars.", "en")]
    (s,) = evaluate([ScriptedModel(["mister smith paid $5"])], u, progress=False)
    assert s.wer == 0.0
    (s,) = evaluate([ScriptedModel(["mister smith paid $5"])], u, normalizer="none", progress=False)
    assert s.wer == pytest.approx(jiwer.wer("Mr. Smith paid five dollars.", "mister smith paid $5"))


def test_unreadable_file_is_an_error_row(tmp_path):
    _, utts = load_dataset(write_manifest(tmp_path / "mf"))
    out = tmp_path / "rows.jsonl"
    model = ScriptedModel(["hello number 0", "hello number one"])
    (s,) = evaluate([model], utts, output=out, progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["m0", "m1", "broken"]
    assert "broken.flac" in rows[2]["error"] and "wer" not in rows[2]
    assert rows[0]["wer"] == 0.0 and rows[1]["wer"] == 0.0  # "one" and "1" agree after normalisation
    assert (s.utterances, s.errors) == (2, 1)
    assert "errors" in format_table([s]).splitlines()[0]


def test_batched_engine_is_used_when_present(tmp_path):
    _, utts = load_dataset(write_manifest(tmp_path / "mf", with_bad=False))

    class Batched(ScriptedModel):
        def transcribe_many(self, audios, *, transcription_delay_ms=None):
            self.calls.append(f"many{len(audios)}")
            return [ScriptedModel.transcribe(self, a, transcription_delay_ms=transcription_delay_ms)
                    for a in audios]

    m = Batched(["hello number 0", "hello number 1"])
    (s,) = evaluate([m], utts, progress=False, batch_size=8)
    assert m.calls == ["many2", "transcribe", "transcribe"]  # one batched call (which used the scripted ones)
    assert s.wer == 0.0 and s.utterances == 2


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (4, 4)
    assert token_agreement([1, 2, 3, 4], [1, 9, 2, 3, 4]) == (4, 5)  # aligned: one insertion costs one
    assert token_agreement([], [5]) == (0, 1)


# ------------------------------------------------------------------------------------------------
# the command on tiny models
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = write_fast_model(tmp_path_factory.mktemp("eval_bf16") / "tiny-bf16")
    q = tmp_path_factory.mktemp("eval_q8")
    shutil.copy(d / "tekken.json", q)
    (gguf,) = quantize(d, q / "tiny-q8.gguf", qtype="q8_0")
    return d, gguf


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["librispeech", "fleurs", "manifest"])
def test_eval_command(tiny_models, tmp_path, capsys, layout):
    bf16, q8 = tiny_models
    data = {"librispeech": lambda: write_librispeech(tmp_path / "ls"), "fleurs": lambda: write_fleurs(tmp_path / "fl"),
            "manifest": lambda: write_manifest(tmp_path / "mf")}[layout]()
    out = tmp_path / "rows.jsonl"
    rc = cli.main(["eval", "--model", str(bf16), "--model", str(q8), "--dataset", str(data), "--format", layout,
                   "--transcription-delay-ms", "480", "960", "--output", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = captured.out.strip().splitlines()
    print("\n".join(table))
    assert table[0].split()[:5] == ["model", "delay", "ms", "utts", "errors"]
    body = [line.split() for line in table[2:]]
    assert [(r[0], r[1]) for r in body] == [("tiny-bf16", "480"), ("tiny-bf16", "960"),
                                          ("tiny-q8.gguf", "480"), ("tiny-q8.gguf", "960")]
    assert all(r[-1] == "ref" for r in body[:2]) and all(float(r[-1]) >= 0 for r in body[2:])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    n_utts = {"librispeech": 3, "fleurs": 2, "manifest": 3}[layout]
    assert len(rows) == 4 * n_utts
    ok = [r for r in rows if "error" not in r]
    assert all(r["token_ids"] and r["rtf"] > 0 and 0 <= r["wer"] for r in ok)
    if layout == "manifest":
        assert sum("error" in r for r in rows) == 4  # the broken file, once per model x delay
    # table figures are jiwer's over the normalised text of the rows
    for s_model, s_delay in (("tiny-bf16", 480), ("tiny-q8.gguf", 960)):
        mine = [r for r in ok if r["model"] == s_model and r["delay_ms"] == s_delay]
        w = jiwer.wer([r["reference_normalized"] for r in mine], [r["hypothesis_normalized"] for r in mine])
        line = next(r for r in body if r[0] == s_model and r[1] == str(s_delay))
        assert float(line[4]) == pytest.approx(100 * w, abs=0.006)


def test_eval_bad_delay_is_a_clear_error(tmp_path, capsys):
    data = write_manifest(tmp_path / "mf", with_bad=False)
    rc = cli.main(["eval", "--model", str(tmp_path / "no-model"), "--dataset", str(data),
                   "--transcription-delay-ms", "500"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("voxtral-wgpu: error:") and "500" in err[-1]

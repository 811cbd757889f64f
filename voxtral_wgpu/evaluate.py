"""Accuracy: word and character error rates of one or more models on a speech dataset.

``evaluate()`` transcribes every utterance with every model at every transcription delay and
returns one :class:`Summary` per model x delay; ``format_table()`` prints them. Both sides are
normalised first (:mod:`voxtral_wgpu.normalize`: Whisper's English rules for English, a basic
one otherwise) and scored with jiwer. Rates are corpus-level: all edits over all reference
words (characters for CER, spaces included), not a mean of per-utterance rates.

Dataset layouts (``load_dataset``):

* ``librispeech``: a folder tree of ``SPEAKER-CHAPTER.trans.txt`` files (lines ``ID TEXT``) with
  ``ID.flac`` beside them (LibriSpeech's own layout; any split folder or its parent).
* ``fleurs``: a FLEURS ``SPLIT.tsv`` (or the language folder holding ``test.tsv``): tab-separated
  ``id, file_name, raw_transcription, transcription, ...``; audio in ``audio/SPLIT/``, ``SPLIT/``
  or beside the tsv. The reference is ``raw_transcription`` (cased and punctuated, as the model
  writes), normalised like the hypothesis. The language is the folder name (``en_us`` -> en).
* ``manifest``: JSON lines ``{"audio": PATH, "text": REFERENCE}`` (optional ``"id"``,
  ``"language"``); relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import normalize as norm

FORMATS = ("librispeech", "fleurs", "manifest")


@dataclass
class Utterance:
    id: str
    audio: Path
    text: str
    language: str | None = None


class DatasetError(ValueError):
    """The dataset cannot be read at all (bad layout, bad manifest line); one audio file that
    cannot be read is not this: it becomes an error row."""


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".tsv":
            return "fleurs"
        if path.suffix in (".jsonl", ".json"):
            return "manifest"
        raise DatasetError(f"{path}: cannot tell the dataset layout from the name; pass --format "
                           f"({', '.join(FORMATS)})")
    if path.is_dir():
        if next(path.rglob("*.trans.txt"), None) is not None:
            return "librispeech"
        if next(path.glob("*.tsv"), None) is not None:
            return "fleurs"
        if next(path.glob("*.jsonl"), None) is not None:
            return "manifest"
        raise DatasetError(f"{path}: no *.trans.txt (LibriSpeech), *.tsv (FLEURS) or *.jsonl (manifest) found")
    raise DatasetError(f"dataset {path} does not exist")


def load_dataset(path, fmt: str | None = None, limit: int | None = None) -> tuple[str, list[Utterance]]:
    """The utterances of a dataset, sorted by id within each file: ``(format, utterances)``."""
    path = Path(os.fsdecode(path)).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    utts = {"librispeech": _librispeech, "fleurs": _fleurs, "manifest": _manifest}[fmt](path)
    if not utts:
        raise DatasetError(f"{path}: no utterances found in the {fmt} layout")
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be at least 1, not {limit}")
        utts = utts[:limit]
    return fmt, utts


def _librispeech(root: Path) -> list[Utterance]:
    out = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{uid}.flac"
            if not audio.exists() and (trans.parent / f"{uid}.wav").exists():
                audio = trans.parent / f"{uid}.wav"
            out.append(Utterance(uid, audio, text, "en"))
    return out


def _fleurs(path: Path) -> list[Utterance]:
    if path.is_dir():
        tsvs = sorted(path.glob("*.tsv"))
        test = path / "test.tsv"
        if test in tsvs:
            path = test
        elif len(tsvs) == 1:
            path = tsvs[0]
        else:
            raise DatasetError(f"{path}: {len(tsvs)} tsv files ({', '.join(t.name for t in tsvs)}); "
                               "pass the one to evaluate")
    folder, split = path.parent, path.stem
    language = folder.name.split("_")[0] if folder.name else None
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 3:
            raise DatasetError(f"{path}:{n}: expected FLEURS columns id, file_name, raw_transcription, ... "
                               f"(tab-separated), found {len(cols)} column(s)")
        uid, name, raw = cols[0], cols[1], cols[2]
        candidates = [folder / "audio" / split / name, folder / split / name, folder / "audio" / name, folder / name]
        audio = next((c for c in candidates if c.exists()), candidates[0])
        out.append(Utterance(f"{uid}:{Path(name).stem}", audio, raw, language))
    return out


def _manifest(path: Path) -> list[Utterance]:
    if path.is_dir():
        found = sorted(path.glob("*.jsonl"))
        if len(found) != 1:
            raise DatasetError(f"{path}: {len(found)} *.jsonl manifests; pass the one to evaluate")
        path = found[0]
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: not JSON ({e.msg})") from None
        audio = row.get("audio", row.get("audio_filepath")) if isinstance(row, dict) else None
        if not isinstance(audio, str) or not isinstance(row.get("text"), str):
            raise DatasetError(f'{path}:{n}: expected {{"audio": PATH, "text": REFERENCE}}')
        a = Path(audio).expanduser()
        out.append(Utterance(str(row.get("id", a.stem)), a if a.is_absolute() else path.parent / a, row["text"],
                             row.get("language")))
    return out


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def _jiwer():
    try:
        import jiwer
    except ImportError:
        raise ImportError("voxtral-wgpu eval scores with jiwer: pip install 'voxtral_wgpu[eval]' "
                          "(or pip install jiwer)") from None
    return jiwer


def score(reference: str, hypothesis: str) -> dict:
    """Edit counts of one normalised pair: words (S, D, I, hits, n) and characters (c_edits, c_n)."""
    jiwer = _jiwer()
    ref_words, hyp_words = reference.split(), hypothesis.split()
    if not ref_words:  # jiwer needs a reference; every hypothesis word is then an insertion
        return {"substitutions": 0, "deletions": 0, "insertions": len(hyp_words), "hits": 0, "ref_words": 0,
                "char_edits": len(hypothesis), "ref_chars": 0}
    w = jiwer.process_words(reference, hypothesis) if hyp_words else None
    c = jiwer.process_characters(reference, hypothesis) if hypothesis else None
    if w is None:  # empty hypothesis: every reference word deleted
        return {"substitutions": 0, "deletions": len(ref_words), "insertions": 0, "hits": 0,
                "ref_words": len(ref_words), "char_edits": len(reference), "ref_chars": len(reference)}
    return {"substitutions": w.substitutions, "deletions": w.deletions, "insertions": w.insertions, "hits": w.hits,
            "ref_words": w.substitutions + w.deletions + w.hits,
            "char_edits": c.substitutions + c.deletions + c.insertions,
            "ref_chars": c.substitutions + c.deletions + c.hits}


def token_agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(matching tokens, max length) of two id sequences, aligned by edit distance (one inserted
    token does not make every later one disagree)."""
    if not a and not b:
        return 0, 0
    if not a or not b:
        return 0, max(len(a), len(b))
    jiwer = _jiwer()
    o = jiwer.process_words(" ".join(map(str, a)), " ".join(map(str, b)))
    return o.hits, max(len(a), len(b))


@dataclass
class Summary:
    model: str
    delay_ms: int | None
    utterances: int = 0
    errors: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_words: int = 0
    char_edits: int = 0
    ref_chars: int = 0
    audio_s: float = 0.0
    compute_s: float = 0.0
    agree_hits: int = 0
    agree_total: int = 0
    is_baseline: bool = False
    rows: list = field(default_factory=list, repr=False)

    @property
    def wer(self) -> float | None:
        if not self.ref_words:
            return None
        return (self.substitutions + self.deletions + self.insertions) / self.ref_words

    @property
    def cer(self) -> float | None:
        return self.char_edits / self.ref_chars if self.ref_chars else None

    @property
    def rtf(self) -> float | None:
        return self.compute_s / self.audio_s if self.audio_s else None

    @property
    def agreement(self) -> float | None:
        return self.agree_hits / self.agree_total if self.agree_total else None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if row.get("error"):
            self.errors += 1
            return
        self.utterances += 1
        for k in ("substitutions", "deletions", "insertions", "ref_words", "char_edits", "ref_chars"):
            setattr(self, k, getattr(self, k) + row[k])
        self.audio_s += row["duration_s"]
        self.compute_s += row["time_s"]

    def as_dict(self) -> dict:
        return {"model": self.model, "delay_ms": self.delay_ms, "utterances": self.utterances, "errors": self.errors,
                "wer": self.wer, "cer": self.cer, "substitutions": self.substitutions, "deletions": self.deletions,
                "insertions": self.insertions, "ref_words": self.ref_words, "rtf": self.rtf,
                "token_agreement": None if self.is_baseline else self.agreement}


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------
def model_label(spec) -> str:
    """A short table name for a model spec: a folder's or file's name, or the repo id as given."""
    if not isinstance(spec, (str, os.PathLike)) and spec is not None:
        return getattr(spec, "label", None) or type(spec).__name__
    from .api import DEFAULT_REPO

    s = os.fsdecode(spec) if spec is not None else DEFAULT_REPO
    p = Path(s).expanduser()
    return p.name if p.exists() else s


def _transcribe_pass(model, utts, delay_ms, batch_size, bar):
    """Yield (utterance, Transcription | None, seconds, error | None) for each utterance. Audio is
    read here, so an unreadable file is an error of its own row only."""
    from . import audio as audio_mod

    def one(u, samples):
        t0 = time.perf_counter()
        try:
            tr = model.transcribe(samples, transcription_delay_ms=delay_ms, progress=False)
        except Exception as e:  # one bad utterance must not end the run
            return u, None, 0.0, f"{type(e).__name__}: {e}"
        return u, tr, time.perf_counter() - t0, None

    # the batched engine (Model.transcribe_many), where the model has one; else one file at a time
    many = getattr(model, "transcribe_many", None)
    step = batch_size if callable(many) else 1
    for i in range(0, len(utts), step):
        loaded = []
        for u in utts[i:i + step]:
            try:
                samples = audio_mod.load_audio(u.audio)
                if len(samples) == 0:
                    raise ValueError(f"{u.audio}: no audio samples")
                loaded.append((u, samples))
            except Exception as e:
                yield u, None, 0.0, f"{type(e).__name__}: {e}"
                if bar is not None:
                    bar.update(1)
        if not loaded:
            continue
        if callable(many) and len(loaded) > 1:
            t0 = time.perf_counter()
            try:
                trs = list(many([s for _, s in loaded], transcription_delay_ms=delay_ms))
            except Exception:
                trs = None  # retried one by one below, so the failing utterance is the only error row
            if trs is not None and len(trs) == len(loaded):
                elapsed = time.perf_counter() - t0
                total = sum(len(s) for _, s in loaded)
                for (u, s), tr in zip(loaded, trs):  # batch time shared in proportion to audio length
                    yield u, tr, elapsed * len(s) / total, None
                if bar is not None:
                    bar.update(len(loaded))
                continue
        for u, s in loaded:
            yield one(u, s)
            if bar is not None:
                bar.update(1)


def evaluate(models: list, utterances: list[Utterance], delays: list[int | None] | None = None, *,
             normalizer: str = "auto", output=None, progress: bool = True, batch_size: int = 8,
             load_kwargs: dict | None = None) -> list[Summary]:
    """Every model (a path / repo id loaded here one at a time, or a loaded Model) at every delay
    (None: the model's default) over ``utterances``. ``output``: a path or text stream receiving one
    JSON line per utterance and pass. ``normalizer``: auto (english for English utterances, basic
    otherwise), english, basic or none."""
    if normalizer != "auto" and normalizer not in norm.NORMALIZERS:
        raise ValueError(f"normalizer must be auto or one of {', '.join(norm.NORMALIZERS)}, not {normalizer!r}")
    _jiwer()  # fail before loading any model
    delays = list(delays) if delays else [None]
    if len(delays) != len(set(delays)):
        raise ValueError(f"transcription delays repeated: {delays}")
    from . import audio as audio_mod

    for d in delays:
        if d is not None:
            audio_mod.delay_ms_to_tokens(d)  # a bad delay fails before any model is loaded
    labels = [model_label(m) for m in models]
    if len(set(labels)) != len(labels):
        labels = [os.fsdecode(m) if isinstance(m, (str, os.PathLike)) else f"{lab}#{i}"
                  for i, (m, lab) in enumerate(zip(models, labels))]
    out, close = output, False
    if isinstance(output, (str, os.PathLike)):
        out, close = open(output, "w", encoding="utf-8"), True
    summaries: list[Summary] = []
    baseline: dict[tuple, list[int]] = {}  # (delay, utterance id) -> the first model's token ids
    try:
        for mi, (spec, label) in enumerate(zip(models, labels)):
            model = spec
            if isinstance(spec, (str, os.PathLike)) or spec is None:
                import voxtral_wgpu

                model = voxtral_wgpu.load(spec, progress=progress, **(load_kwargs or {}))
            for d in delays:
                s = Summary(label, d, is_baseline=(mi == 0))
                bar = None
                if progress:
                    from tqdm import tqdm

                    bar = tqdm(total=len(utterances), unit="utt", file=sys.stderr, leave=False,
                               desc=f"{label} @ {d if d is not None else 'default'} ms")
                try:
                    for u, tr, secs, err in _transcribe_pass(model, utterances, d, batch_size, bar):
                        row = _row(label, d, u, tr, secs, err, normalizer)
                        if tr is not None:
                            s.delay_ms = tr.transcription_delay_ms
                            key = (d, u.id)
                            if mi == 0:
                                baseline[key] = list(tr.token_ids)
                            elif key in baseline:
                                hits, total = token_agreement(baseline[key], list(tr.token_ids))
                                s.agree_hits += hits
                                s.agree_total += total
                                row["token_agreement"] = hits / total if total else None
                        s.add(row)
                        if out is not None:
                            out.write(json.dumps(row, ensure_ascii=False) + "\n")
                            out.flush()
                finally:
                    if bar is not None:
                        bar.close()
                summaries.append(s)
            del model  # the next model's weights must not share the GPU with this one's
            gc.collect()
    finally:
        if close:
            out.close()
    return summaries


def _row(label, delay, u: Utterance, tr, secs, err, normalizer) -> dict:
    row = {"model": label, "delay_ms": delay, "id": u.id, "audio": str(u.audio), "reference": u.text}
    if err is not None:
        row["error"] = err
        return row
    name = norm.for_language(u.language) if normalizer == "auto" else normalizer
    f = norm.NORMALIZERS[name]
    ref, hyp = f(u.text), f(tr.text)
    counts = score(ref, hyp)
    row.update({"delay_ms": tr.transcription_delay_ms, "hypothesis": tr.text, "normalizer": name,
                "reference_normalized": ref, "hypothesis_normalized": hyp, **counts,
                "wer": ((counts["substitutions"] + counts["deletions"] + counts["insertions"]) / counts["ref_words"]
                        if counts["ref_words"] else None),
                "cer": counts["char_edits"] / counts["ref_chars"] if counts["ref_chars"] else None,
                "duration_s": tr.duration_s, "time_s": secs, "rtf": secs / tr.duration_s if tr.duration_s else None,
                "token_ids": list(tr.token_ids)})
    return row


def format_table(summaries: list[Summary]) -> str:
    """One line per model x delay: WER, CER, edit counts, RTF and token agreement with the first model."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    head = ["model", "delay ms", "utts", "errors", "WER %", "CER %", "sub", "del", "ins", "RTF", "agree %"]
    rows = [[s.model, "default" if s.delay_ms is None else str(s.delay_ms), str(s.utterances), str(s.errors),
             pct(s.wer), pct(s.cer), str(s.substitutions), str(s.deletions), str(s.insertions),
             "-" if s.rtf is None else f"{s.rtf:.3f}", "ref" if s.is_baseline else pct(s.agreement)]
            for s in summaries]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

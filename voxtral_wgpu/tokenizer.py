"""Tekken tokenizer (decode only) and the audio settings stored in ``tekken.json``.

Layout of ``tekken.json`` (spec §1.4; mistral-common ``tokens/tokenizers/tekken.py``)::

    {"config": {"default_vocab_size": 131072, "default_num_special_tokens": 1000, "pattern": ..., ...},
     "vocab": [{"rank": r, "token_bytes": <base64>, "token_str": ...}, ...],   # ~150k entries
     "special_tokens": [{"rank": i, "token_str": "<s>", "is_control": true}, ...],
     "audio": {"sampling_rate": 16000, "frame_rate": 12.5, "audio_encoding_config": {...}, ...}}

Token ids:

* ``id < num_special`` (1000) is a special/control token; it never produces text.
* ``num_special <= id < vocab_size`` is a text token whose bytes are
  ``b64decode(vocab[id - num_special]["token_bytes"])``. Only the first ``vocab_size - num_special``
  (130072) vocab entries are used: mistral-common truncates the inner vocabulary
  (``_reload_mergeable_ranks(vocab, max_vocab=inner_vocab_size)``).

Text is the UTF-8 decoding (``errors="replace"``) of the concatenated bytes of the text tokens.
One character can span several tokens, so streaming output goes through :class:`StreamingDecoder`,
which holds back an incomplete UTF-8 sequence until the next token completes it.

Encoding text is not needed for transcription (the prompt is only special tokens) and is not
implemented.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import operator
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AudioConfig", "StreamingDecoder", "Tekken"]

TEKKEN_FILENAME = "tekken.json"
DEFAULT_NUM_SPECIAL = 1000

BOS = "<s>"
EOS = "</s>"
STREAMING_PAD = "[STREAMING_PAD]"  # "[P]": prompt filler; model output meaning "nothing new yet"
STREAMING_WORD = "[STREAMING_WORD]"  # "[W]": model output marking the start of a word

# Ids used when tekken.json has no special_tokens list, or the list lacks the name (spec §1.4).
_DEFAULT_IDS = {BOS: 1, EOS: 2, STREAMING_PAD: 32}

# Names of ranks 0..19 when the file has no special_tokens list, as mistral-common fills them in
# (Tekkenizer.DEPRECATED_SPECIAL_TOKENS); every other rank becomes "<SPECIAL_{i}>".
_DEPRECATED_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)  # fmt: skip


@dataclass(frozen=True)
class AudioConfig:
    """The ``audio`` section of tekken.json (mistral-common ``AudioConfig``), flattened.

    Defaults are the Voxtral-Mini-4B-Realtime values (spec §1.4); they are used for any key the
    file lacks, and for all of them when the section is absent.
    """

    sampling_rate: int = 16000  # Hz
    frame_rate: float = 12.5  # decoder positions per second: 1 position = 80 ms = 1280 samples
    num_mel_bins: int = 128
    hop_length: int = 160  # samples (10 ms) between mel frames
    window_size: int = 400  # samples (25 ms) per STFT window (= n_fft)
    transcription_delay_ms: float = 480  # default delay; n_delay = 480 / 80 = 6 positions
    streaming_n_left_pad_tokens: int = 32  # positions of silence before the audio (40960 samples)
    streaming_look_ahead_ms: float = 2.5
    streaming_look_back_ms: float = 52.5
    transcription_format: str = "streaming"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = TEKKEN_FILENAME) -> AudioConfig:
        """Parse a tekken.json ``audio`` section; ``source`` names the file in error messages."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: 'audio' must be an object, got {type(d).__name__}")
        enc = d.get("audio_encoding_config") or {}
        if not isinstance(enc, Mapping):
            raise ValueError(f"{source}: 'audio.audio_encoding_config' must be an object")
        base = cls()

        def get(section: Mapping[str, Any], prefix: str, key: str, kind: type) -> Any:
            value = section.get(key)
            if value is None:  # absent or null -> default (null appears in non-streaming configs)
                return getattr(base, key)
            ok = isinstance(value, str) if kind is str else (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and (kind is float or float(value).is_integer())
            )  # fmt: skip
            if not ok:
                raise ValueError(f"{source}: '{prefix}{key}' must be {kind.__name__}, got {value!r}")
            return int(value) if kind is int else value

        return cls(
            sampling_rate=get(d, "audio.", "sampling_rate", int),
            frame_rate=get(d, "audio.", "frame_rate", float),
            num_mel_bins=get(enc, "audio.audio_encoding_config.", "num_mel_bins", int),
            hop_length=get(enc, "audio.audio_encoding_config.", "hop_length", int),
            window_size=get(enc, "audio.audio_encoding_config.", "window_size", int),
            transcription_delay_ms=get(d, "audio.", "transcription_delay_ms", float),
            streaming_n_left_pad_tokens=get(d, "audio.", "streaming_n_left_pad_tokens", int),
            streaming_look_ahead_ms=get(d, "audio.", "streaming_look_ahead_ms", float),
            streaming_look_back_ms=get(d, "audio.", "streaming_look_back_ms", float),
            transcription_format=get(d, "audio.", "transcription_format", str),
        )


class Tekken:
    """Decode-only Tekken tokenizer.

    Attributes:
        num_special: number of special ids (1000); ids below it produce no text.
        vocab_size: total number of ids (131072 for the real model).
        bos_id, eos_id, streaming_pad_id: ids of ``<s>``, ``</s>``, ``[STREAMING_PAD]``.
        streaming_word_id: id of ``[STREAMING_WORD]``, or None when the file does not name it.
        audio: the file's :class:`AudioConfig`.
        path: the file it was loaded from, if any.
    """

    def __init__(
        self,
        pieces: list[bytes],
        special_tokens: list[str],
        *,
        audio: AudioConfig | None = None,
        path: Path | None = None,
    ) -> None:
        """Build from decoded vocab bytes (``pieces[r]`` = bytes of id ``num_special + r``) and the
        names of all special ids (``special_tokens[i]`` = name of id ``i``). Prefer :meth:`from_file`."""
        self._pieces = pieces
        self._specials = special_tokens
        self._special_ids = {s: i for i, s in enumerate(special_tokens)}
        self.num_special = len(special_tokens)
        self.vocab_size = self.num_special + len(pieces)
        self.audio = audio if audio is not None else AudioConfig()
        self.path = path
        where = path or "tekken"
        for name, default in _DEFAULT_IDS.items():
            if name not in self._special_ids and default >= self.num_special:
                raise ValueError(f"{where}: no special token {name} and its default id {default} "
                                 f"is not special (num_special = {self.num_special})")
        self.bos_id: int = self._special_ids.get(BOS, _DEFAULT_IDS[BOS])
        self.eos_id: int = self._special_ids.get(EOS, _DEFAULT_IDS[EOS])
        self.streaming_pad_id: int = self._special_ids.get(STREAMING_PAD, _DEFAULT_IDS[STREAMING_PAD])
        self.streaming_word_id: int | None = self._special_ids.get(STREAMING_WORD)

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tekken:
        """Load ``tekken.json``; ``path`` may also be the model directory that contains it.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not valid JSON or lacks/garbles a required part.
        """
        p = Path(path)
        if p.is_dir():
            p = p / TEKKEN_FILENAME
        if not p.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {p} (the model directory needs {TEKKEN_FILENAME}, "
                "the Tekken tokenizer shipped with the checkpoint)"
            )
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: not a valid tekken.json (invalid JSON: {e})") from e
        return cls.from_dict(data, source=p)

    @classmethod
    def from_dict(cls, data: Any, *, source: str | Path = TEKKEN_FILENAME) -> Tekken:
        """Build from parsed tekken.json contents; ``source`` names the file in error messages."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: top level must be a JSON object, got {type(data).__name__}")
        for key in ("vocab", "config"):
            if key not in data:
                raise ValueError(f"{source}: missing required key '{key}'")
        config, vocab = data["config"], data["vocab"]
        if not isinstance(config, Mapping):
            raise ValueError(f"{source}: 'config' must be an object")
        if not isinstance(vocab, list):
            raise ValueError(f"{source}: 'vocab' must be a list")

        num_special = config.get("default_num_special_tokens", DEFAULT_NUM_SPECIAL)
        vocab_size = config.get("default_vocab_size", num_special + len(vocab))
        for key, value in (("default_num_special_tokens", num_special), ("default_vocab_size", vocab_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{source}: 'config.{key}' must be a non-negative integer, got {value!r}")
        n_inner = vocab_size - num_special
        if n_inner < 0 or n_inner > len(vocab):
            raise ValueError(
                f"{source}: 'config.default_vocab_size' = {vocab_size} needs {n_inner} vocab entries after "
                f"{num_special} special tokens, but 'vocab' has {len(vocab)}"
            )

        specials = _special_names(data.get("special_tokens"), num_special, source)

        # Only the first n_inner entries are used (mistral-common _reload_mergeable_ranks).
        pieces: list[bytes] = []
        for rank, entry in enumerate(vocab[:n_inner]):
            try:
                pieces.append(base64.b64decode(entry["token_bytes"]))
            except (KeyError, TypeError, binascii.Error) as e:
                msg = f"{source}: vocab entry {rank} has no valid base64 'token_bytes' ({e!r})"
                raise ValueError(msg) from e

        audio = data.get("audio")
        audio_cfg = AudioConfig.from_dict(audio, source=str(source)) if audio is not None else AudioConfig()
        return cls(pieces, specials, audio=audio_cfg, path=Path(source) if isinstance(source, Path) else None)

    # ---- ids -> text -------------------------------------------------------------------------

    def _check_id(self, token_id: int) -> int:
        try:
            i = operator.index(token_id)  # accepts int and numpy integers, rejects floats
        except TypeError:
            raise TypeError(f"token id must be an integer, got {type(token_id).__name__}") from None
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
        return i

    def is_special(self, token_id: int) -> bool:
        """True for ids below ``num_special`` (control tokens, no text)."""
        return self._check_id(token_id) < self.num_special

    def special_token_id(self, token_str: str) -> int:
        """Id of the special token named ``token_str`` (e.g. ``"[STREAMING_PAD]"``)."""
        try:
            return self._special_ids[token_str]
        except KeyError:
            raise ValueError(f"unknown special token {token_str!r}") from None

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token; ``b""`` for special tokens. Raises ValueError if out of range."""
        i = self._check_id(token_id)
        return self._pieces[i - self.num_special] if i >= self.num_special else b""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids: special ids are skipped, text bytes concatenated and decoded
        as UTF-8 with replacement.

        This equals mistral-common's ``Tekkenizer.decode(ids, SpecialTokenPolicy.IGNORE)`` except
        when a special id sits inside a multi-byte character: mistral-common decodes each run of
        text tokens between specials separately (``_decode_all`` groups them), which turns both
        halves into U+FFFD, whereas here the character survives, as it does in streaming output.
        """
        ns, pieces = self.num_special, self._pieces
        data = b"".join(pieces[i - ns] for i in map(self._check_id, ids) if i >= ns)
        return data.decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> str:
        """Display string of one id: the name of a special token (e.g. ``"[STREAMING_PAD]"``), or
        the token's bytes decoded on their own (U+FFFD for a partial character)."""
        i = self._check_id(token_id)
        if i < self.num_special:
            return self._specials[i]
        return self._pieces[i - self.num_special].decode("utf-8", errors="replace")

    def stream(self) -> StreamingDecoder:
        """A fresh :class:`StreamingDecoder` over this vocabulary."""
        return StreamingDecoder(self)

    def __repr__(self) -> str:
        return (f"Tekken(vocab_size={self.vocab_size}, num_special={self.num_special}, "
                f"path={str(self.path) if self.path else None!r})")


class StreamingDecoder:
    """Turns ids into text one at a time, for printing a transcript as it is generated.

    An incomplete UTF-8 sequence at the end of a token is held back until later tokens complete it.
    Each call costs O(len(token bytes)); nothing is re-decoded. For any id sequence,
    ``"".join(d.push(i) for i in ids) + d.flush() == tokenizer.decode(ids)``.
    """

    def __init__(self, tokenizer: Tekken) -> None:
        self._tok = tokenizer
        # CPython's incremental UTF-8 decoder yields, over any split of the bytes, exactly the text
        # a one-shot bytes.decode(errors="replace") gives (same U+FFFD substitution rule).
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly ``""``)."""
        data = self._tok.token_bytes(token_id)
        return self._utf8.decode(data) if data else ""

    def flush(self) -> str:
        """End of stream: return any held-back bytes (as U+FFFD) and reset for reuse."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _special_names(entries: Any, num_special: int, source: str | Path) -> list[str]:
    """Names of ids 0..num_special-1. Missing ranks get ``<SPECIAL_{i}>`` as in mistral-common."""
    names = [f"<SPECIAL_{i}>" for i in range(num_special)]
    if entries is None:  # old files (<= v7): mistral-common's built-in names for ranks 0..19
        for i, name in enumerate(_DEPRECATED_SPECIAL_TOKENS[:num_special]):
            names[i] = name
        return names
    if not isinstance(entries, list):
        raise ValueError(f"{source}: 'special_tokens' must be a list")
    for k, entry in enumerate(entries):
        try:
            rank, name = operator.index(entry["rank"]), entry["token_str"]
        except (KeyError, TypeError) as e:
            msg = f"{source}: special_tokens[{k}] needs an integer 'rank' and a 'token_str'"
            raise ValueError(msg) from e
        if not isinstance(name, str) or not 0 <= rank < num_special:
            raise ValueError(
                f"{source}: special_tokens[{k}] = {entry!r} must have a string token_str and a rank in "
                f"[0, {num_special})"
            )
        names[rank] = name
    return names

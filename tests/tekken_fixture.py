"""Write a small, realistic tekken.json for tests.

The regular vocabulary is the first ``n_inner`` entries of the byte-level BPE vocabulary packaged
with mistral-common (``mistral_common/data/tekken_240911.json``, 150000 entries, Apache-2.0); ranks
0..255 are the single bytes. The special tokens and ``audio`` section follow the layout of
Voxtral-Mini-4B-Realtime's tekken.json (spec §1.4): 1000 specials with <unk>=0, <s>=1, </s>=2,
[STREAMING_PAD]=32, [STREAMING_WORD]=33 and ``<SPECIAL_i>`` elsewhere.

Usage from a test:  ``from tekken_fixture import write_tekken; path = write_tekken(tmp_path)``
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import mistral_common

NUM_SPECIAL = 1000
# Ranks 0-19 in mistral-common's canonical order (Tekkenizer.DEPRECATED_SPECIAL_TOKENS) so that
# MistralTokenizer / HF's MistralCommonBackend accept the file; 24/25/34-36 are fixture-only guesses
# (the realtime prompt needs only 1 and 32).
_CANONICAL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
              "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
              "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
NAMED_SPECIALS = {**dict(enumerate(_CANONICAL)), 24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[STREAMING_PAD]",
                  33: "[STREAMING_WORD]", 34: "[TRANSCRIBE]", 35: "[ARGS]", 36: "[CALL_ID]"}

REALTIME_AUDIO = {
    "sampling_rate": 16000,
    "frame_rate": 12.5,
    "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
    "chunk_length_s": None,
    "transcription_format": "streaming",
    "transcription_delay_ms": 480,
    "streaming_look_ahead_ms": 2.5,
    "streaming_look_back_ms": 52.5,
    "streaming_n_left_pad_tokens": 32,
}


def packaged_tekken_path() -> Path:
    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


@lru_cache(maxsize=1)
def _packaged() -> dict:
    return json.loads(packaged_tekken_path().read_text(encoding="utf-8"))


def build_tekken(n_inner: int = 1048) -> dict:
    """tekken.json contents with ``n_inner`` regular tokens (ids 1000 .. 1000 + n_inner - 1)."""
    src = _packaged()
    special = [{"rank": i, "token_str": NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
               for i in range(NUM_SPECIAL)]
    return {
        "config": {
            "pattern": src["config"]["pattern"],
            "num_vocab_tokens": n_inner,
            "default_vocab_size": NUM_SPECIAL + n_inner,
            "default_num_special_tokens": NUM_SPECIAL,
            "version": "v13",
        },
        "vocab": src["vocab"][:n_inner],
        "special_tokens": special,
        "audio": dict(REALTIME_AUDIO, audio_encoding_config=dict(REALTIME_AUDIO["audio_encoding_config"])),
    }


def write_tekken(out_dir: str | os.PathLike[str], n_inner: int = 1048) -> Path:
    """Write ``out_dir/tekken.json`` (directory created if needed) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tekken.json"
    path.write_text(json.dumps(build_tekken(n_inner)), encoding="utf-8")
    return path

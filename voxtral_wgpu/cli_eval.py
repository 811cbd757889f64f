"""``voxtral-wgpu eval``: WER / CER of one or more models at one or more delays on a dataset."""

from __future__ import annotations

import argparse
import json
import sys


def add_eval_command(sub) -> None:
    """Add the ``eval`` subcommand to the CLI's subparsers."""
    from .evaluate import FORMATS

    p = sub.add_parser(
        "eval", help="word / character error rates on a dataset (LibriSpeech, FLEURS, JSONL manifest)",
        description="Transcribe a dataset with every --model at every --transcription-delay-ms and print one "
                    "table of WER, CER, substitutions / deletions / insertions, RTF and token agreement with "
                    "the first model. Text is normalised first (Whisper's English rules for English, a basic "
                    "normaliser otherwise; see voxtral_wgpu/normalize.py).")
    p.add_argument("--model", "-m", action="append", default=None,
                   help="a model directory, .gguf file or Hugging Face repo id (ORG/NAME[:FILE.gguf]); repeat "
                        "to compare models (default: mistralai/Voxtral-Mini-4B-Realtime-2602)")
    p.add_argument("--dataset", "-d", required=True,
                   help="LibriSpeech folder, FLEURS tsv (or its language folder), or a JSONL manifest")
    p.add_argument("--format", choices=FORMATS, default=None, help="dataset layout (default: guessed from the path)")
    p.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    p.add_argument("--transcription-delay-ms", type=int, nargs="+", default=None, metavar="D",
                   help="one or more delays, 80..2400 in steps of 80 (default: each model's, 480)")
    p.add_argument("--output", "-o", default=None, help="write one JSON line per utterance and model x delay here")
    p.add_argument("--summary-json", default=None, help="write the table's figures here as JSON")
    p.add_argument("--normalizer", choices=("auto", "english", "basic", "none"), default="auto",
                   help="text normalisation before scoring (default auto: english for English data, basic otherwise)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="utterances per call of a batched engine, where the model has one (default 8)")
    p.add_argument("--offline", action="store_true", help="never touch the network (models from the HF cache only)")
    p.add_argument("--kv-cache", choices=("f32", "f16"), default=None,
                   help="attention cache storage (default: f32 for BF16 weights, f16 for GGUF models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table, load_dataset

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, not {args.batch_size}")
    fmt, utts = load_dataset(args.dataset, args.format, args.limit)
    models = args.model or [None]
    print(f"{len(utts)} utterances ({fmt}) x {len(models)} model(s) x "
          f"{len(args.transcription_delay_ms or [None])} delay(s)", file=sys.stderr)
    summaries = evaluate(models, utts, args.transcription_delay_ms, normalizer=args.normalizer, output=args.output,
                         progress=not args.no_progress, batch_size=args.batch_size,
                         load_kwargs={"offline": args.offline or None, "kv_cache": args.kv_cache})
    print(format_table(summaries))
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump([s.as_dict() for s in summaries], f, indent=1)
    errors = sum(s.errors for s in summaries)
    if errors:
        print(f"voxtral-wgpu: {errors} error row(s) (utterances that could not be read or transcribed, per "
              "model and delay); see their messages"
              + (f" in {args.output}" if args.output else ""), file=sys.stderr)
    return 0 if any(s.utterances for s in summaries) else 1

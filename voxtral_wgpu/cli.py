"""Command line: ``voxtral-wgpu transcribe AUDIO... --model PATH`` and friends (also ``python -m voxtral_wgpu``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every command that loads a model shares (see :func:`load_model`)."""
    p.add_argument("--model", "-m", default=None,
                   help="model directory (params.json, consolidated.safetensors, tekken.json), a .gguf file, "
                        "or a Hugging Face repo id, fetched into the HF cache on first use (ORG/NAME:FILE.gguf "
                        "picks a GGUF; default: mistralai/Voxtral-Mini-4B-Realtime-2602)")
    p.add_argument("--offline", action="store_true",
                   help="never touch the network: the model must be a local path or in the HF cache "
                        "(also HF_HUB_OFFLINE=1)")
    p.add_argument("--tokenizer", default=None, help="tekken.json, when it is not beside the weights")
    p.add_argument("--transcription-delay-ms", type=int, default=None,
                   help="delay between audio and text: 80..2400 in steps of 80 (default: the model's, 480)")
    p.add_argument("--embeddings", choices=("gpu", "cpu"), default=None,
                   help="GGUF models: input embeddings gathered on the GPU (default) or dequantised on the CPU "
                        "(the browser build's way; same result)")
    p.add_argument("--kv-cache", choices=("f32", "f16"), default=None,
                   help="attention cache storage (default: f32 for BF16 weights, f16 for GGUF models)")


def load_model(args):
    import voxtral_wgpu

    return voxtral_wgpu.load(args.model, transcription_delay_ms=args.transcription_delay_ms,
                             tokenizer=args.tokenizer, embeddings=args.embeddings, kv_cache=args.kv_cache,
                             offline=getattr(args, "offline", None))


def _output_formats() -> list[str]:
    try:
        from .subtitles import FORMATS

        return list(FORMATS)
    except ImportError:
        return ["txt", "json"]


def cmd_transcribe(args) -> int:
    model = load_model(args)
    status = 0
    for audio in args.audio:
        try:
            tr = model.transcribe(audio, progress=None if not args.no_progress else False)
        except (OSError, ValueError) as e:
            print(f"voxtral-wgpu: {audio}: {e}", file=sys.stderr)
            status = 1
            continue
        out = sys.stdout
        if args.output_dir is not None:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(args.output_dir) / f"{Path(audio).stem}.{args.output_format}", "w", encoding="utf-8")
        try:
            _write(tr, args.output_format, out, source=audio)
        finally:
            if out is not sys.stdout:
                out.close()
    return status


def _write(tr, fmt: str, out, source: str) -> None:
    try:
        from .subtitles import write_transcript
    except ImportError:
        write_transcript = None
    if write_transcript is not None:
        write_transcript(tr, fmt, out)
        return
    if fmt == "json":
        json.dump({"file": source, "text": tr.text, "token_ids": tr.token_ids,
                   "transcription_delay_ms": tr.transcription_delay_ms, "duration_s": tr.duration_s},
                  out, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(tr.text + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxtral-wgpu",
                                     description="Streaming speech recognition with Voxtral Mini 4B Realtime on WebGPU")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="transcribe audio files")
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3, ...)")
    add_model_args(p)
    p.add_argument("--output-format", "-f", default="txt", choices=_output_formats())
    p.add_argument("--output-dir", "-o", default=None, help="write one file per input here instead of stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_transcribe)

    for module, hook in (("cli_stream", "add_stream_commands"), ("quantize", "add_cli"),
                         ("web", "add_cli"), ("bench", "add_cli"), ("cli_eval", "add_eval_command")):
        try:
            mod = __import__(f"voxtral_wgpu.{module}", fromlist=[hook])
        except ImportError:
            continue
        if hasattr(mod, hook):
            getattr(mod, hook)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"voxtral-wgpu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``voxtral-wgpu transcribe AUDIO... --model PATH`` and friends (also ``python -m voxtral_wgpu``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_support import (PROG, OneLineArgumentParser, UsageError, check_output_dir, check_output_file, delay_ms,
                          gguf_model, host_name, interrupts, model_source, one_line, port_number, quiet_gpu_runtime,
                          retype_options)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every command that loads a model shares (see :func:`load_model`)."""
    p.add_argument("--model", "-m", default=None, type=model_source,
                   help="model directory (params.json, consolidated.safetensors, tekken.json), a .gguf file, "
                        "or a Hugging Face repo id, fetched into the HF cache on first use (ORG/NAME:FILE.gguf "
                        "picks a GGUF; default: mistralai/Voxtral-Mini-4B-Realtime-2602)")
    p.add_argument("--offline", action="store_true",
                   help="never touch the network: the model must be a local path or in the HF cache "
                        "(also HF_HUB_OFFLINE=1)")
    p.add_argument("--tokenizer", default=None, help="tekken.json, when it is not beside the weights")
    p.add_argument("--transcription-delay-ms", type=delay_ms, default=None,
                   help="delay between audio and text: 80..2400 in steps of 80 (default: the model's, 480)")
    p.add_argument("--embeddings", choices=("gpu", "cpu"), default=None,
                   help="GGUF models: input embeddings gathered on the GPU (default) or dequantised on the CPU "
                        "(the browser build's way; same result)")
    p.add_argument("--kv-cache", choices=("f32", "f16"), default=None,
                   help="attention cache storage (default: f32 for BF16 weights, f16 for GGUF models)")


def load_model(args):
    import voxtral_wgpu

    quiet_gpu_runtime()
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
    outputs = planned_outputs(args)  # refuse bad output paths before loading gigabytes
    model = load_model(args)
    status = 0
    for audio, out_path in zip(args.audio, outputs):
        try:
            tr = model.transcribe(audio, progress=None if not args.no_progress else False)
        except (OSError, ValueError) as e:
            print(f"{PROG}: {audio}: {e}", file=sys.stderr)
            status = 1
            continue
        with interrupts.deferred():  # Ctrl-C while writing: this transcript is written whole first
            if out_path is None:
                _write(tr, args.output_format, sys.stdout, source=audio)
                sys.stdout.flush()
            else:
                out_path.parent.mkdir(parents=True, exist_ok=True)
                _write(tr, args.output_format, out_path, source=audio)
        if interrupts.requested:
            interrupts.exit_now()
    return status


def planned_outputs(args) -> list[Path | None]:
    """The file each input's transcript goes to (None: stdout), checked before any work: two inputs
    with the same name (d1/x.wav, d2/x.wav) would write the same DIR/x.txt, so that is refused;
    existing transcripts are replaced, and the command says so."""
    if args.output_dir is None:
        return [None] * len(args.audio)
    out_dir = check_output_dir(args.output_dir)
    outputs = [out_dir / f"{Path(audio).stem}.{args.output_format}" for audio in args.audio]
    first_input = {}
    for audio, out in zip(args.audio, outputs):
        if out in first_input:
            raise UsageError(f"{first_input[out]} and {audio} would both be written to {out}; "
                             "transcribe them in separate runs with different --output-dir")
        first_input[out] = audio
    for out in outputs:
        check_output_file(out, inputs=args.audio, what="transcript", parent_made_later=True)
    existing = [str(o) for o in outputs if o.exists()]
    if existing:
        print(f"{PROG}: replacing {len(existing)} existing transcript{'s' if len(existing) > 1 else ''}: "
              + ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else ""), file=sys.stderr)
    return outputs


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
    parser = OneLineArgumentParser(prog=PROG,
                                   description="Streaming speech recognition with Voxtral Mini 4B Realtime on WebGPU")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="transcribe audio files")
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3, ...)")
    add_model_args(p)
    p.add_argument("--output-format", "-f", default="txt", choices=_output_formats())
    p.add_argument("--output-dir", "-o", default=None,
                   help="write one file per input here (NAME.FORMAT) instead of stdout; an existing transcript "
                        "is replaced (the command says so), two inputs with the same NAME are refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_transcribe, ctrl_c_exits=True)

    for module, hook in (("cli_stream", "add_stream_commands"), ("quantize", "add_cli"),
                         ("web", "add_cli"), ("bench", "add_cli"), ("cli_eval", "add_eval_command")):
        try:
            mod = __import__(f"voxtral_wgpu.{module}", fromlist=[hook])
        except ImportError:
            continue
        if hasattr(mod, hook):
            getattr(mod, hook)(sub)
    # web.py declares its options; the same checked types as ours give its bad values one-line errors
    retype_options(sub.choices.get("web"), {"port": port_number, "host": host_name, "model": gguf_model})
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 some inputs failed (each said so), 2 a usage or input
    error (one line on stderr), 130 interrupted by Ctrl-C."""
    args = build_parser().parse_args(argv)  # bad options: one line, exit 2
    handles_ctrl_c = getattr(args, "ctrl_c_exits", False) and interrupts.install()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our stdout went away (e.g. `| head`): nothing left to say
        _silence_stdout()
        return 1
    except Exception as e:
        message = _error_message(e, args)
        if message is None:
            raise  # a bug: its traceback is what a report needs
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if handles_ctrl_c:
            interrupts.uninstall()


def _error_message(e: Exception, args) -> str | None:
    """One line for an error caused by the input or the environment; None for anything else."""
    from .cli_stream import MicrophoneError
    from .gpu import GpuError

    if isinstance(e, MemoryError):
        return "out of memory"
    if not isinstance(e, (OSError, ValueError, GpuError, MicrophoneError)):
        return None
    text = one_line(e)
    if isinstance(e, OSError) and e.filename is None and getattr(args, "port", None) is not None:
        # socket errors name neither the address nor the port
        text = f"cannot serve on {args.host}:{args.port}: {one_line(e.strerror or e)}"
    return text


def _silence_stdout() -> None:
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())

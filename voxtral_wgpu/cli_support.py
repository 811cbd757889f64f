"""What every ``voxtral-wgpu`` command shares besides the model options: one-line argument errors,
argument types that check ranges, output-path checks made before the work, Ctrl-C handling, and
keeping stderr free of other libraries' noise."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

PROG = "voxtral-wgpu"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C
AUDIO_MAGIC = (b"RIFF", b"fLaC", b"OggS", b"ID3", b"FORM", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")


class UsageError(ValueError):
    """A command line that cannot work, found before any work starts; printed as one line, exit 2."""


# ------------------------------------------------------------------------------ one-line errors
class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before its error; a wrong option gets one line here
    (the usage stays one ``--help`` away). Subparsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------ argument types
def _type(name: str):
    """Name an argparse type function: argparse shows ``invalid <name> value`` for a ValueError
    without text, and our own message for an ArgumentTypeError."""
    def deco(f):
        f.__name__ = name
        return f
    return deco


@_type("port")
def port_number(text: str) -> int:
    """TCP port 0..65535 (0: any free port)."""
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a whole number 0..65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535 (0: any free port), got {port}")
    return port


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@_type("host")
def host_name(text: str) -> str:
    """An IPv4/IPv6 address or a DNS host name (RFC 1123), e.g. 127.0.0.1, 0.0.0.0, ::1, localhost."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    if 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        return text
    raise argparse.ArgumentTypeError(f"host must be an IP address or a host name (e.g. 127.0.0.1, 0.0.0.0, "
                                     f"localhost), got {text!r}")


def bounded_float(low: float, high: float, unit: str):
    """An argparse type: a finite number in [low, high] (NaN and infinities are refused)."""
    @_type("number")
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None
        if not (math.isfinite(x) and low <= x <= high):
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g} {unit}, got {text!r}")
        return x
    return parse


@_type("delay")
def delay_ms(text: str) -> int:
    """A transcription delay in ms, checked as the model checks it (80..2400 in steps of 80)."""
    from .audio import delay_ms_to_tokens

    try:
        ms = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of ms (80, 160, ..., 2400), got {text!r}") from None
    try:
        delay_ms_to_tokens(ms)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ms


@_type("size")
def byte_size(text: str) -> int:
    from .quantize import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ------------------------------------------------------------------------------ model paths
def _looks_like_audio(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(AUDIO_MAGIC)


def _is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _user_path(text: str) -> Path:
    """``~`` expanded as the loader expands it; ``~nosuchuser`` stays as written (pathlib raises)."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        return Path(text)


MODEL_FORMS = ("a model directory (params.json, consolidated.safetensors, tekken.json), a .gguf file "
               "or a Hugging Face repo id")


def model_kind(text: str) -> str:
    """What ``--model`` names: "checkpoint" (a Mistral-native directory), "gguf" (a file, its first
    byte shard, or a directory holding one), or "repo" (not on disk: a repo id for the HF cache).
    Anything else on disk is a UsageError that says what was expected."""
    p = _user_path(text)
    if text.startswith("~") and p == Path(text):
        raise UsageError(f"{text}: cannot expand {text.split('/')[0]} (no such user)")
    if not p.exists():
        if p.with_name(p.name + ".part-000").is_file():
            return "gguf"
        return "repo"
    if p.is_file() and re.search(r"\.part-\d{3}$", p.name):
        return "gguf"  # a byte shard: the loader says which one to pass
    if p.is_dir():
        if (p / "consolidated.safetensors").exists() or (p / "params.json").exists():
            return "checkpoint"
        if any(p.glob("*.gguf")) or any(p.glob("*.gguf.part-000")):
            return "gguf"
        raise UsageError(f"{text}: no model in this directory; expected {MODEL_FORMS}")
    if _is_gguf_file(p):
        return "gguf"
    what = "an audio file" if _looks_like_audio(p) else "not a GGUF file"
    raise UsageError(f"{text}: {what}, not a model; expected {MODEL_FORMS}")


def _as_type(check):
    def parse(text: str) -> str:
        try:
            check(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return parse


@_type("model")
def model_source(text: str) -> str:
    """``--model`` of the commands that load a model: any form :func:`voxtral_wgpu.load` takes."""
    return _as_type(model_kind)(text)


@_type("checkpoint")
def checkpoint_dir(text: str) -> str:
    """quantize's input: a Mistral-native BF16 checkpoint directory."""
    p = _user_path(text)
    if p.is_dir() and (p / "consolidated.safetensors").exists():
        return text
    if p.is_file() and _is_gguf_file(p) or p.with_name(p.name + ".part-000").is_file() or (
            p.is_dir() and any(p.glob("*.gguf*"))):
        raise argparse.ArgumentTypeError(f"{text} is a GGUF model (already quantised); quantize takes a "
                                         "Mistral-native checkpoint directory (params.json, consolidated.safetensors)")
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such directory; quantize takes a Mistral-native checkpoint "
                                         "directory (params.json, consolidated.safetensors)")
    raise argparse.ArgumentTypeError(f"{text} is not a Mistral-native checkpoint directory (expected params.json "
                                     "and consolidated.safetensors in it)")


@_type("gguf")
def gguf_model(text: str) -> str:
    """web's model: the browser build runs GGUF files only."""
    try:
        kind = model_kind(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if kind == "checkpoint":
        raise argparse.ArgumentTypeError(f"{text} is a BF16 checkpoint directory; the browser build needs a GGUF "
                                         f"file: make one with `{PROG} quantize {text} MODEL.gguf`")
    if kind == "repo":
        raise argparse.ArgumentTypeError(f"{text}: no such file; expected a .gguf file (or NAME.gguf.part-000) "
                                         "with tekken.json beside it")
    return text


def retype_options(parser: argparse.ArgumentParser | None, types: dict) -> None:
    """Give the options ``dest -> type`` of a subcommand registered elsewhere the checked types of
    this module, so every command refuses the same bad values in the same way."""
    if parser is None:
        return
    for action in parser._actions:
        if action.dest in types and action.option_strings:
            action.type = types[action.dest]


# ------------------------------------------------------------------------------ output paths
def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_file(out: str | os.PathLike, inputs=(), what: str = "output", parent_made_later: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written or that is one of ``inputs``.
    Returns the path; an existing file at it is replaced (atomically, once the work is done).
    ``parent_made_later``: its directory was checked by :func:`check_output_dir` and may not exist yet."""
    p = Path(out)
    if p.is_dir():
        raise UsageError(f"{out}: is a directory; the {what} must be a file path")
    for i in inputs:
        if _same_file(p, Path(i)) or Path(os.path.abspath(p)) == Path(os.path.abspath(i)):
            raise UsageError(f"{out}: the {what} would overwrite the input {i}; choose another path")
    parent = p.parent if str(p.parent) else Path(".")
    if parent_made_later and not parent.exists():
        return p
    if not parent.is_dir():
        raise UsageError(f"{out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{out}: directory {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{out}: exists and is not writable")
    return p


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """``--output-dir``: an existing directory, or one that can be made (it is made when the first
    transcript is written); anything else is refused before any work."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a directory; --output-dir needs a directory")
    existing = d
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{out_dir}: cannot be created, {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{out_dir}: {'the output directory' if existing == d else existing} is not writable")
    return d


# ------------------------------------------------------------------------------ Ctrl-C
def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except (OSError, ValueError, RuntimeError):  # closed pipe, closed file, or a flush we interrupted
        pass


def exit_interrupted() -> None:
    """Leave now with exit status 130 and one line on stderr. Exits from inside the signal handler:
    a KeyboardInterrupt raised in wgpu's C callbacks or in a ``__del__`` would be printed as a
    traceback and swallowed, not end the command. Nothing is left half-written: transcripts are
    written whole through a temporary file and a rename (``subtitles.write_text_atomically``)."""
    _flush_stdout()
    if os.isatty(2):  # end a progress bar's line first
        os.write(2, b"\n")
    os.write(2, f"{PROG}: interrupted\n".encode())
    os._exit(INTERRUPTED_EXIT)


class Interrupts:
    """SIGINT handling of the commands that run a model. By default Ctrl-C ends the process at once
    (:func:`exit_interrupted`). Inside :meth:`deferred` it only sets :attr:`requested`, so a loop
    can stop at a safe point and still flush its text; a second Ctrl-C ends the process at once."""

    def __init__(self):
        self.requested = False
        self._deferring = False
        self._previous = None

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers belong to the main thread; KeyboardInterrupt applies there
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self._deferring and not self.requested:
            self.requested = True
            return
        self.requested = True
        exit_interrupted()

    @staticmethod
    def exit_now() -> None:
        exit_interrupted()

    @contextmanager
    def deferred(self):
        was, self._deferring = self._deferring, True
        try:
            yield self
        finally:
            self._deferring = was


interrupts = Interrupts()


# ------------------------------------------------------------------------------ stderr noise
class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_gpu_runtime() -> None:
    """Keep lines on stderr that are not about the user's command away, before the GPU starts:
    wgpu's "Forcing backend" notice (logged whenever WGPU_BACKEND_TYPE is set) and libwayland's
    "XDG_RUNTIME_DIR is invalid or not set" (printed twice by Mesa's Vulkan drivers when the
    variable is unset or not an absolute path, as under cron, ssh or containers). wgpu's real
    warnings and errors still come through."""
    import wgpu  # noqa: F401  (creates its "wgpu" logger; adding the filter first would replace its class)

    log = logging.getLogger("wgpu")
    if not any(isinstance(f, _DropMessages) for f in log.filters):
        log.addFilter(_DropMessages(("Forcing backend",)))
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR", "")
    if not (os.path.isabs(runtime_dir) and os.path.isdir(runtime_dir)):
        os.environ["XDG_RUNTIME_DIR"] = private_runtime_dir()


def private_runtime_dir() -> str:
    """A directory owned by this user with mode 0700, as the XDG spec asks of XDG_RUNTIME_DIR;
    one per user, reused by every run (nothing is written in it)."""
    base = Path(tempfile.gettempdir()) / f"{PROG}-runtime-{os.getuid() if hasattr(os, 'getuid') else 0}"
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = base.lstat()
        if base.is_dir() and not base.is_symlink() and st.st_uid == os.getuid() and st.st_mode & 0o077 == 0:
            return str(base)
    except OSError:
        pass
    return tempfile.mkdtemp(prefix=f"{PROG}-runtime-")  # someone else's directory has that name

"""The command line as a user meets it: Ctrl-C, output paths that would lose data, bad option
values, and a quiet stderr. Commands run in-process through ``cli.main`` where they can (the model
load replaced where only the checks before it matter), in a subprocess where the process itself is
under test (signals, what other libraries print)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_reference import TINY_SW, synth_audio
from voxtral_wgpu import cli, cli_support

CLI = [sys.executable, "-m", "voxtral_wgpu"]


@pytest.fixture(scope="module")
def ref(tiny_ref):
    return tiny_ref(TINY_SW)


@pytest.fixture(scope="module")
def files(ref, tmp_path_factory):
    """A short and a long clip, a GGUF of the tiny model (tekken.json beside it) and a text file."""
    import soundfile as sf

    from voxtral_wgpu.quantize import quantize

    d = tmp_path_factory.mktemp("cli_files")
    sf.write(d / "short.wav", synth_audio(1.2, seed=5), 16000, subtype="PCM_16")
    sf.write(d / "long.wav", synth_audio(30.0, seed=6), 16000, subtype="PCM_16")
    quantize(ref.out_dir, d / "gguf" / "m.gguf")
    (d / "notes.txt").write_text("not a model\n")
    return d


def run_main(argv) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process: (exit status, stdout, stderr); argparse's exits included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxtral-wgpu"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


class ReachedTheWork(Exception):
    """Raised where a command would start loading a model: its arguments all passed the checks."""


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(args):
        raise ReachedTheWork

    monkeypatch.setattr(cli, "load_model", refuse)
    from voxtral_wgpu import cli_stream

    monkeypatch.setattr(cli_stream, "_load", refuse)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ Ctrl-C
def _gpu_started(pid: int) -> bool:
    """The child has created its GPU device (Vulkan is loaded then, not at import): it runs main()."""
    try:
        return "libvulkan" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


DELTA = re.compile(r"^\[\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\] ", re.MULTILINE)


def printed_deltas(out: str) -> list[str]:
    """The texts of `stream`'s "[start --> end] text" records (a text may hold newlines itself)."""
    if not out:
        return []
    assert DELTA.match(out) and out.endswith("\n"), out
    return [d[:-1] for d in DELTA.split(out)[1:]]


def _interrupt_at(cmd, delay_s: float, cwd: Path):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    t_end = time.monotonic() + 120
    while not _gpu_started(proc.pid) and proc.poll() is None and time.monotonic() < t_end:
        time.sleep(0.01)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when the GPU is up")
@pytest.mark.parametrize("seed", range(4))
def test_ctrl_c_exits_130_and_keeps_the_text_so_far(ref, files, tmp_path, seed):
    """SIGINT at a random point of `stream -o` and of `transcribe`: exit 130, one line saying so, no
    traceback; what `stream` printed is complete lines and -o holds that same text, whole."""
    rng = random.Random(seed)
    out_file = tmp_path / "partial.txt"
    code, out, err = _interrupt_at(CLI + ["stream", files / "long.wav", "-m", ref.out_dir, "-o", out_file],
                                   rng.uniform(0.0, 3.0), tmp_path)
    assert code == 130, err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("voxtral-wgpu: interrupted"), err
    assert not list(tmp_path.glob("*.partial")), "a temporary output was left behind"
    deltas = printed_deltas(out)  # whole records only: each delta's line was completed
    if out_file.exists():  # the interrupt came after the model was up: what was printed is kept
        assert " ".join(out_file.read_text().split()) == " ".join("".join(deltas).split())
    else:
        assert out == ""

    code, out, err = _interrupt_at(CLI + ["transcribe", files / "long.wav", "-m", ref.out_dir, "--no-progress"],
                                   rng.uniform(0.0, 2.0), tmp_path)
    assert code == 130, err
    assert err == "voxtral-wgpu: interrupted\n"


def test_ctrl_c_while_streaming_flushes_then_exits_130(ref, files, tmp_path, monkeypatch, capsys):
    """In-process: a SIGINT during feeding stops at the next chunk, the stream's remaining text is
    flushed and -o written with everything printed."""
    import voxtral_wgpu
    from voxtral_wgpu import cli_stream
    from voxtral_wgpu.stream import Stream

    model = voxtral_wgpu.load(ref.out_dir, progress=False)
    monkeypatch.setattr(cli_stream, "_load", lambda args: model)
    real_feed = Stream.feed
    calls = []

    def feed_then_interrupt(self, x):
        calls.append(len(x))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the CLI's handler only sets a flag while feeding
        return real_feed(self, x)

    monkeypatch.setattr(Stream, "feed", feed_then_interrupt)
    out_file = tmp_path / "o.json"
    assert cli.main(["stream", str(files / "long.wav"), "-m", str(ref.out_dir), "-o", str(out_file)]) == 130
    assert len(calls) == 3  # nothing fed after the interrupt
    printed = capsys.readouterr()
    doc = json.loads(out_file.read_text())
    assert doc["duration_s"] == pytest.approx(3 * 0.08, abs=1e-3)
    deltas = "".join(printed_deltas(printed.out))
    assert " ".join(deltas.split()) == " ".join(doc["text"].split())
    assert printed.err.splitlines()[-1] == f"voxtral-wgpu: interrupted; {out_file} holds the text so far"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main put Python's back


# ------------------------------------------------------------------------------ stderr
def test_a_run_prints_nothing_but_its_own_lines(ref, files, tmp_path):
    """Without XDG_RUNTIME_DIR and with WGPU_BACKEND_TYPE set, Mesa and wgpu used to add three
    lines to stderr on every run."""
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["WGPU_BACKEND_TYPE"] = os.environ.get("WGPU_BACKEND_TYPE", "Vulkan")
    r = subprocess.run(CLI + ["transcribe", str(files / "short.wav"), "-m", str(ref.out_dir), "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.strip()


def test_runtime_dir_is_private_and_reused(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    cli_support.quiet_gpu_runtime()
    d = os.environ["XDG_RUNTIME_DIR"]
    assert os.path.isabs(d) and os.path.isdir(d) and os.stat(d).st_mode & 0o077 == 0
    assert cli_support.private_runtime_dir() == d
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/mine")  # absolute but missing: replaced too
    cli_support.quiet_gpu_runtime()
    assert os.environ["XDG_RUNTIME_DIR"] == d


# ------------------------------------------------------------------------------ data loss
def test_quantize_refuses_to_overwrite_its_input(ref, tmp_path):
    from voxtral_wgpu.quantize import quantize

    d = tmp_path / "m"
    shutil.copytree(ref.out_dir, d)
    before = {p.name: _digest(p) for p in d.iterdir()}
    for target in ("consolidated.safetensors", "params.json", "tekken.json"):
        code, _, err = run_main(["quantize", d, d / target])
        assert_one_line_error(code, err, "would overwrite the input")
        with pytest.raises(ValueError, match="would overwrite the input"):
            quantize(d, d / target)
    os.symlink(d / "consolidated.safetensors", tmp_path / "link.gguf")  # the same file under another name
    assert_one_line_error(*run_main(["quantize", d, tmp_path / "link.gguf"])[::2], "would overwrite the input")
    assert {p.name: _digest(p) for p in d.iterdir()} == before


def test_quantize_puts_tekken_beside_its_output(ref, tmp_path):
    code, out, err = run_main(["quantize", ref.out_dir, tmp_path / "out" / "m.gguf"])
    assert code == 0, err
    assert (tmp_path / "out" / "tekken.json").read_bytes() == (ref.out_dir / "tekken.json").read_bytes()
    assert "tekken.json" in out
    # a different tekken.json already there: refused before anything is written
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tekken.json").write_text("{}")
    code, _, err = run_main(["quantize", ref.out_dir, tmp_path / "other" / "m.gguf"])
    assert_one_line_error(code, err, "differs")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["tekken.json"]
    # an existing output is replaced, and the command says so
    code, _, err = run_main(["quantize", ref.out_dir, tmp_path / "out" / "m.gguf"])
    assert code == 0 and "replacing" in err and str(tmp_path / "out" / "m.gguf") in err


def test_shard_size_is_bounded_before_anything_is_written(ref, tmp_path):
    from voxtral_wgpu.quantize import quantize

    code, _, err = run_main(["quantize", ref.out_dir, tmp_path / "m.gguf", "--shard-size", "1B"])
    assert_one_line_error(code, err, "more than 1000 files")
    with pytest.raises(ValueError, match="more than 1000 files"):
        quantize(ref.out_dir, tmp_path / "m.gguf", shard_size=100)
    assert list(tmp_path.iterdir()) == []


def test_transcribe_output_collisions_are_refused_before_the_work(files, tmp_path, no_model_load):
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    for d in ("d1", "d2"):
        shutil.copy(files / "short.wav", tmp_path / d / "x.wav")
    code, _, err = run_main(["transcribe", tmp_path / "d1" / "x.wav", tmp_path / "d2" / "x.wav",
                             "-o", tmp_path / "out"])
    assert_one_line_error(code, err, "would both be written to", "x.txt")
    assert not (tmp_path / "out").exists()
    code, _, err = run_main(["transcribe", files / "short.wav", "-o", files / "notes.txt"])
    assert_one_line_error(code, err, "not a directory")
    # an output that is an input (a .txt given as audio)
    code, _, err = run_main(["transcribe", files / "notes.txt", "-o", files])
    assert_one_line_error(code, err, "would overwrite the input")
    # all checks passed: the model load is next
    with pytest.raises(ReachedTheWork):
        cli.main(["transcribe", str(files / "short.wav"), "-o", str(tmp_path / "new" / "dir")])


def test_stream_output_is_checked_before_the_work(files, tmp_path, no_model_load):
    wav = tmp_path / "a.wav"
    shutil.copy(files / "short.wav", wav)
    before = _digest(wav)
    assert_one_line_error(*run_main(["stream", wav, "-o", wav])[::2], "would overwrite the input")
    assert_one_line_error(*run_main(["stream", wav, "-o", tmp_path])[::2], "is a directory")
    assert_one_line_error(*run_main(["stream", wav, "-o", tmp_path / "no" / "o.txt"])[::2], "does not exist")
    assert _digest(wav) == before
    with pytest.raises(ReachedTheWork):
        cli.main(["stream", str(wav), "-o", str(tmp_path / "o.srt")])


def test_transcribe_replaces_existing_transcripts_saying_so(ref, files, tmp_path, monkeypatch, tiny_model):
    model, _ = tiny_model(TINY_SW)
    monkeypatch.setattr(cli, "load_model", lambda args: model)
    (tmp_path / "short.txt").write_text("old\n")
    code, _, err = run_main(["transcribe", files / "short.wav", "-o", tmp_path, "--no-progress"])
    assert code == 0
    assert "replacing 1 existing transcript" in err
    assert (tmp_path / "short.txt").read_text() == model.transcribe(files / "short.wav").text + "\n"


def test_a_failed_write_keeps_the_old_file(tmp_path):
    from voxtral_wgpu.subtitles import write_text_atomically

    p = tmp_path / "t.txt"
    p.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomically(p, "new \ud800")  # a lone surrogate cannot be UTF-8: fails mid-write
    assert p.read_text() == "old\n"
    assert [q.name for q in tmp_path.iterdir()] == ["t.txt"]
    write_text_atomically(p, "new\n")
    assert p.read_text() == "new\n"


# ------------------------------------------------------------------------------ one-line errors
def test_model_paths_of_the_wrong_kind_say_what_was_expected(ref, files, no_model_load):
    assert_one_line_error(*run_main(["transcribe", files / "short.wav", "-m", files / "short.wav"])[::2],
                          "an audio file, not a model", "expected a model directory")
    assert_one_line_error(*run_main(["quantize", files / "gguf" / "m.gguf", files / "x.gguf"])[::2],
                          "is a GGUF model", "Mistral-native checkpoint directory")
    assert_one_line_error(*run_main(["web", "--model", ref.out_dir])[::2],
                          "BF16 checkpoint directory", "voxtral-wgpu quantize")
    assert_one_line_error(*run_main(["web", "--model", files / "notes.txt"])[::2], "not a GGUF file")


@pytest.mark.parametrize("argv, needle", [
    (["web", "--port", "65536"], "port must be 0..65535"),
    (["web", "--port", "-1"], "port must be 0..65535"),
    (["web", "--port", "http"], "port must be a whole number"),
    (["web", "--host", "bad host"], "host must be an IP address or a host name"),
    (["web", "--host", ""], "host must be"),
    (["stream", "{wav}", "--chunk-ms", "nan"], "--chunk-ms"),
    (["stream", "{wav}", "--chunk-ms", "inf"], "--chunk-ms"),
    (["stream", "{wav}", "--chunk-ms", "0"], "between 1 and 60000 ms"),
    (["transcribe", "{wav}", "--transcription-delay-ms", "nan"], "whole number of ms"),
    (["transcribe", "{wav}", "--transcription-delay-ms", "100"], "multiple of 80"),
    (["quantize", "{model}", "o.gguf", "--shard-size", "1e999"], "invalid size"),
    (["quantize", "{model}", "o.gguf", "--shard-size", "9" * 400], "too large"),
    (["quantize", "{model}", "o.gguf", "--shard-size", "0"], "positive"),
])
def test_bad_values_are_one_line_errors(ref, files, tmp_path, argv, needle, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.format(wav=files / "short.wav", model=ref.out_dir) for a in argv]
    if argv[0] == "web":
        argv += ["--model", str(files / "gguf" / "m.gguf")] if "--model" not in argv else []
    code, _, err = run_main(argv)
    assert_one_line_error(code, err, needle)


def test_errors_from_a_subprocess_have_no_traceback(ref, files, tmp_path):
    """The installed entry point, as a user runs it: one line, exit 2."""
    for argv in (["web", "--model", str(files / "gguf" / "m.gguf"), "--port", "99999"],
                 ["quantize", str(ref.out_dir), str(ref.out_dir / "consolidated.safetensors")],
                 ["transcribe", str(files / "short.wav"), "-m", str(files / "short.wav")]):
        r = subprocess.run(CLI + argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert_one_line_error(r.returncode, r.stderr)


# ------------------------------------------------------------------------------ parser fuzz
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
NUMBERS = st.one_of(st.integers(-10**12, 10**12).map(str),
                    st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.sampled_from(["nan", "inf", "-inf", "1e999", "0", "-0", "0x10", "1_000", "", " 8 ", "80",
                                     "480", "8000", "65535", "65536", "512MB", "1B", "64KB", "2GiB", "1.5k"]))


def _values(files, ref, action):
    paths = st.sampled_from([str(files / "short.wav"), str(files / "gguf" / "m.gguf"), str(ref.out_dir),
                             str(files / "notes.txt"), str(files), "nowhere/x", "org/repo", "o.txt", "o.json",
                             "-", "--"])
    choices = st.sampled_from(list(action.choices)) if action.choices else st.nothing()
    return st.one_of(choices, NUMBERS, paths, TEXT)


def _argv_strategy(files, ref, parser, command):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    parts = []
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        if not action.option_strings:  # positional
            n = 1 if action.nargs in (None, 1) else 2
            parts.append(st.lists(_values(files, ref, action), min_size=1, max_size=n))
        elif action.nargs == 0:  # a flag
            parts.append(st.sampled_from([[], [action.option_strings[0]]]))
        else:
            parts.append(st.one_of(st.just([]), _values(files, ref, action).map(
                lambda v, o=action.option_strings: [o[-1], v])))
    return st.tuples(*parts).map(lambda ps: [command] + [x for p in ps for x in p])


def _check_values_the_work_gets(values: dict) -> None:
    """What a command hands to its work must be usable there: every range the options promise."""
    from voxtral_wgpu.audio import delay_ms_to_tokens
    from voxtral_wgpu.quantize import MAX_SIZE

    if values.get("port") is not None:
        assert isinstance(values["port"], int) and 0 <= values["port"] <= 65535
    if values.get("host") is not None:
        cli_support.host_name(values["host"])
    if values.get("chunk_ms") is not None:
        assert math.isfinite(values["chunk_ms"]) and 1 <= values["chunk_ms"] <= 60000
    if values.get("transcription_delay_ms") is not None:
        delay_ms_to_tokens(values["transcription_delay_ms"])
    if values.get("shard_size") is not None:
        assert isinstance(values["shard_size"], int) and 0 < values["shard_size"] < MAX_SIZE


@pytest.mark.parametrize("command", ["transcribe", "stream", "listen", "quantize", "web"])
def test_fuzz_every_option(command, ref, files, tmp_path_factory, monkeypatch):
    """Random values for every option of a command: it reaches its work with values in range, or it
    ends with one line naming what is wrong and exit status 2; never a traceback (any other
    exception fails here)."""
    from voxtral_wgpu import cli_stream, quantize as quantize_mod, web

    work = tmp_path_factory.mktemp(f"fuzz_{command}")
    monkeypatch.chdir(work)  # relative outputs land here

    def reach_model_load(args):
        raise ReachedTheWork(vars(args))

    def reach_quantize(model_dir, out, *, qtype, shard_size, progress):
        raise ReachedTheWork({"shard_size": shard_size})

    def reach_server(model, host, port, **kw):
        raise ReachedTheWork({"host": host, "port": port})

    monkeypatch.setattr(cli, "load_model", reach_model_load)
    monkeypatch.setattr(cli_stream, "_load", reach_model_load)
    monkeypatch.setattr(cli_stream, "open_microphone",
                        lambda device, chunk_ms: reach_model_load(argparse.Namespace(chunk_ms=chunk_ms)))
    monkeypatch.setattr(quantize_mod, "quantize", reach_quantize)
    monkeypatch.setattr(web, "make_server", reach_server)
    parser = cli.build_parser()

    @settings(max_examples=int(os.environ.get("VOXTRAL_CLI_FUZZ_EXAMPLES", "150")), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(argv=_argv_strategy(files, ref, parser, command))
    def check(argv):
        try:
            code, out, err = run_main(argv)
        except ReachedTheWork as reached:
            _check_values_the_work_gets(reached.args[0])
            return
        if code == 0:
            return
        assert_one_line_error(code, err)

    check()


# ------------------------------------------------------------------------------ argument types
def test_argument_types_accept_what_they_should():
    import argparse

    assert cli_support.port_number("0") == 0 and cli_support.port_number("65535") == 65535
    for host in ("127.0.0.1", "0.0.0.0", "::1", "localhost", "my-host.example.org", "example.org."):
        assert cli_support.host_name(host) == host
    for host in ("-bad.org", "a..b", "x" * 64, "a b", "ho$t", "1.2.3.4:80"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_support.host_name(host)
    chunk = cli_support.bounded_float(1, 60000, "ms")
    assert chunk("80") == 80.0 and chunk("1") == 1.0
    for bad in ("nan", "inf", "-inf", "0.5", "60001", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            chunk(bad)
    assert [cli_support.delay_ms(s) for s in ("80", "480", "2400")] == [80, 480, 2400]
    assert cli_support.byte_size("512MB") == 512 << 20
    assert math.isfinite(float(cli_support.byte_size("1023T")))

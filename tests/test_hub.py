"""Models on first use (voxtral_wgpu.hub): fetched from a fake Hugging Face Hub on loopback.

The fake Hub (FakeHub below) is a threaded http.server on 127.0.0.1 serving the few endpoints
huggingface_hub's model_info / snapshot_download / hf_hub_download use:

    GET  /api/models/ORG/NAME[/revision/REV]          repo info: sha, siblings
    GET  /api/models/ORG/NAME/tree/REV?recursive=..   file listing (path, size, oid)
    HEAD /ORG/NAME/resolve/REV/FILE                   ETag, X-Repo-Commit, Content-Length
    GET  /ORG/NAME/resolve/REV/FILE                   the bytes; "Range: bytes=N-" -> 206

Unknown repos and files answer 404 with the X-Error-Code header the real Hub sends (RepoNotFound,
EntryNotFound), which huggingface_hub turns into its typed errors. ``drop_once[FILE] = N`` makes
the first full GET of FILE send N bytes and close the connection (an interrupted transfer).
Every request is logged, so a test can say that an offline run made none. huggingface_hub reads
HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported; the ``hub`` fixture sets both
the variables and the module constants for each test (monkeypatch undoes them).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from test_stream import write_fast_model

import voxtral_wgpu
from voxtral_wgpu import cli, hub
from voxtral_wgpu.api import resolve_model_path
from voxtral_wgpu.quantize import quantize

REPO = "someorg/tiny-voxtral"
GGUF_REPO = "someorg/tiny-voxtral-gguf"


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"sha": str, "files": {path: bytes}}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.drop_once: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, repo: str, files: dict[str, bytes]) -> None:
        sha = hashlib.sha1(repr((repo, sorted(files.items()))).encode()).hexdigest()  # a 40-hex commit id
        self.repos[repo] = {"sha": sha, "files": dict(files)}

    def gets(self, name: str) -> list[str | None]:
        """The Range headers of the GETs of file ``name`` (None: a whole-file GET)."""
        return [r for m, p, r in self.log if m == "GET" and p.endswith("/" + name)]

    def _handler(self):
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep pytest's output clean
                pass

            def _send(self, code, body=b"", headers=None, head=False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj, code=200, headers=None):
                self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

            def _repo_not_found(self):
                self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

            def _route(self, head):
                path = unquote(urlsplit(self.path).path)
                with hub_.lock:
                    hub_.log.append((self.command, path, self.headers.get("Range")))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
                if m:
                    repo = hub_.repos.get(m.group(1))
                    if repo is None:
                        return self._repo_not_found()
                    return self._json({"id": m.group(1), "modelId": m.group(1), "sha": repo["sha"], "private": False,
                                       "siblings": [{"rfilename": f} for f in sorted(repo["files"])]})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+", path)
                if m:
                    repo = hub_.repos.get(m.group(1))
                    if repo is None:
                        return self._repo_not_found()
                    return self._json([{"type": "file", "path": f, "size": len(b),
                                        "oid": hashlib.sha1(b).hexdigest()} for f, b in sorted(repo["files"].items())])
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m:
                    return self._file(m.group(1), m.group(2), m.group(3), head)
                self._json({"error": "no such endpoint"}, 404)

            def _file(self, repo_id, rev, name, head):
                repo = hub_.repos.get(repo_id)
                if repo is None or rev not in ("main", repo["sha"]):
                    return self._repo_not_found()
                data = repo["files"].get(name)
                if data is None:
                    return self._json({"error": "Entry not found"}, 404,
                                      {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo["sha"]})
                headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": repo["sha"],
                           "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
                rng = self.headers.get("Range")
                if head:
                    return self._send(200, data, headers, head=True)
                if rng:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    return self._send(206, data[start:], headers)
                with hub_.lock:
                    cut = hub_.drop_once.pop(name, None)
                if cut is None:
                    return self._send(200, data, headers)
                # announce the whole file, send part of it, hang up: a connection lost mid-transfer
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[:cut])
                self.wfile.flush()
                self.close_connection = True

        return Handler


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    h = FakeHub()
    h.thread.start()
    try:
        cache = tmp_path / "hf_home" / "hub"
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # the module constants were computed from the environment at import time
        monkeypatch.setattr(hc, "ENDPOINT", h.url)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hc, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        h.cache = cache
        yield h
    finally:
        h.server.shutdown()
        h.server.server_close()
        h.thread.join(timeout=10)


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> Path:
    return write_fast_model(tmp_path_factory.mktemp("hub_native"))


def native_files(d: Path) -> dict[str, bytes]:
    return {f: (d / f).read_bytes() for f in ("params.json", "consolidated.safetensors", "tekken.json")}


# ------------------------------------------------------------------------------------------------
def test_first_run_fetches_then_offline_reads_the_cache(fake_hub, native_dir, gpu, monkeypatch):
    files = native_files(native_dir)
    # other formats in the repo must not be downloaded
    fake_hub.add(REPO, {**files, "README.md": b"# tiny", "model.safetensors": b"\0" * 4096})
    model = voxtral_wgpu.load(REPO, gpu=gpu, progress=False)
    assert model.cfg.decoder.dim == 64
    fetched = sorted({p.rsplit("/", 1)[1] for m, p, _ in fake_hub.log if m == "GET" and "/resolve/" in p})
    assert fetched == sorted(files)
    root = resolve_model_path(REPO, offline=True)
    assert {f: (root / f).read_bytes() for f in files} == files

    n = len(fake_hub.log)
    assert resolve_model_path(REPO, offline=True) == root  # --offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the environment variable, set after import
    m2 = voxtral_wgpu.load(REPO, gpu=gpu, progress=False)
    assert m2.cfg.decoder.dim == 64
    assert len(fake_hub.log) == n, fake_hub.log[n:]  # no request at all


def test_second_online_run_downloads_nothing(fake_hub, native_dir):
    fake_hub.add(REPO, native_files(native_dir))
    first = resolve_model_path(REPO, progress=False)
    n_gets = len(fake_hub.gets("consolidated.safetensors"))
    assert resolve_model_path(REPO, progress=False) == first
    assert len(fake_hub.gets("consolidated.safetensors")) == n_gets == 1


def test_interrupted_download_resumes(fake_hub, native_dir, monkeypatch):
    import huggingface_hub.constants as hc

    # huggingface_hub writes (and so resumes from) whole chunks of DOWNLOAD_CHUNK_SIZE (10 MB); a
    # smaller chunk lets a 270 kB file show it
    chunk = 16384
    monkeypatch.setattr(hc, "DOWNLOAD_CHUNK_SIZE", chunk)
    files = native_files(native_dir)
    fake_hub.add(REPO, files)
    cut = 5 * chunk + 1000
    assert len(files["consolidated.safetensors"]) > 2 * cut
    fake_hub.drop_once["consolidated.safetensors"] = cut
    root = resolve_model_path(REPO, progress=False)
    assert (root / "consolidated.safetensors").read_bytes() == files["consolidated.safetensors"]
    # the first GET was cut; the retry asked only for what had not been written
    assert fake_hub.gets("consolidated.safetensors") == [None, f"bytes={5 * chunk}-"]


def test_gguf_repo_with_shards(fake_hub, native_dir, tmp_path, gpu):
    out = tmp_path / "q"
    out.mkdir()
    shards = quantize(native_dir, out / "tiny-q4.gguf", qtype="q4_0", shard_size=40_000)
    assert len(shards) > 1
    single = quantize(native_dir, out / "tiny-q8.gguf", qtype="q8_0")
    files = {p.name: p.read_bytes() for p in shards + single}
    files["tekken.json"] = (native_dir / "tekken.json").read_bytes()
    fake_hub.add(GGUF_REPO, files)

    with pytest.raises(hub.ModelFetchError, match=r"2 GGUF files .*tiny-q4\.gguf.*pick one with "
                                                   r"someorg/tiny-voxtral-gguf:FILE\.gguf"):
        resolve_model_path(GGUF_REPO, progress=False)
    p = resolve_model_path(GGUF_REPO + ":tiny-q4.gguf", progress=False)
    assert p.name == "tiny-q4.gguf.part-000"
    assert sorted(x.name for x in p.parent.iterdir()) == sorted([s.name for s in shards] + ["tekken.json"])
    model = voxtral_wgpu.load(GGUF_REPO + ":tiny-q4.gguf", gpu=gpu, progress=False)
    assert model.cfg.decoder.dim == 64
    assert "tiny-q8.gguf" not in {p.rsplit("/", 1)[1] for m, p, _ in fake_hub.log if m == "GET"}


def test_unknown_repo_or_file_is_a_clear_error(fake_hub, native_dir):
    fake_hub.add(REPO, native_files(native_dir))
    with pytest.raises(hub.ModelFetchError, match=r"'someorg/nothing-here'.*no Hugging Face repo of that name"):
        resolve_model_path("someorg/nothing-here", progress=False)
    with pytest.raises(hub.ModelFetchError, match=r"file 'missing\.gguf' is not in Hugging Face repo "
                                                   r"'someorg/tiny-voxtral'"):
        resolve_model_path(REPO + ":missing.gguf", progress=False)
    fake_hub.add("someorg/no-tokenizer", {"model.gguf": b"GGUF"})
    with pytest.raises(hub.ModelFetchError, match=r"'someorg/no-tokenizer' has no tekken\.json beside model\.gguf"):
        resolve_model_path("someorg/no-tokenizer", progress=False)


def test_offline_without_cache_names_the_repo_and_makes_no_request(fake_hub, capsys, tmp_path):
    fake_hub.add(REPO, {"params.json": b"{}"})
    with pytest.raises(hub.ModelFetchError, match=r"'someorg/tiny-voxtral' is not in the local Hugging Face cache"):
        resolve_model_path(REPO, offline=True)
    wav = tmp_path / "x.wav"
    wav.write_bytes(b"")
    rc = cli.main(["transcribe", str(wav), "--model", REPO, "--offline"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "someorg/tiny-voxtral" in err and "offline" in err
    assert fake_hub.log == []


def test_unreachable_hub_is_a_clear_error(fake_hub, monkeypatch):
    import huggingface_hub.constants as hc

    dead = "http://127.0.0.1:9"  # discard port: nothing listens, the connection is refused at once
    monkeypatch.setattr(hc, "ENDPOINT", dead)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(hub.ModelFetchError, match=r"could not reach http://127\.0\.0\.1:9 to fetch Hugging Face "
                                                   r"repo 'someorg/tiny-voxtral'"):
        resolve_model_path(REPO, progress=False)


def test_parse_model_spec():
    assert hub.parse_model_spec("org/name") == ("org/name", None)
    assert hub.parse_model_spec("org/name:f.gguf") == ("org/name", "f.gguf")
    for local in ("./org/name", "/abs/x", "~/x", "just-a-name", "a/b/c"):
        assert hub.parse_model_spec(local) is None
    with pytest.raises(hub.ModelFetchError, match="nothing after ':'"):
        hub.parse_model_spec("org/name:")

"""The page's server (voxtral_wgpu.web, `voxtral-wgpu web`): the manifest lists every shard with its
byte count (the page checks each download against it), and unknown paths are a plain 404."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from voxtral_wgpu.web import make_server, serve_in_thread


@pytest.fixture
def sharded_model(tmp_path):
    sizes = [1000, 1000, 17]
    for i, n in enumerate(sizes):
        (tmp_path / f"m.gguf.part-{i:03d}").write_bytes(bytes([i]) * n)
    (tmp_path / "tekken.json").write_text("{}")
    return tmp_path / "m.gguf.part-000", sizes


def test_manifest_lists_shards_and_sizes_and_404(sharded_model):
    first, sizes = sharded_model
    srv = make_server(first, "127.0.0.1", 0)
    serve_in_thread(srv)
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}/"
        man = json.load(urllib.request.urlopen(base + "model/manifest.json"))
        assert man["shards"] == [f"model/m.gguf.part-{i:03d}" for i in range(3)]
        assert man["sizes"] == sizes and man["bytes"] == sum(sizes) and man["tokenizer"] == "model/tekken.json"
        for url, n in zip(man["shards"], sizes):
            body = urllib.request.urlopen(base + url).read()
            assert len(body) == n
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "model/m.gguf.part-003")
        assert e.value.code == 404
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_https_serves_with_a_self_signed_certificate(sharded_model):
    """`voxtral-wgpu web --https`: TLS with a fresh self-signed certificate naming the host (so the
    page is a secure context from another machine on the LAN once the certificate is accepted). A
    client that connects and never starts the handshake does not hold up the others (the handshake
    ran in the accepting thread: every later connection waited on the silent one)."""
    import re
    import socket
    import ssl
    import subprocess
    import sys

    first, sizes = sharded_model
    proc = subprocess.Popen([sys.executable, "-m", "voxtral_wgpu", "web", "--model", str(first), "--https",
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"serving on (https://127\.0\.0\.1:(\d+)/)", line)
        assert m, line
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", int(m.group(2)))):  # silent
            man = json.load(urllib.request.urlopen(m.group(1) + "model/manifest.json", context=ctx, timeout=30))
        assert man["sizes"] == sizes
        pem = ssl.get_server_certificate(("127.0.0.1", int(m.group(2))))
        try:
            from cryptography import x509
        except ImportError:
            return
        san = x509.load_pem_x509_certificate(pem.encode()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def served(sharded_model):
    """The `web` server over the sharded model (no POST handler, as `voxtral-wgpu web` runs it)."""
    first, sizes = sharded_model
    # shard bytes that differ at every offset, so a slice at the wrong place can't pass
    data = bytes((i * 7 + i // 256) % 256 for i in range(sizes[1]))
    (first.parent / "m.gguf.part-001").write_bytes(data)
    srv = make_server(first, "127.0.0.1", 0, timeout=5.0)
    serve_in_thread(srv)
    try:
        yield srv.server_address[1], data
    finally:
        srv.shutdown()
        srv.server_close()


def request(port, method, path, headers=None, body=None):
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


@pytest.mark.parametrize("spec, first, last", [
    ("bytes=0-9", 0, 9), ("bytes=10-", 10, 999), ("bytes=-100", 900, 999), ("bytes=995-5000", 995, 999),
    ("bytes=-5000", 0, 999), ("bytes=999-999", 999, 999), ("bytes = 3 - 7", 3, 7)])
def test_range_is_206_with_the_files_slice(served, spec, first, last):
    """Resumable downloads and the browser's cache ask for byte ranges: the answer is that slice."""
    port, data = served
    status, h, body = request(port, "GET", "/model/m.gguf.part-001", {"Range": spec})
    assert status == 206
    assert h["content-range"] == f"bytes {first}-{last}/{len(data)}"
    assert body == data[first:last + 1] and int(h["content-length"]) == len(body)
    status, h, body = request(port, "HEAD", "/model/m.gguf.part-001", {"Range": spec})
    assert status == 206 and body == b"" and int(h["content-length"]) == last - first + 1


@pytest.mark.parametrize("spec", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_unsatisfiable_range_is_416(served, spec):
    port, data = served
    status, h, _ = request(port, "GET", "/model/m.gguf.part-001", {"Range": spec})
    assert status == 416 and h["content-range"] == f"bytes */{len(data)}"


@pytest.mark.parametrize("spec", ["bytes=5-2", "bytes=0-1,5-6", "items=0-1", "bytes=abc"])
def test_range_the_server_does_not_take_gives_the_whole_file(served, spec):
    port, data = served
    status, h, body = request(port, "GET", "/model/m.gguf.part-001", {"Range": spec})
    assert status == 200 and body == data and h["accept-ranges"] == "bytes"


def test_if_range_resumes_only_the_same_version(served):
    """A download resumed with If-Range gets the rest only if the file is unchanged (its ETag)."""
    port, data = served
    status, h, body = request(port, "GET", "/model/m.gguf.part-001")
    assert status == 200 and body == data
    status, _, body = request(port, "GET", "/model/m.gguf.part-001", {"Range": "bytes=100-", "If-Range": h["etag"]})
    assert status == 206 and body == data[100:]
    status, _, body = request(port, "GET", "/model/m.gguf.part-001", {"Range": "bytes=100-", "If-Range": '"other"'})
    assert status == 200 and body == data


def test_random_ranges_on_one_keep_alive_connection(served):
    """Hypothesis over a-b / a- / -n ranges, all on one connection (each answer framed right)."""
    import http.client

    from hypothesis import given, settings
    from hypothesis import strategies as st

    port, data = served
    n = len(data)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    @settings(max_examples=150, deadline=None)
    @given(a=st.none() | st.integers(0, 2 * n), b=st.none() | st.integers(0, 2 * n))
    def check(a, b):
        spec = f"bytes={'' if a is None else a}-{'' if b is None else b}"
        c.request("GET", "/model/m.gguf.part-001", headers={"Range": spec})
        r = c.getresponse()
        body = r.read()
        if a is None and b is None or a is not None and b is not None and b < a:
            assert r.status == 200 and body == data  # not a valid range: ignored
        elif a is None:
            assert (r.status, body) == ((416, body) if b == 0 else (206, data[max(0, n - b):]))
        elif a >= n:
            assert r.status == 416 and r.getheader("Content-Range") == f"bytes */{n}"
        else:
            last = n - 1 if b is None else min(b, n - 1)
            assert r.status == 206 and body == data[a:last + 1]
            assert r.getheader("Content-Range") == f"bytes {a}-{last}/{n}"
        if r.status == 416:  # errors close the connection
            c.close()

    try:
        check()
    finally:
        c.close()


def test_head_matches_get_without_a_body(served):
    port, data = served
    for path, n in [("/model/m.gguf.part-001", len(data)), ("/model/manifest.json", None), ("/nope", None)]:
        gs, gh, gbody = request(port, "GET", path)
        hs, hh, hbody = request(port, "HEAD", path)
        assert hs == gs and hbody == b"" and hh["content-length"] == gh["content-length"] == str(len(gbody))
        assert n is None or len(gbody) == n


def test_post_is_405_with_allow_unless_the_server_takes_posts(served, sharded_model):
    port, _ = served
    status, h, _ = request(port, "POST", "/model/manifest.json", body=b"x")
    assert status == 405 and h["allow"] == "GET, HEAD"
    status, h, _ = request(port, "PUT", "/model/m.gguf.part-001", body=b"x")
    assert status == 405 and h["allow"] == "GET, HEAD"

    posted = []
    first, _ = sharded_model
    srv = make_server(first, "127.0.0.1", 0, on_post=lambda path, body: posted.append((path, body)), timeout=5.0)
    serve_in_thread(srv)
    try:
        port = srv.server_address[1]
        assert request(port, "POST", "/result?x=1", body=b'{"ok": 1}')[0] == 200
        assert posted == [("/result", b'{"ok": 1}')]
        status, h, _ = request(port, "OPTIONS", "/")
        assert status == 405 and h["allow"] == "GET, HEAD, POST"
        status, _, _ = request(port, "POST", "/result", headers={"Content-Length": str(300 << 20)})
        assert status == 413  # refused before reading a byte of it
        assert len(posted) == 1
    finally:
        srv.shutdown()
        srv.server_close()

"""Malformed requests to `voxtral-wgpu web`'s server over raw sockets, on 127.0.0.1 only.

Every request the client finishes sending (it half-closes the socket) is answered with a well-formed
HTTP/1.x response; a request the client leaves unfinished is closed by the server within its timeout;
nothing outside the served directories is ever sent; and the server keeps serving normal requests."""
from __future__ import annotations

import json
import re
import select
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxtral_wgpu.web import LINGER, make_server, serve_in_thread

TIMEOUT = 1.0  # the server's: short, so each stalled-client case costs about a second
WAIT = TIMEOUT + LINGER + 5.0  # the longest a reply (or the server's close) may take, with slack on a busy machine
SECRET = b"a file outside every served directory 5f0c2e"
STATUS = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [^\r\n]*\r\n")
HEADER = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: [^\r\n]*\r\n")
SIZES = [1000, 1000, 17]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("webfuzz")
    pub = d / "pub"
    pub.mkdir()
    (pub / "a.txt").write_bytes(b"served")
    (d / "secret.txt").write_bytes(SECRET)
    for i, n in enumerate(SIZES):
        (d / f"m.gguf.part-{i:03d}").write_bytes(bytes(range(256)) * (n // 256) + bytes(n % 256))
    (d / "tekken.json").write_text("{}")
    # the production configuration (no on_post: POST is 405), plus a mount beside the secret file
    srv = make_server(d / "m.gguf.part-000", "127.0.0.1", 0, mounts={"/pub/": pub}, timeout=TIMEOUT)
    serve_in_thread(srv)
    try:
        yield srv.server_address[1], d
    finally:
        srv.shutdown()
        srv.server_close()


def exchange(port: int, data: bytes, *, half_close: bool = True, wait: float = WAIT) -> tuple[bytes, float]:
    """Send ``data``, optionally half-close, and read until the server closes: (bytes, seconds taken).
    Fails if the server neither closes nor stops sending within ``wait`` seconds."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered early and closed (a 414 before the whole line was sent)
            pass
        out = b""
        while True:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                pytest.fail(f"no close within {wait} s after {len(data)} bytes {data[:120]!r}; got {out[:200]!r}")
            if not b:
                break
            out += b
            assert time.monotonic() - t0 < wait + 5, "the server keeps sending"
    return out, time.monotonic() - t0


def first_response(out: bytes, head_request: bool) -> int:
    """Check the first final response is well formed (status line, header lines, the body its
    Content-Length promises); return its status code."""
    while True:
        m = STATUS.match(out)
        assert m, f"not a status line: {out[:200]!r}"
        end = out.find(b"\r\n\r\n", m.end() - 2)
        assert end >= 0, f"unterminated response head: {out[:300]!r}"
        headers = out[m.end():end + 2]
        lines = re.findall(rb"[^\r\n]*\r\n", headers)
        assert b"".join(lines) == headers and all(HEADER.fullmatch(h) for h in lines), headers
        code = int(m.group(1))
        if code >= 200:
            break
        out = out[end + 4:]  # 100 Continue, then the real answer
    n = re.search(rb"(?im)^content-length: *([0-9]+)\r$", headers)
    if n and not head_request and code not in (204, 304):
        assert len(out) - (end + 4) >= int(n.group(1)), "body shorter than its Content-Length"
    return code


def still_serving(port: int) -> None:
    out, _ = exchange(port, b"GET /model/manifest.json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert first_response(out, False) == 200
    body = out.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["sizes"] == SIZES


def check(port: int, data: bytes) -> int | None:
    out, _ = exchange(port, data)
    assert SECRET not in out
    if not data.strip(b"\r\n"):
        assert out == b"" or STATUS.match(out)  # blank lines only: no request to answer
        return None
    # a HEAD answer has no body: the method is the first word of the first non-blank line
    first = next((line for line in data.split(b"\n") if line not in (b"", b"\r")), b"")
    return first_response(out, str(first, "latin-1").split()[:1] == ["HEAD"])


# -- random requests ---------------------------------------------------------------------------------

junk = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40).map(lambda t: t.encode("latin-1"))
methods = st.one_of(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE",
                                     b"CONNECT", b"get", b"G\x00T", b"\xffGET", b""]), junk)
targets = st.one_of(
    st.sampled_from([b"/", b"/index.html", b"/model/manifest.json", b"/model/m.gguf.part-001", b"/pub/a.txt",
                     b"/pub/../secret.txt", b"/pub/%2e%2e/secret.txt", b"/pub/..%2fsecret.txt",
                     b"/pub/%2e%2e%2fsecret.txt", b"/pub//../secret.txt", b"/../../../../etc/passwd",
                     b"/shaders/../../../etc/passwd", b"//etc/passwd", b"/%2Fetc/passwd", b"/pub/%00",
                     b"/pub/a.txt%00.html", b"/%ff%fe", b"/%", b"/%zz", b"http://[::1/", b"http://x/pub/a.txt",
                     b"https://x/../secret.txt", b"*", b"example.com:443", b"/?q=%00#frag", b"/model/",
                     b"/pub/" + b"a" * 5000, b"/" + b"%2e%2e/" * 200]),
    junk, junk.map(lambda b: b"/" + b))
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/3", b"HTTP/1.1x",
                            b"HTTP/01.01", b"HTTP/1.99999999999", b"http/1.1", b"HTTP/", b""])
ranges = st.one_of(
    st.sampled_from(["bytes=0-0", "bytes=0-", "bytes=-1", "bytes=-0", "bytes=999-", "bytes=1000-", "bytes=5-2",
                     "bytes=0-1,4-5", "bytes=", "bytes=-", "bytes=--1", "bytes=1-2-3", "bits=0-1", "bytes=+1-2",
                     "bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes = 3 - 7", "bytes=\x00-1"]),
    st.builds(lambda a, b: f"bytes={a}-{b}", st.integers(0, 3000).map(str) | st.just(""),
              st.integers(0, 3000).map(str) | st.just("")))
header_values = st.one_of(junk, ranges.map(str.encode),
                          st.sampled_from([b"-1", b"abc", b"99999999999999999999999", b"10", b"0", b"1, 2",
                                           b"chunked", b"100-continue", b"close", b"keep-alive"]))
header_names = st.one_of(st.sampled_from([b"Host", b"Range", b"Content-Length", b"Transfer-Encoding", b"Expect",
                                          b"Connection", b"If-Range", b"Content-Type", b"X"]), junk)
headers = st.lists(st.tuples(header_names, st.sampled_from([b": ", b":", b" : ", b"", b"\x00"]), header_values),
                   max_size=8)
eols = st.sampled_from([b"\r\n", b"\n", b"\r", b"\n\r"])


@st.composite
def requests(draw):
    eol = draw(eols)
    words = [draw(methods), draw(targets), draw(versions)]
    sep = draw(st.sampled_from([b" ", b"  ", b"\t", b""]))
    line = sep.join(w for w in words if w or draw(st.booleans()))
    head = line + eol + b"".join(n + s + v + eol for n, s, v in draw(headers))
    if draw(st.booleans()):
        head += eol
    body = draw(st.binary(max_size=64))
    data = head + body
    if draw(st.integers(0, 4)) == 0:  # cut off anywhere
        data = data[:draw(st.integers(0, len(data)))]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=requests())
def test_random_requests_are_answered(site, data):
    port, _ = site
    check(port, data)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=3000))
def test_binary_junk_is_answered(site, data):
    port, _ = site
    code = check(port, data)
    assert code is None or code >= 400 or data[:4] in (b"GET ", b"HEAD")


def test_server_still_serves_after_the_fuzz(site):
    port, _ = site
    still_serving(port)


# -- specific malformed requests: the answer, not just its form ---------------------------------------

@pytest.mark.parametrize("data, code", [
    (b"GARBAGE\r\n\r\n", 400),  # http.server took these for HTTP/0.9: a bare body, no status line
    (b"FOO /\r\n\r\n", 400),
    (b"GET /\r\n", 400),
    (b"GET / HTTP/0.9\r\n\r\n", 505),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"   \r\n\r\n", 400),  # parse_request gave up without answering
    (b"GET http://[::1/ HTTP/1.1\r\n\r\n", 400),  # urlparse raised: the connection dropped
    (b"GET /pub/%00 HTTP/1.1\r\n\r\n", 400),  # realpath raised on the NUL byte
    (b"GET /pub/" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 404),  # stat raised ENAMETOOLONG
    (b"GET /pub/" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + (b"X: " + b"a" * 15000 + b"\r\n") * 5 + b"\r\n", 431),  # each line fits, not all
    (b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x", 400),  # cut off before the empty line: not served as if complete
    (b"GET / HTTP/1.1", 400),
    (b"POST /result HTTP/1.1\r\nContent-Length: 2\r\n\r\nok", 405),  # was 200 with nothing to post to
    (b"POST /result HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),  # int() raised: the connection dropped
    (b"PUT /model/m.gguf.part-000 HTTP/1.1\r\n\r\n", 405),
    (b"DELETE / HTTP/1.1\r\n\r\n", 405),
    (b"OPTIONS * HTTP/1.1\r\n\r\n", 405),
    (b"BREW /pot HTTP/1.1\r\n\r\n", 501),
    (b"G\x00T / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET pub/a.txt HTTP/1.1\r\n\r\n", 400),
    (b"GET /pub/../secret.txt HTTP/1.1\r\n\r\n", 404),
    (b"GET /pub/%2e%2e/secret.txt HTTP/1.1\r\n\r\n", 404),
    (b"GET /pub/..%2F..%2Fsecret.txt HTTP/1.1\r\n\r\n", 404),
    (b"GET /%2F" + b"etc/passwd HTTP/1.1\r\n\r\n", 404),
    (b"GET /model/m.gguf.part-000 HTTP/1.1\r\nRange: bytes=1000-\r\n\r\n", 416),
    (b"GET /model/m.gguf.part-000 HTTP/1.1\r\nRange: bytes=-0\r\n\r\n", 416),
    (b"GET /model/m.gguf.part-000 HTTP/1.1\r\nRange: bytes=" + b"9" * 5000 + b"-\r\n\r\n", 416),
    (b"GET /model/m.gguf.part-000 HTTP/1.1\r\nRange: bytes=0-" + b"9" * 5000 + b"\r\n\r\n", 206),
    (b"GET /model/m.gguf.part-000 HTTP/1.1\r\nRange: bytes=5-2\r\n\r\n", 200),  # invalid: ignored
    (b"\r\n\r\nGET /pub/a.txt HTTP/1.1\r\n\r\n", 200),  # empty lines before a request are skipped
])
def test_malformed_request_gets_its_status(site, data, code):
    port, _ = site
    assert check(port, data) == code
    still_serving(port)


def test_405_names_the_allowed_methods(site):
    port, _ = site
    out, _ = exchange(port, b"POST /result HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert first_response(out, False) == 405
    assert re.search(rb"(?im)^allow: GET, HEAD\r$", out)


# -- clients that stop sending: the server closes within its timeout, and serves others meanwhile ----

@pytest.mark.parametrize("data", [b"", b"GE", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n",
                                  b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /pub/a.txt HTTP/1.1\r\n"])
def test_stalled_client_is_closed_in_time_and_blocks_no_one(site, data):
    port, _ = site
    got = {}
    t = threading.Thread(target=lambda: got.update(r=exchange(port, data, half_close=False)))
    t.start()
    try:
        t0 = time.monotonic()
        still_serving(port)  # while the stalled connection is open
        assert time.monotonic() - t0 < WAIT
    finally:
        t.join(WAIT + 10)
    assert not t.is_alive() and "r" in got
    out, took = got["r"]
    assert took < WAIT
    if data.count(b"\r\n\r\n"):  # the complete first request was answered before the stall
        assert first_response(out, False) == 200
    elif data:
        assert first_response(out, False) == 408
    else:
        assert out == b""  # an idle connection is just closed


def test_slow_client_cannot_outlast_the_request_deadline(site):
    """One byte every fifth of the timeout: each read makes progress, the head never completes."""
    port, _ = site
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        out = b""
        for b in b"GET / HTTP/1.1\r\nX-Padding: " + b"a" * 200:
            s.sendall(bytes([b]))
            if select.select([s], [], [], TIMEOUT / 5)[0] or time.monotonic() - t0 > 4 * TIMEOUT:
                break  # the server answered or closed (or never will: asserted below)
        took = time.monotonic() - t0
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    assert took < 3 * TIMEOUT, "the server kept reading a request head past its deadline"
    assert first_response(out, False) == 408

"""``voxtral-wgpu web``: serve the browser build (web/), the same shaders/*.wgsl files the native
runtime compiles, the model's GGUF shards and tekken.json, on one origin.

    voxtral-wgpu web --model MODEL.gguf [--host 127.0.0.1] [--port 8000] [--https]

URL layout: ``/`` -> web/index.html, ``/shaders/NAME.wgsl`` -> shaders/ (never a copy),
``/model/manifest.json`` -> {"shards": [...], "sizes": [bytes per shard], "tokenizer": "...", "bytes": N}, ``/model/FILE`` -> the GGUF file(s)
and tekken.json. ``--https`` makes a self-signed certificate (getUserMedia needs a secure context
when the page is opened from another machine).

GET and HEAD only (other methods: 405 with Allow), single byte ranges honoured (206, or 416), every
malformed request answered with a 4xx, one thread a connection, and a client that stalls is closed
after TIMEOUT seconds."""

from __future__ import annotations

import http.client
import http.server
import io
import json
import mimetypes
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .gpu import shader_dir

TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wgsl": "text/plain; charset=utf-8",
         ".html": "text/html; charset=utf-8", ".json": "application/json", ".css": "text/css"}


def web_dir() -> Path:
    """web/: installed inside the package (package data), or the repository's top-level web/."""
    here = Path(__file__).resolve().parent
    for c in (here / "web", here.parent / "web"):
        if (c / "index.html").is_file():
            return c
    raise FileNotFoundError("voxtral_wgpu's web/ directory was not found")


def model_files(model: Path) -> tuple[list[Path], Path]:
    from .gguf_loader import shard_list

    shards = shard_list(model)
    tok = shards[0].parent / "tekken.json"
    if not tok.is_file():
        raise FileNotFoundError(f"{tok}: tekken.json not found beside the model")
    return shards, tok


# Limits on what one request may send before it is answered: browsers send a few hundred bytes of
# head, so these only bound the memory and time a broken or hostile client can take.
MAX_REQUEST_LINE = 16 << 10  # longer: 414
MAX_HEADER_LINE = 16 << 10  # one header field line; longer: 431
MAX_HEAD_BYTES = 64 << 10  # all header lines together; more: 431
MAX_HEADERS = 100  # more fields: 431
MAX_POST_BYTES = 256 << 20  # the test pages POST their results (JSON with audio features); more: 413
TIMEOUT = 30.0  # seconds: a socket read or write that makes no progress, and the whole request head
LINGER = 2.0  # seconds spent reading what a client still sends after the server closed its side
CHUNK = 256 << 10  # file bytes per write: each write must finish within TIMEOUT (~9 KB/s minimum)
# RFC 9110 methods: these get 405 with Allow; any other token is 501 (not implemented at all)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_RANGE = re.compile(r"bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*", re.ASCII)


def parse_range(value: str | None, size: int):
    """The byte range a ``Range`` header asks of a ``size``-byte body: ``(first, last)`` inclusive,
    ``None`` to ignore the header and send the whole body (no header, another unit, several ranges or
    a malformed one: RFC 9110 section 14.2 lets a server ignore those), or ``"unsatisfiable"`` (416)."""
    if value is None:
        return None
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        return None
    # more digits than any file size: clamp instead of int() of a huge string (which Python limits)
    a, b = (None if not g else int(g) if len(g) <= 18 else 10**18 for g in m.groups())
    if a is None and b is None:
        return None
    if a is None:  # bytes=-n: the last n bytes
        if b == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - b), size - 1
    if b is not None and b < a:  # invalid, not unsatisfiable (RFC 9110 14.1.1)
        return None
    if a >= size:
        return "unsatisfiable"
    return a, size - 1 if b is None else min(b, size - 1)


class _TimedReader(io.RawIOBase):
    """The connection's reads, each bounded by the handler's timeout and, while a request head is
    being read, by what is left of its deadline: a client sending one byte every few seconds (each
    read making progress) still cannot hold a request open past the deadline."""

    def __init__(self, handler):
        self.h = handler

    def readable(self):
        return True

    def readinto(self, buf):
        t = self.h.timeout
        if self.h.deadline is not None:
            left = self.h.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request head not received in time")
            t = min(t, left)
        self.h.connection.settimeout(t)
        n = self.h.connection.recv_into(buf)
        self.h.head_bytes += n
        return n


class _HeadLines:
    """What http.client.parse_headers reads the header block through: it caps a line at
    MAX_HEADER_LINE (http.client allows 64 KiB) and the block at MAX_HEAD_BYTES / MAX_HEADERS, and
    remembers the last line so a head cut off by EOF (no empty line) is told from a complete one."""

    def __init__(self, rfile):
        self.rfile, self.total, self.count, self.last = rfile, 0, 0, b""

    def readline(self, limit=-1):
        line = self.rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise http.client.LineTooLong("header line")
        self.total += len(line)
        self.count += 1
        if self.total > MAX_HEAD_BYTES or self.count > MAX_HEADERS + 1:
            raise http.client.HTTPException("header block too large")
        self.last = line
        return line


def make_handler(mounts: dict[str, Path], files: dict[str, Path], extra_json: dict[str, object],
                 on_post=None, timeout: float = TIMEOUT):
    """A request handler: ``files`` maps exact paths to files, ``mounts`` maps URL prefixes to
    directories, ``extra_json`` maps exact paths to JSON bodies; GET and HEAD (with single byte
    ranges) are served; POSTs go to ``on_post(path, body)`` when given, else they are 405."""
    allowed = "GET, HEAD, POST" if on_post is not None else "GET, HEAD"
    roots = sorted(((prefix, root.resolve()) for prefix, root in mounts.items()), key=lambda kv: -len(kv[0]))

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            if os.environ.get("VOXTRAL_WGPU_WEB_LOG"):
                super().log_message(*args)

        def setup(self):
            self.timeout = timeout
            self.deadline = None
            self.head_bytes = 0
            super().setup()
            self.rfile = io.BufferedReader(_TimedReader(self))

        def handle(self):
            # TLS: the handshake runs here, in this connection's thread under its timeout (the listening
            # socket does not do it on accept, where one silent client would stall every other)
            if isinstance(self.connection, ssl.SSLSocket):
                try:
                    self.connection.do_handshake()
                except (OSError, ValueError):
                    return
            super().handle()

        def send_error(self, code, message=None, explain=None, headers=()):
            """Every error: the standard reason phrase (never text from the request), a short
            text/plain body, and the connection closed (what follows a bad request can't be trusted)."""
            phrase = self.responses.get(code, ("Error",))[0]
            detail = message if explain is None else f"{message}: {explain}" if message else explain
            body = f"{code} {phrase}" + (f": {detail[:200]!r}" if detail else "") + "\n"
            self.log_error("code %d, %s", code, detail or phrase)
            self._headers_buffer = []
            self.send_response_only(code, phrase)
            self.send_header("Date", self.date_time_string())
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body.encode())))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body.encode())

        def send_response_only(self, code, message=None):
            # http.server answers a request it takes for HTTP/0.9 (a line of one or two words, which is
            # its default, or "HTTP/0.9") with a bare body: no status line, no headers. Every answer here
            # is HTTP/1.x.
            if self.request_version == "HTTP/0.9":
                self.request_version = "HTTP/1.0"
            self.status = code
            super().send_response_only(code, message)

        def flush_headers(self):
            if self.status >= 200:  # a final response has started: no other can be sent now
                self.responded = True
            super().flush_headers()

        def handle_one_request(self):
            self.responded = False
            self.status = 0
            self.command = None
            self.request_version = self.default_request_version
            try:
                self._one_request()
            except TimeoutError:
                # a request head that was started but not finished in time: say so; an idle keep-alive
                # connection (nothing sent) or a stalled reader of a response just closes
                self.close_connection = True
                if self.head_bytes and not self.responded:
                    self._try_error(408)
            except (ConnectionError, ssl.SSLError):
                self.close_connection = True
            except Exception:
                self.close_connection = True
                traceback.print_exc()  # a bug here: the client still gets an answer
                if not self.responded:
                    self._try_error(500)
            finally:
                self.deadline = None

        def _try_error(self, code):
            try:
                self.connection.settimeout(self.timeout)
                self.send_error(code)
            except OSError:
                pass

        def _one_request(self):
            self.head_bytes = 0
            self.deadline = time.monotonic() + self.timeout
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            for _ in range(8):  # RFC 9112 2.2: ignore empty lines before the request line
                if line not in (b"\r\n", b"\n"):
                    break
                line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            self.raw_requestline = line
            if not line:
                self.close_connection = True
                return
            if len(line) > MAX_REQUEST_LINE:
                self.send_error(414)
                return
            if not line.endswith(b"\n"):
                self.send_error(400, "incomplete request line")
                return
            if not str(line, "iso-8859-1").split():
                # parse_request would give up on a blank line without answering at all
                self.send_error(400, "blank request line")
                return
            head = _HeadLines(self.rfile)
            self.rfile, rfile = head, self.rfile
            try:
                ok = self.parse_request()
            finally:
                self.rfile = rfile
            self.deadline = None
            self.connection.settimeout(self.timeout)
            if not ok:
                return
            if head.last not in (b"\r\n", b"\n"):
                self.send_error(400, "incomplete request head")
                return
            if len(self.requestline.split()) != 3:
                self.send_error(400, "HTTP/0.9 requests are not supported")
                return
            if self.request_version.split("/", 1)[1].split(".")[0].lstrip("0") == "":
                self.send_error(505, "HTTP/0.x is not supported")
                return
            if not _TOKEN.fullmatch(self.command):
                self.send_error(400, "bad method")
                return
            if self.headers.get("Transfer-Encoding") is not None:
                # no chunked bodies here: the request's end can't be found, so neither can the next one
                self.send_error(501, "Transfer-Encoding is not supported")
                return
            lengths = {v.strip() for v in self.headers.get_all("Content-Length") or ()}
            if len(lengths) > 1 or any(not (v.isascii() and v.isdigit()) for v in lengths):
                self.send_error(400, "bad Content-Length")
                return
            n = lengths.pop() if lengths else "0"
            self.body_length = int(n) if len(n) <= 18 else 10**18  # int() of a huge string is refused
            if self.command in ("GET", "HEAD"):
                if self.body_length:
                    self.close_connection = True  # the body is not read: no request can follow it
                self._serve(head=self.command == "HEAD")
            elif self.command == "POST" and on_post is not None:
                self._post()
            elif self.command in KNOWN_METHODS:
                self.send_error(405, headers=[("Allow", allowed)])
            else:
                self.send_error(501, headers=[("Allow", allowed)])
            self.wfile.flush()

        def _path(self) -> str | None:
            """The request target's path, percent-decoded; None for one that is not a path."""
            t = self.path
            if not t.startswith("/"):
                if not t.lower().startswith(("http://", "https://")):
                    return None  # "*", authority-form, or junk
                try:  # absolute-form (RFC 9112 3.2.2)
                    t = urlsplit(t).path or "/"
                except ValueError:
                    return None
            t = t.split("?", 1)[0].split("#", 1)[0]
            try:
                path = unquote(t, errors="strict")
            except UnicodeDecodeError:
                return None
            return None if "\x00" in path else path

        def _resolve(self, path: str) -> Path | bytes | None:
            if path == "/":
                path = "/index.html"
            if path in extra_json:
                return json.dumps(extra_json[path]).encode()
            if path in files:
                return files[path]
            for prefix, root in roots:
                if path.startswith(prefix):
                    try:
                        p = (root / path[len(prefix):].lstrip("/")).resolve()
                        # inside the mount after symlinks and "..", and a regular file (no FIFOs)
                        if root in p.parents and p.is_file():
                            return p
                    except (OSError, ValueError, RuntimeError):  # name too long, symlink loop
                        pass
            return None

        def _serve(self, head: bool):
            path = self._path()
            if path is None:
                self.send_error(400, "bad request target")
                return
            r = self._resolve(path)
            if r is None:
                self.send_error(404)
                return
            fh = None
            validators = []
            if isinstance(r, bytes):
                ctype, size = "application/json", len(r)
            else:
                try:
                    fh = open(r, "rb")
                    st = os.fstat(fh.fileno())
                except OSError:
                    self.send_error(404)
                    return
                ctype = TYPES.get(r.suffix) or mimetypes.guess_type(r.name)[0] or "application/octet-stream"
                size = st.st_size
                validators = [("ETag", f'"{size:x}-{st.st_mtime_ns:x}"'),
                              ("Last-Modified", self.date_time_string(int(st.st_mtime)))]
            try:
                rng = parse_range(self.headers.get("Range"), size)
                if_range = self.headers.get("If-Range")
                if rng is not None and if_range is not None and if_range.strip() not in [v for _, v in validators]:
                    rng = None  # the client's copy is of another version: send the whole current one
                if rng == "unsatisfiable":
                    self.send_error(416, headers=[("Content-Range", f"bytes */{size}")])
                    return
                first, last = rng or (0, size - 1)
                n = last - first + 1
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Accept-Ranges", "bytes")
                for k, v in validators:
                    self.send_header(k, v)
                self._headers(ctype, n)
                if head or n <= 0:
                    return
                if fh is None:
                    self.wfile.write(r[first:last + 1])
                    return
                fh.seek(first)
                while n > 0:
                    b = fh.read(min(CHUNK, n))
                    if not b:  # the file shrank since fstat: the promised length can't be met
                        self.close_connection = True
                        return
                    self.wfile.write(b)
                    n -= len(b)
            finally:
                if fh is not None:
                    fh.close()

        def _headers(self, ctype: str, n: int):
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(n))
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()

        def _post(self):
            if "Content-Length" not in self.headers:
                self.send_error(411)
                return
            if self.body_length > MAX_POST_BYTES:
                self.send_error(413)
                return
            path = self._path()
            if path is None:
                self.send_error(400, "bad request target")
                return
            body = self.rfile.read(self.body_length)
            if len(body) < self.body_length:  # the client closed before sending the whole body
                self.close_connection = True
                return
            on_post(path, body)
            self.send_response(200)
            self._headers("text/plain", 2)
            self.wfile.write(b"ok")

    return Handler


class Server(http.server.ThreadingHTTPServer):
    """One thread a connection (a stalled client holds only its own), which on closing first reads
    what the client still sends: closing a socket with unread input makes the kernel reset the
    connection, and the reset can destroy the error response (414, 431, ...) before the client reads it."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def shutdown_request(self, request):
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(LINGER)
            end, drained = time.monotonic() + LINGER, 0
            while time.monotonic() < end and drained < (4 << 20):
                b = request.recv(65536)
                if not b:
                    break
                drained += len(b)
        except (OSError, ValueError):
            pass
        self.close_request(request)

    def handle_error(self, request, client_address):
        # a client that went away or spoke garbage to TLS is not the server's error
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def make_server(model: Path | None, host: str = "127.0.0.1", port: int = 8000, *, mounts=None, files=None,
                extra_json=None, on_post=None, timeout: float = TIMEOUT) -> Server:
    mounts = dict(mounts or {})
    files = dict(files or {})
    extra_json = dict(extra_json or {})
    mounts.setdefault("/shaders/", shader_dir())
    mounts.setdefault("/", web_dir())
    if model is not None:
        shards, tok = model_files(Path(model))
        for p in shards:
            files[f"/model/{p.name}"] = p
        files["/model/tekken.json"] = tok
        sizes = [p.stat().st_size for p in shards]
        extra_json["/model/manifest.json"] = {"shards": [f"model/{p.name}" for p in shards], "sizes": sizes,
                                              "tokenizer": "model/tekken.json", "bytes": sum(sizes)}
    return Server((host, port), make_handler(mounts, files, extra_json, on_post, timeout))


def use_tls(srv: Server, host: str) -> None:
    """Serve HTTPS with a fresh self-signed certificate for ``host``. The handshake is left to each
    connection's thread (see Handler.handle)."""
    tmp = Path(tempfile.mkdtemp(prefix="voxtral-wgpu-cert-"))
    cert, key = self_signed_cert(host, tmp)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)


def self_signed_cert(host: str, out_dir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` (the ``cryptography`` package if installed, else the
    ``openssl`` command)."""
    cert, key = out_dir / "cert.pem", out_dir / "key.pem"
    import datetime
    import ipaddress

    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        try:
            ipaddress.ip_address(host)
            san = f"IP:{host}"
        except ValueError:
            san = f"DNS:{host}"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj",
                        f"/CN={host}", "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return cert, key
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        san = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.SubjectAlternativeName([san]), critical=False).sign(k, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return cert, key


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("web", help="serve the browser build (WebGPU) with a model")
    p.add_argument("--model", required=True, help="MODEL.gguf (or NAME.gguf.part-000 shards), tekken.json beside it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--https", action="store_true", help="serve over HTTPS with a self-signed certificate")
    p.set_defaults(func=_cmd_web)


def _cmd_web(args) -> int:
    srv = make_server(Path(args.model), args.host, args.port)
    scheme = "http"
    if args.https:
        use_tls(srv, args.host)
        scheme = "https"
    print(f"voxtral-wgpu web: serving on {scheme}://{args.host}:{srv.server_address[1]}/ (Ctrl-C to stop)",
          file=sys.stderr)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


def serve_in_thread(srv: Server) -> threading.Thread:
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    return t

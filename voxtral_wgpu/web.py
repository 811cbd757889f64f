"""``voxtral-wgpu web``: serve the browser build (web/), the same shaders/*.wgsl files the native
runtime compiles, the model's GGUF shards and tekken.json, on one origin.

    voxtral-wgpu web --model MODEL.gguf [--host 127.0.0.1] [--port 8000] [--https]

URL layout: ``/`` -> web/index.html, ``/shaders/NAME.wgsl`` -> shaders/ (never a copy),
``/model/manifest.json`` -> {"shards": [...], "sizes": [bytes per shard], "tokenizer": "...", "bytes": N}, ``/model/FILE`` -> the GGUF file(s)
and tekken.json. ``--https`` makes a self-signed certificate (getUserMedia needs a secure context
when the page is opened from another machine)."""

from __future__ import annotations

import http.server
import json
import mimetypes
import os
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

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


def make_handler(mounts: dict[str, Path], files: dict[str, Path], extra_json: dict[str, object],
                 on_post=None):
    """A request handler: ``files`` maps exact paths to files, ``mounts`` maps URL prefixes to
    directories, ``extra_json`` maps exact paths to JSON bodies; POSTs go to ``on_post(path, body)``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            if os.environ.get("VOXTRAL_WGPU_WEB_LOG"):
                super().log_message(*args)

        def _resolve(self) -> Path | bytes | None:
            path = unquote(urlparse(self.path).path)
            if path == "/":
                path = "/index.html"
            if path in extra_json:
                return json.dumps(extra_json[path]).encode()
            if path in files:
                return files[path]
            for prefix, root in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if path.startswith(prefix):
                    p = (root / path[len(prefix):]).resolve()
                    if root.resolve() in p.parents and p.is_file():
                        return p
            return None

        def _headers(self, ctype: str, n: int):
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(n))
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.end_headers()

        def do_HEAD(self):
            self.do_GET(head=True)

        def do_GET(self, head: bool = False):
            r = self._resolve()
            if r is None:
                self.send_response(404)
                self._headers("text/plain", 9)
                if not head:
                    self.wfile.write(b"not found")
                return
            if isinstance(r, bytes):
                self.send_response(200)
                self._headers("application/json", len(r))
                if not head:
                    self.wfile.write(r)
                return
            ctype = TYPES.get(r.suffix) or mimetypes.guess_type(r.name)[0] or "application/octet-stream"
            size = r.stat().st_size
            self.send_response(200)
            self._headers(ctype, size)
            if head:
                return
            with open(r, "rb") as fh:
                while True:
                    b = fh.read(1 << 20)
                    if not b:
                        break
                    try:
                        self.wfile.write(b)
                    except (BrokenPipeError, ConnectionResetError):
                        return

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n)
            if on_post is not None:
                on_post(urlparse(self.path).path, body)
            self.send_response(200)
            self._headers("text/plain", 2)
            self.wfile.write(b"ok")

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(model: Path | None, host: str = "127.0.0.1", port: int = 8000, *, mounts=None, files=None,
                extra_json=None, on_post=None) -> Server:
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
    return Server((host, port), make_handler(mounts, files, extra_json, on_post))


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
        tmp = Path(tempfile.mkdtemp(prefix="voxtral-wgpu-cert-"))
        cert, key = self_signed_cert(args.host, tmp)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
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

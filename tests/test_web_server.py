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
    page is a secure context from another machine on the LAN once the certificate is accepted)."""
    import re
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

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

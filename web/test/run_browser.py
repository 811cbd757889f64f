"""Run a page of web/ in headless Debian chromium (SwiftShader WebGPU) and collect what it POSTs.

    python web/test/run_browser.py FIXTURE_DIR [query]
No browser driver needed: the page POSTs its result to /result on the test server."""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # voxtral_wgpu itself comes from the installed package

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless=new", "--no-sandbox", "--enable-unsafe-webgpu", "--disable-gpu-sandbox",
         "--use-webgpu-adapter=swiftshader", "--enable-features=Vulkan", "--use-angle=swiftshader",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio"]


def run_page(fixture: Path, page: str, timeout: float = 150.0, extra_flags=()) -> dict:
    from voxtral_wgpu.web import make_server, serve_in_thread

    results: queue.Queue = queue.Queue()
    # serve this checkout's web/ (with its test pages) and shaders/, not an installed copy
    srv = make_server(None, "127.0.0.1", 0, mounts={"/fixture/": Path(fixture), "/": ROOT / "web",
                                                    "/shaders/": ROOT / "shaders"},
                      on_post=lambda path, body: results.put((path, body)))
    serve_in_thread(srv)
    port = srv.server_address[1]
    ud = tempfile.mkdtemp(prefix="vx-chromium-")
    log = open(Path(ud) / "chromium.log", "w")
    proc = subprocess.Popen([CHROMIUM, *FLAGS, *extra_flags, f"--user-data-dir={ud}",
                             f"http://127.0.0.1:{port}/{page}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                path, body = results.get(timeout=1.0)
                if path == "/result":
                    return json.loads(body)
            except queue.Empty:
                if proc.poll() is not None:
                    raise RuntimeError(f"chromium exited ({proc.returncode}); see {log.name}")
                if time.time() > deadline:
                    raise TimeoutError(f"no result from the page in {timeout} s; see {log.name}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        srv.shutdown()
        srv.server_close()
        log.close()
        if not os.environ.get("VX_KEEP_PROFILE"):
            shutil.rmtree(ud, ignore_errors=True)


if __name__ == "__main__":
    r = run_page(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "test/test.html")
    print(json.dumps({k: v for k, v in r.items() if k != "mel"})[:3000])

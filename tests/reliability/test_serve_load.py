"""``cnnkit serve`` under load and abuse, as a real server process on 127.0.0.1.

One server (``python -m cnnkit serve RUN --port 0``, the CLI's defaults) takes, in order:
40 concurrent decompression-bomb uploads and a few budget-sized images (its memory is
read from ``/proc/PID/status``: the peak, ``VmHWM``, and what stays, ``VmRSS``), a few
hundred mixed valid requests from several threads with junk uploads among them, and a few
hundred connections that never finish a request while valid requests go on. It must
answer every valid request, refuse every junk one with a 4xx, close the slow connections
within its header timeout, and log no error. ``bench/serve_abuse.py`` prints the same
figures for docs/benchmarks.md.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
if not Path("/proc/self/status").is_file():
    pytest.skip("reads the server's memory from /proc (Linux)", allow_module_level=True)

PEAK_MB = 500  # goal (issue 12): peak under 40 concurrent bomb uploads
BACK_MB = 50  # and back to idle + this after
HEADER_TIMEOUT = 5.0  # the CLI's default --header-timeout


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _multipart(data: bytes, field: str = "file") -> tuple[bytes, str]:
    body = (f'--b0undary\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"'
            "\r\nContent-Type: image/png\r\n\r\n").encode() + data + b"\r\n--b0undary--\r\n"
    return body, "multipart/form-data; boundary=b0undary"


class Server:
    """The server process, its address and its memory."""

    def __init__(self, run: Path, log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "cnnkit", "serve", str(run),
                                      "--port", "0"], stdout=subprocess.PIPE,
                                     stderr=log.open("w"), text=True, env=env)
        line = self.proc.stdout.readline()
        assert line.startswith("cnnkit serve: http://"), log.read_text()
        self.url = line.split()[2].rstrip(";")
        where = urlsplit(self.url)
        self.host, self.port = where.hostname, where.port

    def memory_mb(self) -> dict[str, float]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in status)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, conn: http.client.HTTPConnection | None = None
                ) -> tuple[int, bytes]:
        """One request; a new connection unless ``conn`` is given."""
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            if own:
                conn.close()

    def upload(self, data: bytes, conn: http.client.HTTPConnection | None = None,
               field: str = "file") -> tuple[int, bytes]:
        body, kind = _multipart(data, field)
        return self.request("POST", "/api/upload", body, {"Content-Type": kind}, conn)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import cnnkit

    runs = tmp_path_factory.mktemp("serve-load")
    cnnkit.train(model="tinyvgg", data="digits", epochs=1, runs_dir=str(runs), name="tv",
                 progress=False)
    srv = Server(runs / "tv", runs / "server.log")
    yield srv
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def idle(server):
    """The server's memory after one of every kind of request (lazy imports, caches)."""
    digit = _png(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)))
    for path in ("/api/model", "/api/inputs", "/api/activations?input=test:0",
                 "/api/neuron?input=test:0&layer=5&c=1&y=1&x=1", "/api/filters?layer=0",
                 "/api/explain?input=test:0&method=gradcam",
                 "/api/explain?input=test:0&method=saliency"):
        assert server.request("GET", path)[0] == 200, path
    assert server.upload(digit)[0] == 201
    assert server.upload(b"junk")[0] == 400
    time.sleep(0.5)
    return {**server.memory_mb(), "fds": server.fds()}


def test_40_concurrent_bomb_uploads_stay_small_and_memory_comes_back(server, idle):
    bomb = _png(Image.new("L", (6300, 6300)))  # 38 KB that would decode to 40 MB
    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(lambda _: server.upload(bomb)[0], range(40)))
    assert codes == [413] * 40
    # Images just under the pixel budget are decoded for real (4 bytes a pixel in RGBA).
    big = _png(Image.new("RGBA", (3999, 3999)))
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: server.upload(big)[0], range(8)))
    assert codes == [201] * 8
    time.sleep(0.5)
    after = server.memory_mb()
    # The goal is for a CPU build of torch (an idle server of ~320 MB); a build that starts
    # larger is held to the same growth.
    assert after["VmHWM"] < max(PEAK_MB, idle["VmRSS"] + PEAK_MB - 320), (idle, after)
    assert after["VmRSS"] < idle["VmRSS"] + BACK_MB, (idle, after)


def _junk(server: Server) -> dict[str, Callable]:
    """Requests that must each get a 4xx: bad files, bad forms, bad framing, other sites."""
    png = _png(Image.new("L", (8, 8)))
    body, kind = _multipart(png)
    post = functools.partial(server.request, "POST", "/api/upload")
    return {
        "not an image": functools.partial(server.upload, os.urandom(3000)),
        "empty": functools.partial(server.upload, b""),
        "truncated": functools.partial(server.upload, png[:40]),
        "a bomb": functools.partial(server.upload, _png(Image.new("L", (8000, 3000)))),
        "no file field": functools.partial(server.upload, png, field="other"),
        "not multipart": functools.partial(post, b"hello", {"Content-Type": "text/plain"}),
        "broken multipart": functools.partial(post, b"--b0undary\r\nbroken",
                                              {"Content-Type": kind}),
        "from another site": functools.partial(post, body, {"Content-Type": kind,
                                                            "Origin": "http://evil.example"}),
        "unknown input": functools.partial(server.request, "GET",
                                           "/api/activations?input=test:99999"),
        "a path": functools.partial(server.request, "GET",
                                    "/api/activations?input=../../etc/passwd"),
    }


def test_a_mixed_load_is_served_without_errors_and_junk_gets_4xx(server, idle):
    digit = _png(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3))
    paths = ["/api/model", "/api/inputs?offset=10&limit=20", "/api/activations?input=test:{i}",
             "/api/activations?input=test:{j}", "/api/neuron?input=test:{i}&layer=2&c=3&y=2&x=5",
             "/api/neuron?input=test:{i}&layer=10&c=4", "/api/explain?input=test:{j}",
             "/api/filters?layer=7", "/api/weights"]
    total = json.loads(server.request("GET", "/api/inputs?limit=1")[1])["total"]
    jobs = [(True, functools.partial(server.upload, digit)) if i % 10 == 9 else
            (True, functools.partial(server.request, "GET",
                                     paths[i % 10].format(i=i % total, j=i % 7)))
            for i in range(300)]
    junk = list(_junk(server).items()) * 5
    jobs += [(False, job) for _, job in junk]
    jobs = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]
    results: list[tuple[bool, int | str]] = []
    lock = threading.Lock()

    def worker(share: list[tuple[bool, Callable]]) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        for valid, job in share:
            try:
                status, body = job(conn=conn)
                if valid:
                    json.loads(body)
            except (OSError, http.client.HTTPException, ValueError) as e:
                status = f"{type(e).__name__}: {e}"
                conn.close()  # a new connection for the next job
            with lock:
                results.append((valid, status))
        conn.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, [jobs[i::8] for i in range(8)]))
    served = [s for valid, s in results if valid]
    refused = [s for valid, s in results if not valid]
    assert len(served) == 300 and [s for s in served if s not in (200, 201)] == []
    assert len(refused) == len(junk)
    assert all(isinstance(s, int) and 400 <= s < 500 for s in refused), refused


def test_slow_connections_are_closed_while_valid_requests_are_served(server, idle):
    slow = []
    for i in range(300):
        s = socket.create_connection((server.host, server.port))
        if i % 2:  # half send part of a head, the others nothing
            s.sendall(b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.append(s)
    started = time.monotonic()
    try:
        codes = [server.request("GET", f"/api/activations?input=test:{i}")[0]
                 for i in range(30)]
        assert codes == [200] * 30
        assert server.fds() > idle["fds"] + 250  # they are held for now
        closed = []
        for s in slow:
            s.settimeout(max(0.1, HEADER_TIMEOUT + 3 - (time.monotonic() - started)))
            try:
                while s.recv(4096):
                    pass
                closed.append(time.monotonic() - started)
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed.append(time.monotonic() - started)
    finally:
        for s in slow:
            s.close()
    assert len(closed) == 300 and max(closed) < HEADER_TIMEOUT + 3
    time.sleep(0.3)
    assert server.fds() <= idle["fds"] + 5
    assert server.request("GET", "/api/model")[0] == 200


def test_the_server_logged_no_error_and_stops_cleanly(server, idle):
    assert server.proc.poll() is None
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=30) == 130
    log = server.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]

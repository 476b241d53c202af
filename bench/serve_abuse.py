"""``cnnkit serve`` under abuse: memory, errors and connections of a real server process.

The figures issue 12 asks for, measured on ``python -m cnnkit serve RUN --port 0`` (the
CLI's defaults) over 127.0.0.1, in one run, in this order:

1. memory (``VmRSS``, and the peak ``VmHWM`` from ``/proc/PID/status``) when idle (after
   one request of every kind), under 40 concurrent decompression-bomb uploads (a 38 KB PNG
   of 6300x6300), under 40 concurrent uploads just under the pixel budget (3999x3999 RGBA,
   decoded for real), and after each;
2. a mixed load from 8 threads on kept-alive connections: model, inputs, activations,
   neuron, filters, explanations, weights and uploads, with junk among them (not images,
   truncated, bombs, broken forms, another site's origin); errors counted;
3. slow connections: hundreds that never finish a request head, with valid requests on
   the side; when the server closed them, and its open descriptors;
4. oversize requests sent whole before the answer is read (9 MB upload, 5 MB form field,
   200 KB head, each with ``Connection: close``): the status the client reads.

``tests/reliability/test_serve_load.py`` asserts the same with smaller counts.

Usage: python bench/serve_abuse.py [--run RUN] [--requests 600] [--slow 1000]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def multipart(data: bytes, field: str = "file", filename: str | None = "x.png"
              ) -> tuple[bytes, str]:
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    body = (f"--b0undary\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n--b0undary--\r\n"
    return body, "multipart/form-data; boundary=b0undary"


class Server:
    def __init__(self, run: Path) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cnnkit", "serve", str(run), "--port", "0"],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = self.proc.stdout.readline()
        if not line.startswith("cnnkit serve: http://"):
            raise SystemExit(f"the server did not start: {line}")
        where = urlsplit(line.split()[2].rstrip(";"))
        self.host, self.port = where.hostname, where.port

    def memory(self) -> tuple[float, float]:
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, conn: http.client.HTTPConnection | None = None
                ) -> int:
        own = conn is None
        conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            answer = conn.getresponse()
            answer.read()
            return answer.status
        finally:
            if own:
                conn.close()

    def upload(self, data: bytes, conn: http.client.HTTPConnection | None = None,
               headers: dict | None = None) -> int:
        body, kind = multipart(data)
        return self.request("POST", "/api/upload", body, {"Content-Type": kind,
                                                          **(headers or {})}, conn)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        self.log.seek(0)
        return self.log.read()


def concurrent_uploads(server: Server, data: bytes, n: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(lambda _: server.upload(data), range(n)))
    seconds = time.perf_counter() - start
    time.sleep(0.5)
    rss, hwm = server.memory()
    return {"codes": sorted(set(codes)), "seconds": seconds, "peak": hwm, "after": rss}


def mixed_load(server: Server, n: int, total: int) -> dict:
    digit = png(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)))
    body, kind = multipart(png(Image.new("L", (8, 8))))
    paths = ["/api/model", "/api/inputs?offset=10&limit=20", "/api/activations?input=test:{i}",
             "/api/neuron?input=test:{i}&layer=2&c=3&y=2&x=5", "/api/filters?layer=7",
             "/api/explain?input=test:{i}", "/api/explain?input=test:{i}&method=saliency",
             "/api/weights", "/api/neuron?input=test:{i}&layer=10&c=4"]
    junk = [lambda c: server.upload(os.urandom(3000), c), lambda c: server.upload(b"", c),
            lambda c: server.upload(digit[:40], c),
            lambda c: server.upload(png(Image.new("L", (8000, 3000))), c),
            lambda c: server.request("POST", "/api/upload", b"--b0undary\r\nbroken",
                                     {"Content-Type": kind}, c),
            lambda c: server.request("POST", "/api/upload", body, {
                "Content-Type": kind, "Origin": "http://evil.example"}, c)]
    jobs = []
    for i in range(n):
        if i % 10 == 9:
            jobs.append((True, lambda c: server.upload(digit, c)))
        else:
            path = paths[i % 10].format(i=i % total)
            jobs.append((True, lambda c, p=path: server.request("GET", p, conn=c)))
    jobs += [(False, junk[i % len(junk)]) for i in range(n // 6)]
    jobs = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]
    results, lock = [], threading.Lock()

    def worker(share: list) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        for valid, job in share:
            start = time.perf_counter()
            try:
                status = job(conn)
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
                conn.close()
            with lock:
                results.append((valid, status, time.perf_counter() - start))
        conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, [jobs[i::8] for i in range(8)]))
    seconds = time.perf_counter() - start
    valid = [(s, t) for v, s, t in results if v]
    junked = [s for v, s, _ in results if not v]
    return {"served": sum(s in (200, 201) for s, _ in valid), "valid": len(valid),
            "errors": sum(s not in (200, 201) for s, _ in valid), "junk": len(junked),
            "junk_4xx": sum(isinstance(s, int) and 400 <= s < 500 for s in junked),
            "seconds": seconds, "p50": 1e3 * statistics.median(t for _, t in valid),
            "p99": 1e3 * statistics.quantiles([t for _, t in valid], n=100)[-1]}


def slow_connections(server: Server, n: int, idle_fds: int) -> dict:
    socks = []
    for i in range(n):
        s = socket.create_connection((server.host, server.port))
        if i % 2:
            s.sendall(b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    start = time.monotonic()
    codes = [server.request("GET", f"/api/activations?input=test:{i}") for i in range(50)]
    held = server.fds()
    closed = []
    for s in socks:
        s.settimeout(max(0.1, 30 - (time.monotonic() - start)))
        try:
            while s.recv(4096):
                pass
            closed.append(time.monotonic() - start)
        except ConnectionResetError:
            closed.append(time.monotonic() - start)
        except TimeoutError:
            pass
        s.close()
    time.sleep(0.3)
    return {"opened": n, "closed": len(closed), "last": max(closed, default=float("nan")),
            "valid_ok": sum(c == 200 for c in codes), "valid": len(codes), "fds_idle": idle_fds,
            "fds_held": held, "fds_after": server.fds()}


def oversize(server: Server) -> dict:
    def send_whole(request: bytes, chunk: int = 65536) -> str:
        try:
            with socket.create_connection((server.host, server.port)) as s:
                for i in range(0, len(request), chunk):
                    s.sendall(request[i:i + chunk])
                s.settimeout(30)
                return s.recv(100).split(b"\r\n")[0].decode()
        except OSError as e:
            return type(e).__name__

    def post(body: bytes, kind: str) -> bytes:
        return (f"POST /api/upload HTTP/1.1\r\nHost: {server.host}\r\nConnection: close\r\n"
                f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    return {"9 MB upload": send_whole(post(*multipart(b"\0" * 9_000_000))),
            "5 MB form field": send_whole(post(*multipart(b"a" * 5_000_000, "note", None))),
            "200 KB head": send_whole((f"GET /api/model HTTP/1.1\r\nHost: {server.host}\r\n"
                                       f"X-Big: {'a' * 200_000}\r\n\r\n").encode(), 8192)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained classifier run (default: train "
                        "tinyvgg on digits for one epoch into a temporary folder)")
    parser.add_argument("--requests", type=int, default=600, help="valid requests of the load")
    parser.add_argument("--slow", type=int, default=1000, help="slow connections")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            import cnnkit

            cnnkit.train(model="tinyvgg", data="digits", epochs=1, runs_dir=tmp, name="tv",
                         progress=False)
            run = Path(tmp) / "tv"
        print(f"load average before: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
        server = Server(run)
        digit = png(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)))
        for path in ("/api/model", "/api/inputs", "/api/activations?input=test:0",
                     "/api/neuron?input=test:0&layer=5&c=1&y=1&x=1", "/api/filters?layer=0",
                     "/api/explain?input=test:0", "/api/explain?input=test:0&method=saliency"):
            server.request("GET", path)
        server.upload(digit)
        time.sleep(0.5)
        idle, _ = server.memory()
        idle_fds = server.fds()
        total = json.loads(http_get(server, "/api/inputs?limit=1"))["total"]
        bombs = concurrent_uploads(server, png(Image.new("L", (6300, 6300))), 40)
        budget = concurrent_uploads(server, png(Image.new("RGBA", (3999, 3999))), 40)
        load = mixed_load(server, args.requests, total)
        slow = slow_connections(server, args.slow, idle_fds)
        big = oversize(server)
        log = server.stop()

    print(f"idle RSS {idle:.0f} MB, {idle_fds} open descriptors (after one request of each "
          "kind)\n")
    print("| 40 concurrent uploads of | answers | seconds | peak MB (VmHWM) | RSS after MB |")
    print("|---|---|---:|---:|---:|")
    for name, r in (("6300x6300 PNG bomb (38 KB)", bombs),
                    ("3999x3999 RGBA PNG (16 MP, decoded)", budget)):
        print(f"| {name} | {', '.join(map(str, r['codes']))} | {r['seconds']:.2f} | "
              f"{r['peak']:.0f} | {r['after']:.0f} |")
    print(f"\nmixed load, 8 threads: {load['served']} of {load['valid']} valid requests "
          f"served, {load['errors']} errors, in {load['seconds']:.1f} s (median "
          f"{load['p50']:.1f} ms, p99 {load['p99']:.1f} ms); {load['junk_4xx']} of "
          f"{load['junk']} junk requests answered 4xx")
    print(f"slow connections: {slow['closed']} of {slow['opened']} closed by the server, the "
          f"last after {slow['last']:.1f} s; {slow['valid_ok']} of {slow['valid']} valid "
          f"requests meanwhile answered 200; open descriptors {slow['fds_idle']} idle -> "
          f"{slow['fds_held']} held -> {slow['fds_after']} after")
    print("oversize requests sent whole, then read: " + "; ".join(
        f"{k}: {v}" for k, v in big.items()))
    print(f"server log: {'clean' if 'Traceback' not in log else 'TRACEBACKS'} "
          f"({len(log.splitlines())} lines)")
    print(f"load average after: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")


def http_get(server: Server, path: str) -> bytes:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


if __name__ == "__main__":
    main()

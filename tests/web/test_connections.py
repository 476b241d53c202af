"""Connections under abuse, over real sockets: clients that never finish a request are
closed, open connections are capped, and a request refused before it was read whole
(a 413, a 431) gets an answer the client can read instead of a TCP reset."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from cnnkit.web import ServerLimits, create_app, running

FAST = ServerLimits(header_timeout=0.5, body_timeout=0.5, keep_alive=0.5, max_connections=20,
                    linger=2.0)


def _tiny_app() -> Starlette:
    async def echo(request):
        return JSONResponse({"bytes": len(await request.body())})

    return Starlette(routes=[Route("/", lambda r: JSONResponse({"ok": True})),
                             Route("/echo", echo, methods=["POST"])])


@contextlib.contextmanager
def _server(app=None, limits: ServerLimits = FAST) -> Iterator[tuple[str, int, str]]:
    with running(app or _tiny_app(), limits=limits) as url:
        where = urlsplit(url)
        yield where.hostname, where.port, url


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), or None if it did not."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def _answer(sock: socket.socket, timeout: float = 10) -> tuple[int, dict]:
    """The status and JSON body of the answer on ``sock`` (read to EOF)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout():
    with _server() as (host, port, _):
        with socket.create_connection((host, port)) as s:
            waited = _closed_within(s, 5)
    assert waited is not None and 0.3 < waited < 2


def test_a_head_that_trickles_is_closed_with_a_408():
    with _server() as (host, port, _):
        with socket.create_connection((host, port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            for _ in range(3):  # each byte would restart a naive idle timer
                time.sleep(0.2)
                s.sendall(b"X-A: b\r\n")
            status, body = _answer(s, 5)
    assert status == 408 and "head did not arrive" in body["error"]


def test_a_body_that_stops_coming_is_closed():
    with _server() as (host, port, _):
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc")
            waited = _closed_within(s, 5)
    assert waited is not None and waited < 2


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout():
    with _server() as (host, port, _):
        with socket.create_connection((host, port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            waited = _closed_within(s, 5)
    assert waited is not None and 0.3 < waited < 2


def test_a_fast_client_is_not_hurried():
    with _server() as (_, _, url):
        for _ in range(3):
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.status == 200
        body = b"x" * 3_000_000
        req = urllib.request.Request(url + "echo", data=body)
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read()) == {"bytes": len(body)}


def test_at_the_cap_the_longest_idle_connection_makes_room_for_a_new_one():
    limits = ServerLimits(header_timeout=10, max_connections=20)
    with _server(limits=limits) as (host, port, url):
        held = [socket.create_connection((host, port)) for _ in range(20)]
        try:
            time.sleep(0.2)
            with urllib.request.urlopen(url, timeout=5) as r:  # a client that sends at once
                assert r.status == 200
            assert _closed_within(held[0], 2) is not None  # the oldest idle one made room
            assert _closed_within(held[-1], 0.3) is None  # the others are still open
        finally:
            for s in held:
                s.close()


def test_beyond_the_cap_with_every_connection_busy_a_new_one_gets_a_503():
    async def slow(request):
        await asyncio.sleep(1.5)
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/", lambda r: JSONResponse({"ok": True})),
                            Route("/slow", slow)])
    with _server(app, ServerLimits(max_connections=10)) as (host, port, url):
        busy = [socket.create_connection((host, port)) for _ in range(10)]
        try:
            for s in busy:
                s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            with socket.create_connection((host, port)) as extra:
                status, body = _answer(extra, 2)
            assert status == 503 and "10 connections" in body["error"]
            for s in busy:  # the busy ones are answered
                s.settimeout(5)
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
        finally:
            for s in busy:
                s.close()
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200


# -- oversize requests: the answer is readable -----------------------------------------------

def _multipart(field: str, data: bytes, filename: str | None = "x.png") -> tuple[bytes, str]:
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
    body = (f"--b0undary\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + \
        b"\r\n--b0undary--\r\n"
    return body, "multipart/form-data; boundary=b0undary"


def _send_all_then_read(host: str, port: int, request: bytes, chunk: int = 65536,
                        pause: float = 0.0005) -> tuple[int, dict]:
    """Send the whole request (as a client that does not read until it has sent), then
    read the answer; a reset on either side fails the test."""
    with socket.create_connection((host, port)) as s:
        for i in range(0, len(request), chunk):
            s.sendall(request[i:i + chunk])
            time.sleep(pause)
        return _answer(s)


@pytest.fixture(scope="module")
def explorer_server(explorer):
    with _server(create_app(explorer), ServerLimits()) as where:
        yield where


@pytest.mark.parametrize("close", ["", "Connection: close\r\n"])
@pytest.mark.parametrize(("what", "field", "size", "filename"), [
    ("a 9 MB upload", "file", 9_000_000, "x.png"),
    ("a 5 MB form field", "note", 5_000_000, None),
])
def test_an_oversize_body_gets_a_readable_413(explorer_server, close, what, field, size,
                                              filename):
    host, port, url = explorer_server
    body, kind = _multipart(field, b"\0" * size, filename)
    head = (f"POST /api/upload HTTP/1.1\r\nHost: {host}\r\n{close}Content-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    status, answer = _send_all_then_read(host, port, head + body)
    assert status == 413, what
    assert "limit" in answer["error"] or "over" in answer["error"]
    with urllib.request.urlopen(url + "api/model", timeout=10) as r:  # still serving
        assert r.status == 200


def test_a_200_kb_head_gets_a_readable_431(explorer_server):
    host, port, _ = explorer_server
    request = (f"GET /api/model HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 200_000}\r\n\r\n"
               ).encode()
    status, answer = _send_all_then_read(host, port, request, chunk=8192)
    assert status == 431 and "16,384 bytes" in answer["error"]


def test_draining_a_refused_body_is_bounded():
    """A client that goes on sending after its 413 is cut off after drain_bytes."""
    limits = ServerLimits(drain_bytes=1_000_000, linger=10)

    async def refuse(request):
        return JSONResponse({"error": "too big"}, status_code=413,
                            headers={"connection": "close"})

    app = Starlette(routes=[Route("/", refuse, methods=["POST"])])
    with _server(app, limits) as (host, port, _):
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
            sent, start = 0, time.monotonic()
            with pytest.raises(OSError):  # reset or broken pipe, once the bound is passed
                while time.monotonic() - start < 10:
                    s.sendall(b"\0" * 65536)
                    sent += 65536
    assert sent < 20_000_000


def test_limits_are_checked():
    with pytest.raises(ValueError, match="header_timeout must be a positive number"):
        ServerLimits(header_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        ServerLimits(max_connections=-1)


def test_the_server_stops_promptly_with_connections_open():
    started = time.monotonic()
    with _server() as (host, port, _):
        socks = [socket.create_connection((host, port)) for _ in range(5)]
    assert time.monotonic() - started < 5
    for s in socks:
        s.close()

"""``cnnkit serve``: the web app (Starlette routes, served by uvicorn).

The page, after CNN Explainer (Wang et al. 2020, "CNN Explainer: Learning Convolutional
Neural Networks with Interactive Visualization", IEEE TVCG), is ``static/``: HTML,
vanilla JavaScript and CSS shipped in the package, nothing from a CDN, so it works
offline. It talks to a small JSON API over an
:class:`~cnnkit.web.explorer.Explorer`:

=========================  ==================================================================
``GET /``                  the explorer page
``GET /api/model``         run, classes, layers (with what is sent of each), facts, methods,
                           the weights files served and whether they are ``stale``
``GET /api/weights``       just the weights files, when loaded, and ``stale``
``POST /api/reload``       read the run's weights again (after a training replaced them)
``GET /api/inputs``        test images ``?offset=&limit=`` with labels and thumbnails
``POST /api/upload``       an image (multipart field ``file``) -> ``{"input": "upload:..."}``
``GET /api/activations``   every layer's maps for ``?input=``, logits and probabilities
``GET /api/neuron``        ``?input=&layer=&c=&y=&x=``: the arithmetic of one neuron
``GET /api/filters``       ``?layer=``: a convolution's kernels or a linear layer's weights
``GET /api/explain``       ``?input=&method=&target=``: an explanation heat map
=========================  ==================================================================

Errors are JSON ``{"error": message}``: 400 for a bad request (a bad upload included),
403 for a request from another site (:mod:`cnnkit.web.security`), 404 for an unknown
input or layer, 411/413 for an upload without a length or too big (bytes, pixels or a
form field), 503 when uploads queue too long. Inputs are ids, never paths, and static
files are served by Starlette's ``StaticFiles`` (which refuses paths outside its folder).
The server binds 127.0.0.1 unless told otherwise, then also checks the Host header
(against DNS rebinding), and every answer carries a Content-Security-Policy that allows
only this origin. Only a few uploads are read and decoded at a time (the others wait,
their bodies in the socket, not in memory); connections are timed and capped by
:mod:`cnnkit.web.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .explorer import Explorer
from .inputs import UploadTooLarge
from .protocol import ServerLimits
from .security import SameOrigin, SecurityHeaders

__all__ = ["create_app", "load_explorer", "serve", "running", "MAX_UPLOAD_BYTES"]

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the file
_FIELD_BYTES = 64 * 1024  # a form field other than the file (the browser sends none)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _error(status: int) -> Callable[[Request, Exception], Any]:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        text = exc.detail if isinstance(exc, HTTPException) else " ".join(str(exc).split())
        code = exc.status_code if isinstance(exc, HTTPException) else status
        # A refused POST may leave its body unread: close the connection after the answer
        # (cnnkit.web.protocol reads the rest first, so the client can read the answer).
        close = {"connection": "close"} if request.method == "POST" else None
        return JSONResponse({"error": text or type(exc).__name__}, status_code=code,
                            headers=close)
    return handler


async def _gone(request: Request, exc: Exception) -> Response:
    """The client left (or was timed out) mid-request: nobody reads an answer."""
    return Response(status_code=400)


class _UploadSlots:
    """At most ``n`` uploads are read and decoded at a time; the others wait (their bodies
    wait in the socket, not in memory) up to ``wait`` seconds, then get a 503.

    One semaphore per event loop: asyncio's belong to the loop that first waits on them,
    and an app may be served by several (a test client starts one per request).
    """

    def __init__(self, n: int, wait: float) -> None:
        if n < 1 or wait <= 0:
            raise ValueError(f"concurrent_uploads must be >= 1 and upload_wait > 0, got {n} "
                             f"and {wait}")
        self.n, self.wait = n, wait
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                                    asyncio.Semaphore] = weakref.WeakKeyDictionary()

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.n)
        try:
            with anyio.fail_after(self.wait):
                await semaphore.acquire()
        except TimeoutError:
            raise HTTPException(503, f"{self.n} uploads are being decoded and more wait; try "
                                "again in a few seconds") from None
        try:
            yield
        finally:
            semaphore.release()


class _Current:
    """The explorer the routes answer from. A reload puts a fresh one in its place: a
    reference swap, so a request in flight finishes on the explorer it started with."""

    def __init__(self, explorer: Explorer) -> None:
        self.explorer = explorer
        self._lock = threading.Lock()

    def reload(self) -> Explorer:
        with self._lock:  # one reload at a time; answers go on meanwhile
            self.explorer = self.explorer.reloaded()
            return self.explorer


def _int(request: Request, name: str, default: int | None = None,
         required: bool = False) -> int | None:
    text = request.query_params.get(name)
    if not text:
        if required:
            raise ValueError(f"query parameter {name!r} is required")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"query parameter {name!r} must be an integer, got {text!r}") from None


def _required(request: Request, name: str) -> str:
    value = request.query_params.get(name)
    if not value:
        raise ValueError(f"query parameter {name!r} is required")
    return value


def create_app(explorer: Explorer, allowed_hosts: list[str] | None = None, *,
               concurrent_uploads: int = 4, upload_wait: float = 30.0) -> Starlette:
    """The web app over ``explorer``.

    Args:
        explorer: the model side.
        allowed_hosts: Host header values accepted (DNS-rebinding protection); None
            accepts any (tests, or a server bound to all interfaces).
        concurrent_uploads: uploads read and decoded at a time; the others wait.
        upload_wait: seconds an upload may wait for its turn before a 503.

    Example:
        >>> import json
        >>> import urllib.request
        >>> import cnnkit
        >>> from cnnkit.web import create_app, load_explorer, running
        >>> trained = cnnkit.train(data="digits", model="tinyvgg", epochs=1, progress=False)
        >>> app = create_app(load_explorer(trained.path), allowed_hosts=["127.0.0.1"])
        >>> with running(app) as url:
        ...     answer = urllib.request.urlopen(url + "api/neuron?input=test:0&layer=0&c=0&y=0&x=0")
        ...     answer.status, json.load(answer)["matches"]
        (200, True)
    """
    current = _Current(explorer)
    slots = _UploadSlots(concurrent_uploads, upload_wait)

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    def model(request: Request) -> JSONResponse:
        return JSONResponse(current.explorer.info())

    def weights(request: Request) -> JSONResponse:
        return JSONResponse(current.explorer.freshness())

    def reload(request: Request) -> JSONResponse:
        return JSONResponse(current.reload().freshness())

    def inputs(request: Request) -> JSONResponse:
        return JSONResponse(current.explorer.inputs.listing(_int(request, "offset", 0),
                                                            _int(request, "limit", 60)))

    def activations(request: Request) -> JSONResponse:
        return JSONResponse(current.explorer.activations(_required(request, "input"),
                                                         _int(request, "depth")))

    def neuron(request: Request) -> JSONResponse:
        # c alone in a vector; c and x (1D), y and x (2D) or z, y and x (3D) in a map
        position = [_int(request, "c")] + [_int(request, axis) for axis in ("z", "y", "x")
                                           if request.query_params.get(axis) is not None]
        if None in position:
            raise ValueError("give the neuron as c (a vector) or c and its position in the "
                             "map: x (1D), y and x (2D), z, y and x (3D)")
        return JSONResponse(current.explorer.neuron(_required(request, "input"),
                                                    _int(request, "layer", required=True),
                                                    tuple(position)))

    def filters(request: Request) -> JSONResponse:
        return JSONResponse(current.explorer.filters(_int(request, "layer", required=True)))

    def explain(request: Request) -> JSONResponse:
        return JSONResponse(current.explorer.explain(_required(request, "input"),
                                                     request.query_params.get("method",
                                                                              "gradcam"),
                                                     _int(request, "target"),
                                                     _int(request, "depth")))

    async def upload(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise HTTPException(411, "send the upload with a Content-Length header (as a "
                                "browser form does)")
        if int(length) > MAX_UPLOAD_BYTES + _FORM_OVERHEAD:
            raise UploadTooLarge(f"the upload is {int(length):,} bytes, over the limit of "
                                 f"{MAX_UPLOAD_BYTES:,}; upload a smaller image")
        async with slots.held():
            data, name = await _read_file(request)
            store = current.explorer.inputs
            key = await run_in_threadpool(store.add_upload, data, name)
        return JSONResponse({"input": key, "name": name}, status_code=201)

    routes = [
        Route("/", index),
        Route("/api/model", model),
        Route("/api/weights", weights),
        Route("/api/reload", reload, methods=["POST"]),
        Route("/api/inputs", inputs),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/activations", activations),
        Route("/api/neuron", neuron),
        Route("/api/filters", filters),
        Route("/api/explain", explain),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    middleware.append(Middleware(SameOrigin))
    handlers = {UploadTooLarge: _error(413), ValueError: _error(400), LookupError: _error(404),
                HTTPException: _error(400), ClientDisconnect: _gone, Exception: _error(500)}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


async def _read_file(request: Request) -> tuple[bytes, str]:
    """The multipart field ``file`` of ``request``: its bytes and its base name.

    Raises:
        UploadTooLarge: the file or another field is over its limit.
        ValueError: no field ``file``.
    """
    try:
        async with request.form(max_files=1, max_fields=4, max_part_size=_FIELD_BYTES) as form:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise ValueError("send the image as the multipart form field 'file'")
            data = await file.read(MAX_UPLOAD_BYTES + 1)
            name = os.path.basename(file.filename or "upload")
    except HTTPException as e:  # Starlette's multipart errors; one of them is a size
        if "maximum size" in str(e.detail):
            raise UploadTooLarge(f"a form field other than the file is over {_FIELD_BYTES:,} "
                                 "bytes; send only the image, as the field 'file'") from e
        raise
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadTooLarge(f"the image is over the limit of {MAX_UPLOAD_BYTES:,} bytes")
    return data, name


def load_explorer(run: str | os.PathLike, weights: str = "best", **options: Any) -> Explorer:
    """An :class:`Explorer` for the run folder ``run`` (``weights``: best, last or int8)."""
    return Explorer.load(run, weights, **options)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it small answers on a kept-alive connection wait ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections queue from now on, before the server loop accepts them
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); give another --port "
                         "(0 picks a free one) or --host") from e
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(run: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          weights: str = "best", announce: Callable[[str], None] | None = None,
          limits: ServerLimits | None = None) -> None:
    """Serve the explorer for ``run`` until interrupted (Ctrl-C).

    Args:
        run: the run folder.
        host: interface to bind: 127.0.0.1 (this machine only) unless told otherwise.
        port: TCP port; 0 picks a free one.
        weights: ``best``, ``last`` or ``int8``.
        announce: called with the URL once the socket listens (the CLI prints it).
        limits: timeouts and caps of connections (default :class:`ServerLimits`).
    """
    sock = _listen(host, port)  # first: a busy port fails before the model loads
    try:
        explorer = load_explorer(run, weights)
        allowed = ["127.0.0.1", "localhost", "[::1]", "::1"] if host in _LOOPBACK else None
        config = (limits or ServerLimits()).uvicorn_config(create_app(explorer,
                                                                      allowed_hosts=allowed))
        server = uvicorn.Server(config)
        if announce is not None:
            announce(_url(sock))
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def running(app: Starlette, host: str = "127.0.0.1", timeout: float = 30,
            limits: ServerLimits | None = None) -> Iterator[str]:
    """Serve ``app`` in a background thread on a free port for the block; yields its URL.

    For notebooks, tests and benchmarks; the server stops when the block ends.

    Example:
        >>> import urllib.request
        >>> import cnnkit
        >>> from cnnkit.web import create_app, load_explorer, running
        >>> trained = cnnkit.train(data="digits", model="tinyvgg", epochs=1, progress=False)
        >>> with running(create_app(load_explorer(trained.path))) as url:
        ...     print(url.rsplit(":", 1)[0], urllib.request.urlopen(url + "api/model").status)
        http://127.0.0.1 200
    """
    sock = _listen(host, 0)
    server = uvicorn.Server((limits or ServerLimits()).uvicorn_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server did not start within {timeout} s")
        time.sleep(0.02)
    try:
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()

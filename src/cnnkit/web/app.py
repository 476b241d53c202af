"""``cnnkit serve``: the web app (Starlette routes, served by uvicorn).

The page, after CNN Explainer (Wang et al. 2020, "CNN Explainer: Learning Convolutional
Neural Networks with Interactive Visualization", IEEE TVCG), is ``static/``: HTML,
vanilla JavaScript and CSS shipped in the package, nothing from a CDN, so it works
offline. It talks to a small JSON API over an
:class:`~cnnkit.web.explorer.Explorer`:

=========================  ==================================================================
``GET /``                  the explorer page
``GET /api/model``         run, classes, layers (with what is sent of each), facts, methods
``GET /api/inputs``        test images ``?offset=&limit=`` with labels and thumbnails
``POST /api/upload``       an image (multipart field ``file``) -> ``{"input": "upload:..."}``
``GET /api/activations``   every layer's maps for ``?input=``, logits and probabilities
``GET /api/neuron``        ``?input=&layer=&c=&y=&x=``: the arithmetic of one neuron
``GET /api/filters``       ``?layer=``: a convolution's kernels or a linear layer's weights
``GET /api/explain``       ``?input=&method=&target=``: an explanation heat map
=========================  ==================================================================

Errors are JSON ``{"error": message}``: 400 for a bad request (a bad upload included),
404 for an unknown input or layer, 411/413 for an upload without a length or too big.
Inputs are ids, never paths, and static files are served by Starlette's
``StaticFiles`` (which refuses paths outside its folder). The server binds 127.0.0.1
unless told otherwise, then also checks the Host header (against DNS rebinding), and
every answer carries a Content-Security-Policy that allows only this origin.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .explorer import Explorer
from .inputs import UploadTooLarge

__all__ = ["create_app", "load_explorer", "serve", "running", "MAX_UPLOAD_BYTES"]

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the file
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; "
     b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


class _SecurityHeaders:
    """ASGI middleware adding the headers above to every HTTP answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(status: int) -> Callable[[Request, Exception], Any]:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        text = exc.detail if isinstance(exc, HTTPException) else " ".join(str(exc).split())
        return JSONResponse({"error": text or type(exc).__name__},
                            status_code=exc.status_code if isinstance(exc, HTTPException)
                            else status)
    return handler


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


def create_app(explorer: Explorer, allowed_hosts: list[str] | None = None) -> Starlette:
    """The web app over ``explorer``.

    Args:
        explorer: the model side.
        allowed_hosts: Host header values accepted (DNS-rebinding protection); None
            accepts any (tests, or a server bound to all interfaces).

    Example:
        >>> from starlette.testclient import TestClient  # doctest: +SKIP
        >>> client = TestClient(create_app(load_explorer("runs/tinyvgg-digits")))  # doctest: +SKIP
        >>> answer = client.get("/api/neuron?input=test:0&layer=0&c=0&y=0&x=0")  # doctest: +SKIP
        >>> answer.json()["matches"]  # doctest: +SKIP
        True
    """

    def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    def model(request: Request) -> JSONResponse:
        return JSONResponse(explorer.info())

    def inputs(request: Request) -> JSONResponse:
        return JSONResponse(explorer.inputs.listing(_int(request, "offset", 0),
                                                    _int(request, "limit", 60)))

    def activations(request: Request) -> JSONResponse:
        return JSONResponse(explorer.activations(_required(request, "input")))

    def neuron(request: Request) -> JSONResponse:
        position = [_int(request, "c")]
        if request.query_params.get("y") is not None:
            position += [_int(request, "y"), _int(request, "x")]
        if None in position:
            raise ValueError("give the neuron as c (a vector) or c, y and x (a map)")
        return JSONResponse(explorer.neuron(_required(request, "input"),
                                            _int(request, "layer", required=True),
                                            tuple(position)))

    def filters(request: Request) -> JSONResponse:
        return JSONResponse(explorer.filters(_int(request, "layer", required=True)))

    def explain(request: Request) -> JSONResponse:
        return JSONResponse(explorer.explain(_required(request, "input"),
                                             request.query_params.get("method", "gradcam"),
                                             _int(request, "target")))

    async def upload(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise HTTPException(411, "send the upload with a Content-Length header (as a "
                                "browser form does)")
        if int(length) > MAX_UPLOAD_BYTES + _FORM_OVERHEAD:
            raise UploadTooLarge(f"the upload is {int(length):,} bytes, over the limit of "
                                 f"{MAX_UPLOAD_BYTES:,}; upload a smaller image")
        async with request.form(max_files=1, max_fields=4) as form:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise ValueError("send the image as the multipart form field 'file'")
            data = await file.read(MAX_UPLOAD_BYTES + 1)
            name = os.path.basename(file.filename or "upload")
        if len(data) > MAX_UPLOAD_BYTES:
            raise UploadTooLarge(f"the image is over the limit of {MAX_UPLOAD_BYTES:,} bytes")
        key = await run_in_threadpool(explorer.inputs.add_upload, data, name)
        return JSONResponse({"input": key, "name": name}, status_code=201)

    routes = [
        Route("/", index),
        Route("/api/model", model),
        Route("/api/inputs", inputs),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/activations", activations),
        Route("/api/neuron", neuron),
        Route("/api/filters", filters),
        Route("/api/explain", explain),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    handlers = {UploadTooLarge: _error(413), ValueError: _error(400), LookupError: _error(404),
                HTTPException: _error(400), Exception: _error(500)}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


def load_explorer(run: str | os.PathLike, weights: str = "best", **options: Any) -> Explorer:
    """An :class:`Explorer` for the run folder ``run`` (``weights``: best, last or int8)."""
    from cnnkit.train import load_run

    loaded = load_run(run, weights=weights)
    float_model = load_run(run).model if weights == "int8" else None
    return Explorer(loaded, weights=weights, float_model=float_model, **options)


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


def _server(app: Starlette) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(run: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
          weights: str = "best", announce: Callable[[str], None] | None = None) -> None:
    """Serve the explorer for ``run`` until interrupted (Ctrl-C).

    Args:
        run: the run folder.
        host: interface to bind: 127.0.0.1 (this machine only) unless told otherwise.
        port: TCP port; 0 picks a free one.
        weights: ``best``, ``last`` or ``int8``.
        announce: called with the URL once the socket listens (the CLI prints it).
    """
    sock = _listen(host, port)  # first: a busy port fails before the model loads
    try:
        explorer = load_explorer(run, weights)
        allowed = ["127.0.0.1", "localhost", "[::1]", "::1"] if host in _LOOPBACK else None
        server = _server(create_app(explorer, allowed_hosts=allowed))
        if announce is not None:
            announce(_url(sock))
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def running(app: Starlette, host: str = "127.0.0.1", timeout: float = 30) -> Iterator[str]:
    """Serve ``app`` in a background thread on a free port for the block; yields its URL.

    For notebooks, tests and benchmarks; the server stops when the block ends.

    Example:
        >>> with running(create_app(explorer)) as url:  # doctest: +SKIP
        ...     urllib.request.urlopen(url + "api/model").status
        200
    """
    sock = _listen(host, 0)
    server = _server(app)
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

"""What every answer of ``cnnkit serve`` carries, and which requests it refuses unread.

Two ASGI middlewares:

* :class:`SecurityHeaders`: a Content-Security-Policy that allows only this origin (no
  inline script, no other site, no framing), ``nosniff`` and no referrer, on every answer;
* :class:`SameOrigin`: the API answers only its own page. A page on any other site the
  user visits can make the browser send requests to ``127.0.0.1`` (a form post needs no
  permission: "cross-site request forgery"); the browser says where a request comes from
  in ``Sec-Fetch-Site`` (W3C Fetch Metadata Request Headers) and ``Origin`` (RFC 6454),
  which a page cannot forge. A request to ``/api/`` that says it comes from another site
  or origin gets a 403; one without either header (curl, scripts) is not from a browser
  page and passes.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

__all__ = ["SecurityHeaders", "SameOrigin", "cross_site"]

_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; "
     b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
_DEFAULT_PORTS = MappingProxyType({"http": 80, "https": 443})
_SAME = ("same-origin", "none")  # "none": the user typed the URL or opened a bookmark


class SecurityHeaders:
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


def _origin(scheme: str, netloc: str) -> tuple[str, str, int | None]:
    parts = urlsplit(f"{scheme}://{netloc}")
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def cross_site(headers: Headers, scheme: str) -> str | None:
    """Why a request with these headers comes from another site or origin, or None.

    Example:
        >>> from starlette.datastructures import Headers
        >>> from cnnkit.web.security import cross_site
        >>> cross_site(Headers({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}),
        ...            "http") is None
        True
        >>> cross_site(Headers({"sec-fetch-site": "cross-site"}), "http")[:24]
        'a cross-site request is '
    """
    site = headers.get("sec-fetch-site")
    if site is not None and site.lower() not in _SAME:
        return (f"a {site} request is refused (Sec-Fetch-Site: {site}); only the explorer's own "
                "page may use this API")
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if not parts.scheme or _origin(parts.scheme, parts.netloc) != \
                _origin(scheme, headers.get("host", "")):
            return (f"a request from another origin ({origin}) is refused; open the explorer's "
                    "own page")
    return None


class SameOrigin:
    """ASGI middleware answering 403 ``{"error": ...}`` to a cross-site request under
    ``prefix``, before the request is routed or its body read."""

    def __init__(self, app: Any, prefix: str = "/api/") -> None:
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            reason = cross_site(Headers(scope=scope), scope.get("scheme", "http"))
            if reason is not None:
                await JSONResponse({"error": reason}, status_code=403,
                                   headers={"connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)

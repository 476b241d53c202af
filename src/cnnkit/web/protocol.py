"""Connections of ``cnnkit serve``: slow clients are closed, open connections are capped,
and a request refused before it was read whole still gets an answer the client can read.

uvicorn's h11 protocol (:class:`uvicorn.protocols.http.h11_impl.H11Protocol`) as it is
holds a connection that never sends a request forever (2,000 idle connections held 2,000
descriptors), and closes a connection it answered early (a 413 for a 9 MB upload, a 431
for a 200 KB head) with the rest of the request unread, so the kernel sends a TCP reset
that destroys the answer before the client reads it. :class:`GuardedH11Protocol` adds, per
:class:`ServerLimits`:

* a **header timeout**: a request head must arrive within ``header_timeout`` seconds of
  the connection (or of its first byte, on a kept-alive connection), else the connection
  is closed (with a 408 if part of a head came); idle kept-alive connections close after
  ``keep_alive`` seconds (uvicorn's own timer);
* a **body timeout**: a body must arrive within ``body_timeout`` seconds of its head, not
  counting the time the server itself stops reading (backpressure while the app is busy);
* a **connection cap**: beyond ``max_connections`` open connections, the one that has
  waited longest for a request head (idle or slow) is closed to make room, as nginx
  reuses idle keep-alive connections; if every connection is busy with a request, the
  new one gets a 503 and is closed at once. A flood of idle connections thus holds at most
  ``max_connections`` descriptors and still leaves room for clients that send requests;
* **readable refusals**: closing is done in stages, as RFC 9112 (Fielding, Nottingham and
  Reschke 2022, "HTTP/1.1", section 9.6 "Tear-down") advises against the "TCP reset
  problem": when the client may still be sending, the server half-closes (its answer,
  then FIN) and reads and discards the rest of the request, up to ``drain_bytes`` or
  ``linger`` seconds, before closing. A head over ``max_head_bytes`` gets a 431.
"""

from __future__ import annotations

import asyncio
import functools
import http
import json
import math
from dataclasses import dataclass, fields
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ServerLimits", "GuardedH11Protocol"]


@dataclass(frozen=True)
class ServerLimits:
    """How long and how much a client may take of the server.

    Args:
        header_timeout: seconds for a request head to arrive.
        body_timeout: seconds for a request body to arrive, while the server reads.
        keep_alive: seconds an idle kept-alive connection stays open.
        max_connections: open connections; a new one beyond is refused (503) and closed.
        max_head_bytes: largest request head (request line and headers); more gets a 431.
        linger: seconds to read and discard the rest of a refused request before closing.
        drain_bytes: most bytes read and discarded so.

    Example:
        >>> from starlette.applications import Starlette
        >>> from cnnkit.web import ServerLimits
        >>> config = ServerLimits(header_timeout=2).uvicorn_config(Starlette())
        >>> config.timeout_keep_alive, config.h11_max_incomplete_event_size
        (5.0, 16384)
        >>> ServerLimits(linger=0)
        Traceback (most recent call last):
        ValueError: ServerLimits.linger must be a positive number, got 0
    """

    header_timeout: float = 5.0
    body_timeout: float = 60.0
    keep_alive: float = 5.0
    max_connections: int = 512
    max_head_bytes: int = 16 * 1024
    linger: float = 5.0
    drain_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"ServerLimits.{f.name} must be a positive number, got "
                                 f"{value!r}")

    def uvicorn_config(self, app: Any) -> uvicorn.Config:
        """A uvicorn configuration serving ``app`` on :class:`GuardedH11Protocol`."""
        return uvicorn.Config(app, http=functools.partial(GuardedH11Protocol, limits=self),
                              timeout_keep_alive=self.keep_alive,  # type: ignore[arg-type]
                              h11_max_incomplete_event_size=self.max_head_bytes,
                              log_level="warning", access_log=False)


def _plain(status: int, message: str) -> bytes:
    """A whole HTTP answer ``{"error": message}`` that closes the connection."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class _Transport:
    """The socket's transport as uvicorn's code sees it: ``close`` closes in stages, and
    pausing and resuming reads stop and restart the body clock."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport, self._protocol = transport, protocol

    def close(self) -> None:
        self._protocol.close_in_stages()

    def is_closing(self) -> bool:
        return self._transport.is_closing() or self._protocol.lingering

    def pause_reading(self) -> None:
        self._transport.pause_reading()
        self._protocol.body_clock(False)

    def resume_reading(self) -> None:
        if not self._protocol.lingering:
            self._transport.resume_reading()
            self._protocol.body_clock(True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with timeouts, a connection cap and closing in stages.

    uvicorn makes one per connection: ``uvicorn.Config(http=functools.partial(
    GuardedH11Protocol, limits=ServerLimits()))`` (:meth:`ServerLimits.uvicorn_config`).
    """

    def __init__(self, *args: Any, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.lingering = False
        self._raw: asyncio.Transport | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._body_cycle: Any = None  # the request the body clock times
        self._body_left = limits.body_timeout
        self._body_since = 0.0
        self._drained = 0
        self._idle_since = 0.0  # when it began to wait for a request head

    # -- connection life ------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        self._idle_since = self.loop.time()
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            transport.write(_plain(503, f"the server holds {self.limits.max_connections} "
                                        "connections, its limit, all busy; try again in a few "
                                        "seconds"))
            transport.close()
            return
        self._watch()

    def waiting_for_head(self) -> bool:
        """Open, and no request in progress: idle, kept alive, or sending a head slowly."""
        return self._raw is not None and not self._raw.is_closing() and not self.lingering \
            and self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE

    def _make_room(self) -> bool:
        """Close the other connection that has waited longest for a request head; False if
        there is none (every other connection is busy with a request)."""
        waiting = [c for c in self.connections if c is not self
                   and isinstance(c, GuardedH11Protocol) and c.waiting_for_head()]
        if not waiting:
            return False
        min(waiting, key=lambda c: c._idle_since)._close_now()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._body_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the answer is sent: read and discard the rest, within bounds
            self._drained += len(data)
            if self._drained > self.limits.drain_bytes:
                self._close_now()
            return
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        self._idle_since = self.loop.time()
        super().on_response_complete()
        if not self.lingering and self._raw is not None and not self._raw.is_closing():
            self._watch()

    def send_400_response(self, msg: str) -> None:
        if len(self.conn.trailing_data[0]) > self.limits.max_head_bytes:  # h11's 431 case
            assert self._raw is not None
            self._raw.write(_plain(431, "the request head (request line and headers) is over "
                                        f"{self.limits.max_head_bytes:,} bytes; send fewer or "
                                        "shorter headers"))
            self.close_in_stages()
        else:
            super().send_400_response(msg)

    # -- closing --------------------------------------------------------------------

    def _owes_request(self) -> bool:
        """Whether the client may still be sending (a body, or a head) when we close."""
        state = self.conn.their_state
        return state in (h11.SEND_BODY, h11.ERROR) or (
            state is h11.IDLE and bool(self.conn.trailing_data[0]))

    def close_in_stages(self) -> None:
        """Close; if the client may still be sending, half-close first and drain it."""
        raw = self._raw
        if raw is None or self.lingering or raw.is_closing():
            if raw is not None and not self.lingering:
                raw.close()
            return
        if not (self._owes_request() and raw.can_write_eof()):
            raw.close()
            return
        self.lingering = True
        self._unset_keepalive_if_required()
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        raw.write_eof()  # after what is buffered: the answer, then FIN
        raw.resume_reading()
        self._linger_timer = self.loop.call_later(self.limits.linger, self._close_now)

    def _close_now(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.close()

    # -- timeouts -------------------------------------------------------------------

    def _watch(self) -> None:
        """Arm or disarm the header and body timers for the state of the request."""
        state = self.conn.their_state
        waiting_for_head = state is h11.IDLE and self.timeout_keep_alive_task is None
        if waiting_for_head and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout,
                                                      self._header_timeout)
        elif not waiting_for_head and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self.cycle is not self._body_cycle:  # a new request: its body gets a fresh clock
            self._body_cycle, self._body_left = self.cycle, self.limits.body_timeout
        self.body_clock(not self.flow.read_paused if self.flow is not None else True)

    def body_clock(self, running: bool) -> None:
        """Run the body clock while a body is owed and the server reads; else stop it."""
        running = running and self.conn.their_state is h11.SEND_BODY and not self.lingering
        if running and self._body_timer is None:
            self._body_since = self.loop.time()
            self._body_timer = self.loop.call_later(max(self._body_left, 0), self._body_timeout)
        elif not running and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
            self._body_left -= self.loop.time() - self._body_since

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and self._raw is not None:
            if self.conn.trailing_data[0]:  # part of a head came: say why it is closed
                self._raw.write(_plain(408, "the request head did not arrive within "
                                            f"{self.limits.header_timeout:g} s"))
            self._close_now()

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY:
            self._close_now()

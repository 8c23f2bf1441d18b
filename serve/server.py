"""uvicorn as ``textgen serve`` runs it: the options that bound what a client can hold, from
``ServeSettings`` (``uvicorn_options``), and the HTTP/1.1 protocol with a deadline for request heads.

- The request head (request line and headers) is at most ``max_header_bytes``: uvicorn's h11
  parser (``h11_max_incomplete_event_size``; the httptools parser has no such limit) answers 400
  and closes the connection past it.
- A head must be complete within ``header_timeout_s`` of the connection's start, or of the first
  byte of the next request on a kept-alive connection (``TimedH11Protocol``; uvicorn has no such
  deadline, only ``timeout_keep_alive`` between requests): else 408 and the connection is closed.
  The body's deadline is the app's (``serve.http.BodyDeadline``), as it is behind Ray Serve.
- ``max_connections`` is uvicorn's ``limit_concurrency``: at that many open connections (or
  running requests) a new request gets uvicorn's 503. uvicorn still accepts and holds the
  connections past it (until their head's deadline), so ``TimedH11Protocol`` closes a connection
  that opens past it at once, with a 503.

Behind Ray Serve (``serve/ray_serve.py``) the connections are its proxy's: these options do not
apply there.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.engine import ServeSettings


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """The ``uvicorn.run`` options of the connection limits and deadlines (picklable, for
    ``--workers``)."""
    return {
        "http": functools.partial(TimedH11Protocol, header_timeout_s=settings.header_timeout_s),
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "limit_concurrency": settings.max_connections,
    }


def raw_response(status: int, reason: str, message: str) -> bytes:
    """A whole JSON error response that closes the connection, for a connection with no request."""
    body = json.dumps({"error": message, "fields": []}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (see the module docstring)."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.limit_concurrency
        if limit is not None and len(self.connections) > limit:
            transport.write(raw_response(503, "Service Unavailable", f"the server has {limit} connections open "
                                         "(max_connections); retry later"))
            transport.close()
            return
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _watch_head(self) -> None:
        """A timer while a head is awaited (the client's h11 state is IDLE), none otherwise."""
        if not self._waiting_for_head():
            self._stop_head_timer()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self._waiting_for_head():
            self.logger.warning("closing a connection whose request head did not arrive within %g s",
                                self.header_timeout_s)
            self.transport.write(raw_response(408, "Request Timeout", "the request head did not arrive within "
                                              f"{self.header_timeout_s:g} s (header_timeout_s); send it faster"))
            self.transport.close()

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

Graceful drain (``DrainingServer``, ``drain_seconds``): on the first SIGTERM (or Ctrl-C) the
server stops taking requests but keeps its listener (readiness and new generations get 503 +
Retry-After, so a load balancer that has not noticed yet gets a fast answer), lets the admitted
generations finish for up to ``drain_seconds``, ends those still running at the deadline (streams
with a last event saying so, JSON requests with a 503), then lets uvicorn shut down as usual (its
``timeout_graceful_shutdown`` for the connections, then the lifespan) and exits with status 0. A
second signal shuts down at once (uvicorn's handling). ``--workers`` > 1 runs uvicorn's own
servers: there a SIGTERM ends streams at once with an error event.

Behind Ray Serve (``serve/ray_serve.py``) the connections are its proxy's: these options do not
apply there (Ray Serve drains replicas itself: ``graceful_shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.engine import Engine
from serve.settings import ServeSettings

log = logging.getLogger("uvicorn.error")


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


# ---------------------------------------------------------------------------------------------
# Graceful drain


def engine_of(app: Any) -> Engine | None:
    """The engine of the textgen app inside uvicorn's wrappers (``.app`` links), if running."""
    for _ in range(16):
        state = getattr(getattr(app, "state", None), "textgen", None)
        if state is not None:
            return state.engine
        app = getattr(app, "app", None)
    return None


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain of the module docstring before its own shutdown."""

    def __init__(self, config: uvicorn.Config, drain_s: float) -> None:
        super().__init__(config)
        self.drain_s = drain_s
        self._drain_asked = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_asked or self.drain_s <= 0:
            super().handle_exit(sig, frame)  # a second signal, or no drain: uvicorn's way
            return
        self._drain_asked = True  # started by on_tick, on the event loop

    async def on_tick(self, counter: int) -> bool:
        if self._drain_asked and self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())
        return await super().on_tick(counter)

    async def drain(self) -> None:
        engine = engine_of(self.config.loaded_app)
        if engine is not None:
            engine.stop_accepting()
            log.info("draining: no new requests; %d rows in flight get up to %g s", engine.stats()["rows_in_flight"],
                     self.drain_s)
            await wait_drained(engine, self.drain_s)
        self.should_exit = True


async def wait_drained(engine: Engine, drain_s: float, poll_s: float = 0.05) -> None:
    """Until no row is in flight, or ``drain_s`` passed: then the engine ends what still runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain_s
    while engine.stats()["rows_in_flight"] and loop.time() < deadline:
        await asyncio.sleep(poll_s)
    left = engine.stats()["rows_in_flight"]
    if left:
        log.warning("drain deadline (%g s) passed: ending %d rows", drain_s, left)
        engine.close(0, reason=f"the server is shutting down and its drain deadline ({drain_s:g} s) passed "
                               "before this request finished; retry the request")
    await asyncio.sleep(poll_s)  # the last events reach their streams before uvicorn closes connections

"""What the HTTP routes share to run engine requests: waiting for a client's disconnect, the events
of several tickets as one sequence, and the end of a stream when the server shuts down."""

import asyncio
from typing import AsyncIterator, Sequence

from starlette.requests import Request as HTTPRequest

from serve.engine import End, Event, Ticket

SHUTDOWN_GRACE_S = 2.0  # a stream's time to send its last event when the server stops


async def disconnected(request: HTTPRequest) -> None:
    """Returns when the client disconnects (the body has been read: ``receive`` waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merged(tickets: Sequence[Ticket]) -> AsyncIterator[tuple[int, Event]]:
    """(ticket number, event) of every ticket, each ticket's in order, until all have ended."""
    if len(tickets) == 1:  # the common case, without a task per event
        while True:
            event = await tickets[0].next()
            yield 0, event
            if isinstance(event, End):
                return
    pending = {asyncio.ensure_future(t.next()): i for i, t in enumerate(tickets)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=pending.__getitem__):
                i = pending.pop(future)
                event = future.result()
                yield i, event
                if not isinstance(event, End):
                    pending[asyncio.ensure_future(tickets[i].next())] = i
    finally:
        for future in pending:
            future.cancel()


class Farewell:
    """sse-starlette's ``shutdown_event`` for one stream: it calls ``set()`` when the server starts
    shutting down; the stream then ends with an error event and a complete response instead of a
    connection cut mid-chunk."""

    def __init__(self, tickets: Sequence[Ticket]) -> None:
        self.tickets, self._set = tickets, False

    def set(self) -> None:
        if not self._set:
            self._set = True
            for ticket in self.tickets:
                ticket.interrupt("the server is shutting down; retry the request")

    def is_set(self) -> bool:
        return self._set

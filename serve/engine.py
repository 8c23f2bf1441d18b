"""The batching engine behind the HTTP service: ONE thread runs the model for every request.

A model call has a fixed cost whatever its batch, so, as LLM servers do, the requests of a server
share a running batch (continuous batching over ``serve.decode.Batch``):

1. ``Engine.prepare``: a request's checked ``SamplingParams`` (against ``Engine.limits``, this
   server's caps) and its prompt, checked and encoded once -> ``Request``.
2. ``Engine.submit`` admits it, or raises ``EngineBusy`` at once when its ``n`` rows would take the
   rows in flight past ``max_rows``, or its prompt the characters waiting to be consumed past
   ``max_queued_prefill_chars``: nothing waits in an unbounded queue.
3. The engine thread consumes the newcomers' prompts but their last character (K = 0 calls):
   prompts that fit one chunk together (``OnnxModel.prefill``), longer ones ``PREFILL_CHUNK``
   characters per iteration between chunk calls, so a long prompt delays the running streams a
   little instead of stalling them; then the request's rows join the batch, pending the prompt's
   last character. A lone newcomer on an idle engine has its whole prompt in its first chunk call.
   The prompts with the fewest characters left go first (``Prompts.consume``): a short prompt is
   not stuck behind long ones, and what a prompt makes does not depend on that order.
4. Every iteration is one chunk call for all rows (``Batch.step``, ``chunk_size`` characters each).
5. Characters go to the request's event loop (``loop.call_soon_threadsafe``) in chunks: a row's
   first ones at once, then what accumulated every ``stream_interval_ms``, held back while they
   may begin a stop string (``Row.release``, as ``Generator.stream``).
6. Rows that finish (length, stop) or whose request is cancelled (``Engine.cancel``: the client
   went away) leave the batch at once and stop counting against ``max_rows``.

Row i of a request with seed s makes exactly ``Generator.generate(prompt, seed=s + i)`` with the
same parameters, whatever shares the batch (``serve.decode``; tests/test_http.py checks it).
Nothing here imports FastAPI; the settings (``serve.settings``) neither, so that ``textgen serve``
builds its flags without the web stack.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from serve.decode import Batch, Prompts, Row
from serve.generator import Generator
from serve.params import SamplingParams
from serve.settings import ServeSettings

log = logging.getLogger("textgen.engine")

PREFILL_CHUNK = 128  # prompt characters per call for long prompts (a few ms of model time each)
PREFILL_BUDGET = 128  # prompt characters consumed per engine iteration (between two chunk calls)


# ---------------------------------------------------------------------------------------------
# Requests and their events


class EngineBusy(Exception):
    """An admission limit is reached (rows in flight, queued prompt characters): retry after
    ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int, reason: str = "rows") -> None:
        super().__init__(f"the server is busy: {message}; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s
        self.reason = reason  # "rows" (max_rows) or "prefill_chars" (max_queued_prefill_chars)


class EngineClosed(Exception):
    """The engine stopped (server shutdown, or a failure): no new requests."""


@dataclass(frozen=True)
class Request:
    """A checked request: what the engine thread needs, nothing to validate any more."""

    prompt_ids: np.ndarray  # (T,) int32, T >= 1
    params: SamplingParams
    seed: int | None  # row i uses seed + i; None when greedy (no randomness)
    stream: bool

    @property
    def n(self) -> int:
        return self.params.n

    @property
    def prefill_chars(self) -> int:
        """Prompt characters consumed before the request's rows join the batch."""
        return len(self.prompt_ids) - 1


class Delta(NamedTuple):
    """New characters of row ``index`` (streams only)."""

    index: int
    text: str


class Finish(NamedTuple):
    """Row ``index`` ended: reason "length" or "stop"; ``chars`` generated (stop string removed);
    ``text`` the row's whole text for a request that does not stream (None when it streams)."""

    index: int
    reason: str
    chars: int
    text: str | None


class End(NamedTuple):
    """The request is over: every row finished (``error`` None), or the engine could not go on."""

    error: str | None


Event = Delta | Finish | End


class Ticket:
    """The event-loop side of a submitted request: ``await ticket.next()`` yields its events, last
    an ``End``. Created by ``Engine.submit`` on the loop that will read it; the engine thread only
    touches it through ``loop.call_soon_threadsafe``. The queue holds at most the request's own
    characters (n x max_chars), so it needs no bound of its own."""

    _ids = itertools.count(1)

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self.id = next(Ticket._ids)
        self.request = request
        self.loop = loop
        self.finished = False  # the engine delivered its End: nothing left to cancel
        self._interrupted = False
        self.started = time.monotonic()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        # Engine-thread bookkeeping.
        self._rows_left = request.n
        self._cancelled = False

    async def next(self) -> Event:
        event = await self._queue.get()
        if isinstance(event, End) and not self._interrupted:
            self.finished = True
        return event

    def interrupt(self, message: str) -> None:
        """End the request's events now with ``message`` (call on the ticket's loop; the engine
        goes on until ``Engine.cancel``, as ``finished`` stays False)."""
        self._interrupted = True
        self._queue.put_nowait(End(message))

    def _put(self, event: Event) -> None:
        self._queue.put_nowait(event)


# ---------------------------------------------------------------------------------------------
# The engine


Outbox = dict[asyncio.AbstractEventLoop, list[tuple[Ticket, Event]]]  # events per event loop


class Engine:
    """Continuous batching over one ``Generator``: ``start()``, then ``prepare`` + ``submit`` from
    an event loop, ``cancel`` when the client goes away, ``close()`` at shutdown."""

    def __init__(self, generator: Generator, settings: ServeSettings | None = None) -> None:
        self.generator = generator
        self.settings = settings = settings or ServeSettings()
        self.limits = settings.limits()
        self.chars = generator.model.vocabulary.chars
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # Shared with the event loop(s), under _lock.
        self._incoming: list[Ticket] = []
        self._cancels: list[Ticket] = []
        self._rows_in_flight = 0  # rows of admitted requests not finished yet
        self._requests_in_flight = 0
        self._queued_chars = 0  # prompt characters admitted and not consumed yet
        self._closed = False
        self._draining = False  # no new requests; the admitted ones run on
        self._close_reason = "the server is shutting down"
        self._error: str | None = None
        self._counts = dict(requests=0, rejected=0, cancelled=0, completed=0, failed=0, steps=0, chars=0,
                            row_steps=0)
        # Engine thread only.
        self._prompts = Prompts(generator.model, PREFILL_CHUNK)
        self._batch = Batch(generator.model)
        self._interval = settings.stream_interval_ms / 1000
        self._next_flush = 0.0
        self._thread = threading.Thread(target=self._run, name="textgen-engine", daemon=True)
        self._started_at = time.monotonic()

    # -- the event-loop side --------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    @property
    def ready(self) -> bool:
        return self.alive and not self._closed and not self._draining

    def stop_accepting(self) -> None:
        """Draining: ``submit`` refuses new requests (``EngineClosed``), admitted ones run on."""
        with self._lock:
            self._draining = True

    def params(self, **values: Any) -> SamplingParams:
        """``SamplingParams`` checked against this server's caps (``ParamError`` names the field)."""
        return SamplingParams(**values, limits=self.limits)

    def prepare(self, prompt: str, params: SamplingParams, stream: bool = False) -> Request:
        """The request for ``prompt`` (checked and encoded here, ``ParamError`` naming the field)
        with checked ``params``. Without a seed (and not greedy) one is chosen, so that every
        response can say how to repeat it."""
        ids = self.generator.encode(prompt, params, self.limits)
        seed = None if params.greedy else secrets.randbelow(2**31) if params.seed is None else params.seed
        return Request(ids, params, seed, bool(stream))

    def submit(self, request: Request) -> Ticket:
        """Admit ``request`` (call on the event loop that will read the ticket). Raises
        ``EngineBusy`` if its rows do not fit under ``max_rows`` now, or its prompt under
        ``max_queued_prefill_chars`` (a prompt alone is always admitted), ``EngineClosed`` after
        ``close()`` or a failure."""
        ticket = Ticket(request, asyncio.get_running_loop())
        with self._lock:
            if self._closed or self._draining or self._error is not None:
                raise EngineClosed(self._error or "the server is shutting down")
            busy = self._busy(request)
            if busy:
                self._counts["rejected"] += 1
                raise EngineBusy(busy[0], self.settings.retry_after_s, busy[1])
            self._rows_in_flight += request.n
            self._queued_chars += request.prefill_chars
            self._requests_in_flight += 1
            self._counts["requests"] += 1
            self._incoming.append(ticket)
            self._wake.notify()
        return ticket

    def _busy(self, request: Request) -> tuple[str, str] | None:
        """Why ``request`` cannot be admitted now and the limit's name (under ``_lock``), or None."""
        s, queued = self.settings, self._queued_chars
        if self._rows_in_flight + request.n > s.max_rows:
            return (f"{self._rows_in_flight} of its {s.max_rows} rows are in flight and this request needs "
                    f"{request.n}", "rows")
        if queued and queued + request.prefill_chars > s.max_queued_prefill_chars:
            return (f"{queued:,} prompt characters are waiting to be consumed and this request adds "
                    f"{request.prefill_chars:,} (the limit is max_queued_prefill_chars, "
                    f"{s.max_queued_prefill_chars:,})", "prefill_chars")
        return None

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request (its client went away): its rows leave the batch at the next step."""
        with self._lock:
            if ticket.finished or ticket._cancelled or ticket._rows_left == 0:
                return
            ticket._cancelled = True
            self._cancels.append(ticket)
            self._wake.notify()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c, rows, requests = dict(self._counts), self._rows_in_flight, self._requests_in_flight
            queued = self._queued_chars
        return {"ready": self.ready, "rows_in_flight": rows, "rows_decoding": self._batch.size,
                "requests_in_flight": requests, "max_rows": self.settings.max_rows, "prefill_chars_queued": queued,
                "requests_total": c["requests"],
                **{f"requests_{k}": c[k] for k in ("completed", "cancelled", "rejected", "failed")},
                "steps": c["steps"], "row_steps": c["row_steps"], "chars_generated": c["chars"],
                "uptime_s": round(time.monotonic() - self._started_at, 3), "error": self._error}

    def close(self, timeout: float = 10.0, reason: str | None = None) -> None:
        """Stop the thread; requests still running end with an ``End`` carrying an error (``reason``,
        default: the server is shutting down)."""
        with self._lock:
            if reason and not self._closed:
                self._close_reason = reason
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait():
                if self._prompts.waiting:
                    self._prompts.consume(self._batch, PREFILL_BUDGET)
                    self._recount()
                if self._batch.size:
                    self._step()
            self._fail_all(self._close_reason)
        except BaseException as e:  # a bug: say so to every client, refuse new requests
            log.exception("generation engine failed")
            with self._lock:
                self._error = f"the generation engine failed: {type(e).__name__}: {e}"
            self._fail_all(self._error)

    def _wait(self) -> bool:
        """Wait for work; take the newcomers and the cancels. False: the engine is closing."""
        with self._lock:
            while not (self._incoming or self._cancels or self._closed or self._prompts.waiting or self._batch.size):
                self._wake.wait()
            if self._closed:
                return False
            incoming, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, []
        for t in incoming:
            r = t.request
            rows = [Row(r.params, self.chars, None if r.seed is None else r.seed + i, t, i) for i in range(r.n)]
            self._prompts.add(rows, r.prompt_ids)
        if cancels:
            self._drop(cancels)
            self._recount()
        return True

    def _recount(self) -> None:
        """The prompt characters still to consume: of the waiting prompts and the newcomers."""
        waiting = sum(p.left for p in self._prompts.waiting)
        with self._lock:
            self._queued_chars = waiting + sum(t.request.prefill_chars for t in self._incoming)

    def _step(self) -> None:
        b = self._batch
        done, made = b.step(b.steps(self.settings.chunk_size))
        with self._lock:
            self._counts["steps"] += 1
            self._counts["row_steps"] += b.size
            self._counts["chars"] += made
        out: Outbox = {}
        self._flush(done, out)
        finished = np.flatnonzero(done)
        if len(finished):
            self._finish(finished.tolist(), out)
            b.keep(np.flatnonzero(~done))
        self._deliver(out)

    def _flush(self, done: np.ndarray, out: Outbox) -> None:
        """Deltas of the streaming rows: all of them every ``stream_interval_ms``, else those that
        just made their first characters and those that finished."""
        b = self._batch
        now = time.monotonic()
        if now >= self._next_flush:
            self._next_flush = now + self._interval
            rows: Any = range(b.size)
        else:
            rows = itertools.chain(range(b.size - b.joined, b.size), np.flatnonzero(done).tolist())
        b.joined = 0
        for j in rows:
            row = b.rows[j]
            if row.tag.request.stream and (text := row.release(bool(done[j]))):
                out.setdefault(row.tag.loop, []).append((row.tag, Delta(row.index, text)))

    def _finish(self, finished: list[int], out: Outbox) -> None:
        ended = 0
        for j in finished:
            row = self._batch.rows[j]
            ticket, text = row.tag, None if row.tag.request.stream else row.text()
            finish = Finish(row.index, "stop" if row.cut else "length", row.length, text)
            out.setdefault(ticket.loop, []).append((ticket, finish))
            ticket._rows_left -= 1
            if ticket._rows_left == 0:
                out[ticket.loop].append((ticket, End(None)))
                ended += 1
        with self._lock:
            self._rows_in_flight -= len(finished)
            self._requests_in_flight -= ended
            self._counts["completed"] += ended

    def _drop(self, tickets: list[Ticket]) -> None:
        """Cancelled requests leave the prompt queue and the batch."""
        gone = {t.id for t in tickets}
        self._prompts.waiting = [p for p in self._prompts.waiting if p.rows[0].tag.id not in gone]
        b = self._batch
        keep = [i for i, row in enumerate(b.rows) if row.tag.id not in gone]
        if len(keep) < b.size:
            b.keep(keep)
        with self._lock:
            for t in tickets:
                if t._rows_left == 0:  # it finished before the cancel arrived
                    continue
                self._rows_in_flight -= t._rows_left
                t._rows_left = 0
                self._requests_in_flight -= 1
                self._counts["cancelled"] += 1

    def _fail_all(self, message: str) -> None:
        """End every request still admitted (shutdown or failure) with ``message``."""
        tickets = {p.rows[0].tag.id: p.rows[0].tag for p in self._prompts.waiting}
        tickets.update({row.tag.id: row.tag for row in self._batch.rows})
        with self._lock:
            self._closed = True
            tickets.update({t.id: t for t in self._incoming})
            self._incoming = []
            failed = [t for t in tickets.values() if not t._cancelled and t._rows_left]
            self._counts["failed"] += len(failed)
            self._rows_in_flight = 0
            self._requests_in_flight = 0
            self._queued_chars = 0
        self._prompts.waiting = []
        self._batch = Batch(self.generator.model)
        out: Outbox = {}
        for t in failed:
            t._rows_left = 0
            out.setdefault(t.loop, []).append((t, End(message)))
        self._deliver(out)

    @staticmethod
    def _deliver(out: Outbox) -> None:
        for loop, events in out.items():
            try:
                loop.call_soon_threadsafe(_dispatch, events)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _dispatch(events: list[tuple[Ticket, Event]]) -> None:
    for ticket, event in events:
        ticket._put(event)

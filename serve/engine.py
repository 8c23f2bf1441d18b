"""The batching engine behind the HTTP service: ONE thread runs the model for every request.

A model call has a fixed cost whatever its batch, so one request per call does not scale on a few
cores; as LLM servers do, the requests of a server share a running batch (continuous batching,
``serve.decode.Batch``):

1. ``Engine.prepare`` takes a request's checked ``SamplingParams`` (made against ``Engine.limits``,
   this server's caps) and its prompt (checked and encoded once) -> ``Request``.
2. ``Engine.submit`` admits it, or raises ``EngineBusy`` at once when its rows (``n``) would take
   the rows in flight past ``max_rows``: nothing waits in an unbounded queue.
3. The engine thread consumes the newcomers' prompts but their last character (K = 0 calls):
   prompts that fit one chunk together (``OnnxModel.prefill``: equal lengths share a call, equal
   prompts run once), longer ones ``PREFILL_CHUNK`` characters per iteration between chunk calls,
   so a long prompt delays the running streams a little instead of stalling them. Then the
   request's ``n`` rows join the batch, their pending character the prompt's last one. A lone
   newcomer on an idle engine skips that: its first chunk call takes the whole prompt.
4. Every iteration is one chunk call for all rows (``Batch.step``): ``chunk_size`` characters per
   row, sampled in the graph with every row's own settings and noise; per row: ``max_chars`` and
   stop strings.
5. Characters go to the request's event loop with ``loop.call_soon_threadsafe``, in chunks: a
   row's first characters at once, then what accumulated every ``stream_interval_ms`` (one wake-up
   of the loop per flush for all requests), held back while they may begin a stop string
   (``Row.release``, as ``Generator.stream``).
6. Rows that finish (length, stop) or whose request is cancelled (``Engine.cancel``: the client
   went away) leave the batch at once; their rows stop counting against ``max_rows``.

Determinism: row i of a request with seed s makes exactly ``Generator.generate(prompt, seed=s + i)``
with the same parameters, whatever else shares the batch and whatever the chunk sizes
(``serve.decode``; tests/test_http.py checks it).

Nothing here imports FastAPI: ``ServeSettings`` (the service's settings, with their environment
variables) lives here so that ``textgen serve`` can build its flags without the web stack.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve.decode import Batch, Row
from serve.generator import Generator
from serve.params import Limits, SamplingParams
from textgen.errors import TextgenError

log = logging.getLogger("textgen.engine")

PREFILL_CHUNK = 128  # prompt characters per call for long prompts (a few ms of model time each)
PREFILL_BUDGET = 128  # prompt characters consumed per engine iteration (between two chunk calls)


# ---------------------------------------------------------------------------------------------
# Settings


class SettingsError(TextgenError):
    pass


class ServeSettings(BaseSettings):
    """Limits and tuning of one serving process, declared once: each field is a flag of ``textgen
    serve`` (``--max-rows``), an environment variable (``TEXTGEN_MAX_ROWS``, which the flag wins
    over) and an argument of the Ray Serve app. Bad values raise ``SettingsError``."""

    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", env_ignore_empty=True, frozen=True, extra="forbid")

    # About a few seconds of one stream in a busy batch (bench/RESULTS.md).
    max_chars_cap: int = Field(10_000, ge=1, description="most characters a request may ask for per sample")
    # Consuming a prompt costs model time per character: the cap bounds what one request can take.
    max_prompt_chars: int = Field(10_000, ge=1, description="longest prompt accepted, in characters")
    max_n: int = Field(16, ge=1, description="most samples per request (n); each is a row of the batch")
    # A request that would pass it is refused at once: no unbounded queue, and a step of the whole
    # batch stays short (bench/RESULTS.md).
    max_rows: int = Field(64, ge=1, description="in-flight limit: rows (the sum of n) being served; more gets "
                                                "429 + Retry-After")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body in bytes; larger gets 413")
    # 1 leaves the other core to the event loop.
    threads: int = Field(1, ge=0, description="onnxruntime intra-op threads of the engine (0 = one per core)")
    # An event costs the server and its client several characters' worth of CPU: shorter intervals
    # spend more on events than on making characters (bench/http_load.py, bench/RESULTS.md).
    stream_interval_ms: float = Field(50.0, ge=0, allow_inf_nan=False,
                                      description="streamed characters are sent in chunks at most this old, in "
                                                  "ms (a row's first ones at once)")
    # About the time a typical request takes.
    retry_after_s: int = Field(1, ge=0, description="the Retry-After (seconds) of a request refused as busy")
    # Larger: fewer calls; smaller: a newcomer waits less for its first characters (about two calls).
    chunk_size: int = Field(16, ge=1, description="characters per row per model call (lower: sooner first "
                                                  "characters; higher: more throughput)")

    def __init__(self, **values: Any) -> None:
        from_mapping = _FROM_MAPPING.get()
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise _settings_error(e, set(values) - (from_mapping or set())) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):  # type: ignore[override]
        # Arguments, then os.environ; only the arguments while from_env reads another mapping.
        return (init_settings,) if _FROM_MAPPING.get() is not None else (init_settings, env_settings)

    @property
    def n_cap(self) -> int:
        """The most samples a request may ask for: max_n, and no more than max_rows."""
        return min(self.max_n, self.max_rows)

    def limits(self) -> Limits:
        """The caps every request is checked against."""
        return Limits.server(self.max_chars_cap, self.max_prompt_chars, self.n_cap)

    @classmethod
    def env_name(cls, name: str) -> str:
        return f"{cls.model_config['env_prefix']}{name.upper()}"

    @staticmethod
    def flag(name: str) -> str:
        return f"--{name.replace('_', '-')}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Defaults, then ``TEXTGEN_*`` variables (of ``os.environ``, or of ``environ``), then
        ``overrides`` (None values are ignored)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if environ is None:
            return cls(**given)
        env = {name: raw for name in cls.model_fields if (raw := environ.get(cls.env_name(name), "").strip())}
        token = _FROM_MAPPING.set(set(env) - set(given))
        try:
            return cls(**{**env, **given})
        finally:
            _FROM_MAPPING.reset(token)


# While ``from_env`` reads a mapping instead of os.environ: the settings that came from it.
_FROM_MAPPING: ContextVar[set[str] | None] = ContextVar("textgen_settings_from_mapping", default=None)


def _settings_error(e: ValidationError, given: set[str]) -> SettingsError:
    """Pydantic's errors -> one message naming the flag and the variable of every bad setting."""
    problems = []
    for err in e.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        field = ServeSettings.model_fields.get(name)
        if field is None:
            problems.append(f"unknown setting {name!r} (known: {', '.join(ServeSettings.model_fields)})")
            continue
        kind = "a number" if field.annotation is float else "an integer"
        env, value = ServeSettings.env_name(name), err.get("input")
        if name not in given and isinstance(value, str) and err["type"].endswith("_parsing"):
            problems.append(f"{env}={value!r} is not {kind}")
            continue
        floor = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
        problems.append(f"setting {name} ({ServeSettings.flag(name)}, {env}) must be {kind}"
                        f"{'' if floor is None else f' >= {floor}'}, got {value!r}")
    return SettingsError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Requests and their events


class EngineBusy(Exception):
    """The in-flight limit is reached: retry after ``retry_after_s`` seconds."""

    def __init__(self, rows: int, in_flight: int, max_rows: int, retry_after_s: int) -> None:
        super().__init__(
            f"the server is busy: {in_flight} of its {max_rows} rows are in flight and this request needs "
            f"{rows}; retry after {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


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
    def prompt_chars(self) -> int:
        return len(self.prompt_ids)


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


class _Prefill:
    """A request whose prompt but its last character is being consumed (long prompts take several
    iterations)."""

    __slots__ = ("ticket", "ids", "done", "state")

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.ids = ticket.request.prompt_ids[:-1]  # the last one is the pending character
        self.done = 0  # characters of `ids` consumed
        self.state: list[np.ndarray] | None = None  # (1, H) per state input after `done` characters


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
        self._closed = False
        self._error: str | None = None
        self._counts = dict(requests=0, rejected=0, cancelled=0, completed=0, failed=0, steps=0, chars=0)
        # Engine thread only.
        self._prefilling: list[_Prefill] = []
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
        return self.alive and not self._closed

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
        ``EngineBusy`` if its rows do not fit under ``max_rows`` now, ``EngineClosed`` after
        ``close()`` or a failure."""
        ticket = Ticket(request, asyncio.get_running_loop())
        with self._lock:
            if self._closed or self._error is not None:
                raise EngineClosed(self._error or "the server is shutting down")
            if self._rows_in_flight + request.n > self.settings.max_rows:
                self._counts["rejected"] += 1
                raise EngineBusy(request.n, self._rows_in_flight, self.settings.max_rows,
                                 self.settings.retry_after_s)
            self._rows_in_flight += request.n
            self._requests_in_flight += 1
            self._counts["requests"] += 1
            self._incoming.append(ticket)
            self._wake.notify()
        return ticket

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
            counts = dict(self._counts)
            in_flight = self._rows_in_flight
            requests = self._requests_in_flight
        return {
            "ready": self.ready,
            "rows_in_flight": in_flight,
            "rows_decoding": self._batch.size,
            "requests_in_flight": requests,
            "max_rows": self.settings.max_rows,
            "requests_total": counts["requests"],
            "requests_completed": counts["completed"],
            "requests_cancelled": counts["cancelled"],
            "requests_rejected": counts["rejected"],
            "requests_failed": counts["failed"],
            "steps": counts["steps"],
            "chars_generated": counts["chars"],
            "uptime_s": round(time.monotonic() - self._started_at, 3),
            "error": self._error,
        }

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still running end with an ``End`` carrying an error."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait():
                if self._prefilling:
                    self._prefill()
                if self._batch.size:
                    self._step()
            self._fail_all("the server is shutting down")
        except BaseException as e:  # a bug: say so to every client, refuse new requests
            log.exception("generation engine failed")
            with self._lock:
                self._error = f"the generation engine failed: {type(e).__name__}: {e}"
            self._fail_all(self._error)

    def _wait(self) -> bool:
        """Wait for work; take the newcomers and the cancels. False: the engine is closing."""
        with self._lock:
            while not (self._incoming or self._cancels or self._closed or self._prefilling or self._batch.size):
                self._wake.wait()
            if self._closed:
                return False
            incoming, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, []
        self._prefilling += [_Prefill(t) for t in incoming]
        if cancels:
            self._drop(cancels)
        return True

    def _join(self, ticket: Ticket, state: list[np.ndarray], pending: np.ndarray) -> None:
        """The request's n rows join the batch: its state (1, H) per input and pending (1, T)."""
        r = ticket.request
        rows = [Row(r.params, self.chars, None if r.seed is None else r.seed + i, ticket, i) for i in range(r.n)]
        self._batch.join(rows, [np.repeat(s, r.n, axis=0) for s in state], np.repeat(pending, r.n, axis=0))

    def _prefill(self) -> None:
        model = self.generator.model
        if not self._batch.size and len(self._prefilling) == 1 and len(self._prefilling[0].ids) < PREFILL_CHUNK:
            # A lone newcomer on an idle engine: its first chunk call consumes the whole prompt.
            p = self._prefilling.pop()
            self._join(p.ticket, model.zero_state(1), p.ticket.request.prompt_ids[None])
            return
        budget = PREFILL_BUDGET
        whole: list[_Prefill] = []  # prompts that fit one chunk: consumed together below
        for p in self._prefilling:
            if budget <= 0:
                break
            left = len(p.ids) - p.done
            if p.state is None and left <= PREFILL_CHUNK:
                whole.append(p)
                budget -= left
                continue
            chunk = p.ids[p.done : p.done + min(left, PREFILL_CHUNK)]
            _, p.state = model.run(chunk[None], p.state)
            p.done += len(chunk)
            budget -= len(chunk)
        if whole:
            state = model.prefill([p.ids for p in whole])  # (w, H); an empty prompt: zeros
            for i, p in enumerate(whole):
                p.done, p.state = len(p.ids), [s[i : i + 1] for s in state]
        for p in self._prefilling:
            if p.done == len(p.ids) and p.state is not None:
                self._join(p.ticket, p.state, p.ticket.request.prompt_ids[None, -1:])
        self._prefilling = [p for p in self._prefilling if not (p.done == len(p.ids) and p.state is not None)]

    def _step(self) -> None:
        b = self._batch
        done, made = b.step(b.steps(self.settings.chunk_size))
        with self._lock:
            self._counts["steps"] += 1
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
            ticket = row.tag
            if ticket.request.stream:
                text = row.release(bool(done[j]))
                if text:
                    out.setdefault(ticket.loop, []).append((ticket, Delta(row.index, text)))

    def _finish(self, finished: list[int], out: Outbox) -> None:
        ended = 0
        for j in finished:
            row = self._batch.rows[j]
            ticket = row.tag
            text = None if ticket.request.stream else row.text()
            out.setdefault(ticket.loop, []).append(
                (ticket, Finish(row.index, "stop" if row.cut else "length", row.length, text)))
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
        self._prefilling = [p for p in self._prefilling if p.ticket.id not in gone]
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
        tickets = {p.ticket.id: p.ticket for p in self._prefilling}
        tickets.update({row.tag.id: row.tag for row in self._batch.rows})
        with self._lock:
            self._closed = True
            tickets.update({t.id: t for t in self._incoming})
            self._incoming = []
            failed = [t for t in tickets.values() if not t._cancelled and t._rows_left]
            self._counts["failed"] += len(failed)
            self._rows_in_flight = 0
            self._requests_in_flight = 0
        self._prefilling = []
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

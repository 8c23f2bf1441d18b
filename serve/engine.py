"""The batching engine behind the HTTP service: ONE thread runs the model for every request.

One request per model call does not scale on 2 cores (a call costs ~0.2 ms beyond its characters,
whatever its batch); so, as LLM servers do, the requests of a server share a running batch
(continuous batching):

1. ``Engine.prepare`` checks a request (the rules and messages of ``Generator``) -> ``Request``.
2. ``Engine.submit`` admits it, or raises ``EngineBusy`` at once when its rows (``n``) would take
   the rows in flight past ``max_rows``: nothing waits in an unbounded queue.
3. The engine thread consumes the newcomers' prompts but their last character (K = 0 calls):
   prompts that fit one chunk together (``OnnxModel.prefill``: equal lengths share a call, equal
   prompts run once), longer ones ``PREFILL_CHUNK`` characters per iteration between chunk calls,
   so a long prompt delays the running streams by a few milliseconds instead of stalling them.
   Then the request's ``n`` rows join the batch, their pending character the prompt's last one. A
   lone newcomer on an idle engine skips that: its first chunk call takes the whole prompt.
4. Every iteration is one chunk call for all rows (``OnnxModel.chunk``): ``chunk_size`` characters
   per row (16: ~3 ms for 8 rows, ~15 ms for 64, so a newcomer's first characters wait little),
   sampled in the graph with every row's own temperature, top-k, top-p and Gumbel noise from its
   own ``numpy.random.Generator``; per row: ``max_chars`` and stop strings.
5. Characters go to the request's event loop with ``loop.call_soon_threadsafe``, in chunks: a
   row's first characters at once, then what accumulated every ``stream_interval_ms`` (one wake-up
   of the loop per flush for all requests). A character that may begin a stop string is held
   back until it is clear that it does not (as ``Generator.stream``).
6. Rows that finish (length, stop) or whose request is cancelled (``Engine.cancel``: the client
   went away) leave the batch at once; their rows stop counting against ``max_rows``.

Determinism: row i of a request with seed s makes exactly ``Generator.generate(prompt, seed=s + i)``
with the same parameters, whatever else shares the batch and whatever the chunk sizes (the graph
computes every row as if alone, and each row draws its noise from its own generator in order; see
``serve.generator``; tests/test_http.py checks it).

Nothing here imports FastAPI: ``ServeSettings`` (the service's settings, with their environment
variables) lives here so that ``textgen``'s parser can show the defaults without the web stack.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np

from serve.generator import Generator
from serve.params import DEFAULT_MAX_CHARS, DEFAULT_TEMPERATURE
from serve.sampling import RowNoise, Sampler
from textgen.errors import TextgenError as GeneratorError
from textgen.text import StopStrings, UnknownCharactersError

log = logging.getLogger("textgen.engine")

PREFILL_CHUNK = 128  # prompt characters per call for long prompts: ~8 ms of a 2x256 model on one core
PREFILL_BUDGET = 128  # prompt characters consumed per engine iteration (between two chunk calls)
MAX_STOPS = 8  # stop strings per request
MAX_STOP_CHARS = 64  # characters per stop string


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class ServeSettings:
    """Limits and tuning of one serving process. Each field has an environment variable
    ``TEXTGEN_<FIELD>`` (e.g. ``TEXTGEN_MAX_ROWS``) read by ``textgen serve``, and a flag
    ``--<field>`` (``--max-rows``) that wins over it."""

    # Characters per request (per sample): about 5 s of one stream in a busy batch.
    max_chars_cap: int = 10_000
    # Prompt characters: consuming a prompt costs ~70 µs per character (0.7 s at the cap).
    max_prompt_chars: int = 10_000
    # Samples per request (n); each is one row of the batch (so n is also at most max_rows).
    max_n: int = 16
    # The in-flight limit: rows (the sum of n) of the requests being served. A request that would
    # pass it is refused at once (429 + Retry-After). 64 rows keep one step under ~3 ms here.
    max_rows: int = 64
    # Request body bytes; a larger body gets 413 before it is read.
    max_body_bytes: int = 1 << 20
    # onnxruntime intra-op threads of the engine: 1 leaves the other core to the event loop.
    threads: int = 1
    # Streamed characters are sent in chunks at most this old (a row's first one at once). An
    # event costs the server and its client ~100-300 µs of CPU, several characters' worth: at
    # 20 ms, 32 streams spent more CPU on events than on making characters (bench/http_load.py).
    stream_interval_ms: float = 50.0
    # Retry-After (seconds) of a refused request: about the time a 500-character request takes.
    retry_after_s: int = 1
    # Characters per row per model call. Larger: fewer calls (~0.2 ms each beyond the characters);
    # smaller: a newcomer waits less for its first characters (about two calls). At 16 a call of
    # 64 rows takes ~15 ms on one core, and 32 would add only a few percent of throughput.
    chunk_size: int = 16

    def __post_init__(self) -> None:
        minimum = {"max_chars_cap": 1, "max_prompt_chars": 1, "max_n": 1, "max_rows": 1,
                   "max_body_bytes": 1024, "threads": 0, "stream_interval_ms": 0, "retry_after_s": 0,
                   "chunk_size": 1}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = float if f.type == "float" else int
            ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
            if not ok or value < minimum[f.name]:
                raise GeneratorError(
                    f"setting {f.name} (--{f.name.replace('_', '-')}, {self.env_name(f.name)}) must be "
                    f"{'a number' if kind is float else 'an integer'} >= {minimum[f.name]}, got {value!r}"
                )

    @property
    def n_cap(self) -> int:
        """The most samples a request may ask for: max_n, and no more than max_rows."""
        return min(self.max_n, self.max_rows)

    @staticmethod
    def env_name(name: str) -> str:
        return f"TEXTGEN_{name.upper()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Defaults, then ``TEXTGEN_*`` variables, then ``overrides`` (None values are ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is not None and raw.strip():
                values[f.name] = parse_setting(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def parse_setting(name: str, raw: str) -> int | float:
    kind = float if ServeSettings.__dataclass_fields__[name].type == "float" else int
    try:
        return kind(raw.strip().replace("_", ""))
    except ValueError:
        raise GeneratorError(
            f"{ServeSettings.env_name(name)}={raw!r} is not {'a number' if kind is float else 'an integer'}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Requests and their events


class FieldError(GeneratorError):
    """A request argument the generator refuses; ``field`` names it (for a 4xx that says which)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


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
    n: int
    max_chars: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None  # row i uses seed + i; None when greedy (no randomness)
    stops: StopStrings
    stream: bool

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
# Engine-thread state


class _Row:
    """One sample being decoded: its generated ids so far and what was sent."""

    __slots__ = ("ticket", "index", "ids", "sent", "cut", "stops")

    def __init__(self, ticket: Ticket, index: int) -> None:
        self.ticket, self.index = ticket, index
        self.ids: list[int] = []
        self.sent = 0  # characters delivered (streams)
        self.cut = 0  # length of the stop string that ended the row
        self.stops = ticket.request.stops


class _Prefill:
    """A request whose prompt but its last character is being consumed (long prompts take several
    iterations)."""

    __slots__ = ("ticket", "ids", "done", "state")

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.ids = ticket.request.prompt_ids[:-1]  # the last one is the pending character
        self.done = 0  # characters of `ids` consumed
        self.state: list[np.ndarray] | None = None  # (1, H) per state input after `done` characters


class _Batch:
    """The rows being decoded and, aligned with them (index = row of the model batch), their
    state, pending characters and per-row parameters."""

    def __init__(self, generator: Generator) -> None:
        self.model = generator.model
        self.vocab_size = self.model.info.vocab_size
        self.rows: list[_Row] = []
        self.state = self.model.zero_state(0)  # (k, H) per state input, before `pending`
        self.pending = np.zeros((0, 1), np.int32)  # (k, T) the next call's char_ids
        self.pos = np.zeros(0, np.int64)  # (k,) characters made
        self.limit = np.zeros(0, np.int64)  # (k,) max_chars
        self.settings = self.model.settings(0)  # (k,) temperature, top_k, top_p
        self.noise = RowNoise([], self.vocab_size)
        self.ends_stop = np.zeros((0, self.vocab_size), bool)  # (k, V) ids that end a stop string
        self.joined = 0  # rows that joined since the last call (they flush their first characters)

    @property
    def size(self) -> int:
        return len(self.rows)

    def join(self, arrivals: list[tuple[Ticket, list[np.ndarray], np.ndarray]], chars: tuple[str, ...]) -> None:
        """Add the rows of requests whose prompts are consumed: (ticket, state (1, H) per state
        input, pending characters (1, T)) each; T > 1 only for a lone request on an empty batch."""
        if not arrivals:
            return
        reps = np.array([t.request.n for t, _, _ in arrivals])  # rows per request
        n = int(reps.sum())
        requests = [t.request for t, _, _ in arrivals]
        new_state = [np.repeat(np.concatenate(parts), reps, axis=0)
                     for parts in zip(*(st for _, st, _ in arrivals))]
        self.state = [np.concatenate([a, b]) for a, b in zip(self.state, new_state)]
        pending = [np.repeat(p, r, axis=0) for (_, _, p), r in zip(arrivals, reps)]
        self.pending = np.concatenate([self.pending, *pending]) if self.size else np.concatenate(pending)
        self.rows += [_Row(t, i) for t, _, _ in arrivals for i in range(t.request.n)]
        self.pos = np.concatenate([self.pos, np.zeros(n, np.int64)])
        self.limit = np.concatenate([self.limit, np.repeat([r.max_chars for r in requests], reps)])
        joined = self.model.settings(n, np.repeat([r.temperature for r in requests], reps),
                                     np.repeat([r.top_k for r in requests], reps),
                                     np.repeat([r.top_p for r in requests], reps))
        self.settings = {k: np.concatenate([self.settings[k], joined[k]]) for k in self.settings}
        self.noise.extend([None if r.seed is None else np.random.default_rng(r.seed + i)
                           for r in requests for i in range(r.n)])
        ends = [np.array([c in r.stops.last_chars for c in chars]) if r.stops else np.zeros(len(chars), bool)
                for r in requests]
        self.ends_stop = np.concatenate([self.ends_stop, np.repeat(np.stack(ends), reps, axis=0)])
        self.joined += n

    def keep(self, keep: np.ndarray) -> None:
        """Continue with rows ``keep`` (indices, in order)."""
        self.rows = [self.rows[i] for i in keep]
        self.state = [s[keep] for s in self.state]
        self.pending = self.pending[keep]
        self.pos, self.limit = self.pos[keep], self.limit[keep]
        self.settings = {k: v[keep] for k, v in self.settings.items()}
        self.noise.keep(keep)
        self.ends_stop = self.ends_stop[keep]
        self.joined = min(self.joined, len(keep))


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Continuous batching over one ``Generator``: ``start()``, then ``prepare`` + ``submit`` from
    an event loop, ``cancel`` when the client goes away, ``close()`` at shutdown."""

    def __init__(self, generator: Generator, settings: ServeSettings = ServeSettings()) -> None:
        self.generator = generator
        self.settings = settings
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
        self._batch = _Batch(generator)
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

    def prepare(
        self,
        prompt: str = "",
        *,
        n: int = 1,
        max_chars: int = DEFAULT_MAX_CHARS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        unknown: str = "error",
        replacement: str = " ",
        stream: bool = False,
    ) -> Request:
        """Check a request: ``FieldError`` names the argument at fault. Without a seed (and not
        greedy) one is chosen, so that every response can say how to repeat it."""
        s = self.settings
        try:
            sampler = Sampler(temperature, top_k, top_p)
        except GeneratorError as e:
            raise FieldError(str(e).split(" ", 1)[0], str(e)) from None
        for name, value, cap, setting in (("n", n, s.n_cap, "max_n"),
                                          ("max_chars", max_chars, s.max_chars_cap, "max_chars_cap")):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= cap:
                raise FieldError(name, f"{name} must be an integer from 1 to {cap:,} (this server's "
                                       f"{setting}), got {value!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise FieldError("seed", f"seed must be an integer >= 0 or null, got {seed!r}")
        try:
            stops = StopStrings(stop)
        except GeneratorError as e:
            raise FieldError("stop", str(e)) from None
        if len(stops.stops) > MAX_STOPS or stops.longest > MAX_STOP_CHARS:
            raise FieldError("stop", f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters")
        if not isinstance(prompt, str):
            raise FieldError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
        if len(prompt) > s.max_prompt_chars:
            raise FieldError("prompt", f"the prompt has {len(prompt):,} characters, more than this server's "
                                       f"limit of {s.max_prompt_chars:,} (max_prompt_chars)")
        try:
            ids = self.generator.encode(prompt, unknown, replacement)
        except UnknownCharactersError as e:
            shown = ", ".join(repr(c) for c in e.unknown[:20]) + (" ..." if len(e.unknown) > 20 else "")
            raise FieldError(
                "prompt", f"unknown characters in prompt: {shown} (model vocabulary: {len(self.chars)} chars); "
                'remove them, or set "unknown" to "skip" or "replace"'
            ) from None
        except GeneratorError as e:
            raise FieldError("replacement" if "replacement" in str(e) else "unknown", str(e)) from None
        if sampler.greedy:
            seed = None
        elif seed is None:
            seed = secrets.randbelow(2**31)
        return Request(ids, n, max_chars, sampler.temperature, sampler.top_k, sampler.top_p, seed, stops,
                       bool(stream))

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
            while True:
                with self._lock:
                    while not (self._incoming or self._cancels or self._closed or self._prefilling
                               or self._batch.size):
                        self._wake.wait()
                    if self._closed:
                        break
                    incoming, self._incoming = self._incoming, []
                    cancels, self._cancels = self._cancels, []
                self._prefilling += [_Prefill(t) for t in incoming]
                if cancels:
                    self._drop(cancels)
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

    def _prefill(self) -> None:
        model = self.generator.model
        b = self._batch
        arrivals = []  # (ticket, state (1, H) per input, pending (1, T)) of prompts now consumed
        if not b.size and len(self._prefilling) == 1 and len(self._prefilling[0].ids) < PREFILL_CHUNK:
            # A lone newcomer on an idle engine: its first chunk call consumes the whole prompt.
            p = self._prefilling.pop()
            b.join([(p.ticket, model.zero_state(1), p.ticket.request.prompt_ids[None])], self.chars)
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
            if p.done == len(p.ids):
                arrivals.append((p.ticket, p.state, p.ticket.request.prompt_ids[None, -1:]))
        if whole:
            state = model.prefill([p.ids for p in whole])  # (w, H); an empty prompt: zeros
            for i, p in enumerate(whole):
                p.done = len(p.ids)
                arrivals.append((p.ticket, [s[i : i + 1] for s in state], p.ticket.request.prompt_ids[None, -1:]))
        b.join(arrivals, self.chars)
        joined = {t.id for t, _, _ in arrivals}
        self._prefilling = [p for p in self._prefilling if p.ticket.id not in joined]

    def _step(self) -> None:
        b = self._batch
        k = b.size
        steps = int(min(self.settings.chunk_size, (b.limit - b.pos).max()))
        ids, b.state = b.model.chunk(b.pending, b.state, b.noise.take(steps), b.settings)  # (k, K)
        done = np.zeros(k, bool)
        made = 0
        ends = b.ends_stop[np.arange(k)[:, None], ids].any(axis=1) if b.ends_stop.any() else np.zeros(k, bool)
        for j, (row, new) in enumerate(zip(b.rows, ids.tolist())):
            start = len(row.ids)
            row.ids += new[: b.limit[j] - b.pos[j]]
            if ends[j] and self._stopped(row, start):
                done[j] = True
            made += len(row.ids) - start
        b.pos += steps
        done |= b.pos >= b.limit
        b.pending = ids[:, -1:]
        with self._lock:
            self._counts["steps"] += 1
            self._counts["chars"] += made

        now = time.monotonic()
        out: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, Event]]] = {}
        if now >= self._next_flush:  # every streaming row
            self._next_flush = now + self._interval
            flush = range(k)
        else:  # rows that just made their first characters, and finished rows
            flush = itertools.chain(range(k - b.joined, k), np.flatnonzero(done).tolist())
        b.joined = 0
        for j in flush:
            row = b.rows[j]
            if row.ticket.request.stream:
                self._send_delta(row, bool(done[j]), out)
        finished = np.flatnonzero(done)
        if len(finished):
            ended = 0
            for j in finished.tolist():
                row = b.rows[j]
                ticket = row.ticket
                chars = len(row.ids) - row.cut
                text = None if ticket.request.stream else self._decode(row.ids[:chars])
                out.setdefault(ticket.loop, []).append(
                    (ticket, Finish(row.index, "stop" if row.cut else "length", chars, text)))
                ticket._rows_left -= 1
                if ticket._rows_left == 0:
                    out[ticket.loop].append((ticket, End(None)))
                    ended += 1
            with self._lock:
                self._rows_in_flight -= len(finished)
                self._requests_in_flight -= ended
                self._counts["completed"] += ended
            b.keep(np.flatnonzero(~done))
        self._deliver(out)

    def _stopped(self, row: _Row, start: int) -> bool:
        """Whether the row's text ends with one of its stop strings somewhere after ``start`` (the
        characters before did not): then the text is cut there and ``row.cut`` remembers it."""
        stops = row.stops
        tail_start = max(0, start - (stops.longest - 1))
        found = stops.find_first(self._decode(row.ids[tail_start:]))
        if found is None:
            return False
        del row.ids[tail_start + found[0] :]
        row.cut = found[1]
        return True

    def _send_delta(self, row: _Row, done: bool, out: dict) -> None:
        n = len(row.ids) - row.cut
        if not done and row.stops:
            # Hold back the longest tail that may still grow into a stop string.
            if row.stops.longest > 1:
                n -= row.stops.held_tail(self._decode(row.ids[-(row.stops.longest - 1) :]))
        if n > row.sent:
            delta = Delta(row.index, self._decode(row.ids[row.sent : n]))
            out.setdefault(row.ticket.loop, []).append((row.ticket, delta))
            row.sent = n

    def _decode(self, ids: list[int]) -> str:
        chars = self.chars
        return "".join([chars[i] for i in ids])

    def _drop(self, tickets: list[Ticket]) -> None:
        """Cancelled requests leave the prompt queue and the batch."""
        gone = {t.id for t in tickets}
        self._prefilling = [p for p in self._prefilling if p.ticket.id not in gone]
        b = self._batch
        if b.size:
            keep = np.array([i for i, row in enumerate(b.rows) if row.ticket.id not in gone], np.intp)
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
        tickets.update({row.ticket.id: row.ticket for row in self._batch.rows})
        with self._lock:
            self._closed = True
            tickets.update({t.id: t for t in self._incoming})
            self._incoming = []
            failed = [t for t in tickets.values() if not t._cancelled and t._rows_left]
            self._counts["failed"] += len(failed)
            self._rows_in_flight = 0
            self._requests_in_flight = 0
        self._prefilling = []
        self._batch = _Batch(self.generator)
        out: dict = {}
        for t in failed:
            t._rows_left = 0
            out.setdefault(t.loop, []).append((t, End(message)))
        self._deliver(out)

    @staticmethod
    def _deliver(out: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, Event]]]) -> None:
        for loop, events in out.items():
            try:
                loop.call_soon_threadsafe(_dispatch, events)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _dispatch(events: list[tuple[Ticket, Event]]) -> None:
    for ticket, event in events:
        ticket._put(event)

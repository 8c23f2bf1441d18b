"""The decode loop, once: rows decoded in lockstep, one model call (``OnnxModel.chunk``) per step.

``Batch`` keeps, aligned with its rows (index = row of the model batch), their state, pending
characters, characters made, ``max_chars``, sampling settings (the graph's (B,) inputs), noise
generators (``sampling.RowNoise``) and which ids end one of their stop strings. ``join`` adds rows
(their prompts consumed but the pending characters), ``step`` makes up to K characters per row and
says which rows are done (``max_chars`` reached, or a stop string made: the row's text is cut
there), ``keep`` continues with the rest. A ``Row`` keeps its ids and, for a stream, what it
released: ``Row.release`` is the hold-back rule (a tail that may still become a stop string waits).

Rows reach a batch through ``Prompts``: every prompt but its last character is consumed first
(K = 0 calls: ``OnnxModel.prefill`` for all that fit one call, ``chunk`` characters per call for a
longer one), then its rows join, the last character pending; a lone prompt on an empty batch
skips that, its whole prompt fed by the first chunk call. ``Generator`` drives prompts and batch
synchronously; the engine drives them with admission, a prefill budget per iteration,
cancellation and delivery on top. A row's text depends on its prompt, parameters and
seed only: the graph computes every row as if alone and each row draws its noise from its own
generator, in order, whatever the chunk sizes and whatever else shares the batch.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from serve.onnx_model import OnnxModel
from serve.params import SamplingParams
from serve.sampling import RowNoise, row_rng


class Row:
    """One sample: its generated ids (a stop string that ended it included, ``cut`` long) and how
    many of its characters were released (streams). ``tag`` and ``index`` are the driver's."""

    __slots__ = ("params", "chars", "seed", "tag", "index", "ids", "sent", "cut")

    def __init__(self, params: SamplingParams, chars: Sequence[str], seed: int | None = None, tag: Any = None,
                 index: int = 0) -> None:
        self.params, self.chars, self.seed, self.tag, self.index = params, chars, seed, tag, index
        self.ids: list[int] = []
        self.sent = 0
        self.cut = 0

    def _decode(self, ids: list[int]) -> str:
        chars = self.chars
        return "".join([chars[i] for i in ids])

    def add(self, new: list[int], may_stop: bool = True) -> bool:
        """Append ``new``; True if the text now ends with a stop string somewhere in it (it did not
        before): the ids end with that stop string then, ``cut`` is its length. ``may_stop``
        False: none of ``new`` ends a stop string (no need to look)."""
        start = len(self.ids)
        self.ids += new
        stops = self.params.stops
        if not (may_stop and stops):
            return False
        tail_start = max(0, start - (stops.longest - 1))
        found = stops.find_first(self._decode(self.ids[tail_start:]))
        if found is None:
            return False
        del self.ids[tail_start + found[0] :]
        self.cut = found[1]
        return True

    @property
    def length(self) -> int:
        """Characters of the text (the stop string removed)."""
        return len(self.ids) - self.cut

    def text(self) -> str:
        return self._decode(self.ids[: self.length])

    def release(self, done: bool) -> str:
        """The characters of a stream that can be sent now (each once): everything once the row is
        done, else all but the longest tail that may still grow into a stop string."""
        n = self.length
        stops = self.params.stops
        if not done and stops.longest > 1:
            n -= stops.held_tail(self._decode(self.ids[-(stops.longest - 1) :]))
        if n <= self.sent:
            return ""
        text = self._decode(self.ids[self.sent : n])
        self.sent = n
        return text


class Batch:
    """The rows being decoded and their aligned arrays (see the module docstring)."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self.chars = model.vocabulary.chars
        v = model.info.vocab_size
        self.rows: list[Row] = []
        self.state = model.zero_state(0)  # (k, H) per state input, before `pending`
        self.pending = np.zeros((0, 1), np.int32)  # (k, T) the next call's char_ids
        self.made = np.zeros(0, np.int64)  # (k,) characters made
        self.limit = np.zeros(0, np.int64)  # (k,) max_chars
        self.settings = model.settings(0)  # (k,) temperature, top_k, top_p
        self.noise = RowNoise([], v)
        self.ends_stop = np.zeros((0, v), bool)  # (k, V) ids that end one of the row's stop strings
        self.joined = 0  # rows that joined since the driver last reset it

    @property
    def size(self) -> int:
        return len(self.rows)

    def join(self, rows: Sequence[Row], state: Sequence[np.ndarray], pending: np.ndarray) -> None:
        """Add ``rows`` with their state (r, H) per state input and pending characters (r, T); T > 1
        (a whole prompt in the first call) only on an empty batch."""
        if not rows:
            return
        params = [r.params for r in rows]
        self.state = [np.concatenate([a, b]) for a, b in zip(self.state, state)]
        self.pending = np.concatenate([self.pending, pending]) if self.rows else np.asarray(pending, np.int32)
        self.rows += rows
        self.made = np.concatenate([self.made, np.zeros(len(rows), np.int64)])
        self.limit = np.concatenate([self.limit, [p.max_chars for p in params]])
        new = self.model.settings(len(rows), [p.temperature for p in params], [p.top_k for p in params],
                                  [p.top_p for p in params])
        self.settings = {k: np.concatenate([self.settings[k], new[k]]) for k in self.settings}
        self.noise.extend([row_rng(r.seed, r.params.greedy, self.model.info.noise, r.params.max_chars) for r in rows])
        ends: dict[frozenset, np.ndarray] = {}  # one mask per distinct set of last characters
        for p in params:
            last = p.stops.last_chars
            if last not in ends:
                ends[last] = np.array([c in last for c in self.chars])
        self.ends_stop = np.concatenate([self.ends_stop, np.stack([ends[p.stops.last_chars] for p in params])])
        self.joined += len(rows)

    def steps(self, chunk: int) -> int:
        """Characters the next call makes: ``chunk``, or fewer if no row needs that many."""
        return int(min(chunk, (self.limit - self.made).max()))

    def step(self, steps: int) -> tuple[np.ndarray, int]:
        """One model call of ``steps`` characters per row -> (done (k,) bool, characters added)."""
        k = self.size
        ids, self.state = self.model.chunk(self.pending, self.state, self.noise.take(steps), self.settings)
        if self.ends_stop.any():
            may_stop = self.ends_stop[np.arange(k)[:, None], ids].any(axis=1).tolist()
        else:
            may_stop = [False] * k
        done = np.zeros(k, bool)
        room = (self.limit - self.made).tolist()
        made = 0
        for j, (row, new) in enumerate(zip(self.rows, ids.tolist())):
            before = len(row.ids)
            done[j] = row.add(new[: room[j]], may_stop[j])
            made += len(row.ids) - before
        self.made += steps
        done |= self.made >= self.limit
        self.pending = ids[:, -1:]
        return done, made

    def keep(self, keep: np.ndarray | Sequence[int]) -> None:
        """Continue with rows ``keep`` (indices, in order)."""
        keep = np.asarray(keep, np.intp)
        self.rows = [self.rows[i] for i in keep]
        self.state = [s[keep] for s in self.state]
        self.pending = self.pending[keep]
        self.made, self.limit = self.made[keep], self.limit[keep]
        self.settings = {k: v[keep] for k, v in self.settings.items()}
        self.noise.keep(keep)
        self.ends_stop = self.ends_stop[keep]
        self.joined = min(self.joined, len(keep))


class _Prompt:
    """The rows of one prompt (its samples) and how much of the prompt is consumed."""

    __slots__ = ("rows", "ids", "done", "state")

    def __init__(self, rows: list[Row], ids: np.ndarray) -> None:
        self.rows, self.ids = rows, ids  # (T,) int32, T >= 1; ids[:-1] is consumed before joining
        self.done = 0  # characters of ids[:-1] consumed
        self.state: list[np.ndarray] | None = None  # (1, H) per state input after `done` characters

    @property
    def left(self) -> int:
        """Characters of ids[:-1] still to consume."""
        return len(self.ids) - 1 - self.done

    @property
    def consumed(self) -> bool:
        return self.state is not None and self.done == len(self.ids) - 1


class Prompts:
    """Prompts waiting to join a batch (see the module docstring)."""

    def __init__(self, model: OnnxModel, chunk: float = math.inf) -> None:
        self.model, self.chunk = model, chunk
        self.waiting: list[_Prompt] = []

    def add(self, rows: list[Row], ids: np.ndarray) -> None:
        """``rows`` (samples of one prompt) join once ``ids`` (T,) but its last character is consumed."""
        self.waiting.append(_Prompt(rows, ids))

    def consume(self, batch: Batch, budget: float = math.inf) -> None:
        """Consume up to about ``budget`` prompt characters, the prompts with the fewest left first
        (a short prompt does not wait behind long ones; the pieces a prompt is consumed in do not
        depend on the order); the rows of consumed prompts join ``batch``."""
        model = self.model
        if not batch.size and len(self.waiting) == 1 and len(self.waiting[0].ids) - 1 < self.chunk:
            _join(batch, [self.waiting.pop()], [model.zero_state(1)], whole=True)
            return
        self.waiting.sort(key=lambda p: p.left)  # stable: arrival order among equals
        whole: list[_Prompt] = []  # prompts that fit one call: consumed together below
        for p in self.waiting:
            if budget <= 0:
                break
            left = p.left
            if p.state is None and left <= self.chunk:
                whole.append(p)
                budget -= left
                continue
            piece = p.ids[p.done : p.done + int(min(left, self.chunk))]
            _, p.state = model.run(piece[None], p.state)
            p.done += len(piece)
            budget -= len(piece)
        if whole:
            state = model.prefill([p.ids[:-1] for p in whole])  # (w, H); an empty part: zeros
            for i, p in enumerate(whole):
                p.done, p.state = len(p.ids) - 1, [s[i : i + 1] for s in state]
        ready = [p for p in self.waiting if p.consumed]
        if ready:
            self.waiting = [p for p in self.waiting if not p.consumed]
            _join(batch, ready, [p.state for p in ready])


def _join(batch: Batch, prompts: list[_Prompt], states: list[list[np.ndarray]], whole: bool = False) -> None:
    """One ``Batch.join`` for the rows of ``prompts``, each prompt's state (1, H) per input repeated
    for its rows; pending: the last character, or (``whole``) the whole prompt."""
    reps = [len(p.rows) for p in prompts]
    state = [np.repeat(np.concatenate(parts), reps, axis=0) for parts in zip(*states)]
    pending = np.concatenate([p.ids[None] if whole else p.ids[None, -1:] for p in prompts])
    batch.join([r for p in prompts for r in p.rows], state, np.repeat(pending, reps, axis=0))

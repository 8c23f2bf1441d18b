"""The generation API: ``Generator.load(path)``, then ``generate``, ``stream`` or ``generate_batch``.

How a request runs (the ONNX graph samples; see ``serve.onnx_model`` for the call):

1. The prompt is lowercased if the model was trained lowercased (``textgen.lowercase``) and
   encoded with the unknown-character policy. An empty prompt is one newline (the model's "start
   of a paragraph"; a space if the vocabulary has no newline); that character is not output.
2. One model call consumes the whole prompt from the zero state and samples the first chunk of
   characters (``FIRST_CHUNK``, small: the first characters come sooner); then one call per chunk
   of ``chunk_size`` characters, each fed the pending (last sampled) character and the state.
3. A row ends after ``max_chars`` characters (the last chunk is cut to fit), or at the first place
   where its output ends with a stop string (checked after every chunk; the stop string is removed,
   so the text returned is at most ``max_chars`` characters).

Batches: every row has its own prompt, its own RNG and its own stop. The distinct prompts minus
their last character are consumed first (one call per prompt length, from the zero state), then
all running rows sample in one call per chunk, fed their pending character (the prompt's last one
at first); rows that finish leave the batch.

Determinism: each row's ``numpy.random.Generator`` gives the graph K x V Gumbel numbers per call, in
order (``sampling.RowNoise``), and the graph computes every row exactly as if it were alone, so the
text depends on the seed and the arguments only, not on the chunk size or the batch: row i with
``seed=s`` makes exactly the text of ``generate(prompts[i], seed=s + i)`` (or ``seed=seeds[i]``
for a list), and the HTTP engine makes that text too.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from serve.onnx_model import OnnxModel
from serve.params import DEFAULT_MAX_CHARS, DEFAULT_TEMPERATURE, MAX_CHARS_CAP
from serve.sampling import RowNoise, Sampler, row_rngs
from textgen.contract import start_char
from textgen.errors import TextgenError as GeneratorError
from textgen.text import StopStrings

MAX_PROMPT_CHARS = 100_000  # a longer prompt is a mistake more often than a wish
MAX_BATCH = 4096  # rows of one generate_batch call
MAX_BATCH_CHARS = 16_000_000  # rows x max_chars of one call: the generated ids take 4 bytes each
# Characters per model call. A call costs ~0.2 ms beyond its characters (~55 µs each for a 2x256
# model on one core): 32 keeps that under 10% of a single stream, a stop string wastes at most 31
# characters, and a stream's characters come in bursts of ~2 ms (bench/generation.py).
DEFAULT_CHUNK = 32
FIRST_CHUNK = 8  # the first call's (it also consumes the prompt): the first characters come sooner


class Generator:
    """Text from an ONNX character model. Thread-safe: the session is shared, every call keeps its
    own state and RNG. Errors in arguments raise ``GeneratorError`` (a ``ValueError``)."""

    def __init__(
        self,
        model: OnnxModel,
        max_chars_cap: int = MAX_CHARS_CAP,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.model = model
        self.max_chars_cap = _count("max_chars_cap", max_chars_cap, minimum=1)
        self.max_prompt_chars = _count("max_prompt_chars", max_prompt_chars, minimum=1)
        self.chunk_size = _count("chunk_size", chunk_size, minimum=1)
        vocab = model.vocabulary
        self._start_ids = np.array([vocab.index[start_char(vocab.chars)]], np.int32)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        num_threads: int | None = None,
        session_options=None,
        max_chars_cap: int = MAX_CHARS_CAP,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> Generator:
        """Open an exported model. ``num_threads``: onnxruntime intra-op threads (default 1;
        0 = one per core). ``session_options``: an ``onnxruntime.SessionOptions`` to use instead
        of ours. ``max_chars_cap`` / ``max_prompt_chars``: limits per request. ``chunk_size``:
        characters sampled per model call (speed only: the text does not depend on it)."""
        model = OnnxModel.load(path, num_threads=num_threads, options=session_options)
        return cls(model, max_chars_cap=max_chars_cap, max_prompt_chars=max_prompt_chars, chunk_size=chunk_size)

    @property
    def vocab(self) -> tuple[str, ...]:
        return self.model.info.vocab

    @property
    def lowercase(self) -> bool:
        return self.model.info.lowercase

    # -- public API -----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str = "",
        *,
        max_chars: int = DEFAULT_MAX_CHARS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        unknown: str = "error",
        replacement: str = " ",
    ) -> str:
        """The continuation of ``prompt`` (the prompt itself is not included).

        max_chars: characters to generate (at most ``max_chars_cap``). temperature: 0 = greedy,
        else softmax temperature; top_k: keep the k most likely characters (0 = off); top_p: keep
        the smallest set of characters holding this much probability (1 = off). seed: fixes the
        text (None: fresh randomness). stop: a string or list of strings; generation ends when the
        output ends with one, and the stop string is NOT included. unknown: what to do with prompt
        characters the model does not know: "error", "skip", or "replace" (with ``replacement``)."""
        run = self._prepare([prompt], max_chars, temperature, top_k, top_p, [_row_seed(seed)], stop,
                            unknown, replacement)
        for _ in run:
            pass
        return run.texts()[0]

    def stream(
        self,
        prompt: str = "",
        *,
        max_chars: int = DEFAULT_MAX_CHARS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        unknown: str = "error",
        replacement: str = " ",
    ) -> Iterator[str]:
        """``generate``, one character at a time as they are made (same arguments, same text; the
        model makes them a chunk at a time).

        Arguments are checked before the first character (a bad one raises on the call, not on
        the first ``next``). With stop strings, a character that may begin a stop string is held
        back until it is clear that it does not."""
        run = self._prepare([prompt], max_chars, temperature, top_k, top_p, [_row_seed(seed)], stop,
                            unknown, replacement)
        return self._stream(run)

    def generate_batch(
        self,
        prompts: Sequence[str] | int,
        *,
        prompt: str = "",
        max_chars: int = DEFAULT_MAX_CHARS,
        temperature: float = DEFAULT_TEMPERATURE,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        unknown: str = "error",
        replacement: str = " ",
    ) -> list[str]:
        """Many samples in one pass: one batched model call per chunk for all running rows.

        prompts: a list of prompts (one row each), or a number n of rows that all continue
        ``prompt``. seed: an int s gives row i the seed s + i, a list gives one seed per row; row i
        is then exactly ``generate(prompts[i], seed=...)``. Other arguments as ``generate``."""
        if isinstance(prompts, int) and not isinstance(prompts, bool):
            n = _count("the number of samples", prompts, minimum=1)
            prompts = [prompt] * n
        elif isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise GeneratorError(
                f"prompts must be a list of strings or a number of samples, got {type(prompts).__name__}"
            )
        if not 1 <= len(prompts) <= MAX_BATCH:
            raise GeneratorError(f"a batch needs 1 to {MAX_BATCH} prompts, got {len(prompts)}")
        if isinstance(max_chars, int) and len(prompts) * max_chars > MAX_BATCH_CHARS:
            raise GeneratorError(
                f"{len(prompts):,} prompts x max_chars {max_chars:,} is more than {MAX_BATCH_CHARS:,} "
                "characters for one call; ask for fewer samples or characters, or split the batch"
            )
        seeds = _row_seeds(seed, len(prompts))
        run = self._prepare(list(prompts), max_chars, temperature, top_k, top_p, seeds, stop, unknown,
                            replacement)
        for _ in run:
            pass
        return run.texts()

    def encode(self, prompt: str, unknown: str = "error", replacement: str = " ") -> np.ndarray:
        """The ids (T,) int32 the model is fed for ``prompt``: checked against ``max_prompt_chars``,
        lowercased if the model is, unknown characters handled by the policy, and the start
        character for an empty prompt. For front ends that run the steps themselves
        (``serve/engine.py``)."""
        return self._encode(prompt, unknown, replacement)

    # -- internals ------------------------------------------------------------------------------

    def _prepare(self, prompts, max_chars, temperature, top_k, top_p, seeds, stop, unknown, replacement) -> _Run:
        sampler = Sampler(temperature, top_k, top_p)
        max_chars = _count("max_chars", max_chars)
        if max_chars > self.max_chars_cap:
            raise GeneratorError(
                f"max_chars must be at most {self.max_chars_cap:,}, got {max_chars:,}; ask for less, or "
                "raise the cap with Generator(..., max_chars_cap=N)"
            )
        stops = StopStrings(stop)
        ids = [self._encode(p, unknown, replacement) for p in prompts]
        return _Run(self.model, ids, sampler, row_rngs(seeds, sampler.greedy), max_chars, stops, self.chunk_size)

    def _encode(self, prompt: str, unknown: str, replacement: str) -> np.ndarray:
        if not isinstance(prompt, str):
            raise GeneratorError(f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
        if len(prompt) > self.max_prompt_chars:
            raise GeneratorError(
                f"the prompt has {len(prompt):,} characters, more than the limit of {self.max_prompt_chars:,}; "
                "shorten it (the model's memory is far shorter anyway), or raise the limit with "
                "Generator(..., max_prompt_chars=N)"
            )
        if self.lowercase:
            prompt = prompt.lower()
        ids = self.model.vocabulary.encode(prompt, unknown, replacement, what="prompt")
        return ids if len(ids) else self._start_ids

    def _stream(self, run: _Run) -> Iterator[str]:
        chars = self.model.vocabulary.chars
        if not run.stops:
            for _, ids in run:
                yield from (chars[i] for i in ids[0].tolist())
            return
        stops, held = run.stops, ""
        for _, ids in run:
            for i in ids[0].tolist():
                held += chars[i]
                found = stops.find_first(held) if chars[i] in stops.last_chars else None
                if found is not None:
                    yield from held[: found[0] - found[1]]
                    return
                k = stops.held_tail(held)
                yield from held[: len(held) - k]
                held = held[len(held) - k :]
        yield from held


class _Run:
    """One request: B rows decoded in lockstep, a chunk of characters per row per model call.
    Iterating runs it, yielding per call the original indices (k,) of the running rows and the
    characters (k, K) int32 they made (a row that stops mid-chunk made the rest too; they are not
    part of its text); afterwards ``texts()`` gives every row's output."""

    def __init__(self, model: OnnxModel, prompts, sampler: Sampler, rngs, max_chars: int, stops: StopStrings,
                 chunk_size: int):
        self.model, self.prompts, self.sampler, self.rngs = model, prompts, sampler, rngs
        self.max_chars, self.stops, self.chunk_size = max_chars, stops, chunk_size
        b = len(prompts)
        self.out = np.zeros((b, max_chars), np.int32)  # (B, max_chars) generated ids
        self.length = np.zeros(b, np.int64)  # characters generated per row, stop string included
        self.cut = np.zeros(b, np.int64)  # length of the stop string that ended the row

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.max_chars == 0:
            return
        model, out, b = self.model, self.out, len(self.prompts)
        s = self.sampler
        settings = model.settings(b, s.temperature, s.top_k, s.top_p)
        noise = RowNoise(self.rngs, model.info.vocab_size)
        if b == 1:  # the whole prompt in the first call
            char_ids, state = self.prompts[0][None], model.zero_state(1)
        else:  # every prompt but its last character first (K = 0), then that one is pending
            state = model.prefill([p[:-1] for p in self.prompts])
            char_ids = np.array([p[-1] for p in self.prompts], np.int32)[:, None]
        # (V,) bool: ids that end some stop string; only rows that made one are checked.
        ends_stop = np.array([c in self.stops.last_chars for c in model.vocabulary.chars]) if self.stops else None
        rows = np.arange(b)
        pos = 0  # characters made per running row
        while True:
            k = min(FIRST_CHUNK if pos == 0 else self.chunk_size, self.max_chars - pos)
            ids, state = model.chunk(char_ids, state, noise.take(k), settings)  # (k_rows, K)
            out[rows, pos : pos + k] = ids
            pos += k
            yield rows, ids
            done = np.zeros(len(rows), bool)
            if ends_stop is not None:
                for j in np.flatnonzero(ends_stop[ids].any(axis=1)):
                    done[j] = self._stopped(rows[j], pos - k, pos)
            if pos == self.max_chars:
                self.length[rows[~done]] = pos
                return
            if done.any():
                keep = np.flatnonzero(~done)
                if len(keep) == 0:
                    return
                rows, ids, state = rows[keep], ids[keep], [x[keep] for x in state]
                settings = {name: x[keep] for name, x in settings.items()}
                noise.keep(keep)
            char_ids = ids[:, -1:]

    def _stopped(self, r: int, start: int, end: int) -> bool:
        """Whether row r's output ends with a stop string somewhere in [start, end) (it did not
        before ``start``); if so its length and cut are set at the first such place."""
        tail_start = max(0, start - (self.stops.longest - 1))
        found = self.stops.find_first(self.model.vocabulary.decode(self.out[r, tail_start:end].tolist()))
        if found is None:
            return False
        self.length[r], self.cut[r] = tail_start + found[0], found[1]
        return True

    def texts(self) -> list[str]:
        decode = self.model.vocabulary.decode
        return [decode(self.out[r, : self.length[r] - self.cut[r]].tolist()) for r in range(len(self.prompts))]


# ---------------------------------------------------------------------------------------------
# Argument checks


def _count(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise GeneratorError(f"{name} must be an integer, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise GeneratorError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _row_seed(seed: object) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise GeneratorError(f"seed must be an integer >= 0 or None, got {seed!r}")
    return int(seed)


def _row_seeds(seed: object, n: int) -> list[int | None]:
    """Seed per row: s -> s, s+1, ...; a list -> itself; None -> fresh entropy for every row."""
    if seed is None:
        return [None] * n
    if isinstance(seed, (list, tuple, np.ndarray)):
        if len(seed) != n:
            raise GeneratorError(f"got {len(seed)} seeds for {n} prompts; give one seed per prompt or one int")
        return [_row_seed(s) for s in seed]
    first = _row_seed(seed)
    return [first + i for i in range(n)]  # type: ignore[operator]

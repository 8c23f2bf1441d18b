"""The generation API: ``Generator.load(path)``, then ``generate``, ``stream`` or ``generate_batch``.

How a request runs:

1. The prompt is lowercased if the model was trained lowercased (``textgen.lowercase``), encoded
   with the unknown-character policy, and consumed in ONE model call (T = len(prompt)) from the
   zero state. An empty prompt starts from the zero state fed with one newline (the model's
   "start of a paragraph"; a space if the vocabulary has no newline); that character is not output.
2. Then one character per step: sampler(logits) -> id, fed back with the carried state.
3. A row ends after ``max_chars`` characters, or when its output ends with a stop string (which is
   removed from the output, so the text returned is at most ``max_chars`` characters).

Batches: every row has its own prompt, its own RNG and its own stop; all running rows advance in
one batched model call per step, and rows that finish leave the batch. Row i with ``seed=s`` makes
exactly the text of ``generate(prompts[i], seed=s + i)`` (or ``seed=seeds[i]`` for a list).
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from serve.onnx_model import OnnxModel
from serve.sampling import RowUniforms, Sampler
from serve.text import DEFAULT_MAX_CHARS, DEFAULT_TEMPERATURE, MAX_CHARS_CAP, GeneratorError, StopStream, StopStrings

MAX_PROMPT_CHARS = 100_000  # a longer prompt is a mistake more often than a wish
MAX_BATCH = 4096  # rows of one generate_batch call
MAX_BATCH_CHARS = 16_000_000  # rows x max_chars of one call: the generated ids take 4 bytes each


class Generator:
    """Text from an ONNX character model. Thread-safe: the session is shared, every call keeps its
    own state and RNG. Errors in arguments raise ``GeneratorError`` (a ``ValueError``)."""

    def __init__(
        self,
        model: OnnxModel,
        max_chars_cap: int = MAX_CHARS_CAP,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
    ) -> None:
        self.model = model
        self.max_chars_cap = _count("max_chars_cap", max_chars_cap, minimum=1)
        self.max_prompt_chars = _count("max_prompt_chars", max_prompt_chars, minimum=1)
        vocab = model.vocabulary
        start = "\n" if "\n" in vocab else " " if " " in vocab else vocab.chars[0]
        self._start_ids = np.array([vocab.index[start]], np.int32)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        num_threads: int | None = None,
        session_options=None,
        max_chars_cap: int = MAX_CHARS_CAP,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
    ) -> Generator:
        """Open an exported model. ``num_threads``: onnxruntime intra-op threads (default 1;
        0 = one per core). ``session_options``: an ``onnxruntime.SessionOptions`` to use instead
        of ours. ``max_chars_cap`` / ``max_prompt_chars``: limits per request."""
        model = OnnxModel.load(path, num_threads=num_threads, options=session_options)
        return cls(model, max_chars_cap=max_chars_cap, max_prompt_chars=max_prompt_chars)

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
        return "".join(
            self.stream(
                prompt, max_chars=max_chars, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, stop=stop, unknown=unknown, replacement=replacement,
            )
        )

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
        """``generate``, one character at a time as they are made (same arguments, same text).

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
        """Many samples in one pass: one batched model call per step for all running rows.

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
        rngs = None if sampler.greedy else [np.random.default_rng(s) for s in seeds]
        return _Run(self.model, ids, sampler, rngs, max_chars, stops)

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
        ids = self.model.vocabulary.encode(prompt, unknown, replacement)
        return ids if len(ids) else self._start_ids

    def _stream(self, run: _Run) -> Iterator[str]:
        chars = self.model.vocabulary.chars
        if not run.stops:
            for _, ids in run:
                yield chars[ids[0]]
            return
        held = StopStream(run.stops)
        for _, ids in run:
            yield from held.push(chars[ids[0]])
            if held.stopped:
                return
        yield from held.flush()


class _Run:
    """One request: B rows decoded in lockstep. Iterating runs it, yielding per step the original
    indices (k,) of the rows that made a character and the characters (k,) int32; afterwards
    ``texts()`` gives every row's output."""

    def __init__(self, model: OnnxModel, prompts, sampler: Sampler, rngs, max_chars: int, stops: StopStrings):
        self.model, self.prompts, self.sampler, self.rngs = model, prompts, sampler, rngs
        self.max_chars, self.stops = max_chars, stops
        b = len(prompts)
        self.out = np.zeros((b, max_chars), np.int32)  # (B, max_chars) generated ids
        self.length = np.zeros(b, np.int64)  # characters generated per row, stop string included
        self.cut = np.zeros(b, np.int64)  # length of the stop string that ended the row

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.max_chars == 0:
            return
        vocab = self.model.vocabulary
        logits, state = self.model.prefill(self.prompts)  # (B, V), (B, H) per state input
        stepper = self.model.stepper(state)
        sampler, out, stops = self.sampler, self.out, self.stops
        uniforms = None if self.rngs is None else RowUniforms(self.rngs)
        # (V,) bool: ids that end some stop string; only rows that just made one are checked.
        ends_stop = np.array([c in stops.last_chars for c in vocab.chars]) if stops else None
        rows = np.arange(len(self.prompts))
        last = self.max_chars - 1
        for t in range(self.max_chars):
            ids = sampler(logits, None if uniforms is None else uniforms.next())  # (k,)
            out[rows, t] = ids
            yield rows, ids
            if t == last:
                self.length[rows] = self.max_chars
                return
            if ends_stop is not None and ends_stop[ids].any():
                done = self._stopped(rows, ids, t + 1, ends_stop)
                if done.any():
                    self.length[rows[done]] = t + 1
                    keep = np.flatnonzero(~done)
                    if len(keep) == 0:
                        return
                    rows, ids = rows[keep], ids[keep]
                    stepper.keep(keep)
                    if uniforms is not None:
                        uniforms.keep(keep)
            logits = stepper.step(ids)

    def _stopped(self, rows: np.ndarray, ids: np.ndarray, n: int, ends_stop: np.ndarray) -> np.ndarray:
        """(k,) bool: the rows whose first n characters now end with a stop string."""
        done = np.zeros(len(rows), bool)
        longest = self.stops.longest
        for j in np.flatnonzero(ends_stop[ids]):
            r = rows[j]
            tail = self.model.vocabulary.decode(self.out[r, max(0, n - longest) : n])
            for s in self.stops.stops:
                if tail.endswith(s):
                    done[j], self.cut[r] = True, len(s)
                    break
        return done

    def texts(self) -> list[str]:
        decode = self.model.vocabulary.decode
        return [decode(self.out[r, : self.length[r] - self.cut[r]]) for r in range(len(self.prompts))]


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

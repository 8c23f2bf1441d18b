"""The generation API: ``Generator.load(path)``, then ``generate``, ``stream`` or ``generate_batch``.

How a request runs (the ONNX graph samples; see ``serve.onnx_model`` for the call, and
``serve.decode`` for the loop, which the HTTP engine runs too):

0. The arguments are checked once, as ``serve.params.SamplingParams`` against this generator's
   ``Limits`` (``max_chars_cap``, ``max_prompt_chars``); a bad one raises ``ParamError``.
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

Determinism: each row's noise source gives the graph K x V Gumbel numbers per call, in order
(``sampling.RowNoise``; format 2: a hash of seed, position and character, docs/format.md; format 1:
numpy PCG64), and the graph computes every row exactly as if it were alone, so the
text depends on the seed and the arguments only, not on the chunk size or the batch: row i with
``seed=s`` makes exactly the text of ``generate(prompts[i], seed=s + i)`` (or ``seed=seeds[i]``
for a list), and the HTTP engine makes that text too.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence, TypedDict, Unpack

import numpy as np

from serve.decode import Batch, Prompts, Row
from serve.onnx_model import OnnxModel
from serve.params import (
    MAX_CHARS_CAP,
    MAX_PROMPT_CHARS,
    Limits,
    ParamError,
    SamplingParams,
    check_count,
    encode_prompt,
)
from textgen.contract import start_char
from textgen.errors import TextgenError as GeneratorError

MAX_BATCH_CHARS = 16_000_000  # rows x max_chars of one call: the generated ids take 4 bytes each
# Characters per model call: a call has a fixed cost beyond its characters, which 32 keeps small
# next to a single stream's; a stop string wastes at most 31 characters, and a stream's characters
# come in short bursts (bench/RESULTS.md, bench/generation.py).
DEFAULT_CHUNK = 32
FIRST_CHUNK = 8  # the first call's (it also consumes the prompt): the first characters come sooner


class Options(TypedDict, total=False):
    """The keyword arguments of ``generate``, ``stream`` and ``generate_batch`` (``SamplingParams``;
    its defaults apply)."""

    max_chars: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: str | Sequence[str] | None
    unknown: str
    replacement: str


class Generator:
    """Text from an ONNX character model. Thread-safe: the session is shared, every call keeps its
    own state and RNG. Errors in arguments raise ``GeneratorError`` (a ``ValueError``; for request
    parameters a ``serve.params.ParamError`` naming the field)."""

    def __init__(
        self,
        model: OnnxModel,
        max_chars_cap: int = MAX_CHARS_CAP,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        self.model = model
        self.limits = Limits(max_chars=check_count("max_chars_cap", max_chars_cap, minimum=1),
                             max_prompt_chars=check_count("max_prompt_chars", max_prompt_chars, minimum=1))
        self.chunk_size = check_count("chunk_size", chunk_size, minimum=1)
        vocab = model.vocabulary
        self._start_ids = np.array([vocab.index[start_char(vocab.chars)]], np.int32)

    @property
    def max_chars_cap(self) -> int:
        return self.limits.max_chars

    @property
    def max_prompt_chars(self) -> int:
        return self.limits.max_prompt_chars

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

    def generate(self, prompt: str = "", **options: Unpack[Options]) -> str:
        """The continuation of ``prompt`` (the prompt itself is not included).

        max_chars: characters to generate (at most ``max_chars_cap``; default 500). temperature:
        0 = greedy, else softmax temperature (default 0.8); top_k: keep the k most likely characters
        (0 = off); top_p: keep the smallest set of characters holding this much probability (1 =
        off). seed: fixes the text (None: fresh randomness). stop: a string or list of strings;
        generation ends when the output ends with one, and the stop string is NOT included.
        unknown: what to do with prompt characters the model does not know: "error", "skip", or
        "replace" (with ``replacement``, default a space). Defaults: ``serve.params``."""
        return self.run([prompt], self.params(**options))[0]

    def stream(self, prompt: str = "", **options: Unpack[Options]) -> Iterator[str]:
        """``generate``, one character at a time as they are made (same arguments, same text; the
        model makes them a chunk at a time).

        Arguments are checked before the first character (a bad one raises on the call, not on
        the first ``next``). With stop strings, a character that may begin a stop string is held
        back until it is clear that it does not (``decode.Row.release``)."""
        params = self.params(**options)
        rows, ids = self._rows([prompt], params, [params.seed])
        return self._stream(rows[0], ids[0])

    def generate_batch(
        self,
        prompts: Sequence[str] | int,
        *,
        prompt: str = "",
        seed: int | Sequence[int] | None = None,
        **options: Unpack[Options],
    ) -> list[str]:
        """Many samples in one pass: one batched model call per chunk for all running rows.

        prompts: a list of prompts (one row each), or a number n of rows that all continue
        ``prompt``. seed: an int s gives row i the seed s + i, a list gives one seed per row; row i
        is then exactly ``generate(prompts[i], seed=...)``. Other arguments as ``generate``."""
        if isinstance(prompts, str) or not isinstance(prompts, (Sequence, int)) or isinstance(prompts, bool):
            raise GeneratorError(
                f"prompts must be a list of strings or a number of samples, got {type(prompts).__name__}"
            )
        n = prompts if isinstance(prompts, int) else len(prompts)
        seeds = seed if isinstance(seed, (list, tuple, np.ndarray)) else None
        params = self.params(**options, seed=None if seeds is not None else seed, n=n)
        if n * params.max_chars > MAX_BATCH_CHARS:
            raise ParamError.of("n", f"{n:,} prompts x max_chars {params.max_chars:,} is more than "
                                     f"{MAX_BATCH_CHARS:,} characters for one call; ask for fewer samples or "
                                     "characters, or split the batch")
        if seeds is None:
            seeds = [None if params.seed is None else params.seed + i for i in range(n)]
        elif len(seeds) != n:
            raise ParamError.of("seed", f"got {len(seeds)} seeds for {n} prompts; give one seed per prompt or one int")
        else:
            seeds = [self.params(seed=s).seed for s in seeds]  # each checked
        return self.run([prompt] * n if isinstance(prompts, int) else list(prompts), params, seeds)

    def params(self, **options: Any) -> SamplingParams:
        """``SamplingParams`` checked against this generator's caps."""
        return SamplingParams(**options, limits=self.limits)

    def run(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int | None] | None = None
            ) -> list[str]:
        """The texts of ``prompts`` (one row each; row i's seed ``seeds[i]``, default the params'
        seed for every row) with checked ``params``."""
        rows, ids = self._rows(prompts, params, seeds or [params.seed] * len(prompts))
        for _ in self._decode(rows, ids):
            pass
        return [row.text() for row in rows]

    def encode(self, prompt: str, params: SamplingParams | None = None, limits: Limits | None = None) -> np.ndarray:
        """The ids (T,) int32 the model is fed for ``prompt``: checked against ``max_prompt_chars``,
        lowercased if the model is, unknown characters handled by the policy of ``params``, and
        the start character for an empty prompt. For front ends that run the steps themselves
        (``serve/engine.py``, with their own ``limits``)."""
        params = params or SamplingParams(limits=self.limits)
        ids = encode_prompt(prompt, params, self.model.vocabulary, self.lowercase, limits or self.limits)
        return ids if len(ids) else self._start_ids

    # -- internals ------------------------------------------------------------------------------

    def _rows(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int | None]
              ) -> tuple[list[Row], list[np.ndarray]]:
        ids = [self.encode(p, params) for p in prompts]
        chars = self.model.vocabulary.chars
        return [Row(params, chars, seed) for seed in seeds], ids

    def _decode(self, rows: list[Row], prompt_ids: list[np.ndarray]) -> Iterator[np.ndarray]:
        """Run ``rows`` to their ends, yielding after every model call which of the running rows
        (``batch.rows`` of that moment) are done."""
        if not rows or rows[0].params.max_chars == 0:
            return
        batch, prompts = Batch(self.model), Prompts(self.model)
        for row, ids in zip(rows, prompt_ids):
            prompts.add([row], ids)
        prompts.consume(batch)  # all at once: the lone prompt whole in the first call, else one prefill
        chunk = FIRST_CHUNK
        while batch.size:
            done, _ = batch.step(batch.steps(chunk))
            yield done
            chunk = self.chunk_size
            if done.any():
                batch.keep(np.flatnonzero(~done))

    def _stream(self, row: Row, prompt: np.ndarray) -> Iterator[str]:
        for done in self._decode([row], [prompt]):
            yield from row.release(bool(done[0]))

"""Choosing the next character: composable logit processors, then one vectorised draw per row.

Every processor is a pure function of logits (B, V) -> (B, V), applied in the order
temperature -> top-k -> top-p (as HF transformers' ``logits_process.py`` and keras-hub's samplers).
Masked characters get -inf. The draw is an inverse CDF: softmax, ``cumsum`` along V, and one
uniform number per row from that row's own ``numpy.random.Generator`` (so a seed fixes the text,
and the rows of a batch do not depend on each other). Temperature 0 is greedy: argmax, no RNG.

    sampler = Sampler(temperature=0.8, top_p=0.95)
    ids = sampler(logits, uniforms)   # (B, V), (B,) in [0, 1) -> (B,) int32
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Sequence

import numpy as np

from serve.text import GeneratorError

LogitsProcessor = Callable[[np.ndarray], np.ndarray]  # (B, V) -> (B, V)


class SamplingError(GeneratorError):
    pass


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SamplingError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SamplingError(f"{name} must be finite, got {value}")
    return value


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise SamplingError(f"{name} must be an integer, got {type(value).__name__}: {value!r}") from None


class Temperature:
    """Divide the logits by ``temperature`` > 0: below 1 sharpens, above 1 flattens. The row maximum
    is subtracted first (softmax does not change) so that tiny temperatures cannot overflow."""

    def __init__(self, temperature: float) -> None:
        t = _real("temperature", temperature)
        if not t > 0:
            raise SamplingError(
                f"temperature must be > 0 for the Temperature processor, got {t}; "
                "temperature 0 means greedy decoding (Sampler(temperature=0))"
            )
        self.temperature = t

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return shifted if self.temperature == 1.0 else shifted / np.float32(self.temperature)


class TopK:
    """Keep the ``k`` largest logits of each row (ties at the k-th value are all kept)."""

    def __init__(self, k: int) -> None:
        k = _integer("top_k", k)
        if k < 1:
            raise SamplingError(f"top_k must be >= 1 for the TopK processor, got {k} (top_k=0 means off)")
        self.k = k

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        v = logits.shape[-1]
        if self.k >= v:
            return logits
        kth = np.partition(logits, v - self.k, axis=-1)[:, v - self.k : v - self.k + 1]  # (B, 1)
        return np.where(logits < kth, -np.inf, logits).astype(logits.dtype, copy=False)


class TopP:
    """Nucleus: keep the most probable characters whose probabilities sum to at least ``p``
    (always at least one; ties with the least probable kept character are kept too; ``p`` = 1
    keeps everything)."""

    def __init__(self, p: float) -> None:
        p = _real("top_p", p)
        if not 0.0 < p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {p} (1 means off)")
        self.p = p

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.p >= 1.0:
            return logits
        desc = np.sort(logits, axis=-1)[:, ::-1]  # (B, V), most probable first
        e = np.exp(desc - desc[:, :1])
        cum = np.cumsum(e, axis=-1, dtype=np.float64)
        # A character is kept while the mass of the better ones is below p (the first always is).
        n_keep = ((cum - e) < self.p * cum[:, -1:]).sum(axis=-1)  # (B,) >= 1
        threshold = desc[np.arange(len(desc)), n_keep - 1][:, None]  # (B, 1)
        return np.where(logits < threshold, -np.inf, logits).astype(logits.dtype, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def greedy(logits: np.ndarray) -> np.ndarray:
    """(B, V) -> (B,) int32: the most likely character of each row (the first one on ties)."""
    return logits.argmax(axis=-1).astype(np.int32)


def draw(logits: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling: (B, V) logits, (B,) uniforms in [0, 1) -> (B,) int32 ids.

    Row b takes the first character whose cumulative (unnormalised) probability exceeds
    ``uniforms[b]`` times the row total, so a character with probability 0 is never drawn."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))  # -inf -> 0
    cdf = np.cumsum(e, axis=-1, dtype=np.float64)  # (B, V)
    target = uniforms * cdf[:, -1]  # (B,)
    ids = (cdf <= target[:, None]).sum(axis=-1)
    # u * total can round up to total (u within 2**-53 of 1); stay inside the vocabulary.
    return np.minimum(ids, logits.shape[-1] - 1).astype(np.int32)


class Sampler:
    """temperature -> top-k -> top-p, then a draw; ``temperature=0`` is greedy (argmax).

    ``top_k=0`` and ``top_p=1`` switch those processors off. Bad values raise ``SamplingError``
    (a ``GeneratorError``) saying which argument and what range it accepts."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        t = _real("temperature", temperature)
        if t < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {t}")
        k = _integer("top_k", top_k)
        if k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = off), got {k}")
        p = _real("top_p", top_p)
        if not 0.0 < p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {p}")
        self.temperature, self.top_k, self.top_p = t, k, p
        self.processors: list[LogitsProcessor] = []
        if t > 0:
            if t != 1.0:
                self.processors.append(Temperature(t))
            if k > 0:
                self.processors.append(TopK(k))
            if p < 1.0:
                self.processors.append(TopP(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def process(self, logits: np.ndarray) -> np.ndarray:
        for processor in self.processors:
            logits = processor(logits)
        return logits

    def __call__(self, logits: np.ndarray, uniforms: np.ndarray | None = None) -> np.ndarray:
        """(B, V) logits and (B,) uniforms in [0, 1) -> (B,) int32 ids (uniforms unused if greedy)."""
        if self.greedy:
            return greedy(logits)
        if uniforms is None:
            raise SamplingError("sampling with temperature > 0 needs one uniform number per row")
        return draw(self.process(logits), uniforms)

    def __repr__(self) -> str:
        return f"Sampler(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p})"


class RowUniforms:
    """One ``numpy.random.Generator`` per row, drawn in blocks: ``next()`` gives (B,) uniforms.

    ``Generator.random(n)`` yields the same numbers as n calls of ``random()``, so a row's sequence
    does not depend on the block size, on the other rows, or on rows leaving the batch (``keep``)."""

    def __init__(self, rngs: Sequence[np.random.Generator], block: int = 256) -> None:
        self.rngs = list(rngs)
        self.block = block
        self._buf = np.empty((len(self.rngs), 0))
        self._pos = 0

    def next(self) -> np.ndarray:
        if self._pos == self._buf.shape[1]:
            self._buf = np.stack([rng.random(self.block) for rng in self.rngs])  # (B, block)
            self._pos = 0
        u = self._buf[:, self._pos]
        self._pos += 1
        return u

    def keep(self, rows: np.ndarray) -> None:
        """Drop every row not in ``rows`` (indices into the current rows, in order)."""
        self.rngs = [self.rngs[i] for i in rows]
        self._buf = self._buf[rows]


def sample_rows(
    logits: np.ndarray,
    uniforms: np.ndarray,
    temperature: np.ndarray,
    top_k: np.ndarray,
    top_p: np.ndarray,
) -> np.ndarray:
    """``Sampler`` with its own parameters for every row, in one vectorised pass (for a batch of
    requests that share model calls, see ``serve/engine.py``).

    logits (B, V), uniforms (B,) in [0, 1), temperature (B,), top_k (B,), top_p (B,) -> (B,) int32.
    Row b gets exactly ``Sampler(temperature[b], top_k[b], top_p[b])(logits[b:b+1], uniforms[b:b+1])``,
    bit for bit: a processor that ``Sampler`` would skip for a row (temperature 1, top_k 0 or >= V,
    top_p 1) leaves that row untouched here too, and greedy rows (temperature 0) take the argmax of
    the raw logits and ignore their uniform. Parameters are not checked: build a ``Sampler`` per
    request first, which rejects bad values."""
    b, v = logits.shape
    greedy_rows = temperature == 0
    scale = np.where((temperature == 1) | greedy_rows, 1.0, temperature).astype(np.float32)[:, None]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    x = np.where(scale == 1, logits, shifted / scale)  # (B, V) Temperature where Sampler applies it
    rows = np.arange(b)
    cut_k = (top_k > 0) & (top_k < v) & ~greedy_rows
    if cut_k.any():
        kth = np.sort(x, axis=-1)[rows, v - np.where(cut_k, top_k, 1)]  # (B,) the k-th largest
        x = np.where(cut_k[:, None] & (x < kth[:, None]), -np.inf, x)
    cut_p = (top_p < 1.0) & ~greedy_rows
    if cut_p.any():
        desc = np.sort(x, axis=-1)[:, ::-1]
        e = np.exp(desc - desc[:, :1])
        cum = np.cumsum(e, axis=-1, dtype=np.float64)
        n_keep = ((cum - e) < top_p.astype(np.float64)[:, None] * cum[:, -1:]).sum(axis=-1)  # (B,)
        threshold = desc[rows, n_keep - 1]
        x = np.where(cut_p[:, None] & (x < threshold[:, None]), -np.inf, x)
    ids = draw(x, uniforms)
    if greedy_rows.any():
        ids = np.where(greedy_rows, greedy(logits), ids)
    return ids

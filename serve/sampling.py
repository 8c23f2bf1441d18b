"""Choosing the next character: the sampling rule of the exported graph, in numpy, and its noise.

The ONNX file samples inside its generation loop (``export/generation.py``); this module states the
same rule for tests, for fake models and for anyone reading, and makes the noise the graph is fed:

1. Temperature: logits (B, V) times 1 / temperature (float32). Temperature 0 is greedy: the graph
   divides by ``GREEDY_TEMPERATURE`` and is fed no noise, so it takes the argmax.
2. Filters, both judging the temperature-scaled distribution: top-k keeps the k largest logits,
   top-p the most probable characters while the probability of the better ones is below p (the
   first always). A character must pass both; ties with the smallest kept logit are kept. Masked
   characters get -inf. (This is the graph's rule: cheaper there than renormalising after top-k,
   so top-p here is not applied to the top-k distribution as HF transformers does.)
3. Gumbel-max: id = argmax(filtered + noise), with standard Gumbel noise (B, V), draws from
   softmax(filtered) exactly.

Noise: every row has its own ``numpy.random.Generator``; a call of K steps takes
``rng.gumbel(size=(K, V))`` from it, in order. ``Generator.gumbel`` draws one number per value, so
a row's j-th character always gets the j-th block of V numbers of its stream, whatever the chunk
sizes and whatever else shares the batch: a seed fixes the text. Greedy rows get zeros and draw
nothing.

    sampler = Sampler(temperature=0.8, top_p=0.95)    # checks the values, says what is wrong
    ids = sampler(logits, noise)                      # (B, V), (B, V) Gumbel -> (B,) int32
    ids = sample_rows(logits, noise, t, k, p)         # per-row settings, (B,) each
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Sequence

import numpy as np

from textgen.contract import GREEDY_TEMPERATURE
from textgen.errors import TextgenError as GeneratorError

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


def sample_rows(logits, noise, temperature, top_k, top_p) -> np.ndarray:
    """The graph's sampling rule, per row: logits (B, V), Gumbel noise (B, V), temperature (B,)
    (<= 0: greedy), top_k (B,) (<= 0: off), top_p (B,) (>= 1: off) -> (B,) int32 ids.

    The exporter builds the graph from this rule and its tests check the graph against it; every
    step is float32 as in the graph."""
    logits = np.asarray(logits, np.float32)
    t = np.maximum(np.asarray(temperature, np.float32), np.float32(GREEDY_TEMPERATURE))
    scaled = logits * (np.float32(1) / t)[:, None]
    srt = -np.sort(-scaled, axis=1)
    p = np.exp(srt - srt[:, :1])
    p /= p.sum(axis=1, keepdims=True)
    k = np.asarray(top_k)[:, None]
    top_p = np.asarray(top_p, np.float32)[:, None]
    ranks = np.arange(logits.shape[1])[None]
    excl = np.concatenate([np.zeros_like(p[:, :1]), np.cumsum(p, axis=1)[:, :-1]], axis=1)  # exclusive, in order
    keep = ((ranks < k) | (k <= 0)) & ((excl < top_p) | (top_p >= 1))
    cut = np.where(keep, srt, np.inf).min(axis=1, keepdims=True)
    filtered = np.where(scaled >= cut, scaled, -np.inf)
    return np.argmax(filtered + np.asarray(noise, np.float32), axis=1).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# The same rule as composable processors (HF transformers' logits_process.py style)


class Temperature:
    """Multiply the logits by 1 / ``temperature`` (> 0; float32, as the graph): below 1 sharpens,
    above 1 flattens."""

    def __init__(self, temperature: float) -> None:
        t = _real("temperature", temperature)
        if not t > 0:
            raise SamplingError(
                f"temperature must be > 0 for the Temperature processor, got {t}; "
                "temperature 0 means greedy decoding (Sampler(temperature=0))"
            )
        self.temperature = t

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        t = max(np.float32(self.temperature), np.float32(GREEDY_TEMPERATURE))
        return np.asarray(logits, np.float32) * (np.float32(1) / t)


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
    """Nucleus: keep the most probable characters while the probability of the better ones is
    below ``p`` (the first always; ties with the least probable kept character too; ``p`` = 1 keeps
    everything). Probabilities are the float32 softmax of the logits it is given."""

    def __init__(self, p: float) -> None:
        p = _real("top_p", p)
        if not 0.0 < p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {p} (1 means off)")
        self.p = p

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.p >= 1.0:
            return logits
        x = np.asarray(logits, np.float32)
        srt = -np.sort(-x, axis=-1)  # (B, V), most probable first
        e = np.exp(srt - srt[:, :1])
        e /= e.sum(axis=-1, keepdims=True)
        excl = np.concatenate([np.zeros_like(e[:, :1]), np.cumsum(e, axis=-1)[:, :-1]], axis=-1)
        n_keep = (excl < np.float32(self.p)).sum(axis=-1)  # (B,) >= 1: excl is non-decreasing
        threshold = srt[np.arange(len(srt)), n_keep - 1][:, None]  # (B, 1)
        return np.where(x < threshold, -np.inf, x).astype(x.dtype, copy=False)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Sampler:
    """One request's sampling settings, checked: temperature (0 = greedy), top-k (0 = off), top-p
    (1 = off). Bad values raise ``SamplingError`` (a ``GeneratorError``) saying which argument and
    what range it accepts.

    ``process`` is temperature, then top-k and top-p side by side (see the module docstring);
    ``sampler(logits, noise)`` adds the Gumbel noise and takes the argmax, exactly as the graph."""

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
        self.scale = Temperature(max(t, GREEDY_TEMPERATURE))
        self.filters: list[LogitsProcessor] = []
        if k > 0:
            self.filters.append(TopK(k))
        if p < 1.0:
            self.filters.append(TopP(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def process(self, logits: np.ndarray) -> np.ndarray:
        """(B, V) logits -> (B, V) scaled logits, -inf where a filter drops the character."""
        scaled = self.scale(logits)
        out = scaled
        for f in self.filters:  # each judges the scaled logits; a character must pass all
            out = np.minimum(out, f(scaled))
        return out

    def __call__(self, logits: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """(B, V) logits and (B, V) standard Gumbel noise -> (B,) int32 ids (greedy: no noise)."""
        if noise is None:
            if not self.greedy:
                raise SamplingError("sampling with temperature > 0 needs Gumbel noise, one (V,) row per row of logits")
            noise = np.zeros_like(logits, np.float32)
        return np.argmax(self.process(logits) + np.asarray(noise, np.float32), axis=-1).astype(np.int32)

    def __repr__(self) -> str:
        return f"Sampler(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p})"


class RowNoise:
    """The graph's ``sample_noise`` for a batch: one ``numpy.random.Generator`` per row (None: a
    greedy row, zeros). ``take(K)`` -> (B, K, V) float32, each row's next K x V standard Gumbel
    numbers; rows may leave (``keep``) and join (``extend``) between calls without changing what
    any other row gets."""

    def __init__(self, rngs: Sequence[np.random.Generator | None], vocab_size: int) -> None:
        self.rngs = list(rngs)
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.rngs)

    def take(self, steps: int) -> np.ndarray:
        noise = np.zeros((len(self.rngs), steps, self.vocab_size), np.float32)
        if steps:
            for i, rng in enumerate(self.rngs):
                if rng is not None:
                    noise[i] = rng.gumbel(size=(steps, self.vocab_size))
        return noise

    def keep(self, rows: Sequence[int] | np.ndarray) -> None:
        """Drop every row not in ``rows`` (indices into the current rows, in order)."""
        self.rngs = [self.rngs[i] for i in rows]

    def extend(self, rngs: Sequence[np.random.Generator | None]) -> None:
        self.rngs += list(rngs)


def row_rngs(seeds: Sequence[int | None], greedy: bool) -> list[np.random.Generator | None]:
    """One generator per row (None for every row when greedy: greedy rows draw nothing)."""
    return [None if greedy else np.random.default_rng(s) for s in seeds]

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

Noise: every row has its own noise source; a call of K steps takes ``source.gumbel(size=(K, V))``
from it, in order: a row's j-th character always gets the j-th block of V numbers, whatever the
chunk sizes and whatever else shares the batch, so a seed fixes the text. Greedy rows get zeros and
draw nothing. The source is the file's noise algorithm (``textgen.contract.NOISE_OF_VERSION``):
``HashNoise`` (format 2, ``textgen-hash32-gumbel-v1``: a counter-based hash of (seed, position,
index), docs/format.md) or, for a format-1 file, a ``numpy.random.Generator`` (PCG64).

    ids = sample_rows(logits, noise, t, k, p)   # (B, V), (B, V) Gumbel, (B,) settings -> (B,) int32

The settings are checked where a request is made (``serve.params.SamplingParams``), not here.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import numpy as np

from textgen.contract import GREEDY_TEMPERATURE, HASH_SALT, LN2, LOG_SERIES, NOISE_HASH32, NOISE_PCG64, SQRT_HALF


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


def lowbias32(x: np.ndarray) -> np.ndarray:
    """``textgen.contract.lowbias32`` on a uint32 array (numpy's uint32 products wrap mod 2**32)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


class HashNoise:
    """A row's ``textgen-hash32-gumbel-v1`` noise: ``gumbel(size=(K, V))`` gives the noise of its next
    K positions (``textgen.contract.hash_gumbel`` for each, vectorized). Positions are computed
    ``LOOKAHEAD`` at a time (a numpy call costs about the same for one position as for many), never
    past ``limit`` (the row's ``max_chars``, when known)."""

    LOOKAHEAD = 128

    def __init__(self, seed: int, limit: int | None = None) -> None:
        r = seed % (1 << 64)
        lo, hi = np.array([r & 0xFFFFFFFF, r >> 32], np.uint32)
        self.key = lowbias32(lowbias32(np.array([lo ^ np.uint32(HASH_SALT)], np.uint32)) ^ hi)
        self.position = 0  # of the next value handed out
        self.limit = limit
        self._ahead = np.zeros((0, 0), np.float32)  # positions self.position ... computed already

    def gumbel(self, size: tuple[int, int]) -> np.ndarray:
        steps, vocab_size = size
        if len(self._ahead) < steps or self._ahead.shape[1] != vocab_size:
            more = max(steps, self.LOOKAHEAD)
            if self.limit is not None:
                more = max(steps, min(more, self.limit - self.position))
            self._ahead = self._block(self.position, more, vocab_size)
        out, self._ahead = self._ahead[:steps], self._ahead[steps:]
        self.position += steps
        return out

    def _block(self, start: int, steps: int, vocab_size: int) -> np.ndarray:
        j = np.arange(start, start + steps, dtype=np.uint64).astype(np.uint32)
        h = lowbias32(lowbias32(self.key ^ j)[:, None] ^ np.arange(vocab_size, dtype=np.uint32))
        return gumbel_of_bits(h >> np.uint32(8))


def gumbel_of_bits(k: np.ndarray) -> np.ndarray:
    """``textgen.contract.gumbel_of_bits`` on an array of 24-bit integers -> float32."""
    u = k.astype(np.float64)
    u += 0.5
    u /= float(1 << 24)
    t = portable_log(u)
    np.negative(t, out=t)
    g = portable_log(t)
    return np.negative(g, out=g).astype(np.float32)


def portable_log(x: np.ndarray) -> np.ndarray:
    """``textgen.contract.portable_log`` elementwise: the same operations in the same order (numpy's
    float64 ufuncs round each one as IEEE-754 does; nothing is fused). In place where it can be."""
    m, e = np.frexp(x)
    low = m < SQRT_HALF
    m *= 1.0 + low  # times 2 where low: exact
    e = (e - low).astype(np.float64)
    s = m - 1.0
    m += 1.0
    s /= m
    z = s * s
    p = np.full_like(z, LOG_SERIES[0])
    for c in LOG_SERIES[1:]:
        p *= z
        p += c
    s *= 2.0  # r
    p *= z
    p *= s
    p += s
    e *= LN2
    e += p
    return e


class RowNoise:
    """The graph's ``sample_noise`` for a batch: one noise source per row (``row_rng``; None: a
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


def row_rng(seed: int | None, greedy: bool, noise: str = NOISE_HASH32, limit: int | None = None
            ) -> HashNoise | np.random.Generator | None:
    """A row's noise source of the algorithm ``noise``: None for a greedy row (it draws nothing),
    else seeded by ``seed`` (None: fresh entropy); ``limit``: the row's max_chars, if known."""
    if greedy:
        return None
    if noise == NOISE_PCG64:
        return np.random.default_rng(seed)
    return HashNoise(secrets.randbits(64) if seed is None else seed, limit)

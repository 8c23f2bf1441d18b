"""A generation request's parameters, checked once, for the Python API, the CLI and the HTTP service.

``SamplingParams`` (as vLLM's) holds everything a request asks for but its prompt and checks every
value in its constructor; the caps of whoever runs the request (a ``Generator``'s, a server's) come
in as ``Limits``. ``encode_prompt`` checks and encodes the prompt. Every refusal is a
``ParamError`` naming the fields at fault (``.field``, ``.fields``) with two phrasings of each
problem: ``str(error)`` for Python and the CLI, ``error.detail()`` for an HTTP body (``"top_p:
greater than 0, got 0"``, the wording of the type errors FastAPI reports for the same request).
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import InitVar, dataclass, field
from functools import cached_property
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from textgen.errors import TextgenError
from textgen.text import UNKNOWN_POLICIES, StopStrings, UnknownCharactersError, Vocab, VocabError

DEFAULT_MAX_CHARS = 500
DEFAULT_TEMPERATURE = 0.8  # below 1: fewer misspellings than the raw distribution, still varied
DEFAULT_TOP_K = 0  # off
DEFAULT_TOP_P = 1.0  # off
MAX_CHARS_CAP = 100_000  # per request; raise it with Generator(max_chars_cap=...)
MAX_PROMPT_CHARS = 100_000  # a longer prompt is a mistake more often than a wish
MAX_BATCH = 4096  # rows of one generate_batch call
# The graph's top_k input is int64; any top_k >= the vocabulary size keeps every character (as 0).
MAX_TOP_K_INT64 = 2**63 - 1
# A server's bounds beyond the Generator's (its requests are strangers' JSON).
MAX_TEMPERATURE = 100.0  # beyond it every character is equally likely anyway
MAX_TOP_K = 1_000_000
MAX_SEED = 2**63 - 1  # an int64: what JSON clients and the OpenAPI schema can carry
MAX_STOPS = 8  # stop strings per request
MAX_STOP_CHARS = 64  # characters per stop string


class Problem(NamedTuple):
    field: str
    message: str  # a sentence for Python and the CLI
    detail: str  # after "field: " in an HTTP error


class ParamError(TextgenError):
    """Request parameters refused: ``field`` is the first at fault, ``fields`` all of them."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        self.field = self.problems[0].field
        self.fields = list(dict.fromkeys(p.field for p in self.problems))
        super().__init__("; ".join(p.message for p in self.problems))

    @classmethod
    def of(cls, field: str, message: str, detail: str | None = None) -> ParamError:
        return cls([Problem(field, message, detail or message)])

    def detail(self) -> str:
        return "; ".join(f"{p.field}: {p.detail}" for p in self.problems)


@dataclass(frozen=True)
class Limits:
    """The caps of whoever runs a request, and how its messages tell the caller to raise them."""

    max_chars: int = MAX_CHARS_CAP
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_n: int = MAX_BATCH
    min_chars: int = 0  # a server refuses empty generations
    max_stops: int | None = None
    max_stop_chars: int | None = None
    max_temperature: float | None = None
    max_top_k: int = MAX_TOP_K_INT64
    max_seed: int | None = None
    # field -> how to get more ("raise it with ..."), appended to the refusal
    hints: Mapping[str, str] = field(default_factory=lambda: {
        "max_chars": "raise the cap with Generator(..., max_chars_cap=N)",
        "prompt": "shorten it (the model's memory is far shorter anyway), or raise the limit with "
                  "Generator(..., max_prompt_chars=N)",
    })

    @classmethod
    def server(cls, max_chars: int, max_prompt_chars: int, max_n: int) -> Limits:
        return cls(max_chars, max_prompt_chars, max_n, min_chars=1, max_stops=MAX_STOPS,
                   max_stop_chars=MAX_STOP_CHARS, max_temperature=MAX_TEMPERATURE, max_top_k=MAX_TOP_K,
                   max_seed=MAX_SEED, hints={"max_chars": "this server's cap is max_chars_cap",
                                             "n": "this server's limit is max_n",
                                             "prompt": "this server's limit is max_prompt_chars"})

    def stop_rule(self) -> str:
        """What a stop parameter may be, in one sentence."""
        if self.max_stops is None:
            return "must be a string or a list of strings, none of them empty"
        return (f"must be a string or a list of at most {self.max_stops} strings, each of 1 to "
                f"{self.max_stop_chars} characters")


GENERATOR_LIMITS = Limits()


@dataclass(frozen=True)
class SamplingParams:
    """One request's parameters but its prompt, checked: bad values raise ``ParamError``.

    max_chars: characters per sample; temperature: 0 = greedy; top_k: 0 = off; top_p: 1 = off;
    seed: fixes the text (sample i uses seed + i; None: fresh randomness); stop: strings that end a
    sample (not included); n: samples; unknown / replacement: the policy for prompt characters
    outside the vocabulary. ``limits``: the caps to check against (default: a Generator's)."""

    max_chars: int = DEFAULT_MAX_CHARS
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    n: int = 1
    unknown: str = "error"
    replacement: str = " "
    limits: InitVar[Limits | None] = None

    def __post_init__(self, limits: Limits | None) -> None:
        lim = limits or GENERATOR_LIMITS
        problems: list[Problem] = []
        for check in (_max_chars, _temperature, _top_k, _top_p, _seed, _stop, _n, _unknown, _replacement):
            problem = check(self, lim)
            if problem is not None:
                problems.append(problem)
        if problems:
            raise ParamError(problems)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "stop", self.stops.stops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @cached_property
    def stops(self) -> StopStrings:
        return StopStrings(self.stop)


# ---------------------------------------------------------------------------------------------
# The checks, one per field: None, or the problem


def shown(value: object) -> str:
    """A value as JSON, cut to 40 characters (for messages)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _num(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _out_of_range(name: str, value: Any, lo: float | None, hi: float | None, *, lo_open: bool = False,
                  rule: str, hint: str | None = None, label: str | None = None) -> Problem | None:
    """A range check: ``rule`` is the Python phrase ("at least 0", "in (0, 1]"); the HTTP detail
    names the bound that failed in JSON Schema words."""
    if lo is not None and (value <= lo if lo_open else value < lo):
        words = f"greater than {_num(lo)}" if lo_open else f"greater than or equal to {_num(lo)}"
    elif hi is not None and value > hi:
        words = f"less than or equal to {_num(hi)}"
    else:
        return None
    more = f" ({hint})" if hint else ""
    value_text = f"{value:,}" if isinstance(value, int) else repr(value)
    return Problem(name, f"{label or name} must be {rule}, got {value_text}{more}", f"{words}, got {shown(value)}{more}")


def _integer(name: str, value: object, label: str | None = None) -> Problem | None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return Problem(name, f"{label or name} must be an integer, got {type(value).__name__}: {value!r}",
                       f"must be an integer, got {shown(value)}")
    return None


def _real(name: str, value: object) -> Problem | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return Problem(name, f"{name} must be a number, got {type(value).__name__}: {value!r}",
                       f"must be a number, got {shown(value)}")
    if not math.isfinite(value):
        return Problem(name, f"{name} must be finite, got {value}", f"must be a finite number, got {value}")
    return None


def _max_chars(p: SamplingParams, lim: Limits) -> Problem | None:
    v = p.max_chars
    return _integer("max_chars", v) or _out_of_range(
        "max_chars", v, lim.min_chars, lim.max_chars, hint=lim.hints.get("max_chars") if v > lim.max_chars else None,
        rule=f"at least {lim.min_chars}" if v < lim.min_chars else f"at most {lim.max_chars:,}")


def _temperature(p: SamplingParams, lim: Limits) -> Problem | None:
    v = p.temperature
    return _real("temperature", v) or _out_of_range("temperature", v, 0, None, rule=">= 0 (0 = greedy)") or (
        _out_of_range("temperature", v, None, lim.max_temperature, rule=f"<= {lim.max_temperature}"))


def _top_k(p: SamplingParams, lim: Limits) -> Problem | None:
    v = p.top_k
    return _integer("top_k", v) or _out_of_range("top_k", v, 0, lim.max_top_k, rule=">= 0 (0 = off)" if v < 0
                                                 else f"<= {lim.max_top_k}")


def _top_p(p: SamplingParams, lim: Limits) -> Problem | None:
    v = p.top_p
    return _real("top_p", v) or _out_of_range("top_p", v, 0, 1, lo_open=True, rule="in (0, 1] (1 = off)")


def _seed(p: SamplingParams, lim: Limits) -> Problem | None:
    v = p.seed
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        return Problem("seed", f"seed must be an integer >= 0 or None, got {v!r}",
                       f"must be an integer or null, got {shown(v)}")
    return _out_of_range("seed", v, 0, lim.max_seed, rule="an integer >= 0 or None" if v < 0
                         else f"at most {lim.max_seed}")


def _stop(p: SamplingParams, lim: Limits) -> Problem | None:
    try:
        stops = p.stops
    except TextgenError as e:
        return Problem("stop", str(e), lim.stop_rule())
    if ((lim.max_stops is not None and len(stops.stops) > lim.max_stops)
            or (lim.max_stop_chars is not None and stops.longest > lim.max_stop_chars)):
        return Problem("stop", f"stop {lim.stop_rule()}", lim.stop_rule())
    return None


def _n(p: SamplingParams, lim: Limits) -> Problem | None:
    label = "the number of samples"
    return _integer("n", p.n, label) or _out_of_range(
        "n", p.n, 1, lim.max_n, rule="at least 1" if p.n < 1 else f"at most {lim.max_n:,}",
        hint=lim.hints.get("n"), label=label)


def _unknown(p: SamplingParams, lim: Limits) -> Problem | None:
    if p.unknown in UNKNOWN_POLICIES:
        return None
    choices = ", ".join(f"'{c}'" for c in UNKNOWN_POLICIES[:-1]) + f" or '{UNKNOWN_POLICIES[-1]}'"
    return Problem("unknown", f"unknown-character policy must be one of {', '.join(UNKNOWN_POLICIES)}, got "
                   f"{p.unknown!r}", f"must be {choices}, got {shown(p.unknown)}")


def _replacement(p: SamplingParams, lim: Limits) -> Problem | None:
    if isinstance(p.replacement, str) and len(p.replacement) == 1:
        return None
    return Problem("replacement", f"replacement must be one character, got {p.replacement!r}",
                   f"must be one character (at most 1 character), got {shown(p.replacement)}")


# ---------------------------------------------------------------------------------------------
# The prompt


def encode_prompt(prompt: object, params: SamplingParams, vocab: Vocab, lowercase: bool,
                  limits: Limits = GENERATOR_LIMITS) -> np.ndarray:
    """The ids (T,) int32 a prompt is fed as, T >= 0: checked against ``max_prompt_chars``,
    lowercased if the model is, unknown characters handled by ``params``' policy."""
    if not isinstance(prompt, str):
        raise ParamError.of("prompt", f"a prompt must be a string, got {type(prompt).__name__}: {prompt!r}",
                            f"must be a string, got {shown(prompt)}")
    cap = limits.max_prompt_chars
    if len(prompt) > cap:
        hint = limits.hints.get("prompt")
        raise ParamError.of(
            "prompt", f"the prompt has {len(prompt):,} characters, more than the limit of {cap:,}; {hint}",
            f"at most {cap} characters, got {shown(prompt)} ({hint})")
    try:
        return vocab.encode(prompt.lower() if lowercase else prompt, params.unknown, params.replacement, "prompt")
    except UnknownCharactersError as e:
        raise ParamError.of("prompt", str(e)) from None
    except VocabError as e:  # the policy is checked already: the replacement is not in the vocabulary
        raise ParamError.of("replacement", str(e)) from None


def check_count(name: str, value: object, minimum: int = 0) -> int:
    """An integer setting of a Generator (``chunk_size``, caps): at least ``minimum``."""
    problem = _integer(name, value) or _out_of_range(name, value, minimum, None, rule=f"at least {minimum}")
    if problem is not None:
        raise ParamError([problem])
    return operator.index(value)  # type: ignore[arg-type]

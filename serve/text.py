"""Text in and out of the model: the vocabulary, prompts, stop strings and corpus files; and, as
the most upstream module of serve/, the names every other module shares: ``GeneratorError`` and
the request defaults (re-exported by ``serve``). They live here rather than in ``serve/__init__``,
which imports every module, so that no import is circular.

The vocabulary comes from the ONNX metadata (``textgen.vocab``: the characters, index = id; 45 for
the bundled corpus). Reading corpus files repeats the few rules of ``textgen/corpus.py`` (serve/
must not import the training package): strict UTF-8, no byte-order mark, ``\\r\\n`` -> ``\\n``,
directories mean every ``*.txt`` below them (sorted), and several files are joined with a ``\\n``
after any file that does not end in one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# Request defaults, shared by the Python API and the CLI (and any front end that is added).
DEFAULT_MAX_CHARS = 500
DEFAULT_TEMPERATURE = 0.8  # below 1: fewer misspellings than the raw distribution, still varied
MAX_CHARS_CAP = 100_000  # per request; raise it with Generator(max_chars_cap=...)
UNKNOWN_POLICIES = ("error", "skip", "replace")


class GeneratorError(ValueError):
    """A bad model file, prompt or parameter. The message says what was wrong and what to do."""


class UnknownCharactersError(GeneratorError):
    def __init__(self, unknown: Iterable[str], vocab_size: int, what: str = "prompt") -> None:
        self.unknown = sorted(set(unknown))
        shown = ", ".join(repr(c) for c in self.unknown[:20])
        more = f" and {len(self.unknown) - 20} more" if len(self.unknown) > 20 else ""
        super().__init__(
            f"unknown characters in {what}: {shown}{more} (model vocabulary: {vocab_size} chars); "
            "remove them, or choose the unknown-character policy 'skip' or 'replace' "
            "(unknown=... in Python, --unknown on the command line)"
        )


class Vocabulary:
    """Characters <-> int32 ids, with an explicit policy for characters the model never saw."""

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = tuple(chars)
        if len(self.chars) < 2 or any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            raise GeneratorError("the vocabulary must hold two or more single characters")
        if len(set(self.chars)) != len(self.chars):
            raise GeneratorError("the vocabulary has duplicate characters")
        self.index = {c: i for i, c in enumerate(self.chars)}
        # Code point -> id (-1: unknown); turns a whole corpus into ids in one numpy gather.
        self._table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int32)
        self._table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)

    @property
    def size(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: object) -> bool:
        return ch in self.index

    def encode(self, text: str, unknown: str = "error", replacement: str = " ", what: str = "prompt") -> np.ndarray:
        """Text -> ids, shape (len,) int32. ``unknown``: "error" (raise, naming the characters),
        "skip" (drop them) or "replace" (by ``replacement``, which must be in the vocabulary)."""
        return self.encode_counting(text, unknown, replacement, what)[0]

    def encode_counting(
        self, text: str, unknown: str = "error", replacement: str = " ", what: str = "prompt"
    ) -> tuple[np.ndarray, int]:
        """``encode`` that also returns how many characters were unknown (skipped or replaced)."""
        if unknown not in UNKNOWN_POLICIES:
            raise GeneratorError(
                f"unknown-character policy must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}"
            )
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.full(codes.shape, -1, dtype=np.int32)
        inside = codes < len(self._table)
        ids[inside] = self._table[codes[inside]]
        missing = ids < 0
        n_unknown = int(missing.sum())
        if n_unknown:
            if unknown == "error":
                raise UnknownCharactersError({chr(c) for c in codes[missing]}, self.size, what)
            if unknown == "skip":
                ids = ids[~missing]
            else:
                if not isinstance(replacement, str) or replacement not in self.index:
                    raise GeneratorError(
                        f"replacement character {replacement!r} is not in the model vocabulary "
                        f"({self.size} chars); choose one of {''.join(self.chars)!r}"
                    )
                ids[missing] = self.index[replacement]
        return ids, n_unknown

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[i] for i in ids)


class StopStrings:
    """Ends a stream when its text ends with one of the stop strings; the stop string itself is not
    part of the output. ``push`` returns the characters that are safe to release: a tail that could
    still become a stop string is held back until it cannot (and released by ``flush``)."""

    def __init__(self, stop: str | Sequence[str] | None) -> None:
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = tuple(stop)
        else:
            raise GeneratorError(
                f"stop must be a string or a list of strings, got {type(stop).__name__}: {stop!r}"
            )
        if any(s == "" for s in stops):
            raise GeneratorError("stop strings must not be empty")
        self.stops = stops
        self.last_chars = frozenset(s[-1] for s in stops)
        # Every proper prefix of a stop string: a tail equal to one of them is held back.
        self.prefixes = frozenset(s[:i] for s in stops for i in range(1, len(s)))
        self.longest = max(map(len, stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find_first(self, text: str) -> tuple[int, int] | None:
        """(end, length) of the first place where ``text[:end]`` ends with a stop string (there,
        the first one in the list, as ``StopStream``), or None. For the generated text a chunk
        at a time: pass the new characters after the last ``longest - 1`` old ones."""
        best = None
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (best is None or i + len(s) < best[0]):
                best = (i + len(s), len(s))
        return best

    def held_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string: what
        must be held back because it may still become one (0: release everything)."""
        for k in range(min(len(text), self.longest - 1), 0, -1):
            if text[-k:] in self.prefixes:
                return k
        return 0

    def stream(self) -> StopStream:
        return StopStream(self)


class StopStream:
    """The state of ``StopStrings`` for one stream (one row of a batch)."""

    __slots__ = ("stops", "held", "stopped")

    def __init__(self, stops: StopStrings) -> None:
        self.stops = stops
        self.held = ""  # characters not yet released (a possible start of a stop string)
        self.stopped = False

    def push(self, ch: str) -> str:
        """Add one generated character; return what may be released now ("" while held back)."""
        stops = self.stops
        if not stops.stops:
            return ch
        held = self.held + ch
        if ch in stops.last_chars:
            for s in stops.stops:
                if held.endswith(s):
                    self.stopped = True
                    self.held = ""
                    return held[: len(held) - len(s)]
        k = stops.held_tail(held)
        self.held = held[len(held) - k :]
        return held[: len(held) - k]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


# ---------------------------------------------------------------------------------------------
# Corpus files (for ``textgen eval``, and for training through ``textgen.corpus``)


def corpus_files(paths: Sequence[str | Path], error: type[Exception] = GeneratorError) -> list[Path]:
    """Files and directories (every ``*.txt`` below, sorted) -> the list of files, in order.

    Shared with training (``textgen.corpus``), which passes its own ``error`` class."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not found:
                raise error(f"corpus directory {p} has no *.txt files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise error(f"corpus path {p} is neither a file nor a directory")
        else:
            raise error(f"corpus path {p} does not exist")
    if not files:
        raise error("no corpus given; pass one or more text files or directories")
    return files


def read_corpus(paths: Sequence[str | Path], lowercase: bool) -> str:
    """Read and join the corpus exactly as training did (see the module docstring)."""
    files = corpus_files(paths)
    parts = []
    for f in files:
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GeneratorError(
                f"{f} is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} is invalid; "
                f"convert the file, e.g. iconv -f latin1 -t utf-8 {f}"
            ) from None
        text = text.removeprefix("\ufeff").replace("\r\n", "\n")
        if text and not text.endswith("\n") and len(files) > 1:
            text += "\n"
        parts.append(text)
    text = "".join(parts)
    return text.lower() if lowercase else text

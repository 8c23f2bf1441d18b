"""The text rules every layer shares: the vocabulary, reading a corpus, the held-out split and stop
strings. numpy only: training, export, evaluation and generation all import this one module.

Vocabulary: the sorted distinct characters of the corpus, as in the notebook (45 for the bundled
corpus, lowercased); index = id. Characters outside it have an explicit policy: ``error`` (the
message names them), ``skip`` (drop them) or ``replace`` (by a replacement in the vocabulary).

Corpus: strict UTF-8 files; a byte-order mark is dropped and ``\\r\\n`` becomes ``\\n``; a directory
means every ``*.txt`` below it, sorted (one that links to a file outside the directory is refused);
several files are joined with a ``\\n`` after any that does not end in one; lowercased unless asked
not to. The held-out part is the contiguous tail
(``val_fraction`` of the characters): for the bundled corpus 144,431 characters, of which the last
14,443 are held out. Training reads corpora prepared by ``textgen.prepare``, which applies these
rules while streaming (and holds out the tail of every file: for one file, this same tail).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from textgen.errors import TextgenError

BUNDLED_CORPUS = "alice_in_wonderland.txt"
UNKNOWN_POLICIES = ("error", "skip", "replace")
VOCAB_FORMAT_VERSION = 1


class VocabError(TextgenError):
    pass


class CorpusError(TextgenError):
    pass


class UnknownCharactersError(VocabError):
    def __init__(self, unknown: Iterable[str], vocab_size: int, what: str = "text") -> None:
        self.unknown = sorted(set(unknown))
        shown = ", ".join(repr(c) for c in self.unknown[:20])
        more = f" and {len(self.unknown) - 20} more" if len(self.unknown) > 20 else ""
        super().__init__(
            f"unknown characters in {what}: {shown}{more} (model vocabulary: {vocab_size} chars); remove "
            'them, or choose the unknown-character policy "skip" or "replace" (unknown="skip" in Python, '
            '--unknown skip on the command line, "unknown": "skip" in an HTTP request)'
        )


# ---------------------------------------------------------------------------------------------
# Vocabulary


@dataclass(frozen=True)
class Vocab:
    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        chars = tuple(self.chars)
        object.__setattr__(self, "chars", chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise VocabError("vocabulary entries must be single characters")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in chars):
            raise VocabError("vocabulary entries must be characters, not UTF-16 surrogates")
        if len(set(chars)) != len(chars):
            raise VocabError("vocabulary has duplicate characters")
        if list(chars) != sorted(chars):
            raise VocabError("vocabulary characters must be sorted")
        if len(chars) < 2:
            raise VocabError(
                f"a vocabulary of {len(chars)} character(s) has nothing to learn; "
                "the corpus needs at least two distinct characters"
            )
        table = np.full(max(map(ord, chars)) + 1, -1, dtype=np.int32)  # code point -> id, -1 unknown
        table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.int32)
        object.__setattr__(self, "index", {c: i for i, c in enumerate(chars)})
        object.__setattr__(self, "_table", table)

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(tuple(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: object) -> bool:
        return ch in self.index  # type: ignore[attr-defined]

    def encode(self, text: str, unknown: str = "error", replacement: str = " ", what: str = "text") -> np.ndarray:
        """Text -> int32 ids of shape (len,). See the module docstring for ``unknown``."""
        return self.encode_counting(text, unknown, replacement, what)[0]

    def encode_counting(
        self, text: str, unknown: str = "error", replacement: str = " ", what: str = "text"
    ) -> tuple[np.ndarray, int]:
        """``encode`` that also returns how many characters were unknown (skipped or replaced)."""
        if unknown not in UNKNOWN_POLICIES:
            raise VocabError(
                f"unknown-character policy must be one of {', '.join(UNKNOWN_POLICIES)}, got {unknown!r}"
            )
        table: np.ndarray = self._table  # type: ignore[attr-defined]
        # One gather over code points: ~50x faster than a Python loop for a 144k-char corpus.
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        ids = np.full(codes.shape, -1, dtype=np.int32)
        inside = codes < len(table)
        ids[inside] = table[codes[inside]]
        missing = ids < 0
        n_unknown = int(missing.sum())
        if n_unknown:
            if unknown == "error":
                raise UnknownCharactersError({chr(c) for c in codes[missing]}, self.size, what)
            if unknown == "skip":
                ids = ids[~missing]
            else:
                if not isinstance(replacement, str) or replacement not in self:
                    raise VocabError(
                        f"replacement character {replacement!r} is not in the model vocabulary "
                        f"({self.size} chars); choose one of {''.join(self.chars)!r}"
                    )
                ids[missing] = self.index[replacement]  # type: ignore[attr-defined]
        return ids, n_unknown

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join([chars[int(i)] for i in ids])

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": VOCAB_FORMAT_VERSION, "chars": list(self.chars)}

    @classmethod
    def from_dict(cls, d: Any) -> Vocab:
        if not isinstance(d, dict) or not isinstance(d.get("chars"), list):
            raise VocabError("vocabulary JSON must be an object with a 'chars' list")
        if d.get("format_version", VOCAB_FORMAT_VERSION) != VOCAB_FORMAT_VERSION:
            raise VocabError(f"unsupported vocabulary format_version {d.get('format_version')!r}")
        return cls(tuple(d["chars"]))


# ---------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class Corpus:
    text: str
    files: tuple[str, ...]


def bundled_corpus_path() -> Path:
    return Path(str(resources.files("textgen") / "data" / BUNDLED_CORPUS))


def corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files and directories (every ``*.txt`` below, sorted) -> the list of files, in order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            _refuse_outside(p, found)
            if not found:
                raise CorpusError(f"corpus directory {p} has no *.txt files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise CorpusError(f"corpus path {p} is neither a file nor a directory")
        else:
            raise CorpusError(f"corpus path {p} does not exist")
    if not files:
        raise CorpusError("no corpus given; pass one or more text files or directories")
    return files


def _refuse_outside(directory: Path, found: list[Path]) -> None:
    """A file below a corpus directory whose resolved path is outside it (through a symbolic link
    to a file or a directory) is refused: a directory means its own files, never ``/etc/passwd``."""
    root = directory.resolve()
    for f in found:
        target = f.resolve()
        if not target.is_relative_to(root):
            raise CorpusError(
                f"corpus directory {directory}: {f} is a link to {target}, outside the directory; "
                "remove the link, or pass that file by its own path if you mean to train on it"
            )


def not_utf8(path: Path, byte: int, offset: int, line: int, col: int) -> CorpusError:
    """The error for a byte that is not UTF-8, where it is (1-based line and column, in bytes)."""
    return CorpusError(
        f"{path} is not UTF-8: byte 0x{byte:02x} at offset {offset} (line {line}, "
        f"column {col}) is invalid; convert the file, e.g. iconv -f latin1 -t utf-8 {path}"
    )


def read_text(path: Path) -> str:
    """One corpus file, strictly UTF-8 (the error says where a bad byte is)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise not_utf8(path, data[e.start], e.start, line, col) from None
    # A byte-order mark and Windows line ends are encoding details, not characters to learn.
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def read_corpus(paths: Sequence[str | Path] | None, lowercase: bool = True) -> Corpus:
    """Read and join the corpus files (the bundled corpus when ``paths`` is empty)."""
    files = corpus_files(paths) if paths else [bundled_corpus_path()]
    parts = []
    for f in files:
        t = read_text(f)
        if t and not t.endswith("\n") and len(files) > 1:
            t += "\n"
        parts.append(t)
    text = "".join(parts)
    return Corpus(text.lower() if lowercase else text, tuple(map(str, files)))


def load_corpus(paths: Sequence[str | Path] | None = None, lowercase: bool = True) -> Corpus:
    """``read_corpus``, refusing a corpus with nothing to learn (empty, or one character)."""
    corpus = read_corpus(paths, lowercase)
    refuse_nothing_to_learn(set(corpus.text), corpus.files)
    return corpus


def refuse_nothing_to_learn(chars: set[str], files: Sequence[str]) -> None:
    """A corpus whose distinct characters are all whitespace (empty), or only one, is refused."""
    if all(c.isspace() for c in chars):
        raise CorpusError(f"corpus is empty: {', '.join(files)} holds no text")
    if len(chars) < 2:
        raise CorpusError(f"corpus has a vocabulary of one character ({min(chars)!r}); there is nothing to learn")


# ---------------------------------------------------------------------------------------------
# The held-out split


def held_out_length(n: int, val_fraction: float) -> int:
    """Characters of the held-out tail of an n-character corpus."""
    return int(round(n * val_fraction))


def eval_ids(paths: Sequence[str | Path] | None, vocab: Vocab, lowercase: bool, val_fraction: float | None,
             seq_len: int) -> tuple[np.ndarray, int]:
    """The ids ``textgen eval`` scores (with or without ``--dynamic``): the corpus read as training
    read it, characters outside the vocabulary skipped, then the held-out tail (``val_fraction`` of
    the ids; None: all of them). At least one window of seq_len + 1. Returns (ids, skipped)."""
    text = read_corpus(paths, lowercase=lowercase).text
    ids, skipped = vocab.encode_counting(text, unknown="skip", what="corpus")
    if val_fraction is not None:
        ids = ids[len(ids) - held_out_length(len(ids), val_fraction) :]
    if len(ids) < seq_len + 1:
        what = "held-out tail" if val_fraction is not None else "text"
        raise CorpusError(
            f"the {what} has {len(ids)} known characters, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1}; give a longer corpus"
        )
    return ids, skipped


def split_ids(ids: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Split into a training head and a contiguous validation tail; no window crosses the boundary
    because each part is windowed on its own. Both parts must hold at least one window."""
    n_val = check_split_sizes(len(ids), held_out_length(len(ids), val_fraction), val_fraction, seq_len)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def check_split_sizes(n: int, n_val: int, val_fraction: float, seq_len: int) -> int:
    """Both parts of an n-character corpus with an n_val-character held-out part must hold at
    least one window; returns n_val."""
    window = seq_len + 1
    if n < 2 * window:
        raise CorpusError(
            f"corpus has {n} characters, shorter than two windows of seq_len+1 = {window}; "
            "use more text or a smaller --seq-len"
        )
    if n_val < window:
        raise CorpusError(
            f"the validation tail ({val_fraction:.0%} of {n} = {n_val} characters) is shorter than one "
            f"window of {window}; use more text, a larger --val-fraction or a smaller --seq-len"
        )
    if n - n_val < window:
        raise CorpusError(
            f"the training part ({n - n_val} characters) is shorter than one window of {window}; "
            "use more text or a smaller --val-fraction"
        )
    return n_val


# ---------------------------------------------------------------------------------------------
# Stop strings


class StopStrings:
    """Ends a stream when its text ends with one of the stop strings; the stop string itself is not
    part of the output. A tail that could still become a stop string is held back until it cannot
    (``held_tail``)."""

    def __init__(self, stop: str | Sequence[str] | None) -> None:
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
            stops = tuple(stop)
        else:
            raise TextgenError(f"stop must be a string or a list of strings, got {type(stop).__name__}: {stop!r}")
        if any(s == "" for s in stops):
            raise TextgenError("stop strings must not be empty")
        self.stops = stops
        self.last_chars = frozenset(s[-1] for s in stops)
        # Every proper prefix of a stop string: a tail equal to one of them is held back.
        self.prefixes = frozenset(s[:i] for s in stops for i in range(1, len(s)))
        self.longest = max(map(len, stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find_first(self, text: str) -> tuple[int, int] | None:
        """(end, length) of the first place where ``text[:end]`` ends with a stop string (there,
        the first one in the list), or None. For text that grows a chunk at a time: pass the new
        characters after the last ``longest - 1`` old ones."""
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

"""Corpus: read UTF-8 text from files or directories, and split it into train and validation.

For the bundled corpus (Alice's Adventures in Wonderland, public domain): 144,431 characters,
45 distinct once lowercased; the validation tail (10%) is the last 14,443 characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from serve.text import corpus_files as _corpus_files
from textgen.errors import TextgenError

BUNDLED_CORPUS = "alice_in_wonderland.txt"


class CorpusError(TextgenError):
    pass


@dataclass(frozen=True)
class Corpus:
    text: str
    files: tuple[str, ...]


def bundled_corpus_path() -> Path:
    return Path(str(resources.files("textgen") / "data" / BUNDLED_CORPUS))


def corpus_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and directories (every *.txt below a directory, sorted) into a list of files."""
    return _corpus_files(paths, CorpusError)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise CorpusError(
            f"{path} is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}, "
            f"column {col}) is invalid; convert the file, e.g. iconv -f latin1 -t utf-8 {path}"
        ) from None
    # A byte-order mark and Windows line ends are encoding details, not characters to learn.
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def load_corpus(paths: Sequence[str | Path] | None = None, lowercase: bool = True) -> Corpus:
    """Read and join the corpus files (the bundled corpus when ``paths`` is empty)."""
    files = corpus_files(paths) if paths else [bundled_corpus_path()]
    parts = []
    for f in files:
        t = read_text(f)
        if t and not t.endswith("\n") and len(files) > 1:
            t += "\n"
        parts.append(t)
    text = "".join(parts)
    if lowercase:
        text = text.lower()
    if not text.strip():
        raise CorpusError(f"corpus is empty: {', '.join(map(str, files))} holds no text")
    if len(set(text)) < 2:
        raise CorpusError(
            f"corpus has a vocabulary of one character ({text[0]!r}); there is nothing to learn"
        )
    return Corpus(text, tuple(map(str, files)))


def split_ids(ids: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Split into a training head and a contiguous validation tail; no window crosses the boundary
    because each part is windowed on its own. Both parts must hold at least one window."""
    window = seq_len + 1
    n = len(ids)
    if n < 2 * window:
        raise CorpusError(
            f"corpus has {n} characters, shorter than two windows of seq_len+1 = {window}; "
            "use more text or a smaller --seq-len"
        )
    n_val = int(round(n * val_fraction))
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
    return ids[: n - n_val], ids[n - n_val :]

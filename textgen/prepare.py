"""``textgen prepare``: a corpus encoded once into flat binary shards of character ids.

Two streaming passes over the files, each in blocks of ``BLOCK`` bytes (memory does not grow with
the corpus): the first checks UTF-8 (strictly, with the byte offset, line and column of a bad byte,
as ``textgen.text.read_text``), hashes each file and counts its characters; the second encodes them
and writes the shards. The text rules are ``textgen.text``'s: a byte-order mark is dropped, ``\\r\\n``
becomes ``\\n``, several files are joined with a ``\\n`` after any that does not end in one, and the
text is lowercased unless asked not to; the bundled corpus prepares to exactly the ids training used
when it read the corpus into memory.

The directory (``dataset.json`` describes it)::

    dataset.json        format_version, vocabulary, character counts, lowercasing, the unknown
                        mapping, the split rule and sizes, the shards, the source files, fingerprint
    train-00000.bin     ids, uint8 (vocabulary <= 256) or uint16, at most --shard-mb each
    val-00000.bin       the held-out ids, in shards of their own

Vocabulary: the sorted distinct characters, as ``Vocab.from_text``. With ``max_vocab`` and/or
``min_count`` only the most frequent characters are kept (at least ``min_count`` occurrences, at most
``max_vocab - 1`` of them) and every other character becomes ONE unknown id: the id of ``UNKNOWN``
(U+FFFD), added to the vocabulary; ``dataset.json`` says how many characters were mapped and which.
A corpus of which more than ``MAX_UNKNOWN_FRACTION`` would be unknown is refused. With
``base_vocab`` (the vocabulary of a checkpoint to fine-tune, ``textgen train --init-from``) the
vocabulary is the union of those characters and the corpus' own (chosen as above): a base character
is never mapped to the unknown one, whether or not the corpus holds it, so the shards are written in
the ids of the model being fine-tuned, extended by the corpus' new characters.

Held-out split: the tail ``val_fraction`` of every file (``held_out_length`` of its characters,
the joining newline included). For one file that is the tail of the corpus, as before; for many it
keeps every file's beginning in training and its end held out. Training windows are cut per shard,
so no window crosses a split or a shard boundary.

Written to a temporary sibling directory and renamed into place; a disk that fills up removes it.
Run again with unchanged sources (path, size, mtime) and options, the directory is reused (unless
``--force``; a shard missing or of the wrong size prepares it again).
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from textgen.errors import TextgenError
from textgen.files import fsync_dir, temp_sibling
from textgen.text import (
    Vocab,
    bundled_corpus_path,
    corpus_files,
    held_out_length,
    not_utf8,
    refuse_nothing_to_learn,
)

FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
UNKNOWN = "\ufffd"  # the one character every dropped character is mapped to
MAX_UNKNOWN_FRACTION = 0.5
BLOCK = 8 << 20  # bytes read at a time
SPLITS = ("train", "val")


class PrepareError(TextgenError):
    pass


@dataclass(frozen=True)
class PrepareOptions:
    lowercase: bool = True
    val_fraction: float = 0.1
    max_vocab: int | None = None  # at most this many characters, the unknown one included
    min_count: int = 1  # keep characters seen at least this often
    shard_mb: float = 64.0
    base_vocab: tuple[str, ...] = ()  # characters the vocabulary keeps in any case (sorted; --init-from)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_vocab", tuple(sorted(set(self.base_vocab))))
        if any(not isinstance(c, str) or len(c) != 1 for c in self.base_vocab):
            raise PrepareError("base_vocab entries must be single characters")
        if not 0.0 < self.val_fraction < 0.5:
            raise PrepareError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.max_vocab is not None and self.max_vocab < 3:
            raise PrepareError(f"--max-vocab must be at least 3 (two characters and the unknown), got {self.max_vocab}")
        if self.min_count < 1:
            raise PrepareError(f"--min-count must be at least 1, got {self.min_count}")
        if not self.shard_mb > 0:
            raise PrepareError(f"--shard-mb must be positive, got {self.shard_mb}")


# ---------------------------------------------------------------------------------------------
# Streaming reading


class _Utf8Stream:
    """Strict incremental UTF-8 decoding of one file that says where a bad byte is (the line and
    column are counted only then, from the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.offset = 0  # bytes decoded before the next chunk

    def decode(self, chunk: bytes, final: bool) -> str:
        pending = self.decoder.getstate()[0]
        try:
            text = self.decoder.decode(chunk, final)
        except UnicodeDecodeError as e:
            buf = pending + chunk
            raise self._where(buf[e.start], self.offset - len(pending) + e.start) from None
        self.offset += len(chunk)
        return text

    def _where(self, byte: int, offset: int) -> TextgenError:
        lines, last_nl, pos = 0, -1, 0
        with open(self.path, "rb") as f:
            while pos < offset:
                block = f.read(min(BLOCK, offset - pos))
                lines += block.count(b"\n")
                nl = block.rfind(b"\n")
                last_nl = pos + nl if nl >= 0 else last_nl
                pos += len(block)
        return not_utf8(self.path, byte, offset, lines + 1, offset - last_nl)


def _cut(text: str, block: int) -> int:
    """Where to end this piece: after its last newline, else (a line longer than a block) after its
    last space or tab, else nowhere yet (a short text), so that ``\\r\\n`` and lowercasing (a final sigma) never see a piece boundary
    inside a word; a word longer than a block is cut before a trailing ``\\r``."""
    for cut in (text.rfind("\n") + 1, max(text.rfind(" "), text.rfind("\t")) + 1):
        if cut and len(text) - cut <= block:
            return cut
    if len(text) <= block:  # no newline or space yet: wait for the rest of the word
        return 0
    return len(text) - text.endswith("\r")


# The only characters whose ``str.lower`` is not one character of its own: U+0130 (two characters)
# and U+03A3 (a final sigma depends on its neighbours). A piece without them is lowercased one
# character at a time, through the id table, instead of by ``str.lower``.
CONTEXTUAL_LOWER = ("\u0130", "\u03a3")


def read_pieces(path: Path, lowercase: bool, on_bytes: Callable[[bytes], None] | None = None,
                block: int | None = None) -> Iterator[str]:
    """The normalised text of one file in pieces of about ``block`` characters or fewer."""
    for piece, later in _pieces(path, lowercase, on_bytes, block):
        yield piece.lower() if later else piece


def _lowered(text: str, lowercase: bool) -> tuple[str, bool]:
    """(text, whether it is still to be lowercased one character at a time)."""
    if not lowercase:
        return text, False
    if any(c in text for c in CONTEXTUAL_LOWER):
        return text.lower(), False
    return text, True


def _pieces(path: Path, lowercase: bool, on_bytes: Callable[[bytes], None] | None,
            block: int | None) -> Iterator[tuple[str, bool]]:
    stream, carry, first, block = _Utf8Stream(path), "", True, block or BLOCK
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            if on_bytes is not None and chunk:
                on_bytes(chunk)
            text = carry + stream.decode(chunk, final=not chunk)
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            cut = _cut(text, block) if chunk else len(text)
            text, carry = text[:cut], text[cut:]
            if text:
                yield _lowered(text.replace("\r\n", "\n") if "\r" in text else text, lowercase)
            if not chunk:
                return


def corpus_pieces(files: Sequence[Path], lowercase: bool, on_bytes=None) -> Iterator[tuple[int, str, bool]]:
    """(file index, piece, whether it is still to be lowercased one character at a time) over every
    file, with the joining newline of ``textgen.text.read_corpus``."""
    for i, f in enumerate(files):
        last = ""
        for piece, later in _pieces(f, lowercase, None if on_bytes is None else on_bytes(i), None):
            last = piece[-1]
            yield i, piece, later
        if last and last != "\n" and len(files) > 1:
            yield i, "\n", False


def code_points(piece: str) -> np.ndarray:
    if piece.isascii():  # known without a scan; encoding it is a copy
        return np.frombuffer(piece.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(piece.encode("utf-32-le"), dtype=np.uint32)


# ---------------------------------------------------------------------------------------------
# Pass 1: sizes, hashes, character counts


@dataclass
class Census:
    files: list[Path]
    sha256: list[str]
    chars: list[int]  # characters per file, after normalisation
    counts: dict[str, int]  # character -> occurrences
    later: list[str]  # characters of the pieces lowercased one character at a time (not yet lowered)

    @property
    def total(self) -> int:
        return sum(self.chars)


def _bincount_into(counts: dict[int, int], codes: np.ndarray) -> None:
    bins = np.bincount(codes)
    for code in np.flatnonzero(bins):
        counts[int(code)] = counts.get(int(code), 0) + int(bins[code])


def census(files: Sequence[Path], lowercase: bool, progress: Callable[[int], None]) -> Census:
    hashes = [hashlib.sha256() for _ in files]

    def on_bytes(i: int):
        def update(chunk: bytes) -> None:
            hashes[i].update(chunk)
            progress(len(chunk))
        return update

    chars, counts, raw = [0] * len(files), {}, {}
    for i, piece, later in corpus_pieces(files, lowercase, on_bytes):
        chars[i] += len(piece)
        _bincount_into(raw if later else counts, code_points(piece))
    by_char: dict[str, int] = {}
    for c, n in [*((chr(c), n) for c, n in counts.items()), *((chr(c).lower(), n) for c, n in raw.items())]:
        by_char[c] = by_char.get(c, 0) + n
    return Census(list(files), [h.hexdigest() for h in hashes], chars, dict(sorted(by_char.items())),
                  [chr(c) for c in sorted(raw)])


# ---------------------------------------------------------------------------------------------
# The vocabulary and the unknown mapping


def choose_vocab(counts: dict[str, int], opts: PrepareOptions, files: Sequence[str]) -> tuple[Vocab, list[str]]:
    """The vocabulary and the characters mapped to ``UNKNOWN`` (sorted; empty when none is)."""
    refuse_nothing_to_learn(set(counts), files)
    by_freq = sorted(counts, key=lambda c: (-counts[c], c))
    kept = [c for c in by_freq if counts[c] >= opts.min_count]
    if opts.max_vocab is not None:  # the unknown character takes one place when any is dropped
        room = opts.max_vocab if len(kept) == len(counts) else opts.max_vocab - 1
        if len(kept) > room:
            kept = kept[: opts.max_vocab - 1]
    base = set(opts.base_vocab)
    dropped = sorted(set(counts) - set(kept) - base)
    if not dropped:
        return Vocab(tuple(sorted(set(counts) | base))), []
    unknown = sum(counts[c] for c in dropped)
    total = sum(counts.values())
    if unknown > MAX_UNKNOWN_FRACTION * total:
        raise PrepareError(
            f"{unknown:,} of {total:,} characters ({unknown / total:.0%}) would map to the unknown character "
            f"under --max-vocab {opts.max_vocab} / --min-count {opts.min_count}: more than "
            f"{MAX_UNKNOWN_FRACTION:.0%}; raise --max-vocab or lower --min-count"
        )
    return Vocab(tuple(sorted(set(kept) | base | {UNKNOWN}))), dropped


def id_table(vocab: Vocab, chars: Sequence[str], lower: bool = False) -> np.ndarray:
    """Code point -> id for each of ``chars`` (of its lowercase with ``lower``); dropped
    characters -> the unknown id."""
    table = np.zeros(max(map(ord, chars), default=0) + 1, dtype=id_dtype(vocab.size))
    unknown = vocab.index.get(UNKNOWN, 0)  # type: ignore[attr-defined]
    for c in chars:
        table[ord(c)] = vocab.index.get(c.lower() if lower else c, unknown)  # type: ignore[attr-defined]
    return table


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


# ---------------------------------------------------------------------------------------------
# Pass 2: shards


class ShardWriter:
    """Ids of one split into files of at most ``max_bytes``, hashing as it writes."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, max_bytes: int) -> None:
        self.directory, self.split, self.dtype = directory, split, dtype
        self.capacity = max(1, max_bytes // dtype.itemsize)  # ids per shard
        self.shards: list[dict[str, Any]] = []
        self.file, self.hash, self.filled = None, None, 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file, self.hash, self.filled = open(self.directory / name, "wb"), hashlib.sha256(), 0
        self.shards.append({"file": name, "split": self.split})

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None:
                self._open()
            part, ids = ids[: self.capacity - self.filled], ids[self.capacity - self.filled:]
            data = part.tobytes()
            self.file.write(data)
            self.hash.update(data)
            self.filled += len(part)
            if self.filled == self.capacity:
                self.close()

    def close(self) -> list[dict[str, Any]]:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.shards[-1].update(characters=self.filled, bytes=self.filled * self.dtype.itemsize,
                                   sha256=self.hash.hexdigest())
            self.file = None
        return self.shards


def write_shards(directory: Path, c: Census, vocab: Vocab, opts: PrepareOptions,
                 progress: Callable[[int], None]) -> list[dict[str, Any]]:
    """Pass 2: every file's head into train shards, its held-out tail into val shards."""
    max_bytes = int(opts.shard_mb * (1 << 20))
    tables = {False: id_table(vocab, list(c.counts)), True: id_table(vocab, c.later, lower=True)}
    writers = {s: ShardWriter(directory, s, tables[False].dtype, max_bytes) for s in SPLITS}
    try:
        pos, current = 0, -1
        for i, piece, later in corpus_pieces(c.files, opts.lowercase, lambda i: progress):
            if i != current:
                pos, current = 0, i
                head = c.chars[i] - held_out_length(c.chars[i], opts.val_fraction)
            ids = tables[later][code_points(piece)]
            cut = min(max(head - pos, 0), len(ids))
            writers["train"].write(ids[:cut])
            writers["val"].write(ids[cut:])
            pos += len(ids)
    finally:
        shards = [sh for s in SPLITS for sh in writers[s].close()]
    return shards


# ---------------------------------------------------------------------------------------------
# The whole command


def fingerprint(files: Sequence[Path], opts: PrepareOptions) -> str:
    """What decides reuse: every source's resolved path, size and mtime, and the options."""
    sources = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    options = asdict(opts)
    if not options["base_vocab"]:  # as before there was one: caches prepared then are still reused
        del options["base_vocab"]
    key = json.dumps({"format_version": FORMAT_VERSION, "sources": sources, "options": options})
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def resolve_sources(corpus: Sequence[str | Path] | None) -> list[Path]:
    return corpus_files(corpus) if corpus else [bundled_corpus_path()]


def _progress_bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, none in logs.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1 << 20, file=sys.stderr,
                disable=None if progress else True, mininterval=0.5, leave=False)


def _describe(c: Census, vocab: Vocab, dropped: list[str], opts: PrepareOptions, shards, fp: str) -> dict:
    sizes = {s: sum(sh["characters"] for sh in shards if sh["split"] == s) for s in SPLITS}
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "vocab": vocab.to_dict(),
        "dtype": id_dtype(vocab.size).name,
        "lowercase": opts.lowercase,
        "char_counts": c.counts,
        "characters": c.total,
        "unknown": {"char": UNKNOWN if dropped else None, "id": vocab.index.get(UNKNOWN) if dropped else None,
                    "mapped_chars": dropped, "mapped_count": sum(c.counts[ch] for ch in dropped),
                    "max_vocab": opts.max_vocab, "min_count": opts.min_count},
        "base_vocab": list(opts.base_vocab),
        "split": {"rule": "tail val_fraction of every file", "val_fraction": opts.val_fraction,
                  "train_characters": sizes["train"], "val_characters": sizes["val"]},
        "shard_mb": opts.shard_mb,
        "shards": shards,
        "sources": [{"path": str(f.resolve()), "size": f.stat().st_size, "sha256": h, "characters": n}
                    for f, h, n in zip(c.files, c.sha256, c.chars)],
    }


def existing_fingerprint(out: Path) -> str | None:
    """The fingerprint of the dataset in ``out`` if it is complete (every shard there, of its size)."""
    try:
        meta = json.loads((out / DATASET_JSON).read_text(encoding="utf-8"))
        complete = all((out / sh["file"]).stat().st_size == sh["bytes"] for sh in meta["shards"])
        return meta["fingerprint"] if complete else None
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def prepare(corpus: Sequence[str | Path] | None, out: str | Path, opts: PrepareOptions = PrepareOptions(),
            progress: bool = True, log: Callable[[str], None] = lambda s: None,
            force: bool = False) -> tuple[Path, bool]:
    """Prepare ``corpus`` (the bundled one when empty) into ``out``; (out, whether it was reused).
    ``force`` prepares again even when the sources and options are unchanged."""
    files, out = resolve_sources(corpus), Path(out)
    fp = fingerprint(files, opts)
    if not force and existing_fingerprint(out) == fp:
        return out, True
    if out.exists() and not (out / DATASET_JSON).is_file():
        raise PrepareError(f"--out {out} exists and is not a prepared dataset; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        meta = _prepare_into(tmp, files, opts, fp, progress, log)
        _install(tmp, out, fp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise PrepareError(f"the disk filled up while preparing {out}; the temporary directory {tmp} was "
                               "removed: free space (or choose another --out) and run again") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"prepared {out}: {meta['characters']:,} characters, vocabulary {len(meta['vocab']['chars'])}, "
        f"{len(meta['shards'])} shards")
    return out, False


def _prepare_into(tmp: Path, files: list[Path], opts: PrepareOptions, fp: str, progress: bool, log) -> dict:
    size = sum(f.stat().st_size for f in files)
    with _progress_bar(size, "prepare 1/2 (count)", progress) as bar:
        c = census(files, opts.lowercase, bar.update)
    vocab, dropped = choose_vocab(c.counts, opts, [str(f) for f in files])
    with _progress_bar(size, "prepare 2/2 (encode)", progress) as bar:
        shards = write_shards(tmp, c, vocab, opts, bar.update)
    meta = _describe(c, vocab, dropped, opts, shards, fp)
    (tmp / DATASET_JSON).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    fsync_dir(tmp)
    return meta


def _install(tmp: Path, out: Path, fp: str) -> None:
    """Rename into place; an older dataset there is replaced; when another process renames its own
    copy (the same fingerprint) into place first, that one is kept (ours is discarded)."""
    if out.exists():
        old = temp_sibling(out, "old")
        os.replace(out, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or existing_fingerprint(out) != fp:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return
    fsync_dir(out.parent)


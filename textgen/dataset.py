"""A prepared dataset (``textgen.prepare``) opened for training: its vocabulary and its shards as
read-only memory maps, each checked against ``dataset.json`` (size, sha256) when opened.

Where it can be:

- a local directory (on a cluster: a volume every node mounts at the same path);
- an object-store URI (``s3://``, ``gs://``, ``file://``, through ``pyarrow.fs``): each process
  copies ``dataset.json`` and the shards it reads into a local cache once, checks their sha256 and
  memory-maps the copies;
- not prepared yet: a raw corpus (``--corpus``, or the bundled one) is prepared into the cache
  first, ``<cache>/data/<fingerprint>``, where ``<cache>`` is ``$TEXTGEN_CACHE`` or
  ``~/.cache/textgen``; the same corpus and options reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from textgen.errors import TextgenError
from textgen.files import sha256_file, temp_sibling
from textgen.prepare import DATASET_JSON, FORMAT_VERSION, PrepareOptions, fingerprint, prepare, resolve_sources
from textgen.text import Vocab, VocabError


class DatasetError(TextgenError):
    pass


@dataclass(frozen=True)
class Dataset:
    path: Path
    meta: dict[str, Any]
    vocab: Vocab
    train: tuple[np.ndarray, ...]  # one read-only memory map per shard
    val: tuple[np.ndarray, ...]

    @property
    def lowercase(self) -> bool:
        return bool(self.meta["lowercase"])

    @property
    def val_fraction(self) -> float:
        return float(self.meta["split"]["val_fraction"])

    @property
    def n_train(self) -> int:
        return sum(len(p) for p in self.train)

    @property
    def n_val(self) -> int:
        return sum(len(p) for p in self.val)


def cache_root() -> Path:
    return Path(os.environ.get("TEXTGEN_CACHE") or Path.home() / ".cache" / "textgen")


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / DATASET_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} is not a prepared dataset (no {DATASET_JSON}); run `textgen prepare "
                           f"CORPUS --out {path}` first") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path / DATASET_JSON} is unreadable ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path / DATASET_JSON}: unsupported format_version "
                           f"{meta.get('format_version') if isinstance(meta, dict) else None!r}; prepare it again")
    return meta


def _check_shard(path: Path, shard: dict[str, Any], verify: bool) -> None:
    again = "prepare it again (textgen prepare --force; a cache directory can simply be deleted)"
    if not path.is_file():
        raise DatasetError(f"shard {path} is missing; {again}")
    if path.stat().st_size != shard["bytes"]:
        raise DatasetError(f"shard {path} has {path.stat().st_size} bytes, dataset.json says {shard['bytes']}; {again}")
    if verify and sha256_file(path) != shard["sha256"]:
        raise DatasetError(f"shard {path} is corrupt: its sha256 differs from dataset.json's; {again}")


def _memmap(path: Path, dtype: str, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def open_dataset(path: str | Path, verify: bool = True) -> Dataset:
    """A local prepared directory, every shard checked (size; sha256 unless ``verify`` is False)."""
    path = Path(path)
    meta = read_meta(path)
    try:
        vocab = Vocab.from_dict(meta["vocab"])
    except (KeyError, VocabError) as e:
        raise DatasetError(f"{path / DATASET_JSON}: bad vocabulary ({e}); prepare it again") from None
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for shard in meta["shards"]:
        _check_shard(path / shard["file"], shard, verify)
        parts[shard["split"]].append(_memmap(path / shard["file"], meta["dtype"], shard["characters"]))
    return Dataset(path, meta, vocab, tuple(parts["train"]), tuple(parts["val"]))


# ---------------------------------------------------------------------------------------------
# Object stores


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def _fetch(fs, remote: str, local: Path, sha256: str | None) -> None:
    """Copy one file to ``local`` (through a temporary sibling), checked against ``sha256``."""
    tmp = temp_sibling(local)
    try:
        h = hashlib.sha256()
        with fs.open_input_stream(remote) as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 22), b""):
                h.update(block)
                dst.write(block)
        if sha256 is not None and h.hexdigest() != sha256:
            raise DatasetError(f"{remote} is corrupt: its sha256 differs from dataset.json's; prepare it again")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_dataset(uri: str, splits: Sequence[str] = ("train", "val")) -> Path:
    """Copy a dataset from an object store into the local cache (once: a shard already there with
    the right sha256 is kept); the local directory."""
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises several types for bad URIs and missing credentials
        raise DatasetError(f"cannot open {uri}: {e}") from None
    local = cache_root() / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:32]
    local.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(fs, f"{root.rstrip('/')}/{DATASET_JSON}", local / DATASET_JSON, None)
    except FileNotFoundError:
        raise DatasetError(f"{uri} is not a prepared dataset (no {DATASET_JSON})") from None
    for shard in read_meta(local)["shards"]:
        target = local / shard["file"]
        if shard["split"] in splits and not (target.is_file() and sha256_file(target) == shard["sha256"]):
            try:
                _fetch(fs, f"{root.rstrip('/')}/{shard['file']}", target, shard["sha256"])
            except FileNotFoundError:
                raise DatasetError(f"shard {uri.rstrip('/')}/{shard['file']} is missing; prepare it again") from None
    return local


# ---------------------------------------------------------------------------------------------
# What training opens


def cached_prepare(corpus: Sequence[str | Path] | None, opts: PrepareOptions, progress: bool = False,
                   log: Callable[[str], None] = lambda s: None) -> Path:
    """A raw corpus prepared into the cache (reused when its sources and options are unchanged)."""
    out = cache_root() / "data" / fingerprint(resolve_sources(corpus), opts)
    return prepare(corpus, out, opts, progress=progress, log=log)[0]


def locate(data: str | Path | None, corpus: Sequence[str | Path] | None, opts: PrepareOptions,
           progress: bool = False, log: Callable[[str], None] = lambda s: None) -> Dataset:
    """``--data`` (a directory or a URI), else ``--corpus`` prepared into the cache."""
    if data is not None and corpus:
        raise DatasetError("pass either --data (a prepared dataset) or --corpus (raw text), not both")
    if data is None:
        return open_dataset(cached_prepare(corpus, opts, progress, log))
    return open_dataset(fetch_dataset(str(data)) if is_uri(data) else Path(data))


def check_location(data: str | Path | None, corpus: Sequence[str | Path] | None, opts: PrepareOptions,
                   progress: bool = False) -> dict[str, Any]:
    """What a Ray driver checks before workers start: the corpus prepares (into this machine's
    cache, which workers here reuse), or the dataset opens; of a URI only its ``dataset.json``.
    Returns the dataset's ``dataset.json``."""
    if data is not None and is_uri(data) and not corpus:
        return read_meta(fetch_dataset(str(data), splits=()))
    return locate(data, corpus, opts, progress=progress).meta

"""The tf.data pipeline: character ids -> windows -> (input, target) batches.

For the ``char`` kind a window is ``seq_len + 1`` ids; the input is its first ``seq_len`` ids and
the target the same window shifted by one, so every position carries a loss. Windows do not overlap
(stride ``seq_len``) and start at a fresh random offset every epoch, so window boundaries move.
The ``notebook`` kind reproduces the notebook: stride-1 windows, the input scaled to [0, 1) as a float
feature, and one target (the character after the window).

The ids are one array or several (the shards of a prepared dataset, memory-mapped): windows are cut
in each part on its own, so none crosses a part boundary, and a window's start is its position in
the parts laid end to end. Windows are never materialised: a batch is a vector of window *start*
positions, turned into ids (B, seq_len + 1) by numpy in ``tf.numpy_function`` -- a vectorised
gather from an array in memory, one ``pread`` per window from a memory-mapped shard's file (its
pages stay out of the resident set) -- so no corpus-sized constant enters the graph: per-element windowing
(``Dataset.window``) spends its time on per-window overhead (bench/pipeline.py compares the two).

Sharding is explicit and exact. A global batch of ``G`` windows is cut into
``shard.count * shard.replicas`` equal parts: pipeline ``shard.index`` yields its ``shard.replicas``
parts one after another (one element per local replica, as ``distribute_datasets_from_function``
expects). Every pipeline yields the same number of steps, and the union over all pipelines of one
step is exactly the global batch a single process would see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import tensorflow as tf

from textgen.config import NOTEBOOK, ModelConfig
from textgen.errors import TextgenError


class WindowError(TextgenError):
    pass


@dataclass(frozen=True)
class Shard:
    index: int = 0  # this input pipeline (one per worker)
    count: int = 1  # number of input pipelines
    replicas: int = 1  # local replicas fed by this pipeline (e.g. GPUs of the worker)

    @property
    def parts(self) -> int:
        return self.count * self.replicas


def per_replica_batch(global_batch: int, shard: Shard) -> int:
    if global_batch % shard.parts:
        raise WindowError(
            f"global batch {global_batch} is not divisible by the {shard.parts} replicas "
            f"({shard.count} workers x {shard.replicas} per worker); choose a multiple of {shard.parts}"
        )
    return global_batch // shard.parts


@dataclass(frozen=True)
class WindowRule:
    """How one model kind cuts the id array into windows and a window into (input, target)."""

    stride: int  # distance between two window starts
    moving_offset: bool  # training windows start at a fresh random offset in [0, stride) every epoch
    targets: int  # target characters per window
    split: Callable[[tf.Tensor, int], tuple[tf.Tensor, tf.Tensor]]  # (b, L+1) ids, vocab size -> x, y


def _next_id_split(w: tf.Tensor, vocab_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    return w[:, :-1], w[:, 1:]  # (b, L), (b, L): every position predicts the id after it


def _notebook_split(w: tf.Tensor, vocab_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    x = tf.cast(w[:, :-1], tf.float32)[..., None] / float(vocab_size)  # (b, L, 1) in [0, 1)
    return x, w[:, -1]  # (b, L, 1), (b,): only the character after the window


def window_rule(cfg: ModelConfig) -> WindowRule:
    """The one place that knows how each model kind is windowed."""
    if cfg.kind == NOTEBOOK:
        return WindowRule(stride=1, moving_offset=False, targets=1, split=_notebook_split)
    return WindowRule(stride=cfg.seq_len, moving_offset=True, targets=cfg.seq_len, split=_next_id_split)


Ids = Union[np.ndarray, Sequence[np.ndarray]]  # one id array, or the shards of a dataset
Lengths = Union[int, Sequence[int]]  # their lengths


def parts_of(ids: Ids) -> tuple[np.ndarray, ...]:
    return (ids,) if isinstance(ids, np.ndarray) else tuple(ids)


def lengths_of(n_ids: Lengths) -> list[int]:
    return [int(n_ids)] if isinstance(n_ids, (int, np.integer)) else [int(n) for n in n_ids]


def _starts(n_ids: Lengths, cfg: ModelConfig, offset: int = 0) -> np.ndarray:
    """Start positions from ``offset`` on in every part, one stride apart, of every window that fits
    in its part (positions in the parts laid end to end). (N,) int32, or int64 past 2**31 ids"""
    lengths = lengths_of(n_ids)
    dtype = np.int32 if sum(lengths) < 2**31 else np.int64  # one per window: half the memory
    stride, found, base = window_rule(cfg).stride, [], 0
    for n in lengths:
        found.append(np.arange(base + offset, base + n - cfg.seq_len, stride, dtype=dtype))
        base += n
    return found[0] if len(found) == 1 else np.concatenate(found) if found else np.zeros(0, dtype=dtype)


def train_starts(n_ids: Lengths, cfg: ModelConfig, epoch: int, seed: int) -> np.ndarray:
    """Start positions of this epoch's training windows, shuffled. (N,) int64."""
    rng = np.random.default_rng([seed, epoch])
    rule = window_rule(cfg)
    offset = int(rng.integers(rule.stride)) if rule.moving_offset else 0  # moves the window boundaries
    return rng.permutation(_starts(n_ids, cfg, offset))


def val_starts(n_ids: Lengths, cfg: ModelConfig, max_chars: int | None = None) -> np.ndarray:
    """Start positions of the validation windows: deterministic, from the first character; with
    ``max_chars``, a fixed sample of them spread evenly over the split, of at most that many
    target characters (all of them when the split is smaller). (N,)"""
    starts = _starts(n_ids, cfg)
    if max_chars is None:
        return starts
    keep = max(1, max_chars // targets_per_window(cfg))
    if len(starts) <= keep:
        return starts
    return starts[np.linspace(0, len(starts) - 1, keep).round().astype(np.int64)]


def val_steps(n_ids: Lengths, cfg: ModelConfig, global_batch: int, max_chars: int | None = None) -> int:
    return -(-len(val_starts(n_ids, cfg, max_chars)) // global_batch)


def count_windows(n_ids: Lengths, cfg: ModelConfig) -> int:
    """Training windows per epoch, whatever the offset (the smallest count over offsets)."""
    stride = window_rule(cfg).stride
    return sum(max(0, n - cfg.seq_len) // stride for n in lengths_of(n_ids))


def steps_per_epoch(n_ids: Lengths, cfg: ModelConfig, global_batch: int) -> int:
    """Training steps per epoch; the count is the same every epoch (the smallest over offsets)."""
    n_windows = count_windows(n_ids, cfg)
    steps = n_windows // global_batch
    if steps < 1:
        raise WindowError(
            f"the training text makes only {n_windows} windows, fewer than one batch of {global_batch}; "
            "use more text or a smaller --batch-size"
        )
    return steps


def _to_batches(starts: np.ndarray, steps: int, global_batch: int, shard: Shard) -> np.ndarray:
    """(steps * G,) starts -> this pipeline's (steps * replicas, per_replica) starts."""
    b = per_replica_batch(global_batch, shard)
    grid = starts[: steps * global_batch].reshape(steps, shard.count, shard.replicas, b)
    return grid[:, shard.index].reshape(steps * shard.replicas, b)


_FILES: dict[tuple[str, int, int], int] = {}  # (path, inode, mtime) -> a descriptor open for reading


def _descriptor(path: str) -> int:
    st = os.stat(path)
    key = (path, st.st_ino, st.st_mtime_ns)
    if key not in _FILES:
        _FILES[key] = os.open(path, os.O_RDONLY)
    return _FILES[key]


def _reader(part: np.ndarray, width: int) -> Callable[[np.ndarray], np.ndarray]:
    """(b,) starts in ``part`` -> (b, width) int32. A memory-mapped part is read from its file with
    one ``pread`` per window: the page cache serves it and its pages never join this process'
    resident set (through the map they would, whole large folios at a time, towards the corpus
    size over an epoch); an array in memory is indexed."""
    offsets = np.arange(width, dtype=np.int64)
    if not (isinstance(part, np.memmap) and part.filename is not None):
        return lambda starts: part[starts[:, None] + offsets].astype(np.int32)
    fd, item, base = _descriptor(os.fspath(part.filename)), part.dtype.itemsize, part.offset
    nbytes, pread = width * item, os.pread

    def read(starts: np.ndarray) -> np.ndarray:
        data = b"".join([pread(fd, nbytes, base + s * item) for s in starts.tolist()])
        return np.frombuffer(data, dtype=part.dtype).reshape(len(starts), width).astype(np.int32)

    return read


def gather_fn(ids: Ids, seq_len: int) -> Callable[[np.ndarray], np.ndarray]:
    """(b,) window starts -> (b, seq_len + 1) int32 ids, read from the parts (``_reader``)."""
    parts = parts_of(ids)
    readers = [_reader(p, seq_len + 1) for p in parts]
    bases = np.cumsum([0] + [len(p) for p in parts[:-1]]).astype(np.int64)

    def gather(starts: np.ndarray) -> np.ndarray:
        if len(parts) == 1:
            return readers[0](starts)
        which = np.searchsorted(bases, starts, side="right") - 1
        out = np.empty((len(starts), seq_len + 1), dtype=np.int32)
        for k in np.unique(which):
            rows = which == k
            out[rows] = readers[k](starts[rows] - bases[k])
        return out

    return gather


def _split_fn(cfg: ModelConfig, vocab_size: int, ids: Ids, batches: np.ndarray | None = None):
    """Element -> (x, y): the element is a batch of window starts, or with ``batches`` the index of
    one of its rows (the starts stay a numpy array: no copy of them in the graph)."""
    split, gather = window_rule(cfg).split, gather_fn(ids, cfg.seq_len)
    fetch = gather if batches is None else (lambda i: gather(batches[i]))

    def window_split(element):  # (b,) starts, or a row index -> x, y
        w = tf.numpy_function(fetch, [element], tf.int32, stateful=False)
        return split(tf.ensure_shape(w, [None, cfg.seq_len + 1]), vocab_size)  # from (b, L+1) ids

    return window_split


def _options() -> tf.data.Options:
    opts = tf.data.Options()
    # Sharding is done above, exactly; tf.distribute must not shard again.
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    opts.deterministic = True
    return opts


def train_dataset(
    ids: np.ndarray,
    cfg: ModelConfig,
    vocab_size: int,
    global_batch: int,
    epoch: int,
    seed: int,
    shard: Shard = Shard(),
    skip_steps: int = 0,
) -> tf.data.Dataset:
    """One epoch of training batches for this pipeline: elements (x, y) of per-replica size; the
    first ``skip_steps`` global steps left out (a run resumed in the middle of an epoch)."""
    lengths = [len(p) for p in parts_of(ids)]
    steps = steps_per_epoch(lengths, cfg, global_batch)
    batches = _to_batches(train_starts(lengths, cfg, epoch, seed), steps, global_batch, shard)
    batches = np.ascontiguousarray(batches[skip_steps * shard.replicas:])
    return (
        tf.data.Dataset.range(len(batches))
        .map(_split_fn(cfg, vocab_size, ids, batches), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(_options())
    )


def val_dataset(
    ids: Ids, cfg: ModelConfig, vocab_size: int, global_batch: int, shard: Shard = Shard(),
    max_chars: int | None = None,
) -> tuple[tf.data.Dataset, int]:
    """The validation windows (``val_starts``), padded to whole global batches with weight-0 windows
    so that the loss is exact and every replica runs the same number of steps. Elements
    (x, y, weight). Returns the dataset and the number of steps."""
    starts = val_starts([len(p) for p in parts_of(ids)], cfg, max_chars)
    n = len(starts)
    steps = -(-n // global_batch)
    padded = np.full(steps * global_batch, starts[0] if n else 0, dtype=np.int64)
    padded[:n] = starts
    weights = np.zeros(steps * global_batch, dtype=np.float32)
    weights[:n] = 1.0
    starts_b = _to_batches(padded, steps, global_batch, shard)
    weights_b = _to_batches(weights, steps, global_batch, shard)
    split = _split_fn(cfg, vocab_size, ids)
    ds = (
        tf.data.Dataset.from_tensor_slices((starts_b, weights_b))
        .map(lambda s, w: (*split(s), w), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(_options())
    )
    return ds, steps


def targets_per_window(cfg: ModelConfig) -> int:
    """Characters of training target per window: seq_len for ``char``, 1 for ``notebook``."""
    return window_rule(cfg).targets

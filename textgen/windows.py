"""The tf.data pipeline: character ids -> windows -> (input, target) batches.

For the ``char`` kind a window is ``seq_len + 1`` ids; the input is its first ``seq_len`` ids and
the target the same window shifted by one, so every position carries a loss. Windows do not overlap
(stride ``seq_len``) and start at a fresh random offset every epoch, so window boundaries move.
The ``notebook`` kind reproduces the notebook: stride-1 windows, the input scaled to [0, 1) as a float
feature, and one target (the character after the window).

Windows are never materialised: a batch is a matrix of window *start* positions, turned into ids by
one vectorised gather (B, seq_len + 1): per-element windowing (``Dataset.window``) spends its time
on per-window overhead (bench/pipeline.py compares the two).

Sharding is explicit and exact. A global batch of ``G`` windows is cut into
``shard.count * shard.replicas`` equal parts: pipeline ``shard.index`` yields its ``shard.replicas``
parts one after another (one element per local replica, as ``distribute_datasets_from_function``
expects). Every pipeline yields the same number of steps, and the union over all pipelines of one
step is exactly the global batch a single process would see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def _starts(n_ids: int, cfg: ModelConfig, offset: int = 0) -> np.ndarray:
    """Start positions from ``offset`` on, one stride apart, of every window that fits. (N,) int64"""
    return np.arange(offset, n_ids - cfg.seq_len, window_rule(cfg).stride, dtype=np.int64)


def train_starts(n_ids: int, cfg: ModelConfig, epoch: int, seed: int) -> np.ndarray:
    """Start positions of this epoch's training windows, shuffled. (N,) int64."""
    rng = np.random.default_rng([seed, epoch])
    rule = window_rule(cfg)
    offset = int(rng.integers(rule.stride)) if rule.moving_offset else 0  # moves the window boundaries
    return rng.permutation(_starts(n_ids, cfg, offset))


def val_starts(n_ids: int, cfg: ModelConfig) -> np.ndarray:
    """Start positions of the validation windows: deterministic, from the first character. (N,)"""
    return _starts(n_ids, cfg)


def val_steps(n_ids: int, cfg: ModelConfig, global_batch: int) -> int:
    return -(-len(val_starts(n_ids, cfg)) // global_batch)


def steps_per_epoch(n_ids: int, cfg: ModelConfig, global_batch: int) -> int:
    """Training steps per epoch; the count is the same every epoch (the smallest over offsets)."""
    n_windows = (n_ids - cfg.seq_len) // window_rule(cfg).stride
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


def _split_fn(cfg: ModelConfig, vocab_size: int, ids: tf.Tensor):
    offsets = tf.range(cfg.seq_len + 1, dtype=tf.int64)
    split = window_rule(cfg).split

    def window_split(starts):  # (b,) -> x, y
        return split(tf.gather(ids, starts[:, None] + offsets), vocab_size)  # from (b, L+1) ids

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
) -> tf.data.Dataset:
    """One epoch of training batches for this pipeline: elements (x, y) of per-replica size."""
    steps = steps_per_epoch(len(ids), cfg, global_batch)
    starts = _to_batches(train_starts(len(ids), cfg, epoch, seed), steps, global_batch, shard)
    split = _split_fn(cfg, vocab_size, tf.constant(ids, dtype=tf.int32))
    return (
        tf.data.Dataset.from_tensor_slices(starts)
        .map(split, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(_options())
    )


def val_dataset(
    ids: np.ndarray, cfg: ModelConfig, vocab_size: int, global_batch: int, shard: Shard = Shard()
) -> tuple[tf.data.Dataset, int]:
    """All validation windows, padded to whole global batches with weight-0 windows so that the
    loss is exact and every replica runs the same number of steps. Elements (x, y, weight).
    Returns the dataset and the number of steps."""
    starts = val_starts(len(ids), cfg)
    n = len(starts)
    steps = val_steps(len(ids), cfg, global_batch)
    padded = np.zeros(steps * global_batch, dtype=np.int64)
    padded[:n] = starts
    weights = np.zeros(steps * global_batch, dtype=np.float32)
    weights[:n] = 1.0
    starts_b = _to_batches(padded, steps, global_batch, shard)
    weights_b = _to_batches(weights, steps, global_batch, shard)
    split = _split_fn(cfg, vocab_size, tf.constant(ids, dtype=tf.int32))
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

"""The tf.data pipeline: character ids -> windows -> (input, target) batches.

For the ``char`` kind a window is ``seq_len + 1`` ids; the input is its first ``seq_len`` ids and
the target the same window shifted by one, so every position carries a loss. Windows do not overlap
(stride ``seq_len``) and start at a fresh random offset every epoch, so window boundaries move.
The ``notebook`` kind reproduces the notebook: stride-1 windows, the input scaled to [0, 1) as a float
feature, and one target (the character after the window).

Windows are never materialised: a batch is a matrix of window *start* positions, turned into ids by
one vectorised gather (B, seq_len + 1). Per-element windowing (``Dataset.window``) is 30x slower.

Sharding is explicit and exact. A global batch of ``G`` windows is cut into
``shard.count * shard.replicas`` equal parts: pipeline ``shard.index`` yields its ``shard.replicas``
parts one after another (one element per local replica, as ``distribute_datasets_from_function``
expects). Every pipeline yields the same number of steps, and the union over all pipelines of one
step is exactly the global batch a single process would see.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from textgen.config import CHAR, ModelConfig
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


def train_starts(n_ids: int, cfg: ModelConfig, epoch: int, seed: int) -> np.ndarray:
    """Start positions of this epoch's training windows, shuffled. (N,) int64."""
    rng = np.random.default_rng([seed, epoch])
    window = cfg.seq_len + 1
    if cfg.kind == CHAR:
        offset = int(rng.integers(cfg.seq_len))  # moves the window boundaries every epoch
        n = (n_ids - offset - 1) // cfg.seq_len
        starts = offset + cfg.seq_len * np.arange(n, dtype=np.int64)
    else:
        starts = np.arange(n_ids - window + 1, dtype=np.int64)
    return rng.permutation(starts)


def val_starts(n_ids: int, cfg: ModelConfig) -> np.ndarray:
    """Start positions of the validation windows: deterministic, from the first character. (N,)"""
    stride = cfg.seq_len if cfg.kind == CHAR else 1
    return np.arange(0, n_ids - cfg.seq_len, stride, dtype=np.int64)


def val_steps(n_ids: int, cfg: ModelConfig, global_batch: int) -> int:
    return -(-len(val_starts(n_ids, cfg)) // global_batch)


def steps_per_epoch(n_ids: int, cfg: ModelConfig, global_batch: int) -> int:
    """Training steps per epoch; the count is the same every epoch (the smallest over offsets)."""
    n_windows = (n_ids - cfg.seq_len) // cfg.seq_len if cfg.kind == CHAR else n_ids - cfg.seq_len
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

    def split(starts):  # (b,) -> x, y
        w = tf.gather(ids, starts[:, None] + offsets)  # (b, L+1)
        if cfg.kind == CHAR:
            return w[:, :-1], w[:, 1:]  # (b, L), (b, L)
        x = tf.cast(w[:, :-1], tf.float32)[..., None] / float(vocab_size)  # (b, L, 1) in [0, 1)
        return x, w[:, -1]  # (b, L, 1), (b,)

    return split


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
    return cfg.seq_len if cfg.kind == CHAR else 1

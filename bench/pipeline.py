"""tf.data pipeline alone, at a GPU worker's batch (1024 windows of 100), on one core.

    .venv/bin/python -m bench.pipeline [--batch 1024] [--epochs 3]

A 2.9M-character id array (the bundled corpus, repeated), windows of seq_len 100. Each epoch's
dataset is built and consumed the way training consumes it: ``distribute_datasets_from_function``
and ``next(iterator)`` inside a ``tf.function`` that touches every batch: from the id array in memory
and from the same ids in a memory-mapped uint8 shard (as training reads a prepared dataset). The
per-element windowing baseline (``Dataset.window`` -> flat_map -> shuffle -> batch) runs in the same
process for scale.
Prints JSON lines: characters of (input) windows per second for each.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _per_element_dataset(ids, seq_len: int, batch: int, epoch: int):
    """The baseline: windows cut one element at a time, shuffled and batched element-wise."""
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices(ids)
            .window(seq_len + 1, shift=seq_len, drop_remainder=True)
            .flat_map(lambda w: w.batch(seq_len + 1))
            .shuffle(10_000, seed=epoch)
            .map(lambda w: (w[:-1], w[1:]))
            .batch(batch, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def make_consume():
    """A ``tf.function`` that takes ``n`` batches from an iterator and touches every one."""
    import tensorflow as tf

    @tf.function
    def consume(iterator, n):
        total = tf.constant(0, tf.int64)
        for _ in tf.range(n):
            x, y = next(iterator)
            total += tf.cast(tf.reduce_sum(x[:, 0]) + tf.reduce_sum(y[:, -1]), tf.int64)
        return total

    return consume


def _pipelines(ids, vocab_size: int, batch: int):
    """name -> epoch -> characters consumed, for our pipeline and the per-element baseline."""
    import numpy as np
    import tensorflow as tf

    from textgen.config import ModelConfig
    from textgen.train import _distribute
    from textgen.windows import train_dataset

    cfg = ModelConfig(seq_len=100)
    strategy = tf.distribute.get_strategy()
    n = len(ids) // (cfg.seq_len * batch) - 1

    consume = make_consume()

    def ours(epoch):
        ds = _distribute(strategy, lambda shard: train_dataset(ids, cfg, vocab_size, batch, epoch, 0, shard))
        consume(iter(ds), tf.constant(n)).numpy()
        return n * batch * cfg.seq_len

    shard = Path(tempfile.mkdtemp(prefix="textgen-bench-")) / "train-00000.bin"
    ids.astype(np.uint8).tofile(shard)  # the corpus as `textgen prepare` writes it (uint8 ids)
    mapped = (np.memmap(shard, dtype=np.uint8, mode="r", shape=(len(ids),)),)

    def memory_mapped(epoch):
        ds = _distribute(strategy, lambda s: train_dataset(mapped, cfg, vocab_size, batch, epoch, 0, s))
        consume(iter(ds), tf.constant(n)).numpy()
        return n * batch * cfg.seq_len

    def per_element(epoch):
        dist = strategy.experimental_distribute_dataset(_per_element_dataset(ids, cfg.seq_len, batch, epoch))
        consume(iter(dist), tf.constant(n)).numpy()
        return n * batch * cfg.seq_len

    pipelines = {"vectorized (ours)": ours, "vectorized, memory-mapped uint8 shard": memory_mapped,
                 "per-element window": per_element}
    return pipelines, cfg.seq_len


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20, help="corpus copies (20 -> 2.9M chars)")
    args = p.parse_args()

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from textgen.text import Vocab, load_corpus

    text = load_corpus().text
    vocab = Vocab.from_text(text)
    ids = np.tile(vocab.encode(text), args.repeat)
    pipelines, seq_len = _pipelines(ids, vocab.size, args.batch)
    for name, epochs in (("vectorized (ours)", args.epochs), ("vectorized, memory-mapped uint8 shard", args.epochs),
                         ("per-element window", 1)):
        fn = pipelines[name]
        fn(0)  # trace
        t0 = time.perf_counter()
        chars = sum(fn(e) for e in range(1, epochs + 1))
        dt = time.perf_counter() - t0
        print(json.dumps({"bench": "pipeline", "pipeline": name, "batch": args.batch, "seq_len": seq_len,
                          "corpus_chars": int(len(ids)), "epochs": epochs, "chars_per_s": chars / dt,
                          "cores": 1}), flush=True)


if __name__ == "__main__":
    main()

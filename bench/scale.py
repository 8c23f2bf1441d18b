"""Corpora at scale: ``textgen prepare``, a training process and the tf.data pipeline on corpora
of 10 MB and 100 MB (1 GB with --big), side by side with the in-memory path where it fits.

    .venv/bin/python -m bench.scale [--sizes 10,100] [--big] [--baseline-tree DIR] [--work /tmp/textgen-scale]

The corpora are real text: the bundled book's words reshuffled (seeded), written under --work
(never into the repository). Every measurement runs in a fresh process pinned to one core, which
prints its own peak RSS. The in-memory path is the code before ``textgen prepare`` existed: give a
checkout of it with --baseline-tree (``git worktree add /tmp/textgen-baseline b4189e2``); without
it those rows are left out. Prints JSON lines:

- ``prepare``: MB/s of corpus bytes and peak RSS of ``textgen prepare`` (goals: >= 30 MB/s, <= 500 MB);
- ``train``: peak RSS of a training process (data opened, model built, 20 steps) and its time from
  start to the first training step (goals: <= 1.5 GB, flat in corpus size; <= 15 s at 1 GB);
- ``pipeline``: tf.data training batches of 1024 windows from the shards, chars/s (goal >= 10 M).
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # a child's start, before its heavy imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20
BASELINE_MAX_MB = 100  # the in-memory path is measured up to this size only


def one_core() -> None:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> Path:
    """``size_mb`` MiB of the bundled book's words in a seeded random order, 12 words a line."""
    if path.is_file() and path.stat().st_size >= size_mb * MB:
        return path
    import numpy as np

    words = np.array((REPO / "textgen" / "data" / "alice_in_wonderland.txt").read_text(encoding="utf-8").split())
    rng, written = np.random.default_rng(seed), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * MB:
            lines = rng.choice(words, size=(20_000, 12))
            chunk = "\n".join(" ".join(line) for line in lines) + "\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------------
# Children: each prints one JSON object


def child_prepare(corpus: str, out: str) -> dict:
    from textgen.prepare import prepare

    t0 = time.monotonic()
    prepare([corpus], out, progress=False)
    dt = time.monotonic() - t0
    mb = Path(corpus).stat().st_size / MB
    return {"seconds": dt, "mb_per_s": mb / dt, "peak_rss_mb": peak_rss_mb()}


def _open_data(corpus: str, data: str | None):
    from textgen.config import preset
    from textgen.train import prepare_data

    pre = preset("small")
    model_cfg, train_cfg = pre.model, pre.train
    if data is None:  # the in-memory path (the baseline tree's prepare_data reads the corpus)
        return prepare_data([corpus], model_cfg, train_cfg), model_cfg, train_cfg
    return prepare_data(None, model_cfg, train_cfg, data=data), model_cfg, train_cfg


def child_train(corpus: str, data: str | None, steps: int = 20) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    from textgen.model import build_model
    from textgen.train import Steps, _distribute, make_optimizer
    from textgen.windows import train_dataset

    d, model_cfg, train_cfg = _open_data(corpus, data)
    strategy = tf.distribute.get_strategy()
    model = build_model(model_cfg, d.vocab.size)
    opt = make_optimizer(train_cfg, 1)
    opt.build(model.trainable_variables)
    gb = train_cfg.batch_size
    step = Steps(model, opt, strategy, model_cfg.kind, gb, False)
    it = iter(_distribute(strategy, lambda shard: train_dataset(d.train_ids, model_cfg, d.vocab.size, gb, 1, 0,
                                                                shard)))
    float(step.train_step(it))
    first = time.monotonic() - T0
    for _ in range(steps):
        float(step.train_step(it))
    return {"start_to_first_step_s": first, "peak_rss_mb": peak_rss_mb(), "preset": "small", "steps": steps + 1}


def child_pipeline(corpus: str, data: str | None, batch: int = 1024, epochs: int = 1) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from textgen.config import ModelConfig
    from textgen.windows import steps_per_epoch, train_dataset

    d, _, _ = _open_data(corpus, data)
    cfg = ModelConfig(seq_len=100)
    lengths = [len(p) for p in d.train_ids] if isinstance(d.train_ids, tuple) else len(d.train_ids)
    n = min(steps_per_epoch(lengths, cfg, batch), 300)

    consume = _bench_pipeline().make_consume()  # the same consumer as bench.pipeline
    consume(iter(train_dataset(d.train_ids, cfg, d.vocab.size, batch, 0, 0)), tf.constant(2)).numpy()  # trace
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        consume(iter(train_dataset(d.train_ids, cfg, d.vocab.size, batch, epoch, 0)), tf.constant(n)).numpy()
    return {"chars_per_s": epochs * n * batch * cfg.seq_len / (time.perf_counter() - t0), "batch": batch,
            "steps": n * epochs, "peak_rss_mb": peak_rss_mb()}


def _bench_pipeline():
    """bench/pipeline.py of this tree, by path (a child's ``textgen`` may come from the baseline tree)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("textgen_bench_pipeline", REPO / "bench" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHILDREN = {"prepare": child_prepare, "train": child_train, "pipeline": child_pipeline}


# ---------------------------------------------------------------------------------------------
# The driver


def run_child(task: str, tree: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", task, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/tmp")
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_size(size_mb: int, work: Path, baseline: Path | None) -> None:
    corpus = make_corpus(work / f"corpus-{size_mb}mb.txt", size_mb)
    data = work / f"data-{size_mb}mb"
    if data.exists():
        import shutil

        shutil.rmtree(data)
    rows = [("prepare", "prepared", REPO, (str(corpus), str(data)))]
    for task in ("train", "pipeline"):
        rows.append((task, "prepared (memory-mapped shards)", REPO, (str(corpus), "--data", str(data))))
        if baseline is not None and size_mb <= BASELINE_MAX_MB:  # ~19 bytes per character in memory
            rows.append((task, "in-memory (before)", baseline, (str(corpus),)))
    for task, path, tree, args in rows:
        result = run_child(task, tree, *args)
        print(json.dumps({"bench": "scale", "task": task, "path": path, "corpus_mb": size_mb,
                          "corpus_bytes": corpus.stat().st_size, "cores": 1, **result}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10,100", help="corpus sizes in MiB (default: %(default)s)")
    p.add_argument("--big", action="store_true", help="also 1024 MiB (heavy: run it once)")
    p.add_argument("--baseline-tree", type=Path, help="a checkout of the in-memory path, for comparison")
    p.add_argument("--work", type=Path, default=Path("/tmp/textgen-scale"), help="corpora and datasets go here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        one_core()
        fn = CHILDREN[args.child]
        out = fn(*args.child_args) if args.child == "prepare" else fn(args.child_args[0], args.data)
        print(json.dumps(out), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([1024] if args.big else [])
    for size in sizes:
        bench_size(size, args.work, args.baseline_tree)


if __name__ == "__main__":
    main()

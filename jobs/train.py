"""``python -m jobs.train``: the core training loop as a Ray Train job.

A ``TensorflowTrainer`` starts one worker per ``--num-workers``; Ray sets TF_CONFIG and each worker
runs ``textgen.train.fit`` under ``MultiWorkerMirroredStrategy`` (which also mirrors over the GPUs a
worker owns). The tf.data pipeline is sharded exactly across workers (see ``textgen.windows``); the
global batch is ``--batch-size`` and must divide by the number of replicas.

Every epoch every rank calls ``ray.train.report``; rank 0 attaches the checkpoint (our own layout)
and writes samples.jsonl and TensorBoard events (``textgen.observe``) into Ray's run directory.
Ray keeps the best checkpoints by ``val_loss`` (and always the latest), restarts a failed worker group
up to ``--max-failures`` times from the latest checkpoint, and a driver started again with the same
``--storage-path`` and ``--name`` continues the run.

Data: ``--data`` is a dataset made by ``textgen prepare`` -- a directory every node mounts at the
same path (the workers memory-map its shards), or an ``s3://`` / ``gs://`` URI (each worker copies
the shards to its local disk once, sha256-checked). ``--corpus`` (or nothing: the bundled corpus) is
prepared by the driver into its cache, and again by each worker on a node that has no copy yet.

    python -m jobs.train --preset default --max-minutes 10                 # local Ray, 1 worker, all cores
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.train ...  # a cluster

The last stdout line is one JSON object: best_checkpoint, best_val_loss, epochs, num_workers, run_path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from textgen import config as cfglib
from textgen.errors import RunFailed, TextgenError, report_errors

DEFAULT_STORAGE = "runs/ray"
CHECKPOINTS_TO_KEEP = 2  # the best two by val_loss; Ray also keeps the latest (for resume)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train textgen as a Ray Train job (MultiWorkerMirroredStrategy across workers).",
    )
    cfglib.add_train_args(p)
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (default: %(default)s; on one machine one worker with all its cores "
                        "trains fastest, on a cluster give one per node or GPU)")
    p.add_argument("--use-gpu", action="store_true", help="give every worker GPUs (--gpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per worker; also TensorFlow's thread count (default: on a local Ray this "
                        "machine's cores shared by the workers, on a cluster 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker with --use-gpu (default: 1)")
    p.add_argument("--storage-path", default=DEFAULT_STORAGE,
                   help="where runs and checkpoints go: a local path shared by all nodes, or a URI "
                        "Ray storage accepts (s3://, gs://) (default: %(default)s)")
    p.add_argument("--name", help="run name; the same --storage-path and --name continue a run "
                                  "(default: the preset name)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="worker-group restarts from the latest checkpoint (default: %(default)s)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS if set, else a local Ray in this process)")
    return p


def run_configs(args: argparse.Namespace):
    """(model config, train config, the checkpoint to fine-tune from or None) of the flags."""
    from textgen import finetune

    return finetune.from_args(args, *cfglib.configs_from_args(args))


def replicas_per_worker(args: argparse.Namespace) -> int:
    return max(1, int(args.gpus_per_worker or 1)) if args.use_gpu else 1


def cpus_per_worker(args: argparse.Namespace) -> float:
    """--cpus-per-worker, or by default: on the local Ray this job starts, the machine's cores
    shared by the workers (one worker with all of them unless --num-workers says more); joining a
    cluster (--address or RAY_ADDRESS), 1."""
    if args.cpus_per_worker is not None:
        return args.cpus_per_worker
    if args.address or os.environ.get("RAY_ADDRESS"):
        return 1
    return max(1, len(os.sched_getaffinity(0)) // max(args.num_workers, 1))


def check_args(args: argparse.Namespace) -> None:
    """Configuration mistakes that can be caught on the driver, before any worker starts."""
    if args.num_workers < 1:
        raise TextgenError(f"--num-workers must be at least 1, got {args.num_workers}")
    if args.max_failures < 0:
        raise TextgenError(f"--max-failures must be 0 or more, got {args.max_failures}")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise TextgenError(f"--cpus-per-worker must be positive, got {args.cpus_per_worker}")
    if args.gpus_per_worker is not None and not args.use_gpu:
        raise TextgenError("--gpus-per-worker needs --use-gpu")
    if args.gpus_per_worker is not None and args.gpus_per_worker <= 0:
        raise TextgenError(f"--gpus-per-worker must be positive, got {args.gpus_per_worker}")
    _, train_cfg, _ = run_configs(args)
    cfglib.sample_options_from_args(args)
    replicas = args.num_workers * replicas_per_worker(args)
    if train_cfg.batch_size % replicas:
        raise TextgenError(
            f"global batch {train_cfg.batch_size} is not divisible by {replicas} replicas "
            f"({args.num_workers} workers x {replicas_per_worker(args)}); pass a --batch-size that is"
        )
    if "://" not in args.storage_path:
        storage = Path(args.storage_path)
        try:
            storage.mkdir(parents=True, exist_ok=True)
            probe = storage / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise TextgenError(
                f"storage path {storage} is not writable ({e.strerror}); choose another --storage-path"
            ) from None


def scaling_config(args: argparse.Namespace):
    """Workers and what each one reserves: CPUs, and with --use-gpu its GPUs (MWMS mirrors over them)."""
    from ray.train import ScalingConfig

    resources = {"CPU": cpus_per_worker(args)}
    if args.use_gpu:
        resources["GPU"] = args.gpus_per_worker or 1
    return ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker=resources)


def loop_config(args: argparse.Namespace) -> dict[str, Any]:
    """What every worker needs, as plain JSON-able values (absolute paths: workers chdir; every
    worker loads the ``--init-from`` checkpoint itself, so it must be on storage all nodes mount)."""
    model_cfg, train_cfg, init_from = run_configs(args)
    return {
        "model": cfglib.to_dict(model_cfg),
        "train": cfglib.to_dict(train_cfg),
        "corpus": [str(Path(p).resolve()) for p in args.corpus] if args.corpus else None,
        "data": None if args.data is None else args.data if "://" in args.data else str(Path(args.data).resolve()),
        "max_vocab": args.max_vocab,
        "min_count": args.min_count,
        "threads": max(1, int(cpus_per_worker(args))),
        "run_name": args.name,
        "init_from": None if init_from is None else str(init_from.path.resolve()),
        "samples": cfglib.to_dict(cfglib.sample_options_from_args(args)),
    }


def train_loop_per_worker(config: dict[str, Any], on_epoch_start: Callable[[int], None] | None = None) -> None:
    """Runs on every Ray Train worker. ``on_epoch_start(epoch)``, if given, runs as each epoch starts."""
    cfglib.quiet_tensorflow()
    import ray.train
    import tensorflow as tf

    from textgen.train import fit, settle_train_config

    # Kernels use the worker's CPU share, not the whole machine; the inter-op pool keeps its default
    # (the LSTM's loops and the collectives need it).
    tf.config.threading.set_intra_op_parallelism_threads(config["threads"])
    tf.get_logger().setLevel("WARNING")  # not MultiWorkerMirroredStrategy's per-trace INFO lines
    rank = ray.train.get_context().get_world_rank()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    model_cfg = cfglib.model_config_from_dict(config["model"])
    train_cfg = cfglib.train_config_from_dict(config["train"])
    init_from = _init_checkpoint(config)
    data = _worker_data(config, rank, model_cfg, train_cfg, init_from)
    train_cfg = settle_train_config(train_cfg, data, None, None)
    log = _chief_log(rank)
    with (tempfile.TemporaryDirectory(prefix="textgen-resume-") as local_copy,
          tempfile.TemporaryDirectory(prefix="textgen-observe-") as scratch):
        fit(
            model_cfg, train_cfg, data, RaySink(rank), strategy=strategy,
            resume_from=_restored_checkpoint(local_copy), init_from=init_from, progress=False, log=log,
            on_epoch_start=on_epoch_start, observer=_chief_observer(rank, config, log, scratch),
        )


def _init_checkpoint(config: dict[str, Any]):
    """The ``--init-from`` checkpoint, loaded by this worker (None without one)."""
    from textgen.checkpoint import load_checkpoint

    return None if config.get("init_from") is None else load_checkpoint(config["init_from"])


def _worker_data(config: dict[str, Any], rank: int, model_cfg, train_cfg, init_from=None):
    """The dataset as this worker reads it (``--data``, or ``--corpus`` prepared into its cache,
    with the ``init_from`` checkpoint's vocabulary as its base); a worker that cannot says which
    one it is and where."""
    import ray

    from textgen.finetune import base_vocab
    from textgen.train import prepare_data

    try:
        return prepare_data(config["corpus"], model_cfg, train_cfg, data=config.get("data"),
                            max_vocab=config.get("max_vocab"), min_count=config.get("min_count", 1),
                            base_vocab=base_vocab(init_from))
    except TextgenError as e:  # e.g. the corpus is on the driver's machine but not on this node
        raise TextgenError(
            f"worker rank {rank} on node {ray.util.get_node_ip_address()}: {e} (every worker reads the "
            "corpus itself: put it on storage all nodes mount at the same path, or in the image; or prepare it "
            "once and pass --data, a shared directory or an s3:// or gs:// URI)"
        ) from None


def _restored_checkpoint(local_copy: str):
    """The checkpoint Ray restarts this run from (copied into ``local_copy``), or None."""
    import ray.train

    from textgen import checkpoint as ckptlib

    restored = ray.train.get_checkpoint()
    return None if restored is None else ckptlib.load_checkpoint(restored.to_directory(local_copy))


def _chief_observer(rank: int, config: dict[str, Any], log: Callable[[str], None], scratch: str):
    """Rank 0's samples and TensorBoard events, in Ray's run directory ``<storage_path>/<name>/``
    (beside Ray's checkpoints); None on the other ranks."""
    if rank != 0:
        return None
    import ray.train

    storage = ray.train.get_context().get_storage()
    samples = cfglib.SampleOptions(**config["samples"])
    return run_dir_observer(storage.storage_filesystem, storage.experiment_fs_path, samples, log, scratch)


def run_dir_observer(fs, run_dir: str, samples, log: Callable[[str], None], scratch: str):
    """An observer writing into ``run_dir`` on the pyarrow filesystem ``fs``: directly on a local
    (shared) one; else into the local directory ``scratch``, copied to ``run_dir`` after every
    evaluation, samples.jsonl first copied from there (a resumed run appends to it)."""
    import pyarrow.fs

    from textgen.observe import SAMPLES_FILE, RunObserver

    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return RunObserver(run_dir, samples, log)
    local = Path(scratch)
    if fs.get_file_info(f"{run_dir}/{SAMPLES_FILE}").type == pyarrow.fs.FileType.File:
        pyarrow.fs.copy_files(f"{run_dir}/{SAMPLES_FILE}", str(local / SAMPLES_FILE), source_filesystem=fs)

    def upload() -> None:
        pyarrow.fs.copy_files(str(local), run_dir, destination_filesystem=fs, use_threads=False)

    return RunObserver(local, samples, log, after=upload)


def _chief_log(rank: int) -> Callable[[str], None]:
    def log(msg: str) -> None:
        # Not print(): Ray Train patches it to go to both stdout and the root logger (twice on screen).
        if rank == 0:
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()

    return log


class RaySink:
    """Every rank reports every epoch (``report`` is a barrier); rank 0 attaches the checkpoint."""

    REPORTED = ("epoch", "epoch_progress", "loss", "val_loss", "val_bpc", "chars_per_s", "learning_rate",
                "best_val_loss", "best_epoch", "steps", "partial", "elapsed_s", "replicas", "replica_weight_spread")

    def __init__(self, rank: int):
        self.rank = rank

    def epoch_end(self, metrics, save, improved) -> None:
        import ray.train

        reported = {k: metrics[k] for k in self.REPORTED}
        if self.rank != 0:
            ray.train.report(reported)
            return
        # Uploaded in the background (Ray deletes the local copy once it is stored): a synchronous
        # upload held every worker at this barrier for seconds per evaluation.
        path = save(Path(tempfile.mkdtemp(prefix="textgen-ckpt-")))  # replaced by the complete checkpoint
        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(str(path)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def checkpoint_uri(checkpoint) -> str:
    """A Ray Checkpoint -> a local path, or a URI for remote storage (s3://bucket/...)."""
    fs_type = getattr(checkpoint.filesystem, "type_name", "local")
    return checkpoint.path if fs_type == "local" else f"{fs_type}://{checkpoint.path}"


def run(args: argparse.Namespace, loop: Callable[[dict[str, Any]], None] = train_loop_per_worker) -> dict[str, Any]:
    """Train on Ray with ``loop`` running on every worker; the summary of the finished run."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.tensorflow import TensorflowTrainer

    args.name = args.name or args.preset
    storage = args.storage_path if "://" in args.storage_path else str(Path(args.storage_path).resolve())
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:  # the embedded default: a new local Ray in this process, as big as the machine
            # address="local": never the cluster Ray has on record in its temp directory (someone
            # else's, or a dead one it would retry for minutes). The dashboard (loopback only)
            # serves the State API that Ray Train's placement-group cleaner polls.
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")

    trainer = TensorflowTrainer(
        loop,
        train_loop_config=loop_config(args),
        scaling_config=scaling_config(args),
        run_config=RunConfig(
            name=args.name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=CHECKPOINTS_TO_KEEP,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=args.max_failures),
        ),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint("val_loss", "min")
    if best is None:
        raise TextgenError(f"the run {result.path} finished without a checkpoint")
    best_metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    last_metrics = result.metrics or best_metrics  # None when a resumed run had nothing left to do
    return {
        "best_checkpoint": checkpoint_uri(best),
        "best_val_loss": best_metrics["val_loss"],
        "best_val_bpc": best_metrics["val_bpc"],
        "best_epoch": best_metrics["epoch"],
        "epochs": last_metrics["epoch"],
        "num_workers": args.num_workers,
        "run_path": result.path if "://" not in storage else f"{storage.split('://')[0]}://{result.path}",
        "chars_per_s": last_metrics["chars_per_s"],
    }


def main(argv: Sequence[str] | None = None, loop: Callable[[dict[str, Any]], None] = train_loop_per_worker) -> int:
    """The job's command line; ``loop`` is the per-worker function (tests pass one with faults)."""
    cfglib.quiet_tensorflow()
    args = build_parser().parse_args(argv)
    return report_errors(lambda a: submit(a, loop), args)


def submit(args: argparse.Namespace, loop: Callable[[dict[str, Any]], None]) -> int:
    check_args(args)
    # Fail on the driver, not after workers started: the data is prepared (or opened) here once;
    # workers on this machine reuse the cache, workers elsewhere prepare or fetch their own copy.
    from textgen.dataset import check_location
    from textgen.finetune import base_vocab, check_data
    from textgen.prepare import PrepareOptions
    from textgen.text import Vocab

    _, train_cfg, init_from = run_configs(args)
    opts = PrepareOptions(lowercase=train_cfg.lowercase, val_fraction=train_cfg.val_fraction,
                          max_vocab=args.max_vocab, min_count=args.min_count, base_vocab=base_vocab(init_from))
    meta = check_location(args.data, args.corpus, opts, progress=args.progress)
    if init_from is not None:
        check_data(init_from, Vocab.from_dict(meta["vocab"]), bool(meta["lowercase"]), args.data or "of --corpus")
    try:
        result = run(args, loop)
    except Exception as e:  # a failed run: say what Ray said, in one line
        import ray.train

        if isinstance(e, ray.train.TrainingFailedError):
            raise RunFailed(f"training failed: {_root_cause(e)}") from None
        raise
    print(json.dumps(result), flush=True)
    return 0


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())

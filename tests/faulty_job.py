"""``python -m tests.faulty_job``: ``python -m jobs.train`` with test-only faults in its workers, to
exercise Ray's recovery and the workers' error messages. Environment variables choose the fault:

    TEXTGEN_FAULT_KILL_RANK=1@epoch=2   rank 1 kills itself (SIGKILL) as epoch 2 starts
    TEXTGEN_FAULT_HIDE_CORPUS_RANK=1    rank 1 looks for the corpus where it is not, as a worker on
                                        a node without the file would (the driver still sees it)

The kill happens once per run: a marker file (``TEXTGEN_FAULT_MARKER``, default in the temp
directory, named after the run) records it, so the restarted worker group trains on. Ray workers
import this module by name (Ray puts the driver's working directory, the repository, on their path).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from jobs.train import main, train_loop_per_worker

KILL_ENV = "TEXTGEN_FAULT_KILL_RANK"
MARKER_ENV = "TEXTGEN_FAULT_MARKER"
HIDE_CORPUS_ENV = "TEXTGEN_FAULT_HIDE_CORPUS_RANK"


def corpus_seen_by(rank: int, corpus: list[str] | None) -> list[str] | None:
    """The corpus paths as this rank sees them: missing ones for the rank named in the env var."""
    hidden = os.environ.get(HIDE_CORPUS_ENV, "").strip()
    if not hidden or int(hidden) != rank or not corpus:
        return corpus
    return [str(Path(p).with_name(Path(p).name + ".not-on-this-node")) for p in corpus]


def parse(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*@\s*epoch\s*=\s*(\d+)\s*", spec)
    if not m:
        raise ValueError(f"{KILL_ENV} must look like '1@epoch=2', got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def maybe_kill(rank: int, epoch: int, run_name: str | None) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec or (rank, epoch) != parse(spec):
        return
    marker = Path(os.environ.get(MARKER_ENV) or Path(tempfile.gettempdir()) /
                  f"textgen-fault-{run_name}-rank{rank}-epoch{epoch}")
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at the start of epoch {epoch}\n")
    print(f"fault injection: killing rank {rank} at the start of epoch {epoch}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def faulty_train_loop(config: dict[str, Any]) -> None:
    """The production worker loop, with the faults the environment asks for."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    config = {**config, "corpus": corpus_seen_by(rank, config["corpus"])}
    train_loop_per_worker(config, on_epoch_start=lambda epoch: maybe_kill(rank, epoch, config["run_name"]))


if __name__ == "__main__":
    sys.exit(main(loop=faulty_train_loop))

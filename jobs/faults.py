"""Test-only fault injection, to exercise Ray's recovery and the workers' error messages.

    TEXTGEN_FAULT_KILL_RANK=1@epoch=2   rank 1 kills itself (SIGKILL) as epoch 2 starts
    TEXTGEN_FAULT_HIDE_CORPUS_RANK=1    rank 1 looks for the corpus where it is not, as a worker on
                                        a node without the file would (the driver still sees it)

The kill happens once per run: a marker file (``TEXTGEN_FAULT_MARKER``, default in the temp
directory, named after the run) records it, so the restarted worker group trains on.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path

ENV = "TEXTGEN_FAULT_KILL_RANK"
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
        raise ValueError(f"{ENV} must look like '1@epoch=2', got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def maybe_inject_fault(rank: int, epoch: int, run_name: str | None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    kill_rank, kill_epoch = parse(spec)
    if (rank, epoch) != (kill_rank, kill_epoch):
        return
    marker = Path(os.environ.get(MARKER_ENV) or Path(tempfile.gettempdir()) /
                  f"textgen-fault-{run_name}-rank{rank}-epoch{epoch}")
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at the start of epoch {epoch}\n")
    print(f"fault injection: killing rank {rank} at the start of epoch {epoch}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

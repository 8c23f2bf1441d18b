"""Reading finished (or running) Ray Train runs without Ray: the checkpoints are in our own layout.

Only complete checkpoints count: every required file present and matching the manifest written
with it (``textgen.checkpoint.load_checkpoint``). A checkpoint Ray is still copying, or one that
was damaged, is passed over.
"""

from __future__ import annotations

import math
from pathlib import Path

from textgen.checkpoint import CheckpointError, load_checkpoint
from textgen.errors import TextgenError


def ray_checkpoints(run_dir: str | Path) -> list[tuple[float, int, Path]]:
    """(val_loss, epoch, path) of every complete checkpoint in a Ray Train run directory."""
    found = []
    for d in sorted(Path(run_dir).glob("checkpoint_*")):
        try:
            ckpt = load_checkpoint(d)
            val_loss = float(ckpt.metrics["val_loss"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue  # being written, damaged, or not one of ours
        if math.isfinite(val_loss):
            found.append((val_loss, ckpt.epoch, d))
    return found


def best_ray_checkpoint(run_dir: str | Path) -> Path:
    found = ray_checkpoints(run_dir)
    if not found:
        raise TextgenError(f"{run_dir} has no complete checkpoint (checkpoint_* with all its files and "
                           "a matching manifest.json) yet; wait for the run's first epoch, or pass a checkpoint")
    return min(found, key=lambda t: (t[0], t[1]))[2]

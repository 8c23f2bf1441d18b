"""Reading finished (or running) Ray Train runs without Ray: the checkpoints are in our own layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

from textgen.errors import TextgenError


def ray_checkpoints(run_dir: str | Path) -> list[tuple[float, int, Path]]:
    """(val_loss, epoch, path) of every complete checkpoint in a Ray Train run directory."""
    found = []
    for d in sorted(Path(run_dir).glob("checkpoint_*")):
        try:
            metrics = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
            val_loss = float(metrics["val_loss"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not one of ours
        if math.isfinite(val_loss):
            found.append((val_loss, int(metrics.get("epoch", 0)), d))
    return found


def best_ray_checkpoint(run_dir: str | Path) -> Path:
    found = ray_checkpoints(run_dir)
    if not found:
        raise TextgenError(f"{run_dir} has no complete checkpoint (checkpoint_*/metrics.json) yet")
    return min(found, key=lambda t: (t[0], t[1]))[2]

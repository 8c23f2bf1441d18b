"""Quality at equal time: held-out loss after the same wall-clock budget, ours vs the notebook's.

    .venv/bin/python -m bench.quality [--minutes 10] [--presets default notebook-2x256]

Runs ``textgen train --preset P --max-minutes M`` for each preset, one after the other, on the
bundled corpus, and prints one JSON line each (best validation loss in nats and bpc, epochs,
training chars/s). Extra ``textgen train`` flags can follow ``--``, e.g. ``-- --dropout 0.3``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--presets", nargs="+", default=["default", "notebook-2x256"])
    p.add_argument("--keep", help="keep the runs under this directory (default: a temp dir)")
    p.add_argument("extra", nargs="*", help="more `textgen train` flags (after --)")
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="textgen-quality-"))
    for name in args.presets:
        out = root / f"{name}-{args.minutes:g}min"
        cmd = [sys.executable, "-m", "textgen", "train", "--preset", name, "--max-minutes", str(args.minutes),
               "--out", str(out), "--no-progress", *args.extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({
            "bench": "quality", "preset": name, "minutes": args.minutes, "extra": args.extra,
            "best_val_loss": r["best_val_loss"], "best_val_bpc": r["best_val_bpc"],
            "best_epoch": r["best_epoch"], "epochs": r["epochs"], "train_chars_per_s": r["train_chars_per_s"],
            "stopped_by": r["stopped_by"], "checkpoint": r["checkpoint"],
        }), flush=True)


if __name__ == "__main__":
    main()

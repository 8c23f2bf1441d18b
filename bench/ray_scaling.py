"""One process vs a 2-worker Ray job: same corpus, model, epochs and total cores (2).

    .venv/bin/python -m bench.ray_scaling [--epochs 4] [--preset default]

Runs ``textgen train`` (one process, TensorFlow using both cores) and ``python -m jobs.train
--num-workers 2 --cpus-per-worker 1`` (MultiWorkerMirroredStrategy, one core each) one after the
other with the same global batch and seed. Prints one JSON line per epoch for each (chars/s,
validation loss) and a summary: Ray throughput as a fraction of single-process throughput, over
the epochs after the first (the first one includes tracing and Ray start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--preset", default="default")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="textgen-scaling-"))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("RAY_ADDRESS", None)
    common = ["--preset", args.preset, "--epochs", str(args.epochs), "--patience", str(args.epochs)]

    _run([sys.executable, "-m", "textgen", "train", *common, "--out", str(root / "single"),
                   "--no-progress"], env)
    single_hist = [json.loads(l) for l in (root / "single" / "metrics.jsonl").read_text().splitlines()]
    ray = _run([sys.executable, "-m", "jobs.train", *common, "--num-workers", "2", "--cpus-per-worker", "1",
                "--storage-path", str(root / "ray"), "--name", "scaling"], env)
    from textgen.runs import ray_checkpoints

    latest = max(ray_checkpoints(ray["run_path"]), key=lambda t: t[1])[2]
    ray_hist = json.loads((latest / "state.json").read_text())["history"]

    for name, hist in (("single-process", single_hist), ("ray-2-workers", ray_hist)):
        for m in hist:
            print(json.dumps({"bench": "ray_scaling", "run": name, "epoch": m["epoch"],
                              "chars_per_s": m["chars_per_s"], "val_loss": m["val_loss"],
                              "replicas": m.get("replicas")}), flush=True)

    def steady(hist):
        later = hist[1:] or hist
        return sum(m["chars_per_s"] for m in later) / len(later)

    print(json.dumps({
        "bench": "ray_scaling_summary", "preset": args.preset, "epochs": args.epochs,
        "single_chars_per_s": steady(single_hist), "ray_chars_per_s": steady(ray_hist),
        "ray_fraction_of_single": steady(ray_hist) / steady(single_hist),
        "final_val_loss": {"single": single_hist[-1]["val_loss"], "ray": ray_hist[-1]["val_loss"]},
    }), flush=True)


if __name__ == "__main__":
    main()

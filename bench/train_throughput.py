"""Training throughput: characters of training target per second, ours vs the notebook's approach.

    .venv/bin/python -m bench.train_throughput [--presets default notebook-2x256] [--steps 20]
        [--batch-size N]   # the char presets' batch (the notebook's keep theirs)

Both presets run in this process, on the bundled corpus, through the real training step (the same
``Steps`` the loop uses, default strategy, all cores). Prints one JSON line per preset and one with
the ratio. The notebook's approach gets one target per 100-char window; ours one per character.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(preset_name: str, steps: int, warmup: int, batch_size: int | None = None) -> dict:
    import tensorflow as tf

    from textgen.config import preset
    from textgen.model import build_model
    from textgen.train import Steps, _distribute, make_optimizer, prepare_data
    from textgen.windows import targets_per_window, train_dataset

    pre = preset(preset_name)
    if batch_size and pre.model.kind == "char":
        pre = dataclasses.replace(pre, train=dataclasses.replace(pre.train, batch_size=batch_size))
    data = prepare_data(None, pre.model, pre.train)
    strategy = tf.distribute.get_strategy()
    model = build_model(pre.model, data.vocab.size)
    opt = make_optimizer(pre.train, 1)
    opt.build(model.trainable_variables)
    gb = pre.train.batch_size
    step = Steps(model, opt, strategy, pre.model.kind, gb, False)
    ds = _distribute(strategy, lambda shard: train_dataset(
        data.train_ids, pre.model, data.vocab.size, gb, 1, 0, shard).repeat())
    it = iter(ds)
    for _ in range(warmup):
        float(step.train_step(it))
    t0 = time.perf_counter()
    for _ in range(steps):
        float(step.train_step(it))
    dt = time.perf_counter() - t0
    chars = steps * gb * targets_per_window(pre.model)
    return {
        "bench": "train_throughput",
        "preset": preset_name,
        "batch": gb,
        "targets_per_step": gb * targets_per_window(pre.model),
        "step_ms": 1000 * dt / steps,
        "chars_per_s": chars / dt,
        "steps": steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["default", "notebook-2x256"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, help="the char presets' global batch (default: the preset's)")
    args = p.parse_args()
    results = []
    for name in args.presets:
        steps = args.steps if not name.startswith("notebook") else max(5, args.steps // 2)
        r = measure(name, steps, args.warmup, args.batch_size)
        r["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        results.append(r)
        print(json.dumps(r), flush=True)
    if len(results) >= 2:
        ratio = results[0]["chars_per_s"] / results[-1]["chars_per_s"]
        print(json.dumps({"bench": "train_throughput_ratio", "numerator": results[0]["preset"],
                          "denominator": results[-1]["preset"], "ratio": ratio}), flush=True)


if __name__ == "__main__":
    main()

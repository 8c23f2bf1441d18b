"""``textgen export CHECKPOINT --out model.onnx`` (imports TensorFlow only when it runs)."""

from __future__ import annotations

import argparse
import json
import sys

from export.generation import PRECISIONS


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint",
                   help="a checkpoint directory, a training --out directory (its best/), "
                        "or a Ray Train run directory (its best checkpoint by val_loss)")
    p.add_argument("--out", default="model.onnx", help="ONNX file to write (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random parity-check inputs")
    p.add_argument("--precision", choices=PRECISIONS, default="int8",
                   help="weights of the in-graph sampling loop (the step model is always fp32; default: %(default)s)")


def export_main(args: argparse.Namespace) -> int:
    from export.onnx import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, seed=args.seed, precision=args.precision)
    print(f"exported {result.checkpoint} -> {result.path} ({result.bytes:,} bytes, "
          f"{result.lstm_ops} LSTM ops, max |Δ logits| {result.max_abs_diff:.2e}, {result.precision} sampling loop)",
          file=sys.stderr)
    print(json.dumps(result.to_dict()), flush=True)
    return 0

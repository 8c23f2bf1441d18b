"""``textgen`` command line: train, export, generate, eval, serve.

Importing this module is cheap: each subcommand imports its own stack when it runs, so
``textgen generate`` never loads TensorFlow. Human-readable progress goes to stderr; commands that
produce a result print it as one JSON object on the last line of stdout. Mistakes in the input end
with ``error: <what was wrong and what to do>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from textgen import config as cfglib
from textgen.errors import TextgenError

EXIT_USAGE = 2


def quiet_tensorflow() -> None:
    """TensorFlow's C++ INFO/WARNING lines bury the progress output; keep errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def print_result(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# ---------------------------------------------------------------------------------------------
# Training flags, shared with ``python -m jobs.train``


def _units(text: str) -> tuple[int, ...]:
    try:
        units = tuple(int(u) for u in text.replace("x", ",").split(",") if u.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 256,256, got {text!r}") from None
    if not units:
        raise argparse.ArgumentTypeError("give at least one LSTM size")
    return units


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", metavar="PATH",
                   help="UTF-8 text file(s) or directories of *.txt (default: the bundled Alice in Wonderland)")
    p.add_argument("--preset", default="default", choices=sorted(cfglib.PRESETS),
                   help="model and training preset (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="maximum number of epochs")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget for the run, in minutes")
    p.add_argument("--batch-size", type=int, help="global batch size in windows")
    p.add_argument("--learning-rate", type=float, help="Adam learning rate")
    p.add_argument("--clipnorm", type=float, help="clip gradients to this global norm")
    p.add_argument("--patience", type=int, help="early stopping: epochs without improvement")
    p.add_argument("--val-fraction", type=float, help="held-out tail of the corpus (0-0.5)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--no-lowercase", dest="lowercase", action="store_false", default=None,
                   help="keep the corpus' case (the notebook lowercases)")
    p.add_argument("--seq-len", type=int, help="characters per training window")
    p.add_argument("--embedding-dim", type=int, help="embedding size")
    p.add_argument("--lstm-units", type=_units, help="LSTM sizes, one per layer, e.g. 256,256")
    p.add_argument("--dropout", type=float, help="dropout after each LSTM layer")
    p.add_argument("--mixed-precision", action="store_true", default=None,
                   help="float16 compute with float32 logits (GPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def configs_from_args(args: argparse.Namespace) -> tuple[cfglib.ModelConfig, cfglib.TrainConfig]:
    pre = cfglib.preset(args.preset)
    model = cfglib.replace(
        pre.model, seq_len=args.seq_len, embedding_dim=args.embedding_dim,
        lstm_units=args.lstm_units, dropout=args.dropout,
    )
    train = cfglib.replace(
        pre.train, epochs=args.epochs, max_minutes=args.max_minutes, batch_size=args.batch_size,
        learning_rate=args.learning_rate, clipnorm=args.clipnorm, patience=args.patience,
        val_fraction=args.val_fraction, seed=args.seed, lowercase=args.lowercase,
        mixed_precision=args.mixed_precision,
    )
    return model, train


# ---------------------------------------------------------------------------------------------
# Subcommands


def cmd_train(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    model_cfg, train_cfg = configs_from_args(args)
    out = Path(args.out or f"runs/{args.preset}")
    from textgen import checkpoint as ckptlib

    resume_from = None
    if args.resume:
        if not (out / "last").is_dir():
            raise TextgenError(f"nothing to resume: {out / 'last'} does not exist; train without --resume")
        resume_from = ckptlib.load_checkpoint(out / "last")
        if (resume_from.model, resume_from.train.seed) != (model_cfg, train_cfg.seed):
            eprint(f"resuming with the checkpoint's model settings: {resume_from.model}")
        model_cfg = resume_from.model
    elif (out / "last").exists() or (out / "best").exists():
        raise TextgenError(
            f"{out} already holds a training run; pass --resume to continue it, or choose another --out"
        )

    from textgen.train import LocalSink, fit, prepare_data

    data = prepare_data(args.corpus, model_cfg, train_cfg)
    if resume_from is not None and resume_from.vocab != data.vocab:
        raise TextgenError(
            f"the corpus' vocabulary ({data.vocab.size} chars) differs from the checkpoint's "
            f"({resume_from.vocab.size}); resume with the same --corpus"
        )
    eprint(f"corpus: {len(data.train_ids) + len(data.val_ids):,} chars, vocabulary {data.vocab.size}, "
           f"train {len(data.train_ids):,} / validation {len(data.val_ids):,}; preset {args.preset}; out {out}")
    sink = LocalSink(out)
    try:
        summary = fit(model_cfg, train_cfg, data, sink, resume_from=resume_from,
                      progress=args.progress, log=eprint)
    except KeyboardInterrupt:
        eprint(f"interrupted; every finished epoch is saved in {out}: continue with --resume")
        return 130
    plot = sink.finish(summary.history)
    result = {
        **summary.to_dict(),
        "checkpoint": str(sink.best.resolve()) if sink.best.is_dir() else None,
        "out": str(out.resolve()),
        "loss_curve": str(plot) if plot else None,
    }
    print_result(result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    from export.cli import export_main

    return export_main(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from serve.cli import generate_main

    return generate_main(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from serve.cli import eval_main

    return eval_main(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from serve.cli import serve_main

    return serve_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgen", description="Character-level LSTM text generation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model in this process (no Ray)")
    add_train_args(p)
    p.add_argument("--out", help="output directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    p.set_defaults(func=cmd_train)

    from export.cli import add_export_args
    from serve.cli import add_eval_args, add_generate_args, add_serve_args

    p = sub.add_parser("export", help="export a checkpoint to one ONNX file (needs the train extra)")
    add_export_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate text from an ONNX model (no TensorFlow)")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("eval", help="held-out loss of an ONNX model on a corpus")
    add_eval_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("serve", help="HTTP generation service on uvicorn (needs the serve extra; no TensorFlow)")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; user mistakes become one clear line on stderr and exit status 2."""
    try:
        return func(args)
    except TextgenError as e:
        eprint(f"error: {e}")
        return EXIT_USAGE
    except FileNotFoundError as e:
        eprint(f"error: {e.strerror}: {e.filename}")
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())

"""``textgen`` command line: train, export, generate, eval, serve.

Importing this module is cheap: each subcommand imports its own stack when it runs, so
``textgen generate`` never loads TensorFlow. Human-readable progress goes to stderr; commands that
produce a result print it as one JSON object on the last line of stdout. Mistakes in the input end
with ``error: <what was wrong and what to do>`` on stderr and exit status 2, a run that failed (a
diverged training) with ``error: <what happened>`` and exit status 1 (``textgen.errors``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from textgen.config import add_train_args, configs_from_args, quiet_tensorflow
from textgen.errors import TextgenError, report_errors


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def print_result(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# ---------------------------------------------------------------------------------------------
# Subcommands


def cmd_train(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    model_cfg, train_cfg = configs_from_args(args)
    out = Path(args.out or f"runs/{args.preset}")
    from textgen import checkpoint as ckptlib

    if out.exists() and not out.is_dir():
        raise TextgenError(f"--out {out} is a file; training writes a directory there: choose another --out")
    resume_from = None
    for name in ("last", "best"):  # put back what a killed save left, delete its temporary copies
        ckptlib.tidy(out / name)
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

    for name, help_, add_args, func in (
        ("export", "export a checkpoint to one ONNX file (needs the train extra)", add_export_args, cmd_export),
        ("generate", "generate text from an ONNX model (no TensorFlow)", add_generate_args, cmd_generate),
        ("eval", "held-out loss of an ONNX model on a corpus", add_eval_args, cmd_eval),
        ("serve", "HTTP generation service on uvicorn (needs the serve extra; no TensorFlow)", add_serve_args,
         cmd_serve),
    ):
        p = sub.add_parser(name, help=help_)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_errors(args.func, args)


if __name__ == "__main__":
    sys.exit(main())

"""``textgen`` command line: prepare, train, export, generate, eval, serve.

Importing this module is cheap: each subcommand imports its own stack when it runs, so
``textgen generate`` never loads TensorFlow. Human-readable progress goes to stderr; commands that
produce a result print it as one JSON object on the last line of stdout. Mistakes in the input end
with ``error: <what was wrong and what to do>`` on stderr and exit status 2, a run that failed (a
diverged training) with ``error: <what happened>`` and exit status 1 (``textgen.errors``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from textgen.config import add_train_args, configs_from_args, quiet_tensorflow, sample_options_from_args
from textgen.errors import TextgenError, report_errors


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def print_result(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# ---------------------------------------------------------------------------------------------
# Subcommands


def _run_start(args: argparse.Namespace, out: Path):
    """(model config, train config, the checkpoint to resume, the one to fine-tune from) of a
    ``textgen train`` run in ``out``."""
    from textgen import checkpoint as ckptlib
    from textgen import finetune

    if args.resume and args.init_from is not None:
        raise TextgenError("--init-from starts a new run from a checkpoint's weights, --resume continues the "
                           f"run in {out}: pass one of them (a fine-tuning run resumes with --resume alone)")
    model_cfg, train_cfg, init_from = finetune.from_args(args, *configs_from_args(args))
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
    return model_cfg, train_cfg, resume_from, init_from


def cmd_train(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    out = Path(args.out or f"runs/{args.preset}")
    model_cfg, train_cfg, resume_from, init_from = _run_start(args, out)
    samples = sample_options_from_args(args)
    from textgen.finetune import base_vocab
    from textgen.observe import RunObserver
    from textgen.train import LocalSink, fit, prepare_data, settle_train_config

    data = prepare_data(args.corpus, model_cfg, train_cfg, data=args.data, max_vocab=args.max_vocab,
                        min_count=args.min_count, progress=args.progress, log=eprint,
                        base_vocab=base_vocab(init_from, resume_from))
    train_cfg = settle_train_config(train_cfg, data, args.val_fraction, args.lowercase)
    if resume_from is not None and resume_from.vocab != data.vocab:
        raise TextgenError(
            f"the dataset's vocabulary ({data.vocab.size} chars, {data.source}) differs from the checkpoint's "
            f"({resume_from.vocab.size}); resume with the same --corpus or --data"
        )
    eprint(f"data {data.source}: {data.n_train + data.n_val:,} chars, vocabulary {data.vocab.size}, "
           f"train {data.n_train:,} / validation {data.n_val:,}; preset {args.preset}; out {out}")
    sink = LocalSink(out)
    try:
        summary = fit(model_cfg, train_cfg, data, sink, resume_from=resume_from, init_from=init_from,
                      progress=args.progress, log=eprint,
                      observer=RunObserver(out, samples, log=eprint))
    except KeyboardInterrupt:
        eprint(f"interrupted; every finished epoch is saved in {out}: continue with --resume")
        return 130
    plot = sink.finish(summary.history)
    result = {
        **summary.to_dict(),
        "checkpoint": str(sink.best.resolve()) if sink.best.is_dir() else None,
        "out": str(out.resolve()),
        "loss_curve": str(plot) if plot else None,
        "init_from": None if init_from is None else str(init_from.path.resolve()),
    }
    print_result(result)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from textgen.prepare import PrepareOptions, prepare

    base = ()
    if args.vocab_from is not None:
        from textgen.finetune import check_data, load_init

        init = load_init(args.vocab_from, "--vocab-from")
        check_data(init, init.vocab, args.lowercase, "to prepare")  # the case the checkpoint was trained on
        base = init.vocab.chars
    opts = PrepareOptions(lowercase=args.lowercase, val_fraction=args.val_fraction, max_vocab=args.max_vocab,
                          min_count=args.min_count, shard_mb=args.shard_mb, base_vocab=base)
    out, reused = prepare(args.corpus, args.out, opts, progress=args.progress, log=eprint, force=args.force)
    if reused:
        eprint(f"{out} is up to date (same sources and options): reused")
    meta = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    print_result({"out": str(out.resolve()), "reused": reused, "characters": meta["characters"],
                  "vocab_size": len(meta["vocab"]["chars"]), "shards": len(meta["shards"]), **meta["split"],
                  "unknown_count": meta["unknown"]["mapped_count"]})
    return 0


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", nargs="*", metavar="CORPUS",
                   help="UTF-8 text files or directories of *.txt (default: the bundled corpus)")
    p.add_argument("--out", required=True, help="the dataset directory to write")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out tail of every file (default: %(default)s)")
    p.add_argument("--no-lowercase", dest="lowercase", action="store_false", help="keep the corpus' case")
    p.add_argument("--max-vocab", type=int, help="keep at most N characters, U+FFFD for the rest included")
    p.add_argument("--min-count", type=int, default=1, help="map characters seen fewer times to U+FFFD")
    p.add_argument("--shard-mb", type=float, default=64.0, help="shard size in MiB (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="prepare again even if --out is up to date")
    p.add_argument("--vocab-from", metavar="CHECKPOINT",
                   help="keep every character of this checkpoint's vocabulary (for train --init-from)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def cmd_export(args: argparse.Namespace) -> int:
    quiet_tensorflow()
    from export.cli import export_main

    return export_main(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from serve.cli import generate_main

    return generate_main(args)


DYNAMIC_LR = 0.001  # per target character: the best of those measured on the bundled book (README, "Evaluate")
DYNAMIC_FLAGS = (("--seq-len", "seq_len"), ("--dynamic-lr", "dynamic_lr"), ("--dynamic-decay", "dynamic_decay"))


def cmd_eval(args: argparse.Namespace) -> int:
    if not args.dynamic:
        given = [flag for flag, dest in DYNAMIC_FLAGS if getattr(args, dest) is not None]
        if given:
            raise TextgenError(f"{', '.join(given)}: only with --dynamic (dynamic evaluation of a checkpoint)")
        from serve.cli import eval_main

        return eval_main(args)
    ckpt = _dynamic_checkpoint(args.model)  # mistakes are found before TensorFlow loads
    seq_len = ckpt.model.seq_len if args.seq_len is None else args.seq_len
    lr = DYNAMIC_LR if args.dynamic_lr is None else args.dynamic_lr
    decay = args.dynamic_decay or 0.0
    for bad, what in ((seq_len < 1, f"--seq-len must be at least 1, got {seq_len}"),
                      (not 0 <= lr < math.inf, f"--dynamic-lr must be a number >= 0, got {lr}"),
                      (not 0 <= decay * seq_len <= 1, f"--dynamic-decay must be in [0, 1/seq_len = "
                                                      f"{1 / max(seq_len, 1):g}], got {decay}")):
        if bad:
            raise TextgenError(what)
    quiet_tensorflow()
    try:
        from textgen import dyneval
    except ImportError as e:
        raise TextgenError(f"textgen eval --dynamic needs TensorFlow: pip install 'textgen[train]' ({e})") from None
    print_result(dyneval.evaluate(ckpt, args.corpus, args.split, seq_len, lr, decay, log=eprint))
    return 0


def _dynamic_checkpoint(path: str):
    from textgen import checkpoint as ckptlib

    if Path(path).suffix == ".onnx" or Path(path).is_file():
        what = "the ONNX file" if Path(path).suffix == ".onnx" else "a file"
        raise TextgenError(f"{path}: dynamic evaluation needs the training checkpoint (a checkpoint directory, "
                           f"or a training --out directory for its best/), not {what}")
    return ckptlib.load_checkpoint(ckptlib.resolve_checkpoint(path))


def add_dynamic_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dynamic evaluation (Krause et al. 2018; needs the train extra)")
    g.add_argument("--dynamic", action="store_true",
                   help="MODEL is the training checkpoint; the model takes a gradient step after scoring each "
                        "window of the text, the LSTM state carried across windows; also prints the static loss")
    g.add_argument("--seq-len", type=int, metavar="N", help="characters per window (default: the model's)")
    g.add_argument("--dynamic-lr", type=float, metavar="LR",
                   help=f"SGD step per target character (the gradient of a window's summed loss; default: {DYNAMIC_LR})")
    g.add_argument("--dynamic-decay", type=float, metavar="D",
                   help="pull back towards the trained weights, per target character (default: 0)")


def add_eval_and_dynamic_args(p: argparse.ArgumentParser) -> None:
    from serve.cli import add_eval_args

    add_eval_args(p)
    add_dynamic_eval_args(p)


def cmd_vectors(args: argparse.Namespace) -> int:
    from serve.cli import vectors_main

    return vectors_main(args)


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

    p = sub.add_parser("prepare", help="encode a corpus once into shards of ids for training (--data)")
    add_prepare_args(p)
    p.set_defaults(func=cmd_prepare)

    from export.cli import add_export_args
    from serve.cli import add_generate_args, add_serve_args, add_vectors_args

    for name, help_, add_args, func in (
        ("export", "export a checkpoint to one ONNX file (needs the train extra)", add_export_args, cmd_export),
        ("generate", "generate text from an ONNX model (no TensorFlow)", add_generate_args, cmd_generate),
        ("eval", "held-out loss of an ONNX model on a corpus (--dynamic: of a checkpoint, learning as it reads)",
         add_eval_and_dynamic_args, cmd_eval),
        ("vectors", "write or check conformance vectors of an ONNX model (docs/format.md)", add_vectors_args,
         cmd_vectors),
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

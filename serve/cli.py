"""``textgen generate``, ``textgen eval`` and ``textgen serve``: onnxruntime and numpy (and for
``serve`` the web stack), no TensorFlow.

    textgen generate model.onnx --prompt "alice was " --max-chars 300 --temperature 0.8 --seed 1
    textgen eval model.onnx --corpus corpus.txt    # the bundled corpus: textgen.text.bundled_corpus_path()
    textgen serve model.onnx --port 8000          # HTTP on 127.0.0.1 (serve/http.py)

``generate`` streams the continuation to stdout as it is made (the prompt is not repeated).
``eval`` prints one JSON line: {"loss_nats", "bpc", "chars", "windows", "unknown_skipped", "split",
"model_val_loss"}. ``serve`` runs uvicorn until stopped (Ctrl-C / SIGTERM: in-flight requests get
up to ``GRACEFUL_SHUTDOWN_S`` to finish); its limits come from flags, else ``TEXTGEN_*``
environment variables, else ``serve.settings.ServeSettings``' defaults (its fields make the flags).
Mistakes (missing or corrupt model file, bad parameters, unknown prompt characters) print ``error:
<what was wrong and what to do>`` on stderr and exit with status 2 (``textgen.errors.report_errors``).

``textgen``'s parser imports this module for every command; the generator is imported when a
command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys

from serve.params import DEFAULT_MAX_CHARS, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, UNKNOWN_POLICIES
from textgen import contract
from textgen.errors import TextgenError as GeneratorError
from textgen.errors import report_errors
from textgen.text import bundled_corpus_path

GRACEFUL_SHUTDOWN_S = 20  # below Kubernetes' default 30 s grace period, so the pod exits on its own
WORKERS_ENV = "TEXTGEN_WORKERS"
MODEL_ENV = "TEXTGEN_MODEL"  # read by serve.http:app_from_env (the uvicorn factory of --workers > 1)
SERVE_EXTRA = "textgen serve needs the serve extra: pip install 'textgen[serve]'"


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the exported model (.onnx) from `textgen export`")
    p.add_argument("--prompt", default="", metavar="TEXT",
                   help="text to continue (default: empty, start a new paragraph)")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, metavar="N",
                   help="characters to generate per sample (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
                   help="0 = greedy (always the most likely character); lower is safer, higher "
                        "is wilder (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, metavar="K",
                   help="sample among the K most likely characters only (default: 0 = off)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, metavar="P",
                   help="sample among the most likely characters holding probability P (default: 1 = off)")
    p.add_argument("--seed", type=int, metavar="S",
                   help="random seed: the same seed gives the same text (default: random, printed on stderr)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="samples to make in one batched pass; sample i uses seed S + i (default: 1)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the output ends with TEXT (not printed); repeat for several")
    p.add_argument("--unknown", choices=UNKNOWN_POLICIES, default="error",
                   help="prompt characters outside the model's vocabulary: fail, drop them, or "
                        "replace them with --replacement (default: %(default)s)")
    p.add_argument("--replacement", default=" ", metavar="CHAR",
                   help="the character that replaces unknown ones with --unknown replace (default: space)")
    p.add_argument("--num-threads", type=int, default=1, metavar="N",
                   help="onnxruntime intra-op threads (default: 1; 0 = one per core)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the exported model (.onnx) from `textgen export` (with --dynamic: the "
                                 "training checkpoint it was exported from)")
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH",
                   help="UTF-8 text file(s) or directories of *.txt, as given to `textgen train`; for "
                        f"a model trained on the bundled corpus: {bundled_corpus_path()}")
    p.add_argument("--split", choices=("val", "all"), default="val",
                   help="val: the held-out tail that training validated on (its val_fraction); "
                        "all: the whole text (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="windows per model call (default: %(default)s)")
    p.add_argument("--num-threads", type=int, default=0, metavar="N",
                   help="onnxruntime intra-op threads (default: 0 = one per core)")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the exported model (.onnx) from `textgen export`")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: %(default)s, this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"server processes, each with its own model and engine; the limits below apply per "
                        f"process (default: 1, or ${WORKERS_ENV})")
    try:
        from serve.settings import ServeSettings
    except ImportError:  # the base install: `textgen serve` says what to install when it runs
        p.set_defaults(serve_missing=True)
    else:
        for name, f in ServeSettings.model_fields.items():  # one flag per setting, as declared there
            help_text = f"{f.description} (default: {f.default}, or ${ServeSettings.env_name(name)})".replace("%", "%%")
            if f.annotation is bool:  # --docs / --no-docs; not given: None (the environment, else the default)
                p.add_argument(ServeSettings.flag(name), action=argparse.BooleanOptionalAction, help=help_text)
                continue
            kind = f.annotation if f.annotation in (int, float) else str  # str: names, paths, keys
            metavar = {int: "N", float: "X"}.get(kind, "TEXT")
            p.add_argument(ServeSettings.flag(name), type=kind, metavar=metavar, help=help_text)
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                   help="uvicorn's log level; info includes one access line per request (default: %(default)s)")


def add_vectors_args(p: argparse.ArgumentParser) -> None:
    from serve.vectors import add_args

    add_args(p)


def vectors_main(args: argparse.Namespace) -> int:
    from serve.vectors import run

    return report_errors(run, args)


def generate_main(args: argparse.Namespace) -> int:
    return report_errors(_generate, args)


def eval_main(args: argparse.Namespace) -> int:
    return report_errors(_eval, args)


def serve_main(args: argparse.Namespace) -> int:
    return report_errors(_serve, args)


def _generate(args: argparse.Namespace) -> int:
    from serve.generator import Generator

    if args.num_samples < 1:
        raise GeneratorError(f"--num-samples must be at least 1, got {args.num_samples}")
    gen = Generator.load(args.model, num_threads=args.num_threads)
    seed = args.seed
    if seed is None and args.temperature != 0:
        seed = secrets.randbelow(2**31)
    options = dict(
        max_chars=args.max_chars, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        stop=args.stop, unknown=args.unknown, replacement=args.replacement,
    )
    out = sys.stdout
    try:
        if args.num_samples == 1:
            chars = gen.stream(args.prompt, seed=seed, **options)  # checks every argument
            _tell_seed(args.seed, seed)
            for ch in chars:
                out.write(ch)
                out.flush()  # one character at a time: the point of streaming
            out.write("\n")
        else:
            texts = gen.generate_batch(args.num_samples, prompt=args.prompt, seed=seed, **options)
            _tell_seed(args.seed, seed)
            for i, text in enumerate(texts):
                which = "greedy" if seed is None else f"seed {seed + i}"
                out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1}/{len(texts)} ({which}) ---\n{text}\n")
        out.flush()
    except BrokenPipeError:  # e.g. `| head`: the reader has all it wanted
        # Point stdout at /dev/null so that the flush at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        out.write("\n")
        return 130
    return 0


def _tell_seed(asked: int | None, used: int | None) -> None:
    if asked is None and used is not None:
        print(f"seed {used} (pass --seed {used} to repeat this text)", file=sys.stderr, flush=True)


def _eval(args: argparse.Namespace) -> int:
    from serve.onnx_model import OnnxModel
    from textgen.text import eval_ids

    if args.batch_size < 1:
        raise GeneratorError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = OnnxModel.load(args.model, num_threads=args.num_threads)
    info = model.info
    if info.model_config.get("kind", "char") != "char" or not isinstance(info.model_config.get("seq_len"), int):
        raise GeneratorError(f"{args.model}: {contract.META_MODEL_CONFIG} has no char-model seq_len; export it again")
    seq_len = info.model_config["seq_len"]
    val_fraction = None
    if args.split == "val":
        val_fraction = info.train_config.get("val_fraction")
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise GeneratorError(
                f"{args.model} does not say which part of the corpus was held out (no val_fraction in "
                f"{contract.META_TRAIN_CONFIG}); use --split all"
            )
    ids, skipped = eval_ids(args.corpus, model.vocabulary, info.lowercase, val_fraction, seq_len)
    total, chars, windows = model.window_loss(ids, seq_len, args.batch_size)
    loss = total / chars
    if not math.isfinite(loss):
        raise GeneratorError(f"{args.model} gives a {args.split} loss of {loss}: its weights produce non-finite "
                             "logits; export it again from a checkpoint that trained normally")
    val_loss = info.metrics.get("val_loss")
    print(json.dumps({
        "loss_nats": loss,
        "bpc": loss / math.log(2),
        "chars": chars,
        "windows": windows,
        "unknown_skipped": skipped,
        "split": args.split,
        "model_val_loss": val_loss if isinstance(val_loss, (int, float)) and math.isfinite(val_loss) else None,
    }, allow_nan=False), flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    if getattr(args, "serve_missing", False):
        raise GeneratorError(SERVE_EXTRA)
    try:
        import uvicorn

        from serve.http import create_app
        from serve.server import DrainingServer, uvicorn_options
        from serve.settings import ServeSettings
    except ImportError as e:
        raise GeneratorError(f"{SERVE_EXTRA} ({e})") from None
    from serve.generator import Generator

    settings = ServeSettings.from_env(**{name: getattr(args, name) for name in ServeSettings.model_fields})
    workers = _workers(args.workers)
    if not 0 <= args.port <= 65535:
        raise GeneratorError(f"--port must be 0 to 65535, got {args.port}")
    _warn_if_open(args.host, settings.api_keys())
    # Load here in every case: a bad model file fails now, with a clear message, before binding.
    gen = Generator.load(args.model, num_threads=settings.threads, max_chars_cap=settings.max_chars_cap,
                         max_prompt_chars=settings.max_prompt_chars)
    options = dict(host=args.host, port=args.port, log_level=args.log_level,
                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **uvicorn_options(settings))
    if workers == 1:  # drains on SIGTERM (serve.server), then exits 0
        server = DrainingServer(uvicorn.Config(create_app(generator=gen, settings=settings), **options),
                                settings.drain_seconds)
        server.run()
        if not server.started:
            raise GeneratorError(f"the server did not start on {args.host}:{args.port} (see the log above)")
    else:  # each worker process builds its app from the environment
        os.environ[MODEL_ENV] = os.path.abspath(args.model)
        for name, value in settings.model_dump().items():
            if value is not None:
                secret = getattr(value, "get_secret_value", None)
                os.environ[ServeSettings.env_name(name)] = secret() if secret else str(value)
        del gen
        uvicorn.run("serve.http:app_from_env", factory=True, workers=workers, **options)
    return 0


def _warn_if_open(host: str, keys: tuple[str, ...]) -> None:
    """A warning on stderr when the server listens beyond this machine without API keys."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        loopback = False
    if not loopback and not keys:
        print(f"warning: listening on {host} without API keys: anyone who reaches the port can generate; set "
              "--api-key or --api-key-file (TEXTGEN_API_KEY, TEXTGEN_API_KEY_FILE)", file=sys.stderr, flush=True)


def _workers(flag: int | None) -> int:
    """--workers, else $TEXTGEN_WORKERS, else 1."""
    workers = flag
    if workers is None:
        raw = os.environ.get(WORKERS_ENV, "").strip() or "1"
        if not raw.isdigit():
            raise GeneratorError(f"{WORKERS_ENV}={raw!r} is not a number of processes")
        workers = int(raw)
    if workers < 1:
        raise GeneratorError(f"--workers must be at least 1, got {workers}")
    return workers

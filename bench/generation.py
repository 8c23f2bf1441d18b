"""Generation benchmark: the notebook's loop against the ONNX generator, one JSON line per result.

    python -m bench.generation --model runs/default/model.onnx
    python -m bench.generation --random-weights      # a random-weight 2x256 model, exported here
    taskset -c 1 python -m bench.generation --model M --parts single,cost,batch --threads 1
    python -m bench.generation --model M --parts batch --threads 2     # both cores: no taskset

Measured in one run, each against the issue's goal (``--parts`` picks some, e.g. to pin the
one-thread figures to one core with taskset and run the two-thread batch without):

  single   ``Generator.generate``, one thread, temperature 0.8; also with top-p 0.95 and greedy
                                                                  goal >= 15,000 chars/s
  cost     where a single-stream character goes: one model call of K = 1 and of K = chunk (µs per
           call and per character), the Gumbel noise, and Python around the calls
  batch    ``generate_batch`` of 64 streams at temperature 0.8 (and with top-p 0.95), ``--threads``
           onnxruntime threads                                    goal >= 60,000 chars/s
  footprint  a fresh generator-only process: start -> first character, peak RSS
                                                                  goal <= 0.5 s, <= 100 MB
  quality  2,000 chars at temperature 0.8: zlib-compressed/raw >= 0.40, corpus words >= 90%,
           longest run copied from the corpus <= 60 chars (meaningless for random weights)
  notebook the seed notebook's loop: Keras ``model.predict`` on the 100-char window for every
           character, notebook-2x256 model (untrained: speed does not depend on the weights)

Speeds are the best and the median of ``--repeats`` runs (the machine is shared: the best is the
closest to an idle core). The benchmark process itself imports no TensorFlow: the notebook loop
and the random-weight export run in child processes, so the generator is measured as deployed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

from textgen.text import bundled_corpus_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "runs" / "default" / "model.onnx"
RANDOM_MODEL = Path("/tmp/textgen-bench/random-2x256.onnx")
GOALS = {
    "single_stream_chars_per_s": 15_000,
    "batch_chars_per_s": 60_000,
    "start_to_first_char_s": 0.5,
    "peak_rss_mb": 100,
    "zlib_ratio": 0.40,
    "corpus_word_fraction": 0.90,
    "longest_copied_run": 60,
}
SAMPLING = dict(temperature=0.8)  # the goals' setting: every row samples, no filter
TOP_P = dict(temperature=0.8, top_p=0.95)  # the loop with filters (sort, softmax, cumsum per step)
PARTS = ("single", "cost", "batch", "footprint", "quality", "notebook")


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


# ---------------------------------------------------------------------------------------------
# Children that need TensorFlow


def make_random_model(out: Path, precision: str = "int8") -> None:
    """Export the default preset (Embedding 64 -> 2x256 LSTM) with random weights via the real
    exporter (checkpoint -> ONNX, parity-checked)."""
    import tempfile

    import numpy as np

    from export.onnx import export_checkpoint
    from textgen import checkpoint as ckptlib
    from textgen.config import preset
    from textgen.model import build_model
    from textgen.text import Vocab, load_corpus

    cfg = preset("default")
    vocab = Vocab.from_text(load_corpus(None, lowercase=cfg.train.lowercase).text)
    model = build_model(cfg.model, vocab.size)
    rng = np.random.default_rng(0)
    for w in model.weights:  # zero biases: tf2onnx would fold the Dense bias away
        if not np.any(w.numpy()):
            w.assign(rng.normal(0, 0.1, w.shape).astype(np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ckptlib.save_checkpoint(
            Path(tmp) / "random", model, None, cfg.model, cfg.train, vocab,
            {"note": "random weights, for speed measurements only"}, {"epoch": 0},
        )
        export_checkpoint(ckpt, out, precision=precision)


def notebook_loop(chars: int) -> dict:
    """The notebook's generation: the 100-char window, scaled to [0, 1), through model.predict,
    argmax, slide the window by one character. Per character: one full 100-step LSTM pass."""
    import numpy as np

    from textgen.config import preset
    from textgen.model import build_model

    cfg = preset("notebook-2x256").model
    vocab_size = 45
    model = build_model(cfg, vocab_size)
    window = list(np.random.default_rng(0).integers(0, vocab_size, cfg.seq_len))
    model.predict(np.zeros((1, cfg.seq_len, 1), np.float32), verbose=0)  # build and trace once
    t0 = time.perf_counter()
    for _ in range(chars):
        x = np.reshape(window, (1, cfg.seq_len, 1)) / float(vocab_size)
        index = int(np.argmax(model.predict(x, verbose=0)))
        window = window[1:] + [index]
    elapsed = time.perf_counter() - t0
    return {"bench": "notebook", "model": "notebook-2x256 (untrained)", "chars": chars,
            "chars_per_s": chars / elapsed, "ms_per_char": 1000 * elapsed / chars}


def run_child(args: list[str], timeout: float = 900) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.generation", *args], capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The generator


def _speeds(runs: dict, repeats: int) -> dict:
    """``runs``: name -> a function returning the characters it made. Each runs ``repeats`` times,
    round-robin (so that all see the same share of a busy machine) -> best and median chars/s."""
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            chars = run()
            speeds[name].append(chars / (time.perf_counter() - t0))
    out = {}
    for name, values in speeds.items():
        out[f"{name}chars_per_s"] = max(values)
        out[f"{name}median_chars_per_s"] = statistics.median(values)
    return out


def single_stream(gen, chars: int, repeats: int) -> dict:
    gen.generate("alice ", max_chars=500, seed=1, **TOP_P)  # warm up
    seeds = iter(range(1_000_000))

    def run(kwargs):
        return lambda: len(gen.generate("alice ", max_chars=chars, seed=next(seeds), **kwargs))

    speeds = _speeds({"": run(SAMPLING), "top_p_": run(TOP_P), "greedy_": run(dict(temperature=0))}, repeats)
    return {"bench": "single_stream", "threads": 1, "chars": chars, "chunk_size": gen.chunk_size, **SAMPLING,
            **speeds, "top_p": TOP_P["top_p"], "goal": GOALS["single_stream_chars_per_s"],
            "meets_goal": speeds["chars_per_s"] >= GOALS["single_stream_chars_per_s"]}


def _best_us(fns: dict, calls: dict, rounds: int = 7) -> dict:
    """Microseconds per call of each function: the best of ``rounds`` blocks of ``calls[name]``
    calls, the functions taking turns (the best block is the closest to the cost on an idle core)."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls[name])
    return {name: 1e6 * b for name, b in best.items()}


def call_cost(gen, chars: int = 4096) -> dict:
    """Where a single-stream character goes: model calls of K = 1 and K = chunk (their difference
    gives the cost of a character and of a call), the Gumbel noise, and ``generate`` as a whole."""
    import numpy as np

    from serve.sampling import RowNoise

    model, k = gen.model, gen.chunk_size
    settings = model.settings(1, SAMPLING["temperature"])
    noise = RowNoise([np.random.default_rng(0)], model.info.vocab_size)
    state, ids = model.zero_state(1), np.array([[1]], np.int32)
    one, chunk = noise.take(1), noise.take(k)
    us = _best_us({"call_1": lambda: model.chunk(ids, state, one, settings),
                   "call_k": lambda: model.chunk(ids, state, chunk, settings),
                   "noise": lambda: noise.take(k),
                   "generate": lambda: gen.generate("alice ", max_chars=chars, seed=0, **SAMPLING)},
                  {"call_1": 100, "call_k": max(1, 1000 // k), "noise": 100, "generate": 1})
    per_char = (us["call_k"] - us["call_1"]) / (k - 1) if k > 1 else us["call_k"]
    total = us["generate"] / chars
    return {"bench": "call_cost", "chunk_size": k, "call_k1_us": us["call_1"], "call_chunk_us": us["call_k"],
            "char_us": per_char, "call_overhead_us": us["call_1"] - per_char, "noise_us_per_char": us["noise"] / k,
            "generate_us_per_char": total, "python_us_per_char": total - us["call_k"] / k - us["noise"] / k}


def batch(gen, streams: int, chars: int, threads: int, repeats: int = 2, sampling: dict | None = None) -> dict:
    sampling = SAMPLING if sampling is None else sampling
    gen.generate_batch(streams, prompt="alice ", max_chars=50, seed=0, **sampling)  # warm up
    seeds = iter(range(0, 1_000_000, streams))

    def run() -> int:
        return sum(map(len, gen.generate_batch(streams, prompt="alice ", max_chars=chars, seed=next(seeds),
                                               **sampling)))

    speeds = _speeds({"": run}, repeats)
    return {"bench": "batch", "streams": streams, "threads": threads, "chars_per_stream": chars,
            "chunk_size": gen.chunk_size, **sampling, **speeds,
            "per_stream_chars_per_s": speeds["chars_per_s"] / streams,
            "goal": GOALS["batch_chars_per_s"], "meets_goal": speeds["chars_per_s"] >= GOALS["batch_chars_per_s"]}


FOOTPRINT_CHILD = """
import json, resource, sys
from serve import Generator
gen = Generator.load(sys.argv[1])
chars = gen.stream("", max_chars=1000, seed=0, temperature=0.8)
sys.stdout.write(next(chars) + "\\n"); sys.stdout.flush()
for _ in chars:
    pass
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "keras", "tf2onnx", "ray", "textgen"})
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded": loaded}))
"""


def footprint(model: Path, runs: int = 3) -> dict:
    """A fresh interpreter: start -> first generated character (wall time seen by the parent), and
    the peak RSS of the child after 1,000 characters. Best of ``runs`` starts (warm page cache)."""
    firsts, rss, loaded = [], 0.0, None
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", FOOTPRINT_CHILD, str(model)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd="/", env=child_env())
        proc.stdout.readline()
        firsts.append(time.perf_counter() - t0)
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise SystemExit(f"footprint child failed:\n{err}")
        result = json.loads(out)
        rss, loaded = max(rss, result["peak_rss_mb"]), result["loaded"]
    cli = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(Path(sys.executable).parent / "textgen"), "generate", str(model),
                                 "--max-chars", "1", "--seed", "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd="/", env=child_env())
        proc.stdout.read(1)
        cli.append(time.perf_counter() - t0)
        proc.communicate(timeout=60)
    first = min(firsts)
    return {"bench": "footprint", "start_to_first_char_s": first, "start_to_first_char_all_s": firsts,
            "cli_start_to_first_char_s": min(cli), "peak_rss_mb": rss, "training_stack_loaded": loaded,
            "goals": {k: GOALS[k] for k in ("start_to_first_char_s", "peak_rss_mb")},
            "meets_goal": first <= GOALS["start_to_first_char_s"] and rss <= GOALS["peak_rss_mb"]}


def longest_common_run(text: str, corpus: str) -> tuple[int, str]:
    """Longest substring of ``text`` that occurs in ``corpus`` (suffix automaton of the corpus)."""
    link, length, trans = [-1], [0], [{}]
    last = 0
    for ch in corpus:
        cur = len(length)
        length.append(length[last] + 1)
        link.append(-1)
        trans.append({})
        p = last
        while p != -1 and ch not in trans[p]:
            trans[p][ch] = cur
            p = link[p]
        if p == -1:
            link[cur] = 0
        else:
            q = trans[p][ch]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(length)
                length.append(length[p] + 1)
                link.append(link[q])
                trans.append(dict(trans[q]))
                while p != -1 and trans[p].get(ch) == q:
                    trans[p][ch] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        last = cur
    state, run, best, best_end = 0, 0, 0, 0
    for i, ch in enumerate(text):
        while state and ch not in trans[state]:
            state = link[state]
            run = length[state]
        if ch in trans[state]:
            state, run = trans[state][ch], run + 1
        if run > best:
            best, best_end = run, i + 1
    return best, text[best_end - best : best_end]


def quality(gen, corpus_path: Path, chars: int = 2000) -> dict:
    from textgen.text import read_corpus

    corpus = read_corpus([corpus_path], lowercase=gen.lowercase)
    text = gen.generate("", max_chars=chars, temperature=0.8, seed=0)
    raw = text.encode("utf-8")
    words = re.findall(r"[a-z]+", text.lower())
    corpus_words = set(re.findall(r"[a-z]+", corpus.lower()))
    fraction = sum(w in corpus_words for w in words) / max(len(words), 1)
    run, copied = longest_common_run(text, corpus)
    ratio = len(zlib.compress(raw, 9)) / len(raw)
    return {"bench": "quality", "chars": chars, "temperature": 0.8, "zlib_ratio": ratio,
            "corpus_word_fraction": fraction, "words": len(words), "longest_copied_run": run,
            "longest_copied_text": copied, "sample": text[:300],
            "goals": {k: GOALS[k] for k in ("zlib_ratio", "corpus_word_fraction", "longest_copied_run")},
            "meets_goal": ratio >= GOALS["zlib_ratio"] and fraction >= GOALS["corpus_word_fraction"]
            and run <= GOALS["longest_copied_run"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help=f"exported model (default: {DEFAULT_MODEL.relative_to(REPO)})")
    p.add_argument("--random-weights", action="store_true",
                   help=f"measure a random-weight default-preset model (exported once to {RANDOM_MODEL})")
    p.add_argument("--corpus", type=Path, default=bundled_corpus_path(), help="corpus for the quality figures")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated parts to run, of: %(default)s (default: all)")
    p.add_argument("--threads", default="1,2", help="onnxruntime threads of the batch part, comma-separated "
                                                   "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs per speed figure (best and median; default 3)")
    p.add_argument("--chunk-size", type=int, help="the generator's chunk_size (default: its own)")
    p.add_argument("--chars", type=int, default=20_000, help="characters of the single-stream run")
    p.add_argument("--streams", type=int, default=64, help="rows of the batch run")
    p.add_argument("--batch-chars", type=int, default=1_000, help="characters per row of the batch run")
    p.add_argument("--notebook-chars", type=int, default=30, help="characters of the notebook loop")
    p.add_argument("--child", choices=("notebook", "random-model"), help=argparse.SUPPRESS)
    p.add_argument("--precision", default="int8", help=argparse.SUPPRESS)  # of the random-model child
    args = p.parse_args(argv)

    if args.child == "notebook":
        emit(notebook_loop(args.notebook_chars))
        return 0
    if args.child == "random-model":
        make_random_model(args.model, args.precision)
        emit({"bench": "random_model", "path": str(args.model)})
        return 0
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown --parts {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    model = args.model or (RANDOM_MODEL if args.random_weights else DEFAULT_MODEL)
    if args.random_weights and not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        run_child(["--child", "random-model", "--model", str(model)])
    if not model.exists():
        raise SystemExit(f"no model at {model}: train and export one, pass --model, or use --random-weights")

    from serve import Generator

    chunk = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    gen = Generator.load(model, num_threads=1, **chunk)
    info = gen.model.info
    emit({"bench": "model", "path": str(model), "lstm_units": info.model_config.get("lstm_units"),
          "vocab": len(info.vocab), "val_loss": info.metrics.get("val_loss"),
          "loop_precision": info.generation.get("precision"), "random_weights": args.random_weights,
          "cpu_count": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0))})
    if "single" in parts:
        emit(single_stream(gen, args.chars, args.repeats))
    if "cost" in parts:
        emit(call_cost(gen))
    if "batch" in parts:
        for threads in (int(t) for t in args.threads.split(",")):
            g = gen if threads == 1 else Generator.load(model, num_threads=threads, **chunk)
            emit(batch(g, args.streams, args.batch_chars, threads, args.repeats))
            emit(batch(g, args.streams, args.batch_chars, threads, args.repeats, sampling=TOP_P))
    if "footprint" in parts:
        emit(footprint(model))
    if "quality" in parts:
        emit(quality(gen, args.corpus))
    if "notebook" in parts:
        emit(run_child(["--child", "notebook", "--notebook-chars", str(args.notebook_chars)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

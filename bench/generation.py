"""Generation benchmark: the notebook's loop against the ONNX generator, one JSON line per result.

    python -m bench.generation --model runs/default/model.onnx
    python -m bench.generation --random-weights      # a random-weight 2x256 model, exported here

Measured in one run, each against the issue's goal:

  notebook       the seed notebook's loop: Keras ``model.predict`` on the 100-char window for every
                 character, seed-2x256 model (untrained: speed does not depend on the weights)
  single_stream  ``Generator.generate``, one thread, temperature 0.8, top-p 0.95   goal >= 15,000 chars/s
  step_cost      where a single-stream character goes: model step vs sampling (microseconds)
  batch          ``generate_batch`` of 64 streams, one thread and all cores       goal >= 60,000 chars/s
  footprint      a fresh generator-only process: start -> first character, peak RSS
                                                                    goal <= 0.5 s, <= 100 MB
  quality        2,000 chars at temperature 0.8: zlib-compressed/raw >= 0.40, corpus words >= 90%,
                 longest run copied from the corpus <= 60 chars (meaningless for random weights)

The benchmark process itself imports no TensorFlow: the notebook loop and the random-weight export
run in child processes, so the generator is measured as it is deployed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED_CORPUS = REPO / "textgen" / "data" / "alice_in_wonderland.txt"
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
SAMPLING = dict(temperature=0.8, top_k=0, top_p=0.95)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


# ---------------------------------------------------------------------------------------------
# Children that need TensorFlow


def make_random_model(out: Path) -> None:
    """Export the default preset (Embedding 64 -> 2x256 LSTM) with random weights via the real
    exporter (checkpoint -> ONNX, parity-checked)."""
    import tempfile

    from export.onnx import export_checkpoint
    from textgen import checkpoint as ckptlib
    from textgen.config import preset
    from textgen.corpus import load_corpus
    from textgen.model import build_model
    from textgen.vocab import Vocab

    cfg = preset("default")
    vocab = Vocab.from_text(load_corpus(None, lowercase=cfg.train.lowercase).text)
    model = build_model(cfg.model, vocab.size)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ckptlib.save_checkpoint(
            Path(tmp) / "random", model, None, cfg.model, cfg.train, vocab,
            {"note": "random weights, for speed measurements only"}, {"epoch": 0},
        )
        export_checkpoint(ckpt, out)


def notebook_loop(chars: int) -> dict:
    """The notebook's generation: the 100-char window, scaled to [0, 1), through model.predict,
    argmax, slide the window by one character. Per character: one full 100-step LSTM pass."""
    import numpy as np

    from textgen.config import preset
    from textgen.model import build_model

    cfg = preset("seed-2x256").model
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
    return {"bench": "notebook", "model": "seed-2x256 (untrained)", "chars": chars,
            "chars_per_s": chars / elapsed, "ms_per_char": 1000 * elapsed / chars}


def run_child(args: list[str], timeout: float = 900) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.generation", *args], capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"bench child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The generator


def single_stream(gen, chars: int) -> dict:
    gen.generate("alice ", max_chars=200, seed=1, **SAMPLING)  # warm up
    best = 0.0
    for seed in range(3):  # best of three: the machine is shared
        t0 = time.perf_counter()
        text = gen.generate("alice ", max_chars=chars, seed=seed, **SAMPLING)
        best = max(best, len(text) / (time.perf_counter() - t0))
    greedy_t0 = time.perf_counter()
    gen.generate("alice ", max_chars=chars, temperature=0)
    greedy = chars / (time.perf_counter() - greedy_t0)
    return {"bench": "single_stream", "threads": 1, "chars": chars, **SAMPLING, "chars_per_s": best,
            "greedy_chars_per_s": greedy, "goal": GOALS["single_stream_chars_per_s"],
            "meets_goal": best >= GOALS["single_stream_chars_per_s"]}


def _best_us(fn, steps: int, blocks: int = 5) -> float:
    """Microseconds per call of ``fn``: the best of ``blocks`` blocks of ``steps`` calls (the
    machine is shared; the best block is the closest to the cost on an idle core)."""
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return 1e6 * best


def step_cost(gen, steps: int = 1000) -> dict:
    """Microseconds per character: the model step alone (io_binding and plain ``run``), the
    sampler alone, and the whole ``generate`` loop."""
    import numpy as np

    from serve.sampling import RowUniforms, Sampler

    model = gen.model
    stepper = model.stepper(model.zero_state(1))
    ids = np.array([1], np.int32)
    step_us = _best_us(lambda: stepper.step(ids), steps)
    plain_run_us = _best_us(lambda: model.run(ids[:, None], stepper.state), steps)
    sampler, uniforms = Sampler(**SAMPLING), RowUniforms([np.random.default_rng(0)])
    logits = np.array(stepper.step(ids))
    sample_us = _best_us(lambda: sampler(logits, uniforms.next()), steps)
    greedy = Sampler(temperature=0)
    greedy_us = _best_us(lambda: greedy(logits), steps)
    total_us = _best_us(lambda: gen.generate("alice ", max_chars=steps, seed=0, **SAMPLING), 1) / steps
    return {"bench": "step_cost", "step_io_binding_us": step_us, "step_plain_run_us": plain_run_us,
            "sample_us": sample_us, "greedy_pick_us": greedy_us, "generate_us_per_char": total_us,
            "other_us": total_us - step_us - sample_us}


def batch(gen, streams: int, chars: int, threads: int) -> dict:
    gen.generate_batch(streams, prompt="alice ", max_chars=50, seed=0, **SAMPLING)  # warm up
    best = 0.0
    for seed in range(2):
        t0 = time.perf_counter()
        texts = gen.generate_batch(streams, prompt="alice ", max_chars=chars, seed=seed * streams, **SAMPLING)
        best = max(best, sum(map(len, texts)) / (time.perf_counter() - t0))
    return {"bench": "batch", "streams": streams, "threads": threads, "chars_per_stream": chars, **SAMPLING,
            "chars_per_s": best, "per_stream_chars_per_s": best / streams,
            "goal": GOALS["batch_chars_per_s"], "meets_goal": best >= GOALS["batch_chars_per_s"]}


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
    from serve.text import read_corpus

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
    p.add_argument("--corpus", type=Path, default=BUNDLED_CORPUS, help="corpus for the quality figures")
    p.add_argument("--chars", type=int, default=20_000, help="characters of the single-stream run")
    p.add_argument("--streams", type=int, default=64, help="rows of the batch run")
    p.add_argument("--batch-chars", type=int, default=1_000, help="characters per row of the batch run")
    p.add_argument("--notebook-chars", type=int, default=30, help="characters of the notebook loop")
    p.add_argument("--skip-notebook", action="store_true", help="do not run the (slow, TensorFlow) notebook loop")
    p.add_argument("--child", choices=("notebook", "random-model"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child == "notebook":
        emit(notebook_loop(args.notebook_chars))
        return 0
    if args.child == "random-model":
        make_random_model(args.model)
        emit({"bench": "random_model", "path": str(args.model)})
        return 0

    model = args.model or (RANDOM_MODEL if args.random_weights else DEFAULT_MODEL)
    if args.random_weights and not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        run_child(["--child", "random-model", "--model", str(model)])
    if not model.exists():
        raise SystemExit(f"no model at {model}: train and export one, pass --model, or use --random-weights")

    from serve import Generator

    gen = Generator.load(model, num_threads=1)
    info = gen.model.info
    emit({"bench": "model", "path": str(model), "lstm_units": info.model_config.get("lstm_units"),
          "vocab": len(info.vocab), "val_loss": info.metrics.get("val_loss"),
          "random_weights": args.random_weights, "cpu_count": os.cpu_count()})
    emit(single_stream(gen, args.chars))
    emit(step_cost(gen))
    emit(batch(gen, args.streams, args.batch_chars, threads=1))
    cores = os.cpu_count() or 1
    if cores > 1:
        emit(batch(Generator.load(model, num_threads=cores), args.streams, args.batch_chars, threads=cores))
    emit(footprint(model))
    emit(quality(gen, args.corpus))
    if not args.skip_notebook:
        emit(run_child(["--child", "notebook", "--notebook-chars", str(args.notebook_chars)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

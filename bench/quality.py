"""Quality: held-out loss after a budget, and what a T 0.8 sample of the best model looks like.

    .venv/bin/python -m bench.quality [--minutes 10 | --epochs 30] [--presets default notebook-2x256]
        [--label NAME] [--corpus FILE ...] [-- more textgen train flags]

Runs ``textgen train --preset P`` for each preset, one after the other (the bundled corpus unless
``--corpus``), and prints one JSON line each: best validation loss in nats and bpc, epochs,
training chars/s and, for the ``char`` kind, the best checkpoint exported and a sample of
``--sample-chars`` at temperature 0.8 (seed 0) measured three ways:

- ``corpus_words``: the share of the sample's words that are words of the corpus;
- ``zlib_ratio``: compressed / raw bytes of the sample (low: it repeats itself);
- ``longest_copy``: the longest run of the sample found verbatim in the corpus (high: it recites).

The same three figures of a stretch of the corpus itself are printed first, as the yardstick.
Extra ``textgen train`` flags follow ``--``, e.g. ``-- --dropout 0.3``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

from textgen.text import read_corpus

WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def corpus_words(sample: str, words: set[str]) -> float:
    found = WORD.findall(sample.lower())
    return sum(w in words for w in found) / max(len(found), 1)


def zlib_ratio(sample: str) -> float:
    raw = sample.encode("utf-8")
    return len(zlib.compress(raw, 9)) / max(len(raw), 1)


def longest_copy(sample: str, corpus: str) -> int:
    """The longest substring of ``sample`` that occurs in ``corpus`` (binary search on the length:
    a copy of length n contains copies of every shorter length)."""
    def has_copy(n: int) -> bool:
        seen = {corpus[i:i + n] for i in range(len(corpus) - n + 1)}
        return any(sample[i:i + n] in seen for i in range(len(sample) - n + 1))

    lo, hi = 0, len(sample)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if has_copy(mid) else (lo, mid - 1)
    return lo


def sample_figures(sample: str, corpus: str) -> dict[str, float]:
    return {"corpus_words": round(corpus_words(sample, set(WORD.findall(corpus))), 4),
            "zlib_ratio": round(zlib_ratio(sample), 4), "longest_copy": longest_copy(sample, corpus)}


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def sample_of(checkpoint: str, out: Path, chars: int) -> str:
    """``chars`` characters at T 0.8, seed 0, from the exported checkpoint, after a one-space prompt."""
    onnx = out / "model.onnx"
    _run([sys.executable, "-m", "textgen", "export", checkpoint, "--out", str(onnx)])
    return _run([sys.executable, "-m", "textgen", "generate", str(onnx), "--max-chars", str(chars),
                 "--temperature", "0.8", "--seed", "0"])


def train(name: str, args: argparse.Namespace, out: Path) -> dict:
    budget = ["--max-minutes", str(args.minutes)] if args.epochs is None else ["--epochs", str(args.epochs)]
    corpus = ["--corpus", *args.corpus] if args.corpus else []
    cmd = [sys.executable, "-m", "textgen", "train", "--preset", name, *budget, *corpus,
           "--out", str(out), "--no-progress", *args.extra]
    return json.loads(_run(cmd).strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--epochs", type=int, help="a budget in epochs instead of --minutes (the same steps on a busy machine)")
    p.add_argument("--presets", nargs="+", default=["default", "notebook-2x256"])
    p.add_argument("--label", default="", help="a name for this run in the JSON lines")
    p.add_argument("--corpus", nargs="+", help="train on these files (default: the bundled book)")
    p.add_argument("--sample-chars", type=int, default=2000)
    p.add_argument("--keep", help="keep the runs under this directory (default: a temp dir)")
    p.add_argument("extra", nargs="*", help="more `textgen train` flags (after --)")
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="textgen-quality-"))
    text = read_corpus(args.corpus).text
    yardstick = text[len(text) // 2: len(text) // 2 + args.sample_chars]
    print(json.dumps({"bench": "quality", "corpus_stretch": sample_figures(yardstick, text)}), flush=True)
    for name in args.presets:
        out = root / f"{name}-{args.label or 'run'}"
        r = train(name, args, out)
        line = {"bench": "quality", "preset": name, "label": args.label, "minutes": args.minutes,
                "epochs_budget": args.epochs, "extra": args.extra, **{k: r[k] for k in (
                    "best_val_loss", "best_val_bpc", "best_epoch", "epochs", "train_chars_per_s",
                    "stopped_by", "checkpoint")}}
        if not name.startswith("notebook"):
            sample = sample_of(r["checkpoint"], out, args.sample_chars)
            line.update(sample_figures(sample, text), sample_head=sample[:300])
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

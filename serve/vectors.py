"""Conformance vectors: cases (prompt, settings, seed) with the text the Python generator makes and
the logits after the prompt, for any port of the generator to run (docs/format.md, "Conformance").

    textgen vectors model.onnx --out vectors.json     # write them (or python -m serve.vectors ...)
    textgen vectors model.onnx --check vectors.json   # run them against this generator

The file: {"format": VECTORS_FORMAT, "model_sha256", "noise", "gumbel_table_sha256", "noise_samples":
[{"seed", "position", "index", "value"}], "cases": [{"prompt", "options", "text", "first_logits",
"first_logits_sha256"}]}. Seeds are decimal strings (they pass 2**53); ``options`` use the
Generator's keyword names; ``first_logits`` are the float32 logits (V,) after the prompt's ids from
the zero state (a K = 0 call), ``first_logits_sha256`` the sha256 of their little-endian bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from textgen import contract as C
from textgen.errors import TextgenError, report_errors
from textgen.files import atomic_write

if TYPE_CHECKING:  # the generator loads onnxruntime: imported when a command runs
    from serve.generator import Generator

VECTORS_FORMAT = "textgen-conformance-v1"
LOGITS_TOLERANCE = 1e-4  # another runtime's kernels may round differently; the texts must not differ
BIG_SEED = 2**63 - 1  # the largest seed a request may give
CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("alice was ", dict(max_chars=120, temperature=0.8, seed=1)),
    ("alice was ", dict(max_chars=80, temperature=0)),
    ("the queen ", dict(max_chars=100, temperature=1.0, top_k=5, seed=7)),
    ("the queen ", dict(max_chars=100, temperature=0.9, top_p=0.9, seed=8)),
    ("", dict(max_chars=100, temperature=0.7, top_k=20, top_p=0.95, seed=BIG_SEED)),
    ("Alice, Said The Cat", dict(max_chars=200, temperature=0.8, seed=3, stop=["\n", ". "])),
    ("said alicé", dict(max_chars=60, temperature=1.2, seed=2**40 + 1, unknown="skip")),
    ("said alicé", dict(max_chars=60, temperature=0.5, seed=12, unknown="replace", replacement=" ")),
    ("", dict(max_chars=0, temperature=0.8, seed=1)),
)
NOISE_SAMPLES = ((0, 0, 0), (1, 0, 3), (1, 31, 44), (2**32, 7, 1), (BIG_SEED, 1000, 2), (BIG_SEED + 1, 5, 5))


def first_logits(gen: Generator, prompt: str, options: dict[str, Any]) -> np.ndarray:
    ids = gen.encode(prompt, gen.params(**options))
    logits, _ = gen.model.run(ids[None])
    return logits[0, -1]


def make_vectors(gen: Generator) -> dict[str, Any]:
    cases = []
    for prompt, options in CASES:
        logits = first_logits(gen, prompt, options)
        shown = {k: str(v) if k == "seed" else v for k, v in options.items()}
        cases.append({"prompt": prompt, "options": shown, "text": gen.generate(prompt, **options),
                      "first_logits": [float(x) for x in logits],
                      "first_logits_sha256": hashlib.sha256(logits.astype("<f4").tobytes()).hexdigest()})
    samples = [{"seed": str(s), "position": j, "index": v, "value": C.hash_gumbel(s, j, v)} for s, j, v in NOISE_SAMPLES]
    stored = C.content_sha256(open(gen.model.path, "rb").read())
    return {"format": VECTORS_FORMAT, "model_sha256": stored[0] if stored else None, "noise": gen.model.info.noise,
            "gumbel_table_sha256": C.GUMBEL_TABLE_SHA256, "logits_tolerance": LOGITS_TOLERANCE,
            "noise_samples": samples, "cases": cases}


def check_vectors(gen: Generator, vectors: dict[str, Any]) -> list[str]:
    """What of ``vectors`` this generator does not reproduce (an empty list: all of it)."""
    problems = []
    for s in vectors["noise_samples"]:
        if C.hash_gumbel(int(s["seed"]), s["position"], s["index"]) != s["value"]:
            problems.append(f"noise at {s}")
    for i, case in enumerate(vectors["cases"]):
        options = {k: int(v) if k == "seed" else v for k, v in case["options"].items()}
        if gen.generate(case["prompt"], **options) != case["text"]:
            problems.append(f"case {i}: text differs")
        logits = first_logits(gen, case["prompt"], options)
        if np.abs(logits - np.asarray(case["first_logits"], np.float32)).max() > vectors["logits_tolerance"]:
            problems.append(f"case {i}: first logits differ")
    return problems


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the exported model (.onnx)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="write the vectors (JSON) here")
    group.add_argument("--check", help="run these vectors against this generator")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.vectors", description=__doc__.split("\n\n")[0])
    add_args(p)
    return report_errors(run, p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Write (``--out``) or check (``--check``) the vectors of ``args.model``."""
    from serve.generator import Generator

    gen = Generator.load(args.model)
    if args.out:
        vectors = make_vectors(gen)
        atomic_write(args.out, (json.dumps(vectors, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
        print(json.dumps({"path": args.out, "cases": len(vectors["cases"])}))
        return 0
    with open(args.check, encoding="utf-8") as f:
        problems = check_vectors(gen, json.load(f))
    if problems:
        raise TextgenError(f"{args.check}: {'; '.join(problems)}")
    print(json.dumps({"checked": args.check, "problems": 0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Embedding figures, one run: single-stream chars/s of the Python generator with format 2's hash
noise and with format 1's PCG64 noise (the same graph: a format-1 copy of the file), int8 vs fp32
files, and the JS generator (onnxruntime-node; onnxruntime-web's wasm under Node) beside them.

    taskset -c 1 python -m bench.embed --random-weights            # the default preset, random weights
    taskset -c 1 python -m bench.embed --model M --fp32-model M32

Prints one JSON line per figure. Page load -> first character: ``python -m bench.pages``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.generation import RANDOM_MODEL, REPO, emit, run_child, single_stream

RANDOM_FP32_MODEL = RANDOM_MODEL.with_name("random-2x256-fp32.onnx")


def as_format_1(proto) -> None:
    """A format-2 proto made what the format-1 exporter wrote: no metadata_json, no noise key, version 1
    (the graph is otherwise the same; seal the content hash again after this)."""
    from textgen import contract as C

    graph = proto.graph
    for out in [o for o in graph.output if o.name == C.METADATA_JSON]:
        graph.output.remove(out)
    for node in [n for n in graph.node if C.METADATA_JSON in n.output]:
        graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name == "gen_metadata_json"]:
        graph.initializer.remove(init)
    for p in proto.metadata_props:
        if p.key == C.META_FORMAT_VERSION:
            p.value = "1"
        if p.key == C.META_GENERATION:
            p.value = json.dumps({k: v for k, v in json.loads(p.value).items() if k != "noise"})


def sealed_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` changed by ``edit(proto)`` and sealed again like an export (its content
    hash recomputed)."""
    import onnx

    from textgen import contract as C

    proto = onnx.load(str(src))
    edit(proto)
    for p in proto.metadata_props:
        if p.key == C.META_CONTENT_SHA256:
            p.value = C.CONTENT_HASH_PLACEHOLDER
    dst.write_bytes(C.seal_content_hash(proto.SerializeToString()))
    return dst


def format_1_copy(src: Path, dst: Path) -> Path:
    return sealed_copy(src, dst, as_format_1)


def interleaved(models: dict[str, Path], chars: int, rounds: int) -> dict:
    """Single-stream chars/s of several files, their runs taking turns (round-robin, ``rounds``
    times): a busy moment of the machine hurts each alike. Best and median per file."""
    import statistics
    import time

    from serve import Generator

    gens = {label: Generator.load(path) for label, path in models.items()}
    speeds: dict[str, list[float]] = {label: [] for label in gens}
    for r in range(rounds + 1):
        for label, gen in gens.items():
            t0 = time.perf_counter()
            n = len(gen.generate("alice ", max_chars=chars, temperature=0.8, seed=r))
            if r:  # the first round warms up
                speeds[label].append(n / (time.perf_counter() - t0))
    return {"bench": "noise_interleaved", "chars": chars, "rounds": rounds,
            **{label: {"chars_per_s": max(v), "p75_chars_per_s": statistics.quantiles(v, n=4)[2],
                       "median_chars_per_s": statistics.median(v)} for label, v in speeds.items()}}


def python_single(model: Path, label: str, chars: int, repeats: int) -> dict:
    from serve import Generator

    gen = Generator.load(model)
    return {**single_stream(gen, chars, repeats), "bench": "python_single_stream", "model": label,
            "format_version": gen.model.info.format_version, "noise": gen.model.info.noise,
            "precision": gen.model.info.generation.get("precision")}


def js_single(model: Path, chars: int, repeats: int) -> list[dict]:
    proc = subprocess.run(["node", "bench.js", str(model), str(chars), str(repeats)], cwd=REPO / "js",
                          capture_output=True, text=True, timeout=900, check=True)
    return [{**json.loads(line), "model": model.name} for line in proc.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="an int8 export (default with --random-weights: the bench's)")
    p.add_argument("--fp32-model", type=Path, help="an fp32 export of the same checkpoint")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--chars", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    model = args.model or RANDOM_MODEL
    fp32 = args.fp32_model or (RANDOM_FP32_MODEL if args.random_weights else None)
    for path, precision in ((model, "int8"), (fp32, "fp32")):
        if args.random_weights and path is not None and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            run_child(["--child", "random-model", "--model", str(path), "--precision", precision])
    with tempfile.TemporaryDirectory() as tmp:
        old = format_1_copy(model, Path(tmp) / "format1.onnx")
        emit(interleaved({"format 2 (hash noise)": model, "format 1 (PCG64 noise)": old}, 4000, 40))
        emit(python_single(model, "format 2 (hash noise)", args.chars, args.repeats))
    if fp32 is not None:
        emit(python_single(fp32, "fp32", args.chars, args.repeats))
    for row in js_single(model, args.chars, args.repeats) + (js_single(fp32, args.chars, args.repeats) if fp32 else []):
        emit(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

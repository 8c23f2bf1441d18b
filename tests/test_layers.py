"""The import direction: corpus -> vocabulary -> windows -> model -> training -> Ray job ->
checkpoint -> export -> generator -> CLI/HTTP. Each test imports in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def modules_loaded_by(code: str) -> list[str]:
    script = textwrap.dedent(code) + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("core", ["textgen.train", "textgen.checkpoint", "textgen.windows", "jobs.train"])
def test_training_core_imports_neither_onnxruntime_nor_the_generator(core):
    loaded = modules_loaded_by(f"import {core}")
    assert not [m for m in loaded if m == "onnxruntime" or m == "serve" or m.startswith("serve.")], core


def test_bottom_layer_is_stdlib_and_numpy_only():
    loaded = modules_loaded_by("import textgen.contract, textgen.errors, textgen.text")
    heavy = {"tensorflow", "keras", "onnxruntime", "onnx", "ray", "fastapi", "pydantic", "serve"}
    assert not heavy & {m.split(".")[0] for m in loaded}


def test_serve_leaf_modules_do_not_load_onnxruntime():
    loaded = modules_loaded_by("import serve, serve.params, serve.sampling")
    assert "onnxruntime" not in loaded


def test_public_import_is_the_generator_without_tensorflow():
    loaded = modules_loaded_by("from textgen import Generator\nassert Generator.__module__ == 'serve.generator'")
    assert "onnxruntime" in loaded and "tensorflow" not in loaded and "keras" not in loaded


# The import order, bottom first. A module may import its own rank or below, never above. The
# checkpoint layout sits under the loop that writes it (and the Ray job that reports it); the CLIs
# (textgen.cli and the front ends it delegates to) sit on top of everything.
RANKS = [
    ("textgen.errors", "textgen.contract", "textgen.files", "textgen.text"),
    ("textgen.prepare",),
    ("textgen.dataset",),
    ("textgen.config",),
    ("textgen.windows",),
    ("textgen.model",),
    ("textgen.checkpoint", "textgen.runs", "textgen.samples"),
    ("textgen.finetune", "textgen.observe"),
    ("textgen.train", "textgen.dyneval"),
    ("jobs.train", "jobs.__main__"),
    ("export.generation",),
    ("export.onnx",),
    ("serve.params", "serve.sampling"),
    ("serve.onnx_model",),
    ("serve.decode",),
    ("serve.generator",),
    ("serve.settings",),
    ("serve.vectors",),
    ("serve.engine",),
    ("serve.auth", "serve.metrics", "serve.streaming"),
    ("serve.openai_api",),
    ("serve.page",),
    ("serve.http", "serve.server"),
    ("serve.ray_serve",),
    ("export.cli", "serve.cli"),
    ("textgen.cli", "textgen.__main__"),
]
RANK = {m: r for r, mods in enumerate(RANKS) for m in mods}


def imports_of(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_every_import_points_down():
    wrong = []
    for pkg in ("textgen", "jobs", "export", "serve"):
        for path in sorted((REPO / pkg).glob("*.py")):
            if path.stem == "__init__":  # packages: lazy re-exports for embedders, not layers
                continue
            module = f"{pkg}.{path.stem}"
            assert module in RANK, f"{module} has no place in tests/test_layers.py RANKS"
            for target in imports_of(path):
                if target in RANK and RANK[target] > RANK[module]:
                    wrong.append(f"{module} imports {target}")
    assert wrong == []

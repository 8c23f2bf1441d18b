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

"""The conformance vectors (``serve.vectors``) against the Python generator, and the JavaScript
generator (js/) running them under Node with onnxruntime-node and onnxruntime-web (wasm): the same
texts from the same model, prompts, settings and seeds. ``make test`` installs js/node_modules
(``npm ci``) first; without Node or the packages the JS test is skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from serve.generator import Generator
from serve.vectors import check_vectors, main, make_vectors

REPO = Path(__file__).resolve().parents[1]
JS = REPO / "js"


@pytest.fixture(scope="module")
def vectors_file(small_onnx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vectors") / "vectors.json"
    assert main([str(small_onnx), "--out", str(out)]) == 0
    return out


def test_the_vectors_hold_every_case_and_the_generator_passes_them(small_onnx, vectors_file, capsys):
    vectors = json.loads(vectors_file.read_text(encoding="utf-8"))
    assert vectors["format"] == "textgen-conformance-v1" and vectors["noise"] == "textgen-hash32-gumbel-v1"
    assert len(vectors["cases"]) >= 8 and all(len(c["first_logits"]) == 45 for c in vectors["cases"])
    assert any(int(c["options"].get("seed", 0)) > 2**53 for c in vectors["cases"])  # seeds are strings
    gen = Generator.load(small_onnx)
    assert vectors == {**make_vectors(gen)}  # the same file and generator: the same vectors
    assert check_vectors(gen, vectors) == []
    assert main([str(small_onnx), "--check", str(vectors_file)]) == 0
    capsys.readouterr()


def test_a_vector_the_generator_does_not_reproduce_is_named(small_onnx, vectors_file, tmp_path, capsys):
    vectors = json.loads(vectors_file.read_text(encoding="utf-8"))
    vectors["cases"][2]["text"] += "x"
    vectors["noise_samples"][1]["value"] += 1e-3
    (tmp_path / "bad.json").write_text(json.dumps(vectors), encoding="utf-8")
    assert check_vectors(Generator.load(small_onnx), vectors) == [f"noise at {vectors['noise_samples'][1]}",
                                                                   "case 2: text differs"]
    assert main([str(small_onnx), "--check", str(tmp_path / "bad.json")]) == 2
    assert "case 2: text differs" in capsys.readouterr().err


def node_tools() -> str | None:
    """Why the JS tests cannot run here, or None."""
    if not shutil.which("node") or not shutil.which("npm"):
        return "node and npm are not installed"
    if not (JS / "node_modules" / "onnxruntime-web").is_dir():
        return "js/node_modules is missing: run `make js` (npm ci with ONNXRUNTIME_NODE_INSTALL=skip)"
    return None


@pytest.mark.skipif(node_tools() is not None, reason=str(node_tools()))
def test_npm_test_runs_the_vectors_with_onnxruntime_node_and_web(small_onnx, vectors_file):
    env = {**os.environ, "TEXTGEN_MODEL": str(small_onnx), "TEXTGEN_VECTORS": str(vectors_file)}
    proc = subprocess.run(["npm", "test", "--silent"], cwd=JS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout and "# skipped 0" in proc.stdout, proc.stdout[-2000:]

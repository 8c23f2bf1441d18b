"""``textgen generate`` and ``textgen eval`` as a user runs them: a subprocess of the installed
``textgen`` script, checked for exit codes, stdout/stderr and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TEXTGEN = Path(sys.executable).parent / "textgen"
BUNDLED = REPO / "textgen" / "data" / "alice_in_wonderland.txt"


def textgen(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, not an installed copy
    return subprocess.run([str(TEXTGEN), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: ") or "\nerror: " in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr


def test_generate_streams_the_continuation(small_onnx):
    proc = textgen("generate", small_onnx, "--prompt", "Alice was", "--max-chars", "120", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == 121 and proc.stdout.endswith("\n")
    again = textgen("generate", small_onnx, "--prompt", "alice was", "--max-chars", "120", "--seed", "3")
    assert again.stdout == proc.stdout  # same seed, same text (and the model is lowercased)
    assert proc.stderr == ""  # nothing to say when the seed was given


def test_generate_without_a_seed_tells_the_seed_used(small_onnx):
    proc = textgen("generate", small_onnx, "--max-chars", "40")
    assert proc.returncode == 0, proc.stderr
    seed = int(proc.stderr.split()[1])
    again = textgen("generate", small_onnx, "--max-chars", "40", "--seed", str(seed))
    assert again.stdout == proc.stdout


def test_generate_several_samples_with_sampling_options_and_stop(small_onnx):
    args = ["--prompt", "the ", "--max-chars", "80", "--temperature", "0.9", "--top-k", "10",
            "--top-p", "0.95", "--stop", ".", "--stop", "\n"]
    proc = textgen("generate", small_onnx, *args, "--num-samples", "3", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    blocks = proc.stdout.split("--- sample ")[1:]
    assert [b.split(")")[0] for b in blocks] == ["1/3 (seed 7", "2/3 (seed 8", "3/3 (seed 9"]
    for i, block in enumerate(blocks):
        text = block.split(" ---\n", 1)[1].removesuffix("\n").removesuffix("\n")
        single = textgen("generate", small_onnx, *args, "--seed", str(7 + i))
        assert single.stdout == text + "\n"
        assert "." not in text and "\n" not in text


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--temperature", "-1"], ["temperature must be >= 0"]),
        (["--top-p", "2"], ["top_p must be in (0, 1]"]),
        (["--max-chars", "1000000"], ["max_chars must be at most 100,000"]),
        (["--num-samples", "0"], ["--num-samples must be at least 1"]),
        (["--prompt", "5 €"], ["unknown characters in prompt: '5', '€' (model vocabulary: 45 chars)", "--unknown"]),
        (["--num-threads", "-1"], ["num_threads must be an integer >= 0"]),
        (["--top-k", "99999999999999999999"], ["top_k must be <= 9223372036854775807"]),  # beyond int64
    ],
)
def test_generate_rejects_bad_parameters(small_onnx, args, needles):
    proc = textgen("generate", small_onnx, *args)
    assert_user_error(proc, *needles)
    assert proc.stdout == ""


def test_generate_unknown_policies(small_onnx):
    skip = textgen("generate", small_onnx, "--prompt", "alicé", "--unknown", "skip", "--seed", "1", "--max-chars", "30")
    plain = textgen("generate", small_onnx, "--prompt", "alic", "--seed", "1", "--max-chars", "30")
    assert skip.returncode == 0 and skip.stdout == plain.stdout


def test_generate_rejects_missing_empty_and_corrupt_model_files(tmp_path, small_onnx):
    assert_user_error(textgen("generate", tmp_path / "nope.onnx"), "does not exist", "textgen export")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert_user_error(textgen("generate", tmp_path / "empty.onnx"), "is empty (0 bytes)")
    data = Path(small_onnx).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    assert_user_error(textgen("generate", tmp_path / "cut.onnx"), "is not a loadable ONNX model")
    assert_user_error(textgen("eval", tmp_path / "cut.onnx", "--corpus", BUNDLED), "is not a loadable ONNX model")


def test_eval_agrees_with_the_training_validation_loss(small_onnx):
    proc = textgen("eval", small_onnx, "--corpus", BUNDLED)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert {"loss_nats", "bpc", "chars", "unknown_skipped", "split"} <= result.keys()
    assert result["split"] == "val" and result["unknown_skipped"] == 0
    assert result["chars"] == (14_443 - 1) // 32 * 32  # full windows of the bundled corpus' 10% tail
    assert abs(result["loss_nats"] - result["model_val_loss"]) < 0.01
    assert abs(result["bpc"] - result["loss_nats"] / 0.6931471805599453) < 1e-9


def test_eval_whole_text_from_a_directory_skips_unknown_characters(tmp_path, small_onnx):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(b"\xef\xbb\xbf" + BUNDLED.read_bytes()[:5000].replace(b"\n", b"\r\n"))
    (tmp_path / "corpus" / "b.txt").write_text("Alice said: 5 \u20ac, 7 \u20ac!" * 20, encoding="utf-8")
    proc = textgen("eval", small_onnx, "--corpus", tmp_path / "corpus", "--split", "all")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["split"] == "all" and result["unknown_skipped"] == 80  # '5', '€', '7', '€' x 20
    assert 0 < result["loss_nats"] < 5


def test_eval_errors(tmp_path, small_onnx):
    assert_user_error(textgen("eval", small_onnx, "--corpus", tmp_path / "none.txt"), "does not exist")
    (tmp_path / "short.txt").write_text("alice\n")
    assert_user_error(textgen("eval", small_onnx, "--corpus", tmp_path / "short.txt"), "fewer than one window")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert_user_error(textgen("eval", small_onnx, "--corpus", tmp_path / "latin1.txt"), "is not UTF-8")
    proc = textgen("eval", small_onnx)  # --corpus is required: argparse says so
    assert proc.returncode == 2 and "--corpus" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_refuses_a_model_whose_loss_is_not_finite(tmp_path, small_onnx):
    from onnx import numpy_helper

    from tests.test_generator import sealed_copy

    def nan_logits(proto):
        t = next(t for t in proto.graph.initializer if "logits" in t.name and "BiasAdd" in t.name)
        t.CopyFrom(numpy_helper.from_array(np.full(t.dims, np.nan, np.float32), t.name))

    path = sealed_copy(small_onnx, tmp_path / "nan.onnx", nan_logits)
    proc = textgen("eval", path, "--corpus", BUNDLED)
    assert_user_error(proc, "loss of nan", "non-finite logits")
    assert "NaN" not in proc.stdout and proc.stdout == ""


@pytest.mark.parametrize("key, change, needle", [
    ("model_config", {"seq_len": 0}, "seq_len must be an integer >= 2, got 0"),
    ("train_config", {"val_fraction": 0.999}, "val_fraction must be in (0, 0.5)"),
])
def test_eval_refuses_metadata_out_of_range(tmp_path, small_onnx, key, change, needle):
    from tests.test_generator import sealed_copy

    def edit(proto):
        for p in proto.metadata_props:
            if p.key == "textgen." + key:
                p.value = json.dumps({**json.loads(p.value), **change})

    assert_user_error(textgen("eval", sealed_copy(small_onnx, tmp_path / "m.onnx", edit), "--corpus", BUNDLED), needle)


def test_vectors_are_written_and_checked_by_textgen_vectors(tmp_path, small_onnx):
    out = tmp_path / "vectors.json"
    proc = textgen("vectors", str(small_onnx), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"path": str(out), "cases": 9}
    proc = textgen("vectors", str(small_onnx), "--check", str(out))
    assert proc.returncode == 0 and json.loads(proc.stdout)["problems"] == 0, proc.stderr
    vectors = json.loads(out.read_text(encoding="utf-8"))
    vectors["cases"][0]["text"] = "no"
    out.write_text(json.dumps(vectors), encoding="utf-8")
    assert_user_error(textgen("vectors", str(small_onnx), "--check", str(out)), "case 0: text differs")

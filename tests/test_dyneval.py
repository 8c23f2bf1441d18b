"""``textgen eval --dynamic``: dynamic evaluation of a training checkpoint (textgen/dyneval.py), on
the session's small trained run and its ONNX export."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tests.conftest import last_json, run_cli
from textgen import dyneval
from textgen.checkpoint import load_checkpoint, resolve_checkpoint
from textgen.cli import DYNAMIC_LR
from textgen.text import bundled_corpus_path, eval_ids


@pytest.fixture(scope="module")
def evaluator(small_run):
    ckpt = load_checkpoint(resolve_checkpoint(small_run))
    return ckpt, dyneval.DynamicEvaluator(dyneval.step_model_of(ckpt), ckpt.model.seq_len)


def held_out(ckpt) -> np.ndarray:
    return eval_ids(None, ckpt.vocab, ckpt.train.lowercase, ckpt.train.val_fraction, ckpt.model.seq_len)[0]


def onnx_carried_loss(path, ids: np.ndarray, seq_len: int) -> float:
    """The same windows through the exported step model in onnxruntime, the state passed on."""
    from serve.onnx_model import OnnxModel

    model = OnnxModel.load(path)
    x, y = dyneval.windows_of(ids, seq_len)
    state, total = None, 0.0
    for xi, yi in zip(x, y):
        logits, state = model.run(xi[None], state)
        z = logits[0].astype(np.float64)  # (L, V)
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        total += float((lse - z[np.arange(seq_len), yi]).sum())
    return total / x.size


def test_lr_0_is_the_static_loss_which_onnx_agrees_with(evaluator, small_onnx):
    ckpt, ev = evaluator
    seq_len, ids = ckpt.model.seq_len, held_out(ckpt)
    static = ev.run(ids, seq_len)
    assert abs(ev.run(ids, seq_len, lr=0.0).loss_nats - static.loss_nats) < 1e-5
    assert abs(onnx_carried_loss(small_onnx, ids, seq_len) - static.loss_nats) < 1e-4
    # Every window from the zero state is `textgen eval`'s protocol: the same targets, the same loss.
    code, out, err = run_cli(["eval", str(small_onnx), "--corpus", str(bundled_corpus_path())])
    assert code == 0, err
    reset = ev.run(ids, seq_len, carry_state=False)
    assert (reset.chars, reset.windows) == (last_json(out)["chars"], last_json(out)["windows"])
    assert abs(reset.loss_nats - last_json(out)["loss_nats"]) < 1e-4


def test_dynamic_evaluation_learns_a_repeated_phrase_it_never_saw(evaluator):
    ckpt, ev = evaluator
    ids = ckpt.vocab.encode("zebras quietly juggle six frozen kumquats. " * 60)
    static = ev.run(ids, ckpt.model.seq_len)
    dynamic = ev.run(ids, ckpt.model.seq_len, lr=0.003)
    assert dynamic.chars == static.chars > 2000
    assert dynamic.loss_nats < static.loss_nats - 0.5, (static, dynamic)
    assert abs(ev.run(ids, ckpt.model.seq_len).loss_nats - static.loss_nats) < 1e-6  # the weights were put back


def file_hashes(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_cli_reports_both_losses_and_leaves_the_checkpoint_as_it_was(small_run):
    before = file_hashes(small_run / "best")
    code, out, err = run_cli(["eval", "--dynamic", str(small_run), "--corpus", str(bundled_corpus_path())])
    assert code == 0, err
    result = last_json(out)
    assert result["dynamic"] is True and result["dynamic_lr"] == DYNAMIC_LR and result["split"] == "val"
    assert result["chars"] == result["windows"] * result["seq_len"] == 14_432
    assert result["loss_nats"] < result["static_loss_nats"] < result["model_val_loss"] + 0.1
    assert result["bpc"] == pytest.approx(result["loss_nats"] / np.log(2))
    assert file_hashes(small_run / "best") == before


@pytest.mark.parametrize("argv, message", [
    (["eval", "--dynamic", "{onnx}"],
     "dynamic evaluation needs the training checkpoint (a checkpoint directory, or a training --out directory "
     "for its best/), not the ONNX file"),
    (["eval", "{onnx}", "--dynamic-lr", "0.01"], "--dynamic-lr: only with --dynamic"),
    (["eval", "--dynamic", "{run}", "--dynamic-lr", "-1"], "--dynamic-lr must be a number >= 0, got -1.0"),
    (["eval", "--dynamic", "{run}", "--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    (["eval", "--dynamic", "{run}/nowhere"], "is not a checkpoint"),
])
def test_mistakes_are_clear_errors(small_run, small_onnx, argv, message):
    argv = [a.format(onnx=small_onnx, run=small_run) for a in argv] + ["--corpus", str(bundled_corpus_path())]
    code, out, err = run_cli(argv)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_a_refused_onnx_path_does_not_load_tensorflow():
    from tests.test_layers import modules_loaded_by

    loaded = modules_loaded_by("from textgen.cli import main\n"
                               "assert main(['eval', '--dynamic', 'model.onnx', '--corpus', 'corpus.txt']) == 2")
    assert "tensorflow" not in loaded and "keras" not in loaded

"""The exporter: the ONNX file it writes (inputs, outputs, metadata, fused LSTMs), K = 0 parity with
Keras, the sampling loop against ``serve.sampling.sample_rows``, and the checkpoints it must refuse. Uses the
small run trained once per session (``small_run``) and its int8 export (``small_onnx``); the fp32
export is made once here (a few seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import last_json, run_cli

VOCAB_SIZE = 45


@pytest.fixture(scope="module")
def fp32_export(small_run, tmp_path_factory) -> tuple[Path, str]:
    """``textgen export --precision fp32``: the file and the command's stdout."""
    path = tmp_path_factory.mktemp("fp32") / "small_fp32.onnx"
    code, stdout, stderr = run_cli(["export", str(small_run), "--out", str(path), "--precision", "fp32"])
    assert code == 0, stderr
    return path, stdout


@pytest.fixture(scope="module")
def ckpt(small_run):
    from textgen import checkpoint as ckptlib

    return ckptlib.load_checkpoint(ckptlib.resolve_checkpoint(small_run))


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def call(sess, ids, state=None, noise=None, steps=0, temperature=1.0, top_k=0, top_p=1.0):
    """One call -> (logits, state, sampled ids). Settings: scalars or (B,) arrays."""
    from export.onnx import generation_feed

    b = len(ids)
    state = state if state is not None else [np.zeros((b, 32), np.float32)] * 2
    feed = {"char_ids": np.asarray(ids, np.int32), "h_0": state[0], "c_0": state[1],
            **generation_feed(b, steps, VOCAB_SIZE, noise, temperature, top_k, top_p)}
    out = sess.run(["logits", "h_0_out", "c_0_out", "sampled_ids"], feed)
    return out[0], out[1:-1], out[-1]


def ops(graph) -> list[str]:
    """Every op type in the graph and its subgraphs (If branches, Loop bodies)."""
    found = []
    for node in graph.node:
        found.append(node.op_type)
        for attr in node.attribute:
            if attr.g.node:
                found += ops(attr.g)
    return found


def random_settings(rng, b: int) -> dict:
    return dict(temperature=rng.choice([0.0, 0.5, 0.8, 1.0, 1.7], size=b).astype(np.float32),
                top_k=rng.choice([0, 1, 3, 10, 100], size=b),
                top_p=rng.choice([1.0, 0.99, 0.9, 0.5, 0.2], size=b).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# The file


def test_the_file_holds_the_contract(small_onnx):
    import onnx
    from onnx import TensorProto

    from export.onnx import GEN_TV_TOLERANCE, PARITY_TOLERANCE
    from textgen.contract import GENERATION_INPUTS as GEN_INPUTS
    from textgen.contract import METADATA_KEYS
    from textgen.contract import SAMPLED_IDS as GEN_OUTPUT

    model = onnx.load(str(small_onnx))
    onnx.checker.check_model(model)

    def sig(values):
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim])
                for v in values}

    f32, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    inputs, outputs = sig(model.graph.input), sig(model.graph.output)
    assert list(inputs) == ["char_ids", "h_0", "c_0", *GEN_INPUTS]
    assert inputs["char_ids"] == (i32, [None, None]) and inputs["h_0"] == (f32, [None, 32])
    assert inputs["sample_noise"] == (f32, [None, None, VOCAB_SIZE])
    assert (inputs["temperature"], inputs["top_k"], inputs["top_p"]) == ((f32, [None]), (i64, [None]), (f32, [None]))
    assert list(outputs) == ["logits", "h_0_out", "c_0_out", GEN_OUTPUT, "metadata_json"]
    assert outputs["logits"] == (f32, [None, None, VOCAB_SIZE]) and outputs[GEN_OUTPUT] == (i32, [None, None])
    assert outputs["metadata_json"][0] == TensorProto.UINT8

    meta = {p.key: p.value for p in model.metadata_props}
    assert set(meta) == set(METADATA_KEYS)
    assert meta["textgen.format_version"] == "2"
    assert len(json.loads(meta["textgen.vocab"])) == VOCAB_SIZE and json.loads(meta["textgen.lowercase"]) is True
    assert json.loads(meta["textgen.model_config"])["lstm_units"] == [32]
    assert json.loads(meta["textgen.train_config"])["val_fraction"] == 0.1
    assert json.loads(meta["textgen.metrics"])["val_loss"] > 0
    assert json.loads(meta["textgen.state_sizes"]) == [32, 32]
    assert float(meta["textgen.parity_max_abs_diff"]) <= PARITY_TOLERANCE
    generation = json.loads(meta["textgen.generation"])
    assert generation["inputs"] == list(GEN_INPUTS) and generation["output"] == GEN_OUTPUT
    assert generation["precision"] == "int8" and generation["exact"] == ["chunks", "batch", "prompt"]
    assert generation["noise"] == "textgen-hash32-gumbel-v1"
    assert generation["sampling_total_variation"] <= GEN_TV_TOLERANCE and generation["greedy_agreement"] >= 0.9


def test_every_lstm_is_one_fused_op(small_onnx, fp32_export):
    import onnx

    int8 = ops(onnx.load(str(small_onnx)).graph)
    assert int8.count("LSTM") == 1  # the fp32 step model (one layer)
    assert int8.count("DynamicQuantizeLSTM") == 2  # the loop with filters and the lean one
    fp32 = ops(onnx.load(str(fp32_export[0])).graph)
    assert fp32.count("LSTM") == 3 and "DynamicQuantizeLSTM" not in fp32
    assert not {"Scan", "MatMulInteger"} & set(int8)  # nothing unrolled or hand-made


def test_the_last_stdout_line_is_json(fp32_export):
    path, stdout = fp32_export
    result = last_json(stdout)
    assert result["path"] == str(path) and result["bytes"] == path.stat().st_size
    assert 0 <= result["max_abs_diff"] <= 1e-4
    assert result["lstm_ops"] == 1 and result["precision"] == "fp32" and result["opset"] == 17


# ---------------------------------------------------------------------------------------------
# K = 0: the step model


def test_k0_is_the_step_model_and_matches_keras(small_onnx, fp32_export, ckpt):
    from export.onnx import PARITY_TOLERANCE, check_parity
    from textgen import checkpoint as ckptlib
    from textgen.model import build_step_model, copy_weights

    train_model = ckptlib.load_model(ckpt)
    step = build_step_model(ckpt.model, ckpt.vocab.size)
    copy_weights(train_model, step)
    for path in (small_onnx, fp32_export[0]):
        assert check_parity(Path(path).read_bytes(), train_model, step, ckpt, seed=3) <= PARITY_TOLERANCE
    # The step model is the same in both files: K = 0 calls agree exactly.
    ids = np.random.default_rng(0).integers(0, VOCAB_SIZE, size=(3, 20))
    a, b = call(session(small_onnx), ids), call(session(fp32_export[0]), ids)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[2].shape == (3, 0)


# ---------------------------------------------------------------------------------------------
# The sampling loop


def test_fp32_loop_samples_exactly_the_reference_rule_on_the_step_logits(fp32_export):
    """With fp32 loop weights, every sampled id equals ``sample_rows`` applied to the fp32
    step model's logits (K = 0 calls, fed the ids one by one) with the same noise: per-row
    temperatures (greedy included), top-k and top-p, over several steps."""
    from serve.sampling import sample_rows

    sess = session(fp32_export[0])
    rng = np.random.default_rng(2)
    b, k = 48, 10
    for trial in range(3):
        s = random_settings(rng, b)
        noise = rng.gumbel(size=(b, k, VOCAB_SIZE)).astype(np.float32) * (s["temperature"] > 0)[:, None, None]
        prompt = rng.integers(0, VOCAB_SIZE, size=(b, int(rng.integers(1, 12))))
        _, state, got = call(sess, prompt, noise=noise, steps=k, **s)
        logits, ref_state, _ = call(sess, prompt)
        expected = []
        for j in range(k):
            ids = sample_rows(logits[:, -1], noise[:, j], **s)
            expected.append(ids)
            if j < k - 1:  # the last id is pending: the state stops before it
                logits, ref_state, _ = call(sess, ids[:, None], ref_state)
        np.testing.assert_array_equal(got, np.stack(expected, axis=1).astype(np.int32))
        for x, y in zip(state, ref_state):
            np.testing.assert_array_equal(x, y)


def test_int8_checks_pass_and_are_recorded(small_onnx, ckpt):
    import onnx

    from export.onnx import check_generation

    recorded = json.loads({p.key: p.value for p in onnx.load(str(small_onnx)).metadata_props}["textgen.generation"])
    measured = check_generation(Path(small_onnx).read_bytes(), ckpt, seed=0)  # the exporter's seed
    assert measured == {k: recorded[k] for k in measured}


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_one_call_equals_chunks_rows_alone_and_a_prefilled_prompt(small_onnx, fp32_export, precision):
    """What "same seed, same text" rests on, exactly: K = 10 in one call == 4 + 6 with the pending
    id carried; a row in a batch == the row alone; the prompt in the first call == its first
    T - 1 characters in a K = 0 call, then the last one."""
    sess = session(small_onnx if precision == "int8" else fp32_export[0])
    rng = np.random.default_rng(4)
    b = 6
    s = random_settings(rng, b)
    noise = rng.gumbel(size=(b, 10, VOCAB_SIZE)).astype(np.float32) * (s["temperature"] > 0)[:, None, None]
    prompt = rng.integers(0, VOCAB_SIZE, size=(b, 9))
    _, state, whole = call(sess, prompt, noise=noise, steps=10, **s)
    _, st, first = call(sess, prompt, noise=noise[:, :4], steps=4, **s)
    _, st, second = call(sess, first[:, -1:], st, noise=noise[:, 4:], steps=6, **s)
    np.testing.assert_array_equal(whole, np.concatenate([first, second], axis=1))
    for x, y in zip(state, st):
        np.testing.assert_array_equal(x, y)
    for r in range(b):
        _, alone_state, alone = call(sess, prompt[r : r + 1], noise=noise[r : r + 1], steps=10,
                                     **{k: v[r : r + 1] for k, v in s.items()})
        np.testing.assert_array_equal(alone, whole[r : r + 1])
        for x, y in zip(alone_state, state):
            np.testing.assert_array_equal(x, y[r : r + 1])
    _, pre, _ = call(sess, prompt[:, :-1])
    _, _, split = call(sess, prompt[:, -1:], pre, noise=noise, steps=10, **s)
    np.testing.assert_array_equal(split, whole)


# ---------------------------------------------------------------------------------------------
# The layers


def test_export_imports_no_serve_and_names_tensors_from_the_contract():
    """export/ sits below serve/ (it uses textgen.contract.GREEDY_TEMPERATURE, not serve's), and every
    tensor name of the contract comes from textgen.contract, never a string literal of its own."""
    import ast

    from textgen import contract

    names = {contract.CHAR_IDS, contract.LOGITS, contract.SAMPLED_IDS, *contract.GENERATION_INPUTS}
    for path in sorted((Path(__file__).resolve().parents[1] / "export").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not [m for m in imported if m == "serve" or m.startswith("serve.")], path
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & names, (path, literals & names)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_export_refuses_a_seed_kind_checkpoint(tmp_path):
    from textgen import checkpoint as ckptlib
    from textgen.config import NOTEBOOK, ModelConfig, TrainConfig
    from textgen.model import build_model
    from textgen.text import Vocab

    cfg = ModelConfig(kind=NOTEBOOK, lstm_units=(4,), dropout=0.0, seq_len=8)
    vocab = Vocab.from_text("abc \n")
    path = ckptlib.save_checkpoint(tmp_path / "notebook", build_model(cfg, vocab.size), None, cfg, TrainConfig(), vocab,
                                   {"val_loss": 1.0}, {"epoch": 1})
    code, stdout, stderr = run_cli(["export", str(path), "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and stdout == ""
    assert "holds a 'notebook' model" in stderr and "train a 'char' preset" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_a_corrupt_checkpoint_and_other_directories(small_run, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(small_run / "best", ckpt_dir)
    data = (ckpt_dir / "model.weights.h5").read_bytes()
    (ckpt_dir / "model.weights.h5").write_bytes(data[: len(data) // 2])
    code, _, stderr = run_cli(["export", str(ckpt_dir), "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "model.weights.h5 is corrupt" in stderr
    code, _, stderr = run_cli(["export", str(tmp_path), "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "is not a checkpoint" in stderr
    assert not (tmp_path / "m.onnx").exists()
    code, _, stderr = run_cli(["export", str(small_run), "--precision", "int4"])
    assert code == 2 and "invalid choice: 'int4'" in stderr


def test_export_checkpoint_refuses_an_unknown_precision(small_run, tmp_path):
    from export.onnx import ExportError, export_checkpoint

    with pytest.raises(ExportError, match="precision must be one of int8, fp32, got 'int4'"):
        export_checkpoint(small_run, tmp_path / "m.onnx", precision="int4")


# ---------------------------------------------------------------------------------------------
# One greedy answer, and a portable file


def test_fp32_greedy_is_the_argmax_of_the_step_logits_and_export_requires_it(fp32_export):
    """With fp32 loop weights the loop's greedy character is exactly the argmax of the K = 0 logits
    (the export check asks for all 64 states; int8 only for 90%: there the loop is the reference)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(fp32_export[0])).metadata_props}
    assert json.loads(meta["textgen.generation"])["greedy_agreement"] == 1.0
    sess = session(fp32_export[0])
    ids = np.random.default_rng(4).integers(0, VOCAB_SIZE, size=(64, 9))
    logits, _, _ = call(sess, ids)
    _, _, greedy = call(sess, ids, steps=1, temperature=0.0)
    np.testing.assert_array_equal(greedy[:, 0], logits[:, -1].argmax(axis=1))


def test_the_fp32_file_is_standard_onnx_and_runs_in_the_reference_evaluator(fp32_export):
    """onnx.reference (the ONNX spec's own evaluator, no com.microsoft ops) runs the fp32 file's step
    path (K = 0) and the sampling loop; both agree with onnxruntime."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from export.onnx import generation_feed

    model = onnx.load(str(fp32_export[0]))
    assert "com.microsoft" not in {o.domain for o in model.opset_import}
    ref = ReferenceEvaluator(model)
    rng = np.random.default_rng(6)
    ids = rng.integers(0, VOCAB_SIZE, size=(2, 7)).astype(np.int32)
    state = [rng.normal(0, 0.5, (2, 32)).astype(np.float32) for _ in range(2)]
    for steps in (0, 3):
        noise = rng.gumbel(size=(2, steps, VOCAB_SIZE)).astype(np.float32)
        feed = {"char_ids": ids, "h_0": state[0], "c_0": state[1],
                **generation_feed(2, steps, VOCAB_SIZE, noise, 0.8)}
        names = ["logits", "h_0_out", "c_0_out", "sampled_ids"]
        got = ref.run(names, feed)
        want = session(fp32_export[0]).run(names, feed)
        for name, g, w in zip(names, got, want):
            if name == "sampled_ids":
                np.testing.assert_array_equal(g, w)
            else:
                np.testing.assert_allclose(g, w, atol=1e-5, err_msg=name)

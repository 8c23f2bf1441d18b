"""Checkpoint -> one self-contained ONNX model (step model + sampling loop), parity-checked against Keras.

The ONNX graph (the generator's whole contract):

    inputs   char_ids (B, T) int32, h_i / c_i (B, H_i) float32 for every LSTM layer i,
             sample_noise (B, K, V) float32, temperature (B,) float32, top_k (B,) int64,
             top_p (B,) float32
    outputs  logits (B, T, V) float32, h_i_out / c_i_out (B, H_i) float32, sampled_ids (B, K) int32

B, T and K are free. With K = 0 it is the step model: a prompt (or an evaluation window) is
consumed in one call. With K > 0 the graph also samples K characters per row (see
``export/generation.py``: the pending id, the noise, the int8 loop). Every LSTM layer of the step
model is one fused ONNX ``LSTM`` op. The metadata (``metadata_props``) carries everything
generation and evaluation need, as JSON strings under ``textgen.*`` keys (see ``textgen.contract``).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from export.generation import PRECISIONS, GraphError, add_generation_loop
from textgen import checkpoint as ckptlib
from textgen import contract as C
from textgen.config import CHAR, to_dict
from textgen.contract import CHAR_IDS, LOGITS, SAMPLED_IDS, state_names
from textgen.errors import TextgenError
from textgen.model import build_step_model, copy_weights

OPSET = 17
PARITY_TOLERANCE = 1e-4


class ExportError(TextgenError):
    pass


@dataclass(frozen=True)
class ExportResult:
    path: Path
    bytes: int
    max_abs_diff: float
    lstm_ops: int
    checkpoint: Path
    precision: str = "int8"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "max_abs_diff": self.max_abs_diff,
            "lstm_ops": self.lstm_ops,
            "opset": OPSET,
            "checkpoint": str(self.checkpoint),
            "precision": self.precision,
        }


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, seed: int = 0, precision: str = "int8"
) -> ExportResult:
    """Export the checkpoint at ``checkpoint`` (or the best one of a run) to ``out``, atomically."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    ckpt = ckptlib.load_checkpoint(ckptlib.resolve_checkpoint(checkpoint))
    if ckpt.model.kind != CHAR:
        raise ExportError(
            f"checkpoint {ckpt.path} holds a {ckpt.model.kind!r} model (the notebook's, kept for comparisons): it "
            "has no step model to export; train a 'char' preset (e.g. textgen train --preset default) and export that"
        )
    train_model = ckptlib.load_model(ckpt)
    step = build_step_model(ckpt.model, ckpt.vocab.size)
    copy_weights(train_model, step)

    ins, outs = state_names(len(ckpt.model.lstm_units))
    sizes = [u for u in ckpt.model.lstm_units for _ in range(2)]
    signature = [tf.TensorSpec((None, None), tf.int32, name=CHAR_IDS)] + [
        tf.TensorSpec((None, h), tf.float32, name=n) for n, h in zip(ins, sizes)
    ]
    proto, _ = tf2onnx.convert.from_keras(step, input_signature=signature, opset=OPSET)

    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != [CHAR_IDS, *ins] or got_out != [LOGITS, *outs]:
        raise ExportError(f"converted graph has inputs {got_in} and outputs {got_out}; expected "
                          f"{[CHAR_IDS, *ins]} and {[LOGITS, *outs]}")
    lstm_ops = sum(n.op_type == "LSTM" for n in proto.graph.node)
    if lstm_ops != len(ckpt.model.lstm_units):
        raise ExportError(
            f"expected {len(ckpt.model.lstm_units)} fused ONNX LSTM ops, the converter made {lstm_ops}; "
            "the step model no longer maps onto the ONNX LSTM op"
        )

    try:
        add_generation_loop(proto, len(ckpt.model.lstm_units), outs, precision=precision)
    except GraphError as e:
        raise ExportError(f"could not add the sampling loop to the converted graph: {e}") from None
    onnx_bytes = proto.SerializeToString()
    max_diff = check_parity(onnx_bytes, train_model, step, ckpt, seed=seed)
    gen_check = check_generation(onnx_bytes, ckpt, seed=seed)
    metadata = {
        C.META_FORMAT_VERSION: str(C.FORMAT_VERSION),
        C.META_VOCAB: json.dumps(list(ckpt.vocab.chars), ensure_ascii=False),
        C.META_LOWERCASE: json.dumps(ckpt.train.lowercase),
        C.META_MODEL_CONFIG: json.dumps(to_dict(ckpt.model)),
        C.META_TRAIN_CONFIG: json.dumps(to_dict(ckpt.train)),
        C.META_METRICS: json.dumps({k: v for k, v in ckpt.metrics.items() if k != "history"}),
        C.META_STATE_INPUTS: json.dumps(ins),
        C.META_STATE_OUTPUTS: json.dumps(outs),
        C.META_STATE_SIZES: json.dumps(sizes),
        C.META_PARITY: repr(max_diff),
        C.META_GENERATION: json.dumps({
            "inputs": list(C.GENERATION_INPUTS), "output": SAMPLED_IDS, "precision": precision, **gen_check,
        }),
        C.META_EXPORTED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    del proto.metadata_props[:]
    for k, v in metadata.items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "textgen"
    proto.doc_string = (
        f"textgen character LSTM step model: {len(ckpt.model.lstm_units)} x LSTM {list(ckpt.model.lstm_units)}, "
        f"vocabulary {ckpt.vocab.size}; inputs {CHAR_IDS} (B,T) int32 + state + sampling inputs, outputs "
        f"logits + state + {SAMPLED_IDS}"
    )
    onnx.checker.check_model(proto)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(proto.SerializeToString())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, out.stat().st_size, max_diff, lstm_ops, ckpt.path, precision)


def check_parity(onnx_bytes: bytes, train_model, step, ckpt: ckptlib.Checkpoint, seed: int = 0) -> float:
    """Random sequences through Keras and onnxruntime; raise ExportError beyond PARITY_TOLERANCE.

    Checks (1) the step model equals the training model from a zero state (the weights transferred),
    (2) onnxruntime equals Keras from a random state, and (3) state carried across two onnxruntime
    calls equals one call over the whole sequence. Returns the largest difference seen."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    b, t, split = 3, 17, 7
    ids = rng.integers(0, ckpt.vocab.size, size=(b, t), dtype=np.int32)
    ins, _ = state_names(len(ckpt.model.lstm_units))
    sizes = [u for u in ckpt.model.lstm_units for _ in range(2)]
    zeros = [np.zeros((b, h), np.float32) for h in sizes]
    state = [rng.normal(0, 0.5, (b, h)).astype(np.float32) for h in sizes]

    diffs: dict[str, float] = {}
    keras_zero = step.predict([ids, *zeros], verbose=0)
    diffs["step model vs training model"] = _maxdiff(keras_zero[0], train_model.predict(ids, verbose=0))

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])

    def run(x, s):
        return sess.run(None, {CHAR_IDS: x, **dict(zip(ins, s)), **generation_feed(len(x), 0, ckpt.vocab.size)})

    expected = step.predict([ids, *state], verbose=0)
    got = run(ids, state)
    diffs["onnxruntime vs keras (logits)"] = _maxdiff(got[0], expected[0])
    diffs["onnxruntime vs keras (state)"] = max(_maxdiff(g, e) for g, e in zip(got[1:], expected[1:]))
    if got[-1].shape != (b, 0):
        raise ExportError(f"with no sampling steps the graph returned sampled ids of shape {got[-1].shape}")
    first = run(ids[:, :split], state)
    second = run(ids[:, split:], first[1:1 + len(ins)])
    carried = np.concatenate([first[0], second[0]], axis=1)
    diffs["carried state vs one call"] = max(
        _maxdiff(carried, got[0]), *(_maxdiff(a, e) for a, e in zip(second[1:-1], got[1:-1]))
    )
    bad = {k: v for k, v in diffs.items() if not v <= PARITY_TOLERANCE}
    if bad:
        raise ExportError(
            "ONNX parity check failed (tolerance %.0e): %s; the file was not written"
            % (PARITY_TOLERANCE, ", ".join(f"{k}: {v:.3g}" for k, v in bad.items()))
        )
    return float(max(diffs.values()))


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def generation_feed(batch: int, steps: int, vocab_size: int, noise=None, temperature=1.0, top_k=0,
                    top_p=1.0) -> dict:
    """Inputs of the sampling loop for ``batch`` rows and ``steps`` steps (0: the plain step model);
    the settings are scalars or one value per row."""

    def rows(value, dtype):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype), (batch,)))

    return {
        C.NOISE: np.zeros((batch, steps, vocab_size), np.float32) if noise is None
        else np.asarray(noise, np.float32),
        C.TEMPERATURE: rows(temperature, np.float32),
        C.TOP_K: rows(top_k, np.int64),
        C.TOP_P: rows(top_p, np.float32),
    }


GEN_TV_TOLERANCE = 0.05  # total variation between the loop's sampling frequencies and fp32 softmax


def check_generation(onnx_bytes: bytes, ckpt: ckptlib.Checkpoint, seed: int = 0) -> dict:
    """Check the sampling loop against the fp32 step model in the same file (K = 0 calls):

    (1) sampling frequencies: 4,096 rows in the same state, temperature 1, independent Gumbel noise
        -> the histogram of sampled ids estimates the loop's next-character distribution; its total
        variation from the fp32 softmax must be <= GEN_TV_TOLERANCE (sampling error ~0.02, int8
        weights add ~0.01);
    (2) greedy (temperature 0, no noise) picks the fp32 argmax in >= 90% of 64 random states;
    (3) top-k 1 equals greedy; top-k 3 stays inside the fp32 top 5; top-p 0.5 inside the fp32 top-p
        0.7 set;
    and exactly, what generation relies on for "same seed, same text":
    (4) chunking: one call of 12 steps == two calls of 6 with the pending id carried over, with
        and without filters;
    (5) batches: every row of a batch with mixed settings (greedy, temperature only, filters) ==
        the row alone, ids and state;
    (6) prompts: the whole prompt in the first call == its first T - 1 characters in a K = 0 call,
        then the last one.
    Raises ExportError; returns the measured figures for the metadata."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed + 1)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    ins, _ = state_names(len(ckpt.model.lstm_units))
    sizes = [u for u in ckpt.model.lstm_units for _ in range(2)]
    v = ckpt.vocab.size

    def call(ids, state=None, steps=0, **gen):
        state = state or [np.zeros((len(ids), h), np.float32) for h in sizes]
        if "noise" not in gen and np.all(np.asarray(gen.get("temperature", 1.0)) > 0):
            gen["noise"] = rng.gumbel(size=(len(ids), steps, v))
        feed = {CHAR_IDS: ids, **dict(zip(ins, state)), **generation_feed(len(ids), steps, v, **gen)}
        out = sess.run(None, feed)
        return out[0], out[1:-1], out[-1]

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def same(a, b) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(a, b))

    prompt = rng.integers(0, v, size=(1, 24), dtype=np.int32)
    n = 4096
    logits, _, _ = call(prompt)
    p = softmax(logits[0, -1].astype(np.float64))
    _, _, sampled = call(np.repeat(prompt, n, axis=0), steps=1)
    tv = float(0.5 * np.abs(np.bincount(sampled[:, 0], minlength=v) / n - p).sum())

    states = rng.integers(0, v, size=(64, 16), dtype=np.int32)
    logits, _, _ = call(states)
    _, _, greedy = call(states, steps=1, temperature=0.0)
    last = logits[:, -1]
    greedy_agree = float(np.mean(greedy[:, 0] == last.argmax(axis=1)))
    _, _, top1 = call(states, steps=1, top_k=1)
    _, _, top3 = call(states, steps=1, top_k=3)
    _, _, topp = call(states, steps=1, top_p=0.5)
    order = np.argsort(-last, axis=1)
    probs = np.take_along_axis(softmax(last.astype(np.float64)), order, axis=1)
    in_top5 = all(t in row[:5] for t, row in zip(top3[:, 0], order))
    in_topp = all(t in row[: int(np.searchsorted(np.cumsum(pr), 0.7)) + 1]
                  for t, row, pr in zip(topp[:, 0], order, probs))

    chunk_equal = True
    for filters in ({}, {"top_k": 10, "top_p": 0.9}):
        noise = rng.gumbel(size=(4, 12, v))
        ids4 = states[:4]
        _, whole_state, whole = call(ids4, steps=12, noise=noise, temperature=0.8, **filters)
        _, state, first = call(ids4, steps=6, noise=noise[:, :6], temperature=0.8, **filters)
        _, state, second = call(first[:, -1:], state, steps=6, noise=noise[:, 6:], temperature=0.8, **filters)
        chunk_equal &= np.array_equal(whole, np.concatenate([first, second], axis=1)) and same(whole_state, state)

    settings = dict(temperature=np.array([0.8, 0.0, 1.3, 0.7]), top_k=np.array([0, 0, 5, 0]),
                    top_p=np.array([1.0, 1.0, 0.9, 0.8]))
    noise = rng.gumbel(size=(4, 24, v)) * (settings["temperature"] > 0)[:, None, None]
    _, batch_state, batch = call(states[:4], steps=24, noise=noise, **settings)
    batch_equal = True
    for r in range(4):
        _, alone_state, alone = call(states[r : r + 1], steps=24, noise=noise[r : r + 1],
                                     **{k: x[r : r + 1] for k, x in settings.items()})
        row_state = [s[r : r + 1] for s in batch_state]
        batch_equal &= np.array_equal(alone, batch[r : r + 1]) and same(alone_state, row_state)
    _, pre_state, _ = call(states[:4, :-1])
    _, split_state, split = call(states[:4, -1:], pre_state, steps=24, noise=noise, **settings)
    prompt_equal = np.array_equal(split, batch) and same(split_state, batch_state)

    problems = []
    if not tv <= GEN_TV_TOLERANCE:
        problems.append(f"sampling frequencies differ from the fp32 softmax by total variation {tv:.3f}")
    if greedy_agree < 0.9:
        problems.append(f"greedy picks the fp32 argmax in only {greedy_agree:.0%} of states")
    if not np.array_equal(top1, greedy):
        problems.append("top_k=1 does not equal greedy")
    if not in_top5:  # int8 may swap near-tied ranks, never reach far down
        problems.append("top_k=3 sampled ids outside the fp32 top 5")
    if not in_topp:
        problems.append("top_p=0.5 sampled ids outside the fp32 top-p 0.7 set")
    if not chunk_equal:
        problems.append("one call of 12 steps differs from two calls of 6 steps")
    if not batch_equal:
        problems.append("a row sampled in a batch differs from the same row alone")
    if not prompt_equal:
        problems.append("a prompt consumed in the first call differs from the same prompt prefilled")
    if problems:
        raise ExportError("generation loop check failed: " + "; ".join(problems) + "; the file was not written")
    return {"sampling_total_variation": tv, "greedy_agreement": greedy_agree, "exact": ["chunks", "batch", "prompt"]}

"""Checkpoint -> one self-contained ONNX step model, parity-checked against Keras.

The ONNX graph (the generator's whole contract):

    inputs   char_ids (B, T) int32, h_i / c_i (B, H_i) float32 for every LSTM layer i
    outputs  logits (B, T, V) float32, h_i_out / c_i_out (B, H_i) float32

B and T are free: a prompt is consumed in one call, then one character per call. Every LSTM layer is
one fused ONNX ``LSTM`` op. The metadata (``metadata_props``) carries everything generation and
evaluation need, as JSON strings under ``textgen.*`` keys (see ``METADATA_KEYS``).
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

from textgen import checkpoint as ckptlib
from textgen.config import to_dict
from textgen.errors import TextgenError
from textgen.model import INPUT_NAME, LOGITS_NAME, build_step_model, copy_weights, state_names

FORMAT_VERSION = 1
OPSET = 17
PARITY_TOLERANCE = 1e-4
METADATA_KEYS = (
    "textgen.format_version",  # "1"
    "textgen.vocab",  # JSON list of the characters, index = id
    "textgen.lowercase",  # "true" if the corpus was lowercased (prompts are lowercased too)
    "textgen.model_config",  # JSON ModelConfig
    "textgen.train_config",  # JSON TrainConfig (val_fraction, seed, ...)
    "textgen.metrics",  # JSON metrics of the exported checkpoint (val_loss, val_bpc, epoch, ...)
    "textgen.state_inputs",  # JSON ["h_0", "c_0", ...]
    "textgen.state_outputs",  # JSON ["h_0_out", "c_0_out", ...]
    "textgen.state_sizes",  # JSON [H_0, H_0, H_1, H_1, ...], one per state input
    "textgen.parity_max_abs_diff",  # max |logits_keras - logits_onnx| measured at export
    "textgen.exported_at",  # ISO 8601 UTC
)


class ExportError(TextgenError):
    pass


@dataclass(frozen=True)
class ExportResult:
    path: Path
    bytes: int
    max_abs_diff: float
    lstm_ops: int
    checkpoint: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "max_abs_diff": self.max_abs_diff,
            "lstm_ops": self.lstm_ops,
            "opset": OPSET,
            "checkpoint": str(self.checkpoint),
        }


def export_checkpoint(checkpoint: str | Path, out: str | Path, seed: int = 0) -> ExportResult:
    """Export the checkpoint at ``checkpoint`` (or the best one of a run) to ``out``, atomically."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    ckpt = ckptlib.load_checkpoint(ckptlib.resolve_checkpoint(checkpoint))
    train_model = ckptlib.load_model(ckpt)
    step = build_step_model(ckpt.model, ckpt.vocab.size)
    copy_weights(train_model, step)

    ins, outs = state_names(len(ckpt.model.lstm_units))
    sizes = [u for u in ckpt.model.lstm_units for _ in range(2)]
    signature = [tf.TensorSpec((None, None), tf.int32, name=INPUT_NAME)] + [
        tf.TensorSpec((None, h), tf.float32, name=n) for n, h in zip(ins, sizes)
    ]
    proto, _ = tf2onnx.convert.from_keras(step, input_signature=signature, opset=OPSET)

    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != [INPUT_NAME, *ins] or got_out != [LOGITS_NAME, *outs]:
        raise ExportError(f"converted graph has inputs {got_in} and outputs {got_out}; expected "
                          f"{[INPUT_NAME, *ins]} and {[LOGITS_NAME, *outs]}")
    lstm_ops = sum(n.op_type == "LSTM" for n in proto.graph.node)
    if lstm_ops != len(ckpt.model.lstm_units):
        raise ExportError(
            f"expected {len(ckpt.model.lstm_units)} fused ONNX LSTM ops, the converter made {lstm_ops}; "
            "the step model no longer maps onto the ONNX LSTM op"
        )

    max_diff = check_parity(proto.SerializeToString(), train_model, step, ckpt, seed=seed)
    metadata = {
        "textgen.format_version": str(FORMAT_VERSION),
        "textgen.vocab": json.dumps(list(ckpt.vocab.chars), ensure_ascii=False),
        "textgen.lowercase": json.dumps(ckpt.train.lowercase),
        "textgen.model_config": json.dumps(to_dict(ckpt.model)),
        "textgen.train_config": json.dumps(to_dict(ckpt.train)),
        "textgen.metrics": json.dumps({k: v for k, v in ckpt.metrics.items() if k != "history"}),
        "textgen.state_inputs": json.dumps(ins),
        "textgen.state_outputs": json.dumps(outs),
        "textgen.state_sizes": json.dumps(sizes),
        "textgen.parity_max_abs_diff": repr(max_diff),
        "textgen.exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    del proto.metadata_props[:]
    for k, v in metadata.items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "textgen"
    proto.doc_string = (
        f"textgen character LSTM step model: {len(ckpt.model.lstm_units)} x LSTM {list(ckpt.model.lstm_units)}, "
        f"vocabulary {ckpt.vocab.size}; inputs {INPUT_NAME} (B,T) int32 + state, outputs logits + state"
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
    return ExportResult(out, out.stat().st_size, max_diff, lstm_ops, ckpt.path)


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
        return sess.run(None, {INPUT_NAME: x, **dict(zip(ins, s))})

    expected = step.predict([ids, *state], verbose=0)
    got = run(ids, state)
    diffs["onnxruntime vs keras (logits)"] = _maxdiff(got[0], expected[0])
    diffs["onnxruntime vs keras (state)"] = max(_maxdiff(g, e) for g, e in zip(got[1:], expected[1:]))
    first = run(ids[:, :split], state)
    second = run(ids[:, split:], first[1:])
    carried = np.concatenate([first[0], second[0]], axis=1)
    diffs["carried state vs one call"] = max(
        _maxdiff(carried, got[0]), *(_maxdiff(a, e) for a, e in zip(second[1:], got[1:]))
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

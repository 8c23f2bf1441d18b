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

``export_checkpoint`` converts, adds the loop, checks (``check_parity``, ``check_generation``: the
file is written only if every check passes), records the metadata and writes the file atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from export.generation import OPSET, PRECISIONS, GraphError, add_generation_loop
from textgen import checkpoint as ckptlib
from textgen import contract as C
from textgen.config import CHAR, to_dict
from textgen.contract import CHAR_IDS, LOGITS, SAMPLED_IDS, state_names
from textgen.errors import TextgenError
from textgen.files import atomic_write
from textgen.model import build_step_model, copy_weights

PARITY_TOLERANCE = 1e-4
GEN_TV_TOLERANCE = 0.05  # total variation between the loop's sampling frequencies and fp32 softmax


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


# ---------------------------------------------------------------------------------------------
# Export


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, seed: int = 0, precision: str = "int8"
) -> ExportResult:
    """Export the checkpoint at ``checkpoint`` (or the best one of a run) to ``out``, atomically."""
    import onnx

    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    ckpt = _load_char_checkpoint(checkpoint)
    train_model = ckptlib.load_model(ckpt)
    step = build_step_model(ckpt.model, ckpt.vocab.size)
    copy_weights(train_model, step)
    proto, lstm_ops = _convert(step, ckpt)
    try:
        add_generation_loop(proto, len(ckpt.model.lstm_units), _state_outputs(ckpt), precision=precision)
    except GraphError as e:
        raise ExportError(f"could not add the sampling loop to the converted graph: {e}") from None
    onnx_bytes = proto.SerializeToString()
    max_diff = check_parity(onnx_bytes, train_model, step, ckpt, seed=seed)
    gen_check = check_generation(onnx_bytes, ckpt, seed=seed, precision=precision)
    metadata = _metadata(ckpt, max_diff, precision, gen_check)
    _describe(proto, ckpt, metadata)
    add_metadata_output(proto, metadata)
    onnx.checker.check_model(proto)
    out = atomic_write(out, C.seal_content_hash(proto.SerializeToString()))
    return ExportResult(out, out.stat().st_size, max_diff, lstm_ops, ckpt.path, precision)


def _load_char_checkpoint(checkpoint: str | Path) -> ckptlib.Checkpoint:
    ckpt = ckptlib.load_checkpoint(ckptlib.resolve_checkpoint(checkpoint))
    if ckpt.model.kind != CHAR:
        raise ExportError(
            f"checkpoint {ckpt.path} holds a {ckpt.model.kind!r} model (the notebook's, kept for comparisons): it "
            "has no step model to export; train a 'char' preset (e.g. textgen train --preset default) and export that"
        )
    return ckpt


def _state_sizes(ckpt: ckptlib.Checkpoint) -> list[int]:
    """The size of every state input, h and c per layer: [H_0, H_0, H_1, H_1, ...]."""
    return [u for u in ckpt.model.lstm_units for _ in range(2)]


def _state_outputs(ckpt: ckptlib.Checkpoint) -> list[str]:
    return state_names(len(ckpt.model.lstm_units))[1]


def _convert(step, ckpt: ckptlib.Checkpoint) -> tuple[Any, int]:
    """tf2onnx on the Keras step model -> the ONNX proto and its number of LSTM ops, after checking
    its inputs and outputs and that every LSTM layer became one fused ONNX LSTM op."""
    import tensorflow as tf
    import tf2onnx

    ins, outs = state_names(len(ckpt.model.lstm_units))
    signature = [tf.TensorSpec((None, None), tf.int32, name=CHAR_IDS)] + [
        tf.TensorSpec((None, h), tf.float32, name=n) for n, h in zip(ins, _state_sizes(ckpt))
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
    return proto, lstm_ops


def _metadata(ckpt: ckptlib.Checkpoint, max_diff: float, precision: str, gen_check: dict) -> dict[str, str]:
    """The ``metadata_props`` (see ``textgen.contract``), JSON strings."""
    ins, outs = state_names(len(ckpt.model.lstm_units))
    return {
        C.META_FORMAT_VERSION: str(C.FORMAT_VERSION),
        C.META_VOCAB: json.dumps(list(ckpt.vocab.chars), ensure_ascii=False),
        C.META_LOWERCASE: json.dumps(ckpt.train.lowercase),
        C.META_MODEL_CONFIG: json.dumps(to_dict(ckpt.model)),
        C.META_TRAIN_CONFIG: json.dumps(to_dict(ckpt.train)),
        C.META_METRICS: json.dumps({k: v for k, v in ckpt.metrics.items() if k != "history"}),
        C.META_STATE_INPUTS: json.dumps(ins),
        C.META_STATE_OUTPUTS: json.dumps(outs),
        C.META_STATE_SIZES: json.dumps(_state_sizes(ckpt)),
        C.META_PARITY: repr(max_diff),
        C.META_GENERATION: json.dumps({
            "inputs": list(C.GENERATION_INPUTS), "output": SAMPLED_IDS, "precision": precision,
            "noise": C.NOISE_OF_VERSION[C.FORMAT_VERSION], **gen_check,
        }),
        C.META_EXPORTED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds"),
        C.META_CONTENT_SHA256: C.CONTENT_HASH_PLACEHOLDER,  # sealed when the file is written
    }


def _describe(proto, ckpt: ckptlib.Checkpoint, metadata: dict[str, str]) -> None:
    """Set the metadata, the producer and the doc string of the model."""
    del proto.metadata_props[:]
    for k, v in metadata.items():
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "textgen"
    proto.doc_string = (
        f"textgen character LSTM step model: {len(ckpt.model.lstm_units)} x LSTM {list(ckpt.model.lstm_units)}, "
        f"vocabulary {ckpt.vocab.size}; inputs {CHAR_IDS} (B,T) int32 + state + sampling inputs, outputs "
        f"logits + state + {SAMPLED_IDS}"
    )


def metadata_json(metadata: dict[str, str]) -> bytes:
    """The ``metadata_json`` output's bytes: one JSON object of every metadata key but the content
    hash, each value parsed (``textgen.exported_at``, a plain string, as it is; UTF-8, keys sorted)."""
    values = {k: v if k == C.META_EXPORTED_AT else json.loads(v) for k, v in metadata.items()
              if k != C.META_CONTENT_SHA256}
    return json.dumps(values, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def add_metadata_output(proto, metadata: dict[str, str]) -> None:
    """The graph output ``metadata_json`` (N,) uint8 (an Identity of a constant): bindings that
    cannot read ``metadata_props`` (onnxruntime's JavaScript API) fetch it with any call."""
    from onnx import TensorProto, helper, numpy_helper

    data = np.frombuffer(metadata_json(metadata), np.uint8)
    proto.graph.initializer.append(numpy_helper.from_array(data, "gen_metadata_json"))
    proto.graph.node.append(helper.make_node("Identity", ["gen_metadata_json"], [C.METADATA_JSON]))
    proto.graph.output.append(helper.make_tensor_value_info(C.METADATA_JSON, TensorProto.UINT8, [len(data)]))


# ---------------------------------------------------------------------------------------------
# Calling the exported graph


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


class _Calls:
    """One onnxruntime session of the exported graph: ``calls(ids, state, steps, **settings)`` ->
    (logits, state, sampled ids). The state defaults to zeros; the noise, unless given, is fresh
    Gumbel noise from ``rng`` (zeros when every row is greedy)."""

    def __init__(self, onnx_bytes: bytes, ckpt: ckptlib.Checkpoint, rng: np.random.Generator) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.rng = rng
        self.state_inputs, state_outputs = state_names(len(ckpt.model.lstm_units))
        self.outputs = [LOGITS, *state_outputs, SAMPLED_IDS]
        self.state_sizes = _state_sizes(ckpt)
        self.vocab_size = ckpt.vocab.size

    def __call__(self, ids, state=None, steps: int = 0, noise=None, temperature=1.0,
                 **filters) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        state = state or [np.zeros((len(ids), h), np.float32) for h in self.state_sizes]
        if noise is None and np.all(np.asarray(temperature) > 0):
            noise = self.rng.gumbel(size=(len(ids), steps, self.vocab_size))
        feed = {CHAR_IDS: ids, **dict(zip(self.state_inputs, state)),
                **generation_feed(len(ids), steps, self.vocab_size, noise, temperature, **filters)}
        out = self.session.run(self.outputs, feed)
        return out[0], out[1:-1], out[-1]


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# K = 0: parity with Keras


def check_parity(onnx_bytes: bytes, train_model, step, ckpt: ckptlib.Checkpoint, seed: int = 0) -> float:
    """Random sequences through Keras and onnxruntime; raise ExportError beyond PARITY_TOLERANCE.

    Checks (1) the step model equals the training model from a zero state (the weights transferred),
    (2) onnxruntime equals Keras from a random state, and (3) state carried across two onnxruntime
    calls equals one call over the whole sequence. Returns the largest difference seen."""
    rng = np.random.default_rng(seed)
    b, t, split = 3, 17, 7
    ids = rng.integers(0, ckpt.vocab.size, size=(b, t), dtype=np.int32)
    zeros = [np.zeros((b, h), np.float32) for h in _state_sizes(ckpt)]
    state = [rng.normal(0, 0.5, (b, h)).astype(np.float32) for h in _state_sizes(ckpt)]

    diffs: dict[str, float] = {}
    keras_zero = step.predict([ids, *zeros], verbose=0)
    diffs["step model vs training model"] = _maxdiff(keras_zero[0], train_model.predict(ids, verbose=0))

    call = _Calls(onnx_bytes, ckpt, rng)
    expected = step.predict([ids, *state], verbose=0)
    logits, state_out, sampled = call(ids, state)
    diffs["onnxruntime vs keras (logits)"] = _maxdiff(logits, expected[0])
    diffs["onnxruntime vs keras (state)"] = max(_maxdiff(g, e) for g, e in zip(state_out, expected[1:]))
    if sampled.shape != (b, 0):
        raise ExportError(f"with no sampling steps the graph returned sampled ids of shape {sampled.shape}")
    first = call(ids[:, :split], state)
    second = call(ids[:, split:], first[1])
    carried = np.concatenate([first[0], second[0]], axis=1)
    diffs["carried state vs one call"] = max(
        _maxdiff(carried, logits), *(_maxdiff(a, e) for a, e in zip(second[1], state_out))
    )
    bad = {k: v for k, v in diffs.items() if not v <= PARITY_TOLERANCE}
    if bad:
        raise ExportError(
            "ONNX parity check failed (tolerance %.0e): %s; the file was not written"
            % (PARITY_TOLERANCE, ", ".join(f"{k}: {v:.3g}" for k, v in bad.items()))
        )
    return float(max(diffs.values()))


# ---------------------------------------------------------------------------------------------
# K > 0: the sampling loop


def check_generation(onnx_bytes: bytes, ckpt: ckptlib.Checkpoint, seed: int = 0, precision: str = "int8") -> dict:
    """Check the sampling loop against the fp32 step model in the same file (K = 0 calls):

    (1) sampling frequencies (``_check_sampling_frequencies``) within GEN_TV_TOLERANCE of the
        fp32 softmax;
    (2) greedy (temperature 0, no noise) picks the fp32 argmax in >= 90% of 64 random states (all of
        them with fp32 loop weights: then greedy is argmax of the K = 0 logits, docs/format.md);
    (3) top-k 1 equals greedy; top-k 3 stays inside the fp32 top 5; top-p 0.5 inside the fp32 top-p
        0.7 set;
    and exactly, what generation relies on for "same seed, same text":
    (4) chunking: one call of 12 steps == two calls of 6 with the pending id carried over, with
        and without filters;
    (5) batches: every row of a batch with mixed settings (greedy, temperature only, filters) ==
        the row alone, ids and state;
    (6) prompts: the whole prompt in the first call == its first T - 1 characters in a K = 0 call,
        then the last one.
    Raises ExportError; returns the measured figures for the metadata. The checks draw from one
    RNG in this order, so the figures are the same for the same file and seed."""
    call = _Calls(onnx_bytes, ckpt, np.random.default_rng(seed + 1))
    tv, frequency_problem = _check_sampling_frequencies(call)
    states = call.rng.integers(0, ckpt.vocab.size, size=(64, 16), dtype=np.int32)
    last = call(states)[0][:, -1]  # the fp32 logits after each state
    greedy_agree, greedy, greedy_problem = _check_greedy(call, states, last, 1.0 if precision == "fp32" else 0.9)
    problems = [frequency_problem, greedy_problem, *_check_filters(call, states, last, greedy),
                _check_chunks(call, states)]
    batch = _mixed_batch(call, states)
    problems += [_check_batch(call, states, batch), _check_prompt(call, states, batch)]
    problems = [p for p in problems if p]
    if problems:
        raise ExportError("generation loop check failed: " + "; ".join(problems) + "; the file was not written")
    return {"sampling_total_variation": tv, "greedy_agreement": greedy_agree, "exact": ["chunks", "batch", "prompt"]}


def _check_sampling_frequencies(call: _Calls) -> tuple[float, str | None]:
    """4,096 rows in the same state, temperature 1, independent Gumbel noise: the histogram of sampled
    ids estimates the loop's next-character distribution; its total variation from the fp32 softmax
    must be <= GEN_TV_TOLERANCE (sampling error alone is ~0.02 at 4,096 draws; the int8 weights add
    their own difference). Returns the total variation and the problem, if any."""
    n, v = 4096, call.vocab_size
    prompt = call.rng.integers(0, v, size=(1, 24), dtype=np.int32)
    logits, _, _ = call(prompt)
    p = _softmax(logits[0, -1].astype(np.float64))
    _, _, sampled = call(np.repeat(prompt, n, axis=0), steps=1)
    tv = float(0.5 * np.abs(np.bincount(sampled[:, 0], minlength=v) / n - p).sum())
    if not tv <= GEN_TV_TOLERANCE:
        return tv, f"sampling frequencies differ from the fp32 softmax by total variation {tv:.3f}"
    return tv, None


def _check_greedy(call: _Calls, states: np.ndarray, last: np.ndarray, least: float
                  ) -> tuple[float, np.ndarray, str | None]:
    """Greedy (temperature 0, no noise) must pick the fp32 argmax ``last`` in at least ``least`` of
    ``states``. Returns the agreement, the greedy ids and the problem, if any."""
    _, _, greedy = call(states, steps=1, temperature=0.0)
    agree = float(np.mean(greedy[:, 0] == last.argmax(axis=1)))
    if agree < least:
        return agree, greedy, f"greedy picks the fp32 argmax in only {agree:.0%} of states"
    return agree, greedy, None


def _check_filters(call: _Calls, states: np.ndarray, last: np.ndarray, greedy: np.ndarray) -> list[str]:
    """top_k 1 must equal greedy; top_k 3 stay inside the fp32 top 5 (int8 may swap near-tied ranks,
    never reach far down); top_p 0.5 inside the fp32 top-p 0.7 set. Returns the problems."""
    _, _, top1 = call(states, steps=1, top_k=1)
    _, _, top3 = call(states, steps=1, top_k=3)
    _, _, topp = call(states, steps=1, top_p=0.5)
    order = np.argsort(-last, axis=1)
    probs = np.take_along_axis(_softmax(last.astype(np.float64)), order, axis=1)
    problems = []
    if not np.array_equal(top1, greedy):
        problems.append("top_k=1 does not equal greedy")
    if not all(t in row[:5] for t, row in zip(top3[:, 0], order)):
        problems.append("top_k=3 sampled ids outside the fp32 top 5")
    if not all(t in row[: int(np.searchsorted(np.cumsum(pr), 0.7)) + 1] for t, row, pr in zip(topp[:, 0], order, probs)):
        problems.append("top_p=0.5 sampled ids outside the fp32 top-p 0.7 set")
    return problems


def _check_chunks(call: _Calls, states: np.ndarray) -> str | None:
    """One call of 12 steps must equal two calls of 6 with the pending id carried over, ids and state,
    with and without filters. Returns the problem, if any."""
    equal = True
    for filters in ({}, dict(top_k=10, top_p=0.9)):
        noise = call.rng.gumbel(size=(4, 12, call.vocab_size))
        ids4 = states[:4]
        _, whole_state, whole = call(ids4, steps=12, noise=noise, temperature=0.8, **filters)
        _, state, first = call(ids4, steps=6, noise=noise[:, :6], temperature=0.8, **filters)
        _, state, second = call(first[:, -1:], state, steps=6, noise=noise[:, 6:], temperature=0.8, **filters)
        equal &= np.array_equal(whole, np.concatenate([first, second], axis=1)) and _same(whole_state, state)
    return None if equal else "one call of 12 steps differs from two calls of 6 steps"


@dataclass
class _MixedBatch:
    """24 steps sampled for 4 rows with mixed settings in one call: what the batch and prompt checks
    compare with."""

    settings: dict
    noise: np.ndarray
    ids: np.ndarray
    state: list


def _mixed_batch(call: _Calls, states: np.ndarray) -> _MixedBatch:
    temperature = np.array([0.8, 0.0, 1.3, 0.7])
    settings = dict(temperature=temperature, top_k=np.array([0, 0, 5, 0]), top_p=np.array([1.0, 1.0, 0.9, 0.8]))
    noise = call.rng.gumbel(size=(4, 24, call.vocab_size)) * (temperature > 0)[:, None, None]
    _, state, ids = call(states[:4], steps=24, noise=noise, **settings)
    return _MixedBatch(settings, noise, ids, state)


def _check_batch(call: _Calls, states: np.ndarray, batch: _MixedBatch) -> str | None:
    """Every row of the mixed batch must equal the row alone, ids and state."""
    equal = True
    for r in range(len(batch.ids)):
        _, alone_state, alone = call(states[r : r + 1], steps=24, noise=batch.noise[r : r + 1],
                                     **{k: x[r : r + 1] for k, x in batch.settings.items()})
        row_state = [s[r : r + 1] for s in batch.state]
        equal &= np.array_equal(alone, batch.ids[r : r + 1]) and _same(alone_state, row_state)
    return None if equal else "a row sampled in a batch differs from the same row alone"


def _check_prompt(call: _Calls, states: np.ndarray, batch: _MixedBatch) -> str | None:
    """The mixed batch's prompts consumed in its one call must equal the same prompts' first T - 1
    characters in a K = 0 call, then the last one."""
    _, pre_state, _ = call(states[:4, :-1])
    _, split_state, split = call(states[:4, -1:], pre_state, steps=24, noise=batch.noise, **batch.settings)
    if np.array_equal(split, batch.ids) and _same(split_state, batch.state):
        return None
    return "a prompt consumed in the first call differs from the same prompt prefilled"

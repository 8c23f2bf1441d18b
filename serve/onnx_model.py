"""The ONNX step model behind one onnxruntime session: load, check the contract, run steps.

The contract (written by ``export/onnx.py``):

    inputs    char_ids (B, T) int32; h_i, c_i (B, H_i) float32 for every LSTM layer i
    outputs   logits (B, T, V) float32; h_i_out, c_i_out (B, H_i) float32
    metadata  textgen.format_version "1", textgen.vocab (JSON list, index = id), textgen.lowercase,
              textgen.model_config, textgen.train_config, textgen.metrics, textgen.state_inputs,
              textgen.state_outputs, textgen.state_sizes (JSON), ...

``OnnxModel.load`` checks all of it and says what is wrong with a file that does not match. The
per-step work (feed ids + state, get logits + state) is behind a small interface used by the
generator: ``OnnxModel.prefill`` (prompts -> last logits and state, one call per prompt length)
and ``Stepper`` (one character per row per call, state kept in preallocated buffers). A faster
backend (quantised weights, an in-graph loop) replaces these two and nothing else.

One session may serve many threads at once; every request owns its ``Stepper`` (state, buffers).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

from serve.text import GeneratorError, Vocabulary

FORMAT_VERSION = "1"
INPUT_NAME = "char_ids"  # (B, T) int32
LOGITS_NAME = "logits"  # (B, T, V) float32
REQUIRED_METADATA = (
    "textgen.format_version",
    "textgen.vocab",
    "textgen.lowercase",
    "textgen.model_config",
    "textgen.state_inputs",
    "textgen.state_outputs",
    "textgen.state_sizes",
)
# Every error onnxruntime raises while loading a file (they derive from Exception directly).
_ORT_LOAD_ERRORS = tuple(
    getattr(_ort_errors, n)
    for n in ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph",
              "ModelLoaded", "NotImplemented", "RuntimeException", "EPFail")
    if hasattr(_ort_errors, n)
)
# Prefill runs at most this many prompt characters per call (rows x T), bounding the (B, T, V)
# logits of one call to ~180 MB for V = 45; a longer prompt still goes in one call of its own.
PREFILL_CHARS_PER_CALL = 1 << 20

HOW_TO_EXPORT = "export a checkpoint with `textgen export RUN_DIR --out model.onnx`"


class ModelFileError(GeneratorError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    """The ``textgen.*`` metadata of an exported model, parsed and checked."""

    vocab: tuple[str, ...]
    lowercase: bool
    state_inputs: tuple[str, ...]  # h_0, c_0, h_1, c_1, ...
    state_outputs: tuple[str, ...]  # h_0_out, c_0_out, ...
    state_sizes: tuple[int, ...]  # H per state input
    model_config: dict[str, Any]  # kind, embedding_dim, lstm_units, dropout, seq_len
    train_config: dict[str, Any] = field(default_factory=dict)  # val_fraction, seed, lowercase, ...
    metrics: dict[str, Any] = field(default_factory=dict)  # val_loss, val_bpc, epoch, ...
    exported_at: str | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def session_options(num_threads: int = 1) -> ort.SessionOptions:
    """One intra-op thread by default: a server runs one request per core rather than one request
    on all cores, and a single step is small (bench/generation.py compares batches on 1 and all
    cores). ``num_threads=0`` lets onnxruntime use one thread per core."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise GeneratorError(f"num_threads must be an integer >= 0 (0: one per core), got {num_threads!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = num_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    return so


class OnnxModel:
    """A checked step model: ``OnnxModel.load(path)``, then ``prefill``/``stepper``/``run``."""

    def __init__(self, session: ort.InferenceSession, info: ModelInfo, path: str = "<memory>") -> None:
        self.session = session
        self.info = info
        self.path = path
        self.vocabulary = Vocabulary(info.vocab)
        _check_signature(session, info, path)
        self._output_names = [LOGITS_NAME, *info.state_outputs]

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        num_threads: int | None = None,
        options: ort.SessionOptions | None = None,
    ) -> OnnxModel:
        """Open and check ``path``. ``num_threads`` (default 1) sets intra-op threads; ``options``
        replaces the whole ``onnxruntime.SessionOptions`` (``num_threads`` still applies if given)."""
        p = Path(path)
        if not p.exists():
            raise ModelFileError(f"model file {p} does not exist; {HOW_TO_EXPORT}")
        if p.is_dir():
            raise ModelFileError(f"{p} is a directory; pass the .onnx file ({HOW_TO_EXPORT})")
        if p.stat().st_size == 0:
            raise ModelFileError(f"model file {p} is empty (0 bytes); copy or export it again ({HOW_TO_EXPORT})")
        if options is None:
            options = session_options(1 if num_threads is None else num_threads)
        elif num_threads is not None:
            session_options(num_threads)  # validates
            options.intra_op_num_threads = num_threads
        try:
            session = ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
        except _ORT_LOAD_ERRORS as e:
            reason = str(e).split(" : ")[-1].strip()
            reason = re.sub(r"^Load model from .* failed:\s*", "", reason)
            raise ModelFileError(
                f"{p} is not a loadable ONNX model ({reason}); it may be truncated or another kind "
                f"of file: {HOW_TO_EXPORT}"
            ) from None
        info = read_metadata(session.get_modelmeta().custom_metadata_map, str(p))
        return cls(session, info, str(p))

    # -- the interface the generator uses -------------------------------------------------------

    def zero_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h), np.float32) for h in self.info.state_sizes]

    def run(
        self, char_ids: np.ndarray, state: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: char_ids (B, T) int32 and state (zero if None) -> logits (B, T, V), new state."""
        char_ids = np.ascontiguousarray(char_ids, dtype=np.int32)
        if state is None:
            state = self.zero_state(char_ids.shape[0])
        feed = {INPUT_NAME: char_ids, **dict(zip(self.info.state_inputs, state))}
        logits, *new_state = self.session.run(self._output_names, feed)
        return logits, new_state

    def prefill(self, prompts: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Consume every row's prompt from the zero state -> (B, V) logits of its last position and
        the (B, H) state after it. Each distinct prompt runs once; prompts of equal length share
        one call (T = their length), so a batch of n samples of one prompt costs one call."""
        if any(len(p) == 0 for p in prompts):
            raise GeneratorError("prefill needs at least one character per prompt")
        unique: list[np.ndarray] = []  # distinct prompts
        index: dict[bytes, int] = {}
        row_of = np.empty(len(prompts), np.intp)  # (B,) row -> its distinct prompt
        for row, p in enumerate(prompts):
            key = p.tobytes()
            if key not in index:
                index[key] = len(unique)
                unique.append(p)
            row_of[row] = index[key]
        logits = np.empty((len(unique), self.info.vocab_size), np.float32)
        state = self.zero_state(len(unique))
        by_length: dict[int, list[int]] = {}
        for u, p in enumerate(unique):
            by_length.setdefault(len(p), []).append(u)
        for length, members in by_length.items():
            per_call = max(1, PREFILL_CHARS_PER_CALL // length)
            for i in range(0, len(members), per_call):
                rows = members[i : i + per_call]
                out, new_state = self.run(np.stack([unique[u] for u in rows]))
                logits[rows] = out[:, -1]
                for s, n in zip(state, new_state):
                    s[rows] = n
        return logits[row_of], [s[row_of] for s in state]

    def stepper(self, state: Sequence[np.ndarray]) -> Stepper:
        return Stepper(self, state)

    def window_loss(self, ids: np.ndarray, seq_len: int, batch_size: int = 64) -> tuple[float, int, int]:
        """Training's validation protocol: windows of seq_len + 1 ids from position 0 with stride
        seq_len (full windows only), each run from the zero state; cross-entropy at every position.
        Returns (total nats, characters scored, windows)."""
        starts = np.arange(0, len(ids) - seq_len, seq_len)  # (N,)
        offsets = np.arange(seq_len + 1)
        total = 0.0
        for i in range(0, len(starts), batch_size):
            windows = ids[starts[i : i + batch_size, None] + offsets]  # (b, L + 1)
            logits, _ = self.run(windows[:, :-1])  # (b, L, V)
            x = logits.astype(np.float64)
            m = x.max(axis=-1, keepdims=True)
            lse = m[..., 0] + np.log(np.exp(x - m).sum(axis=-1))  # (b, L)
            target = np.take_along_axis(x, windows[:, 1:, None].astype(np.intp), axis=-1)[..., 0]
            total += float((lse - target).sum())
        return total, len(starts) * seq_len, len(starts)


class Stepper:
    """One character per row per call, for one request. The state lives in two preallocated sets of
    buffers bound to the session (``io_binding``) in both directions: step n reads set A and writes
    set B, step n+1 the reverse, so no step allocates arrays for inputs, state or logits.

    ``step`` returns a (B, V) view of the logits buffer: it is overwritten by the next step."""

    def __init__(self, model: OnnxModel, state: Sequence[np.ndarray]) -> None:
        self.model = model
        self._bind(list(state))

    @property
    def batch(self) -> int:
        return self._ids.shape[0]

    def _bind(self, state: list[np.ndarray]) -> None:
        info, session = self.model.info, self.model.session
        b = state[0].shape[0]
        self._ids = np.zeros((b, 1), np.int32)  # (B, 1)
        self._logits = np.zeros((b, 1, info.vocab_size), np.float32)  # (B, 1, V)
        self._states = (
            [np.array(s, np.float32, order="C", copy=True) for s in state],
            [np.empty_like(s, np.float32) for s in state],
        )
        ortvalue = ort.OrtValue.ortvalue_from_numpy  # shares the numpy buffer (CPU)
        self._bindings = []
        for src, dst in ((0, 1), (1, 0)):
            binding = session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, ortvalue(self._ids))
            binding.bind_ortvalue_output(LOGITS_NAME, ortvalue(self._logits))
            for name, s in zip(info.state_inputs, self._states[src]):
                binding.bind_ortvalue_input(name, ortvalue(s))
            for name, s in zip(info.state_outputs, self._states[dst]):
                binding.bind_ortvalue_output(name, ortvalue(s))
            self._bindings.append(binding)
        self._current = 0  # index of the set holding the latest state

    @property
    def state(self) -> list[np.ndarray]:
        """The latest state (B, H) per state input (views of the live buffers)."""
        return self._states[self._current]

    def step(self, char_ids: np.ndarray) -> np.ndarray:
        """(B,) int32 ids -> (B, V) logits of the next character; advances the state."""
        self._ids[:, 0] = char_ids
        self.model.session.run_with_iobinding(self._bindings[self._current])
        self._current ^= 1
        return self._logits[:, 0]

    def keep(self, rows: np.ndarray) -> None:
        """Continue with ``rows`` only (indices into the current rows): finished rows cost nothing."""
        self._bind([s[rows] for s in self.state])


# ---------------------------------------------------------------------------------------------
# Checks


def _json(meta: dict[str, str], key: str, path: str) -> Any:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: metadata {key} is not valid JSON ({e}); {HOW_TO_EXPORT}") from None


def read_metadata(meta: dict[str, str], path: str = "<memory>") -> ModelInfo:
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelFileError(
            f"{path} has no textgen metadata ({', '.join(missing)} missing): it was not written by "
            f"textgen's exporter; {HOW_TO_EXPORT}"
        )
    version = meta["textgen.format_version"]
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has textgen.format_version {version!r}; this generator reads version {FORMAT_VERSION}; "
            "export the model again with this version of textgen"
        )
    vocab = _json(meta, "textgen.vocab", path)
    lowercase = _json(meta, "textgen.lowercase", path)
    model_config = _json(meta, "textgen.model_config", path)
    ins = _json(meta, "textgen.state_inputs", path)
    outs = _json(meta, "textgen.state_outputs", path)
    sizes = _json(meta, "textgen.state_sizes", path)
    problems = []
    if not (isinstance(vocab, list) and len(vocab) >= 2 and all(isinstance(c, str) and len(c) == 1 for c in vocab)
            and len(set(vocab)) == len(vocab)):
        problems.append("textgen.vocab must be a list of two or more distinct single characters")
    if not isinstance(lowercase, bool):
        problems.append("textgen.lowercase must be true or false")
    if not isinstance(model_config, dict):
        problems.append("textgen.model_config must be a JSON object")
    if not (isinstance(ins, list) and isinstance(outs, list) and isinstance(sizes, list)
            and len(ins) == len(outs) == len(sizes) > 0 and all(isinstance(n, str) for n in ins + outs)
            and all(isinstance(h, int) and h > 0 for h in sizes)):
        problems.append("textgen.state_inputs, state_outputs and state_sizes must be lists of equal, non-zero "
                        "length (names, names, positive sizes)")
    if problems:
        raise ModelFileError(f"{path}: bad textgen metadata: {'; '.join(problems)}; {HOW_TO_EXPORT}")
    optional = {}
    for key in ("train_config", "metrics"):
        value = _json(meta, f"textgen.{key}", path) if f"textgen.{key}" in meta else {}
        optional[key] = value if isinstance(value, dict) else {}
    return ModelInfo(
        vocab=tuple(vocab), lowercase=lowercase, state_inputs=tuple(ins), state_outputs=tuple(outs),
        state_sizes=tuple(sizes), model_config=model_config, exported_at=meta.get("textgen.exported_at"),
        **optional,
    )


def _check_signature(session: ort.InferenceSession, info: ModelInfo, path: str) -> None:
    """The graph's inputs and outputs must be exactly what the metadata promises."""
    want_in = {INPUT_NAME: ("tensor(int32)", [None, None])}
    want_in.update({n: ("tensor(float)", [None, h]) for n, h in zip(info.state_inputs, info.state_sizes)})
    want_out = {LOGITS_NAME: ("tensor(float)", [None, None, info.vocab_size])}
    want_out.update({n: ("tensor(float)", [None, h]) for n, h in zip(info.state_outputs, info.state_sizes)})

    def describe(args) -> dict[str, tuple[str, list]]:
        return {a.name: (a.type, list(a.shape)) for a in args}

    problems = []
    for what, want, got in (("input", want_in, describe(session.get_inputs())),
                            ("output", want_out, describe(session.get_outputs()))):
        for name in want.keys() - got.keys():
            problems.append(f"missing {what} {name!r}")
        for name in got.keys() - want.keys():
            problems.append(f"unexpected {what} {name!r}")
        for name in want.keys() & got.keys():
            (want_type, want_shape), (got_type, got_shape) = want[name], got[name]
            fixed_ok = len(got_shape) == len(want_shape) and all(
                w is None or not isinstance(g, int) or g == w for w, g in zip(want_shape, got_shape)
            )
            if got_type != want_type or not fixed_ok:
                shape = ", ".join("?" if w is None else str(w) for w in want_shape)
                problems.append(f"{what} {name!r} is {got_type} {got_shape}, expected {want_type} ({shape})")
    if problems:
        raise ModelFileError(
            f"{path} does not match the textgen step-model contract: {'; '.join(sorted(problems))}. "
            f"Expected inputs {INPUT_NAME} (B, T) int32 + {', '.join(info.state_inputs)} and outputs "
            f"{LOGITS_NAME} (B, T, V={info.vocab_size}) + {', '.join(info.state_outputs)}; {HOW_TO_EXPORT}"
        )

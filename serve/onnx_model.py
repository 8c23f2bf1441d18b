"""The exported model behind one onnxruntime session: load, check the contract, run calls.

The contract (``textgen.contract``: written by ``export/onnx.py`` and ``export/generation.py``):
char_ids, the per-layer state, Gumbel noise and the (B,) temperature / top_k / top_p in; logits,
the state and K sampled ids out; ``textgen.*`` metadata.

One call consumes ``char_ids`` and then samples K characters in the graph (an ONNX ``Loop``); the
state outputs are the state after ``char_ids`` and the first K - 1 sampled ids: the last one is
*pending*, the next call's ``char_ids`` (B, 1). With K = 0 the call is the plain step model
(logits of every position, the state after ``char_ids``).

``OnnxModel.load`` checks all of it and says what is wrong with a file that does not match. The
generator uses three calls: ``run`` (K = 0: logits and state, for evaluation), ``prefill``
(prompts -> state, one K = 0 call per prompt length) and ``chunk`` (sample K characters per row).
One session may serve many threads at once: the calls keep no state of their own.
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

from textgen import contract as C
from textgen.contract import CHAR_IDS, LOGITS, NOISE, REQUIRED_METADATA, SAMPLED_IDS
from textgen.errors import TextgenError as GeneratorError
from textgen.text import Vocab, VocabError

# (name, ONNX type, numpy dtype) of the (B,) sampling settings.
SETTING_INPUTS = tuple((name, f"tensor({C.DTYPES[name].replace('float32', 'float')})", np.dtype(C.DTYPES[name]))
                       for name in C.SETTINGS)
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
OLDER_TEXTGEN = "this model was exported by an older textgen; re-export it with `textgen export`"


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
    generation: dict[str, Any] = field(default_factory=dict)  # precision, noise, export-time checks, ...
    exported_at: str | None = None
    format_version: int = C.FORMAT_VERSION

    @property
    def noise(self) -> str:
        """The noise algorithm the file's texts are defined with (``textgen.contract``)."""
        return self.generation.get("noise", C.NOISE_OF_VERSION[self.format_version])

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
    """A checked model: ``OnnxModel.load(path)``, then ``run`` / ``prefill`` / ``chunk``."""

    def __init__(self, session: ort.InferenceSession, info: ModelInfo, path: str = "<memory>") -> None:
        self.session = session
        self.info = info
        self.path = path
        self.vocabulary = Vocab(info.vocab)
        _check_signature(session, info, path)
        self._step_outputs = [LOGITS, *info.state_outputs]
        self._chunk_outputs = [SAMPLED_IDS, *info.state_outputs]

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
        data = p.read_bytes()  # one read: what is checked is what runs
        try:
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except _ORT_LOAD_ERRORS as e:
            reason = str(e).split(" : ")[-1].strip()
            reason = re.sub(r"^Load model from .* failed:\s*", "", reason)
            raise ModelFileError(
                f"{p} is not a loadable ONNX model ({reason}); it may be truncated or another kind "
                f"of file: {HOW_TO_EXPORT}"
            ) from None
        info = read_metadata(session.get_modelmeta().custom_metadata_map, str(p))
        model = cls(session, info, str(p))
        _check_content_hash(data, str(p))
        return model

    # -- the interface the generator uses -------------------------------------------------------

    def zero_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, h), np.float32) for h in self.info.state_sizes]

    def settings(self, batch: int, temperature=1.0, top_k=0, top_p=1.0) -> dict[str, np.ndarray]:
        """The (B,) ``temperature``, ``top_k``, ``top_p`` inputs: scalars are repeated per row."""
        return {name: np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype), (batch,)))
                for (name, _, dtype), value in zip(SETTING_INPUTS, (temperature, top_k, top_p))}

    def run(
        self, char_ids: np.ndarray, state: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """The step model (K = 0): char_ids (B, T) int32 and state (zero if None) -> logits
        (B, T, V) and the state after char_ids."""
        char_ids = np.ascontiguousarray(char_ids, dtype=np.int32)
        b = char_ids.shape[0]
        if state is None:
            state = self.zero_state(b)
        feed = {CHAR_IDS: char_ids, **dict(zip(self.info.state_inputs, state)),
                NOISE: np.zeros((b, 0, self.info.vocab_size), np.float32), **self.settings(b)}
        logits, *new_state = self.session.run(self._step_outputs, feed)
        return logits, new_state

    def chunk(
        self,
        char_ids: np.ndarray,
        state: Sequence[np.ndarray],
        noise: np.ndarray,
        settings: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Consume char_ids (B, T) from ``state``, then sample K characters per row in the graph.

        noise (B, K, V) float32: standard Gumbel noise (``sampling.RowNoise``); settings: the
        (B,) temperature / top_k / top_p arrays (``settings``). Returns the sampled ids (B, K) int32
        and the state before the last of them, which is pending: the next call's char_ids."""
        feed = {CHAR_IDS: np.ascontiguousarray(char_ids, dtype=np.int32),
                **dict(zip(self.info.state_inputs, state)), NOISE: noise, **settings}
        ids, *new_state = self.session.run(self._chunk_outputs, feed)
        return ids, new_state

    def prefill(self, prompts: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The state (B, H) after each row's prompt (T_b,) from the zero state; an empty prompt
        leaves the zero state. Each distinct prompt runs once; prompts of equal length share one
        call (T = their length), so n rows of one prompt cost one call."""
        unique: list[np.ndarray] = []  # distinct non-empty prompts
        index: dict[bytes, int] = {}
        row_of = np.full(len(prompts), -1, np.intp)  # (B,) row -> its distinct prompt (-1: empty)
        for row, p in enumerate(prompts):
            if len(p) == 0:
                continue
            key = p.tobytes()
            if key not in index:
                index[key] = len(unique)
                unique.append(p)
            row_of[row] = index[key]
        state = self.zero_state(len(unique) + 1)  # the last row stays zero: the empty prompts'
        by_length: dict[int, list[int]] = {}
        for u, p in enumerate(unique):
            by_length.setdefault(len(p), []).append(u)
        for length, members in by_length.items():
            per_call = max(1, PREFILL_CHARS_PER_CALL // length)
            for i in range(0, len(members), per_call):
                rows = members[i : i + per_call]
                _, new_state = self.run(np.stack([unique[u] for u in rows]))
                for s, n in zip(state, new_state):
                    s[rows] = n
        return [s[row_of] for s in state]

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


# ---------------------------------------------------------------------------------------------
# Checks


def _json(meta: dict[str, str], key: str, path: str) -> Any:
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: metadata {key} is not valid JSON ({e}); {HOW_TO_EXPORT}") from None


def read_metadata(meta: dict[str, str], path: str = "<memory>") -> ModelInfo:
    version = _check_version(meta, path)
    v = {key: _json(meta, key, path) for key in (*REQUIRED_METADATA, C.META_GENERATION) if key != C.META_FORMAT_VERSION}
    problems = _metadata_problems(v, version)
    if problems:
        raise ModelFileError(f"{path}: bad textgen metadata: {'; '.join(problems)}; {HOW_TO_EXPORT}")
    optional = {}
    for name, key in (("train_config", C.META_TRAIN_CONFIG), ("metrics", C.META_METRICS)):
        value = _json(meta, key, path) if key in meta else {}
        optional[name] = value if isinstance(value, dict) else {}
    val_fraction = optional["train_config"].get("val_fraction", 0.1)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 0.5:
        raise ModelFileError(f"{path}: bad textgen metadata: {C.META_TRAIN_CONFIG}: val_fraction must be in "
                             f"(0, 0.5) as in training, got {val_fraction!r}; {HOW_TO_EXPORT}")
    return ModelInfo(
        vocab=tuple(v[C.META_VOCAB]), lowercase=v[C.META_LOWERCASE], state_inputs=tuple(v[C.META_STATE_INPUTS]),
        state_outputs=tuple(v[C.META_STATE_OUTPUTS]), state_sizes=tuple(v[C.META_STATE_SIZES]),
        model_config=v[C.META_MODEL_CONFIG], generation=v[C.META_GENERATION],
        exported_at=meta.get(C.META_EXPORTED_AT), format_version=version, **optional,
    )


def _check_content_hash(data: bytes, path: str) -> None:
    """The file's bytes must match the content hash written at export (``textgen.contract``); a
    file exported before there was one has none to check."""
    found = C.content_sha256(data)
    if found is not None and found[0] != found[1]:
        raise ModelFileError(f"{path} was modified after export (content hash mismatch); export it again "
                             f"with `textgen export RUN_DIR --out model.onnx`")


def _check_version(meta: dict[str, str], path: str) -> int:
    """A textgen file of a format version this reader reads, with the sampling loop: its version."""
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelFileError(
            f"{path} has no textgen metadata ({', '.join(missing)} missing): it was not written by "
            f"textgen's exporter; {HOW_TO_EXPORT}"
        )
    version = meta[C.META_FORMAT_VERSION]
    readable = {str(n): n for n in C.READABLE_FORMAT_VERSIONS}  # the metadata holds it as a string
    if version not in readable:
        versions = " and ".join(map(str, C.READABLE_FORMAT_VERSIONS))
        raise ModelFileError(
            f"{path} has {C.META_FORMAT_VERSION} {version!r}; this generator reads versions {versions}; "
            "export the model again with this version of textgen"
        )
    if C.META_GENERATION not in meta:  # a step model without the sampling loop
        raise ModelFileError(f"{path}: {OLDER_TEXTGEN} (it has no {C.META_GENERATION} metadata and no sampling loop)")
    return readable[version]


def _metadata_problems(v: dict[str, Any], version: int) -> list[str]:
    """What is wrong with the parsed metadata values (key -> value) of a file of ``version``."""
    vocab, ins, outs, sizes = v[C.META_VOCAB], v[C.META_STATE_INPUTS], v[C.META_STATE_OUTPUTS], v[C.META_STATE_SIZES]
    problems = []
    if not (isinstance(vocab, list) and len(vocab) >= 2 and all(isinstance(c, str) and len(c) == 1 for c in vocab)
            and len(set(vocab)) == len(vocab)):
        problems.append(f"{C.META_VOCAB} must be a list of two or more distinct single characters")
    else:
        try:
            Vocab(tuple(vocab))
        except VocabError as e:
            problems.append(f"{C.META_VOCAB}: {e}")
    if not isinstance(v[C.META_LOWERCASE], bool):
        problems.append(f"{C.META_LOWERCASE} must be true or false")
    model_config = v[C.META_MODEL_CONFIG]
    if not isinstance(model_config, dict):
        problems.append(f"{C.META_MODEL_CONFIG} must be a JSON object")
    elif "seq_len" in model_config and not (type(model_config["seq_len"]) is int and model_config["seq_len"] >= 2):
        problems.append(f"{C.META_MODEL_CONFIG}: seq_len must be an integer >= 2, got {model_config['seq_len']!r}")
    if not (isinstance(ins, list) and isinstance(outs, list) and isinstance(sizes, list)
            and len(ins) == len(outs) == len(sizes) > 0 and all(isinstance(n, str) for n in ins + outs)
            and all(isinstance(h, int) and h > 0 for h in sizes)):
        problems.append(f"{C.META_STATE_INPUTS}, {C.META_STATE_OUTPUTS} and {C.META_STATE_SIZES} must be lists "
                        "of equal, non-zero length (names, names, positive sizes)")
    generation = v[C.META_GENERATION]
    if not isinstance(generation, dict):
        problems.append(f"{C.META_GENERATION} must be a JSON object")
    elif generation.get("noise", C.NOISE_OF_VERSION[version]) != C.NOISE_OF_VERSION[version]:
        problems.append(f"{C.META_GENERATION}: noise {generation['noise']!r} is not format {version}'s "
                        f"{C.NOISE_OF_VERSION[version]!r}")
    return problems


def _check_signature(session: ort.InferenceSession, info: ModelInfo, path: str) -> None:
    """The graph's inputs and outputs must be exactly what the metadata promises."""
    v = info.vocab_size
    want_in = {CHAR_IDS: ("tensor(int32)", [None, None])}
    want_in.update({n: ("tensor(float)", [None, h]) for n, h in zip(info.state_inputs, info.state_sizes)})
    want_in[NOISE] = ("tensor(float)", [None, None, v])
    want_in.update({name: (kind, [None]) for name, kind, _ in SETTING_INPUTS})
    want_out = {LOGITS: ("tensor(float)", [None, None, v])}
    want_out.update({n: ("tensor(float)", [None, h]) for n, h in zip(info.state_outputs, info.state_sizes)})
    want_out[SAMPLED_IDS] = ("tensor(int32)", [None, None])
    if info.format_version >= 2:
        want_out[C.METADATA_JSON] = ("tensor(uint8)", [None])

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
            f"{path} does not match the textgen model contract: {'; '.join(sorted(problems))}. "
            f"Expected inputs {CHAR_IDS} (B, T) int32 + {', '.join(info.state_inputs)} + {NOISE} "
            f"(B, K, V={v}) float32, temperature (B,) float32, top_k (B,) int64, top_p (B,) float32 and outputs "
            f"{LOGITS} (B, T, V={v}) + {', '.join(info.state_outputs)} + {SAMPLED_IDS} (B, K) int32; "
            f"{HOW_TO_EXPORT}"
        )

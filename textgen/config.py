"""Configuration: the model and the training run, as plain dataclasses, and the named presets.

Every field maps one-to-one to a CLI flag (``lstm_units`` -> ``--lstm-units``). The configs are
JSON-serialisable so that a checkpoint (and later the ONNX file) carries exactly what built it.
The training flags themselves are defined here too (``add_train_args``), once for ``textgen train``
and ``python -m jobs.train``. This module imports nothing heavy: the generator and the CLIs read it
without TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from textgen.errors import TextgenError

# Model kinds.
CHAR = "char"  # Embedding -> LSTMs -> Dense logits, a loss at every position of a window.
NOTEBOOK = "notebook"  # The notebook's model: scaled-integer input, one softmax target per 100-char window.
MODEL_KINDS = (CHAR, NOTEBOOK)
SCHEDULES = ("constant", "cosine", "wsd")  # learning-rate schedules (textgen.train.scheduled_learning_rate)


class ConfigError(TextgenError):
    """A configuration value is out of range or inconsistent; the message says which and why."""


@dataclass(frozen=True)
class ModelConfig:
    kind: str = CHAR  # CHAR for our model; NOTEBOOK reproduces the notebook so comparisons run in our code.
    embedding_dim: int = 64  # 45 characters need few dimensions; 64 costs ~3k params and trains fast.
    lstm_units: tuple[int, ...] = (256, 256)  # Two layers of 256, as the notebook's bigger model.
    dropout: float = 0.2  # On every LSTM layer's output.
    seq_len: int = 100  # Characters per training window (the notebook's window length).
    embedding_dropout: float = 0.0  # Drops whole characters of a window (every occurrence of each dropped one).
    input_dropout: float = 0.0  # On the first LSTM's input (the embedding output).
    time_locked: bool = False  # Dropout masks fixed over a window's time steps (variational), not per element.

    def __post_init__(self) -> None:
        object.__setattr__(self, "lstm_units", tuple(int(u) for u in self.lstm_units))
        if self.kind not in MODEL_KINDS:
            raise ConfigError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if not self.lstm_units or any(u < 1 for u in self.lstm_units):
            raise ConfigError(f"lstm_units must be one or more positive sizes, got {self.lstm_units}")
        if self.embedding_dim < 1:
            raise ConfigError(f"embedding_dim must be positive, got {self.embedding_dim}")
        for name in ("dropout", "embedding_dropout", "input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {self.seq_len}")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # Global batch (windows per step, summed over all replicas).
    learning_rate: float = 2e-3  # Adam's (peak) rate.
    schedule: str = "constant"  # "cosine" decays from the start, "wsd" holds then decays; both end with the budget.
    warmup_steps: int = 0  # Linear warm-up from 0 over this many steps (any schedule).
    min_lr_fraction: float = 0.1  # "cosine" and "wsd" end at this fraction of the peak rate.
    decay_fraction: float = 0.3  # "wsd": the last fraction of the budget, a linear decay to min_lr_fraction.
    weight_decay: float = 0.0  # Decoupled (AdamW) decay of the kernels and embeddings, not the biases.
    ema_momentum: float = 0.0  # > 0: evaluate and checkpoint an exponential moving average of the weights.
    clipnorm: float | None = 5.0  # Clip gradients by global norm (char-rnn's value); None: no clipping.
    epochs: int = 100  # An upper bound: --max-minutes and early stopping usually end the run first.
    max_minutes: float | None = None  # Wall-clock budget for the whole run (training + validation).
    patience: int = 5  # Early stopping: epochs without a better validation loss before stopping.
    val_fraction: float = 0.1  # The contiguous tail of the corpus held out for validation.
    seed: int = 0  # Seeds weights, window offsets, shuffling and dropout.
    lowercase: bool = True  # The notebook lowercases: 45 characters instead of 72 for the bundled corpus.
    mixed_precision: bool = False  # float16 compute on GPU (logits stay float32); off on CPU.
    val_chars: int | None = 1_000_000  # Validate on a fixed sample of this many held-out target chars (None: all).
    eval_every_steps: int | None = None  # Also validate, report and checkpoint every N training steps.
    eval_every_minutes: float | None = None  # ... and every M minutes (agreed by all workers).

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be 0 or more, got {self.warmup_steps}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for name in ("min_lr_fraction", "ema_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be 0 or more, got {self.weight_decay}")
        if self.clipnorm is not None and not self.clipnorm > 0:
            raise ConfigError(f"clipnorm must be positive, got {self.clipnorm}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be positive, got {self.max_minutes}")
        if self.patience < 1:
            raise ConfigError(f"patience must be at least 1, got {self.patience}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        for name in ("val_chars", "eval_every_steps", "eval_every_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "default": Preset(
        ModelConfig(dropout=0.35, input_dropout=0.15, time_locked=True),  # embedding dropout lost its ablation
        TrainConfig(
            batch_size=64,  # on a book, steps beat characters: batch 128 is 1.3x the chars/s, and worse
            learning_rate=4e-3, schedule="wsd", decay_fraction=0.3, min_lr_fraction=0.0,
            weight_decay=0.1, ema_momentum=0.98,
        ),
        "Embedding 64 -> 2x256 LSTM -> logits, a loss at every position of 100-char windows; AdamW at 4e-3 "
        "held then decayed to the end of the budget, averaged weights, time-locked dropout.",
    ),
    "gpu-3x512": Preset(
        ModelConfig(
            embedding_dim=128,  # 128: cheap next to 3x512 units, and room for corpora with hundreds of characters
            lstm_units=(512, 512, 512),  # ~5.5M parameters: for corpora of tens of MB and up, not one book
            dropout=0.25, input_dropout=0.1, embedding_dropout=0.1, time_locked=True,  # the default's levers
            seq_len=200,  # cuDNN runs a window as one kernel: longer windows are nearly free and carry more context
        ),
        TrainConfig(
            batch_size=512,  # global: 64 windows per GPU on 8 GPUs, or 128 on 4 (it must divide by the replicas)
            learning_rate=4e-3,  # the default's peak: Adam at this batch tolerates it after a warm-up
            schedule="wsd", warmup_steps=500, min_lr_fraction=0.0,  # a warm-up for the larger batch and model
            weight_decay=0.1, ema_momentum=0.999,  # a run takes tens of thousands of steps: a longer average
            eval_every_minutes=10.0,  # an epoch of a large corpus is long: evaluate and checkpoint within it
            mixed_precision=True,  # float16 compute with float32 logits; the LSTM stays cuDNN-eligible
        ),
        "For GPU clusters: 3x512 LSTM, 200-char windows, global batch 512, mixed precision, the default's recipe.",
    ),
    "small": Preset(
        ModelConfig(embedding_dim=16, lstm_units=(32,), dropout=0.0, seq_len=32),
        TrainConfig(batch_size=32, learning_rate=1e-2, patience=3),
        "Tiny model for tests and smoke runs (seconds per epoch).",
    ),
    "notebook-1x256": Preset(
        ModelConfig(kind=NOTEBOOK, lstm_units=(256,), dropout=0.2, seq_len=100),
        TrainConfig(batch_size=128, learning_rate=1e-3, clipnorm=None),
        "The notebook's first model: scaled-integer input, LSTM 256, one softmax target per window.",
    ),
    "notebook-2x256": Preset(
        ModelConfig(kind=NOTEBOOK, lstm_units=(256, 256), dropout=0.2, seq_len=100),
        TrainConfig(batch_size=64, learning_rate=1e-3, clipnorm=None),
        "The notebook's bigger model: 2x LSTM 256 with dropout, one softmax target per window.",
    ),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that ignores None values (unset CLI flags keep the preset's value)."""
    return dataclasses.replace(cfg, **{k: v for k, v in changes.items() if v is not None})


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


LEGACY_KINDS = {"seed": NOTEBOOK}  # the notebook kind's name in checkpoints written before the rename


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    if isinstance(d, dict) and d.get("kind") in LEGACY_KINDS:
        d = {**d, "kind": LEGACY_KINDS[d["kind"]]}
    return _from_dict(ModelConfig, d)


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    return _from_dict(TrainConfig, d)


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    wrong = [f"{k} must be {_TYPE_WORDS[types[k]]}, got {json.dumps(v)}" for k, v in d.items()
             if not _has_type(v, types[k])]
    if wrong:
        raise ConfigError(f"bad {cls.__name__}: {'; '.join(wrong)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(f"bad {cls.__name__}: {e}") from None


# JSON types of the config fields (by annotation): an int is never a bool, a float or a string.
_TYPE_WORDS = {"int": "an integer", "int | None": "an integer or null", "float": "a number", "float | None": "a number or null", "str": "a string",
               "bool": "true or false", "tuple[int, ...]": "a list of positive integers"}


def _has_type(v: Any, annotation: str) -> bool:
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if annotation in ("int", "int | None"):
        return (v is None and annotation != "int") or is_int(v)
    if annotation in ("float", "float | None"):
        return (v is None and annotation != "float") or is_int(v) or isinstance(v, float)
    if annotation == "tuple[int, ...]":
        return isinstance(v, (list, tuple)) and all(is_int(u) and u > 0 for u in v)
    return isinstance(v, {"str": str, "bool": bool}[annotation])


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# The training flags of ``textgen train`` and ``python -m jobs.train`` (one per config field)


def _units(text: str) -> tuple[int, ...]:
    try:
        units = tuple(int(u) for u in text.replace("x", ",").split(",") if u.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 256,256, got {text!r}") from None
    if not units:
        raise argparse.ArgumentTypeError("give at least one LSTM size")
    return units


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", nargs="+", metavar="PATH",
                   help="UTF-8 text file(s) or directories of *.txt (default: the bundled Alice in Wonderland), "
                        "prepared into $TEXTGEN_CACHE (~/.cache/textgen)/data/<fingerprint> first")
    p.add_argument("--data", metavar="DIR_OR_URI",
                   help="a dataset made by `textgen prepare`: a directory, or s3:// gs:// file:// URI")
    p.add_argument("--max-vocab", type=int, help="with --corpus: keep this many characters (see textgen prepare)")
    p.add_argument("--min-count", type=int, default=1, help="with --corpus: drop characters seen fewer times")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="model and training preset (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="maximum number of epochs")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget for the run, in minutes")
    p.add_argument("--batch-size", type=int, help="global batch size in windows")
    p.add_argument("--learning-rate", type=float, help="Adam's learning rate (the peak of the schedule)")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule: cosine decays from the start, wsd holds the peak then decays "
                        "over --decay-fraction; both end with --max-minutes (or --epochs)")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up over this many steps")
    p.add_argument("--min-lr-fraction", type=float, help="cosine, wsd: the final rate as a fraction of the peak")
    p.add_argument("--decay-fraction", type=float, help="wsd: decay linearly over this last fraction of the budget")
    p.add_argument("--weight-decay", type=float, help="decoupled weight decay (AdamW) of kernels and embeddings")
    p.add_argument("--ema-momentum", type=float,
                   help="validate and checkpoint a moving average of the weights with this momentum (0: off)")
    p.add_argument("--clipnorm", type=float, help="clip gradients to this global norm")
    p.add_argument("--patience", type=int, help="early stopping: evaluations (each epoch, and each --eval-every-*) without improvement")
    p.add_argument("--val-fraction", type=float, help="held-out tail of the corpus (0-0.5)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--no-lowercase", dest="lowercase", action="store_false", default=None,
                   help="keep the corpus' case (the notebook lowercases)")
    p.add_argument("--val-chars", type=int,
                   help="validate on a fixed sample of this many held-out characters (default 1,000,000; "
                        "the whole split when smaller)")
    p.add_argument("--eval-every-steps", type=int,
                   help="also validate, report and checkpoint every N steps (--patience then counts evaluations)")
    p.add_argument("--eval-every-minutes", type=float, help="also validate, report and checkpoint every M minutes")
    p.add_argument("--seq-len", type=int, help="characters per training window")
    p.add_argument("--embedding-dim", type=int, help="embedding size")
    p.add_argument("--lstm-units", type=_units, help="LSTM sizes, one per layer, e.g. 256,256")
    p.add_argument("--dropout", type=float, help="dropout on each LSTM layer's output")
    p.add_argument("--input-dropout", type=float, help="dropout on the first LSTM's input")
    p.add_argument("--embedding-dropout", type=float, help="drop whole characters of a window with this probability")
    p.add_argument("--time-locked", action=argparse.BooleanOptionalAction, default=None,
                   help="one dropout mask per window for all its time steps (variational dropout)")
    p.add_argument("--mixed-precision", action="store_true", default=None,
                   help="float16 compute with float32 logits (GPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune: a new run from this checkpoint's weights (a checkpoint, a training --out "
                        "directory: its best/, or a Ray run directory) with its architecture and case, its "
                        "vocabulary extended by the corpus' characters; fresh optimizer and run state")
    p.add_argument("--sample-chars", type=int, metavar="N",
                   help=f"after every evaluation, log a sample of N characters (default {SampleOptions.chars}; "
                        f"at most {MAX_SAMPLE_CHARS}; 0: none) and append it to samples.jsonl")
    p.add_argument("--sample-temperatures", type=_temperatures, metavar="T,T",
                   help="one sample at each temperature (default 0.5,1.0; 0: greedy)")


def configs_from_args(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """The preset's configs with the flags that were given."""
    pre = preset(args.preset)
    model = replace(
        pre.model, seq_len=args.seq_len, embedding_dim=args.embedding_dim,
        lstm_units=args.lstm_units, dropout=args.dropout, input_dropout=args.input_dropout,
        embedding_dropout=args.embedding_dropout, time_locked=args.time_locked,
    )
    train = replace(
        pre.train, epochs=args.epochs, max_minutes=args.max_minutes, batch_size=args.batch_size,
        learning_rate=args.learning_rate, clipnorm=args.clipnorm, patience=args.patience,
        val_fraction=args.val_fraction, seed=args.seed, lowercase=args.lowercase,
        mixed_precision=args.mixed_precision, val_chars=args.val_chars, eval_every_steps=args.eval_every_steps,
        eval_every_minutes=args.eval_every_minutes, schedule=args.schedule, warmup_steps=args.warmup_steps,
        min_lr_fraction=args.min_lr_fraction, decay_fraction=args.decay_fraction, weight_decay=args.weight_decay,
        ema_momentum=args.ema_momentum,
    )
    return model, train


# ---------------------------------------------------------------------------------------------
# Samples while training (observability: not part of the run's configs, nor of its checkpoints)

MAX_SAMPLE_CHARS = 1000  # a sample is a glance at the model, not a generation run


@dataclass(frozen=True)
class SampleOptions:
    chars: int = 150  # characters of every sample after every evaluation; 0: no samples
    temperatures: tuple[float, ...] = (0.5, 1.0)  # one sample (one batch row) each; 0: greedy

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        if not 0 <= self.chars <= MAX_SAMPLE_CHARS:
            raise ConfigError(f"--sample-chars must be 0 to {MAX_SAMPLE_CHARS}, got {self.chars}")
        if not self.temperatures or not all(0.0 <= t < float("inf") for t in self.temperatures):
            raise ConfigError(f"--sample-temperatures must be one or more numbers >= 0, got {self.temperatures}")

    @property
    def enabled(self) -> bool:
        return self.chars > 0


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected temperatures like 0.5,1.0, got {text!r}") from None


def sample_options_from_args(args: argparse.Namespace) -> SampleOptions:
    """The samples' options with the flags that were given (a ConfigError for values out of range)."""
    return replace(SampleOptions(), chars=args.sample_chars, temperatures=args.sample_temperatures)


def quiet_tensorflow() -> None:
    """TensorFlow's C++ INFO/WARNING lines bury the progress output; keep errors."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

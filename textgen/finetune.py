"""Fine-tuning (``--init-from CHECKPOINT``): a new run that starts from a trained model's weights.

What carries over is the weights, nothing else: the optimizer, the learning-rate schedule and the
run state (epoch 0, no best, early stopping) start fresh, and the run writes its own output
directory. (``--resume`` is the other thing: the same run, continued with its optimizer.) CHECKPOINT
is a checkpoint directory, a ``textgen train --out`` directory (its ``best/``) or a Ray Train run
directory (its best checkpoint), as ``textgen export`` takes them; a local path (a URI is refused).

- Architecture: the checkpoint's (``ARCHITECTURE``: what the weights' shapes follow). A preset of
  another shape gives its training settings and its dropout and window length, not its shape; an
  explicit ``--embedding-dim`` or ``--lstm-units`` that contradicts the checkpoint is refused, as is
  the ``notebook`` kind (its scaled-integer input has no rows to carry over).
- Case: the checkpoint's; ``--no-lowercase`` against a lowercased checkpoint (or a prepared dataset
  of the other case) is refused.
- Vocabulary: the union of the checkpoint's characters and the new corpus' (sorted, as every
  vocabulary): the corpus is prepared with the checkpoint's vocabulary as its base
  (``PrepareOptions.base_vocab``), so its ids are the union's; characters of the checkpoint that
  the corpus lacks keep their place (the model can still write them). The embedding rows and the
  output layer's kernel columns and bias of every known character are copied by character; a new
  character's are the freshly built model's (Keras' initializers); the log names the new ones. A
  prepared ``--data`` must hold every character of the checkpoint (``textgen prepare --vocab-from``).

The new run's ``state.json`` records where it started: ``"init_from": {"checkpoint": path, "vocab":
[...]}``; resuming it prepares the corpus with that same base vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import numpy as np

from textgen.checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_model, resolve_checkpoint
from textgen.config import NOTEBOOK, ModelConfig, TrainConfig
from textgen.contract import LOGITS
from textgen.errors import TextgenError
from textgen.text import Vocab

ARCHITECTURE = ("kind", "embedding_dim", "lstm_units")  # the ModelConfig fields the weights' shapes follow
VOCAB_AXES = {"embedding": (0,), LOGITS: (1, 0)}  # layer -> the vocabulary axis of each of its weights


class FineTuneError(TextgenError):
    pass


def load_init(location: str, flag: str = "--init-from") -> Checkpoint:
    """The checkpoint ``--init-from`` names (resolved like ``textgen export``'s), checked."""
    if "://" in str(location):
        raise FineTuneError(f"{flag} {location}: a URI is not supported; copy the checkpoint to a local "
                            "directory (on a cluster: one every node mounts) and pass its path")
    try:
        ckpt = load_checkpoint(resolve_checkpoint(location))
    except CheckpointError as e:
        raise FineTuneError(f"{flag}: {e}") from None
    if ckpt.model.kind == NOTEBOOK:
        raise FineTuneError(f"{flag} {location}: the notebook kind (kept for comparisons) cannot be "
                            "fine-tuned; start from a char model (e.g. one trained with --preset default)")
    return ckpt


def _units(units: tuple[int, ...]) -> str:
    return ",".join(map(str, units))


def settle_configs(ckpt: Checkpoint, model_cfg: ModelConfig, train_cfg: TrainConfig, *,
                   embedding_dim: int | None = None, lstm_units: tuple[int, ...] | None = None,
                   lowercase: bool | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The new run's configs: the checkpoint's architecture and case, the rest as given; the
    explicit flags (None: not given) and the preset's kind must not contradict the checkpoint."""
    have, wrong = ckpt.model, []
    if embedding_dim is not None and embedding_dim != have.embedding_dim:
        wrong.append(f"--embedding-dim {embedding_dim} (the checkpoint's is {have.embedding_dim})")
    if lstm_units is not None and tuple(lstm_units) != have.lstm_units:
        wrong.append(f"--lstm-units {_units(tuple(lstm_units))} (the checkpoint's are {_units(have.lstm_units)})")
    if model_cfg.kind != have.kind:
        wrong.append(f"a preset of the {model_cfg.kind} kind (the checkpoint is a {have.kind} model)")
    if lowercase is not None and lowercase != ckpt.train.lowercase:
        wrong.append("--no-lowercase (the checkpoint was trained on lowercased text)" if not lowercase
                     else "lowercasing (the checkpoint was trained on text of both cases)")
    if wrong:
        raise FineTuneError(f"--init-from {ckpt.path}: contradicted by {'; '.join(wrong)}; a fine-tuned model "
                            "keeps the checkpoint's architecture and case: drop the flag, or train from scratch")
    model_cfg = dataclasses.replace(model_cfg, **{name: getattr(have, name) for name in ARCHITECTURE})
    return model_cfg, dataclasses.replace(train_cfg, lowercase=ckpt.train.lowercase)


def from_args(args: argparse.Namespace, model_cfg: ModelConfig,
              train_cfg: TrainConfig) -> tuple[ModelConfig, TrainConfig, Checkpoint | None]:
    """``settle_configs`` for the training flags (``config.add_train_args``); no ``--init-from``:
    the configs unchanged and None."""
    if getattr(args, "init_from", None) is None:
        return model_cfg, train_cfg, None
    ckpt = load_init(args.init_from)
    model_cfg, train_cfg = settle_configs(ckpt, model_cfg, train_cfg, embedding_dim=args.embedding_dim,
                                          lstm_units=args.lstm_units, lowercase=args.lowercase)
    return model_cfg, train_cfg, ckpt


def check_model(ckpt: Checkpoint, model_cfg: ModelConfig) -> None:
    """The model to build has the checkpoint's architecture (``settle_configs`` makes it so)."""
    differ = [n for n in ARCHITECTURE if getattr(model_cfg, n) != getattr(ckpt.model, n)]
    if differ:
        raise FineTuneError(f"--init-from {ckpt.path}: the model's {', '.join(differ)} differ from the "
                            "checkpoint's; build it with the checkpoint's architecture (finetune.settle_configs)")


def check_data(ckpt: Checkpoint, vocab: Vocab, lowercase: bool, source: str) -> None:
    """The dataset a fine-tuning run reads has the checkpoint's case and every one of its characters."""
    if lowercase != ckpt.train.lowercase:
        raise FineTuneError(
            f"the dataset {source} is {'lowercased' if lowercase else 'not lowercased'}, the checkpoint "
            f"{ckpt.path} was {'' if ckpt.train.lowercase else 'not '}lowercased; prepare the dataset "
            f"{'without' if ckpt.train.lowercase else 'with'} --no-lowercase"
        )
    missing = [c for c in ckpt.vocab.chars if c not in vocab]
    if missing:
        raise FineTuneError(
            f"the dataset {source} lacks {len(missing)} of the checkpoint's characters ({_shown(missing)}); "
            f"prepare it with `textgen prepare ... --vocab-from {ckpt.path}`, or pass --corpus"
        )


def _shown(chars: list[str], limit: int = 30) -> str:
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return ", ".join(repr(c) for c in chars[:limit]) + more


def new_characters(old: Vocab, new: Vocab) -> list[str]:
    return [c for c in new.chars if c not in old]


def describe(ckpt: Checkpoint, vocab: Vocab) -> str:
    """The log line of a fine-tuning run's start."""
    new = new_characters(ckpt.vocab, vocab)
    chars = f"{len(new)} new characters: {_shown(new)}" if new else "no new characters"
    return (f"fine-tuning from {ckpt.path} (epoch {ckpt.epoch}, {ckpt.model.embedding_dim}-dim embedding, LSTM "
            f"{_units(ckpt.model.lstm_units)}): fresh optimizer and run state; vocabulary {ckpt.vocab.size} -> "
            f"{vocab.size}, {chars}")


def source_weights(ckpt: Checkpoint) -> dict[str, list[np.ndarray]]:
    """The checkpoint model's weights by layer name, loaded with the checkpoint's checks. Build it
    before seeding and outside a strategy's scope: the new model's initial weights stay a fresh run's."""
    model = load_model(ckpt)
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def remap(src: np.ndarray, fresh: np.ndarray, axis: int, old: Vocab, new: Vocab) -> np.ndarray:
    """``fresh`` with the slice of every character of ``old`` along ``axis`` copied from ``src``
    (whose axis follows ``old``) to that character's place in ``new``."""
    out = np.array(fresh, copy=True)
    where: list[Any] = [slice(None)] * out.ndim
    where[axis] = [new.index[c] for c in old.chars]  # type: ignore[attr-defined]
    out[tuple(where)] = src
    return out


def init_weights(model, source: dict[str, list[np.ndarray]], old: Vocab, new: Vocab) -> None:
    """Load ``source`` (``old``'s vocabulary) into a freshly built ``model`` (``new``'s, a superset):
    the vocabulary rows by character (``VOCAB_AXES``), every other weight as it is."""
    for layer in model.layers:
        if not layer.weights:
            continue
        src, axes = source[layer.name], VOCAB_AXES.get(layer.name)
        if axes is None:
            layer.set_weights(src)
        else:
            layer.set_weights([remap(s, f, a, old, new) for s, f, a in zip(src, layer.get_weights(), axes)])


def origin(ckpt: Checkpoint) -> dict[str, Any]:
    """What the new run's state records: where it started, and the vocabulary it extended."""
    return {"checkpoint": str(ckpt.path.resolve()), "vocab": list(ckpt.vocab.chars)}


def base_vocab(init_from: Checkpoint | None, resumed: Checkpoint | None = None) -> tuple[str, ...]:
    """The base vocabulary to prepare the corpus with: the checkpoint's when fine-tuning from it, the
    one a resumed fine-tuning run started with (its state's ``init_from``), else none."""
    if init_from is not None:
        return init_from.vocab.chars
    started = resumed.state.get("init_from") if resumed is not None else None
    return tuple(started.get("vocab", ())) if isinstance(started, dict) else ()

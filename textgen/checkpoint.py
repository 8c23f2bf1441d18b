"""One checkpoint layout, written atomically, loaded with checks.

    <checkpoint>/
      model.weights.h5      Keras weights (HDF5: read as arrays, without executing code)
      optimizer.weights.h5  Adam state, one dataset per optimizer variable (for resume)
      config.json           {"format_version", "model": ModelConfig, "train": TrainConfig}
      vocab.json            {"format_version", "chars": [...]}
      metrics.json          metrics of the epoch that wrote it
      state.json            what resume needs: epoch, best_val_loss, best_epoch, seed, ..., and the
                            history (every epoch's metrics so far)
      manifest.json         sha256 and size of every file above; written last

A checkpoint is written to a temporary sibling directory, its files and the directory are fsynced,
and it takes the place of the old one in one atomic step: the first one by a rename, a later one
by exchanging the two directories (Linux ``renameat2(RENAME_EXCHANGE)``, one system call), after
which the old one is deleted. A kill at any moment leaves the old checkpoint or the new one at
``<name>``, never none and never half of one. Where the exchange is not available (another OS or
file system) the old one is renamed away first; ``tidy`` (run before every save and when a run
resumes) then puts the newest complete copy back after a crash between the two renames, and
deletes the temporary siblings (``.<name>.tmp-*``, ``.<name>.old-*``) that killed saves left.
(Checkpoints written before the history moved to state.json carry it in metrics.json too;
``load_checkpoint`` drops that copy.) The manifest is required: it catches files damaged after
writing (truncated copies, bit rot) with a message that names the file. Every JSON file is checked
field by field (types and ranges), and the weights file's variables and shapes must be exactly the
model's (Keras alone would skip or partly load variables that do not fit).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from textgen import config as cfglib
from textgen.config import ModelConfig, TrainConfig
from textgen.errors import TextgenError
from textgen.files import fsync_dir, sha256_file, temp_sibling
from textgen.text import Vocab, VocabError

CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS = "model.weights.h5"
OPTIMIZER = "optimizer.weights.h5"
CONFIG = "config.json"
VOCAB = "vocab.json"
METRICS = "metrics.json"
STATE = "state.json"
MANIFEST = "manifest.json"
REQUIRED = (WEIGHTS, CONFIG, VOCAB, METRICS, STATE)


class CheckpointError(TextgenError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's metadata, read without TensorFlow. Weights load with ``load_model``."""

    path: Path
    model: ModelConfig
    train: TrainConfig
    vocab: Vocab
    metrics: dict[str, Any]
    state: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    @property
    def has_optimizer(self) -> bool:
        return (self.path / OPTIMIZER).is_file()


# ---------------------------------------------------------------------------------------------
# File-system helpers


def _fsync_files(directory: Path) -> None:
    """Flush every file of ``directory`` and the directory itself to disk."""
    for p in directory.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(directory)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic system call (Linux ``renameat2`` with RENAME_EXCHANGE);
    False where the system or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place, replacing an older one at ``final`` atomically
    (see the module docstring)."""
    if final.is_dir() and not final.is_symlink() and _exchange(tmp, final):
        fsync_dir(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # it holds the old checkpoint now
        return
    old = temp_sibling(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _leftovers(final: Path) -> list[Path]:
    """Temporary siblings of ``final`` that killed saves left (``.<name>.tmp-*``, ``.<name>.old-*``)."""
    return sorted(p for kind in ("tmp", "old") for p in final.parent.glob(f".{final.name}.{kind}-*"))


def tidy(final: str | Path) -> None:
    """Run by the writer of ``final`` (before a save, when a run resumes): if ``final`` is missing
    after a crash between the two renames of the fallback, put back the newest complete copy;
    delete every other temporary sibling."""
    final = Path(final)
    found = _leftovers(final)
    if not final.exists() and not final.is_symlink():
        complete = []
        for p in found:
            try:
                complete.append((load_checkpoint(p).epoch, p.name.startswith(f".{final.name}.tmp-"), p))
            except CheckpointError:
                continue  # a save killed while writing it
        if complete:
            os.replace(max(complete)[2], final)
            fsync_dir(final.parent)
    for p in found:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


_sha256 = sha256_file


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(cfglib.dumps(obj) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Save


def save_checkpoint(
    path: str | Path,
    model,
    optimizer,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    vocab: Vocab,
    metrics: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write a complete checkpoint directory at ``path`` atomically (replacing one that is there)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tidy(final)
    tmp = temp_sibling(final)
    tmp.mkdir()
    try:
        model.save_weights(str(tmp / WEIGHTS))
        if optimizer is not None:
            save_optimizer(tmp / OPTIMIZER, optimizer)
        _write_json(
            tmp / CONFIG,
            {
                "format_version": CHECKPOINT_FORMAT_VERSION,
                "model": cfglib.to_dict(model_cfg),
                "train": cfglib.to_dict(train_cfg),
            },
        )
        _write_json(tmp / VOCAB, vocab.to_dict())
        _write_json(tmp / METRICS, metrics)
        _write_json(tmp / STATE, {"format_version": CHECKPOINT_FORMAT_VERSION, **state})
        files = sorted(p.name for p in tmp.iterdir())
        _write_json(
            tmp / MANIFEST,
            {n: {"sha256": _sha256(tmp / n), "bytes": (tmp / n).stat().st_size} for n in files},
        )
        _fsync_files(tmp)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_optimizer(path: Path, optimizer) -> None:
    """Adam's state as Keras stores it (``save_own_variables``): one dataset per key "0", "1", ..."""
    import h5py

    store: dict[str, Any] = {}
    optimizer.save_own_variables(store)
    path_of = {str(i): v.path for i, v in enumerate(optimizer.variables)}  # Keras' keys are indices
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = CHECKPOINT_FORMAT_VERSION
        for key, value in store.items():
            ds = f.create_dataset(key, data=value)
            if key in path_of:
                ds.attrs["path"] = path_of[key]  # which variable it holds, for a human reader


# ---------------------------------------------------------------------------------------------
# Load


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint's metadata and file integrity (no TensorFlow needed)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    missing = [n for n in (*REQUIRED, MANIFEST) if not (path / n).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: missing {', '.join(missing)}; "
            "it was not written by textgen or was damaged; use another checkpoint"
        )
    _check_manifest(path)
    conf = _read_json(path / CONFIG)
    if not isinstance(conf, dict) or conf.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path / CONFIG}: unsupported checkpoint format_version "
            f"{conf.get('format_version') if isinstance(conf, dict) else None!r} (expected {CHECKPOINT_FORMAT_VERSION})"
        )
    try:
        model_cfg = cfglib.model_config_from_dict(conf.get("model"))
        train_cfg = cfglib.train_config_from_dict(conf.get("train"))
    except cfglib.ConfigError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}; the checkpoint is damaged") from None
    try:
        vocab = Vocab.from_dict(_read_json(path / VOCAB))
    except VocabError as e:
        raise CheckpointError(f"{path / VOCAB}: {e}; the checkpoint is damaged") from None
    state = _read_json(path / STATE)
    _check_state(state, path / STATE)
    metrics = _read_json(path / METRICS)
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{path / METRICS} must hold a JSON object, not {type(metrics).__name__}; "
                              "the checkpoint is damaged")
    metrics.pop("history", None)  # older checkpoints repeat state.json's history here
    return Checkpoint(path, model_cfg, train_cfg, vocab, metrics, state)


def _check_manifest(path: Path) -> None:
    """Every required file is listed in manifest.json, with the size and sha256 it has."""
    manifest = _read_json(path / MANIFEST)
    where = f"{path / MANIFEST}"
    if not isinstance(manifest, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and _is_int(e.get("bytes"))
        for e in manifest.values()
    ):
        raise CheckpointError(f"{where} must map file names to {{\"sha256\": str, \"bytes\": int}}; "
                              "the checkpoint is damaged")
    unlisted = [n for n in REQUIRED if n not in manifest]
    if unlisted:
        raise CheckpointError(f"{where} does not list {', '.join(unlisted)}; the checkpoint is damaged")
    for name, entry in manifest.items():
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is listed in the manifest but missing")
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} is corrupt (its size or sha256 differs from the "
                "manifest written with it); use another checkpoint"
            )


def _is_int(v: Any, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _check_state(state: Any, where: Path) -> None:
    """What resume reads from state.json: an epoch >= 0 and well-typed run state."""
    if not isinstance(state, dict) or not _is_int(state.get("epoch")):
        got = state.get("epoch") if isinstance(state, dict) else state
        raise CheckpointError(f"{where}: epoch must be an integer >= 0, got {got!r}; the checkpoint is damaged")
    best = state.get("best_val_loss")
    problems = [f"{k} must be an integer >= 0" for k in ("best_epoch", "bad_epochs", "step")
                if k in state and not _is_int(state[k])]
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float)) or math.isnan(best)):
        problems.append("best_val_loss must be a number or null")
    if not isinstance(state.get("history", []), list) or not all(isinstance(m, dict) for m in state.get("history", [])):
        problems.append("history must be a list of objects")
    if problems:
        raise CheckpointError(f"{where}: {'; '.join(problems)}; the checkpoint is damaged")


def load_model(ckpt: Checkpoint, mixed_precision: bool = False):
    """Build the training model from the checkpoint's config and load its weights, checking that
    config, vocabulary and weights agree."""
    from textgen.model import build_model

    model = build_model(ckpt.model, ckpt.vocab.size, mixed_precision=mixed_precision)
    load_weights_into(model, ckpt)
    return model


def load_weights_into(model, ckpt: Checkpoint) -> None:
    """Load the weights file into ``model``: its variables and shapes must be exactly the model's
    (read first with h5py, refusing links and external data; Keras would skip what does not fit)."""
    path = ckpt.path / WEIGHTS
    mismatch = (f"checkpoint {ckpt.path}: {WEIGHTS} does not match its config.json and vocab.json "
                f"({ckpt.model.lstm_units} LSTM units, vocabulary {ckpt.vocab.size})")
    try:
        shapes = sorted(_read_h5(path, nested=True, read=lambda ds: tuple(ds.shape)).values())
        model.load_weights(str(path))
    except CheckpointError:
        raise
    except Exception as e:  # Keras raises ValueError/OSError/KeyError on shape or file problems
        raise CheckpointError(
            f"{mismatch} or is unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    expected = sorted(tuple(int(d) for d in v.shape) for v in model.weights)
    if shapes != expected:
        raise CheckpointError(f"{mismatch}: it holds {len(shapes)} variables of shapes {shapes}, the model "
                              f"{len(expected)} of shapes {expected}; use the checkpoint's own files")


def restore_optimizer(ckpt: Checkpoint, optimizer, trainable_variables) -> None:
    """Load Adam's state saved by ``save_optimizer`` into a freshly built optimizer."""
    if not optimizer.built:
        optimizer.build(trainable_variables)
    store = _read_optimizer_store(ckpt.path / OPTIMIZER)
    expected = len(optimizer.variables)
    mismatch = CheckpointError(
        f"checkpoint {ckpt.path}: optimizer state has {len(store)} variables that do not match "
        f"this model's {expected}; resume with the same preset and settings"
    )
    if sorted(store) != sorted(str(i) for i in range(expected)):  # Keras would only warn
        raise mismatch
    try:
        optimizer.load_own_variables(store)
    except ValueError:  # a shape differs
        raise mismatch from None


def _read_optimizer_store(path: Path) -> dict[str, Any]:
    """The datasets of an optimizer file as arrays (see ``_read_h5``)."""
    return _read_h5(path, nested=False, read=lambda ds: ds[()])


def _read_h5(path: Path, nested: bool, read: Callable[[Any], Any]) -> dict[str, Any]:
    """``read(dataset)`` of every dataset of an HDF5 file, by name (in groups too if ``nested``).
    Only plain datasets stored in the file itself are read: an external link, a soft link, external
    storage or a virtual dataset could make h5py open another file, so a crafted checkpoint with
    one is refused."""
    import h5py

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: {why}; the checkpoint is damaged or was not written by textgen")

    def walk(group, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
        for key in group.keys():
            name = prefix + key
            if not isinstance(group.get(key, getlink=True), h5py.HardLink):
                raise refuse(f"entry {name!r} is a link, not a dataset")
            obj = group[key]
            if nested and isinstance(obj, h5py.Group):
                walk(obj, name + "/", out)
                continue
            if not isinstance(obj, h5py.Dataset):
                raise refuse(f"entry {name!r} is not a dataset")
            if obj.external or obj.is_virtual:
                raise refuse(f"dataset {name!r} keeps its data outside the file")
            out[name] = read(obj)
        return out

    try:
        with h5py.File(path, "r") as f:
            return walk(f, "", {})
    except (OSError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is unreadable ({e})") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a ``textgen train --out`` directory (its ``best/``), or a Ray Train
    run directory (its best checkpoint by val_loss) -> the checkpoint directory."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    if (path / "best" / CONFIG).is_file():
        return path / "best"
    if path.is_dir() and any(p.name.startswith("checkpoint_") for p in path.iterdir()):
        from textgen.runs import best_ray_checkpoint

        return best_ray_checkpoint(path)
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a checkpoint directory (with {CONFIG}), a training "
        "output directory (with best/), or a Ray Train run directory (with checkpoint_* folders)"
    )

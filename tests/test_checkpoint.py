import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from textgen import checkpoint as ckptlib
from textgen.checkpoint import CheckpointError, load_checkpoint, load_model


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_round_trip(small_run):
    ckpt = load_checkpoint(small_run / "best")
    assert ckpt.model.lstm_units == (32,) and ckpt.vocab.size == 45
    assert ckpt.state["best_epoch"] == ckpt.epoch == ckpt.metrics["epoch"]
    assert ckpt.has_optimizer
    model = load_model(ckpt)
    again = load_model(load_checkpoint(small_run / "best"))
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_optimizer_state_round_trip(small_run):
    import keras

    from textgen.train import make_optimizer

    ckpt = load_checkpoint(small_run / "last")
    model = load_model(ckpt)
    opt = make_optimizer(ckpt.train, 1)
    ckptlib.restore_optimizer(ckpt, opt, model.trainable_variables)
    assert int(opt.iterations.numpy()) == sum(m["steps"] for m in ckpt.state["history"])
    assert any(np.abs(v.numpy()).sum() > 0 for v in opt.variables[2:])  # Adam moments restored
    with pytest.raises(CheckpointError, match="optimizer state"):
        other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        ckptlib.restore_optimizer(ckpt, make_optimizer(ckpt.train, 1), other.trainable_variables)


def test_resolve_accepts_run_dir_and_checkpoint_dir(small_run):
    assert ckptlib.resolve_checkpoint(small_run) == small_run / "best"
    assert ckptlib.resolve_checkpoint(small_run / "last") == small_run / "last"
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ckptlib.resolve_checkpoint(small_run.parent)


def test_missing_directory_and_missing_files(small_run, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    ckpt = _copy(small_run / "best", tmp_path)
    (ckpt / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: missing vocab.json"):
        load_checkpoint(ckpt)


def test_truncated_weights_are_caught_by_the_manifest(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    data = (ckpt / "model.weights.h5").read_bytes()
    (ckpt / "model.weights.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.weights.h5 is corrupt"):
        load_checkpoint(ckpt)


def test_corrupt_weights_without_manifest_fail_clearly(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    (ckpt / "manifest.json").unlink()
    (ckpt / "model.weights.h5").write_bytes(b"not an h5 file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(load_checkpoint(ckpt))


def test_config_that_disagrees_with_the_weights(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    (ckpt / "manifest.json").unlink()
    conf = json.loads((ckpt / "config.json").read_text())
    conf["model"]["lstm_units"] = [48]
    (ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        load_model(load_checkpoint(ckpt))


def test_vocabulary_that_disagrees_with_the_weights(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    (ckpt / "manifest.json").unlink()
    (ckpt / "vocab.json").write_text(json.dumps({"format_version": 1, "chars": list("abcdef")}))
    with pytest.raises(CheckpointError, match="vocabulary 6"):
        load_model(load_checkpoint(ckpt))


def test_bad_json_and_bad_config(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    (ckpt / "manifest.json").unlink()
    (ckpt / "metrics.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="metrics.json is not valid JSON"):
        load_checkpoint(ckpt)
    (ckpt / "metrics.json").write_text("{}")
    conf = json.loads((ckpt / "config.json").read_text())
    conf["model"]["colour"] = "blue"
    (ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="unknown ModelConfig fields: colour"):
        load_checkpoint(ckpt)


def test_writes_are_atomic_and_replace_the_old_checkpoint(small_run, tmp_path):
    from textgen.train import make_optimizer

    ckpt = load_checkpoint(small_run / "best")
    model = load_model(ckpt)
    target = tmp_path / "out" / "best"
    for epoch in (1, 2):
        ckptlib.save_checkpoint(target, model, make_optimizer(ckpt.train, 1), ckpt.model, ckpt.train,
                                ckpt.vocab, {"epoch": epoch}, {"epoch": epoch})
        assert load_checkpoint(target).epoch == epoch
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["best"]  # no temp leftovers

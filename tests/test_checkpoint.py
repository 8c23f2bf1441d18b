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


def test_history_is_stored_once_and_older_checkpoints_with_two_copies_load(small_run, tmp_path):
    ckpt_dir = small_run / "last"
    metrics = json.loads((ckpt_dir / "metrics.json").read_text())
    state = json.loads((ckpt_dir / "state.json").read_text())
    assert "history" not in metrics and [m["epoch"] for m in state["history"]] == [1, 2]
    # Checkpoints written before the history moved to state.json have it in metrics.json too.
    old = _copy(ckpt_dir, tmp_path)
    (old / "manifest.json").unlink()
    (old / "metrics.json").write_text(json.dumps({**metrics, "history": state["history"]}))
    ckpt = load_checkpoint(old)
    assert "history" not in ckpt.metrics and ckpt.metrics["epoch"] == 2
    from textgen.train import RunState

    assert [m["epoch"] for m in RunState.from_checkpoint(ckpt).history] == [1, 2]


def _optimizer_file_with(small_run, tmp_path, craft) -> Path:
    """A copy of the small run's last checkpoint whose optimizer file ``craft(h5file, dir)`` changed."""
    import h5py

    ckpt = _copy(small_run / "last", tmp_path)
    (ckpt / "manifest.json").unlink()
    with h5py.File(ckpt / "optimizer.weights.h5", "a") as f:
        craft(f, tmp_path)
    return ckpt


@pytest.mark.parametrize("kind", ["external_storage", "external_link", "soft_link", "group"])
def test_optimizer_file_that_points_elsewhere_is_refused(small_run, tmp_path, kind):
    import h5py

    from textgen.train import make_optimizer

    def craft(f, where):  # replaces dataset "2" (an Adam moment: an array, not a scalar)
        shape, dtype = f["2"].shape, f["2"].dtype
        del f["2"]
        if kind == "external_storage":
            raw = where / "elsewhere.bin"
            raw.write_bytes(b"\0" * (dtype.itemsize * int(np.prod(shape))))
            f.create_dataset("2", shape=shape, dtype=dtype, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
            assert f["2"].external
        elif kind == "external_link":
            with h5py.File(where / "other.h5", "w") as other:
                other.create_dataset("x", shape=shape, dtype=dtype)
            f["2"] = h5py.ExternalLink(str(where / "other.h5"), "/x")
        elif kind == "soft_link":
            f["2"] = h5py.SoftLink("/3")
        else:
            f.create_group("2")

    ckpt = load_checkpoint(_optimizer_file_with(small_run, tmp_path, craft))
    model = load_model(ckpt)
    with pytest.raises(CheckpointError, match="optimizer.weights.h5: (entry|dataset) '2'"):
        ckptlib.restore_optimizer(ckpt, make_optimizer(ckpt.train, 1), model.trainable_variables)


def test_optimizer_file_written_dataset_by_dataset_restores(small_run, tmp_path):
    # The layout this module wrote before it used Keras' save_own_variables: the same file.
    import h5py

    from textgen.train import make_optimizer

    ckpt = load_checkpoint(small_run / "last")
    model = load_model(ckpt)
    saved = make_optimizer(ckpt.train, 1)
    ckptlib.restore_optimizer(ckpt, saved, model.trainable_variables)
    path = tmp_path / "optimizer.weights.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = 1
        for i, var in enumerate(saved.variables):
            f.create_dataset(str(i), data=var.numpy()).attrs["path"] = var.path
    copy = _copy(small_run / "last", tmp_path / "c")
    shutil.copy(path, copy / "optimizer.weights.h5")
    (copy / "manifest.json").unlink()
    restored = make_optimizer(ckpt.train, 1)
    ckptlib.restore_optimizer(load_checkpoint(copy), restored, model.trainable_variables)
    for a, b in zip(saved.variables, restored.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with h5py.File(small_run / "last" / "optimizer.weights.h5", "r") as f:
        assert sorted(f.keys(), key=int) == [str(i) for i in range(len(saved.variables))]
        assert f["2"].attrs["path"].endswith(saved.variables[2].path.split("/", 1)[1])  # names the variable

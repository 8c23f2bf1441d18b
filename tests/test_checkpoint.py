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


def _reseal(ckpt: Path) -> Path:
    """Rewrite the manifest after a test changed files, so the check under test is the one after it."""
    files = sorted(p.name for p in ckpt.iterdir() if p.name != "manifest.json")
    (ckpt / "manifest.json").write_text(json.dumps(
        {n: {"sha256": ckptlib._sha256(ckpt / n), "bytes": (ckpt / n).stat().st_size} for n in files}))
    return ckpt


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


@pytest.mark.parametrize("name", ["vocab.json", "manifest.json"])  # the manifest is required too
def test_missing_directory_and_missing_files(small_run, tmp_path, name):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    ckpt = _copy(small_run / "best", tmp_path)
    (ckpt / name).unlink()
    with pytest.raises(CheckpointError, match=f"incomplete: missing {name}"):
        load_checkpoint(ckpt)


def test_truncated_weights_are_caught_by_the_manifest(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    data = (ckpt / "model.weights.h5").read_bytes()
    (ckpt / "model.weights.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.weights.h5 is corrupt"):
        load_checkpoint(ckpt)


def test_corrupt_weights_without_manifest_fail_clearly(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    (ckpt / "model.weights.h5").write_bytes(b"not an h5 file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(load_checkpoint(_reseal(ckpt)))


def test_config_that_disagrees_with_the_weights(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    conf = json.loads((ckpt / "config.json").read_text())
    conf["model"]["lstm_units"] = [48]
    (ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        load_model(load_checkpoint(_reseal(ckpt)))


def test_vocabulary_that_disagrees_with_the_weights(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    (ckpt / "vocab.json").write_text(json.dumps({"format_version": 1, "chars": list("abcdef")}))
    with pytest.raises(CheckpointError, match="vocabulary 6"):
        load_model(load_checkpoint(_reseal(ckpt)))


def test_bad_json_and_bad_config(small_run, tmp_path):
    ckpt = _copy(small_run / "best", tmp_path)
    (ckpt / "metrics.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="metrics.json is not valid JSON"):
        load_checkpoint(_reseal(ckpt))
    (ckpt / "metrics.json").write_text("{}")
    conf = json.loads((ckpt / "config.json").read_text())
    conf["model"]["colour"] = "blue"
    (ckpt / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="unknown ModelConfig fields: colour"):
        load_checkpoint(_reseal(ckpt))


@pytest.mark.parametrize("exchange", [True, False])  # False: the fallback where renameat2 is not available
def test_writes_are_atomic_and_replace_the_old_checkpoint(small_run, tmp_path, monkeypatch, exchange):
    from textgen.train import make_optimizer

    if not exchange:
        monkeypatch.setattr(ckptlib, "_exchange", lambda a, b: False)
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
    (old / "metrics.json").write_text(json.dumps({**metrics, "history": state["history"]}))
    ckpt = load_checkpoint(_reseal(old))
    assert "history" not in ckpt.metrics and ckpt.metrics["epoch"] == 2
    from textgen.train import RunState

    assert [m["epoch"] for m in RunState.from_checkpoint(ckpt).history] == [1, 2]


def _optimizer_file_with(small_run, tmp_path, craft) -> Path:
    """A copy of the small run's last checkpoint whose optimizer file ``craft(h5file, dir)`` changed."""
    import h5py

    ckpt = _copy(small_run / "last", tmp_path)
    with h5py.File(ckpt / "optimizer.weights.h5", "a") as f:
        craft(f, tmp_path)
    return _reseal(ckpt)


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
    _reseal(copy)
    restored = make_optimizer(ckpt.train, 1)
    ckptlib.restore_optimizer(load_checkpoint(copy), restored, model.trainable_variables)
    for a, b in zip(saved.variables, restored.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with h5py.File(small_run / "last" / "optimizer.weights.h5", "r") as f:
        assert sorted(f.keys(), key=int) == [str(i) for i in range(len(saved.variables))]
        assert f["2"].attrs["path"].endswith(saved.variables[2].path.split("/", 1)[1])  # names the variable


# ---------------------------------------------------------------------------------------------
# Integrity: the manifest is required, the weights file must be the model's, JSON is typed


def test_weights_of_a_bigger_model_than_the_config_says_are_refused(small_run, tmp_path):
    from textgen.config import replace
    from textgen.model import build_model

    ckpt = _copy(small_run / "best", tmp_path)
    meta = load_checkpoint(ckpt)
    bigger = build_model(replace(meta.model, lstm_units=(32, 32)), meta.vocab.size)  # 2x32, config says 1x32
    bigger.save_weights(str(ckpt / "model.weights.h5"))
    with pytest.raises(CheckpointError, match=r"does not match its config.json .*holds 9 variables"):
        load_model(load_checkpoint(_reseal(ckpt)))


def test_weights_file_with_a_link_is_refused(small_run, tmp_path):
    import h5py

    ckpt = _copy(small_run / "best", tmp_path)
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other.create_dataset("x", data=np.zeros((40,), np.float32))
    with h5py.File(ckpt / "model.weights.h5", "a") as f:
        del f["layers/dense/vars/1"]
        f["layers/dense/vars/1"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
    with pytest.raises(CheckpointError, match=r"entry 'layers/dense/vars/1' is a link"):
        load_model(load_checkpoint(_reseal(ckpt)))


def _edit_json(ckpt: Path, name: str, edit) -> None:
    path = ckpt / name
    value = json.loads(path.read_text())
    path.write_text(json.dumps(edit(value)))


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("manifest.json", lambda m: list(m), r"manifest.json must map file names"),
        ("manifest.json", lambda m: {**m, "vocab.json": {**m["vocab.json"], "bytes": "12"}}, "must map file names"),
        ("config.json", lambda c: {**c, "model": {**c["model"], "lstm_units": ["32"]}},
         r"config.json: bad ModelConfig: lstm_units must be a list of positive integers"),
        ("config.json", lambda c: {**c, "model": {**c["model"], "lstm_units": 32}}, "lstm_units must be a list"),
        ("config.json", lambda c: {**c, "model": {**c["model"], "seq_len": 32.0}}, "seq_len must be an integer"),
        ("config.json", lambda c: {**c, "model": {**c["model"], "embedding_dim": True}}, "embedding_dim must be an integer"),
        ("config.json", lambda c: {**c, "train": {**c["train"], "batch_size": "32"}}, "batch_size must be an integer"),
        ("config.json", lambda c: {**c, "train": {**c["train"], "lowercase": 1}}, "lowercase must be true or false"),
        ("config.json", lambda c: {**c, "model": "small"}, "ModelConfig must be a JSON object"),
        ("state.json", lambda s: {**s, "epoch": -1}, r"state.json: epoch must be an integer >= 0, got -1"),
        ("state.json", lambda s: {**s, "epoch": True}, "epoch must be an integer >= 0, got True"),
        ("state.json", lambda s: {**s, "best_epoch": 1.5}, "best_epoch must be an integer >= 0"),
        ("state.json", lambda s: {**s, "best_val_loss": "low"}, "best_val_loss must be a number or null"),
        ("state.json", lambda s: {**s, "history": {}}, "history must be a list of objects"),
        ("metrics.json", lambda m: [m], "metrics.json must hold a JSON object"),
        ("vocab.json", lambda v: {**v, "chars": [1, 2]}, "vocab.json: vocabulary entries must be single characters"),
    ],
)
def test_malformed_checkpoint_json_is_a_message_naming_file_and_field(small_run, tmp_path, name, edit, message):
    ckpt = _copy(small_run / "last", tmp_path)
    _edit_json(ckpt, name, edit)
    if name != "manifest.json":
        _reseal(ckpt)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


def test_malformed_checkpoint_json_through_the_cli_has_no_traceback(small_run, tmp_path):
    from tests.conftest import run_cli

    ckpt = _copy(small_run / "last", tmp_path)
    _edit_json(ckpt, "state.json", lambda s: {**s, "epoch": "2"})
    code, _, stderr = run_cli(["export", str(_reseal(ckpt)), "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and "state.json: epoch must be an integer >= 0" in stderr and "Traceback" not in stderr


def test_every_config_field_has_a_checked_json_type():
    import dataclasses

    from textgen import config as cfglib

    for cls in (cfglib.ModelConfig, cfglib.TrainConfig):
        assert {str(f.type) for f in dataclasses.fields(cls)} <= set(cfglib._TYPE_WORDS), cls


# ---------------------------------------------------------------------------------------------
# Ray Train run directories: only complete checkpoints count


def test_a_ray_run_with_a_half_copied_checkpoint_exports_the_complete_one(small_run, tmp_path):
    run = tmp_path / "ray_run"
    shutil.copytree(small_run / "best", run / "checkpoint_000000")
    (run / "checkpoint_000001").mkdir()  # Ray is still copying it: only metrics.json so far
    (run / "checkpoint_000001" / "metrics.json").write_text(json.dumps({"val_loss": 0.1, "epoch": 3}))
    shutil.copytree(small_run / "last", run / "checkpoint_000002")
    _edit_json(run / "checkpoint_000002", "metrics.json", lambda m: {**m, "val_loss": 0.2})  # manifest differs
    assert ckptlib.resolve_checkpoint(run) == run / "checkpoint_000000"
    shutil.rmtree(run / "checkpoint_000000")
    with pytest.raises(ckptlib.TextgenError, match="has no complete checkpoint"):
        ckptlib.resolve_checkpoint(run)


# ---------------------------------------------------------------------------------------------
# Atomic replacement: a kill at any rename leaves a complete last/ and best/


def _killed_training(out: Path, corpus: Path, syscall: str, when: int):
    """``textgen train`` under strace, killed (SIGKILL) at its ``when``-th call of ``syscall``."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = ["/usr/bin/strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=rename,renameat,renameat2",
           "-e", f"inject={syscall}:signal=SIGKILL:when={when}",
           sys.executable, "-m", "textgen", "train", "--preset", "small", "--epochs", "2", "--corpus", str(corpus),
           "--out", str(out), "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(not Path("/usr/bin/strace").exists(), reason="needs strace")
def test_a_kill_at_any_checkpoint_rename_leaves_loadable_checkpoints_and_resume_works(tmp_path):
    from tests.conftest import run_cli
    from textgen.text import bundled_corpus_path

    corpus = tmp_path / "tiny.txt"
    corpus.write_text(bundled_corpus_path().read_text(encoding="utf-8")[:6000], encoding="utf-8")
    from textgen.dataset import cached_prepare
    from textgen.prepare import PrepareOptions

    cached_prepare([corpus], PrepareOptions())  # prepared before: the runs' renames are their saves only
    # Renames of a 2-epoch run: rename last, rename best (epoch 1: first saves), exchange last,
    # exchange best (epoch 2), rename loss.png.
    kills = {("renameat2", 1): (1, 1), ("renameat2", 2): (2, 1), ("rename", 3): (2, 2)}
    procs = {k: _killed_training(tmp_path / f"{k[0]}-{k[1]}", corpus, *k) for k in kills}
    for (syscall, when), proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == -9, f"{syscall} #{when} did not kill the run: {stderr}"
    for (syscall, when), (last_epoch, best_epoch) in kills.items():
        out = tmp_path / f"{syscall}-{when}"
        assert load_checkpoint(out / "last").epoch == last_epoch, (syscall, when)
        assert load_checkpoint(out / "best").epoch == best_epoch, (syscall, when)
        load_model(load_checkpoint(out / "best"))
        code, _, stderr = run_cli(["train", "--preset", "small", "--epochs", "3", "--corpus", str(corpus),
                                   "--out", str(out), "--no-progress", "--resume"])
        assert code == 0 and f"after epoch {last_epoch}" in stderr, stderr
        assert load_checkpoint(out / "last").epoch == 3
        assert not list(out.glob(".last.*")) + list(out.glob(".best.*"))  # the killed save's copy is gone


def test_without_the_exchange_a_crash_between_the_two_renames_is_repaired(small_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(small_run / "best", run / ".last.old-0000")  # the old one, renamed away
    shutil.copytree(small_run / "last", run / ".last.tmp-1111")  # the new one, complete
    _edit_json(run / ".last.tmp-1111", "state.json", lambda s: {**s, "epoch": 7})
    _reseal(run / ".last.tmp-1111")
    shutil.copytree(small_run / "last", run / ".last.tmp-2222")  # a save killed while writing
    (run / ".last.tmp-2222" / "manifest.json").unlink()
    ckptlib.tidy(run / "last")
    assert load_checkpoint(run / "last").epoch == 7
    assert sorted(p.name for p in run.iterdir()) == ["last"]

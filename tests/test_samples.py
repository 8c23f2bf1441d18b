"""What training shows besides metrics: a sample after every evaluation (log and samples.jsonl) and
TensorBoard event files, on real tiny runs of the small preset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import last_json, read_events, run_cli

pytestmark = pytest.mark.slow


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_evaluation_has_a_sample_of_vocabulary_characters(small_run):
    from textgen.checkpoint import load_checkpoint

    metrics, samples = _lines(small_run / "metrics.jsonl"), _lines(small_run / "samples.jsonl")
    vocab = set(load_checkpoint(small_run / "best").vocab.chars)
    assert [(s["epoch"], s["step_in_epoch"], s["epoch_progress"]) for s in samples] == [
        (m["epoch"], m["step_in_epoch"], m["epoch_progress"]) for m in metrics]
    steps = metrics[0]["steps"]
    assert [s["global_step"] for s in samples] == [steps, 2 * steps]
    for s in samples:
        assert (s["seed"], s["prompt"], s["chars"]) == (0, "", 150)
        assert [x["temperature"] for x in s["samples"]] == [0.5, 1.0]
        assert all(len(x["text"]) == 150 and set(x["text"]) <= vocab for x in s["samples"])
    assert samples[0]["samples"] != samples[1]["samples"]  # the weights changed, the noise did not


def test_tensorboard_events_hold_the_metrics_and_the_samples(small_run):
    events = read_events(small_run / "tensorboard")
    metrics, samples = _lines(small_run / "metrics.jsonl"), _lines(small_run / "samples.jsonl")
    expected = {}
    for m, s in zip(metrics, samples):
        for tag in ("loss", "val_loss", "val_bpc", "learning_rate", "chars_per_s"):
            expected[(tag, s["global_step"])] = pytest.approx(m[tag], rel=1e-6)  # stored as float32
        for x in s["samples"]:
            expected[(f"samples/temperature_{x['temperature']:g}", s["global_step"])] = x["text"]
    assert events == expected


def test_a_sample_is_reproducible_and_is_what_the_exported_model_generates(small_run, tmp_path):
    """Same weights and seed: the same text, in another process too; and `textgen generate` of the
    checkpoint's (fp32) export with that seed and temperature gives it as well."""
    from serve.generator import Generator
    from textgen.checkpoint import load_checkpoint, load_model
    from textgen.samples import Sampler

    ckpt = load_checkpoint(small_run / "best")
    model = load_model(ckpt)
    recorded = next(s for s in _lines(small_run / "samples.jsonl") if s["epoch"] == ckpt.metrics["epoch"])
    temperatures = [x["temperature"] for x in recorded["samples"]]
    texts = [x["text"] for x in recorded["samples"]]
    sampler = Sampler(ckpt.model, ckpt.vocab, 150, temperatures, seed=0)
    assert sampler.sample(model) == texts
    assert sampler.sample(model) == texts
    assert Sampler(ckpt.model, ckpt.vocab, 150, temperatures, seed=1).sample(model) != texts

    code, _, stderr = run_cli(["export", str(small_run), "--out", str(tmp_path / "m.onnx"), "--precision", "fp32"])
    assert code == 0, stderr
    gen = Generator.load(tmp_path / "m.onnx")
    assert [gen.generate("", max_chars=150, temperature=t, seed=0) for t in temperatures] == texts


def test_samples_within_epochs_greedy_rows_and_copies_to_remote_storage(tmp_path):
    """The Ray job's observer on a storage that is not a local path (pyarrow's SubTreeFileSystem
    stands for s3://): written in a local directory, copied after every evaluation; a restarted
    chief appends to the copy there."""
    import pyarrow.fs

    from jobs.train import run_dir_observer
    from textgen.config import SampleOptions, preset
    from textgen.observe import SAMPLES_FILE
    from textgen.train import LocalSink, fit, prepare_data

    remote = tmp_path / "bucket"
    remote.mkdir()
    fs = pyarrow.fs.SubTreeFileSystem(str(remote), pyarrow.fs.LocalFileSystem())
    pre = preset("small")
    train_cfg = dataclasses.replace(pre.train, epochs=1, eval_every_steps=60)
    data = prepare_data(None, pre.model, train_cfg)
    said: list[str] = []
    (tmp_path / "scratch").mkdir()
    observer = run_dir_observer(fs, "runs/r", SampleOptions(40, (0.0, 0.8)), said.append, str(tmp_path / "scratch"))
    fit(pre.model, train_cfg, data, LocalSink(tmp_path / "out"), progress=False, log=said.append, observer=observer)

    samples = _lines(remote / "runs" / "r" / SAMPLES_FILE)
    assert [s["step_in_epoch"] for s in samples] == [60, 120, 126]
    for s in samples:
        assert [x["temperature"] for x in s["samples"]] == [0.0, 0.8]
        assert all(len(x["text"]) == 40 for x in s["samples"])
    log = "\n".join(said)
    assert log.count("--- sample at temperature 0:") == 3 and log.count("--- sample at temperature 0.8:") == 3
    assert "    " + samples[-1]["samples"][1]["text"].split("\n")[0] in log
    events = read_events(remote / "runs" / "r" / "tensorboard")
    assert sorted({step for _, step in events}) == [60, 120, 126]

    (tmp_path / "scratch2").mkdir()
    run_dir_observer(fs, "runs/r", SampleOptions(), said.append, str(tmp_path / "scratch2"))
    assert _lines(tmp_path / "scratch2" / SAMPLES_FILE) == samples  # what it appends to


def test_the_cli_logs_samples_and_sample_chars_0_turns_them_off(tmp_path):
    from textgen.observe import indent

    out = tmp_path / "run"
    args = ["train", "--preset", "small", "--out", str(out), "--no-progress"]
    code, _, stderr = run_cli(args + ["--epochs", "1", "--sample-chars", "30", "--sample-temperatures", "0"])
    assert code == 0, stderr
    (first,) = _lines(out / "samples.jsonl")
    text = first["samples"][0]["text"]
    assert len(text) == 30 and "--- sample at temperature 0:\n" + indent(text) in stderr
    code, stdout, stderr = run_cli(args + ["--epochs", "2", "--resume", "--sample-chars", "0"])
    assert code == 0, stderr
    assert last_json(stdout)["epochs"] == 2 and "sample at temperature" not in stderr
    assert _lines(out / "samples.jsonl") == [first]  # no sample from the resumed run
    steps = first["global_step"]
    scalars = {key for key in read_events(out / "tensorboard") if not key[0].startswith("samples/")}
    assert scalars == {(tag, s) for tag in ("loss", "val_loss", "val_bpc", "learning_rate", "chars_per_s") for s in (steps, 2 * steps)}


def test_the_notebook_kind_says_once_that_it_draws_no_samples(tmp_path):
    out = tmp_path / "run"
    code, _, stderr = run_cli(["train", "--preset", "notebook-1x256", "--lstm-units", "4", "--seq-len", "4",
                               "--batch-size", "1024", "--val-chars", "1000", "--epochs", "2", "--out", str(out),
                               "--no-progress"])
    assert code == 0, stderr
    assert stderr.count("the 'notebook' kind has no step model") == 1
    assert not (out / "samples.jsonl").exists()
    steps = _lines(out / "metrics.jsonl")[0]["steps"]
    assert {step for _, step in read_events(out / "tensorboard")} == {steps, 2 * steps}


@pytest.mark.parametrize("extra, message", [
    (["--sample-chars", "-1"], "--sample-chars must be 0 to 1000"),
    (["--sample-chars", "5000"], "--sample-chars must be 0 to 1000"),
    (["--sample-temperatures", "0.5,hot"], "expected temperatures like 0.5,1.0"),
    (["--sample-temperatures", "-1"], "--sample-temperatures must be one or more numbers >= 0"),
    (["--sample-temperatures", ","], "--sample-temperatures must be one or more numbers >= 0"),
])
def test_bad_sample_flags_exit_2_before_training(tmp_path, extra, message):
    code, _, stderr = run_cli(["train", "--preset", "small", "--out", str(tmp_path / "r")] + extra)
    assert code == 2 and message in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "r").exists()

"""Training integration: the real loop on the bundled corpus with the small preset."""

import json

import pytest
from conftest import last_json, run_cli

pytestmark = pytest.mark.slow


def test_cli_trains_and_reports(small_run):
    history = [json.loads(l) for l in (small_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[1]["val_loss"] < history[0]["val_loss"]  # validation loss falls
    assert (small_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_last_line_is_json_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--preset", "small", "--out", str(out), "--no-progress"]
    code, stdout, stderr = run_cli(args + ["--epochs", "2"])
    assert code == 0, stderr
    first = last_json(stdout)
    assert {"best_val_loss", "best_val_bpc", "epochs", "train_chars_per_s", "checkpoint"} <= set(first)
    assert first["epochs"] == 2 and first["train_chars_per_s"] > 0
    assert abs(first["best_val_bpc"] - first["best_val_loss"] / 0.6931471805599453) < 1e-9
    assert first["checkpoint"] == str((out / "best").resolve())

    # Without --resume an existing run is never overwritten.
    code, _, stderr = run_cli(args + ["--epochs", "3"])
    assert code == 2 and "already holds a training run" in stderr

    code, stdout, stderr = run_cli(args + ["--epochs", "3", "--resume"])
    assert code == 0, stderr
    assert "resumed from" in stderr and "after epoch 2" in stderr
    second = last_json(stdout)
    assert second["epochs"] == 3
    history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [1, 2, 3]
    steps = history[0]["steps"]
    from textgen.checkpoint import load_checkpoint, load_model, restore_optimizer
    from textgen.train import make_optimizer

    ckpt = load_checkpoint(out / "last")
    opt = make_optimizer(ckpt.train, 1)
    restore_optimizer(ckpt, opt, load_model(ckpt).trainable_variables)
    assert int(opt.iterations.numpy()) == 3 * steps  # the optimizer state continued, not restarted


def test_wall_clock_budget_stops_mid_epoch(tmp_path):
    code, stdout, stderr = run_cli(
        ["train", "--preset", "small", "--seq-len", "64", "--out", str(tmp_path / "r"), "--no-progress",
         "--epochs", "50", "--max-minutes", "0.05"]
    )
    assert code == 0, stderr
    result = last_json(stdout)
    assert result["stopped_by"] == "max_minutes" and result["epochs"] < 50
    assert result["checkpoint"]  # the partial epoch was validated and saved


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--corpus", "/nonexistent/x.txt"], "does not exist"),
        (["--batch-size", "100000"], "fewer than one batch"),
        (["--val-fraction", "0.9"], "val_fraction"),
        (["--seq-len", "100000"], "shorter than two windows"),
    ],
)
def test_user_mistakes_exit_2_with_a_message(tmp_path, extra, message):
    code, stdout, stderr = run_cli(["train", "--preset", "small", "--out", str(tmp_path / "r")] + extra)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "r").exists()  # nothing written


def test_resume_without_a_run(tmp_path):
    code, _, stderr = run_cli(["train", "--preset", "small", "--out", str(tmp_path / "r"), "--resume"])
    assert code == 2 and "nothing to resume" in stderr


def test_divergence_is_a_failed_run_exit_1_without_traceback(tmp_path):
    from textgen.errors import RunFailed
    from textgen.train import TrainingError

    assert issubclass(TrainingError, RunFailed)
    code, _, stderr = run_cli(["train", "--preset", "small", "--out", str(tmp_path / "r"), "--no-progress",
                               "--epochs", "1", "--learning-rate", "1e38"])
    assert code == 1, stderr
    said = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and "training loss became" in said[0] and "--resume continues" in said[0], stderr
    assert "Traceback" not in stderr


def test_out_naming_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run directory\n")
    code, _, stderr = run_cli(["train", "--preset", "small", "--out", str(tmp_path / "notes.txt"), "--no-progress",
                               "--epochs", "1"])
    assert code == 2 and "--out" in stderr and "is a file" in stderr, stderr
    assert "epoch 1/1" not in stderr and "Traceback" not in stderr  # refused before any training


def test_train_reads_a_prepared_directory_and_refuses_another_vocabulary_on_resume(tmp_path):
    code, stdout, stderr = run_cli(["prepare", "--out", str(tmp_path / "ds"), "--no-progress"])
    assert code == 0, stderr
    out = tmp_path / "run"
    args = ["train", "--preset", "small", "--out", str(out), "--no-progress", "--epochs", "1"]
    code, stdout, stderr = run_cli(args + ["--data", str(tmp_path / "ds")])
    assert code == 0, stderr
    assert f"data {tmp_path / 'ds'}: 144,431 chars, vocabulary 45" in stderr
    code, _, stderr = run_cli(args + ["--data", str(tmp_path / "ds"), "--corpus", "x.txt", "--out", str(tmp_path / "r3")])
    assert code == 2 and "not both" in stderr
    (tmp_path / "other.txt").write_text("a different corpus, with other letters: xyz! " * 400, encoding="utf-8")
    code, _, stderr = run_cli(["prepare", str(tmp_path / "other.txt"), "--out", str(tmp_path / "ds2"), "--no-progress"])
    assert code == 0, stderr
    code, _, stderr = run_cli(args[:-1] + ["2", "--resume", "--data", str(tmp_path / "ds2")])
    assert code == 2 and "vocabulary" in stderr and "differs from the checkpoint" in stderr, stderr
    code, _, stderr = run_cli(args + ["--data", str(tmp_path / "ds"), "--val-fraction", "0.2", "--out",
                                      str(tmp_path / "run2")])
    assert code == 2 and "--val-fraction contradicts the prepared dataset" in stderr, stderr


def test_evaluations_within_epochs_checkpoint_and_resume_mid_epoch(tmp_path, monkeypatch):
    from textgen.checkpoint import load_checkpoint, load_model, restore_optimizer
    from textgen.train import LocalSink, make_optimizer

    out = tmp_path / "run"
    args = ["train", "--preset", "small", "--out", str(out), "--no-progress", "--epochs", "1",
            "--eval-every-steps", "50"]
    original = LocalSink.epoch_end

    def crash_after_first_save(self, metrics, save, improved):
        original(self, metrics, save, improved)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint (step 50 of epoch 1)

    monkeypatch.setattr(LocalSink, "epoch_end", crash_after_first_save)
    code, _, stderr = run_cli(args)
    assert code == 130, stderr
    assert "epoch 1/1 step 50/126" in stderr
    assert load_checkpoint(out / "last").state["step"] == 50 and load_checkpoint(out / "last").epoch == 0
    monkeypatch.setattr(LocalSink, "epoch_end", original)
    code, stdout, stderr = run_cli(args + ["--resume"])
    assert code == 0, stderr
    assert "after epoch 0 and 50 steps of epoch 1" in stderr
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["step_in_epoch"], m["partial"]) for m in history] == [
        (1, 50, True), (1, 100, True), (1, 126, False)]
    ckpt = load_checkpoint(out / "last")
    opt = make_optimizer(ckpt.train, 1)
    restore_optimizer(ckpt, opt, load_model(ckpt).trainable_variables)
    assert int(opt.iterations.numpy()) == 126 and ckpt.state["step"] == 0  # no step trained twice


def test_evaluations_are_due_by_steps_or_minutes_and_never_at_an_epochs_end():
    from types import SimpleNamespace

    from textgen.config import TrainConfig
    from textgen.train import Loop

    asked = []

    def any_true(flag):  # the collective vote: every worker asks at the same steps
        asked.append(bool(flag))
        return bool(flag)

    def loop(**cfg):
        return SimpleNamespace(train_cfg=TrainConfig(**cfg), n_steps=10, steps=SimpleNamespace(any_true=any_true),
                               last_eval=0.0)

    by_steps = loop(eval_every_steps=4)
    assert [d for d in range(1, 11) if Loop.eval_due(by_steps, 1, d)] == [4, 8]
    assert [d for d in range(1, 11) if Loop.eval_due(by_steps, 2, d)] == [2, 6]  # global steps 12 and 16
    assert not any(Loop.eval_due(loop(), 1, d) for d in range(1, 11)) and asked == []
    late = loop(eval_every_minutes=1e-9)
    assert all(Loop.eval_due(late, 1, d) for d in range(1, 10)) and not Loop.eval_due(late, 1, 10)
    assert len(asked) == 9
    import time

    soon = loop(eval_every_minutes=60.0)
    soon.last_eval = time.monotonic()
    assert not Loop.eval_due(soon, 1, 3)


def _curve(history):
    """(global step, val_loss) of every evaluation of a run."""
    n_steps = next(m["step_in_epoch"] for m in history if not m["partial"])
    return [(round(m["epoch_progress"] * n_steps), m["val_loss"]) for m in history]


def test_fine_tuning_reaches_a_held_out_loss_in_fewer_steps_than_training_from_scratch(small_run, tmp_path):
    """Text A: the bundled book (``small_run``, 2 epochs). Text B: 40,000 characters of Python's
    language reference (the stdlib's ``pydoc_data``): other prose, 26 characters Alice lacks. The
    threshold is the scratch run's held-out loss after its 2 epochs (70 steps)."""
    import pydoc_data.topics

    from textgen.checkpoint import load_checkpoint

    topics = pydoc_data.topics.topics
    text = "\n".join(topics[k] for k in sorted(topics))[:40_000]
    (tmp_path / "b.txt").write_text(text, encoding="utf-8")
    new = set(text.lower()) - set(load_checkpoint(small_run / "best").vocab.chars)
    args = ["train", "--preset", "small", "--corpus", str(tmp_path / "b.txt"), "--epochs", "2", "--seed", "0",
            "--eval-every-steps", "10", "--patience", "100", "--no-progress"]
    curves = {}
    for name, extra in (("scratch", []), ("fine", ["--init-from", str(small_run)])):
        code, _, stderr = run_cli(args + ["--out", str(tmp_path / name), *extra])
        assert code == 0, stderr
        history = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        curves[name] = _curve(history)
    assert f"{len(new)} new characters: " in stderr and len(new) > 10  # 26 on Python 3.11
    threshold = curves["scratch"][-1][1]
    reached = {name: min(step for step, loss in curve if loss <= threshold) for name, curve in curves.items()}
    print(f"threshold {threshold:.4f} nats: scratch at step {reached['scratch']}, fine-tuned at step "
          f"{reached['fine']}; curves {curves}")
    assert curves["scratch"][0][1] > threshold + 0.2  # it learned: the threshold is not its starting loss
    assert reached["fine"] * 3 <= reached["scratch"]  # measured: step 10 against 70

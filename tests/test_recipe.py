"""The training recipe: the learning-rate schedule, AdamW, averaged weights, the dropouts."""

import json
import math

import numpy as np
import pytest
from conftest import last_json, run_cli

from textgen.config import ModelConfig, TrainConfig, preset
from textgen.text import bundled_corpus_path


def test_the_schedule_warms_up_then_decays_to_its_floor_at_the_end_of_the_budget():
    from textgen.train import scheduled_learning_rate as lr

    cfg = TrainConfig(learning_rate=4e-3, schedule="cosine", warmup_steps=10, min_lr_fraction=0.1)
    assert lr(cfg, 0, 0.0) == pytest.approx(4e-4)  # the first step: 1/10 of the peak
    assert lr(cfg, 9, 0.0) == pytest.approx(4e-3)  # the peak at the end of the warm-up
    assert lr(cfg, 100, 0.5) == pytest.approx(4e-3 * (0.1 + 0.9 * 0.5))
    assert lr(cfg, 100, 1.0) == pytest.approx(4e-4) == lr(cfg, 100, 7.0)  # the floor, and no further
    rates = [lr(cfg, s, s / 1000) for s in range(10, 1001, 10)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    wsd = TrainConfig(learning_rate=1e-2, schedule="wsd", decay_fraction=0.25, min_lr_fraction=0.0)
    assert [lr(wsd, 100, p) for p in (0.0, 0.5, 0.75, 0.875, 1.0)] == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3, 0.0])
    constant = TrainConfig(learning_rate=1e-3, warmup_steps=4)
    assert [lr(constant, s, s / 10) for s in (0, 3, 9)] == pytest.approx([2.5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize("field, value", [("schedule", "linear"), ("warmup_steps", -1), ("ema_momentum", 1.0),
                                          ("weight_decay", -0.1), ("min_lr_fraction", 1.5),
                                          ("decay_fraction", 0.0)])
def test_recipe_settings_out_of_range_are_refused(field, value):
    from textgen.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_time_locked_dropout_keeps_one_mask_per_window_and_embedding_dropout_drops_whole_characters():
    from textgen.model import build_model, cudnn_problems, lstm_layers

    cfg = ModelConfig(embedding_dim=8, lstm_units=(16,), seq_len=20, dropout=0.5, input_dropout=0.5,
                      embedding_dropout=0.5, time_locked=True)
    model = build_model(cfg, vocab_size=6)
    assert all(not cudnn_problems(layer) for layer in lstm_layers(model))
    x = np.ones((4, 20, 8), "float32")
    masked = np.asarray(model.get_layer("input_dropout")(x, training=True))
    assert (masked == masked[:, :1, :]).all()  # the same at every time step
    assert 0 < (masked == 0).mean() < 1
    ids = np.tile(np.arange(6, dtype="int32"), (4, 5))[:, :20]
    emb = model.get_layer("embedding")(ids)
    dropped = np.asarray(model.get_layer("embedding_dropout")([ids, emb], training=True))
    zero = (dropped == 0).all(axis=-1)  # (B, T): positions whose character was dropped
    for b in range(4):  # a character is dropped at all its positions of a window, or at none
        for c in range(6):
            assert len(set(zero[b][ids[b] == c])) == 1
    assert 0 < zero.mean() < 1
    kept = ~zero
    np.testing.assert_allclose(dropped[kept], 2.0 * np.asarray(emb)[kept], rtol=1e-6)
    np.testing.assert_array_equal(model.get_layer("embedding_dropout")([ids, emb], training=False), emb)


RECIPE = ["--schedule", "cosine", "--warmup-steps", "3", "--ema-momentum", "0.9", "--weight-decay", "0.1"]


def _train(out, *extra):
    code, stdout, stderr = run_cli(["train", "--preset", "small", "--out", str(out), "--no-progress",
                                    *RECIPE, *extra])
    assert code == 0, stderr
    return last_json(stdout), stderr


def _weights(path):
    from textgen.checkpoint import load_checkpoint, load_model

    return load_model(load_checkpoint(path)).get_weights()


@pytest.mark.slow
def test_averaged_weights_are_validated_and_saved_and_a_resumed_run_trains_on_exactly(tmp_path, monkeypatch):
    from textgen.train import LocalSink

    straight, _ = _train(tmp_path / "straight", "--epochs", "2")
    original = LocalSink.epoch_end

    def crash_after_first_save(self, metrics, save, improved):
        original(self, metrics, save, improved)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(LocalSink, "epoch_end", crash_after_first_save)
    code, _, stderr = run_cli(["train", "--preset", "small", "--out", str(tmp_path / "split"), "--no-progress",
                               *RECIPE, "--epochs", "2"])
    assert code == 130, stderr
    monkeypatch.setattr(LocalSink, "epoch_end", original)
    resumed, stderr = _train(tmp_path / "split", "--epochs", "2", "--resume")
    assert "resumed from" in stderr
    assert resumed["best_val_loss"] == pytest.approx(straight["best_val_loss"], abs=1e-5)
    for a, b in zip(_weights(tmp_path / "straight" / "last"), _weights(tmp_path / "split" / "last")):
        np.testing.assert_allclose(a, b, atol=1e-5)

    history = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rates = [m["learning_rate"] for m in history]
    assert rates[0] > rates[1] == pytest.approx(0.1 * preset("small").train.learning_rate, rel=0.05)

    # The checkpoint holds the averaged weights: the exported model scores what training validated.
    onnx = tmp_path / "m.onnx"
    code, _, stderr = run_cli(["export", str(tmp_path / "straight"), "--out", str(onnx)])
    assert code == 0, stderr
    code, stdout, stderr = run_cli(["eval", str(onnx), "--corpus", str(bundled_corpus_path())])
    assert code == 0, stderr
    assert last_json(stdout)["loss_nats"] == pytest.approx(straight["best_val_loss"], abs=2e-4)


@pytest.mark.slow
def test_the_budget_counts_the_whole_run_across_resumes(tmp_path):
    first, _ = _train(tmp_path / "r", "--epochs", "50", "--max-minutes", "0.05")
    assert first["stopped_by"] == "max_minutes"
    metrics = tmp_path / "r" / "metrics.jsonl"
    before = metrics.read_text()
    again, stderr = _train(tmp_path / "r", "--epochs", "50", "--max-minutes", "0.05", "--resume")
    assert again["stopped_by"] == "max_minutes" and again["epochs"] == first["epochs"]
    assert "spent its budget of 0.05 minutes" in stderr
    assert metrics.read_text() == before  # nothing trained, nothing evaluated
    assert math.isfinite(json.loads(before.splitlines()[-1])["learning_rate"])

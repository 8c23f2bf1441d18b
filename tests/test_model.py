import numpy as np
import pytest

from textgen.config import PRESETS, ModelConfig, preset
from textgen.model import build_model, build_step_model, copy_weights, cudnn_problems, lstm_layers, state_names


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_cudnn_eligible_lstms(name):
    cfg = PRESETS[name].model
    model = build_model(cfg, 45)
    layers = lstm_layers(model)
    assert [l.units for l in layers] == list(cfg.lstm_units)
    for layer in layers:
        assert cudnn_problems(layer) == []


def test_cudnn_check_catches_ineligible_settings():
    import keras

    layer = keras.layers.LSTM(8, recurrent_dropout=0.1, unroll=True, activation="relu")
    problems = " ".join(cudnn_problems(layer))
    assert "recurrent_dropout" in problems and "unroll" in problems and "activation" in problems


def test_mixed_precision_keeps_lstm_eligible_and_logits_float32():
    model = build_model(preset("default").model, 45, mixed_precision=True)
    assert all(not cudnn_problems(l) for l in lstm_layers(model))
    assert lstm_layers(model)[0].compute_dtype == "float16"
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model.output.dtype == "float32"


def test_default_preset_shape_and_size():
    cfg = preset("default").model
    assert (cfg.embedding_dim, cfg.lstm_units, cfg.dropout, cfg.seq_len) == (64, (256, 256), 0.35, 100)
    assert (cfg.input_dropout, cfg.embedding_dropout, cfg.time_locked) == (0.15, 0.0, True)
    assert preset("default").train.batch_size == 64
    model = build_model(cfg, 45)
    out = model(np.zeros((2, 100), np.int32))
    assert out.shape == (2, 100, 45)
    # 45*64 + 4*256*(64+256+1) + 4*256*(256+256+1) + 256*45+45
    assert model.count_params() == 2880 + 328704 + 525312 + 11565


def test_seed_presets_reproduce_the_notebook_models():
    one = build_model(preset("notebook-1x256").model, 45)
    two = build_model(preset("notebook-2x256").model, 45)
    assert [l.units for l in lstm_layers(one)] == [256]
    assert [l.return_sequences for l in lstm_layers(two)] == [True, False]
    probs = two(np.random.rand(3, 100, 1).astype(np.float32)).numpy()
    assert probs.shape == (3, 45)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)  # softmax output
    with pytest.raises(ValueError, match="no step model"):
        build_step_model(preset("notebook-2x256").model, 45)


def test_step_model_matches_training_model_and_carries_state():
    cfg = ModelConfig(embedding_dim=8, lstm_units=(16, 12), dropout=0.0, seq_len=20)
    model = build_model(cfg, 11)
    step = build_step_model(cfg, 11)
    copy_weights(model, step)
    ins, outs = state_names(2)
    assert [t.name for t in step.inputs] == ["char_ids", *ins]
    assert step.output_names == ["logits", *outs]
    ids = np.random.default_rng(0).integers(0, 11, (2, 9)).astype(np.int32)
    zeros = [np.zeros((2, u), np.float32) for u in (16, 16, 12, 12)]
    full = step([ids, *zeros])
    np.testing.assert_allclose(full[0], model(ids), atol=1e-5)
    first = step([ids[:, :4], *zeros])
    second = step([ids[:, 4:], *(np.asarray(s) for s in first[1:])])
    np.testing.assert_allclose(np.concatenate([first[0], second[0]], axis=1), full[0], atol=1e-5)


def test_window_loss_mean_and_sum_per_kind():
    import tensorflow as tf

    from textgen.config import CHAR, NOTEBOOK
    from textgen.train import window_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    y = rng.integers(0, 7, (3, 5))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_p, y[..., None], -1)[..., 0]  # (3, 5)
    np.testing.assert_allclose(window_loss(CHAR, y, logits), ce.mean(-1), rtol=1e-5)
    np.testing.assert_allclose(window_loss(CHAR, y, logits, "sum"), ce.sum(-1), rtol=1e-5)
    probs = tf.nn.softmax(logits[:, 0]).numpy()  # the notebook kind: probabilities, one target
    for reduction in ("mean", "sum"):
        np.testing.assert_allclose(window_loss(NOTEBOOK, y[:, 0], probs, reduction), ce[:, 0], rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        window_loss(CHAR, y, logits, "max")

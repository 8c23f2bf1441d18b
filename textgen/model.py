"""The Keras models: the training model and the step model with explicit LSTM state.

``char`` kind (ours):  char_ids (B, T) int32 -> Embedding (B, T, E) [-> embedding dropout -> input
dropout] -> N x [LSTM (B, T, H) -> Dropout] -> Dense logits (B, T, V). Dropout is per element, or
time-locked (one mask per window and feature, the same at every time step: variational dropout);
embedding dropout drops whole characters of a window. All of it only in training. The step model
has the same weighted layers (same names, same weights) plus named per-layer state inputs
``h_i``/``c_i`` (B, H_i) and outputs ``h_i_out``/``c_i_out``, with variable batch and time, so a
prompt is consumed in one call and single characters after it.

``notebook`` kind (the notebook): scaled_ids (B, T, 1) float32 -> N x [LSTM -> Dropout] (the last LSTM
returns only its final output) -> Dense softmax probabilities (B, V).

Every LSTM keeps the settings under which Keras 3 takes the cuDNN kernel on GPU: tanh / sigmoid
activations, no recurrent dropout, not unrolled, with bias, no mask (``cudnn_problems`` checks them).
"""

from __future__ import annotations

import keras
from keras import ops

from textgen.config import CHAR, NOTEBOOK, ModelConfig
from textgen.contract import CHAR_IDS, LOGITS, state_names


def _policy(mixed_precision: bool) -> str | None:
    # float16 compute keeps the LSTM cuDNN-eligible; logits and softmax are kept in float32 below.
    return "mixed_float16" if mixed_precision else None


def _lstm(units: int, index: int, dtype: str | None, **kwargs) -> keras.layers.LSTM:
    return keras.layers.LSTM(
        units,
        activation="tanh",
        recurrent_activation="sigmoid",
        recurrent_dropout=0.0,
        unroll=False,
        use_bias=True,
        name=f"lstm_{index}",
        dtype=dtype,
        **kwargs,
    )


def build_model(cfg: ModelConfig, vocab_size: int, mixed_precision: bool = False) -> keras.Model:
    """The training model: logits (B, T, V) for ``char``, probabilities (B, V) for ``notebook``."""
    build = _notebook_model if cfg.kind == NOTEBOOK else _char_model
    return build(cfg, vocab_size, _policy(mixed_precision))


class EmbeddingDropout(keras.layers.Layer):
    """AWD-LSTM's embedding dropout for one window at a time: each character of the vocabulary is
    dropped from a window with probability ``rate`` (all its occurrences there are zero), the
    others scaled by 1 / (1 - rate). Inputs: [char_ids (B, T), embedded (B, T, E)]."""

    def __init__(self, rate: float, vocab_size: int, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.vocab_size = rate, vocab_size
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        ids, x = inputs
        if not training or self.rate == 0:
            return x
        keep = keras.random.uniform((ops.shape(ids)[0], self.vocab_size), seed=self.seed_generator) >= self.rate
        mask = ops.take_along_axis(ops.cast(keep, x.dtype), ids, axis=1)  # (B, T): 1 where kept
        return x * ops.expand_dims(mask, -1) / ops.cast(1.0 - self.rate, x.dtype)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "vocab_size": self.vocab_size}


def _dropout(cfg: ModelConfig, rate: float, name: str) -> keras.layers.Dropout:
    # Time-locked: one mask per (window, feature), broadcast over the time axis.
    return keras.layers.Dropout(rate, noise_shape=(None, 1, None) if cfg.time_locked else None, name=name)


def _char_model(cfg: ModelConfig, vocab_size: int, dtype: str | None) -> keras.Model:
    ids = keras.Input((None,), dtype="int32", name=CHAR_IDS)
    x = keras.layers.Embedding(vocab_size, cfg.embedding_dim, name="embedding", dtype=dtype)(ids)
    if cfg.embedding_dropout:
        x = EmbeddingDropout(cfg.embedding_dropout, vocab_size, name="embedding_dropout")([ids, x])
    if cfg.input_dropout:
        x = _dropout(cfg, cfg.input_dropout, "input_dropout")(x)
    for i, units in enumerate(cfg.lstm_units):
        x = _lstm(units, i, dtype, return_sequences=True)(x)
        x = _dropout(cfg, cfg.dropout, f"dropout_{i}")(x)
    out = keras.layers.Dense(vocab_size, name=LOGITS, dtype="float32")(x)
    return keras.Model(ids, out, name="textgen_char")


def _notebook_model(cfg: ModelConfig, vocab_size: int, dtype: str | None) -> keras.Model:
    """The notebook's model, kept for comparisons: the last LSTM returns only its final output."""
    scaled = keras.Input((cfg.seq_len, 1), dtype="float32", name="scaled_ids")
    x = scaled
    last = len(cfg.lstm_units) - 1
    for i, units in enumerate(cfg.lstm_units):
        x = _lstm(units, i, dtype, return_sequences=i < last)(x)
        x = keras.layers.Dropout(cfg.dropout, name=f"dropout_{i}")(x)
    out = keras.layers.Dense(vocab_size, activation="softmax", name="probs", dtype="float32")(x)
    return keras.Model(scaled, out, name="textgen_notebook")


def build_step_model(cfg: ModelConfig, vocab_size: int) -> keras.Model:
    """Inference model with explicit state: (char_ids, h_0, c_0, ...) -> (logits, h_0_out, c_0_out, ...).
    float32 always (it runs on CPU after export). Only for the ``char`` kind."""
    if cfg.kind != CHAR:
        raise ValueError(
            f"the {cfg.kind!r} model kind reproduces the notebook for comparisons and has no step "
            "model; train a 'char' preset (e.g. --preset default) to export and generate"
        )
    ids = keras.Input((None,), batch_size=None, dtype="int32", name=CHAR_IDS)
    in_names, _ = state_names(len(cfg.lstm_units))
    states = [
        keras.Input((units,), dtype="float32", name=in_names[2 * i + j])
        for i, units in enumerate(cfg.lstm_units)
        for j in range(2)
    ]
    x = keras.layers.Embedding(vocab_size, cfg.embedding_dim, name="embedding")(ids)
    _, out_names = state_names(len(cfg.lstm_units))
    new_states = []
    for i, units in enumerate(cfg.lstm_units):
        x, h, c = _lstm(units, i, None, return_sequences=True, return_state=True)(
            x, initial_state=[states[2 * i], states[2 * i + 1]]
        )
        # Identity layers only name the outputs (they become the ONNX output names).
        new_states += [keras.layers.Identity(name=out_names[2 * i + j])(s) for j, s in enumerate((h, c))]
    logits = keras.layers.Dense(vocab_size, name=LOGITS)(x)
    return keras.Model([ids, *states], [logits, *new_states], name="textgen_step")


def copy_weights(src: keras.Model, dst: keras.Model) -> None:
    """Copy weights layer by layer, by name (the training and step models share layer names)."""
    for layer in dst.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        src_weights = src.get_layer(layer.name).get_weights()
        if [w.shape for w in src_weights] != [w.shape for w in weights]:
            raise ValueError(f"layer {layer.name!r}: weight shapes differ between models")
        layer.set_weights(src_weights)


def lstm_layers(model: keras.Model) -> list[keras.layers.LSTM]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.LSTM)]


def cudnn_problems(layer: keras.layers.LSTM) -> list[str]:
    """Settings that would keep this LSTM off the cuDNN kernel (empty when eligible)."""
    cell = layer.cell
    checks = {
        "activation is not tanh": cell.activation is not keras.activations.tanh,
        "recurrent_activation is not sigmoid": cell.recurrent_activation is not keras.activations.sigmoid,
        "recurrent_dropout is not 0": cell.recurrent_dropout != 0,
        "unroll is True": bool(layer.unroll),
        "use_bias is False": not cell.use_bias,
        "use_cudnn is False": layer.use_cudnn is False,
    }
    return [f"{layer.name}: {what}" for what, bad in checks.items() if bad]

"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models"): the
model keeps learning from the held-out text while it reads it.

The text is cut into the windows ``textgen eval`` scores (seq_len + 1 ids at stride seq_len, so
every target once: the paper's segments) and read in order, the LSTM state carried from each window
to the next. Each window is first scored with the weights as they are: its loss is the sum of the
cross-entropy of its seq_len targets. Then the weights take one gradient step on that loss before
the next window:

    θ ← θ − lr · ∇ loss(window) + seq_len · decay · (θ_trained − θ)

(SGD, with an optional pull back towards the trained weights). Both rates are per target character
(the loss is a sum, the pull is seq_len times ``decay``), so a value tuned at one --seq-len carries
over to another, as in the paper, whose rates scale with the segment length. The static loss is the
same pass without the steps. It runs the step model of ``textgen.model`` (explicit state, no
dropout) built from the training checkpoint, whose files are only read.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from textgen.checkpoint import Checkpoint, load_model
from textgen.config import CHAR
from textgen.errors import TextgenError
from textgen.model import build_step_model, copy_weights
from textgen.text import eval_ids


@dataclass(frozen=True)
class Score:
    total_nats: float  # summed over every target scored
    chars: int  # targets scored: windows * seq_len
    windows: int

    @property
    def loss_nats(self) -> float:
        return self.total_nats / self.chars


def step_model_of(ckpt: Checkpoint) -> keras.Model:
    """The checkpoint's weights (loaded with its checks) in the step model."""
    if ckpt.model.kind != CHAR:
        raise TextgenError(f"checkpoint {ckpt.path} is a {ckpt.model.kind!r} model; dynamic evaluation needs "
                           "the 'char' kind (the step model with explicit state)")
    step = build_step_model(ckpt.model, ckpt.vocab.size)
    copy_weights(load_model(ckpt), step)
    return step


def windows_of(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets (W, seq_len) of the full windows of ``textgen eval``, in order."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise TextgenError(f"{len(ids)} characters hold no window of seq_len + 1 = {seq_len + 1}; "
                           "give a longer text or a smaller --seq-len")
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return x.astype(np.int32), y.astype(np.int32)


class DynamicEvaluator:
    """A step model, its trained weights, and the per-window pass compiled once for ``seq_len``:
    score (static), or score then update (dynamic)."""

    def __init__(self, model: keras.Model, seq_len: int) -> None:
        self.model = model
        self.variables = list(model.trainable_variables)
        self.trained = [tf.constant(v.numpy()) for v in self.variables]
        self.state_sizes = [int(t.shape[-1]) for t in model.inputs[1:]]  # h_0, c_0, ... (B, H_i)
        ids_spec = tf.TensorSpec((1, seq_len), tf.int32)
        state_spec = [tf.TensorSpec((1, h), tf.float32) for h in self.state_sizes]
        scalar = tf.TensorSpec((), tf.float32)
        self._score = tf.function(self._score_window, input_signature=[ids_spec, ids_spec, state_spec])
        self._update = tf.function(self._score_and_update,
                                   input_signature=[ids_spec, ids_spec, state_spec, scalar, scalar])

    def _cross_entropy(self, x, y, state):
        logits, *new_state = self.model([x, *state], training=False)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits), new_state  # (1, L)

    def _score_window(self, x, y, state):
        ce, new_state = self._cross_entropy(x, y, state)
        return tf.reduce_sum(ce), new_state

    def _score_and_update(self, x, y, state, lr, decay):
        with tf.GradientTape() as tape:
            ce, new_state = self._cross_entropy(x, y, state)
            loss = tf.reduce_sum(ce)
        grads = tape.gradient(loss, self.variables)
        pull = decay * tf.cast(tf.size(ce), tf.float32)  # seq_len * decay
        for v, g, v0 in zip(self.variables, grads, self.trained):
            v.assign(v - lr * tf.convert_to_tensor(g) + pull * (v0 - v))  # the embedding's g is sparse
        return loss, new_state

    def restore(self) -> None:
        """Put the trained weights back (after a dynamic pass)."""
        for v, v0 in zip(self.variables, self.trained):
            v.assign(v0)

    def run(self, ids: np.ndarray, seq_len: int, lr: float | None = None, decay: float = 0.0,
            carry_state: bool = True) -> Score:
        """Score ``ids`` window by window: static (``lr`` None) or dynamic (a step of ``lr`` after
        each window). ``carry_state`` False starts every window from the zero state, as
        ``textgen eval`` does. The trained weights are back in the model afterwards."""
        x, y = windows_of(ids, seq_len)
        zero = [tf.zeros((1, h)) for h in self.state_sizes]
        state, total = zero, 0.0
        try:
            for i in range(len(x)):
                if lr is None:
                    nats, new_state = self._score(x[i : i + 1], y[i : i + 1], state)
                else:
                    nats, new_state = self._update(x[i : i + 1], y[i : i + 1], state, lr, decay)
                total += float(nats)
                if not math.isfinite(total):
                    raise TextgenError(f"the loss became {total} at window {i + 1} of {len(x)}: the updates "
                                       f"diverged at --dynamic-lr {lr}; choose a smaller one")
                state = new_state if carry_state else zero
        finally:
            self.restore()
        return Score(total, x.size, len(x))


def evaluate(ckpt: Checkpoint, corpus: Sequence[str] | None, split: str, seq_len: int, lr: float, decay: float,
             log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """``textgen eval --dynamic``: the static and the dynamic loss of the checkpoint on the text
    ``textgen eval`` scores (``split`` "val": the held-out tail training validated on; "all")."""
    val_fraction = ckpt.train.val_fraction if split == "val" else None
    ids, skipped = eval_ids(corpus, ckpt.vocab, ckpt.train.lowercase, val_fraction, seq_len)
    evaluator = DynamicEvaluator(step_model_of(ckpt), seq_len)
    scores = {}
    for name, rate in (("static", None), ("dynamic", lr)):
        t0 = time.perf_counter()
        scores[name] = score = evaluator.run(ids, seq_len, lr=rate, decay=decay)
        log(f"{name}: {score.loss_nats:.4f} nats/char over {score.windows:,} windows of {seq_len} "
            f"({time.perf_counter() - t0:.1f} s)")
    static, dynamic = scores["static"], scores["dynamic"]
    val_loss = ckpt.metrics.get("val_loss")
    return {
        "loss_nats": dynamic.loss_nats,
        "bpc": dynamic.loss_nats / math.log(2),
        "static_loss_nats": static.loss_nats,
        "static_bpc": static.loss_nats / math.log(2),
        "chars": dynamic.chars,
        "windows": dynamic.windows,
        "unknown_skipped": skipped,
        "split": split,
        "model_val_loss": val_loss if isinstance(val_loss, (int, float)) and math.isfinite(val_loss) else None,
        "dynamic": True,
        "dynamic_lr": lr,
        "dynamic_decay": decay,
        "seq_len": seq_len,
        "checkpoint": str(ckpt.path.resolve()),
    }

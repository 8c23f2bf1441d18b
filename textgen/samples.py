"""A sample of text from the model being trained: what char-rnn, textgenrnn and the Keras example
print after every epoch.

``Sampler.sample(model)`` copies the training model's weights into a step model (``build_step_model``,
float32) and draws ``chars`` characters at every temperature, the temperatures as rows of one batch,
state carried from step to step, in one compiled loop (a ``tf.function``: the first call traces it,
later calls cost a few hundredths of a second for 150 characters; README, "Train").

The rule is the exported generator's, so a sample is what ``textgen generate`` of that checkpoint's
export gives with ``--seed`` the same seed, the same ``--temperature`` and ``--max-chars``, no prompt
(top-k and top-p off): an empty prompt is fed ``start_char``; the j-th character of a row is
``argmax(logits / max(t, GREEDY_TEMPERATURE) + g_j)``, g_j the ``textgen-hash32-gumbel-v1`` noise of
(seed, j) (``textgen.contract.hash_gumbel``; zeros for a greedy row, t = 0). TensorFlow and
onnxruntime round differently in the last bits, so a near-tie can rarely pick another character. The
noise is computed once: with one seed every evaluation gets the same noise, and consecutive samples
differ only by the weights.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from textgen.config import CHAR, ModelConfig
from textgen.contract import GREEDY_TEMPERATURE, hash_gumbel, start_char
from textgen.model import build_step_model, copy_weights
from textgen.text import Vocab


def hash_noise(seed: int, chars: int, vocab_size: int) -> np.ndarray:
    """(chars, V) float32: the generator's noise for the first ``chars`` characters of a row seeded ``seed``."""
    return np.array([[hash_gumbel(seed, j, v) for v in range(vocab_size)] for j in range(chars)], np.float32)


class Sampler:
    """Draws one sample per temperature from a ``char`` model's current weights."""

    def __init__(self, cfg: ModelConfig, vocab: Vocab, chars: int, temperatures: Sequence[float], seed: int):
        if cfg.kind != CHAR:
            raise ValueError(f"samples need a {CHAR!r} model, not {cfg.kind!r}")
        self.vocab, self.temperatures, self.seed = vocab, tuple(temperatures), seed
        self.prompt = ""
        self.step = build_step_model(cfg, vocab.size)
        t = np.array(self.temperatures, np.float32)
        greedy = (t <= 0).astype(np.float32)[:, None, None]
        noise = hash_noise(seed, chars, vocab.size)[None] * (1.0 - greedy)  # (rows, chars, V)
        self._noise = tf.constant(np.transpose(noise, (1, 0, 2)))  # (chars, rows, V): one slice per step
        self._inverse_t = tf.constant(1.0 / np.maximum(t, np.float32(GREEDY_TEMPERATURE)))
        self._start = tf.fill([len(t), 1], vocab.index[start_char(vocab.chars)])
        self._draw = tf.function(self._loop)

    def _loop(self, noise, inverse_t, ids):
        """(chars, rows) sampled ids, the state carried from step to step."""
        states = [tf.zeros([tf.shape(ids)[0], s.shape[-1]]) for s in self.step.inputs[1:]]
        out = tf.TensorArray(tf.int32, size=tf.shape(noise)[0])
        for j in tf.range(tf.shape(noise)[0]):
            logits, *states = self.step([ids, *states], training=False)
            nxt = tf.argmax(logits[:, -1, :] * inverse_t[:, None] + noise[j], axis=-1, output_type=tf.int32)
            out = out.write(j, nxt)
            ids = nxt[:, None]
        return out.stack()

    def sample(self, model: keras.Model) -> list[str]:
        """One text per temperature, from ``model``'s weights as they are now."""
        copy_weights(model, self.step)
        ids = self._draw(self._noise, self._inverse_t, self._start).numpy()
        return [self.vocab.decode(row) for row in ids.T]

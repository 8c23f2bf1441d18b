"""What the chief writes after every evaluation besides metrics and checkpoints, into a run directory:

    samples.jsonl   one JSON line per evaluation: epoch, step_in_epoch, epoch_progress, global_step,
                    seed, prompt, chars, samples [{"temperature": t, "text": ...}, ...] (``char`` kind)
    tensorboard/    TensorFlow event files: the scalars ``SCALARS`` of every evaluation at its global
                    training step, and the samples as text (``samples/temperature_<t>``)

and the samples in the log. ``textgen train`` writes into ``--out``, the Ray job (rank 0 only) into
Ray's run directory ``<storage_path>/<name>/``. TensorBoard itself is not needed to write the files:
``tf.summary.write`` with the scalar and text plugins' metadata is what ``tf.summary.scalar`` and
``tf.summary.text`` write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import tensorflow as tf

from textgen.config import CHAR, SampleOptions
from textgen.samples import Sampler

SCALARS = ("loss", "val_loss", "val_bpc", "learning_rate", "chars_per_s")  # of the metrics
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _plugin(name: str):
    return tf.compat.v1.SummaryMetadata(plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name=name))


def global_step(metrics: dict[str, Any], steps_per_epoch: int) -> int:
    """Training steps done at this evaluation, over all epochs."""
    return (metrics["epoch"] - 1) * steps_per_epoch + metrics["step_in_epoch"]


class RunObserver:
    """The chief's observer of one run (``textgen.train.fit(observer=...)``): ``evaluated`` after every
    evaluation writes the scalars, draws the samples, logs and records them; ``after()``, if given,
    runs then (the Ray job copies the files to remote storage)."""

    def __init__(self, out: str | Path, options: SampleOptions, log: Callable[[str], None] = print, after: Callable[[], None] | None = None):
        self.out, self.options, self.log, self.after = Path(out), options, log, after
        self.sampler = None
        self.writer = None
        self.said_no_samples = False

    def evaluated(self, loop, metrics: dict[str, Any]) -> None:
        step = global_step(metrics, loop.n_steps)
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(str(self.out / TENSORBOARD_DIR))
        with self.writer.as_default(step=step):
            for tag in SCALARS:
                tf.summary.write(tag, tf.constant(metrics[tag], tf.float32), metadata=_plugin("scalars"))
            texts = self.draw(loop)
            for t, text in zip(self.options.temperatures, texts):
                tf.summary.write(f"samples/temperature_{t:g}", tf.constant(text), metadata=_plugin("text"))
        self.writer.flush()
        if texts:
            self.record(metrics, step, texts)
        if self.after is not None:
            self.after()

    def draw(self, loop) -> list[str]:
        """The samples of this evaluation (none when off, or for the notebook kind: said once)."""
        if not self.options.enabled or self.said_no_samples:
            return []
        if loop.model_cfg.kind != CHAR:
            self.log(f"samples: the {loop.model_cfg.kind!r} kind has no step model; none are drawn")
            self.said_no_samples = True
            return []
        if self.sampler is None:
            self.sampler = Sampler(loop.model_cfg, loop.data.vocab, self.options.chars,
                                   self.options.temperatures, loop.train_cfg.seed)
        return self.sampler.sample(loop.model)

    def record(self, metrics: dict[str, Any], step: int, texts: list[str]) -> None:
        """The samples in the log and as one line of samples.jsonl."""
        entry = {
            "epoch": metrics["epoch"], "step_in_epoch": metrics["step_in_epoch"],
            "epoch_progress": metrics["epoch_progress"], "global_step": step, "seed": self.sampler.seed,
            "prompt": self.sampler.prompt, "chars": self.options.chars,
            "samples": [{"temperature": t, "text": x} for t, x in zip(self.options.temperatures, texts)],
        }
        for sample in entry["samples"]:
            self.log(f"--- sample at temperature {sample['temperature']:g}:\n" + indent(sample["text"]))
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / SAMPLES_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def indent(text: str, prefix: str = "    ") -> str:
    """Every line of ``text`` after ``prefix`` (a sample set apart from the log lines around it)."""
    return "\n".join(prefix + line for line in text.split("\n"))

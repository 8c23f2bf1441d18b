"""The training loop: a custom ``strategy.run`` loop that works under any tf.distribute strategy.

Keras 3 ``model.fit`` fails under MultiWorkerMirroredStrategy with several workers (FACTS.md), so the
loop is written out: ``tf.GradientTape`` inside ``strategy.run``, the loss averaged over the *global*
batch, Adam with gradient clipping, exact validation loss (a sum over every held-out window, reduced
over replicas), best checkpoint by validation loss, early stopping, and a wall-clock budget that all
workers agree on. It knows nothing about Ray: where checkpoints go is the ``sink``'s business.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import keras
import numpy as np
import tensorflow as tf

from textgen import checkpoint as ckptlib
from textgen.config import CHAR, ModelConfig, TrainConfig
from textgen.errors import TextgenError
from textgen.model import build_model
from textgen.text import Vocab, load_corpus, split_ids
from textgen.windows import (
    Shard,
    per_replica_batch,
    steps_per_epoch,
    targets_per_window,
    train_dataset,
    val_dataset,
    val_steps,
)

LN2 = math.log(2.0)


class TrainingError(TextgenError):
    pass


@dataclass(frozen=True)
class TrainData:
    vocab: Vocab
    train_ids: np.ndarray  # (N_train,) int32
    val_ids: np.ndarray  # (N_val,) int32, the contiguous tail


def prepare_data(
    corpus: Sequence[str | Path] | None, model_cfg: ModelConfig, train_cfg: TrainConfig
) -> TrainData:
    """Corpus -> vocabulary (from the whole text, as in the notebook) -> ids -> train/val split."""
    text = load_corpus(corpus, lowercase=train_cfg.lowercase).text
    vocab = Vocab.from_text(text)
    ids = vocab.encode(text)
    train_ids, val_ids = split_ids(ids, train_cfg.val_fraction, model_cfg.seq_len)
    steps_per_epoch(len(train_ids), model_cfg, train_cfg.batch_size)  # fail now, not on a worker
    return TrainData(vocab, train_ids, val_ids)


class Sink(Protocol):
    """Where epoch results go. ``is_chief`` decides who writes; every process calls ``epoch_end``."""

    def epoch_end(self, metrics: dict[str, Any], save: Callable[[Path], Path], improved: bool) -> None: ...


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, seed: int) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "seed": seed,
            "history": self.history,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: ckptlib.Checkpoint) -> RunState:
        s = ckpt.state
        best = s.get("best_val_loss")
        return cls(
            epoch=int(s["epoch"]),
            best_val_loss=math.inf if best is None else float(best),
            best_epoch=int(s.get("best_epoch", 0)),
            bad_epochs=int(s.get("bad_epochs", 0)),
            history=list(s.get("history", [])),
        )


def default_strategy() -> tf.distribute.Strategy:
    """One process: mirror over the local GPUs if there are several, else the default strategy."""
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def make_optimizer(cfg: TrainConfig, num_replicas: int) -> keras.optimizers.Optimizer:
    # Keras 3 clips each replica's gradient before the all-reduce. Each replica's gradient is its
    # 1/N share of the global-batch gradient, so clipping each at clipnorm/N bounds the summed
    # update's norm by clipnorm (triangle inequality) and equals global clipping for one replica.
    clip = None if cfg.clipnorm is None else cfg.clipnorm / num_replicas
    opt = keras.optimizers.Adam(cfg.learning_rate, global_clipnorm=clip)
    if cfg.mixed_precision:
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def _per_example_loss(kind: str, y, out):
    """(B,) loss per window: mean over positions for ``char``, the single target for ``notebook``."""
    if kind == CHAR:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(y, tf.int32), out)  # (B, T)
        return tf.reduce_mean(ce, axis=-1)
    return keras.losses.sparse_categorical_crossentropy(y, out)  # (B,)


def _summed_loss(kind: str, y, out):
    """(B,) loss summed over every target of the window (for exact per-character averages)."""
    if kind == CHAR:
        return tf.reduce_sum(
            tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(y, tf.int32), out), axis=-1
        )
    return keras.losses.sparse_categorical_crossentropy(y, out)


class Steps:
    """The compiled train and validation steps for one model/optimizer/strategy."""

    def __init__(self, model, optimizer, strategy, kind: str, global_batch: int, mixed: bool):
        self.strategy = strategy

        def train_replica(x, y):
            with tf.GradientTape() as tape:
                out = model(x, training=True)
                loss = tf.nn.compute_average_loss(
                    _per_example_loss(kind, y, out), global_batch_size=global_batch
                )
                scaled = optimizer.scale_loss(loss) if mixed else loss
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        def val_replica(x, y, w):
            out = model(x, training=False)
            return tf.reduce_sum(_summed_loss(kind, y, out) * w), tf.reduce_sum(w)

        @tf.function
        def train_step(iterator):
            loss = strategy.run(train_replica, args=next(iterator))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)

        @tf.function
        def val_step(iterator):
            total, count = strategy.run(val_replica, args=next(iterator))
            sum_ = tf.distribute.ReduceOp.SUM
            return strategy.reduce(sum_, total, axis=None), strategy.reduce(sum_, count, axis=None)

        @tf.function
        def any_true(flag):
            # Every worker must stop at the same step or the next all-reduce hangs: stop if any says so.
            per_replica = strategy.run(lambda: tf.cast(flag, tf.int32))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None) > 0

        @tf.function
        def replica_spread():
            # Data parallelism must keep every replica's weights identical. A float64 sum of squares
            # per replica, gathered from all of them: max - min is 0.0 when they agree (checked
            # every epoch and reported, so a diverged replica cannot go unnoticed).
            def fingerprint():
                return tf.reshape(tf.add_n([
                    tf.reduce_sum(tf.square(tf.cast(v, tf.float64))) for v in model.trainable_variables
                ]), [1])

            every = strategy.gather(strategy.run(fingerprint), axis=0)
            return tf.reduce_max(every) - tf.reduce_min(every)

        self.train_step, self.val_step, self.any_true = train_step, val_step, any_true
        self.replica_spread = replica_spread


def _distribute(strategy, make: Callable[[Shard], tf.data.Dataset]):
    def fn(ctx: tf.distribute.InputContext):
        replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
        return make(Shard(ctx.input_pipeline_id, ctx.num_input_pipelines, replicas))

    return strategy.distribute_datasets_from_function(fn)


@dataclass
class Summary:
    best_val_loss: float
    best_val_bpc: float
    best_epoch: int
    epochs: int
    train_chars_per_s: float
    stopped_by: str
    elapsed_s: float
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("history")
        return d


def fit(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: TrainData,
    sink: Sink,
    *,
    strategy: tf.distribute.Strategy | None = None,
    resume_from: ckptlib.Checkpoint | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch_start: Callable[[int], None] | None = None,
) -> Summary:
    """Train until ``epochs``, early stopping or the wall-clock budget; report every epoch to ``sink``."""
    t_start = time.monotonic()
    strategy = strategy or default_strategy()
    n_replicas = strategy.num_replicas_in_sync
    gb = train_cfg.batch_size
    per_replica_batch(gb, Shard(0, 1, n_replicas))  # clear error if not divisible
    keras.utils.set_random_seed(train_cfg.seed)
    vocab_size = data.vocab.size

    with strategy.scope():
        model = build_model(model_cfg, vocab_size, mixed_precision=train_cfg.mixed_precision)
        optimizer = make_optimizer(train_cfg, n_replicas)
        optimizer.build(model.trainable_variables)
        state = RunState()
        if resume_from is not None:
            ckptlib.load_weights_into(model, resume_from)
            if resume_from.has_optimizer:
                ckptlib.restore_optimizer(resume_from, optimizer, model.trainable_variables)
            state = RunState.from_checkpoint(resume_from)
            log(f"resumed from {resume_from.path} after epoch {state.epoch} "
                f"(best val_loss {state.best_val_loss:.4f} at epoch {state.best_epoch})")
    steps = Steps(model, optimizer, strategy, model_cfg.kind, gb, train_cfg.mixed_precision)
    n_steps = steps_per_epoch(len(data.train_ids), model_cfg, gb)
    chars_per_step = gb * targets_per_window(model_cfg)
    budget_s = None if train_cfg.max_minutes is None else train_cfg.max_minutes * 60.0
    n_val_steps = val_steps(len(data.val_ids), model_cfg, gb)
    val_ds = None  # built once, after the first training epoch has traced the train step

    def out_of_time() -> bool:
        return budget_s is not None and time.monotonic() - t_start > budget_s

    stopped_by = "epochs"
    train_time, train_chars = 0.0, 0
    if state.bad_epochs >= train_cfg.patience:
        stopped_by = "early_stopping"
    while stopped_by == "epochs" and state.epoch < train_cfg.epochs:
        epoch = state.epoch + 1
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        ds = _distribute(
            strategy,
            lambda shard: train_dataset(
                data.train_ids, model_cfg, vocab_size, gb, epoch, train_cfg.seed, shard
            ),
        )
        it = iter(ds)
        bar = _progress(progress, n_steps, epoch, train_cfg.epochs)
        t0 = time.monotonic()
        loss_sum, done = 0.0, 0
        for _ in range(n_steps):
            loss = float(steps.train_step(it))
            if not math.isfinite(loss):
                raise TrainingError(
                    f"training loss became {loss} at epoch {epoch}; lower --learning-rate or --clipnorm "
                    "(the last good epoch is saved; --resume continues from it)"
                )
            loss_sum += loss
            done += 1
            if bar is not None:
                bar.update(1)
                if done % 10 == 0 or done == n_steps:
                    rate = done * chars_per_step / (time.monotonic() - t0)
                    bar.set_postfix(loss=f"{loss_sum / done:.3f}", chars_s=f"{rate:,.0f}", refresh=False)
            if budget_s is not None and bool(steps.any_true(tf.constant(out_of_time()))):
                stopped_by = "max_minutes"
                break
        if bar is not None:
            bar.close()
        epoch_time = time.monotonic() - t0
        train_time += epoch_time
        train_chars += done * chars_per_step

        if val_ds is None:
            val_ds = _distribute(
                strategy, lambda shard: val_dataset(data.val_ids, model_cfg, vocab_size, gb, shard)[0]
            )
        val_loss = _evaluate(steps, val_ds, n_val_steps, targets_per_window(model_cfg))

        improved = val_loss < state.best_val_loss
        state.epoch = epoch
        if improved:
            state.best_val_loss, state.best_epoch, state.bad_epochs = val_loss, epoch, 0
        else:
            state.bad_epochs += 1
        metrics = {
            "epoch": epoch,
            "loss": loss_sum / max(done, 1),
            "val_loss": val_loss,
            "val_bpc": val_loss / LN2,
            "chars_per_s": done * chars_per_step / max(epoch_time, 1e-9),
            "steps": done,
            "partial": done < n_steps,
            "epoch_time_s": epoch_time,
            "elapsed_s": time.monotonic() - t_start,
            "best_val_loss": state.best_val_loss,
            "best_epoch": state.best_epoch,
            "replicas": n_replicas,
            "replica_weight_spread": float(steps.replica_spread()),
        }
        state.history.append(metrics)
        log(
            f"epoch {epoch}/{train_cfg.epochs}: loss {metrics['loss']:.4f}, val_loss {val_loss:.4f} nats "
            f"({metrics['val_bpc']:.3f} bpc), {metrics['chars_per_s']:,.0f} chars/s"
            + (" [best]" if improved else "")
        )

        def save(path: Path, metrics=metrics) -> Path:
            return ckptlib.save_checkpoint(
                path, model, optimizer, model_cfg, train_cfg, data.vocab,
                {**metrics, "history": state.history}, state.to_dict(train_cfg.seed),
            )

        sink.epoch_end(metrics, save, improved)
        if stopped_by == "epochs" and state.bad_epochs >= train_cfg.patience:
            stopped_by = "early_stopping"
        elif stopped_by == "epochs" and budget_s is not None and bool(steps.any_true(tf.constant(out_of_time()))):
            stopped_by = "max_minutes"

    return Summary(
        best_val_loss=state.best_val_loss,
        best_val_bpc=state.best_val_loss / LN2,
        best_epoch=state.best_epoch,
        epochs=state.epoch,
        train_chars_per_s=train_chars / train_time if train_time else 0.0,
        stopped_by=stopped_by,
        elapsed_s=time.monotonic() - t_start,
        history=state.history,
    )


def _evaluate(steps: Steps, val_ds, val_steps: int, targets: int) -> float:
    """Mean loss per target character over every validation window (nats)."""
    it = iter(val_ds)
    total, count = 0.0, 0.0
    for _ in range(val_steps):
        t, c = steps.val_step(it)
        total += float(t)
        count += float(c)
    return total / (count * targets)


def _progress(enabled: bool, total: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: a bar on a terminal, none in logs (the per-epoch line is printed either way).
    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, mininterval=1.0, disable=None)


class LocalSink:
    """Single-process output directory:

        <out>/last/         checkpoint of the latest epoch (what --resume continues from)
        <out>/best/         checkpoint with the lowest validation loss
        <out>/metrics.jsonl one JSON line per epoch
        <out>/loss.png      train and validation loss curves (written by ``finish``)
    """

    def __init__(self, out: str | Path, is_chief: bool = True):
        self.out = Path(out)
        self.is_chief = is_chief

    @property
    def best(self) -> Path:
        return self.out / "best"

    @property
    def last(self) -> Path:
        return self.out / "last"

    def epoch_end(self, metrics: dict[str, Any], save: Callable[[Path], Path], improved: bool) -> None:
        if not self.is_chief:
            return
        import json

        self.out.mkdir(parents=True, exist_ok=True)
        save(self.last)
        if improved:
            save(self.best)
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")

    def finish(self, history: list[dict[str, Any]]) -> Path | None:
        if not self.is_chief or not history:
            return None
        return plot_history(history, self.out / "loss.png")


def plot_history(history: list[dict[str, Any]], path: Path) -> Path:
    """Train and validation loss per epoch as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [m["loss"] for m in history], marker="o", label="train")
    ax.plot(epochs, [m["val_loss"] for m in history], marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats / char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path

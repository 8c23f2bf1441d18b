"""The training loop: a custom ``strategy.run`` loop that works under any tf.distribute strategy.

Keras 3 ``model.fit`` fails under MultiWorkerMirroredStrategy with several workers, so the loop is
written out: ``tf.GradientTape`` inside ``strategy.run``, the loss averaged over the *global* batch,
Adam with gradient clipping, exact validation loss (a sum over the held-out windows -- every one,
or a fixed sample of ``val_chars`` target characters of a large split -- reduced over replicas),
best checkpoint by validation loss, early stopping, and a wall-clock budget that all workers agree
on. Evaluations (validate, report, checkpoint) come at every epoch's end and, with
``eval_every_steps`` / ``eval_every_minutes``, within epochs; a checkpoint taken within an epoch
resumes at its step. The data is a prepared dataset (``textgen.dataset``): memory-mapped shards,
never the corpus in memory. It knows nothing about Ray: where checkpoints go is the ``sink``'s
business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

import keras
import numpy as np
import tensorflow as tf

from textgen import checkpoint as ckptlib
from textgen import finetune
from textgen.config import NOTEBOOK, ModelConfig, TrainConfig
from textgen.dataset import locate
from textgen.errors import RunFailed
from textgen.files import atomic_write
from textgen.model import build_model
from textgen.prepare import PrepareOptions
from textgen.text import CorpusError, Vocab, check_split_sizes
from textgen.windows import (
    Shard,
    per_replica_batch,
    steps_per_epoch,
    targets_per_window,
    train_dataset,
    val_dataset,
    val_starts,
    val_steps,
)

LN2 = math.log(2.0)


class TrainingError(RunFailed):
    """The training loss became non-finite: the run diverged (its input was fine)."""


@dataclass(frozen=True)
class TrainData:
    vocab: Vocab
    train_ids: tuple[np.ndarray, ...]  # the training shards (read-only memory maps)
    val_ids: tuple[np.ndarray, ...]  # the held-out shards
    source: str = ""  # the prepared directory they are read from
    lowercase: bool = True
    val_fraction: float = 0.1

    @property
    def train_lengths(self) -> list[int]:
        return [len(p) for p in self.train_ids]

    @property
    def val_lengths(self) -> list[int]:
        return [len(p) for p in self.val_ids]

    @property
    def n_train(self) -> int:
        return sum(self.train_lengths)

    @property
    def n_val(self) -> int:
        return sum(self.val_lengths)


def prepare_data(
    corpus: Sequence[str | Path] | None, model_cfg: ModelConfig, train_cfg: TrainConfig, *,
    data: str | Path | None = None, max_vocab: int | None = None, min_count: int = 1,
    progress: bool = False, log: Callable[[str], None] = lambda s: None, base_vocab: Sequence[str] = (),
) -> TrainData:
    """A prepared dataset (``data``: a directory or a URI), or the corpus prepared into the cache
    (the bundled one when both are empty): vocabulary and memory-mapped train/val shards. A corpus
    is prepared with ``base_vocab`` (``textgen.finetune.base_vocab``) in its vocabulary."""
    opts = PrepareOptions(lowercase=train_cfg.lowercase, val_fraction=train_cfg.val_fraction,
                          max_vocab=max_vocab, min_count=min_count, base_vocab=tuple(base_vocab))
    ds = locate(data, corpus, opts, progress=progress, log=log)
    out = TrainData(ds.vocab, ds.train, ds.val, str(ds.path), ds.lowercase, ds.val_fraction)
    check_fits(out, model_cfg, train_cfg)
    return out


def check_fits(data: TrainData, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """Both splits make windows and the training split at least one batch: fail now, not on a worker."""
    check_split_sizes(data.n_train + data.n_val, data.n_val, data.val_fraction, model_cfg.seq_len)
    if not len(val_starts(data.val_lengths, model_cfg)):
        raise CorpusError(
            f"the held-out split ({data.n_val} characters) makes no window of {model_cfg.seq_len + 1}: every "
            "file's held-out tail is shorter; use longer files, a larger --val-fraction or a smaller --seq-len"
        )
    steps_per_epoch(data.train_lengths, model_cfg, train_cfg.batch_size)


def settle_train_config(train_cfg: TrainConfig, data: TrainData, val_fraction: float | None,
                        lowercase: bool | None) -> TrainConfig:
    """The run's config with the dataset's split and case (what the checkpoint records); a flag
    given explicitly that contradicts the dataset is refused."""
    for flag, given, actual in (("--val-fraction", val_fraction, data.val_fraction),
                                ("--no-lowercase", None if lowercase is None else not lowercase, not data.lowercase)):
        if given is not None and given != actual:
            raise CorpusError(f"{flag} contradicts the prepared dataset {data.source} ({flag} {actual}); "
                              "prepare it again with that option, or drop the flag")
    return dataclasses.replace(train_cfg, val_fraction=data.val_fraction, lowercase=data.lowercase)


class Sink(Protocol):
    """Where epoch results go. ``is_chief`` decides who writes; every process calls ``epoch_end``."""

    def epoch_end(self, metrics: dict[str, Any], save: Callable[[Path], Path], improved: bool) -> None: ...


class Observer(Protocol):
    """What the chief does after every evaluation besides reporting: samples and TensorBoard
    (``textgen.observe.RunObserver``); only the chief has one."""

    def evaluated(self, loop: Loop, metrics: dict[str, Any]) -> None: ...


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    step: int = 0  # steps already trained of the next epoch (a checkpoint taken within an epoch)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    history: list[dict[str, Any]] = field(default_factory=list)
    init_from: dict[str, Any] | None = None  # a fine-tuning run's start (``finetune.origin``)

    def to_dict(self, seed: int) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "seed": seed,
            "history": self.history,
            "init_from": self.init_from,
        }

    def record(self, epoch: int, val_loss: float, step: int = 0) -> bool:
        """Count an evaluation: at the end of ``epoch`` (``step`` 0), or after ``step`` of its steps;
        True when its validation loss is the best so far. Early stopping counts evaluations."""
        self.epoch, self.step = (epoch, 0) if step == 0 else (epoch - 1, step)
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @classmethod
    def from_checkpoint(cls, ckpt: ckptlib.Checkpoint) -> RunState:
        s = ckpt.state
        best = s.get("best_val_loss")
        return cls(
            epoch=int(s["epoch"]),
            step=int(s.get("step", 0)),
            best_val_loss=math.inf if best is None else float(best),
            best_epoch=int(s.get("best_epoch", 0)),
            bad_epochs=int(s.get("bad_epochs", 0)),
            history=list(s.get("history", [])),
            init_from=s.get("init_from"),
        )


def default_strategy() -> tf.distribute.Strategy:
    """One process: mirror over the local GPUs if there are several, else the default strategy."""
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def make_optimizer(cfg: TrainConfig, num_replicas: int) -> keras.optimizers.Optimizer:
    """Adam with decoupled weight decay (AdamW) of everything but the biases, global-norm clipping,
    and with ``ema_momentum`` an exponential moving average of the weights (``Averages``)."""
    # Keras 3 clips each replica's gradient before the all-reduce. Each replica's gradient is its
    # 1/N share of the global-batch gradient, so clipping each at clipnorm/N bounds the summed
    # update's norm by clipnorm (triangle inequality) and equals global clipping for one replica.
    clip = None if cfg.clipnorm is None else cfg.clipnorm / num_replicas
    opt = keras.optimizers.Adam(
        cfg.learning_rate, global_clipnorm=clip, weight_decay=cfg.weight_decay or None,
        use_ema=cfg.ema_momentum > 0, ema_momentum=cfg.ema_momentum or 0.99,
    )
    if cfg.weight_decay:
        opt.exclude_from_weight_decay(var_names=["bias"])
    if cfg.mixed_precision:
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def scheduled_learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """The rate for global step ``step`` (from 0) when ``progress`` (0..1) of the budget is spent
    (``--epochs`` or ``--max-minutes``): a linear warm-up over ``warmup_steps``, then constant; or
    a cosine from the peak down to ``min_lr_fraction`` of it at the end of the budget; or "wsd"
    (warm-up, stable, decay): the peak until the last ``decay_fraction`` of the budget, then a
    linear decay to ``min_lr_fraction``."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    progress, floor = min(max(progress, 0.0), 1.0), cfg.min_lr_fraction
    if cfg.schedule == "cosine":
        shape = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule == "wsd":
        decayed = max(0.0, progress - (1.0 - cfg.decay_fraction)) / cfg.decay_fraction
        shape = 1.0 - (1.0 - floor) * decayed
    else:
        shape = 1.0
    return cfg.learning_rate * warm * shape


class Averages:
    """Swaps the model's weights with the optimizer's moving averages of them (Keras' ``use_ema``),
    on every replica: the averaged weights are the ones validated, sampled and checkpointed."""

    def __init__(self, model, optimizer):
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's Adam
        self.enabled = bool(getattr(inner, "use_ema", False))
        if not self.enabled:
            return
        pairs = list(zip(model.trainable_variables, inner._model_variables_moving_average))

        @tf.function
        def swap():
            for var, avg in pairs:
                held = tf.identity(var.value)
                var.assign(avg.value)
                avg.assign(held)

        self._swap = swap

    def swap(self) -> None:
        if self.enabled:
            self._swap()

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the duration (the training weights afterwards)."""
        self.swap()
        try:
            yield
        finally:
            self.swap()


Reduction = Literal["mean", "sum"]


def _cross_entropy(kind: str, y, out):
    """(B, targets) cross-entropy of every target of every window."""
    if kind == NOTEBOOK:  # probabilities (B, V), the one character after the window (B,)
        return keras.losses.sparse_categorical_crossentropy(y, out)[:, None]
    return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(y, tf.int32), out)  # logits (B, T, V)


def window_loss(kind: str, y, out, reduction: Reduction = "mean"):
    """(B,) loss per window: the mean over its targets (training), or their sum (exact per-character
    validation averages)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    reduce = tf.reduce_mean if reduction == "mean" else tf.reduce_sum
    return reduce(_cross_entropy(kind, y, out), axis=-1)


def _train_replica_fn(model, optimizer, kind: str, global_batch: int, mixed: bool):
    def train_replica(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.nn.compute_average_loss(window_loss(kind, y, out), global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss) if mixed else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return train_replica


def _replica_spread_fn(model, strategy):
    # Data parallelism must keep every replica's weights identical. A float64 sum of squares per
    # replica, gathered from all of them: max - min is 0.0 when they agree (checked every epoch and
    # reported, so a diverged replica cannot go unnoticed).
    def fingerprint():
        return tf.reshape(tf.add_n([
            tf.reduce_sum(tf.square(tf.cast(v, tf.float64))) for v in model.trainable_variables
        ]), [1])

    @tf.function
    def replica_spread():
        every = strategy.gather(strategy.run(fingerprint), axis=0)
        return tf.reduce_max(every) - tf.reduce_min(every)

    return replica_spread


class Steps:
    """The compiled train and validation steps for one model/optimizer/strategy."""

    def __init__(self, model, optimizer, strategy, kind: str, global_batch: int, mixed: bool):
        self.strategy = strategy
        sum_ = tf.distribute.ReduceOp.SUM
        train_replica = _train_replica_fn(model, optimizer, kind, global_batch, mixed)

        def val_replica(x, y, w):
            out = model(x, training=False)
            return tf.reduce_sum(window_loss(kind, y, out, "sum") * w), tf.reduce_sum(w)

        @tf.function
        def train_step(iterator):
            return strategy.reduce(sum_, strategy.run(train_replica, args=next(iterator)), axis=None)

        @tf.function
        def val_step(iterator):
            total, count = strategy.run(val_replica, args=next(iterator))
            return strategy.reduce(sum_, total, axis=None), strategy.reduce(sum_, count, axis=None)

        @tf.function
        def any_true(flag):
            # Every worker must stop at the same step or the next all-reduce hangs: stop if any says so.
            per_replica = strategy.run(lambda: tf.cast(flag, tf.int32))
            return strategy.reduce(sum_, per_replica, axis=None) > 0

        @tf.function
        def mean(value):
            # One value every worker agrees on (the budget spent: it sets the learning rate and the stop).
            per_replica = strategy.run(lambda: tf.cast(value, tf.float64))
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

        self.train_step, self.val_step, self.any_true, self.mean = train_step, val_step, any_true, mean
        self.replica_spread = _replica_spread_fn(model, strategy)


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


@dataclass
class Loop:
    """Everything one run's epochs share: configs, data, model, optimizer, compiled steps, clock."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data: TrainData
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    steps: Steps
    averages: Averages
    t_start: float  # monotonic time the run started (earlier than this process when resumed)
    val_ds: Any = None  # built once, after the first training epoch has traced the train step
    last_eval: float = 0.0  # monotonic time of the last evaluation (or of the start)
    time_spent: float = 0.0  # fraction of --max-minutes spent at the last check, agreed by every worker
    learning_rate: float = 0.0  # the rate of the last step
    observer: Observer | None = None  # the chief's samples and TensorBoard, after every evaluation

    @property
    def n_steps(self) -> int:
        return steps_per_epoch(self.data.train_lengths, self.model_cfg, self.train_cfg.batch_size)

    @property
    def chars_per_step(self) -> int:
        return self.train_cfg.batch_size * targets_per_window(self.model_cfg)

    def out_of_time(self) -> bool:
        """Whether the wall-clock budget is spent, agreed by every worker (a collective call when
        there is a budget: every worker calls it at the same points); updates ``time_spent``."""
        if self.train_cfg.max_minutes is None:
            return False
        spent = (time.monotonic() - self.t_start) / (self.train_cfg.max_minutes * 60.0)
        self.time_spent = float(self.steps.mean(tf.constant(spent, tf.float64)))
        return self.time_spent >= 1.0

    def set_learning_rate(self, epoch: int, step: int) -> None:
        """The schedule's rate for ``step`` of ``epoch``: its progress is the larger of the steps
        done of ``epochs`` and the time spent of ``max_minutes``."""
        done = (epoch - 1) * self.n_steps + step
        progress = max(done / (self.train_cfg.epochs * self.n_steps), self.time_spent)
        self.learning_rate = scheduled_learning_rate(self.train_cfg, done, progress)
        self.optimizer.learning_rate = self.learning_rate

    def eval_due(self, epoch: int, done: int) -> bool:
        """Whether to evaluate after ``done`` steps of ``epoch`` (not at its end: that evaluation
        comes anyway), by --eval-every-steps (global step count) or --eval-every-minutes (agreed by
        every worker: a collective call at every step when set)."""
        cfg = self.train_cfg
        if done >= self.n_steps or (cfg.eval_every_steps is None and cfg.eval_every_minutes is None):
            return False
        due = cfg.eval_every_steps is not None and ((epoch - 1) * self.n_steps + done) % cfg.eval_every_steps == 0
        if cfg.eval_every_minutes is None:
            return due
        late = time.monotonic() - self.last_eval >= cfg.eval_every_minutes * 60.0
        return bool(self.steps.any_true(tf.constant(due or late)))

    def train_batches(self, epoch: int, skip: int = 0):
        """This epoch's training batches from step ``skip`` on, distributed over the replicas."""
        d, gb = self.data, self.train_cfg.batch_size
        return _distribute(self.strategy, lambda shard: train_dataset(
            d.train_ids, self.model_cfg, d.vocab.size, gb, epoch, self.train_cfg.seed, shard, skip))

    def val_batches(self):
        """Every validation window, distributed over the replicas (built once)."""
        if self.val_ds is None:
            d, gb = self.data, self.train_cfg.batch_size
            self.val_ds = _distribute(self.strategy, lambda shard: val_dataset(
                d.val_ids, self.model_cfg, d.vocab.size, gb, shard, self.train_cfg.val_chars)[0])
        return self.val_ds

    def saver(self, metrics: dict[str, Any], state: RunState) -> Callable[[Path], Path]:
        """Writes this epoch's checkpoint where the sink asks."""
        snapshot = {**state.to_dict(self.train_cfg.seed), "weights": "averaged" if self.averages.enabled else "trained"}

        def save(path: Path) -> Path:
            return ckptlib.save_checkpoint(path, self.model, self.optimizer, self.model_cfg, self.train_cfg,
                                           self.data.vocab, metrics, snapshot)

        return save


@dataclass(frozen=True)
class EpochResult:
    loss_sum: float  # summed over the steps (each the global-batch mean loss)
    steps: int  # trained in this call (from ``first_step`` on)
    time_s: float  # training time, without evaluations within the epoch
    out_of_time: bool  # the budget ran out before the last step
    first_step: int = 0  # steps of the epoch trained before (a run resumed within it)
    early_stopped: bool = False  # an evaluation within the epoch ended the run

    @property
    def step(self) -> int:
        """Steps of the epoch done."""
        return self.first_step + self.steps


def _build(model_cfg: ModelConfig, train_cfg: TrainConfig, data: TrainData, strategy, t_start: float,
           resume_from: ckptlib.Checkpoint | None, log: Callable[[str], None],
           init_from: ckptlib.Checkpoint | None = None) -> tuple[Loop, RunState]:
    """Model, optimizer and run state inside the strategy's scope, restored from ``resume_from``,
    else with the weights of ``init_from`` (fine-tuning: ``textgen.finetune``)."""
    n_replicas = strategy.num_replicas_in_sync
    per_replica_batch(train_cfg.batch_size, Shard(0, 1, n_replicas))  # clear error if not divisible
    init_from = None if resume_from is not None else init_from  # a fine-tuning run resumed continues
    if init_from is not None:
        finetune.check_model(init_from, model_cfg)
        finetune.check_data(init_from, data.vocab, data.lowercase, data.source)
        source = finetune.source_weights(init_from)  # before seeding: the new model starts as a fresh run's
    keras.utils.set_random_seed(train_cfg.seed)
    with strategy.scope():
        model = build_model(model_cfg, data.vocab.size, mixed_precision=train_cfg.mixed_precision)
        optimizer = make_optimizer(train_cfg, n_replicas)
        optimizer.build(model.trainable_variables)
        state = RunState()
        if resume_from is not None:
            ckptlib.load_weights_into(model, resume_from)
            if resume_from.has_optimizer:
                ckptlib.restore_optimizer(resume_from, optimizer, model.trainable_variables)
            state = RunState.from_checkpoint(resume_from)
            within = f" and {state.step} steps of epoch {state.epoch + 1}" if state.step else ""
            log(f"resumed from {resume_from.path} after epoch {state.epoch}{within} "
                f"(best val_loss {state.best_val_loss:.4f} at epoch {state.best_epoch})")
        elif init_from is not None:
            finetune.init_weights(model, source, init_from.vocab, data.vocab)
            state.init_from = finetune.origin(init_from)
            log(finetune.describe(init_from, data.vocab))
        averages = Averages(model, optimizer)
        if resume_from is not None:
            _restore_training_weights(resume_from, averages)
    steps = Steps(model, optimizer, strategy, model_cfg.kind, train_cfg.batch_size, train_cfg.mixed_precision)
    t_run = t_start - (state.history[-1].get("elapsed_s", 0.0) if state.history else 0.0)
    return Loop(model_cfg, train_cfg, data, strategy, model, optimizer, steps, averages, t_run,
                last_eval=t_start), state


def _restore_training_weights(ckpt: ckptlib.Checkpoint, averages: Averages) -> None:
    """A checkpoint of averaged weights keeps the training weights in the optimizer's average
    slots (``Loop.saver`` saves while they are swapped): swap them back to train on."""
    if ckpt.state.get("weights") == "averaged" and averages.enabled and ckpt.has_optimizer:
        averages.swap()


Midway = Callable[["EpochResult"], bool]  # an evaluation within an epoch; True: stop (early stopping)


def train_epoch(loop: Loop, epoch: int, progress: bool, skip: int = 0, midway: Midway | None = None) -> EpochResult:
    """One epoch of training steps from step ``skip`` on, or fewer when the budget runs out or an
    evaluation within it (``midway``, when ``loop.eval_due``) stops the run; a non-finite loss
    raises ``TrainingError``."""
    it = iter(loop.train_batches(epoch, skip))
    n_steps = loop.n_steps
    bar = _progress(progress, n_steps - skip, epoch, loop.train_cfg.epochs)
    t0, paused = time.monotonic(), 0.0
    loss_sum, done, out_of_time, early = 0.0, 0, False, False
    for _ in range(n_steps - skip):
        loop.set_learning_rate(epoch, skip + done)
        loss = float(loop.steps.train_step(it))
        if not math.isfinite(loss):
            raise TrainingError(
                f"training loss became {loss} at epoch {epoch}; lower --learning-rate or --clipnorm "
                "(the last good epoch is saved; --resume continues from it)"
            )
        loss_sum += loss
        done += 1
        if bar is not None:
            _show_progress(bar, done, n_steps - skip, loss_sum,
                           done * loop.chars_per_step / (time.monotonic() - t0 - paused))
        if loop.out_of_time():
            out_of_time = True
            break
        if midway is not None and loop.eval_due(epoch, skip + done):
            t_eval = time.monotonic()
            early = midway(EpochResult(loss_sum, done, t_eval - t0 - paused, False, skip))
            paused += time.monotonic() - t_eval
            if early:
                break
    if bar is not None:
        bar.close()
    return EpochResult(loss_sum, done, time.monotonic() - t0 - paused, out_of_time, skip, early)


def validate(loop: Loop) -> float:
    """Mean loss per target character over every validation window (nats)."""
    it = iter(loop.val_batches())
    total, count = 0.0, 0.0
    cfg = loop.train_cfg
    for _ in range(val_steps(loop.data.val_lengths, loop.model_cfg, cfg.batch_size, cfg.val_chars)):
        t, c = loop.steps.val_step(it)
        total += float(t)
        count += float(c)
    return total / (count * targets_per_window(loop.model_cfg))


def epoch_metrics(loop: Loop, epoch: int, result: EpochResult, val_loss: float, state: RunState) -> dict[str, Any]:
    """What one epoch reports (metrics.jsonl, metrics.json, Ray), after ``state`` has recorded it."""
    return {
        "epoch": epoch,
        "loss": result.loss_sum / max(result.steps, 1),
        "val_loss": val_loss,
        "val_bpc": val_loss / LN2,
        "chars_per_s": result.steps * loop.chars_per_step / max(result.time_s, 1e-9),
        "steps": result.steps,
        "partial": result.step < loop.n_steps,
        "step_in_epoch": result.step,
        "epoch_progress": epoch - 1 + result.step / loop.n_steps,
        "epoch_time_s": result.time_s,
        "elapsed_s": time.monotonic() - loop.t_start,
        "best_val_loss": state.best_val_loss,
        "best_epoch": state.best_epoch,
        "learning_rate": loop.learning_rate,
        "replicas": loop.strategy.num_replicas_in_sync,
        "replica_weight_spread": float(loop.steps.replica_spread()),
    }


def _epoch_line(metrics: dict[str, Any], epochs: int, improved: bool, n_steps: int) -> str:
    within = f" step {metrics['step_in_epoch']}/{n_steps}" if metrics["step_in_epoch"] < n_steps else ""
    return (
        f"epoch {metrics['epoch']}/{epochs}{within}: loss {metrics['loss']:.4f}, val_loss {metrics['val_loss']:.4f} "
        f"nats ({metrics['val_bpc']:.3f} bpc), {metrics['chars_per_s']:,.0f} chars/s"
        + (" [best]" if improved else "")
    )


def evaluate(loop: Loop, state: RunState, sink: Sink, epoch: int, result: EpochResult,
             log: Callable[[str], None], within: bool = False) -> None:
    """Validate, record, log and hand the metrics and a checkpoint to the sink: at the end of an
    epoch, or ``within`` it (then the state says how many of its steps are done)."""
    with loop.averages.applied():
        val_loss = validate(loop)
        improved = state.record(epoch, val_loss, result.step if within else 0)
        metrics = epoch_metrics(loop, epoch, result, val_loss, state)
        state.history.append(metrics)
        log(_epoch_line(metrics, loop.train_cfg.epochs, improved, loop.n_steps))
        sink.epoch_end(metrics, loop.saver(metrics, state), improved)
        if loop.observer is not None:  # with the averaged weights validated and saved: the sample shows them
            loop.observer.evaluated(loop, metrics)
    loop.last_eval = time.monotonic()


def _stop_reason(loop: Loop, state: RunState, result: EpochResult | None = None) -> str:
    """Why training stops after this epoch, or "epochs" while it goes on (or ran all its epochs)."""
    if result is not None and result.out_of_time:
        return "max_minutes"
    if state.bad_epochs >= loop.train_cfg.patience:
        return "early_stopping"
    if loop.out_of_time():
        return "max_minutes"
    return "epochs"


def fit(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data: TrainData,
    sink: Sink,
    *,
    strategy: tf.distribute.Strategy | None = None,
    resume_from: ckptlib.Checkpoint | None = None,
    init_from: ckptlib.Checkpoint | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch_start: Callable[[int], None] | None = None,
    observer: Observer | None = None,
) -> Summary:
    """Train until ``epochs``, early stopping or the wall-clock budget; report every epoch to ``sink``.
    ``init_from``: a new run from that checkpoint's weights (``textgen.finetune``; ignored when resuming)."""
    t_start = time.monotonic()
    loop, state = _build(model_cfg, train_cfg, data, strategy or default_strategy(), t_start, resume_from, log,
                         init_from)
    loop.observer = observer
    train_time, train_chars = 0.0, 0
    stopped_by = _stop_reason(loop, state)
    if stopped_by == "max_minutes":
        log(f"this run has spent its budget of {train_cfg.max_minutes:g} minutes; give a larger --max-minutes "
            "to train it on")
    while stopped_by == "epochs" and state.epoch < train_cfg.epochs:
        epoch, skip = state.epoch + 1, state.step
        if on_epoch_start is not None:
            on_epoch_start(epoch)

        def midway(partial: EpochResult, epoch: int = epoch) -> bool:
            evaluate(loop, state, sink, epoch, partial, log, within=True)
            return state.bad_epochs >= train_cfg.patience

        result = train_epoch(loop, epoch, progress, skip, midway)
        train_time += result.time_s
        train_chars += result.steps * loop.chars_per_step
        if result.early_stopped:
            stopped_by = "early_stopping"
            break
        evaluate(loop, state, sink, epoch, result, log)
        stopped_by = _stop_reason(loop, state, result)
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


def _progress(enabled: bool, total: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: a bar on a terminal, none in logs (the per-epoch line is printed either way).
    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, mininterval=1.0, disable=None)


def _show_progress(bar, done: int, total: int, loss_sum: float, chars_per_s: float) -> None:
    bar.update(1)
    if done % 10 == 0 or done == total:
        bar.set_postfix(loss=f"{loss_sum / done:.3f}", chars_s=f"{chars_per_s:,.0f}", refresh=False)


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

    epochs = [m.get("epoch_progress", m["epoch"]) for m in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [m["loss"] for m in history], marker="o", label="train")
    ax.plot(epochs, [m["val_loss"] for m in history], marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats / char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return atomic_write(path, png.getvalue())

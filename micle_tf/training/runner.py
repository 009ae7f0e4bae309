"""The runner core that pretraining and fine-tuning share.

Both runs do the same things around their model: seed everything, set the precision policy,
create the distribution strategy, compile a warmup + cosine optimizer, resume from the newest
checkpoint (or load starting weights), train the schedule in epoch segments with the same
callbacks, and write a summary with the same core fields. `Run` does those once;
`pretrain.run_pretraining` and `finetune.run_finetuning` add only their model, data, callbacks
and summary fields.

Exact resume: a Keras "epoch" is `steps_per_epoch` batches, checkpoints are taken at epoch
ends, and the data of epoch e depends only on (seed, e) (the reader's streams), so a resumed
run sees the same batches as an uninterrupted one.
"""
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from micle_tf import config as config_lib, rundir
from micle_tf.optimizers import WarmupCosineDecay, build_optimizer, scale_learning_rate
from micle_tf.training import callbacks as cb
from micle_tf.training.checkpoints import CheckpointState
from micle_tf.training.distribute import (create_strategy, is_chief, prepare_keras_fit,
                                         set_mixed_precision)


def seed_everything(seed):
    """Python, NumPy and TF global seeds. The TF global seed is seed + 1 because TF's seed
    helper fails on a global seed of 0 combined with the tensor-valued shuffle seeds of the
    reader's per-epoch streams."""
    keras.utils.set_random_seed(seed + 1)


class StepTimer(keras.callbacks.Callback):
    """Per-step wall times (epoch-end work such as validation and checkpoints excluded)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t)

    def steady_state(self, skip=3):
        times = self.times[skip:] if len(self.times) > skip + 2 else self.times
        return float(np.median(times)) if times else float("nan")


def plan_schedule(cfg, num_train_examples):
    """(steps_per_epoch, total_steps, warmup_steps) for a config and a training set size."""
    spe = cfg.steps_per_epoch or max(1, num_train_examples // cfg.batch_size)
    total = cfg.train_steps if cfg.train_steps else int(cfg.train_epochs * spe)
    if total <= 0:
        raise ValueError("nothing to train: train_steps/train_epochs give 0 steps")
    warmup = min(total, int(round(cfg.warmup_epochs * spe)))
    return spe, total, warmup


def segments(start, spe, total):
    """Splits steps [start, total) into fit() calls of equal-length epochs:
    [(first_epoch, num_epochs, steps_per_epoch)]. A finished run gets none (fit with
    steps_per_epoch=0 would never end)."""
    if start >= total:
        return []
    segs = []
    epoch, offset = divmod(start, spe)
    if offset:  # resumed mid-epoch (schedule changed): finish that epoch
        steps = min(spe - offset, total - start)
        segs.append((epoch, 1, steps))
        start += steps
        epoch += 1
    full = (total - start) // spe
    if full:
        segs.append((epoch, full, spe))
        epoch += full
    rem = total - start - full * spe
    if rem:
        segs.append((epoch, 1, rem))
    return segs


def fit_segments(model, make_data, segs, callbacks, guard, last_checkpoint, verbose=1,
                 should_stop=lambda: False, shard_check=None):
    """Runs `model.fit` once per schedule segment [(first_epoch, num_epochs, steps)] (see
    `segments`), each on `make_data(first_epoch)`. Returns the merged history.

    A non-finite loss (seen by `guard`) ends training with FloatingPointError naming the step
    and the last good checkpoint (`last_checkpoint()`). A truncated shard makes TF raise
    DataLossError naming a byte offset only: `shard_check()` (e.g. reader.verify_shards) is
    then called to name the file."""
    history = {}
    for first_epoch, num_epochs, steps in segs:
        if guard.triggered or should_stop() or steps <= 0:
            break
        try:
            h = model.fit(make_data(first_epoch), initial_epoch=first_epoch,
                          epochs=first_epoch + num_epochs, steps_per_epoch=steps,
                          callbacks=callbacks, verbose=verbose,
                          shuffle=False)  # the reader shuffles (seeded, per epoch)
        except tf.errors.DataLossError:
            if shard_check is not None:
                shard_check()
            raise
        for k, v in h.history.items():
            history.setdefault(k, []).extend(float(x) for x in v)
    if guard.triggered:
        raise FloatingPointError(
            f"non-finite loss at step {guard.step}; training stopped. The last good checkpoint "
            f"is {last_checkpoint() or 'none (no checkpoint was saved before the failure)'}. "
            "Lower the learning rate or check the input data.")
    return history


def last(history, key):
    """The last epoch's value of `key` in a Keras history dict (None when never logged)."""
    return (history.get(key) or [None])[-1]


def continued(previous, history):
    """`history` appended to the one of `previous` (an earlier invocation's summary, or None)."""
    merged = {k: list(v) for k, v in ((previous or {}).get("history") or {}).items()}
    for k, v in history.items():
        merged.setdefault(k, []).extend(v)
    return merged


class Run:
    """One training run into `cfg.model_dir` (a PretrainConfig or a FinetuneConfig).

    In this order: `Run(cfg)` seeds, sets the precision policy, creates the strategy (first:
    MultiWorkerMirroredStrategy must exist before other TF work) and the model_dir;
    `plan(n)` sets the schedule for n training examples; inside `run.strategy.scope()`,
    `compile(model)` then `restore(initialise)`; then `fit(...)` and `summary(...)`, which the
    chief `write`s. A runner that changes its config after `Run(cfg)` (fine-tuning resolves its
    architecture) assigns `run.cfg`."""

    def __init__(self, cfg):
        if not cfg.model_dir:
            raise ValueError(f"{type(cfg).__name__}.model_dir is required")
        seed_everything(cfg.seed)
        set_mixed_precision(cfg.mixed_precision)
        self.cfg = cfg
        self.strategy = create_strategy(cfg.strategy, cfg.tpu)
        self.chief = is_chief(self.strategy)
        self.guard = cb.NonFiniteGuard()
        self.timer = StepTimer()
        self.wall_seconds = 0.0
        # the batch of epoch-end evaluations (kNN monitor, validation)
        self.eval_batch_size = min(256, max(cfg.batch_size, 32))
        os.makedirs(cfg.model_dir, exist_ok=True)

    def plan(self, num_train_examples):
        cfg = self.cfg
        self.steps_per_epoch, self.total_steps, self.warmup_steps = plan_schedule(
            cfg, num_train_examples)
        self.peak_lr = scale_learning_rate(cfg.learning_rate, cfg.batch_size,
                                           cfg.learning_rate_scaling)

    def compile(self, model):
        """Inside strategy.scope(): the optimizer (warmup + cosine schedule) compiled in, every
        optimizer variable built, the Keras fit workarounds, and the resume checkpoints."""
        cfg = self.cfg
        schedule = WarmupCosineDecay(self.peak_lr, self.warmup_steps, self.total_steps)
        model.compile(optimizer=build_optimizer(cfg.optimizer, schedule, cfg.weight_decay,
                                                cfg.momentum))
        model.optimizer.build(model.trainable_variables)
        prepare_keras_fit(model, self.strategy)
        self.model = model
        self.state = CheckpointState(cfg.model_dir, model, model.optimizer,
                                     cfg.keep_checkpoints, chief=self.chief)
        return model

    def restore(self, initialise=None):
        """Resumes from the newest checkpoint, or else calls `initialise()`, which loads the
        starting weights and returns the checkpoint it read. Returns the resumed checkpoint
        or None; sets `start_step` and `init_checkpoint`."""
        self.restored = self.state.restore_latest()
        self.init_checkpoint = None
        if self.restored is None and initialise is not None:
            self.init_checkpoint = initialise()
        self.start_step = int(self.model.optimizer.iterations.numpy())
        return self.restored

    def previous_summary(self, filename):
        """The summary an earlier invocation of this resumed run wrote, when it ended exactly
        where this one resumed (so histories join without a gap); else None."""
        if not self.restored:
            return None
        previous = rundir.read_json(os.path.join(self.cfg.model_dir, filename))
        if previous is None or previous.get("final_step") != self.start_step:
            return None
        return previous

    def log_start(self, what):
        logging.info("%s: %d steps (%d per epoch, warmup %d), peak lr %.4g, global batch %d on "
                     "%d replica(s), starting at step %d", what, self.total_steps,
                     self.steps_per_epoch, self.warmup_steps, self.peak_lr, self.cfg.batch_size,
                     self.strategy.num_replicas_in_sync, self.start_step)

    def fit(self, make_data, callbacks=(), should_stop=lambda: False, shard_check=None):
        """Trains from `start_step` to the end of the schedule on `make_data(first_epoch)`;
        returns this invocation's history. The run's own `callbacks` go between the shared
        ones: the non-finite guard, step timer and learning-rate logger first; the checkpoint
        callback and (chief) TensorBoard last, so they see what the run's callbacks add to the
        epoch logs."""
        cfg = self.cfg
        callbacks = [self.guard, self.timer, cb.LearningRateLogger(), *callbacks,
                     cb.CheckpointCallback(self.state, self.guard)]
        if self.chief:
            callbacks.append(keras.callbacks.TensorBoard(
                os.path.join(cfg.model_dir, rundir.LOGS_SUBDIR), update_freq="epoch",
                write_graph=False))
        t0 = time.monotonic()
        history = fit_segments(
            self.model, make_data, segments(self.start_step, self.steps_per_epoch,
                                            self.total_steps),
            callbacks, self.guard, lambda: self.state.latest,
            verbose=cfg.verbose if self.chief else 0, should_stop=should_stop,
            shard_check=shard_check)
        self.wall_seconds = time.monotonic() - t0
        return history

    def summary(self, history, dataset, previous=None, **fields):
        """The summary every run writes (JSON-clean): schedule, final loss, history,
        throughput (median step time), wall time, peak learning rate, replicas, newest
        checkpoint, config, dataset facts and versions, then the run's own `fields`.
        `previous`: an earlier invocation's summary of this resumed run (its wall time is
        added, its throughput kept when this invocation trained no step)."""
        cfg, previous = self.cfg, previous or {}
        final_step = int(self.model.optimizer.iterations.numpy())
        trained = final_step > self.start_step
        step_time = self.timer.steady_state()
        summary = {
            "final_step": final_step,
            "train_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "resumed_from_step": self.start_step,
            "final_loss": last(history, "loss"),
            "history": history,
            "images_per_second": (cfg.batch_size / step_time if trained
                                  else previous.get("images_per_second")),
            "ms_per_step": step_time * 1000 if trained else previous.get("ms_per_step"),
            "wall_seconds": self.wall_seconds + float(previous.get("wall_seconds") or 0.0),
            "peak_learning_rate": self.peak_lr,
            "num_replicas": self.strategy.num_replicas_in_sync,
            "checkpoint": self.state.latest,
            "config": config_lib.to_dict(cfg),
            "dataset": dataset,
            "versions": rundir.versions(),
        }
        summary.update(fields)
        return rundir.clean(summary)

    def write(self, filename, obj):
        """model_dir/filename as clean JSON, written by the chief only."""
        if self.chief:
            rundir.write_json(os.path.join(self.cfg.model_dir, filename), obj)

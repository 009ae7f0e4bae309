"""Stage 1/2 of the recipe: SimCLR or MICLe pretraining from a PretrainConfig.

`run_pretraining(cfg)` builds the strategy, model, optimizer and per-replica datasets (from
case-bag records in `cfg.data_dir`, or from a prepared TFDS image dataset `cfg.tfds_name` in
`cfg.tfds_data_dir`, see `data_pipelines.tfds_source`), resumes
from the newest checkpoint in `cfg.model_dir` (or starts the encoder from `cfg.init_checkpoint`),
trains with `model.fit`, and writes `pretrain_summary.json` (with a `learning_health` block, see
`learning_health`). A Keras "epoch" is one pass over
the training cases (`steps_per_epoch` batches); checkpoints are taken at epoch ends and the data
of epoch e depends only on (seed, e), so a resumed run sees the same batches as an uninterrupted
one.
"""
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from data_pipelines import reader
from data_pipelines.writer import read_info, write_json_atomic
from micle_tf import __version__, augment, config as config_lib
from micle_tf.losses import chance_contrastive_accuracy, uniform_logits_loss
from micle_tf.models.contrastive import ContrastiveModel
from micle_tf.models.factory import build_encoder, build_projection_head
from micle_tf.optimizers import WarmupCosineDecay, build_optimizer, scale_learning_rate
from micle_tf.training import callbacks as cb
from micle_tf.training.checkpoints import CheckpointState, load_encoder_weights
from micle_tf.training.distribute import (create_strategy, is_chief, prepare_keras_fit,
                                         set_mixed_precision)

SUMMARY_FILE = "pretrain_summary.json"
CONFIG_FILE = "pretrain_config.json"


class StepTimer(keras.callbacks.Callback):
    """Per-step wall times (epoch-end work such as kNN and checkpoints excluded)."""

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


def plan_schedule(cfg, num_train_cases):
    """(steps_per_epoch, total_steps, warmup_steps) for a config and a training set size."""
    spe = cfg.steps_per_epoch or max(1, num_train_cases // cfg.batch_size)
    total = cfg.train_steps if cfg.train_steps else int(cfg.train_epochs * spe)
    if total <= 0:
        raise ValueError("nothing to train: train_steps/train_epochs give 0 steps")
    warmup = min(total, int(round(cfg.warmup_epochs * spe)))
    return spe, total, warmup


def build_pretraining_model(cfg, num_classes=0, task="multiclass"):
    """Model + optimizer, every variable created (call inside strategy.scope())."""
    encoder = build_encoder(cfg.model)
    head = build_projection_head(cfg.model)
    device_augment = cfg.augment if cfg.augment_placement == "device" else None
    model = ContrastiveModel(encoder, head, temperature=cfg.temperature, method=cfg.method,
                             num_classes=num_classes, task=task, device_augment=device_augment,
                             image_size=cfg.model.image_size,
                             color_jitter_strength=cfg.color_jitter_strength,
                             name=f"{cfg.method}_model")
    model.build_for(cfg.model.image_size)
    return model


def _segments(start, spe, total):
    """Splits steps [start, total) into fit() calls of equal-length epochs:
    [(first_epoch, num_epochs, steps_per_epoch)]."""
    segs = []
    epoch, offset = divmod(start, spe)
    if offset and start < total:  # resumed mid-epoch (schedule changed): finish that epoch
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


def seed_everything(seed):
    """Python, NumPy and TF global seeds. The TF global seed is seed + 1 because TF's seed
    helper fails on a global seed of 0 combined with the tensor-valued shuffle seeds of the
    reader's per-epoch streams."""
    keras.utils.set_random_seed(seed + 1)


def run_pretraining(cfg):
    """Trains and returns the summary dict (also written to model_dir/pretrain_summary.json)."""
    if cfg.method not in ("simclr", "micle"):
        raise ValueError(f"unknown --method {cfg.method!r} (simclr, micle)")
    aug = augment.build_augment(cfg.augment, cfg.model.image_size, cfg.augment_placement,
                                color_jitter_strength=cfg.color_jitter_strength,
                                crop_area_min=cfg.crop_area_min)
    if cfg.cache_decoded and cfg.tfds_name:
        raise ValueError("cache_decoded applies to micle-data records, not --tfds_name")
    seed_everything(cfg.seed)
    set_mixed_precision(cfg.mixed_precision)
    strategy = create_strategy(cfg.strategy, cfg.tpu)
    chief = is_chief(strategy)
    os.makedirs(cfg.model_dir, exist_ok=True)

    tfds_builder = None
    if cfg.tfds_name:  # stage 1 on a prepared TFDS image dataset: each image is its own case
        from data_pipelines import tfds_source
        tfds_builder = tfds_source.load_builder(cfg.tfds_name, cfg.tfds_data_dir)
        info = tfds_source.describe(tfds_builder)
    else:
        info = read_info(cfg.data_dir)
    split = info["splits"].get(cfg.train_split)
    if not split:
        raise ValueError(f"{cfg.tfds_name or cfg.data_dir} has no {cfg.train_split!r} split "
                         f"(splits: {sorted(info['splits'])})")
    labelled = bool(info["label_names"])
    spe, total, warmup = plan_schedule(cfg, split["cases"])
    peak_lr = scale_learning_rate(cfg.learning_rate, cfg.batch_size, cfg.learning_rate_scaling)
    probe_classes = len(info["label_names"]) if (cfg.linear_probe and labelled) else 0

    with strategy.scope():
        model = build_pretraining_model(cfg, probe_classes, info["task"])
        schedule = WarmupCosineDecay(peak_lr, warmup, total)
        optimizer = build_optimizer(cfg.optimizer, schedule, cfg.weight_decay, cfg.momentum)
        model.compile(optimizer=optimizer)
        model.optimizer.build(model.trainable_variables)
        prepare_keras_fit(model, strategy)
        state = CheckpointState(cfg.model_dir, model, model.optimizer, cfg.keep_checkpoints,
                                chief=chief)
        restored = state.restore_latest()
        if restored is None and cfg.init_checkpoint:
            load_encoder_weights(model.encoder, cfg.init_checkpoint)
    start = int(model.optimizer.iterations.numpy())
    logging.info("%s pretraining: %s, %d steps (%d per epoch, warmup %d), peak lr %.4g, "
                 "global batch %d on %d replica(s), starting at step %d", cfg.method,
                 cfg.model.backbone, total, spe, warmup, peak_lr, cfg.batch_size,
                 strategy.num_replicas_in_sync, start)
    if chief:
        write_json_atomic(os.path.join(cfg.model_dir, CONFIG_FILE),
                          {"config": config_lib.to_dict(cfg), "dataset": _dataset_facts(info)})

    def train_data(first_epoch):
        kwargs = dict(augment_fn=aug, seed=cfg.seed, steps_per_epoch=spe,
                      start_epoch=first_epoch)
        if tfds_builder is not None:
            return tfds_source.distributed_tfds_dataset(
                strategy, cfg.tfds_name, cfg.tfds_data_dir, cfg.train_split, cfg.method,
                cfg.batch_size, cfg.model.image_size, builder=tfds_builder, **kwargs)
        return reader.distributed_dataset(
            strategy, cfg.data_dir, cfg.train_split, cfg.method, cfg.batch_size,
            cfg.model.image_size, info=info, cache_decoded=cfg.cache_decoded, **kwargs)

    guard = cb.NonFiniteGuard()
    timer = StepTimer()
    callbacks = [guard, timer, cb.LearningRateLogger()]
    knn = None
    if cfg.knn_monitor and cfg.eval_split in info["splits"] and chief:
        eval_bs = min(256, max(cfg.batch_size, 32))

        def eval_ds(split_name):
            if tfds_builder is not None:
                return lambda: tfds_source.make_tfds_dataset(
                    cfg.tfds_name, cfg.tfds_data_dir, split_name, "supervised", eval_bs,
                    cfg.model.image_size, training=False, builder=tfds_builder)
            return lambda: reader.make_dataset(cfg.data_dir, split_name, "supervised", eval_bs,
                                               cfg.model.image_size, training=False, info=info)
        knn = cb.KnnMonitor(eval_ds(cfg.train_split) if labelled else None,
                            eval_ds(cfg.eval_split), info["task"])
        callbacks.append(knn)
    health = cb.LearningHealthMonitor(warmup, global_batch=cfg.batch_size)
    callbacks.append(health)   # before TensorBoard: it adds contrastive_accuracy_over_chance
    callbacks.append(cb.CheckpointCallback(state, guard))
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(cfg.model_dir, "logs"),
                                                     update_freq="epoch", write_graph=False))
    t0 = time.time()
    shard_check = None if cfg.tfds_name else (
        lambda: reader.verify_shards(cfg.data_dir, cfg.train_split, info=info, parse=False))
    history = cb.fit_segments(model, train_data, _segments(start, spe, total), callbacks, guard,
                              lambda: state.latest, verbose=cfg.verbose if chief else 0,
                              shard_check=shard_check)
    elapsed = time.time() - t0
    final_step = int(model.optimizer.iterations.numpy())
    steps_run = final_step - start
    step_time = timer.steady_state()
    summary = {
        "method": cfg.method,
        "final_step": final_step,
        "train_steps": total,
        "steps_per_epoch": spe,
        "resumed_from_step": start,
        "final_loss": history.get("loss", [None])[-1],
        "final_contrastive_accuracy": history.get("contrastive_accuracy", [None])[-1],
        "learning_health": learning_health(history, cfg.batch_size, warmup, final_step, health),
        "history": history,
        "knn_monitor": knn.history if knn else [],
        "images_per_second": (cfg.batch_size / step_time) if steps_run else None,
        "ms_per_step": step_time * 1000 if steps_run else None,
        "wall_seconds": elapsed,
        "peak_learning_rate": peak_lr,
        "num_replicas": strategy.num_replicas_in_sync,
        "checkpoint": state.latest,
        "config": config_lib.to_dict(cfg),
        "dataset": _dataset_facts(info),
        "versions": {"micle_tf": __version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__},
    }
    if chief:
        write_json_atomic(os.path.join(cfg.model_dir, SUMMARY_FILE), summary)
    return summary


def learning_health(history, global_batch, warmup_steps, final_step, monitor=None, factor=2.0):
    """The summary's `learning_health` block: is the contrastive task being learned?

    `global_batch` is B, the global batch (negatives are gathered across replicas): chance
    contrastive accuracy 1/(2B-1), and `uniform_loss` = 2 ln(2B-1), the contrastive loss for
    all-equal logits (`losses.nt_xent_loss` sums the two directions' mean cross-entropies over
    2B-1 candidates). The `final_*` values are the last epoch's means; `final_loss` is the
    CONTRASTIVE loss (the summary's top-level `final_loss` also includes a linear probe's loss).
    `learning` is final accuracy > `factor` x chance, judged only when the run ended after the
    warmup (else None, as when no epoch was trained). `warning` is the message the
    `LearningHealthMonitor` logged (the first post-warmup epoch within 2x chance), or, without a
    monitor, the same message when the final epoch is not learning; None otherwise.
    """
    chance = chance_contrastive_accuracy(global_batch)

    def last(key):
        values = history.get(key) or [None]
        return values[-1]

    acc = last("contrastive_accuracy")
    judged = acc is not None and final_step > warmup_steps and factor * chance < 1.0
    learning = bool(acc > factor * chance) if judged else None
    warning = monitor.warning if monitor is not None else None
    if warning is None and monitor is None and learning is False:
        warning = cb.not_learning_message(acc, chance, final_step, warmup_steps, factor)
    return {
        "global_batch": int(global_batch),
        "chance_contrastive_accuracy": chance,
        "uniform_loss": uniform_logits_loss(global_batch),
        "final_contrastive_accuracy": acc,
        "final_loss": last("contrastive_loss"),
        "accuracy_over_chance": None if acc is None else acc / chance,
        "final_alignment": last("alignment"),
        "final_uniformity": last("uniformity"),
        "learning": learning,
        "warning": warning,
    }


def _dataset_facts(info):
    return {k: info.get(k) for k in ("source", "task", "label_names", "num_cases", "num_images",
                                     "splits", "salt_fingerprint")}


def load_pretrain_config(model_dir):
    """The PretrainConfig a pretraining model_dir was trained with (to rebuild its encoder)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {model_dir} a micle-pretrain model_dir?")
    with open(path) as f:
        return config_lib.from_dict(config_lib.PretrainConfig, json.load(f)["config"])

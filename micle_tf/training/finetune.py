"""Stage 3 of the recipe: supervised fine-tuning (or linear evaluation) from a FinetuneConfig.

`run_finetuning(cfg)` builds a `ClassifierModel` whose encoder starts from a pretraining run
(`init_from` = a micle-pretrain model_dir), from a google-research/simclr checkpoint
(`imagenet_simclr:PATH`) or from scratch (`none`, the supervised baseline), trains it on a
label fraction of the training cases, validates at every epoch end, and keeps the best
checkpoint by validation AUC. It follows `run_pretraining`: epoch-seeded data streams, so a
re-run with the same model_dir resumes exactly at the last epoch boundary.

On-disk layout of a fine-tuning model_dir (a contract: micle-evaluate and micle-export read it):

  finetune_config.json   {"config": to_dict(FinetuneConfig) with the *effective* model config,
                          "dataset": {task, label_names, source, salt_fingerprint, num_cases,
                                      num_images, splits, data_dir, train_split}}
  train_cases.json       the hashed case ids trained on (label-fraction subset), for the
                         evaluator's leakage check
  checkpoints/           tf.train.Checkpoint(model=ClassifierModel, optimizer=...) per epoch
                         (resume; CheckpointState)
  best/                  tf.train.Checkpoint(model=ClassifierModel), the best epoch by val AUC
                         (max_to_keep=1) + best_state.json (metric, value, step, epoch, ...)
  finetune_summary.json  final/best validation metrics, steps, label fraction, data used, history
  logs/                  TensorBoard

Label fractions: `label_fraction` of the *labelled training cases* is drawn with
`data_pipelines.splits.label_fraction_subset(seed=cfg.seed)` (stratified by label, nested
across fractions for one seed); all images of a chosen case are used.
"""
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from data_pipelines import reader, splits
from data_pipelines.writer import read_info, write_json_atomic
from micle_tf import __version__, augment, config as config_lib
from micle_tf.models.classifier import ClassifierModel
from micle_tf.models.factory import build_encoder, build_projection_head
from micle_tf.optimizers import WarmupCosineDecay, build_optimizer, scale_learning_rate
from micle_tf.training import callbacks as cb
from micle_tf.training.checkpoints import CHECKPOINT_SUBDIR, CheckpointState, load_encoder_weights
from micle_tf.training.distribute import (create_strategy, is_chief, prepare_keras_fit,
                                         set_mixed_precision)
from micle_tf.training.pretrain import (CONFIG_FILE as PRETRAIN_CONFIG_FILE, StepTimer,
                                        _segments, load_pretrain_config, plan_schedule,
                                        seed_everything)

SUMMARY_FILE = "finetune_summary.json"
CONFIG_FILE = "finetune_config.json"
TRAIN_CASES_FILE = "train_cases.json"
BEST_SUBDIR = "best"
BEST_STATE_FILE = "best_state.json"

_TRAIN_SHUFFLE_BUFFER = 2048  # images (encoded bytes: decoding happens after the shuffle)


# ---------------------------------------------------------------------------------- helpers
def _clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if not math.isfinite(x) else x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def dataset_facts(info, data_dir=None, train_split=None):
    facts = {k: info.get(k) for k in ("task", "label_names", "source", "salt_fingerprint",
                                      "num_cases", "num_images", "splits")}
    if data_dir is not None:
        facts["data_dir"] = os.path.abspath(data_dir)
    if train_split is not None:
        facts["train_split"] = train_split
    return facts


def _stem_kind(image_size):
    return "small" if image_size is not None and image_size <= 64 else "standard"


def resolve_model_config(cfg):
    """The ModelConfig to fine-tune with.

    - a pretraining (or fine-tuning) model_dir: its architecture (backbone, width, SK, projection
      head, BN) is used whatever cfg.model says, because the weights must fit; the input size
      stays cfg.model.image_size when it uses the same ResNet stem (<= 64 px: small-image stem),
      else it is an error (the stem's kernels differ).
    - `imagenet_simclr:PATH` and `none`: cfg.model.
    """
    init = cfg.init_from or "none"
    if init == "none" or init.startswith("imagenet_simclr:"):
        return cfg.model
    if os.path.exists(os.path.join(init, PRETRAIN_CONFIG_FILE)):
        source = load_pretrain_config(init).model
    elif os.path.exists(os.path.join(init, CONFIG_FILE)):
        source = load_finetune_config(init)[0].model
    else:
        if not tf.io.gfile.exists(init):
            raise FileNotFoundError(f"--init_from {init!r}: no such directory (expected a "
                                    "micle-pretrain model_dir, imagenet_simclr:PATH or none)")
        logging.warning("%s has no %s: assuming its encoder matches the model flags", init,
                        PRETRAIN_CONFIG_FILE)
        return cfg.model
    if _stem_kind(source.image_size) != _stem_kind(cfg.model.image_size):
        raise ValueError(
            f"{init} was pretrained at {source.image_size} px ({_stem_kind(source.image_size)} "
            f"ResNet stem) but fine-tuning asks for {cfg.model.image_size} px "
            f"({_stem_kind(cfg.model.image_size)} stem); the stems' weights differ. Use an "
            f"image size on the same side of 64 px as pretraining.")
    model_cfg = dataclasses.replace(source, image_size=cfg.model.image_size)
    differs = {f.name: (getattr(cfg.model, f.name), getattr(model_cfg, f.name))
               for f in dataclasses.fields(model_cfg)
               if getattr(cfg.model, f.name) != getattr(model_cfg, f.name)}
    if differs:
        logging.info("architecture taken from the pretraining run %s (flag value -> used): %s",
                     init, differs)
    return model_cfg


def build_classifier(cfg, task, num_classes):
    """ClassifierModel for cfg (cfg.model must be the effective model config), every variable
    created. Call inside strategy.scope() when training."""
    encoder = build_encoder(cfg.model, cfg.fine_tune_after_block)
    head = build_projection_head(cfg.model) if cfg.ft_proj_selector > 0 else None
    model = ClassifierModel(encoder, num_classes=num_classes, task=task, projection_head=head,
                            ft_proj_selector=cfg.ft_proj_selector,
                            uncertainty_policy=cfg.uncertainty_policy,
                            label_smoothing=cfg.label_smoothing, name="classifier")
    model.build_for(cfg.model.image_size)
    return model


def select_training_cases(data_dir, split, fraction, seed, info=None):
    """The label-fraction subset of a split's labelled cases.

    Returns (case_ids or None when every labelled case is used, facts dict with
    num_labelled_cases, num_labelled_images, num_available_cases, fingerprint, case_ids)."""
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    index = reader.read_case_index(data_dir, split, info=info)
    labelled = [(cid, lab, n) for cid, lab, n in index if lab is not None]
    if not labelled:
        raise ValueError(f"split {split!r} of {data_dir} has no labelled cases to fine-tune on")
    chosen = splits.label_fraction_subset([c for c, _, _ in labelled],
                                          [lab for _, lab, _ in labelled], float(fraction),
                                          seed=seed)
    chosen_set = set(chosen)
    images = sum(n for cid, _, n in labelled if cid in chosen_set)
    facts = {
        "label_fraction": float(fraction),
        "seed": int(seed),
        "split": split,
        "num_available_cases": len(labelled),
        "num_labelled_cases": len(chosen),
        "num_labelled_images": int(images),
        "fingerprint": hashlib.sha256("\n".join(sorted(chosen)).encode()).hexdigest()[:16],
        "case_ids": sorted(chosen),
    }
    return (None if len(chosen) == len(labelled) else sorted(chosen)), facts


def make_predict_fn(model):
    """A tf.function images -> class probabilities (inference mode, float32)."""
    @tf.function
    def predict(images):
        return model.probabilities(model(images, training=False)["logits"])
    return predict


def predict_split(model, data_dir, split, image_size, batch_size=256, info=None, predict_fn=None,
                  labelled_only=True):
    """Image-level predictions of a split, no augmentation (resize only), in record order.

    Returns (case_ids [N] str, labels [N] or [N, C] int, probs [N, C] float32). Unlabelled
    images are skipped unless labelled_only=False."""
    predict_fn = predict_fn or make_predict_fn(model)
    ds = reader.make_dataset(data_dir, split, "supervised", batch_size, image_size,
                             training=False, labelled_only=labelled_only, info=info)
    cases, labels, probs = [], [], []
    for batch in ds:
        images = batch["image"]
        n = int(images.shape[0])
        if n < batch_size:  # pad the last batch: one traced shape (inference BN is per-row)
            images = tf.concat([images, tf.zeros([batch_size - n] + images.shape[1:].as_list(),
                                                 images.dtype)], 0)
        probs.append(predict_fn(images).numpy()[:n])
        labels.append(batch["label"].numpy())
        cases.append(batch["case_id"].numpy())
    if not probs:
        raise ValueError(f"split {split!r} of {data_dir} has no labelled images to predict")
    case_ids = np.array([c.decode() for c in np.concatenate(cases)], dtype=object)
    return case_ids, np.concatenate(labels).astype(np.int64), np.concatenate(probs)


# ------------------------------------------------------------------------- best checkpoint
class BestCheckpoint:
    """`{model_dir}/best/`: model-only checkpoint of the best epoch (max_to_keep=1) and
    best_state.json (the selection metric, its value, and early-stopping bookkeeping).
    Non-chief workers take part in saves (a collective under multi-worker) into a temp dir."""

    def __init__(self, model_dir, model, chief=True):
        self.directory = os.path.join(model_dir, BEST_SUBDIR)
        self.chief = chief
        target = self.directory if chief else tempfile.mkdtemp(prefix="micle-worker-best-")
        self._worker_dir = None if chief else target
        self.manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), target,
                                                  max_to_keep=1)
        self.state_path = os.path.join(self.directory, BEST_STATE_FILE)

    def load_state(self):
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                return json.load(f)
        return {}

    def save(self, step, state):
        path = self.manager.save(checkpoint_number=int(step))
        if self.chief:
            state["checkpoint"] = path
            self.write_state(state)
            return path
        tf.io.gfile.rmtree(self._worker_dir)
        os.makedirs(self._worker_dir, exist_ok=True)
        return None

    def write_state(self, state):
        if self.chief:
            os.makedirs(self.directory, exist_ok=True)
            write_json_atomic(self.state_path, _clean(state))

    @property
    def latest(self):
        return tf.train.latest_checkpoint(self.directory)


class ValidationCallback(keras.callbacks.Callback):
    """At each epoch end: case-level metrics on the validation split (n_boot=0), the best
    checkpoint by val AUC (macro; fallback val top-1, then lowest train loss when there is no
    validation data or AUC is undefined), and optional early stopping."""

    def __init__(self, evaluate_fn, best, guard, patience=None, state=None):
        super().__init__()
        self.evaluate_fn = evaluate_fn
        self.best = best
        self.guard = guard
        self.patience = patience
        self.state = dict(state or {})
        self.history = list(self.state.get("val_history", []))
        self.early_stopped = bool(self.state.get("early_stopped", False))

    def _score(self, metrics, logs):
        if metrics is not None and metrics.get("auc_macro") is not None:
            return "val_auc_macro", float(metrics["auc_macro"])
        if metrics is not None and metrics.get("top1") is not None:
            return "val_top1", float(metrics["top1"])
        loss = (logs or {}).get("loss")
        return "train_loss", (-float(loss) if loss is not None else float("-inf"))

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.triggered:
            return
        step = int(self.model.optimizer.iterations.numpy())
        metrics = self.evaluate_fn() if self.evaluate_fn is not None else None
        entry = {"epoch": epoch + 1, "step": step}
        if metrics is not None:
            for k in ("top1", "top3", "auc_macro"):
                entry[f"val_{k}"] = metrics.get(k)
                if logs is not None and metrics.get(k) is not None:
                    logs[f"val_{k}"] = float(metrics[k])
            entry["val_auc_per_class"] = metrics.get("auc_per_class")
        name, score = self._score(metrics, logs)
        entry["selection_metric"] = name
        self.history.append(_clean(entry))
        best_value = self.state.get("score")
        improved = (best_value is None or self.state.get("metric") != name
                    or score > best_value)
        if improved:
            self.state.update(metric=name, score=score,
                              value=(-score if name == "train_loss" else score),
                              step=step, epoch=epoch + 1, epochs_since_best=0,
                              val_metrics=_clean({k: v for k, v in (metrics or {}).items()
                                                  if k not in ("ci95", "ci95_skipped")}))
            self.state["val_history"] = self.history
            self.best.save(step, self.state)
            logging.info("epoch %d (step %d): new best %s = %.4f", epoch + 1, step, name,
                         self.state["value"])
        else:
            self.state["epochs_since_best"] = int(self.state.get("epochs_since_best", 0)) + 1
            logging.info("epoch %d (step %d): %s = %.4f (best %.4f at epoch %d)", epoch + 1,
                         step, name, -score if name == "train_loss" else score,
                         self.state["value"], self.state["epoch"])
            if self.patience and self.state["epochs_since_best"] >= self.patience:
                self.early_stopped = True
                self.model.stop_training = True
                logging.info("early stopping: no gain in %s for %d epoch(s)", name,
                             self.state["epochs_since_best"])
        self.state["early_stopped"] = self.early_stopped
        self.state["val_history"] = self.history
        self.best.write_state(self.state)


# ------------------------------------------------------------------------------- training
def run_finetuning(cfg):
    """Fine-tunes and returns the summary dict (also written to model_dir/finetune_summary.json).
    Re-running with the same model_dir resumes from its newest checkpoint."""
    if not cfg.model_dir:
        raise ValueError("FinetuneConfig.model_dir is required")
    init = cfg.init_from or "none"
    seed_everything(cfg.seed)
    set_mixed_precision(cfg.mixed_precision)
    strategy = create_strategy(cfg.strategy, cfg.tpu)
    chief = is_chief(strategy)
    os.makedirs(cfg.model_dir, exist_ok=True)

    info = read_info(cfg.data_dir)
    if not info["label_names"]:
        raise ValueError(f"{cfg.data_dir} has no label names: nothing to fine-tune on")
    if cfg.train_split not in info["splits"]:
        raise ValueError(f"{cfg.data_dir} has no {cfg.train_split!r} split")
    task, label_names = info["task"], list(info["label_names"])
    cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg), init_from=init)
    case_ids, subset = select_training_cases(cfg.data_dir, cfg.train_split, cfg.label_fraction,
                                             cfg.seed, info=info)
    spe, total, warmup = plan_schedule(cfg, subset["num_labelled_images"])
    peak_lr = scale_learning_rate(cfg.learning_rate, cfg.batch_size, cfg.learning_rate_scaling)
    facts = dataset_facts(info, cfg.data_dir, cfg.train_split)

    with strategy.scope():
        model = build_classifier(cfg, task, len(label_names))
        schedule = WarmupCosineDecay(peak_lr, warmup, total)
        optimizer = build_optimizer(cfg.optimizer, schedule, cfg.weight_decay, cfg.momentum)
        model.compile(optimizer=optimizer)
        model.optimizer.build(model.trainable_variables)
        prepare_keras_fit(model, strategy)
        state = CheckpointState(cfg.model_dir, model, model.optimizer, cfg.keep_checkpoints,
                                chief=chief)
        best = BestCheckpoint(cfg.model_dir, model, chief=chief)
        restored = state.restore_latest()
        init_checkpoint = None
        if restored is None and init != "none":
            init_checkpoint = load_encoder_weights(model.encoder, init,
                                                   projection_head=model.projection_head)
    start = int(model.optimizer.iterations.numpy())
    best_state = best.load_state() if restored else {}
    logging.info("fine-tuning %s (init_from=%s) on %d/%d labelled cases (%d images, label "
                 "fraction %g): %d steps (%d per epoch, warmup %d), peak lr %.4g, global batch "
                 "%d on %d replica(s), starting at step %d", cfg.model.backbone, init,
                 subset["num_labelled_cases"], subset["num_available_cases"],
                 subset["num_labelled_images"], cfg.label_fraction, total, spe, warmup, peak_lr,
                 cfg.batch_size, strategy.num_replicas_in_sync, start)
    if chief:
        write_json_atomic(os.path.join(cfg.model_dir, CONFIG_FILE),
                          {"config": config_lib.to_dict(cfg), "dataset": facts})
        write_json_atomic(os.path.join(cfg.model_dir, TRAIN_CASES_FILE),
                          {k: subset[k] for k in ("split", "label_fraction", "seed",
                                                  "num_labelled_cases", "fingerprint",
                                                  "case_ids")})

    aug = augment.build_augment(cfg.augment, cfg.model.image_size,
                                crop_area_min=cfg.crop_area_min)

    def train_data(first_epoch):
        return reader.distributed_dataset(
            strategy, cfg.data_dir, cfg.train_split, "supervised", cfg.batch_size,
            cfg.model.image_size, augment_fn=aug, seed=cfg.seed, steps_per_epoch=spe,
            start_epoch=first_epoch, info=info, case_ids=case_ids, labelled_only=True,
            shuffle_buffer=_TRAIN_SHUFFLE_BUFFER, cache_decoded=cfg.cache_decoded)

    has_val = bool(cfg.eval_split) and cfg.eval_split in info["splits"] and any(
        label is not None
        for _, label, _ in reader.read_case_index(cfg.data_dir, cfg.eval_split, info=info))
    evaluate_fn = None
    if has_val:
        from micle_tf.evaluation.metrics import evaluate_predictions
        predict_fn = make_predict_fn(model)
        eval_bs = min(256, max(cfg.batch_size, 32))

        def evaluate_fn():
            ids, labels, probs = predict_split(model, cfg.data_dir, cfg.eval_split,
                                               cfg.model.image_size, eval_bs, info=info,
                                               predict_fn=predict_fn)
            return evaluate_predictions(ids, labels, probs, task, label_names, level="case",
                                        n_boot=0)
    else:
        logging.warning("no labelled %r split in %s: the best checkpoint is chosen by "
                        "training loss", cfg.eval_split, cfg.data_dir)

    guard = cb.NonFiniteGuard()
    timer = StepTimer()
    validation = ValidationCallback(evaluate_fn, best, guard, cfg.early_stopping_patience,
                                    best_state)
    callbacks = [guard, timer, cb.LearningRateLogger(), validation,
                 cb.CheckpointCallback(state, guard)]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(cfg.model_dir, "logs"),
                                                     update_freq="epoch", write_graph=False))
    history = {}
    t0 = time.time()
    if validation.early_stopped:
        logging.info("this run stopped early at step %d before; not training further", start)
    else:
        # (start < total: pretrain._segments yields a 0-step segment for a finished run whose
        # total is not a multiple of steps_per_epoch, and fit(steps_per_epoch=0) never ends)
        segments = _segments(start, spe, total) if start < total else []
        history = cb.fit_segments(
            model, train_data, segments, callbacks, guard, lambda: state.latest,
            verbose=cfg.verbose if chief else 0, should_stop=lambda: validation.early_stopped,
            shard_check=lambda: reader.verify_shards(cfg.data_dir, cfg.train_split, info=info,
                                                     parse=False))
    elapsed = time.time() - t0
    final_step = int(model.optimizer.iterations.numpy())
    steps_run = final_step - start
    step_time = timer.steady_state()
    bstate = validation.state
    previous = {}
    if restored and os.path.exists(os.path.join(cfg.model_dir, SUMMARY_FILE)):
        with open(os.path.join(cfg.model_dir, SUMMARY_FILE)) as f:
            previous = json.load(f)  # a resumed run keeps the earlier invocations' history
        merged = {k: list(v) for k, v in (previous.get("history") or {}).items()}
        for k, v in history.items():
            merged.setdefault(k, []).extend(v)
        history = merged
        elapsed += float(previous.get("wall_seconds") or 0.0)
        if init_checkpoint is None:
            init_checkpoint = previous.get("init_checkpoint")
    summary = {
        "init_from": init,
        "init_checkpoint": init_checkpoint,
        "label_fraction": float(cfg.label_fraction),
        "num_labelled_cases": subset["num_labelled_cases"],
        "num_labelled_images": subset["num_labelled_images"],
        "num_available_cases": subset["num_available_cases"],
        "train_cases_fingerprint": subset["fingerprint"],
        "final_step": final_step,
        "train_steps": total,
        "steps_per_epoch": spe,
        "resumed_from_step": start,
        "early_stopped": validation.early_stopped,
        "final_loss": history.get("loss", [None])[-1],
        "final_accuracy": history.get("accuracy", [None])[-1],
        "final_val": validation.history[-1] if validation.history else None,
        "best": {k: bstate.get(k) for k in ("metric", "value", "step", "epoch",
                                            "val_metrics", "checkpoint")},
        "history": history,
        "val_history": validation.history,
        "images_per_second": ((cfg.batch_size / step_time) if steps_run
                              else previous.get("images_per_second")),
        "ms_per_step": step_time * 1000 if steps_run else previous.get("ms_per_step"),
        "wall_seconds": elapsed,
        "peak_learning_rate": peak_lr,
        "num_replicas": strategy.num_replicas_in_sync,
        "checkpoint": state.latest,
        "best_checkpoint": best.latest,
        "config": config_lib.to_dict(cfg),
        "dataset": facts,
        "versions": {"micle_tf": __version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__},
    }
    summary = _clean(summary)
    if chief:
        write_json_atomic(os.path.join(cfg.model_dir, SUMMARY_FILE), summary)
    return summary


# -------------------------------------------------------------------------------- loading
def load_finetune_config(model_dir):
    """(FinetuneConfig, dataset facts) a fine-tuning model_dir was trained with."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {model_dir} a micle-finetune model_dir?")
    with open(path) as f:
        saved = json.load(f)
    return config_lib.from_dict(config_lib.FinetuneConfig, saved["config"]), saved["dataset"]


def classifier_checkpoint(model_dir, which="best"):
    """The checkpoint prefix `which` ("best" | "latest") of a fine-tuning model_dir. "best"
    falls back to the latest checkpoint (with a warning) when no best one was saved."""
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_SUBDIR))
    if which == "best":
        path = tf.train.latest_checkpoint(os.path.join(model_dir, BEST_SUBDIR))
        if path:
            return path
        logging.warning("%s has no best checkpoint; using the latest one", model_dir)
    if not latest:
        raise FileNotFoundError(f"no checkpoint in {model_dir} (has micle-finetune run there?)")
    return latest


def load_classifier(model_dir, which="best"):
    """Rebuilds the ClassifierModel of a fine-tuning model_dir from finetune_config.json and
    restores its weights. Returns (model, FinetuneConfig, dataset facts)."""
    cfg, facts = load_finetune_config(model_dir)
    path = classifier_checkpoint(model_dir, which)
    model = build_classifier(cfg, facts["task"], len(facts["label_names"]))
    status = tf.train.Checkpoint(model=model).restore(path)
    status.expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(f"{path} does not match the model described by {CONFIG_FILE}: "
                         f"{str(e)[:500]}") from None
    logging.info("classifier restored from %s", path)
    model.checkpoint_path = path
    return model, cfg, facts

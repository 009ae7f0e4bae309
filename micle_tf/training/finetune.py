"""Stage 3 of the recipe: supervised fine-tuning (or linear evaluation) from a FinetuneConfig.

`run_finetuning(cfg)` builds a `ClassifierModel` whose encoder starts from a pretraining run
(`init_from` = a micle-pretrain model_dir), from a google-research/simclr checkpoint
(`imagenet_simclr:PATH`) or from scratch (`none`, the supervised baseline), trains it on a
label fraction of the training cases, validates at every epoch end, and keeps the best
checkpoint by validation AUC. Like pretraining it runs on `runner.Run` (epoch-seeded data
streams: a re-run with the same model_dir resumes exactly at the last epoch boundary); the
files it writes (finetune_config.json, train_cases.json, checkpoints/, best/,
finetune_summary.json) are described in `micle_tf.rundir`, which also rebuilds the trained
classifier for micle-evaluate and micle-export.

Label fractions: `label_fraction` of the *labelled training cases* is drawn with
`data_pipelines.splits.label_fraction_subset(seed=cfg.seed)` (stratified by label, nested
across fractions for one seed); all images of a chosen case are used.
"""
import dataclasses
import hashlib
import os

import keras
import tensorflow as tf
from absl import logging

from data_pipelines import reader, splits
from data_pipelines.writer import read_info
from micle_tf import augment, config as config_lib, inference, rundir
from micle_tf.evaluation.metrics import evaluate_predictions
from micle_tf.rundir import build_classifier, load_encoder_weights
from micle_tf.training.checkpoints import BestCheckpoint
from micle_tf.training.runner import Run, continued, last
from micle_tf.models.resnet import SMALL_IMAGE_STEM_MAX_SIZE, uses_small_image_stem

SUMMARY_FILE = rundir.FINETUNE_SUMMARY_FILE
CONFIG_FILE = rundir.FINETUNE_CONFIG_FILE
TRAIN_CASES_FILE = rundir.TRAIN_CASES_FILE

_TRAIN_SHUFFLE_BUFFER = 2048  # images (encoded bytes: decoding happens after the shuffle)


# ------------------------------------------------------------- architecture and training cases
def _stem_kind(image_size):
    return "small" if uses_small_image_stem(image_size) else "standard"


def resolve_model_config(cfg):
    """The ModelConfig to fine-tune with.

    - a pretraining or fine-tuning model_dir, or micle-demo's starting encoder
      (`rundir.architecture`): its architecture (backbone, width, SK, projection head, BN) is
      used whatever cfg.model says, because the weights must fit; the input size
      stays cfg.model.image_size when it uses the same ResNet stem (<= SMALL_IMAGE_STEM_MAX_SIZE px: small-image stem),
      else it is an error (the stem's kernels differ).
    - `imagenet_simclr:PATH` and `none`: cfg.model.
    """
    init = cfg.init_from or "none"
    if init == "none" or init.startswith("imagenet_simclr:"):
        return cfg.model
    found = rundir.architecture(init)
    if found is None:
        if not tf.io.gfile.exists(init):
            raise FileNotFoundError(f"--init_from {init!r}: no such directory (expected a "
                                    "micle-pretrain model_dir, imagenet_simclr:PATH or none)")
        logging.warning("%s has no %s: assuming its encoder matches the model flags", init,
                        rundir.PRETRAIN_CONFIG_FILE)
        return cfg.model
    source = found[0]
    if _stem_kind(source.image_size) != _stem_kind(cfg.model.image_size):
        raise ValueError(
            f"{init} was pretrained at {source.image_size} px ({_stem_kind(source.image_size)} "
            f"ResNet stem) but fine-tuning asks for {cfg.model.image_size} px "
            f"({_stem_kind(cfg.model.image_size)} stem); the stems' weights differ. Use an "
            f"image size on the same side of {SMALL_IMAGE_STEM_MAX_SIZE} px as pretraining.")
    model_cfg = dataclasses.replace(source, image_size=cfg.model.image_size)
    differs = {f.name: (getattr(cfg.model, f.name), getattr(model_cfg, f.name))
               for f in dataclasses.fields(model_cfg)
               if getattr(cfg.model, f.name) != getattr(model_cfg, f.name)}
    if differs:
        logging.info("architecture taken from the pretraining run %s (flag value -> used): %s",
                     init, differs)
    return model_cfg


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


# ------------------------------------------------------------------------------ validation
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
        self.history.append(rundir.clean(entry))
        best_value = self.state.get("score")
        improved = (best_value is None or self.state.get("metric") != name
                    or score > best_value)
        if improved:
            self.state.update(metric=name, score=score,
                              value=(-score if name == "train_loss" else score),
                              step=step, epoch=epoch + 1, epochs_since_best=0,
                              val_metrics=rundir.clean({
                                  k: v for k, v in (metrics or {}).items()
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
    init = cfg.init_from or "none"
    run = Run(cfg)
    info = read_info(cfg.data_dir)
    if not info["label_names"]:
        raise ValueError(f"{cfg.data_dir} has no label names: nothing to fine-tune on")
    if cfg.train_split not in info["splits"]:
        raise ValueError(f"{cfg.data_dir} has no {cfg.train_split!r} split")
    task, label_names = info["task"], list(info["label_names"])
    cfg = run.cfg = dataclasses.replace(cfg, model=resolve_model_config(cfg), init_from=init)
    case_ids, subset = select_training_cases(cfg.data_dir, cfg.train_split, cfg.label_fraction,
                                             cfg.seed, info=info)
    run.plan(subset["num_labelled_images"])
    facts = rundir.dataset_facts(info, cfg.data_dir, cfg.train_split)

    with run.strategy.scope():
        model = run.compile(build_classifier(cfg, task, len(label_names)))
        best = BestCheckpoint(cfg.model_dir, model, chief=run.chief)
        run.restore(None if init == "none" else lambda: load_encoder_weights(
            model.encoder, init, projection_head=model.projection_head))
    run.log_start(f"fine-tuning {cfg.model.backbone} (init_from={init}) on "
                  f"{subset['num_labelled_cases']}/{subset['num_available_cases']} labelled "
                  f"cases ({subset['num_labelled_images']} images, label fraction "
                  f"{cfg.label_fraction:g})")
    run.write(CONFIG_FILE, {"config": config_lib.to_dict(cfg), "dataset": facts})
    run.write(TRAIN_CASES_FILE, {k: subset[k] for k in (
        "split", "label_fraction", "seed", "num_labelled_cases", "fingerprint", "case_ids")})

    aug = augment.build_augment(cfg.augment, cfg.model.image_size,
                                crop_area_min=cfg.crop_area_min)

    def train_data(first_epoch):
        return reader.distributed_dataset(
            run.strategy, cfg.data_dir, cfg.train_split, "supervised", cfg.batch_size,
            cfg.model.image_size, augment_fn=aug, seed=cfg.seed,
            steps_per_epoch=run.steps_per_epoch, start_epoch=first_epoch, info=info,
            case_ids=case_ids, labelled_only=True, shuffle_buffer=_TRAIN_SHUFFLE_BUFFER,
            cache_decoded=cfg.cache_decoded)

    validation = ValidationCallback(_validation_fn(run, model, info), best, run.guard,
                                    cfg.early_stopping_patience,
                                    best.load_state() if run.restored else {})
    if validation.early_stopped:
        logging.info("this run stopped early at step %d before; not training further",
                     run.start_step)
    history = run.fit(train_data, [validation], should_stop=lambda: validation.early_stopped,
                      shard_check=lambda: reader.verify_shards(
                          cfg.data_dir, cfg.train_split, info=info, parse=False))
    # a resumed run keeps the earlier invocations' history and wall time
    previous = run.previous_summary(SUMMARY_FILE)
    history = continued(previous, history)
    bstate = validation.state
    summary = run.summary(
        history, facts, previous=previous,
        init_from=init,
        init_checkpoint=run.init_checkpoint or (previous or {}).get("init_checkpoint"),
        label_fraction=float(cfg.label_fraction),
        num_labelled_cases=subset["num_labelled_cases"],
        num_labelled_images=subset["num_labelled_images"],
        num_available_cases=subset["num_available_cases"],
        train_cases_fingerprint=subset["fingerprint"],
        early_stopped=validation.early_stopped,
        final_accuracy=last(history, "accuracy"),
        final_val=validation.history[-1] if validation.history else None,
        best={k: bstate.get(k) for k in ("metric", "value", "step", "epoch", "val_metrics",
                                         "checkpoint")},
        val_history=validation.history,
        best_checkpoint=best.latest)
    run.write(SUMMARY_FILE, summary)
    return summary


def _validation_fn(run, model, info):
    """Case-level metrics of the labelled validation split (n_boot=0), or None when there is
    none (the best checkpoint is then chosen by training loss)."""
    cfg = run.cfg
    has_val = bool(cfg.eval_split) and cfg.eval_split in info["splits"] and any(
        label is not None
        for _, label, _ in reader.read_case_index(cfg.data_dir, cfg.eval_split, info=info))
    if not has_val:
        logging.warning("no labelled %r split in %s: the best checkpoint is chosen by "
                        "training loss", cfg.eval_split, cfg.data_dir)
        return None
    predict_fn = inference.make_predict_fn(model)

    def evaluate():
        ids, labels, probs = inference.predict_split(
            model, cfg.data_dir, cfg.eval_split, cfg.model.image_size, run.eval_batch_size,
            info=info, predict_fn=predict_fn)
        return evaluate_predictions(ids, labels, probs, info["task"], list(info["label_names"]),
                                    level="case", n_boot=0)
    return evaluate

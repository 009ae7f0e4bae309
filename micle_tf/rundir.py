"""The run directory: what a micle-tf model_dir holds, and the one way to read it back.

Training writes a model_dir; evaluation, export, the demo, a sweep and a resumed run read it.
Its file names, the JSON cleaning, the config loader, the dataset facts, checkpoint lookup and
the rebuild of a trained classifier or encoder all live here, so the writer and its readers
cannot drift apart and no reader needs `micle_tf.training` (see tests/micle_tf/
test_dependency_rule.py).

Layout of a model_dir (a contract: micle-evaluate and micle-export read it):

  pretrain_config.json | finetune_config.json
                    {"config": to_dict(cfg) with the *effective* model config,
                     "dataset": dataset_facts(...)}
  pretrain_summary.json | finetune_summary.json
                    the run's results (micle_tf.training.runner.Run.summary and the runner)
  checkpoints/      tf.train.Checkpoint(model=..., optimizer=...) at each epoch end (resume)
  logs/             TensorBoard
  fine-tuning only:
  train_cases.json  the hashed case ids trained on (label-fraction subset), for the
                    evaluator's leakage check
  best/             tf.train.Checkpoint(model=ClassifierModel) of the best epoch by validation
                    AUC (max_to_keep=1) + best_state.json (metric, value, step, epoch, ...)
  calibration.json  optional: temperature scaling fitted on the validation split for one
                    checkpoint (micle-finetune --calibrate, micle-export --calibrate; see
                    micle_tf.evaluation.temperature_scaling); micle-evaluate reports before/after
                    figures with it and micle-export applies it in the serving signatures
  metrics_{split}.json, report_{split}.md, *.png   micle-evaluate's outputs

micle-demo's shared starting encoder is a `checkpoints/` folder with `start_encoder.json`
({"source", "model"}) instead of a config file.
"""
import hashlib
import json
import math
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from data_pipelines.writer import write_json_atomic
from micle_tf import __version__, config as config_lib
from micle_tf.models import simclr_import
from micle_tf.models.classifier import ClassifierModel
from micle_tf.models.factory import build_encoder, build_projection_head

PRETRAIN_CONFIG_FILE = "pretrain_config.json"
PRETRAIN_SUMMARY_FILE = "pretrain_summary.json"
FINETUNE_CONFIG_FILE = "finetune_config.json"
FINETUNE_SUMMARY_FILE = "finetune_summary.json"
TRAIN_CASES_FILE = "train_cases.json"
START_ENCODER_FILE = "start_encoder.json"
CHECKPOINT_SUBDIR = "checkpoints"
BEST_SUBDIR = "best"
BEST_STATE_FILE = "best_state.json"
LOGS_SUBDIR = "logs"
CALIBRATION_FILE = "calibration.json"

_CONFIGS = {"pretrain": (PRETRAIN_CONFIG_FILE, config_lib.PretrainConfig),
            "finetune": (FINETUNE_CONFIG_FILE, config_lib.FinetuneConfig)}
DATASET_FACT_KEYS = ("task", "label_names", "source", "salt_fingerprint", "num_cases",
                     "num_images", "splits")


def metrics_file(tag):
    """micle-evaluate's metrics file for `tag` (a split name, or "shifted_<split>")."""
    return f"metrics_{tag}.json"


# ------------------------------------------------------------------------------ JSON files
def clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python (json.dump would write NaN, which
    is not JSON, and refuses numpy integers)."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if not math.isfinite(x) else x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path, obj):
    """`clean(obj)` written atomically (a reader never sees half a file)."""
    write_json_atomic(path, clean(obj))


def read_json(path):
    """The JSON at `path`, or None when there is no such file (the optional files of a run)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def versions():
    """The "versions" block of every summary and export."""
    return {"micle_tf": __version__, "tensorflow": tf.__version__, "keras": keras.__version__}


def dataset_facts(info, data_dir=None, train_split=None):
    """What a run records about its dataset (from dataset_info.json): enough to check that an
    evaluated dataset has the same task and labels, and which salt its case ids were hashed
    with."""
    facts = {k: info.get(k) for k in DATASET_FACT_KEYS}
    if data_dir is not None:
        facts["data_dir"] = os.path.abspath(data_dir)
    if train_split is not None:
        facts["train_split"] = train_split
    return facts


# --------------------------------------------------------------------------------- configs
def run_kind(path):
    """"pretrain" or "finetune" when `path` is such a model_dir (it has the config file)."""
    for kind, (filename, _) in _CONFIGS.items():
        if os.path.exists(os.path.join(path, filename)):
            return kind
    return None


def load_config(model_dir, kind):
    """(config, dataset facts) a `kind` ("pretrain" | "finetune") model_dir was trained with;
    FileNotFoundError naming the missing file when model_dir is not such a run."""
    filename, cls = _CONFIGS[kind]
    path = os.path.join(model_dir, filename)
    saved = read_json(path)
    if saved is None:
        raise FileNotFoundError(f"{path} not found: is {model_dir} a micle-{kind} model_dir?")
    return config_lib.from_dict(cls, saved["config"]), saved.get("dataset") or {}


def architecture(path):
    """(ModelConfig, run config or None) of the weights in `path`: a pretraining or
    fine-tuning model_dir (from its config), or micle-demo's starting encoder (from
    start_encoder.json, no run config). None when `path` holds neither."""
    kind = run_kind(path)
    if kind is not None:
        cfg, _ = load_config(path, kind)
        return cfg.model, cfg
    meta = read_json(os.path.join(path, START_ENCODER_FILE))
    if meta is not None:
        return config_lib.ModelConfig(**meta["model"]), None
    return None


# ----------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path):
    """A model_dir, a checkpoints folder or a checkpoint prefix -> a checkpoint prefix."""
    if tf.io.gfile.isdir(path):
        for folder in (os.path.join(path, CHECKPOINT_SUBDIR), path):
            latest = tf.train.latest_checkpoint(folder)
            if latest:
                return latest
        raise FileNotFoundError(f"no checkpoint found in {path}")
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise FileNotFoundError(f"checkpoint {path} not found")


CHECKPOINT_CHOICES = ("best", "latest")


def classifier_checkpoint(model_dir, which="best"):
    """The checkpoint prefix `which` ("best" | "latest") of a fine-tuning model_dir. "best"
    falls back to the latest checkpoint (with a warning) when no best one was saved."""
    if which not in CHECKPOINT_CHOICES:
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


def checkpoint_origin(prefix):
    """(which, step) of a fine-tuning checkpoint prefix: "best" when it lies in best/, else
    "latest"; the step from its `-N` suffix (None without one)."""
    which = "best" if os.path.basename(os.path.dirname(prefix)) == BEST_SUBDIR else "latest"
    step = prefix.rsplit("-", 1)[-1]
    return which, int(step) if step.isdigit() else None


def read_calibration(model_dir, checkpoint=None):
    """The model_dir's calibration.json (temperature scaling), or None when there is none.
    With `checkpoint` (a checkpoint prefix) also None, with a warning, when it was fitted for
    another checkpoint (a later or resumed run changed the best one): a temperature belongs
    to the logits it was fitted on."""
    cal = read_json(os.path.join(model_dir, CALIBRATION_FILE))
    if cal is None or checkpoint is None:
        return cal
    which, step = checkpoint_origin(checkpoint)
    fitted = cal.get("checkpoint") or {}
    same = (fitted.get("which"), fitted.get("step")) == (which, step)
    if same and fitted.get("fingerprint"):  # same step, other weights: a run trained again
        same = fitted["fingerprint"] == checkpoint_fingerprint(checkpoint)
    if not same:
        logging.warning("%s was fitted for another checkpoint (%s, step %s) than %s (step %s): "
                        "not used; fit it again (micle-finetune/micle-export --calibrate)",
                        CALIBRATION_FILE, fitted.get("which"), fitted.get("step"), which, step)
        return None
    return cal


def checkpoint_fingerprint(prefix):
    """A short hash of a checkpoint's `.index` file (it holds every tensor's checksum, so other
    weights give another fingerprint); None when it cannot be read."""
    try:
        with tf.io.gfile.GFile(prefix + ".index", "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (OSError, tf.errors.OpError):
        return None


def restore(checkpoint, prefix, mismatch, partial=True):
    """Restores `checkpoint` (a tf.train.Checkpoint) from `prefix` and requires every object
    it tracks to be found there with its shape: else ValueError "{prefix} {mismatch}: ..."
    (TF's own message names the variable). `partial`: values the checkpoint holds beyond those
    objects (an optimizer, other heads) are fine."""
    try:
        status = checkpoint.restore(prefix)  # ValueError at once for a variable's other shape
        if partial:
            status.expect_partial()
        status.assert_existing_objects_matched()  # AssertionError for a missing one
    except (AssertionError, ValueError) as e:
        raise ValueError(f"{prefix} {mismatch}: {str(e)[:500]}") from None
    return prefix


def load_encoder_weights(encoder, path, projection_head=None):
    """Initialises `encoder` (and optionally `projection_head`), weights only, from a micle-tf
    checkpoint: a pretraining or fine-tuning model_dir, or a checkpoint prefix. Optimizer state
    and other heads are ignored. `imagenet_simclr:PATH` reads a google-research/simclr TF2
    checkpoint instead. Returns the checkpoint used."""
    if path.startswith("imagenet_simclr:"):
        summary = simclr_import.load_simclr_encoder(encoder, path.split(":", 1)[1],
                                                    projection_head=projection_head)
        logging.info("encoder initialised from SimCLR checkpoint %s (%d variables)",
                     summary["checkpoint"], summary["assigned"])
        return summary["checkpoint"]
    prefix = resolve_checkpoint(path)
    parts = {"encoder": encoder}
    if projection_head is not None:
        parts["projection_head"] = projection_head
    restore(tf.train.Checkpoint(model=tf.train.Checkpoint(**parts)), prefix,
            "does not hold weights for this encoder (different backbone or width?)")
    logging.info("encoder initialised from %s", prefix)
    return prefix


# ------------------------------------------------------------------------- trained models
def build_classifier(cfg, task, num_classes):
    """The ClassifierModel a FinetuneConfig describes (cfg.model must be the effective model
    config), every variable created. Training builds with it (inside strategy.scope()) and
    `load_classifier` rebuilds with it, so a checkpoint always fits its rebuild."""
    encoder = build_encoder(cfg.model, cfg.fine_tune_after_block)
    head = build_projection_head(cfg.model) if cfg.ft_proj_selector > 0 else None
    model = ClassifierModel(encoder, num_classes=num_classes, task=task, projection_head=head,
                            ft_proj_selector=cfg.ft_proj_selector,
                            uncertainty_policy=cfg.uncertainty_policy,
                            label_smoothing=cfg.label_smoothing, name="classifier")
    model.build_for(cfg.model.image_size)
    return model


def load_classifier(model_dir, which="best", dtype_policy=None):
    """Rebuilds the ClassifierModel of a fine-tuning model_dir from finetune_config.json and
    restores checkpoint `which` ("best" | "latest"). `dtype_policy` (e.g. "float32", what
    export serves) builds under that Keras policy whatever precision training used; None keeps
    the global one. Returns (model, FinetuneConfig, dataset facts); `model.checkpoint_path` is
    the restored prefix (see `checkpoint_origin`)."""
    cfg, facts = load_config(model_dir, "finetune")
    path = classifier_checkpoint(model_dir, which)
    previous = keras.config.dtype_policy()
    if dtype_policy is not None:
        keras.config.set_dtype_policy(dtype_policy)
    try:
        model = build_classifier(cfg, facts["task"], len(facts["label_names"]))
    finally:
        keras.config.set_dtype_policy(previous)
    restore(tf.train.Checkpoint(model=model), path,
            f"does not match the model described by {FINETUNE_CONFIG_FILE}")
    logging.info("classifier restored from %s", path)
    model.checkpoint_path = path
    return model, cfg, facts


def load_encoder(path, model_cfg=None):
    """The encoder of a run directory (its architecture from `architecture(path)`), or of any
    checkpoint directory/prefix when `model_cfg` is given, built and restored."""
    if model_cfg is None:
        found = architecture(path)
        if found is None:
            raise FileNotFoundError(f"{os.path.join(path, PRETRAIN_CONFIG_FILE)} not found: is "
                                    f"{path} a micle-pretrain model_dir?")
        model_cfg = found[0]
    encoder = build_encoder(model_cfg)
    encoder(tf.zeros([1, model_cfg.image_size, model_cfg.image_size, 3]), training=False)
    load_encoder_weights(encoder, path)
    return encoder

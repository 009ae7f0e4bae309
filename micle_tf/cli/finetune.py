"""`micle-finetune`: supervised fine-tuning (or linear evaluation) on case-bag records.

  micle-finetune --data_dir=/tmp/ph2 --model_dir=/tmp/ft_micle --init_from=/tmp/micle \
      --label_fraction=0.1 --train_epochs=30

--init_from: a micle-pretrain model_dir (its architecture is used; --image_size defaults to
the pretraining size), `imagenet_simclr:PATH` (a google-research/simclr TF2 checkpoint; the
model flags must describe it) or `none` (random init: the supervised baseline).
--label_fraction: fraction of the labelled training *cases* used (stratified, nested across
fractions for one --seed).

Defaults follow SimCLR fine-tuning: LARS, momentum 0.9, learning rate 0.16 x batch/256
(linear scaling), no weight decay, no warmup, cosine decay; 30 epochs at batch 128. Linear
evaluation: --fine_tune_after_block=4 (frozen encoder). Each epoch ends with case-level
validation on --eval_split; the best epoch by val AUC is kept in model_dir/best/. Re-running
with the same --model_dir resumes from its newest checkpoint.
"""
import json
import os
import sys

from absl import app, flags

from micle_tf import config as config_lib
from micle_tf.cli import common

FLAGS = flags.FLAGS

# SimCLR fine-tuning recipe (see the module docstring). FinetuneConfig itself keeps the
# TrainConfig defaults; micle-evaluate --sweep uses these same values.
RECIPE_DEFAULTS = dict(batch_size=128, learning_rate=0.16, epochs=30, optimizer="lars",
                       weight_decay=0.0, warmup_epochs=0.0)

flags.DEFINE_string("init_from", None, "Encoder initialisation: a micle-pretrain model_dir, "
                    "imagenet_simclr:PATH, or none (random init, supervised baseline).")
flags.DEFINE_float("label_fraction", None, "Fraction (0, 1] of the labelled training cases to "
                   "fine-tune on (chosen by case, stratified, with --seed).")
common.define_model_flags()
common.define_train_flags(**RECIPE_DEFAULTS)
flags.DEFINE_integer("ft_proj_selector", 0, "Projection-head layer feeding the classifier "
                     "(0 = encoder output; SimCLRv2 uses 1 with few labels).")
flags.DEFINE_integer("fine_tune_after_block", -1, "-1 trains every layer; k in 0..4 freezes "
                     "the stem and block groups up to k (4 = linear evaluation).")
flags.DEFINE_enum("uncertainty_policy", "ignore", ["ignore", "ones", "zeros"],
                  "Multilabel 'uncertain' labels: masked out (ignore), positive (ones) or "
                  "negative (zeros).")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing (multiclass).")
flags.DEFINE_enum("augment", "finetune", ["finetune", "none", "derm", "cxr"],
                  "Training augmentation preset (finetune: crop 50-100%, flip, rotation).")
flags.DEFINE_float("crop_area_min", None, "Smallest area fraction (0, 1] of the random "
                   "resized crop (default: the preset's, finetune: 0.5).")
flags.DEFINE_integer("early_stopping_patience", None, "Stop after this many epochs without a "
                     "gain in val AUC (default: never).")
flags.DEFINE_string("train_split", "train", "Split to fine-tune on.")
flags.DEFINE_string("eval_split", "val", "Split validated at each epoch end (best checkpoint).")


def is_pretrain_dir(init_from):
    return bool(init_from) and init_from != "none" and \
        not init_from.startswith("imagenet_simclr:") and \
        os.path.exists(os.path.join(init_from, "pretrain_config.json"))


def model_config_for(init_from):
    """Model flags -> ModelConfig; without an explicit --image_size, a pretraining run's
    image size is used (its architecture always is, see training/finetune.py)."""
    model = common.model_config_from_flags()
    if not FLAGS["image_size"].present and is_pretrain_dir(init_from):
        with open(os.path.join(init_from, "pretrain_config.json")) as f:
            model.image_size = json.load(f)["config"]["model"]["image_size"]
    return model


def finetune_kwargs_from_flags():
    names = ["ft_proj_selector", "fine_tune_after_block", "uncertainty_policy",
             "label_smoothing", "augment", "crop_area_min", "early_stopping_patience",
             "train_split",
             "eval_split"]
    return {n: getattr(FLAGS, n) for n in names}


def main(argv):
    del argv
    common.setup_logging()
    common.require("data_dir", "model_dir", "init_from", "label_fraction")
    if not 0.0 < FLAGS.label_fraction <= 1.0:
        raise app.UsageError(f"--label_fraction must be in (0, 1], got {FLAGS.label_fraction}")
    if FLAGS.crop_area_min is not None and (FLAGS.augment == "none" or
                                            not 0.0 < FLAGS.crop_area_min <= 1.0):
        raise app.UsageError(f"--crop_area_min must be in (0, 1] and needs a cropping "
                             f"--augment preset, got {FLAGS.crop_area_min} with "
                             f"--augment={FLAGS.augment}")
    cfg = config_lib.FinetuneConfig(
        init_from=FLAGS.init_from, label_fraction=FLAGS.label_fraction,
        model=model_config_for(FLAGS.init_from), **finetune_kwargs_from_flags(),
        **common.train_kwargs_from_flags())
    from micle_tf.training.finetune import run_finetuning
    summary = run_finetuning(cfg)
    if summary is not None:
        best = summary.get("best") or {}
        print(json.dumps({"init_from": summary["init_from"],
                          "label_fraction": summary["label_fraction"],
                          "num_labelled_cases": summary["num_labelled_cases"],
                          "final_step": summary["final_step"],
                          "final_loss": summary["final_loss"],
                          "best_metric": best.get("metric"), "best_value": best.get("value"),
                          "best_checkpoint": summary["best_checkpoint"]}))


def run():
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())

"""`micle-finetune`: supervised fine-tuning (or linear evaluation) on case-bag records.

  micle-finetune --data_dir=/tmp/ph2 --model_dir=/tmp/ft_micle --init_from=/tmp/micle \
      --label_fraction=0.1 --train_epochs=30

--init_from: a micle-pretrain model_dir (its architecture is used; --image_size defaults to
the pretraining size), `imagenet_simclr:PATH` (a google-research/simclr TF2 checkpoint; the
model flags must describe it) or `none` (random init: the supervised baseline).
--label_fraction: fraction of the labelled training *cases* used (stratified, nested across
fractions for one --seed).

Defaults are FinetuneConfig's, SimCLR fine-tuning: LARS, momentum 0.9, learning rate
0.16 x batch/256 (linear scaling), no weight decay, no warmup, cosine decay; 30 epochs at
batch 128. Linear evaluation: --fine_tune_after_block=4 (frozen encoder). Each epoch ends
with case-level validation on --eval_split; the best epoch by val AUC is kept in
model_dir/best/. Re-running with the same --model_dir resumes from its newest checkpoint.

--calibrate: after training, fit temperature scaling on the validation split (--eval_split)
with the best checkpoint and write model_dir/calibration.json (T and the validation NLL
before/after); micle-evaluate then reports calibration before/after and micle-export applies
T in its serving signatures.
"""
import json
import sys

from absl import app, flags

from micle_tf.cli import common

FLAGS = flags.FLAGS

flags.DEFINE_string("init_from", None, "Encoder initialisation: a micle-pretrain model_dir, "
                    "imagenet_simclr:PATH, or none (random init, supervised baseline).")
flags.DEFINE_float("label_fraction", None, "Fraction (0, 1] of the labelled training cases to "
                   "fine-tune on (chosen by case, stratified, with --seed).")
flags.DEFINE_bool("calibrate", False, "After training, fit temperature scaling on the "
                  "validation split (--eval_split) for the best checkpoint -> "
                  "model_dir/calibration.json (applied by micle-export).")
common.define_finetune_flags()


def main(argv):
    del argv
    common.setup_logging()
    common.require("data_dir", "model_dir", "init_from", "label_fraction")
    if not 0.0 < FLAGS.label_fraction <= 1.0:
        raise app.UsageError(f"--label_fraction must be in (0, 1], got {FLAGS.label_fraction}")
    info = common.check_splits(FLAGS.data_dir, train_split=FLAGS.train_split,
                               # a default eval split the data lacks means "no validation"
                               # (a warning)
                               eval_split=FLAGS.eval_split if FLAGS["eval_split"].present
                               else None)
    if FLAGS.calibrate and FLAGS.eval_split not in info["splits"]:
        raise app.UsageError(f"--calibrate fits the temperature on the validation split, but "
                             f"{FLAGS.data_dir} has no {FLAGS.eval_split!r} split (--eval_split)")
    cfg = common.finetune_config_from_flags([FLAGS.init_from], init_from=FLAGS.init_from,
                                            label_fraction=FLAGS.label_fraction)
    from micle_tf.training.finetune import run_finetuning
    summary = run_finetuning(cfg)
    calibration = None
    if summary is not None and FLAGS.calibrate:
        from micle_tf.evaluation.temperature_scaling import fit_model_dir
        calibration = fit_model_dir(cfg.model_dir, cfg.data_dir, split=cfg.eval_split,
                                    which="best")
    if summary is not None:
        best = summary.get("best") or {}
        extra = {} if calibration is None else {
            "temperature": calibration["temperature"],
            "val_nll_before": calibration["nll_before"],
            "val_nll_after": calibration["nll_after"]}
        print(json.dumps({"init_from": summary["init_from"],
                          "label_fraction": summary["label_fraction"],
                          "num_labelled_cases": summary["num_labelled_cases"],
                          "final_step": summary["final_step"],
                          "final_loss": summary["final_loss"],
                          "best_metric": best.get("metric"), "best_value": best.get("value"),
                          "best_checkpoint": summary["best_checkpoint"], **extra}))


def run():
    common.run_main(main, "micle-finetune")


if __name__ == "__main__":
    sys.exit(run())

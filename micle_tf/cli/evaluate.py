"""`micle-evaluate`: metrics, report and plots of a fine-tuned classifier; shift evaluation;
label-efficiency sweeps.

  micle-evaluate --data_dir=/tmp/ph2 --model_dir=/tmp/ft_micle --split=test
      -> metrics_test.json, report_test.md, roc_test.png, confusion_test.png,
         reliability_test.png in --model_dir (calibration is always reported: ECE with
         equal-width and equal-mass bins, Brier, NLL with CIs; with a temperature fitted by
         micle-finetune --calibrate, also the figures after temperature scaling)
  micle-evaluate ... --subgroups=sex,age_band --min_group_size=10
      (+ per-subgroup metrics with CIs and case counts, worst group, largest gap; groups
       under --min_group_size cases shown as "n < k")
  micle-evaluate ... --shift_data_dir=/tmp/other_site      (+ shift_test.json)
  micle-evaluate --sweep --data_dir=/tmp/ph2 --sweep_dir=/tmp/sweep --split=test \
      --sweep_inits=none:none,simclr:/tmp/simclr,micle:/tmp/micle \
      --sweep_fractions=0.1,0.25,0.5,1.0 --sweep_seeds=0,1 --backbone=resnet18 --image_size=32
      -> sweep.json, sweep.md, label_efficiency.png (+ one fine-tuned model_dir per run)
  micle-evaluate --retrieval --data_dir=/tmp/ph2 --model_dir=/tmp/micle --split=test \
      --compare_to=simclr:/tmp/simclr,start:/tmp/start
      -> retrieval_test.json, retrieval_test.md in --model_dir: label-free same-case
         retrieval (top-1, mAP, CIs) of pretrained encoders and their paired differences

Before predicting, evaluation refuses a dataset whose label names differ from the model's, and
a split that shares a case with the cases the model (or its pretraining run) was trained on.
In --sweep mode the fine-tuning flags below configure every run (same defaults as
micle-finetune); finished runs in --sweep_dir are reused, not retrained.
"""
import json
import os
import sys

from absl import app, flags

from micle_tf.cli import common
from micle_tf.evaluation.metrics import LEVELS
from micle_tf.evaluation.subgroups import DEFAULT_MIN_GROUP_SIZE
from micle_tf.rundir import CHECKPOINT_CHOICES

FLAGS = flags.FLAGS

flags.DEFINE_string("split", None, "Split to evaluate (with --sweep: default test).")
flags.DEFINE_enum("level", "case", list(LEVELS), "case: average each case's image "
                  "probabilities first; image: every image counts. CIs always resample cases.")
flags.DEFINE_integer("n_boot", 1000, "Case-bootstrap resamples for the 95% CIs (0 = none).")
flags.DEFINE_integer("eval_seed", 0, "Bootstrap seed.")
flags.DEFINE_enum("which", "best", list(CHECKPOINT_CHOICES), "Checkpoint to evaluate.")
flags.DEFINE_string("out_dir", None, "Where outputs go (default: --model_dir).")
flags.DEFINE_integer("eval_batch_size", 256, "Prediction batch size.")
flags.DEFINE_string("shift_data_dir", None, "Also evaluate on this dataset (distribution "
                    "shift) and write shift_{split}.json with the gaps.")
flags.DEFINE_string("shift_split", None, "Split of --shift_data_dir (default: --split).")
flags.DEFINE_list("subgroups", [], "Case attributes (case/attr/* of the records, e.g. "
                  "sex,age_band,view,site) to report every metric per subgroup for, with CIs, "
                  "case counts, the worst group and the largest gap.")
flags.DEFINE_integer("min_group_size", DEFAULT_MIN_GROUP_SIZE, "With --subgroups: groups with "
                     "fewer cases are suppressed (shown as \"n < k\", no metrics).")
flags.DEFINE_bool("use_temperature", True, "When --model_dir holds a temperature fitted on its "
                  "validation split for the evaluated checkpoint (calibration.json), also "
                  "report the temperature-scaled probabilities (what micle-export serves).")
flags.DEFINE_bool("sweep", False, "Label-efficiency sweep instead of one evaluation.")
flags.DEFINE_list("sweep_inits", None, "name:init_from pairs, e.g. none:none,micle:/tmp/micle "
                  "(init_from: a pretrain model_dir, imagenet_simclr:PATH or none).")
flags.DEFINE_list("sweep_fractions", ["0.1", "0.25", "0.5", "1.0"], "Label fractions.")
flags.DEFINE_list("sweep_seeds", ["0"], "Seeds (label subset and training).")
flags.DEFINE_string("sweep_dir", None, "Sweep output directory (one model_dir per run).")
flags.DEFINE_bool("retrieval", False, "Score the ENCODER of a micle-pretrain --model_dir by "
                  "same-case retrieval among the images of --split (no fine-tuning, no labels).")
flags.DEFINE_list("compare_to", [], "With --retrieval: name:encoder_dir pairs scored on the "
                  "same images; paired differences model_dir - each of them are reported.")

# Fine-tuning flags for --sweep: micle-finetune's own definitions and defaults.
common.define_finetune_flags(help_prefix="With --sweep: ")


def parse_inits(items, flag="--sweep_inits", required=True):
    inits = {}
    for item in items or []:
        name, sep, init = item.partition(":")
        if not sep or not name or not init:
            raise app.UsageError(f"{flag} entry {item!r} is not name:path")
        if name in inits:
            raise app.UsageError(f"{flag} names {name!r} twice")
        inits[name] = init
    if not inits and required:
        raise app.UsageError(f"--sweep needs {flag}")
    return inits


def _sweep_config(inits):
    """The fine-tuning config every sweep run starts from (init_from, label_fraction and seed
    are set per run); the image size may come from a pretraining run among the inits."""
    return common.finetune_config_from_flags(list(inits.values()))


# Flags of one run's evaluation that --sweep and --retrieval do not apply (refused, not ignored).
SINGLE_RUN_FLAGS = ("subgroups", "min_group_size", "shift_data_dir", "shift_split", "which",
                    "use_temperature")


def check_mode_flags():
    if FLAGS.sweep and FLAGS.retrieval:
        raise app.UsageError("--sweep and --retrieval exclude each other")
    mode = "--sweep" if FLAGS.sweep else "--retrieval" if FLAGS.retrieval else None
    if mode:
        given = [f"--{name}" for name in SINGLE_RUN_FLAGS if FLAGS[name].present]
        if given:
            raise app.UsageError(f"{', '.join(given)} apply to evaluating one fine-tuned "
                                 f"--model_dir, not to {mode}; evaluate a run directory "
                                 f"(e.g. one of the sweep's) with them instead")
    if FLAGS.compare_to and not FLAGS.retrieval:
        raise app.UsageError("--compare_to needs --retrieval")


def main(argv):
    del argv
    common.setup_logging()
    check_mode_flags()
    from micle_tf.evaluation import evaluate as ev
    if FLAGS.sweep:
        common.require("data_dir", "sweep_dir")
        inits = parse_inits(FLAGS.sweep_inits)
        try:
            fractions = [float(f) for f in FLAGS.sweep_fractions]
            seeds = [int(s) for s in FLAGS.sweep_seeds]
        except ValueError as e:
            raise app.UsageError(f"bad --sweep_fractions/--sweep_seeds: {e}")
        common.check_splits(FLAGS.data_dir, split=FLAGS.split or "test",
                            train_split=FLAGS.train_split,
                            eval_split=FLAGS.eval_split if FLAGS["eval_split"].present else None)
        from micle_tf.training.sweep import run_sweep
        sweep = run_sweep(FLAGS.data_dir, inits, fractions, seeds, _sweep_config(inits),
                          FLAGS.sweep_dir, split=FLAGS.split or "test", level=FLAGS.level,
                          n_boot=FLAGS.n_boot, eval_seed=FLAGS.eval_seed)
        print(json.dumps({"sweep_dir": FLAGS.sweep_dir, "counts": sweep["counts"],
                          "summary": sweep["summary"]["auc_macro"]}))
        return
    common.require("data_dir", "model_dir", "split")
    common.check_splits(FLAGS.data_dir, split=FLAGS.split)
    if FLAGS.shift_data_dir:
        common.check_splits(FLAGS.shift_data_dir, shift_split=FLAGS.shift_split or FLAGS.split)
    if FLAGS.retrieval:
        from micle_tf.evaluation import encoder_retrieval
        name = os.path.basename(os.path.abspath(FLAGS.model_dir)) or "encoder"
        encoders = {name: FLAGS.model_dir, **parse_inits(FLAGS.compare_to, "--compare_to",
                                                         required=False)}
        result = encoder_retrieval.evaluate_retrieval(
            encoders, FLAGS.data_dir, FLAGS.split, out_dir=FLAGS.out_dir or FLAGS.model_dir,
            n_boot=FLAGS.n_boot, seed=FLAGS.eval_seed, pairs=[(name, n) for n in encoders
                                                               if n != name])
        print(json.dumps({n: {k: r[k] for k in ("top1", "map", "chance_top1", "ci95")}
                          for n, r in result["reports"].items()}))
        return
    if FLAGS.min_group_size < 1:
        raise app.UsageError(f"--min_group_size must be >= 1, got {FLAGS.min_group_size}")
    kw = dict(level=FLAGS.level, n_boot=FLAGS.n_boot, seed=FLAGS.eval_seed,
              out_dir=FLAGS.out_dir, which=FLAGS.which, batch_size=FLAGS.eval_batch_size,
              subgroups=[s.strip() for s in FLAGS.subgroups if s.strip()] or None,
              min_group_size=FLAGS.min_group_size, use_temperature=FLAGS.use_temperature)
    if FLAGS.shift_data_dir:
        out = ev.evaluate_shift(FLAGS.model_dir, FLAGS.data_dir, FLAGS.shift_data_dir,
                                FLAGS.split, shift_split=FLAGS.shift_split, **kw)
        metrics = out["in_distribution"]["metrics"]
        extra = {"gap": out["gap"], "gap_ci95": out["gap_ci95"]}
    else:
        metrics = ev.evaluate_model_dir(FLAGS.model_dir, FLAGS.data_dir, FLAGS.split, **kw)
        extra = {}
    keys = ("task", "level", "num_cases", "num_images", "top1", "top3", "auc_macro")
    cal = metrics.get("calibration") or {}
    if metrics.get("calibration_after"):
        extra["ece_after_temperature"] = metrics["calibration_after"].get("ece")
    print(json.dumps({**{k: metrics.get(k) for k in keys}, "ci95": {
        k: metrics["ci95"].get(k) for k in ("top1", "auc_macro") if k in metrics["ci95"]},
        "ece": cal.get("ece"), "brier": cal.get("brier"), **extra}))


def run():
    common.run_main(main, "micle-evaluate")


if __name__ == "__main__":
    sys.exit(run())

"""`micle-evaluate`: metrics, report and plots of a fine-tuned classifier; shift evaluation;
label-efficiency sweeps.

  micle-evaluate --data_dir=/tmp/ph2 --model_dir=/tmp/ft_micle --split=test
      -> metrics_test.json, report_test.md, roc_test.png, confusion_test.png in --model_dir
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

from micle_tf import config as config_lib
from micle_tf.cli import common

FLAGS = flags.FLAGS

flags.DEFINE_string("split", None, "Split to evaluate (with --sweep: default test).")
flags.DEFINE_enum("level", "case", ["case", "image"], "case: average each case's image "
                  "probabilities first; image: every image counts. CIs always resample cases.")
flags.DEFINE_integer("n_boot", 1000, "Case-bootstrap resamples for the 95% CIs (0 = none).")
flags.DEFINE_integer("eval_seed", 0, "Bootstrap seed.")
flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to evaluate.")
flags.DEFINE_string("out_dir", None, "Where outputs go (default: --model_dir).")
flags.DEFINE_integer("eval_batch_size", 256, "Prediction batch size.")
flags.DEFINE_string("shift_data_dir", None, "Also evaluate on this dataset (distribution "
                    "shift) and write shift_{split}.json with the gaps.")
flags.DEFINE_string("shift_split", None, "Split of --shift_data_dir (default: --split).")
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

# Fine-tuning flags for --sweep: the micle-finetune flags and defaults.
common.define_model_flags()
common.define_train_flags(batch_size=128, learning_rate=0.16, epochs=30, optimizer="lars",
                          weight_decay=0.0, warmup_epochs=0.0)
flags.DEFINE_integer("ft_proj_selector", 0, "Sweep: projection-head layer feeding the head.")
flags.DEFINE_integer("fine_tune_after_block", -1, "Sweep: -1 trains all layers; 4 = linear "
                     "evaluation.")
flags.DEFINE_enum("uncertainty_policy", "ignore", ["ignore", "ones", "zeros"],
                  "Sweep: multilabel uncertain labels policy.")
flags.DEFINE_float("label_smoothing", 0.0, "Sweep: label smoothing (multiclass).")
flags.DEFINE_enum("augment", "finetune", ["finetune", "none", "derm", "cxr"],
                  "Sweep: training augmentation preset.")
flags.DEFINE_integer("early_stopping_patience", None, "Sweep: early-stopping patience (epochs).")
flags.DEFINE_string("train_split", "train", "Sweep: split to fine-tune on.")
flags.DEFINE_string("eval_split", "val", "Sweep: split validated at each epoch end.")


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
    model = common.model_config_from_flags()
    if not FLAGS["image_size"].present:
        for init in inits.values():
            path = os.path.join(init, "pretrain_config.json")
            if init != "none" and os.path.exists(path):
                with open(path) as f:
                    model.image_size = json.load(f)["config"]["model"]["image_size"]
                break
    names = ["ft_proj_selector", "fine_tune_after_block", "uncertainty_policy",
             "label_smoothing", "augment", "early_stopping_patience", "train_split",
             "eval_split"]
    return config_lib.FinetuneConfig(model=model, **{n: getattr(FLAGS, n) for n in names},
                                     **common.train_kwargs_from_flags())


def main(argv):
    del argv
    common.setup_logging()
    from micle_tf.evaluation import evaluate as ev
    if FLAGS.sweep:
        common.require("data_dir", "sweep_dir")
        inits = parse_inits(FLAGS.sweep_inits)
        try:
            fractions = [float(f) for f in FLAGS.sweep_fractions]
            seeds = [int(s) for s in FLAGS.sweep_seeds]
        except ValueError as e:
            raise app.UsageError(f"bad --sweep_fractions/--sweep_seeds: {e}")
        sweep = ev.run_sweep(FLAGS.data_dir, inits, fractions, seeds, _sweep_config(inits),
                             FLAGS.sweep_dir, split=FLAGS.split or "test", level=FLAGS.level,
                             n_boot=FLAGS.n_boot, eval_seed=FLAGS.eval_seed)
        print(json.dumps({"sweep_dir": FLAGS.sweep_dir, "counts": sweep["counts"],
                          "summary": sweep["summary"]["auc_macro"]}))
        return
    common.require("data_dir", "model_dir", "split")
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
    kw = dict(level=FLAGS.level, n_boot=FLAGS.n_boot, seed=FLAGS.eval_seed,
              out_dir=FLAGS.out_dir, which=FLAGS.which, batch_size=FLAGS.eval_batch_size)
    if FLAGS.shift_data_dir:
        out = ev.evaluate_shift(FLAGS.model_dir, FLAGS.data_dir, FLAGS.shift_data_dir,
                                FLAGS.split, shift_split=FLAGS.shift_split, **kw)
        metrics = out["in_distribution"]["metrics"]
        extra = {"gap": out["gap"], "gap_ci95": out["gap_ci95"]}
    else:
        metrics = ev.evaluate_model_dir(FLAGS.model_dir, FLAGS.data_dir, FLAGS.split, **kw)
        extra = {}
    keys = ("task", "level", "num_cases", "num_images", "top1", "top3", "auc_macro")
    print(json.dumps({**{k: metrics.get(k) for k in keys}, "ci95": {
        k: metrics["ci95"].get(k) for k in ("top1", "auc_macro") if k in metrics["ci95"]},
        **extra}))


def run():
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())

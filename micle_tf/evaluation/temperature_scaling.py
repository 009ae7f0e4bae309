"""Temperature scaling of a fine-tuned model_dir, fitted on its VALIDATION split.

`fit_model_dir` predicts the validation split with the checkpoint that will be evaluated and
exported (the best one by default), fits the temperature(s) of
`micle_tf.evaluation.calibration.fit_temperature` on the model's real logits and writes
`model_dir/calibration.json` (`rundir.CALIBRATION_FILE`). `micle-finetune --calibrate` calls it
after training and `micle-export --calibrate` when the model_dir has no temperature for the
exported checkpoint; `micle-evaluate` then reports before/after figures and `micle-export`
applies it in the serving signatures (`micle_tf.export.serving`).

What is fitted
--------------
* The split: the model's own validation split (`eval_split` of its fine-tuning config, default
  "val"). The training split and "test" are refused: a temperature fitted on the cases it is
  then scored on would make the calibration figures look better than they are.
* The level: IMAGES. A served model answers one image at a time, so the temperature makes
  per-image probabilities calibrated; a case-level evaluation (mean of a case's image
  probabilities) scores the mean of the calibrated image probabilities, as a server
  averaging its answers would.
* The formula (what serving computes): multiclass ``softmax(logits / T)``, multilabel
  ``sigmoid(logits_c / T_c)`` with one temperature per class (``per_class=False``: one shared).

calibration.json: ``{"method", "task", "temperature" (float, or a list per class),
"per_class", "bounds", "at_bound", "formula", "fitted_on": {"split", "level", "num_images",
"num_cases", "data_dir"}, "nll_before", "nll_after" (validation, image level),
"validation_before", "validation_after" (`calibration.calibration_metrics` on the validation
images), "checkpoint": {"which", "step", "fingerprint"}, "versions"}``.
`rundir.read_calibration` ignores it (with a warning) for another checkpoint than the one it
was fitted on (another step, or the same step with other weights: the fingerprint hashes the
checkpoint's index, which holds every tensor's checksum).
"""
import os

import numpy as np
from absl import logging

from data_pipelines.writer import read_info
from micle_tf import inference, rundir
from micle_tf.evaluation import calibration
from micle_tf.evaluation import evaluate as evaluate_lib

FIT_LEVEL = "image"
FORMULA = {"multiclass": "softmax(logits / T)",
           "multilabel": "sigmoid(logits_c / T_c) (one temperature per class)"}


def validation_split(cfg, info, split=None):
    """The split a temperature may be fitted on: `split` or the model's eval_split (default
    "val"); ValueError for the training split, "test", or a split the data lacks."""
    split = split or cfg.eval_split or "val"
    if split in (cfg.train_split, "test"):
        raise ValueError(f"refusing to fit a temperature on the {split!r} split: temperature "
                         "scaling is fitted on the validation split only (never on the cases "
                         "trained on, nor on the test cases it is scored on)")
    if split not in info["splits"]:
        raise ValueError(f"the data has no {split!r} split to fit a temperature on (its splits: "
                         f"{', '.join(sorted(info['splits']))}); pass the validation split's "
                         "name")
    return split


def fit_model_dir(model_dir, data_dir=None, split=None, which="best", batch_size=256,
                  per_class=True):
    """Fits temperature scaling on the validation split of `data_dir` (default: the data the
    model was fine-tuned on) for checkpoint `which`; writes and returns calibration.json."""
    cfg, facts = rundir.load_config(model_dir, "finetune")
    data_dir = data_dir or facts.get("data_dir") or cfg.data_dir
    if not data_dir:
        raise ValueError(f"{model_dir} does not record its data directory: pass the records "
                         "holding its validation split (--data_dir)")
    info = read_info(data_dir)
    split = validation_split(cfg, info, split)
    evaluate_lib.check_split(model_dir, cfg, facts, data_dir, split)
    model, cfg, facts = rundir.load_classifier(model_dir, which)
    task, names = facts["task"], list(facts["label_names"])
    logging.info("fitting temperature scaling on %s/%s (%s level)", data_dir, split, FIT_LEVEL)
    case_ids, labels, probs, logits = inference.predict_split(
        model, data_dir, split, cfg.model.image_size, batch_size, info=info, return_logits=True)
    temperature, details = calibration.fit_temperature(
        logits, labels, task, from_logits=True, per_class=per_class, return_details=True)
    after = calibration.apply_temperature(logits, temperature, task, from_logits=True)
    which_ckpt, step = rundir.checkpoint_origin(model.checkpoint_path)
    out = {
        "method": "temperature scaling (Guo et al., ICML 2017)",
        "task": task,
        "temperature": details["temperature"],
        "per_class": details["per_class"],
        "bounds": details["bounds"],
        "at_bound": details["at_bound"],
        "formula": FORMULA[task],
        "fitted_on": {"split": split, "level": FIT_LEVEL, "num_images": int(len(case_ids)),
                      "num_cases": int(len(set(case_ids.tolist()))),
                      "data_dir": os.path.abspath(data_dir)},
        "nll_before": details["nll_before"],
        "nll_after": details["nll_after"],
        "validation_before": calibration.calibration_metrics(labels, probs, task, names),
        "validation_after": calibration.calibration_metrics(labels, after, task, names),
        "checkpoint": {"which": which_ckpt, "step": step,
                       "fingerprint": rundir.checkpoint_fingerprint(model.checkpoint_path)},
        "versions": rundir.versions(),
    }
    if np.any(details["at_bound"]):
        logging.warning("the fitted temperature %s lies at a bound of %s: the validation split "
                        "may be too small or too one-sided to fit it", details["temperature"],
                        details["bounds"])
    rundir.write_json(os.path.join(model_dir, rundir.CALIBRATION_FILE), out)
    logging.info("temperature scaling: T = %s (validation NLL %.4f -> %.4f) -> %s",
                 details["temperature"], details["nll_before"], details["nll_after"],
                 os.path.join(model_dir, rundir.CALIBRATION_FILE))
    return rundir.clean(out)


def ensure_fitted(model_dir, data_dir=None, split=None, which="best", batch_size=256):
    """calibration.json for checkpoint `which`: the existing one when it was fitted for that
    checkpoint, else a new fit (`fit_model_dir`)."""
    prefix = rundir.classifier_checkpoint(model_dir, which)
    existing = rundir.read_calibration(model_dir, prefix)
    if existing is not None:
        logging.info("%s: using the temperature fitted earlier (T = %s)", model_dir,
                     existing["temperature"])
        return existing
    return fit_model_dir(model_dir, data_dir, split, which, batch_size)

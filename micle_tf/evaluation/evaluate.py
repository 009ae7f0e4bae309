"""Evaluation of fine-tuned classifiers: metrics files, reports, distribution shift.

- `evaluate_model_dir`: one model_dir on one split -> `metrics_{split}.json` (the keys the README lists),
  `report_{split}.md`, `roc_{split}.png`, `reliability_{split}.png` and (multiclass)
  `confusion_{split}.png`. Before any prediction it refuses (ValueError) when the dataset's
  task/label names differ from the model's, when a case of the evaluated split is one the
  model (or its pretraining run) was trained on, or when one of its images has the same
  decoded pixels as a training image.

Beyond the metrics of `metrics.evaluate_predictions`, every evaluation reports calibration
(`calibration`: `calibration.calibration_report` of the evaluated rows - ECE with equal-width
and equal-mass bins, Brier, NLL, case-bootstrap CIs from the same resamples as the other
metrics - plus `reliability`, the equal-width reliability table of the diagram). When the
model_dir holds a temperature fitted on its validation split for the evaluated checkpoint
(`calibration.json`, see `temperature_scaling`), the probabilities the exported model serves
are scored too: `temperature` (that file), `calibration_after`, and `calibrated_metrics`
(top-1, AUC, ... of the calibrated probabilities; a temperature keeps every image's class
order, so image-level top-1/top-3 cannot change, while case means and one-vs-rest AUC over
more than two classes may move slightly). With `subgroups` (attribute names of the records'
`case/attr/*`), `subgroups` holds `subgroups.subgroup_report` (per group metrics with CIs and
case counts, worst group, largest gap; groups under `min_group_size` cases shown as "n < k"),
and `subgroups_after` the same for the calibrated probabilities.
- `evaluate_shift`: the same model on an in-distribution and a shifted dataset ->
  `shift_{split}.json` with both metric sets and the gaps (in-distribution minus shifted).

It reads finished model_dirs through `micle_tf.rundir` and predicts through
`micle_tf.inference`; the label-efficiency sweep, which also trains, is
`micle_tf.training.sweep`.
"""
import os

import numpy as np
from absl import logging

from data_pipelines import reader, splits
from data_pipelines.writer import read_info, write_json_atomic
from micle_tf import inference, rundir
from micle_tf.evaluation import calibration as calibration_lib
from micle_tf.evaluation import metrics as metrics_lib
from micle_tf.evaluation import report as report_lib
from micle_tf.evaluation import subgroups as subgroups_lib

GAP_METRICS = ("top1", "auc_macro")
DEFAULT_MIN_GROUP_SIZE = subgroups_lib.DEFAULT_MIN_GROUP_SIZE
CALIBRATED_KEYS = ("top1", "top3", "auc_macro", "auc_per_class", "sensitivity", "specificity",
                   "ci95", "ci95_skipped")


# ---------------------------------------------------------------------------------- checks
def check_compatible(facts, info, data_dir):
    """The dataset must have the model's task and label names (same order)."""
    if info["task"] != facts["task"]:
        raise ValueError(f"refusing to evaluate: {data_dir} is a {info['task']} dataset but the "
                         f"model was trained for {facts['task']}")
    if list(info["label_names"]) != list(facts["label_names"]):
        raise ValueError(f"refusing to evaluate: the label names of {data_dir} "
                         f"{list(info['label_names'])} differ from the model's "
                         f"{list(facts['label_names'])} (same names in the same order needed)")


def _trained_case_sets(model_dir, cfg, facts):
    """{description: case ids} of every case the model saw in training (fine-tuning cases and,
    for an init_from pretraining dir, its pretraining split), with the salt they were hashed
    with."""
    out = []
    saved = rundir.read_json(os.path.join(model_dir, rundir.TRAIN_CASES_FILE))
    if saved is not None:
        out.append(("the model's fine-tuning cases", saved["case_ids"],
                    facts.get("salt_fingerprint")))
    else:
        data_dir = facts.get("data_dir") or cfg.data_dir
        try:
            ids = [c for c, _, _ in reader.read_case_index(data_dir, cfg.train_split)]
            out.append((f"fine-tuning split {cfg.train_split!r} of {data_dir}", ids,
                        facts.get("salt_fingerprint")))
        except (FileNotFoundError, ValueError) as e:
            logging.warning("cannot read the fine-tuning cases of %s: %s", model_dir, e)
    pre, pre_facts = _pretraining_run(cfg)
    if pre is not None:
        pre_data, pre_split = pre.data_dir, pre.train_split
        salt = pre_facts.get("salt_fingerprint")
        if pre_data and pre_split:
            try:
                ids = [c for c, _, _ in reader.read_case_index(pre_data, pre_split)]
                out.append((f"pretraining split {pre_split!r} of {pre_data}", ids, salt))
            except (FileNotFoundError, ValueError) as e:
                logging.warning("cannot read the pretraining cases of %s (%s): that part of "
                                "the leakage check is skipped", cfg.init_from, e)
    return out


def _pretraining_run(cfg):
    """(PretrainConfig, dataset facts) of the pretraining run a model was initialised from, or
    (None, {}) when it was not a micle-pretrain model_dir."""
    init = cfg.init_from or "none"
    if init == "none" or rundir.run_kind(init) != "pretrain":
        return None, {}
    return rundir.load_config(init, "pretrain")


def check_no_leakage(model_dir, cfg, facts, data_dir, split, info=None):
    """Raises ValueError when a case of `split` in `data_dir` is also in that dataset's
    training split, or among the cases the model (or its pretraining run) was trained on.
    Case ids are salted hashes: ids hashed with another salt cannot collide, and are compared
    anyway (harmless). Returns the evaluated split's case ids."""
    info = info or read_info(data_dir)
    eval_ids = [c for c, _, _ in reader.read_case_index(data_dir, split, info=info)]
    label = f"evaluated split {split!r} of {data_dir}"
    others = []
    if split != cfg.train_split and cfg.train_split in info["splits"]:
        others.append((f"training split {cfg.train_split!r} of {data_dir}",
                       [c for c, _, _ in reader.read_case_index(data_dir, cfg.train_split,
                                                                info=info)]))
    for name, ids, salt in _trained_case_sets(model_dir, cfg, facts):
        if salt is not None and info.get("salt_fingerprint") not in (None, salt):
            logging.info("%s was hashed with another salt than %s: ids cannot coincide", name,
                         data_dir)
        others.append((name, ids))
    for name, ids in others:
        try:
            splits.check_disjoint({label: eval_ids, name: ids})
        except ValueError as e:
            raise ValueError(f"refusing to evaluate (case leakage): {e}") from None
    return eval_ids


def check_no_image_leakage(model_dir, cfg, facts, data_dir, split, info=None):
    """Raises ValueError when an image of `split` has the same decoded pixels (pixel_sha256)
    as an image the model or its pretraining run trained on: the training split of
    `data_dir`, the fine-tuning data's training split, and the pretraining data's training
    split. A copy under another case id (or in another data set) leaks as surely as a shared
    case, and pixel hashes, unlike case ids, do not depend on the salt. Records written before
    the hashes existed are not checked (a warning says so)."""
    info = info or read_info(data_dir)
    evaluated = reader.read_pixel_hashes(data_dir, split, info=info)
    label = f"evaluated split {split!r} of {data_dir}"
    if not evaluated or None in evaluated:
        logging.warning("%s holds images without pixel hashes (records written by an older "
                        "micle-data): the image-level leakage check is skipped; rewrite the "
                        "records with micle-data to enable it", label)
        return
    same = lambda a, b: os.path.abspath(a) == os.path.abspath(b)  # noqa: E731
    candidates = [(data_dir, cfg.train_split)]
    ft_data = facts.get("data_dir") or cfg.data_dir
    if ft_data:
        candidates.append((ft_data, cfg.train_split))
    pre, _ = _pretraining_run(cfg)
    if pre is not None and pre.data_dir and pre.train_split:
        candidates.append((pre.data_dir, pre.train_split))
    checked = []
    for other_dir, other_split in candidates:
        if (same(other_dir, data_dir) and other_split == split) or any(
                same(other_dir, d) and other_split == sp for d, sp in checked):
            continue  # the split itself (the case check covers it), or already compared
        checked.append((other_dir, other_split))
        try:
            trained = reader.read_pixel_hashes(other_dir, other_split)
        except (FileNotFoundError, ValueError) as e:
            logging.warning("cannot read the pixel hashes of split %r of %s (%s): that part of "
                            "the image-level leakage check is skipped", other_split, other_dir, e)
            continue
        shared = [h for h in evaluated if h in trained]
        if shared:
            n = sum(evaluated[h] for h in shared)
            raise ValueError(
                f"refusing to evaluate (image leakage): {n} of {sum(evaluated.values())} images "
                f"of {label} have the same decoded pixels as images of training split "
                f"{other_split!r} of {other_dir} ({len(shared)} distinct contents). Rewrite the "
                "records with micle-data --duplicates=reject (the default) or =group")


def check_split(model_dir, cfg, facts, data_dir, split):
    """Every refusal above, before anything is built: compatible labels, no case leakage, no
    image leakage."""
    info = read_info(data_dir)
    check_compatible(facts, info, data_dir)
    check_no_leakage(model_dir, cfg, facts, data_dir, split, info)
    check_no_image_leakage(model_dir, cfg, facts, data_dir, split, info)


# ------------------------------------------------------------------------------ evaluation
def _level_rows(case_ids, labels, probs, level):
    """(labels, probs, bootstrap groups, case id of each row) at the evaluation level (case:
    the mean of its images' probabilities, one row per case)."""
    if level == "case":
        ids, p, y = metrics_lib.aggregate_by_case(case_ids, probs, labels)
        return y, p, np.arange(len(y)), np.asarray(ids)
    case_ids = np.asarray(case_ids)
    return np.asarray(labels), np.asarray(probs), case_ids, case_ids


def _temperature_label(t):
    return ", ".join(f"{v:.2f}" for v in t) if isinstance(t, list) else f"{t:.2f}"


def _calibrated_markdown(result, temperature, split, data_dir):
    before, after = result, result["calibrated_metrics"]
    ci_b, ci_a = before.get("ci95") or {}, after.get("ci95") or {}
    lines = ["### Metrics of the calibrated probabilities", "",
             "| Metric | Uncalibrated | 95% CI | Calibrated | 95% CI |", "|---|---|---|---|---|"]
    for key, label in (("top1", "Top-1 accuracy"), ("top3", "Top-3 accuracy"),
                       ("auc_macro", "Macro AUC")):
        if before.get(key) is None and after.get(key) is None:
            continue
        lines.append(f"| {label} | {report_lib._fmt(before.get(key))} | "
                     f"{report_lib._fmt_ci(ci_b.get(key))} | {report_lib._fmt(after.get(key))} "
                     f"| {report_lib._fmt_ci(ci_a.get(key))} |")
    lines += ["", after["note"]]
    if np.any(temperature.get("at_bound") or False):
        lo, hi = temperature.get("bounds") or calibration_lib.TEMPERATURE_BOUNDS
        lines += ["", f"The fitted temperature lies at a bound of its search range [{lo:g}, "
                  f"{hi:g}]: the validation predictions gave it little to fit on (at the "
                  "upper bound the probabilities are nearly uniform, as for a model near "
                  "chance)."]
    fitted = temperature.get("fitted_on") or {}
    if fitted.get("split") == split and os.path.abspath(fitted.get("data_dir") or "") == \
            os.path.abspath(data_dir):
        lines += ["", f"**The temperature was fitted on this split ({split}):** the "
                  "after-scaling calibration figures are optimistic. Report them on the test "
                  "split."]
    return "\n".join(lines) + "\n"


def _calibration_section(result):
    cal = result["calibration"]
    return calibration_lib.calibration_markdown(
        cal, result.get("calibration_after"), result.get("temperature"))


def _evaluate_loaded(model, cfg, facts, model_dir, data_dir, split, level, n_boot, seed, out_dir,
                     tag, batch_size, title, predict_fn=None, subgroups=None,
                     min_group_size=DEFAULT_MIN_GROUP_SIZE, temperature=None):
    """Predicts, scores and writes the files of one evaluation (checks done by the caller).
    `temperature`: a calibration.json dict (before/after figures), or None."""
    info = read_info(data_dir)
    names = list(facts["label_names"])
    task = facts["task"]
    attributes = None
    if subgroups:  # before predicting: a missing attribute is the user's mistake
        attributes = reader.read_case_attributes(data_dir, split, info=info)
        subgroups_lib.attributes_for_rows([], attributes, subgroups)
    logging.info("evaluating %s on %s/%s (%s level, %d bootstrap resamples)", model_dir,
                 data_dir, split, level, n_boot)
    case_ids, labels, probs, logits = inference.predict_split(
        model, data_dir, split, cfg.model.image_size, batch_size, info=info,
        predict_fn=predict_fn, return_logits=True)
    result = metrics_lib.evaluate_predictions(
        case_ids, labels, probs, task, names, level=level, n_boot=n_boot, seed=seed,
        label_fraction=cfg.label_fraction, init_from=cfg.init_from)
    result.update(split=split, data_dir=os.path.abspath(data_dir),
                  model_dir=os.path.abspath(model_dir), label_names=names,
                  checkpoint=getattr(model, "checkpoint_path", None),
                  source=info.get("source"))
    y, p, groups, row_ids = _level_rows(case_ids, labels, probs, level)
    cal = calibration_lib.calibration_report(y, p, task, names, n_boot=n_boot, seed=seed,
                                             groups=groups)
    cal["reliability"] = calibration_lib.reliability_data(y, p, task, names)
    result["calibration"] = cal
    series = {"uncalibrated": p}
    sections = []
    if temperature is not None:
        t = temperature["temperature"]
        image_probs = calibration_lib.apply_temperature(logits, t, task, from_logits=True)
        yt, pt, _, _ = _level_rows(case_ids, labels, image_probs, level)
        after = calibration_lib.calibration_report(yt, pt, task, names, n_boot=n_boot,
                                                   seed=seed, groups=groups)
        after["reliability"] = calibration_lib.reliability_data(yt, pt, task, names)
        calibrated = metrics_lib.evaluate_predictions(
            case_ids, labels, image_probs, task, names, level=level, n_boot=n_boot, seed=seed)
        calibrated = {k: calibrated[k] for k in CALIBRATED_KEYS if k in calibrated}
        if task == "multiclass":
            same = bool(np.array_equal(np.argmax(p, axis=1), np.argmax(pt, axis=1)))
            calibrated["same_top1_predictions"] = same
            calibrated["note"] = (
                "A temperature divides every logit of an image by the same T > 0, so each "
                "image's class order - its top-1 and top-3 prediction - is unchanged"
                + ((" (and so are the case-level top-1 predictions here)." if same else
                    "; the mean of a case's image probabilities can still change that case's "
                    "top-1 prediction, as it did here for some cases.") if level == "case"
                   else ".")
                + " AUC can move slightly: with more than two classes the one-vs-rest ranks "
                "across images change"
                + (", and case means weigh a case's images differently after scaling."
                   if level == "case" else " (with two classes image-level AUC cannot)."))
        else:
            calibrated["note"] = (
                "One temperature per class keeps each class's ranking of the images, so "
                "image-level AUC is unchanged (case means can move slightly); decisions at "
                "the 0.5 threshold (top-1 here, sensitivity, specificity) can change.")
        result.update(temperature=temperature, calibration_after=after,
                      calibrated_metrics=calibrated)
        series = {"uncalibrated": p, f"after temperature scaling (T={_temperature_label(t)})":
                  pt}
    sections.append(_calibration_section(result))
    if temperature is not None:
        sections.append(_calibrated_markdown(result, temperature, split, data_dir))
    if attributes is not None:
        rows = subgroups_lib.attributes_for_rows(row_ids, attributes, subgroups)
        kw = dict(groups=groups, min_group_size=min_group_size, n_boot=n_boot, seed=seed)
        result["subgroups"] = subgroups_lib.subgroup_report(y, p, task, names, rows, **kw)
        sections.append(subgroups_lib.subgroup_markdown(result["subgroups"]))
        if temperature is not None:
            result["subgroups_after"] = subgroups_lib.subgroup_report(yt, pt, task, names,
                                                                      rows, **kw)
            sections.append(subgroups_lib.subgroup_markdown(result["subgroups_after"]).replace(
                "## Subgroups", "## Subgroups after temperature scaling", 1))
    result = rundir.clean(result)
    os.makedirs(out_dir, exist_ok=True)
    plots = {"ROC curves": report_lib.plot_roc(y, p, task, names,
                                               os.path.join(out_dir, f"roc_{tag}.png"))}
    if task == "multiclass":
        plots["Confusion matrix"] = report_lib.plot_confusion(
            y, p, names, os.path.join(out_dir, f"confusion_{tag}.png"))
    plots["Reliability diagram"] = calibration_lib.plot_reliability(
        y, series, task, names, os.path.join(out_dir, f"reliability_{tag}.png"))
    result["plots"] = {k: os.path.basename(v) for k, v in plots.items()}
    write_json_atomic(os.path.join(out_dir, rundir.metrics_file(tag)), result)
    report_lib.write_report(result, os.path.join(out_dir, f"report_{tag}.md"), plots=plots,
                            title=title, sections=sections)
    logging.info("%s: top1 %s, auc_macro %s, ECE %s (%d cases)", tag, result.get("top1"),
                 result.get("auc_macro"), cal.get("ece"), result["num_cases"])
    return result, (case_ids, labels, probs)


def evaluate_model_dir(model_dir, data_dir, split, level="case", n_boot=1000, seed=0,
                       out_dir=None, which="best", batch_size=256, subgroups=None,
                       min_group_size=DEFAULT_MIN_GROUP_SIZE, use_temperature=True):
    """Evaluates a micle-finetune model_dir on `split` of `data_dir`; writes
    `metrics_{split}.json`, `report_{split}.md` and PNG plots into out_dir (default model_dir)
    and returns the metrics dict. `which`: "best" (by val AUC) or "latest" checkpoint.
    `subgroups`: case attribute names (e.g. ["sex", "age_band"]) for per-subgroup metrics;
    `use_temperature`: score the temperature-scaled probabilities too when the model_dir
    holds a temperature fitted for this checkpoint (see the module docstring)."""
    cfg, facts = rundir.load_config(model_dir, "finetune")
    check_split(model_dir, cfg, facts, data_dir, split)  # before building anything
    model, cfg, facts = rundir.load_classifier(model_dir, which)
    temperature = (rundir.read_calibration(model_dir, model.checkpoint_path)
                   if use_temperature else None)
    result, _ = _evaluate_loaded(model, cfg, facts, model_dir, data_dir, split, level, n_boot,
                                 seed, out_dir or model_dir, split, batch_size,
                                 f"Evaluation of {os.path.basename(os.path.abspath(model_dir))} "
                                 f"on {split} ({level} level)", subgroups=subgroups,
                                 min_group_size=min_group_size, temperature=temperature)
    return result


def _unpaired_gap_ci(a, b, task, names, level, n_boot, seed, alpha=0.05):
    """Percentile CI of metric(A) - metric(B) from independent case bootstraps of A and B."""
    ya, pa, ga, _ = _level_rows(*a, level)
    yb, pb, gb, _ = _level_rows(*b, level)
    _, da = metrics_lib.bootstrap_ci(ya, pa, ga, task, names, n_boot=n_boot, seed=seed,
                                     metrics=GAP_METRICS, return_details=True)
    _, db = metrics_lib.bootstrap_ci(yb, pb, gb, task, names, n_boot=n_boot, seed=seed + 1,
                                     metrics=GAP_METRICS, return_details=True)
    out = {}
    for m in GAP_METRICS:
        d = da["samples"][m] - db["samples"][m]
        d = d[np.isfinite(d)]
        out[m] = ([float(np.quantile(d, alpha / 2)), float(np.quantile(d, 1 - alpha / 2))]
                  if d.size else [None, None])
    return out


def evaluate_shift(model_dir, in_data_dir, shift_data_dir, split="test", shift_split=None,
                   level="case", n_boot=1000, seed=0, out_dir=None, which="best",
                   batch_size=256, subgroups=None, min_group_size=DEFAULT_MIN_GROUP_SIZE,
                   use_temperature=True):
    """One model on an in-distribution and a shifted dataset (e.g. another site or camera).

    Writes `metrics_{split}.json` (in-distribution), `metrics_shifted_{split}.json`, their
    reports and plots, and `shift_{split}.json`: {"in_distribution", "shifted" (metric sets),
    "gap" ({metric: in - shifted}), "gap_ci95" (unpaired), "ci_note"}. The two case sets differ,
    so there is no paired test: `gap_ci95` comes from independent bootstraps of the two case
    sets (resample each, subtract), and each metric set keeps its own CI. Both evaluations
    report calibration (and the temperature's before/after figures); `subgroups` applies to
    the in-distribution one (the shifted records may carry other attributes)."""
    shift_split = shift_split or split
    out_dir = out_dir or model_dir
    cfg, facts = rundir.load_config(model_dir, "finetune")
    for d, sp in ((in_data_dir, split), (shift_data_dir, shift_split)):
        check_split(model_dir, cfg, facts, d, sp)
    model, cfg, facts = rundir.load_classifier(model_dir, which)
    temperature = (rundir.read_calibration(model_dir, model.checkpoint_path)
                   if use_temperature else None)
    name = os.path.basename(os.path.abspath(model_dir))
    # one trace for both datasets
    predict_fn = inference.make_predict_fn(model, with_logits=True)
    in_res, in_pred = _evaluate_loaded(model, cfg, facts, model_dir, in_data_dir, split, level,
                                       n_boot, seed, out_dir, split, batch_size,
                                       f"Evaluation of {name} on {split} ({level} level)",
                                       predict_fn, subgroups=subgroups,
                                       min_group_size=min_group_size, temperature=temperature)
    sh_res, sh_pred = _evaluate_loaded(model, cfg, facts, model_dir, shift_data_dir, shift_split,
                                       level, n_boot, seed, out_dir, f"shifted_{split}",
                                       batch_size, f"Evaluation of {name} on the shifted set "
                                       f"{shift_split} of {shift_data_dir} ({level} level)",
                                       predict_fn, temperature=temperature)
    gap = {}
    for m in GAP_METRICS:
        a, b = in_res.get(m), sh_res.get(m)
        gap[m] = None if a is None or b is None else float(a - b)
    gap_ci = (_unpaired_gap_ci(in_pred, sh_pred, facts["task"], list(facts["label_names"]),
                               level, n_boot, seed) if n_boot > 0 else {})
    out = rundir.clean({
        "split": split,
        "shift_split": shift_split,
        "level": level,
        "model_dir": os.path.abspath(model_dir),
        "in_distribution": {"data_dir": os.path.abspath(in_data_dir), "metrics": in_res},
        "shifted": {"data_dir": os.path.abspath(shift_data_dir), "metrics": sh_res},
        "gap": gap,
        "gap_ci95": gap_ci,
        "ci_note": ("gap = in-distribution minus shifted. The two evaluations use different "
                    "case sets, so no paired bootstrap is possible: each metric set carries its "
                    "own case-bootstrap CI (ci95), and gap_ci95 is the percentile interval of "
                    "the difference of independent bootstraps of the two case sets."),
    })
    write_json_atomic(os.path.join(out_dir, f"shift_{split}.json"), out)
    logging.info("shift gap (in - shifted): %s", gap)
    return out

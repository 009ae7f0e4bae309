"""Evaluation of fine-tuned classifiers: metrics files, reports, distribution shift, sweeps.

- `evaluate_model_dir`: one model_dir on one split -> `metrics_{split}.json` (DESIGN.md keys),
  `report_{split}.md`, `roc_{split}.png` and (multiclass) `confusion_{split}.png`. Before any
  prediction it refuses (ValueError) when the dataset's task/label names differ from the
  model's, when a case of the evaluated split is one the model (or its pretraining run) was
  trained on, or when one of its images has the same decoded pixels as a training image.
- `evaluate_shift`: the same model on an in-distribution and a shifted dataset ->
  `shift_{split}.json` with both metric sets and the gaps (in-distribution minus shifted).
- `run_sweep`: label-efficiency sweep (init x label fraction x seed) -> `sweep.json`,
  `sweep.md`, `label_efficiency.png`; idempotent (finished runs are reused).
"""
import dataclasses
import json
import math
import os

import numpy as np
from absl import logging

from data_pipelines import reader, splits
from data_pipelines.writer import read_info, write_json_atomic
from micle_tf import config as config_lib
from micle_tf.evaluation import metrics as metrics_lib
from micle_tf.evaluation import report as report_lib

DESIGN_KEYS = ("task", "level", "num_cases", "num_images", "top1", "top3", "auc_macro",
               "auc_per_class", "ci95", "label_fraction", "init_from")
GAP_METRICS = ("top1", "auc_macro")


def _clean(x):
    from micle_tf.training.finetune import _clean as clean
    return clean(x)


def _load_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


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
    from micle_tf.training import finetune as ft
    out = []
    saved = _load_json(os.path.join(model_dir, ft.TRAIN_CASES_FILE))
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
    init = cfg.init_from or "none"
    pre_cfg_path = os.path.join(init, "pretrain_config.json")
    if init != "none" and os.path.exists(pre_cfg_path):
        pre = _load_json(pre_cfg_path)
        pre_data, pre_split = pre["config"].get("data_dir"), pre["config"].get("train_split")
        salt = (pre.get("dataset") or {}).get("salt_fingerprint")
        if pre_data and pre_split:
            try:
                ids = [c for c, _, _ in reader.read_case_index(pre_data, pre_split)]
                out.append((f"pretraining split {pre_split!r} of {pre_data}", ids, salt))
            except (FileNotFoundError, ValueError) as e:
                logging.warning("cannot read the pretraining cases of %s (%s): that part of "
                                "the leakage check is skipped", init, e)
    return out


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
    init = cfg.init_from or "none"
    pre = _load_json(os.path.join(init, "pretrain_config.json")) if init != "none" else None
    if pre and pre["config"].get("data_dir") and pre["config"].get("train_split"):
        candidates.append((pre["config"]["data_dir"], pre["config"]["train_split"]))
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


def _check(model_dir, cfg, facts, data_dir, split):
    info = read_info(data_dir)
    check_compatible(facts, info, data_dir)
    check_no_leakage(model_dir, cfg, facts, data_dir, split, info)
    check_no_image_leakage(model_dir, cfg, facts, data_dir, split, info)


# ------------------------------------------------------------------------------ evaluation
def _level_view(case_ids, labels, probs, level):
    """(labels, probs, groups) at the evaluation level (case = mean of its images)."""
    if level == "case":
        _, p, y = metrics_lib.aggregate_by_case(case_ids, probs, labels)
        return y, p, np.arange(len(y))
    return np.asarray(labels), np.asarray(probs), np.asarray(case_ids)


def _evaluate_loaded(model, cfg, facts, model_dir, data_dir, split, level, n_boot, seed, out_dir,
                     tag, batch_size, title, predict_fn=None):
    """Predicts, scores and writes the files of one evaluation (checks done by the caller)."""
    from micle_tf.training.finetune import predict_split
    info = read_info(data_dir)
    logging.info("evaluating %s on %s/%s (%s level, %d bootstrap resamples)", model_dir,
                 data_dir, split, level, n_boot)
    case_ids, labels, probs = predict_split(model, data_dir, split, cfg.model.image_size,
                                            batch_size, info=info, predict_fn=predict_fn)
    names = list(facts["label_names"])
    result = metrics_lib.evaluate_predictions(
        case_ids, labels, probs, facts["task"], names, level=level, n_boot=n_boot, seed=seed,
        label_fraction=cfg.label_fraction, init_from=cfg.init_from)
    result.update(split=split, data_dir=os.path.abspath(data_dir),
                  model_dir=os.path.abspath(model_dir), label_names=names,
                  checkpoint=getattr(model, "checkpoint_path", None),
                  source=info.get("source"))
    result = _clean(result)
    os.makedirs(out_dir, exist_ok=True)
    y, p, _ = _level_view(case_ids, labels, probs, level)
    plots = {"ROC curves": report_lib.plot_roc(y, p, facts["task"], names,
                                               os.path.join(out_dir, f"roc_{tag}.png"))}
    if facts["task"] == "multiclass":
        plots["Confusion matrix"] = report_lib.plot_confusion(
            y, p, names, os.path.join(out_dir, f"confusion_{tag}.png"))
    result["plots"] = {k: os.path.basename(v) for k, v in plots.items()}
    write_json_atomic(os.path.join(out_dir, f"metrics_{tag}.json"), result)
    report_lib.write_report(result, os.path.join(out_dir, f"report_{tag}.md"), plots=plots,
                            title=title)
    logging.info("%s: top1 %s, auc_macro %s (%d cases)", tag, result.get("top1"),
                 result.get("auc_macro"), result["num_cases"])
    return result, (case_ids, labels, probs)


def evaluate_model_dir(model_dir, data_dir, split, level="case", n_boot=1000, seed=0,
                       out_dir=None, which="best", batch_size=256):
    """Evaluates a micle-finetune model_dir on `split` of `data_dir`; writes
    `metrics_{split}.json`, `report_{split}.md` and PNG plots into out_dir (default model_dir)
    and returns the metrics dict. `which`: "best" (by val AUC) or "latest" checkpoint."""
    from micle_tf.training.finetune import load_classifier, load_finetune_config
    cfg, facts = load_finetune_config(model_dir)
    _check(model_dir, cfg, facts, data_dir, split)  # before building anything
    model, cfg, facts = load_classifier(model_dir, which)
    result, _ = _evaluate_loaded(model, cfg, facts, model_dir, data_dir, split, level, n_boot,
                                 seed, out_dir or model_dir, split, batch_size,
                                 f"Evaluation of {os.path.basename(os.path.abspath(model_dir))} "
                                 f"on {split} ({level} level)")
    return result


def _unpaired_gap_ci(a, b, task, names, level, n_boot, seed, alpha=0.05):
    """Percentile CI of metric(A) - metric(B) from independent case bootstraps of A and B."""
    ya, pa, ga = _level_view(*a, level)
    yb, pb, gb = _level_view(*b, level)
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
                   batch_size=256):
    """One model on an in-distribution and a shifted dataset (e.g. another site or camera).

    Writes `metrics_{split}.json` (in-distribution), `metrics_shifted_{split}.json`, their
    reports and plots, and `shift_{split}.json`: {"in_distribution", "shifted" (metric sets),
    "gap" ({metric: in - shifted}), "gap_ci95" (unpaired), "ci_note"}. The two case sets differ,
    so there is no paired test: `gap_ci95` comes from independent bootstraps of the two case
    sets (resample each, subtract), and each metric set keeps its own CI."""
    from micle_tf.training.finetune import (load_classifier, load_finetune_config,
                                            make_predict_fn)
    shift_split = shift_split or split
    out_dir = out_dir or model_dir
    cfg, facts = load_finetune_config(model_dir)
    for d, sp in ((in_data_dir, split), (shift_data_dir, shift_split)):
        _check(model_dir, cfg, facts, d, sp)
    model, cfg, facts = load_classifier(model_dir, which)
    name = os.path.basename(os.path.abspath(model_dir))
    predict_fn = make_predict_fn(model)  # one trace for both datasets
    in_res, in_pred = _evaluate_loaded(model, cfg, facts, model_dir, in_data_dir, split, level,
                                       n_boot, seed, out_dir, split, batch_size,
                                       f"Evaluation of {name} on {split} ({level} level)",
                                       predict_fn)
    sh_res, sh_pred = _evaluate_loaded(model, cfg, facts, model_dir, shift_data_dir, shift_split,
                                       level, n_boot, seed, out_dir, f"shifted_{split}",
                                       batch_size, f"Evaluation of {name} on the shifted set "
                                       f"{shift_split} of {shift_data_dir} ({level} level)",
                                       predict_fn)
    gap = {}
    for m in GAP_METRICS:
        a, b = in_res.get(m), sh_res.get(m)
        gap[m] = None if a is None or b is None else float(a - b)
    gap_ci = (_unpaired_gap_ci(in_pred, sh_pred, facts["task"], list(facts["label_names"]),
                               level, n_boot, seed) if n_boot > 0 else {})
    out = _clean({
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


# ----------------------------------------------------------------------------------- sweep
_SWEEP_MATCH_KEYS = ("init_from", "label_fraction", "seed", "train_steps", "train_epochs",
                     "steps_per_epoch", "batch_size", "learning_rate", "optimizer",
                     "weight_decay", "fine_tune_after_block", "ft_proj_selector", "train_split")


def _same_run(saved_cfg, cfg):
    diffs = [k for k in _SWEEP_MATCH_KEYS if saved_cfg.get(k) != getattr(cfg, k)]
    if os.path.abspath(saved_cfg.get("data_dir") or "") != os.path.abspath(cfg.data_dir):
        diffs.append("data_dir")
    return diffs


def _fraction_tag(f):
    return f"f{float(f):g}"


def run_sweep(data_dir, inits, fractions, seeds, base_cfg, out_dir, split="test", level="case",
              n_boot=1000, eval_seed=0, metric="auc_macro"):
    """Label-efficiency sweep: fine-tunes every init x fraction x seed into
    `out_dir/{name}/f{fraction}_s{seed}` and evaluates it on `split`.

    inits: {name: init_from}. A run whose finetune_summary.json exists (with the same settings)
    is not trained again, and its metrics_{split}.json is reused when it matches (level, n_boot,
    checkpoint); an interrupted run resumes. A finished run with other settings is an error
    (use another out_dir). Writes `sweep.json`, `sweep.md`, `label_efficiency.png`; returns the
    sweep dict (rows, summary, counts of trained / reused / evaluated runs)."""
    import keras
    from micle_tf.training import finetune as ft
    os.makedirs(out_dir, exist_ok=True)
    rows, counts = [], {"trained": 0, "reused": 0, "evaluated": 0}
    for name, init in inits.items():
        for fraction in fractions:
            for seed in seeds:
                run_dir = os.path.join(out_dir, name, f"{_fraction_tag(fraction)}_s{int(seed)}")
                cfg = dataclasses.replace(base_cfg, data_dir=data_dir, model_dir=run_dir,
                                          init_from=init, label_fraction=float(fraction),
                                          seed=int(seed))
                summary = _load_json(os.path.join(run_dir, ft.SUMMARY_FILE))
                if summary is not None:
                    diffs = _same_run(summary["config"], cfg)
                    if diffs:
                        raise ValueError(f"{run_dir} holds a finished run with other settings "
                                         f"({', '.join(diffs)}); use another sweep directory")
                    counts["reused"] += 1
                    trained = False
                else:
                    logging.info("sweep: fine-tuning %s (init_from=%s, fraction %g, seed %d)",
                                 name, init, fraction, seed)
                    keras.utils.clear_session()
                    summary = ft.run_finetuning(cfg)
                    counts["trained"] += 1
                    trained = True
                metrics = _load_json(os.path.join(run_dir, f"metrics_{split}.json"))
                best = ft.classifier_checkpoint(run_dir, "best")
                if (trained or metrics is None or metrics.get("level") != level
                        or metrics.get("n_boot") != n_boot or metrics.get("checkpoint") != best):
                    keras.utils.clear_session()
                    metrics = evaluate_model_dir(run_dir, data_dir, split, level=level,
                                                 n_boot=n_boot, seed=eval_seed)
                    counts["evaluated"] += 1
                ci = metrics.get("ci95") or {}
                rows.append({
                    "init": name, "init_from": init, "label_fraction": float(fraction),
                    "seed": int(seed), "top1": metrics.get("top1"), "top3": metrics.get("top3"),
                    "auc_macro": metrics.get("auc_macro"),
                    "ci95": {k: ci.get(k) for k in ("top1", "auc_macro")},
                    "num_cases": metrics.get("num_cases"),
                    "num_labelled_cases": summary.get("num_labelled_cases"),
                    "num_labelled_images": summary.get("num_labelled_images"),
                    "final_step": summary.get("final_step"),
                    "model_dir": os.path.abspath(run_dir), "trained_now": trained})
    summaries = {m: report_lib.label_efficiency_table(rows, m) for m in ("auc_macro", "top1")}
    plot = report_lib.plot_label_efficiency(rows, os.path.join(out_dir, "label_efficiency.png"),
                                            metric=metric, band="std")
    sweep = _clean({
        "data_dir": os.path.abspath(data_dir), "split": split, "level": level, "n_boot": n_boot,
        "metric": metric, "inits": dict(inits), "fractions": [float(f) for f in fractions],
        "seeds": [int(s) for s in seeds], "rows": rows,
        "summary": {m: s for m, (s, _) in summaries.items()},
        "counts": counts, "plot": os.path.basename(plot),
        "base_config": config_lib.to_dict(base_cfg),
    })
    write_json_atomic(os.path.join(out_dir, "sweep.json"), sweep)
    _write_sweep_md(os.path.join(out_dir, "sweep.md"), sweep, summaries)
    logging.info("sweep: %d runs (%d trained, %d reused) -> %s", len(rows), counts["trained"],
                 counts["reused"], out_dir)
    return sweep


def _fmt(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _write_sweep_md(path, sweep, summaries):
    lines = ["# Label-efficiency sweep", "",
             f"Evaluated on `{sweep['split']}` of `{sweep['data_dir']}` at {sweep['level']} "
             f"level; {sweep['n_boot']} case-bootstrap resamples per run. Inits: "
             + ", ".join(f"`{k}` = `{v}`" for k, v in sweep["inits"].items())
             + f". Seeds: {sweep['seeds']}.", ""]
    for m, (_, md) in summaries.items():
        lines += [f"## {m}", "", md]
    lines += ["Across-seed spread is the sample std (0 with one seed); the per-run 95% CIs "
              "below are case bootstraps of one run.", "", "## Runs", "",
              "| init | fraction | seed | labelled cases | top-1 [95% CI] | AUC [95% CI] |",
              "|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        ci = r["ci95"]

        def cell(m):
            lo, hi = (ci.get(m) or [None, None])
            return f"{_fmt(r[m])} [{_fmt(lo)}, {_fmt(hi)}]"
        lines.append(f"| {r['init']} | {r['label_fraction']:g} | {r['seed']} | "
                     f"{r['num_labelled_cases']} | {cell('top1')} | {cell('auc_macro')} |")
    lines += ["", f"![label efficiency]({sweep['plot']})", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))

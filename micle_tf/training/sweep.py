"""The label-efficiency sweep: fine-tune every init x label fraction x seed, evaluate each run.

`run_sweep` orchestrates training and evaluation (micle-evaluate --sweep and micle-demo call
it), so it lives with training: `micle_tf.evaluation` only reads finished model_dirs. It is
idempotent: a finished run is reused, an interrupted one resumes, and a run's metrics file is
reused when it matches the requested evaluation.
"""
import dataclasses
import math
import os

import keras
from absl import logging

from data_pipelines.writer import write_json_atomic
from micle_tf import config as config_lib, rundir
from micle_tf.evaluation import report as report_lib
from micle_tf.evaluation.evaluate import evaluate_model_dir
from micle_tf.training.finetune import run_finetuning

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
    os.makedirs(out_dir, exist_ok=True)
    rows, counts = [], {"trained": 0, "reused": 0, "evaluated": 0}
    for name, init in inits.items():
        for fraction in fractions:
            for seed in seeds:
                run_dir = os.path.join(out_dir, name, f"{_fraction_tag(fraction)}_s{int(seed)}")
                cfg = dataclasses.replace(base_cfg, data_dir=data_dir, model_dir=run_dir,
                                          init_from=init, label_fraction=float(fraction),
                                          seed=int(seed))
                summary = rundir.read_json(os.path.join(run_dir, rundir.FINETUNE_SUMMARY_FILE))
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
                    summary = run_finetuning(cfg)
                    counts["trained"] += 1
                    trained = True
                metrics = rundir.read_json(os.path.join(run_dir, rundir.metrics_file(split)))
                best = rundir.classifier_checkpoint(run_dir, "best")
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
    sweep = rundir.clean({
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

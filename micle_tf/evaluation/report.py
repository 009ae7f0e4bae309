"""Plots and Markdown reports for evaluation results (numpy + matplotlib, no display needed).

Figures are drawn with matplotlib's object-oriented API on the Agg canvas
(``matplotlib.figure.Figure`` + ``FigureCanvasAgg``) - the Agg backend without touching pyplot's
global state or the process-wide backend selection.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

PathLike = Union[str, "os.PathLike[str]"]


def _new_figure(figsize=(6.0, 5.0)) -> Figure:
    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_roc(labels, probs, task: str, label_names: Sequence[str], path: PathLike) -> str:
    """One one-vs-rest ROC curve per class (AUC in the legend) -> PNG at ``path``; returns path.

    Multilabel uses only each class's 0/1 entries (uncertain -1 / missing -2 excluded). Classes
    whose ROC is undefined (only one of positive/negative present) are listed as "undefined"
    in the legend without a curve.
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for j, name in enumerate(label_names):
        if task == "multiclass":
            y = (labels == j).astype(int)
            s = probs[:, j]
        elif task == "multilabel":
            present = labels[:, j] >= 0
            y = (labels[present, j] == 1).astype(int)
            s = probs[present, j]
        else:
            raise ValueError(f"unknown task {task!r}")
        if y.size == 0 or y.min() == y.max():
            ax.plot([], [], label=f"{name} (AUC undefined)")
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC = {roc_auc_score(y, s):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("ROC curves (one-vs-rest)")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def confusion_counts(labels, probs, num_classes: int) -> np.ndarray:
    """Confusion matrix ``[true, predicted]`` of argmax predictions (int counts)."""
    labels = np.asarray(labels).astype(np.int64)
    pred = np.argmax(np.asarray(probs), axis=1)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def plot_confusion(labels, probs, label_names: Sequence[str], path: PathLike) -> str:
    """Multiclass confusion matrix (rows = true class, columns = argmax prediction), with the
    count in every cell -> PNG at ``path``; returns path."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("plot_confusion is for multiclass labels [N]")
    if np.any(labels < 0):
        raise ValueError("labels contain negative (unlabelled) values")
    c = len(label_names)
    cm = confusion_counts(labels, probs, c)
    size = max(4.0, 0.6 * c + 2.5)
    fig = _new_figure((size, size))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(c)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([str(n) for n in label_names], rotation=45, ha="right")
    ax.set_yticklabels([str(n) for n in label_names])
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title("Confusion matrix (counts)")
    vmax = cm.max() if cm.size else 0
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if vmax and cm[i, j] > vmax / 2 else "black", fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Markdown report
# ----------------------------------------------------------------------------------------------
def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.{digits}f}"
    return str(x)


def _fmt_ci(ci: Optional[Sequence[Any]]) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def write_report(metrics: Mapping[str, Any], path_md: PathLike,
                 plots: Optional[Union[Mapping[str, PathLike], Sequence[PathLike]]] = None,
                 title: str = "Evaluation report",
                 sections: Optional[Sequence[str]] = None) -> str:
    """Write a Markdown report of an ``evaluate_predictions`` dict; returns the path.

    Contents: run facts (task, level, cases/images, init_from, label_fraction, threshold,
    bootstrap resamples), a headline table (top-1, top-3, macro AUC with 95% CIs), a per-class
    table (AUC with CI, positives, and sensitivity/specificity with CIs for multilabel), binary
    sensitivity/specificity where present, ``sections`` (further Markdown blocks, e.g.
    calibration and subgroups, in order), and image links to ``plots`` (a ``{caption: path}``
    mapping or a list of paths), written relative to the report's folder.
    """
    path_md = os.fspath(path_md)
    out_dir = os.path.dirname(os.path.abspath(path_md))
    ci = metrics.get("ci95") or {}
    lines: List[str] = [f"# {title}", ""]
    facts = [("Task", metrics.get("task")), ("Level", metrics.get("level")),
             ("Cases", metrics.get("num_cases")), ("Images", metrics.get("num_images")),
             ("Initialisation (init_from)", metrics.get("init_from")),
             ("Label fraction", None if metrics.get("label_fraction") is None
              else f"{float(metrics['label_fraction']):g}"),
             ("Threshold", metrics.get("threshold")),
             ("Bootstrap resamples (over cases)", metrics.get("n_boot"))]
    lines += ["| Item | Value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in facts]
    lines += ["", "## Headline metrics", "", "| Metric | Value | 95% CI |", "|---|---|---|"]
    for key, label in (("top1", "Top-1 accuracy"), ("top3", "Top-3 accuracy"),
                       ("auc_macro", "Macro AUC")):
        lines.append(f"| {label} | {_fmt(metrics.get(key))} | {_fmt_ci(ci.get(key))} |")

    sens, spec = metrics.get("sensitivity"), metrics.get("specificity")
    per_class_ss = isinstance(sens, Mapping)
    auc_pc = metrics.get("auc_per_class") or {}
    if auc_pc:
        support = metrics.get("support") or {}
        lines += ["", "## Per-class AUC", ""]
        head = "| Class | AUC | 95% CI | Positives |"
        sep = "|---|---|---|---|"
        if per_class_ss:
            head += " Sensitivity | 95% CI | Specificity | 95% CI |"
            sep += "---|---|---|---|"
        lines += [head, sep]
        for name, auc in auc_pc.items():
            row = (f"| {name} | {_fmt(auc)} | {_fmt_ci(ci.get(f'auc/{name}'))} "
                   f"| {_fmt(support.get(name))} |")
            if per_class_ss:
                row += (f" {_fmt(sens.get(name))} | {_fmt_ci(ci.get(f'sensitivity/{name}'))} "
                        f"| {_fmt(spec.get(name))} | {_fmt_ci(ci.get(f'specificity/{name}'))} |")
            lines.append(row)
    if sens is not None and not per_class_ss:
        lines += ["", f"## Sensitivity / specificity (threshold {_fmt(metrics.get('threshold'))})",
                  "", "| Metric | Value | 95% CI |", "|---|---|---|",
                  f"| Sensitivity | {_fmt(sens)} | {_fmt_ci(ci.get('sensitivity'))} |",
                  f"| Specificity | {_fmt(spec)} | {_fmt_ci(ci.get('specificity'))} |"]
    skipped = {k: v for k, v in (metrics.get("ci95_skipped") or {}).items() if v}
    if skipped:
        lines += ["", "Bootstrap resamples skipped because the metric was undefined: "
                  + ", ".join(f"{k}: {v}" for k, v in skipped.items()) + "."]
    for section in sections or ():
        lines += [""] + section.rstrip("\n").split("\n")
    if plots:
        items = plots.items() if isinstance(plots, Mapping) else (
            (os.path.splitext(os.path.basename(os.fspath(p)))[0], p) for p in plots)
        lines += ["", "## Plots", ""]
        for caption, p in items:
            rel = os.path.relpath(os.path.abspath(os.fspath(p)), out_dir).replace(os.sep, "/")
            lines += [f"![{caption}]({rel})", ""]
    parent = os.path.dirname(path_md)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path_md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path_md


# ----------------------------------------------------------------------------------------------
# Label efficiency
# ----------------------------------------------------------------------------------------------
def _summarise(rows: Sequence[Mapping[str, Any]], metric: str) -> List[Dict[str, Any]]:
    groups: Dict[Tuple[str, float], List[Tuple[Any, float]]] = {}
    for r in rows:
        v = r.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        key = (str(r["init"]), float(r["label_fraction"]))
        groups.setdefault(key, []).append((r.get("seed"), float(v)))
    out = []
    for (init, frac), vals in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        x = np.array([v for _, v in vals])
        out.append({"init": init, "label_fraction": frac, "metric": metric,
                    "n_seeds": int(x.size), "seeds": [s for s, _ in vals],
                    "mean": float(x.mean()),
                    "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
                    "min": float(x.min()), "max": float(x.max())})
    return out


def label_efficiency_table(rows: Sequence[Mapping[str, Any]], metric: str = "auc_macro"
                           ) -> Tuple[List[Dict[str, Any]], str]:
    """Summarise label-efficiency runs over seeds.

    ``rows``: dicts ``{"init": str, "label_fraction": float, "seed": int, metric: float}``;
    rows whose metric is missing/None/NaN are ignored. Returns ``(summary, markdown)``:
    ``summary`` is one dict per (init, label_fraction) with ``n_seeds``, ``seeds``, ``mean``,
    ``std`` (sample std, ddof=1; 0.0 for a single seed), ``min`` and ``max``; ``markdown`` is a
    table with one row per label fraction and one ``mean ± std (n)`` column per init.
    """
    summary = _summarise(rows, metric)
    inits = sorted({s["init"] for s in summary})
    fracs = sorted({s["label_fraction"] for s in summary})
    cell = {(s["init"], s["label_fraction"]): s for s in summary}
    lines = [f"| Label fraction | " + " | ".join(inits) + " |",
             "|---|" + "---|" * len(inits)]
    for fr in fracs:
        cells = []
        for init in inits:
            s = cell.get((init, fr))
            cells.append("—" if s is None else
                         f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n_seeds']})")
        lines.append(f"| {fr:g} | " + " | ".join(cells) + " |")
    md = f"{metric} (mean ± std over seeds)\n\n" + "\n".join(lines) + "\n"
    return summary, md


def plot_label_efficiency(rows: Sequence[Mapping[str, Any]], path: PathLike,
                          metric: str = "auc_macro", band: str = "std", log_x: bool = True) -> str:
    """Line plot of ``metric`` vs label fraction, one line per init (mean over seeds) with a
    shaded band: ``band="std"`` (default) mean ± sample std over seeds, ``"minmax"`` the min/max
    over seeds. ``log_x`` puts the label fraction on a log axis. Returns the PNG path."""
    if band not in ("std", "minmax"):
        raise ValueError(f"band must be 'std' or 'minmax', got {band!r}")
    summary = _summarise(rows, metric)
    fig = _new_figure((6.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for init in sorted({s["init"] for s in summary}):
        pts = sorted((s for s in summary if s["init"] == init), key=lambda s: s["label_fraction"])
        x = np.array([s["label_fraction"] for s in pts])
        m = np.array([s["mean"] for s in pts])
        if band == "std":
            sd = np.array([s["std"] for s in pts])
            lo, hi = m - sd, m + sd
        else:
            lo = np.array([s["min"] for s in pts])
            hi = np.array([s["max"] for s in pts])
        line, = ax.plot(x, m, marker="o", label=init)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if log_x and summary and all(s["label_fraction"] > 0 for s in summary):
        ax.set_xscale("log")
    ax.set_xlabel("Label fraction")
    ax.set_ylabel(metric)
    ax.set_title(f"Label efficiency ({'mean ± std' if band == 'std' else 'mean, min-max'} "
                 "over seeds)")
    ax.grid(True, alpha=0.3)
    if summary:
        ax.legend(fontsize="small")
    return _save(fig, path)

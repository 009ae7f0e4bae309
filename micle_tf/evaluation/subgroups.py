"""Performance per patient subgroup (sex, age band, view, ...) with case-bootstrap CIs, the
worst group and the largest gap, suppressing groups too small to report.

Pure numpy (through ``metrics.py`` and ``calibration.py``). Inputs are the predictions one
evaluation produces - ``labels`` / ``probs`` as in ``metrics.py``, one row per case (case-level
evaluation) or per image with ``groups`` = the rows' case ids - plus ``attributes``:
``{attribute: value per row}``, e.g. built from ``data_pipelines.reader.read_case_attributes``
with ``attributes_for_rows``.

Definitions
-----------
* Each attribute is analysed on its own (``--subgroups=sex,age_band`` gives one table per
  attribute; intersections such as sex x age band are not formed). A row whose value is
  missing (None or "") is counted in the group "unknown", which is reported like any other.
* Metrics per group: ``top1``, ``auc_macro`` (and ``top3``) exactly as ``metrics.compute_metrics``
  defines them; ``ece``, ``ece_equal_mass``, ``brier``, ``nll`` as in ``calibration.py``; each
  with a percentile 95% CI from resampling that group's cases with replacement (``n_boot``
  resamples, the same seed for every group).
* Group size = its number of CASES (distinct ``groups``), not images. A group with fewer than
  ``min_group_size`` cases is suppressed: it is listed with ``"n_cases": "n < k"`` and no
  metric, and takes no part in the worst group or the gap (a small group's metrics are noise,
  and its size could single out patients). When exactly one group of an attribute is
  suppressed, the smallest reported group's size is withheld too (``"n >= k (withheld)"``, no
  ``num_samples``; its metrics stay): otherwise the split's case count minus the others would
  give the suppressed size away (complementary suppression, ``hidden_sizes``).
* Worst group: per metric, over the reported groups whose value is defined, the lowest value
  of a metric where higher is better (top-1, AUC) and the highest of one where lower is better
  (ECE, Brier, NLL); ties go to the first group in sorted order. Gap: the largest difference
  between two reported groups, ``max - min`` (>= 0); ``None`` with fewer than two defined values.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from micle_tf.evaluation import calibration
from micle_tf.evaluation.metrics import (_MetricEngine, _bootstrap_samples, _percentile_ci,
                                         _validate, compute_metrics)

DEFAULT_METRICS = ("top1", "auc_macro", "ece", "brier")
DEFAULT_MIN_GROUP_SIZE = 10
UNKNOWN = "unknown"
HIGHER_IS_BETTER = {"top1": True, "top3": True, "auc_macro": True, "ece": False,
                    "ece_equal_mass": False, "brier": False, "nll": False}
_CLASSIFICATION = ("top1", "top3", "auc_macro")


def suppressed_label(min_group_size: int) -> str:
    """What a suppressed group shows instead of its size: "n < k"."""
    return f"n < {int(min_group_size)}"


def withheld_label(min_group_size: int) -> str:
    """What a reported group whose size is withheld shows instead: "n >= k (withheld)"."""
    return f"n >= {int(min_group_size)} (withheld)"


def hidden_sizes(sizes: Mapping[str, int], min_group_size: int) -> set:
    """The groups of ``{group: size}`` whose size must not be shown: those under
    ``min_group_size``, and when that is exactly one, the smallest of the others too (ties:
    the first in sorted order), so that a known total minus the shown sizes reveals nothing."""
    small = {g for g, n in sizes.items() if n < min_group_size}
    if len(small) == 1 and len(sizes) > 1:
        small.add(min((n, g) for g, n in sizes.items() if g not in small)[1])
    return small


def attributes_for_rows(case_ids, case_attributes: Mapping[str, Mapping[str, str]],
                        names: Iterable[str]) -> Dict[str, np.ndarray]:
    """``{name: value per row}`` for the rows' ``case_ids`` from
    ``reader.read_case_attributes`` output (``{case_id: {name: token}}``). A case without the
    attribute gets "unknown"; an attribute that no case of the split carries is an error
    naming the ones that exist (the records of this source do not have it)."""
    names = [n.strip() for n in names if n and n.strip()]
    present = sorted({k for a in case_attributes.values() for k in a})
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"no case carries the attribute(s) {missing}; the records have "
                         f"{present or 'no case attributes'} (see data_pipelines/schema.py: "
                         "case/attr/*, written by the converters that have them)")
    ids = [c.decode() if isinstance(c, bytes) else str(c) for c in np.asarray(case_ids).tolist()]
    return {n: np.array([case_attributes.get(c, {}).get(n, UNKNOWN) for c in ids], dtype=object)
            for n in names}


class _Combined:
    """Dispatches metric names to metrics._MetricEngine and calibration's engine, so one set
    of case resamples serves both."""

    def __init__(self, labels, probs, task, label_names, metrics, n_bins, threshold):
        self.num_rows = len(probs)
        self.cls = _MetricEngine(labels, probs, task, label_names, threshold) \
            if any(m in _CLASSIFICATION for m in metrics) else None
        self.cal = calibration._CalibrationEngine(labels, probs, task, label_names, n_bins) \
            if any(m not in _CLASSIFICATION for m in metrics) else None

    def __call__(self, weights, metrics):
        out = {}
        a = [m for m in metrics if m in _CLASSIFICATION]
        b = [m for m in metrics if m not in _CLASSIFICATION]
        if a:
            out.update(self.cls(weights, a))
        if b:
            out.update(self.cal(weights, b))
        return out


def _point_values(labels, probs, task, label_names, metrics, n_bins, threshold):
    out = {}
    if any(m in _CLASSIFICATION for m in metrics):
        point = compute_metrics(labels, probs, task, label_names, threshold)
        out.update({m: point.get(m) for m in metrics if m in _CLASSIFICATION})
    cal = [m for m in metrics if m not in _CLASSIFICATION]
    if cal:
        point = calibration.calibration_metrics(labels, probs, task, label_names, n_bins)
        out.update({m: point[m] for m in cal})
    return out


def _group_metrics(labels, probs, groups, task, label_names, metrics, n_boot, seed, n_bins,
                   threshold, alpha):
    out: Dict[str, Any] = dict(_point_values(labels, probs, task, label_names, metrics, n_bins,
                                             threshold))
    ci: Dict[str, List[Optional[float]]] = {}
    skipped: Dict[str, int] = {}
    if n_boot > 0:
        engine = _Combined(labels, probs, task, label_names, metrics, n_bins, threshold)
        (samples,) = _bootstrap_samples(engine, groups, list(metrics), n_boot, seed)
        for m in metrics:
            ci[m] = _percentile_ci(samples[m], alpha)
            skipped[m] = int(np.isnan(samples[m]).sum())
    out["ci95"] = ci
    out["ci95_skipped"] = skipped
    return out


def _value_key(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return UNKNOWN
    if isinstance(v, bytes):
        v = v.decode()
    v = str(v)
    return v if v else UNKNOWN


def subgroup_report(labels, probs, task: str, label_names: Sequence[str],
                    attributes: Mapping[str, Sequence[Any]], groups=None,
                    min_group_size: int = DEFAULT_MIN_GROUP_SIZE, n_boot: int = 1000,
                    seed: int = 0, metrics: Sequence[str] = DEFAULT_METRICS,
                    n_bins: int = calibration.DEFAULT_BINS, threshold: float = 0.5,
                    alpha: float = 0.05) -> Dict[str, Any]:
    """Per-subgroup metrics (see the module docstring).

    Returns ``{"metrics", "higher_is_better", "min_group_size", "n_boot", "seed",
    "attributes": {attribute: {"groups": {value: group}, "worst": {metric: {"group", "value"}
    or None}, "gap": {metric: float or None}}}}`` where a reported group is ``{"n_cases",
    "num_samples", <metric>: value or None, "ci95": {metric: [lo, hi]}, "ci95_skipped"}`` (a
    group whose size is withheld: ``"n_cases": "n >= k (withheld)"``, ``"size_withheld": True``
    and no ``num_samples``) and a suppressed one ``{"n_cases": "n < k", "suppressed": True}``.
    Groups are sorted by value."""
    labels_v, probs_v = _validate(labels, probs, task, label_names)
    n = len(probs_v)
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(f"unknown subgroup metric(s) {unknown}; available: "
                         f"{sorted(HIGHER_IS_BETTER)}")
    if task == "multilabel" and "top3" in metrics:
        metrics.remove("top3")
    if int(min_group_size) < 1:
        raise ValueError(f"min_group_size must be >= 1, got {min_group_size}")
    groups_v = np.arange(n) if groups is None else np.asarray(groups)
    if len(groups_v) != n:
        raise ValueError(f"{len(groups_v)} group ids for {n} rows")
    if not attributes:
        raise ValueError("no subgroup attribute given")
    report: Dict[str, Any] = {
        "metrics": metrics, "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in metrics},
        "min_group_size": int(min_group_size), "n_boot": int(n_boot), "seed": int(seed),
        "attributes": {}}
    for name, values in attributes.items():
        values = np.array([_value_key(v) for v in np.asarray(values, dtype=object).tolist()],
                          dtype=object)
        if len(values) != n:
            raise ValueError(f"attribute {name!r}: {len(values)} values for {n} rows")
        table: Dict[str, Any] = {}
        rows_of = {value: np.flatnonzero(values == value)
                   for value in sorted(set(values.tolist()))}
        sizes = {value: int(len(np.unique(groups_v[rows]))) for value, rows in rows_of.items()}
        hidden = hidden_sizes(sizes, min_group_size)
        for value, rows in rows_of.items():
            n_cases = sizes[value]
            if n_cases < min_group_size:
                table[value] = {"n_cases": suppressed_label(min_group_size), "suppressed": True}
                continue
            if value in hidden:
                g = {"n_cases": withheld_label(min_group_size), "size_withheld": True,
                     "suppressed": False}
            else:
                g = {"n_cases": n_cases, "num_samples": int(len(rows)), "suppressed": False}
            g.update(_group_metrics(labels_v[rows], probs_v[rows], groups_v[rows], task,
                                    label_names, metrics, n_boot, seed, n_bins, threshold,
                                    alpha))
            table[value] = g
        worst, gap = {}, {}
        for m in metrics:
            defined = [(v, g[m]) for v, g in table.items()
                       if not g["suppressed"] and g.get(m) is not None]
            if not defined:
                worst[m], gap[m] = None, None
                continue
            pick = min if HIGHER_IS_BETTER[m] else max
            best_value = pick(val for _, val in defined)
            group = next(v for v, val in defined if val == best_value)
            worst[m] = {"group": group, "value": float(best_value)}
            vals = [val for _, val in defined]
            gap[m] = float(max(vals) - min(vals)) if len(vals) > 1 else None
        report["attributes"][name] = {"groups": table, "worst": worst, "gap": gap,
                                      "num_suppressed": sum(1 for g in table.values()
                                                            if g["suppressed"])}
    return report


_LABELS = {"top1": "Top-1", "top3": "Top-3", "auc_macro": "Macro AUC", "ece": "ECE",
           "ece_equal_mass": "ECE (equal mass)", "brier": "Brier", "nll": "NLL"}


def _fmt(x):
    return "n/a" if x is None else f"{float(x):.3f}"


def _fmt_ci(ci):
    return "" if not ci or ci[0] is None else f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def subgroup_markdown(report: Mapping[str, Any]) -> str:
    """Markdown tables of a ``subgroup_report``: one per attribute, a row per group (value and
    95% CI per metric, suppressed groups as "n < k"), then the worst group and the gap."""
    metrics = report["metrics"]
    k = report["min_group_size"]
    lines = ["## Subgroups", "",
             f"Each attribute separately; 95% CIs from {report['n_boot']} case resamples within "
             f"the group; groups with fewer than {k} cases are suppressed (shown as "
             f"\"{suppressed_label(k)}\") and excluded from the worst group and the gap; "
             f"when one is, the next smallest group's size is withheld (\"{withheld_label(k)}\")"
             f" so that it cannot be worked out from the total.", ""]
    for name, a in report["attributes"].items():
        lines += [f"### {name}", "",
                  "| Group | Cases | " + " | ".join(_LABELS[m] for m in metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        for value, g in a["groups"].items():
            if g["suppressed"]:
                cells = ["—"] * len(metrics)
            else:
                cells = [f"{_fmt(g.get(m))}{_fmt_ci(g['ci95'].get(m))}" for m in metrics]
            lines.append(f"| {value} | {g['n_cases']} | " + " | ".join(cells) + " |")
        worst = [("—" if a["worst"][m] is None else
                  f"{a['worst'][m]['group']} ({_fmt(a['worst'][m]['value'])})") for m in metrics]
        lines.append("| **worst group** | | " + " | ".join(worst) + " |")
        lines.append("| **largest gap** | | " + " | ".join(_fmt(a["gap"][m]) for m in metrics)
                     + " |")
        lines.append("")
    return "\n".join(lines)

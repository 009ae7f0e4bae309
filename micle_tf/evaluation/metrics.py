"""Classification metrics, case-level aggregation and case-level bootstrap confidence intervals.

Pure numpy / scikit-learn (no TensorFlow), so the evaluation code is fast and testable on its own.

Label encodings (the contract shared with the data pipelines)
--------------------------------------------------------------
* ``task="multiclass"``: ``labels`` is an int array ``[N]`` with values ``0..C-1``. A negative
  value means "unlabelled"; passing one to the metrics is an error (filter first).
* ``task="multilabel"``: ``labels`` is an int array ``[N, C]`` with codes ``1`` positive,
  ``0`` negative, ``-1`` uncertain, ``-2`` missing. Metrics use, per class, only the entries
  that are 0 or 1; uncertain and missing entries are excluded for that class only.
* ``probs`` is a float array ``[N, C]``: softmax rows (multiclass) or independent sigmoids
  (multilabel).

Metric definitions
------------------
* ``top1``: multiclass accuracy of ``argmax(probs)`` (ties go to the lower class index).
  Multilabel: for each class, the accuracy of ``probs >= threshold`` over that class's present
  (0/1) entries; ``top1`` is the unweighted mean of these per-class accuracies over the classes
  that have at least one present entry (a macro average, so rare classes count as much as
  frequent ones).
* ``top3``: multiclass only (``None`` for multilabel): fraction of rows whose label is among the
  ``min(3, C)`` highest probabilities. It is computed, not assumed, so it is 1.0 when ``C <= 3``.
* ``auc_per_class``: one-vs-rest ROC AUC per class (``sklearn.metrics.roc_auc_score``), or
  ``None`` when only one of positive/negative is present for that class.
* ``auc_macro``: mean of the defined per-class AUCs; ``None`` when none is defined.
* ``sensitivity`` / ``specificity`` at ``threshold``: multiclass with ``C == 2`` (positive class
  index 1, predicted positive iff ``probs[:, 1] >= threshold``) as floats; multilabel as
  ``{label_name: value}`` per class (predicted positive iff ``probs[:, c] >= threshold``).
  A value is ``None`` when its denominator (number of positives/negatives) is zero. Absent for
  multiclass with ``C > 2``.

All returned numbers are plain Python ``float``/``int``/``None`` so the dicts are JSON-serialisable.

Bootstrap
---------
CIs resample *groups* (cases) with replacement: every row of a drawn case comes along and a case
drawn twice contributes twice. This is implemented exactly as integer per-row weights (the
number of times the row's case was drawn), and every metric, the AUC included, is computed from
those weights in a vectorised way (the weighted AUC is the pair-counting Mann-Whitney statistic,
identical to ``roc_auc_score`` on the duplicated rows). Resamples where a metric is undefined
(e.g. a class with no positives drawn) are skipped for that metric and counted. Intervals are
percentile intervals ``[q(alpha/2), q(1 - alpha/2)]`` (numpy's default linear interpolation).
Within a resample, ``auc_macro`` uses the same definition as the point estimate: the mean of
the per-class AUCs defined *in that resample*.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from sklearn.metrics import roc_auc_score

TASKS = ("multiclass", "multilabel")
MULTILABEL_CODES = (1, 0, -1, -2)

# Bootstrap work is done in chunks of resamples so that a [chunk, num_rows] weight matrix stays
# around this many float64 entries (~32 MB).
_MAX_WEIGHT_ENTRIES = 4_000_000


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------
def _to_float(x) -> Optional[float]:
    """Plain Python float, or None for None/NaN."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _validate(labels, probs, task: str, label_names: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    probs = np.asarray(probs, dtype=np.float64)
    labels_arr = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {probs.shape}")
    n, c = probs.shape
    if n == 0:
        raise ValueError("no samples to evaluate")
    if len(label_names) != c:
        raise ValueError(f"{len(label_names)} label names for {c} probability columns")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or inf")
    if labels_arr.size and not np.all(np.equal(np.mod(labels_arr, 1), 0)):
        raise ValueError("labels must be integer codes")
    labels_arr = labels_arr.astype(np.int64)
    if task == "multiclass":
        if labels_arr.shape != (n,):
            raise ValueError(f"multiclass labels must be [N]={n}, got shape {labels_arr.shape}")
        if np.any(labels_arr < 0):
            raise ValueError(
                f"{int(np.sum(labels_arr < 0))} unlabelled (negative) labels passed to the metrics; "
                "filter unlabelled samples first")
        if np.any(labels_arr >= c):
            raise ValueError(f"label value {int(labels_arr.max())} out of range for {c} classes")
    else:
        if labels_arr.shape != (n, c):
            raise ValueError(f"multilabel labels must be [N, C]={(n, c)}, got {labels_arr.shape}")
        bad = ~np.isin(labels_arr, MULTILABEL_CODES)
        if np.any(bad):
            raise ValueError(f"multilabel codes must be in {MULTILABEL_CODES}, "
                             f"got {sorted(set(labels_arr[bad].tolist()))}")
    return labels_arr, probs


def _first_appearance_unique(ids, return_first: bool = False):
    """(unique ids in first-appearance order, inverse index [N] into them[, first row index])."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    uniq, first_idx, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first_idx, kind="stable")   # sorted-unique position -> appearance rank
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    if return_first:
        return uniq[order], rank[inverse.reshape(-1)], first_idx[order]
    return uniq[order], rank[inverse.reshape(-1)]


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------
def aggregate_by_case(case_ids, probs, labels) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average image-level predictions per case.

    Returns ``(unique_case_ids, case_probs, case_labels)`` in order of first appearance. The case
    probability is the mean of its images' probability rows. Labels (scalar or per-class rows)
    must be identical within a case, else ``ValueError`` naming the case id.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    case_ids = np.asarray(case_ids)
    n = len(case_ids)
    if probs.ndim != 2 or probs.shape[0] != n or labels.shape[:1] != (n,):
        raise ValueError(f"case_ids ({n}), probs {probs.shape} and labels {labels.shape} disagree")
    uniq, inv, first = _first_appearance_unique(case_ids, return_first=True)
    g = len(uniq)
    counts = np.bincount(inv, minlength=g).astype(np.float64)
    sums = np.zeros((g, probs.shape[1]), dtype=np.float64)
    np.add.at(sums, inv, probs)
    case_probs = sums / counts[:, None]
    case_labels = labels[first]
    mismatch = labels != case_labels[inv]
    if mismatch.ndim > 1:
        mismatch = mismatch.reshape(n, -1).any(axis=1)
    if np.any(mismatch):
        bad_case = uniq[inv[np.flatnonzero(mismatch)[0]]]
        raise ValueError(f"conflicting labels within case {bad_case!r}")
    return uniq, case_probs, case_labels


# ----------------------------------------------------------------------------------------------
# Per-row building blocks shared by the point estimates and the bootstrap
# ----------------------------------------------------------------------------------------------
def _multiclass_correct(labels: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Bool [N]: label among the top-k classes (stable: ties prefer lower class index)."""
    k = min(k, probs.shape[1])
    topk = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return np.any(topk == labels[:, None], axis=1)


def _auc(y_true: np.ndarray, scores: np.ndarray) -> Optional[float]:
    if y_true.size == 0 or y_true.min() == y_true.max():
        return None
    return float(roc_auc_score(y_true, scores))


def _ratio(num, den) -> Optional[float]:
    return None if den == 0 else float(num) / float(den)


def compute_metrics(labels, probs, task: str, label_names: Sequence[str],
                    threshold: float = 0.5) -> Dict[str, Any]:
    """Point-estimate metrics (see the module docstring for definitions).

    Returns a dict with ``task``, ``num_samples``, ``threshold``, ``top1``, ``top3``,
    ``auc_per_class`` ({name: float|None}), ``auc_macro``, ``support`` ({name: number of positive
    rows}) and, where defined, ``sensitivity`` / ``specificity``.
    """
    labels, probs = _validate(labels, probs, task, label_names)
    n, c = probs.shape
    names = [str(x) for x in label_names]
    out: Dict[str, Any] = {"task": task, "num_samples": int(n), "threshold": float(threshold)}
    auc_per_class: Dict[str, Optional[float]] = {}
    support: Dict[str, int] = {}
    if task == "multiclass":
        out["top1"] = float(np.mean(_multiclass_correct(labels, probs, 1)))
        out["top3"] = float(np.mean(_multiclass_correct(labels, probs, 3)))
        for j, name in enumerate(names):
            y = (labels == j).astype(np.int64)
            auc_per_class[name] = _auc(y, probs[:, j])
            support[name] = int(y.sum())
        if c == 2:
            pos = labels == 1
            pred = probs[:, 1] >= threshold
            out["sensitivity"] = _ratio(np.sum(pred & pos), np.sum(pos))
            out["specificity"] = _ratio(np.sum(~pred & ~pos), np.sum(~pos))
    else:
        pred = probs >= threshold
        accs, sens, spec = [], {}, {}
        for j, name in enumerate(names):
            present = labels[:, j] >= 0
            y = labels[present, j]
            p = pred[present, j]
            if y.size:
                accs.append(float(np.mean(p == (y == 1))))
            auc_per_class[name] = _auc(y, probs[present, j])
            sens[name] = _ratio(np.sum(p & (y == 1)), np.sum(y == 1))
            spec[name] = _ratio(np.sum(~p & (y == 0)), np.sum(y == 0))
            support[name] = int(np.sum(y == 1))
        out["top1"] = float(np.mean(accs)) if accs else None
        out["top3"] = None
        out["sensitivity"] = sens
        out["specificity"] = spec
    defined = [v for v in auc_per_class.values() if v is not None]
    out["auc_per_class"] = auc_per_class
    out["auc_macro"] = float(np.mean(defined)) if defined else None
    out["support"] = support
    return out


# ----------------------------------------------------------------------------------------------
# Weighted (bootstrap) metric engine
# ----------------------------------------------------------------------------------------------
class _WeightedAUC:
    """ROC AUC of one class for many integer row-weight vectors at once.

    AUC = sum_{i pos} w_i * (W_neg(score < s_i) + 0.5 * W_neg(score == s_i)) / (W_pos * W_neg),
    the Mann-Whitney pair count, equal to roc_auc_score on rows duplicated w_i times.
    """

    def __init__(self, scores: np.ndarray, pos: np.ndarray, neg: np.ndarray):
        keep = np.flatnonzero(pos | neg)
        order = np.argsort(scores[keep], kind="stable")
        self.rows = keep[order]
        s = scores[self.rows]
        self.pos = pos[self.rows].astype(np.float64)
        self.neg = neg[self.rows].astype(np.float64)
        m = len(s)
        new = np.ones(m, dtype=bool)
        if m > 1:
            new[1:] = s[1:] != s[:-1]
        gid = np.cumsum(new) - 1
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], m) - 1
        self.start = starts[gid]
        self.end = ends[gid]

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        b = weights.shape[0]
        if len(self.rows) == 0:
            return np.full(b, np.nan)
        w = weights[:, self.rows]
        wp = w * self.pos
        wn = w * self.neg
        cum = np.cumsum(wn, axis=1)
        less = (cum - wn)[:, self.start]            # negative weight strictly below each score
        equal = cum[:, self.end] - less             # negative weight tied with each score
        num = np.sum(wp * (less + 0.5 * equal), axis=1)
        p_tot = wp.sum(axis=1)
        n_tot = wn.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = num / (p_tot * n_tot)
        auc[(p_tot == 0) | (n_tot == 0)] = np.nan
        return auc


def _weighted_ratio(weights: np.ndarray, num_mask: np.ndarray, den_mask: np.ndarray) -> np.ndarray:
    num = weights @ num_mask.astype(np.float64)
    den = weights @ den_mask.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den == 0] = np.nan
    return out


class _MetricEngine:
    """Evaluates named metrics for a batch of row-weight vectors ``[B, N]`` -> ``{name: [B]}``.

    Undefined values are NaN. Names: ``top1``, ``top3`` (multiclass), ``auc_macro``,
    ``auc/<name>``, ``sensitivity``/``specificity`` (multiclass C == 2) and
    ``sensitivity/<name>``/``specificity/<name>`` (multilabel).
    """

    def __init__(self, labels, probs, task: str, label_names: Sequence[str], threshold: float):
        labels, probs = _validate(labels, probs, task, label_names)
        self.task = task
        self.names = [str(x) for x in label_names]
        self.num_rows, c = probs.shape
        self.aucs = {}
        if task == "multiclass":
            self.correct1 = _multiclass_correct(labels, probs, 1)
            self.correct3 = _multiclass_correct(labels, probs, 3)
            for j, name in enumerate(self.names):
                pos = labels == j
                self.aucs[name] = _WeightedAUC(probs[:, j], pos, ~pos)
            if c == 2:
                pos = labels == 1
                pred = probs[:, 1] >= threshold
                self.binary = (pos, ~pos, pred)
            else:
                self.binary = None
        else:
            pred = probs >= threshold
            self.present = labels >= 0
            self.correct = (pred == (labels == 1)) & self.present
            self.pos = labels == 1
            self.neg = labels == 0
            self.pred = pred
            for j, name in enumerate(self.names):
                self.aucs[name] = _WeightedAUC(probs[:, j], self.pos[:, j], self.neg[:, j])

    def available(self) -> List[str]:
        names = ["top1", "auc_macro"] + [f"auc/{n}" for n in self.names]
        if self.task == "multiclass":
            names.insert(1, "top3")
            if self.binary is not None:
                names += ["sensitivity", "specificity"]
        else:
            names += [f"sensitivity/{n}" for n in self.names]
            names += [f"specificity/{n}" for n in self.names]
        return names

    def expand(self, metrics: Iterable[str]) -> List[str]:
        """Requested names -> concrete names (per-class AUCs always included)."""
        avail = self.available()
        out: List[str] = []
        for m in list(metrics) + [f"auc/{n}" for n in self.names]:
            if m in ("sensitivity", "specificity") and self.task == "multilabel":
                cands = [f"{m}/{n}" for n in self.names]
            elif m == "top3" and self.task == "multilabel":
                cands = []                         # top3 is not defined for multilabel
            elif m in avail:
                cands = [m]
            else:
                raise ValueError(f"unknown bootstrap metric {m!r}; available: {avail}")
            out += [x for x in cands if x not in out]
        return out

    def __call__(self, weights: np.ndarray, metrics: Sequence[str]) -> Dict[str, np.ndarray]:
        res: Dict[str, np.ndarray] = {}
        need_aucs = [m for m in metrics if m.startswith("auc/")]
        if "auc_macro" in metrics:
            need_aucs = [f"auc/{n}" for n in self.names]
        auc_vals = {m: self.aucs[m[4:]](weights) for m in need_aucs}
        for m in metrics:
            if m.startswith("auc/"):
                res[m] = auc_vals[m]
            elif m == "auc_macro":
                stack = np.stack([auc_vals[f"auc/{n}"] for n in self.names], axis=1)
                res[m] = _nanmean_rows(stack)
            elif self.task == "multiclass":
                if m == "top1":
                    res[m] = (weights @ self.correct1.astype(np.float64)) / weights.sum(axis=1)
                elif m == "top3":
                    res[m] = (weights @ self.correct3.astype(np.float64)) / weights.sum(axis=1)
                elif m == "sensitivity":
                    pos, neg, pred = self.binary
                    res[m] = _weighted_ratio(weights, pred & pos, pos)
                elif m == "specificity":
                    pos, neg, pred = self.binary
                    res[m] = _weighted_ratio(weights, ~pred & neg, neg)
            else:
                if m == "top1":
                    per_class = np.stack(
                        [_weighted_ratio(weights, self.correct[:, j], self.present[:, j])
                         for j in range(len(self.names))], axis=1)
                    res[m] = _nanmean_rows(per_class)
                else:
                    kind, name = m.split("/", 1)
                    j = self.names.index(name)
                    if kind == "sensitivity":
                        res[m] = _weighted_ratio(weights, self.pred[:, j] & self.pos[:, j],
                                                 self.pos[:, j])
                    else:
                        res[m] = _weighted_ratio(weights, ~self.pred[:, j] & self.neg[:, j],
                                                 self.neg[:, j])
        return res


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    cnt = ok.sum(axis=1)
    tot = np.where(ok, x, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = tot / cnt
    out[cnt == 0] = np.nan
    return out


def _bootstrap_samples(engine: _MetricEngine, groups, metrics: Sequence[str], n_boot: int,
                       seed: int, extra_engines: Sequence[_MetricEngine] = ()):
    """Draw ``n_boot`` case resamples and evaluate metrics -> list of {metric: [n_boot]} per engine."""
    groups = np.asarray(groups)
    if len(groups) != engine.num_rows:
        raise ValueError(f"{len(groups)} group ids for {engine.num_rows} rows")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    _, g_idx = _first_appearance_unique(groups)
    g = int(g_idx.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, g, size=(n_boot, g))   # all draws up front: chunking-independent
    engines = [engine, *extra_engines]
    out = [{m: np.empty(n_boot) for m in metrics} for _ in engines]
    chunk = max(1, min(n_boot, _MAX_WEIGHT_ENTRIES // max(engine.num_rows, g, 1)))
    for s in range(0, n_boot, chunk):
        d = draws[s:s + chunk]
        b = d.shape[0]
        counts = np.bincount((d + g * np.arange(b)[:, None]).ravel(),
                             minlength=b * g).reshape(b, g).astype(np.float64)
        weights = counts[:, g_idx]                 # [b, N]: times each row's case was drawn
        for eng, store in zip(engines, out):
            vals = eng(weights, metrics)
            for m in metrics:
                store[m][s:s + b] = vals[m]
    return out


def _percentile_ci(vals: np.ndarray, alpha: float) -> List[Optional[float]]:
    vals = vals[~np.isnan(vals)]
    if vals.size == 0:
        return [None, None]
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def bootstrap_ci(labels, probs, groups, task: str, label_names: Sequence[str], n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05,
                 metrics: Sequence[str] = ("top1", "auc_macro"), threshold: float = 0.5,
                 return_details: bool = False):
    """Percentile bootstrap CIs resampling ``groups`` (cases) with replacement.

    ``metrics`` may contain ``top1``, ``top3`` (ignored for multilabel), ``auc_macro``,
    ``auc/<name>``, ``sensitivity`` and ``specificity`` (multiclass C == 2; for multilabel they
    expand to ``sensitivity/<name>`` etc.). Per-class AUC CIs (``auc/<name>``) are always added.

    Returns ``{metric: [lo, hi]}`` (``[None, None]`` when the metric was undefined in every
    resample). With ``return_details=True`` returns ``(ci, details)`` where ``details`` has
    ``skipped`` ({metric: number of resamples where it was undefined}), ``n_boot`` and
    ``samples`` ({metric: float array [n_boot], NaN where undefined}).
    Deterministic given ``seed``.
    """
    engine = _MetricEngine(labels, probs, task, label_names, threshold)
    names = engine.expand(metrics)
    (samples,) = _bootstrap_samples(engine, groups, names, n_boot, seed)
    ci = {m: _percentile_ci(samples[m], alpha) for m in names}
    if not return_details:
        return ci
    details = {"n_boot": int(n_boot),
               "skipped": {m: int(np.isnan(samples[m]).sum()) for m in names},
               "samples": samples}
    return ci, details


# ----------------------------------------------------------------------------------------------
# Top-level evaluation
# ----------------------------------------------------------------------------------------------
# case: average each case's image probabilities first; image: every image counts.
LEVELS = ("case", "image")


def evaluate_predictions(case_ids, labels, probs, task: str, label_names: Sequence[str],
                         level: str = "case", n_boot: int = 1000, seed: int = 0,
                         label_fraction: Optional[float] = None, init_from: Optional[str] = None,
                         threshold: float = 0.5, alpha: float = 0.05) -> Dict[str, Any]:
    """Full metrics dict for one model's predictions.

    ``level="case"`` first averages image probabilities per case (``aggregate_by_case``) and
    evaluates one row per case; ``level="image"`` evaluates every image. In both cases the CIs
    bootstrap over cases (at image level all images of a drawn case come along).

    Keys: ``task``, ``level``, ``num_cases``, ``num_images``, ``num_samples`` (rows evaluated),
    ``threshold``, ``n_boot``, ``seed``, ``label_fraction``, ``init_from``, ``top1``, ``top3``,
    ``auc_macro``, ``auc_per_class``, ``support``, ``sensitivity``/``specificity`` where defined,
    ``ci95`` ({metric: [lo, hi]}: ``top1``, ``top3`` (multiclass), ``auc_macro``,
    ``auc/<name>``, and the sensitivity/specificity keys where defined; ``{}`` when
    ``n_boot == 0``) and ``ci95_skipped`` ({metric: resamples where it was undefined}).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    case_ids = np.asarray(case_ids)
    labels_v, probs_v = _validate(labels, probs, task, label_names)
    if len(case_ids) != len(probs_v):
        raise ValueError(f"{len(case_ids)} case ids for {len(probs_v)} predictions")
    num_images = int(len(case_ids))
    if level == "case":
        uniq, eval_probs, eval_labels = aggregate_by_case(case_ids, probs_v, labels_v)
        groups = np.arange(len(uniq))
    else:
        uniq = _first_appearance_unique(case_ids)[0]
        eval_probs, eval_labels, groups = probs_v, labels_v, case_ids
    point = compute_metrics(eval_labels, eval_probs, task, label_names, threshold)
    result: Dict[str, Any] = {
        "task": task,
        "level": level,
        "num_cases": int(len(uniq)),
        "num_images": num_images,
        "num_samples": point.pop("num_samples"),
        "threshold": float(threshold),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "label_fraction": None if label_fraction is None else float(label_fraction),
        "init_from": None if init_from is None else str(init_from),
    }
    point.pop("task")
    point.pop("threshold")
    result.update(point)
    if n_boot > 0:
        wanted = ["top1", "top3", "auc_macro"]
        if "sensitivity" in point:
            wanted += ["sensitivity", "specificity"]
        ci, details = bootstrap_ci(eval_labels, eval_probs, groups, task, label_names,
                                   n_boot=n_boot, seed=seed, alpha=alpha, metrics=wanted,
                                   threshold=threshold, return_details=True)
        result["ci95"] = ci
        result["ci95_skipped"] = details["skipped"]
    else:
        result["ci95"] = {}
        result["ci95_skipped"] = {}
    return result


def _point_value(metrics_dict: Dict[str, Any], metric: str) -> Optional[float]:
    if metric.startswith("auc/"):
        return metrics_dict["auc_per_class"][metric[4:]]
    if "/" in metric:
        kind, name = metric.split("/", 1)
        return metrics_dict[kind][name]
    return metrics_dict.get(metric)


def paired_bootstrap_difference(labels, probs_a, probs_b, groups, task: str,
                                label_names: Sequence[str], metric: str = "auc_macro",
                                n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                                threshold: float = 0.5) -> Dict[str, Any]:
    """Paired case bootstrap of ``metric(A) - metric(B)`` for two models on the SAME rows.

    Both models are evaluated on the same case resample each time. Resamples where either
    value is undefined are skipped (``n_skipped``). Returns ``{"metric", "diff", "ci95": [lo, hi],
    "significant": lo > 0 or hi < 0, "n_boot", "n_skipped", "value_a", "value_b"}``;
    ``diff`` is the point-estimate difference (``None`` if undefined).
    """
    eng_a = _MetricEngine(labels, probs_a, task, label_names, threshold)
    eng_b = _MetricEngine(labels, probs_b, task, label_names, threshold)
    if np.shape(probs_a) != np.shape(probs_b):
        raise ValueError(f"probs_a {np.shape(probs_a)} and probs_b {np.shape(probs_b)} differ")
    if metric not in eng_a.available():
        raise ValueError(f"unknown metric {metric!r}; available: {eng_a.available()}")
    va = _point_value(compute_metrics(labels, probs_a, task, label_names, threshold), metric)
    vb = _point_value(compute_metrics(labels, probs_b, task, label_names, threshold), metric)
    sa, sb = _bootstrap_samples(eng_a, groups, [metric], n_boot, seed, extra_engines=[eng_b])
    d = sa[metric] - sb[metric]
    lo, hi = _percentile_ci(d, alpha)
    return {
        "metric": metric,
        "diff": None if va is None or vb is None else float(va - vb),
        "value_a": va,
        "value_b": vb,
        "ci95": [lo, hi],
        "significant": bool(lo is not None and (lo > 0 or hi < 0)),
        "n_boot": int(n_boot),
        "n_skipped": int(np.isnan(d).sum()),
    }


def seed_averaged_bootstrap(labels, probs_by_seed, groups, task: str,
                            label_names: Sequence[str], probs_by_seed_b=None,
                            metric: str = "auc_macro", n_boot: int = 1000, seed: int = 0,
                            alpha: float = 0.05, threshold: float = 0.5) -> Dict[str, Any]:
    """The mean over seeds of ``metric`` for runs that differ only by their seed, all on the
    SAME rows, with a case-bootstrap CI: each resample of cases is applied to every run and the
    runs' values are averaged, so the CI covers the choice of test cases for the seed-averaged
    value. With ``probs_by_seed_b`` (one run of B per run of A, paired by position) it is the
    mean over seeds of ``metric(A_s) - metric(B_s)``, paired as in
    ``paired_bootstrap_difference``. The seeds themselves are not resampled: with few seeds the
    spread between them (``per_seed``) says how much a new seed could move the value.

    Returns ``{"metric", "value", "ci95", "significant" (difference only), "per_seed",
    "num_seeds", "n_boot", "n_skipped"}``; ``value`` is None when any run's value is undefined."""
    probs_by_seed = list(probs_by_seed)
    if not probs_by_seed:
        raise ValueError("no runs to average")
    paired = probs_by_seed_b is not None
    if paired:
        probs_by_seed_b = list(probs_by_seed_b)
        if len(probs_by_seed_b) != len(probs_by_seed):
            raise ValueError(f"{len(probs_by_seed)} runs of A but {len(probs_by_seed_b)} of B")
    runs = probs_by_seed + (probs_by_seed_b if paired else [])
    for p in runs[1:]:
        if np.shape(p) != np.shape(runs[0]):
            raise ValueError(f"runs have different shapes {np.shape(runs[0])} and "
                             f"{np.shape(p)}: they must be predictions on the same rows")
    engines = [_MetricEngine(labels, p, task, label_names, threshold) for p in runs]
    if metric not in engines[0].available():
        raise ValueError(f"unknown metric {metric!r}; available: {engines[0].available()}")
    points = [_point_value(compute_metrics(labels, p, task, label_names, threshold), metric)
              for p in runs]
    samples = [s[metric] for s in _bootstrap_samples(engines[0], groups, [metric], n_boot,
                                                      seed, extra_engines=engines[1:])]
    k = len(probs_by_seed)
    if paired:
        per_seed = [None if a is None or b is None else float(a - b)
                    for a, b in zip(points[:k], points[k:])]
        draws = np.mean([samples[i] - samples[k + i] for i in range(k)], axis=0)
    else:
        per_seed = [None if a is None else float(a) for a in points]
        draws = np.mean(samples, axis=0)
    lo, hi = _percentile_ci(draws, alpha)
    value = None if any(v is None for v in per_seed) else float(np.mean(per_seed))
    out = {"metric": metric, "value": value, "ci95": [lo, hi], "per_seed": per_seed,
           "num_seeds": k, "n_boot": int(n_boot), "n_skipped": int(np.isnan(draws).sum())}
    if paired:
        out["significant"] = bool(lo is not None and (lo > 0 or hi < 0))
    return out

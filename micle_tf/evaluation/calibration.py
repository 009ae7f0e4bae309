"""Calibration of predicted probabilities: ECE, Brier score, NLL, reliability diagrams and
temperature scaling, with case-bootstrap confidence intervals.

Pure numpy (matplotlib only inside `plot_reliability`, through the Agg ``Figure`` API as in
``report.py``); no TensorFlow. Labels and probabilities use the encodings of ``metrics.py``:
multiclass ``labels`` int [N] (0..C-1), multilabel int [N, C] with 1 positive, 0 negative,
-1 uncertain, -2 missing (only 0/1 entries count, per class); ``probs`` float [N, C] (softmax
rows, or independent sigmoids).

What is binned
--------------
* multiclass: the top-1 confidence ``max_c p_c`` of each row against whether the top-1 class
  (``argmax``, ties to the lower index as in ``metrics.top1``) is the label. This is the ECE of
  Guo et al. (ICML 2017).
* multilabel: per class, the class's own probability ``p_c`` over that class's present (0/1)
  entries against the observed frequency of positives (one-vs-rest reliability). The summary
  ``ece`` (and ``brier``, ``nll``) is the unweighted mean over the classes with at least one
  present entry - a macro average, as ``top1`` is for multilabel in ``metrics.py``.

Bins (``n_bins``, default 15)
-----------------------------
* equal width (``"width"``, the key ``ece``): bin k is ``[k/B, (k+1)/B)``, the last one closed
  at 1; a value's bin is ``min(floor(p * B), B - 1)`` in float64, so a value exactly on an inner
  edge belongs to the bin above it.
* equal mass (``"mass"``, the key ``ece_equal_mass``): values sorted ascending, the value at
  position q (0-based, of N) goes to bin ``floor(q * B / N)``, so bins hold floor(N/B) or
  ceil(N/B) values. Tied values are never split: every value equal to a given confidence goes
  to the bin of the first of them, so a tie across a boundary makes one bin larger and the next
  smaller (possibly empty); with N < B some bins are empty.
* ``ECE = sum_b (n_b / N) * |acc_b - conf_b| = (1/N) * sum_b |sum_{i in b} (y_i - p_i)|``.
  Empty bins contribute nothing (weight 0); in reliability data they are listed with
  ``count`` 0 and ``confidence``/``accuracy`` None, and plots skip them.

Brier score and NLL
-------------------
* multiclass Brier: mean over rows of ``sum_c (p_c - 1[y = c])^2`` - SUMMED over classes (the
  original definition, Brier 1950; 0 is perfect, 2 the worst). Multilabel: per class the mean
  of ``(p_c - y_c)^2`` over present entries; ``brier`` is their macro mean.
* NLL: multiclass mean ``-log p_y``; multilabel per class the mean binary cross-entropy over
  present entries, macro-averaged. Probabilities are clipped to ``[EPS, 1 - EPS]`` first.

Bootstrap
---------
``calibration_report`` resamples cases with replacement exactly as ``metrics.bootstrap_ci``
(integer row weights from the same draws: the same seed and ``groups`` give the same
resamples, so calibration and AUC intervals come from the same case resamples) and reports
percentile intervals. Equal-mass bins are recomputed on each resample; the copies of a case
drawn twice are tied values and share a bin.

Temperature scaling
-------------------
* multiclass: ``p_T = softmax(z / T)``, one temperature. Dividing by T > 0 keeps the order of a
  row, so ``argmax`` (top-1, top-3) is unchanged; only the confidence changes.
* multilabel: ``p_T,c = sigmoid(z_c / T_c)`` with ONE TEMPERATURE PER CLASS by default: the
  classes of a multilabel head differ in prevalence and in how over- or under-confident they
  are, and a per-class T still keeps every class's ranking (its AUC) unchanged; threshold
  decisions (``top1`` at 0.5, sensitivity) can change. ``per_class=False`` fits one shared T on
  all present entries pooled. A class without both a positive and a negative present entry in
  the fitting set keeps T = 1 (its NLL would push T to a bound).
* Fit on the VALIDATION split's predictions (never the test split) by minimising the NLL over
  ``log T`` in ``[log 0.05, log 20]`` with a golden-section search (the NLL of softmax/sigmoid
  outputs is convex in 1/T, hence unimodal in log T) to ``|d log T| < 1e-7``. No scipy.
* Probabilities in, logits out: inference gives probabilities, so ``to_logits`` takes
  ``log(clip(p, EPS, 1))`` (multiclass - exact up to the clipping, since ``log p`` differs from
  the logits by a per-row constant, which softmax ignores) or ``log(p) - log(1 - p)`` with p in
  ``[EPS, 1 - EPS]`` (multilabel). ``EPS = 1e-7``: float32 probabilities carry nothing finer
  near 1 (float32 spacing below 1.0 is 6e-8), and it caps ``|logit|`` at about 16.1. Pass
  ``from_logits=True`` when real logits are available.

All returned numbers are plain ``float``/``int``/``None`` (JSON-serialisable), except
temperatures fitted per class, returned as a numpy array [C] (``.tolist()`` for JSON).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from micle_tf.evaluation.metrics import (_bootstrap_samples, _nanmean_rows, _percentile_ci,
                                         _validate)

EPS = 1e-7
DEFAULT_BINS = 15
STRATEGIES = ("width", "mass")
TEMPERATURE_BOUNDS = (0.05, 20.0)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
CALIBRATION_METRICS = ("ece", "ece_equal_mass", "brier", "nll")


# ----------------------------------------------------------------------------------------------
# Curves: (value, target) pairs that are binned
# ----------------------------------------------------------------------------------------------
def _curves(labels: np.ndarray, probs: np.ndarray, task: str, names: Sequence[str]):
    """[(name, rows, values, targets)]: multiclass one curve "top1" (top-1 confidence vs
    correct); multilabel one per class (p_c vs positive, over present entries)."""
    if task == "multiclass":
        pred = np.argmax(probs, axis=1)  # first maximum: ties to the lower index
        conf = probs[np.arange(len(probs)), pred]
        return [("top1", np.arange(len(probs)), conf, (pred == labels).astype(np.float64))]
    out = []
    for j, name in enumerate(names):
        rows = np.flatnonzero(labels[:, j] >= 0)
        out.append((name, rows, probs[rows, j], (labels[rows, j] == 1).astype(np.float64)))
    return out


def _width_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip(np.floor(values * n_bins).astype(np.int64), 0, n_bins - 1)


class _Curve:
    """Weighted ECE (both binnings) of one curve for many integer row-weight vectors."""

    def __init__(self, rows, values, targets, n_bins):
        self.rows = rows
        self.n_bins = n_bins
        diff = targets - values
        m = len(rows)
        self.width = np.zeros((m, n_bins))
        if m:
            self.width[np.arange(m), _width_bins(values, n_bins)] = diff
        order = np.argsort(values, kind="stable")
        self.sorted_rows = rows[order]
        self.sorted_diff = diff[order]
        sv = values[order]
        new = np.ones(m, dtype=bool)
        if m > 1:
            new[1:] = sv[1:] != sv[:-1]
        self.tie_starts = np.flatnonzero(new)

    def ece_width(self, weights: np.ndarray) -> np.ndarray:
        w = weights[:, self.rows]
        total = w.sum(axis=1)
        s = np.abs(w @ self.width).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = s / total
        out[total == 0] = np.nan
        return out

    def ece_mass(self, weights: np.ndarray) -> np.ndarray:
        b = weights.shape[0]
        if len(self.rows) == 0:
            return np.full(b, np.nan)
        w = weights[:, self.sorted_rows]
        gw = np.add.reduceat(w, self.tie_starts, axis=1)                    # [b, U]
        gd = np.add.reduceat(w * self.sorted_diff, self.tie_starts, axis=1)
        total = gw.sum(axis=1)
        start = np.cumsum(gw, axis=1) - gw          # position of the first copy of each value
        tot_i = np.maximum(np.rint(total).astype(np.int64), 1)[:, None]
        bins = np.minimum((np.rint(start).astype(np.int64) * self.n_bins) // tot_i,
                          self.n_bins - 1)
        flat = (bins + self.n_bins * np.arange(b)[:, None]).ravel()
        s = np.bincount(flat, weights=gd.ravel(), minlength=b * self.n_bins)
        out = np.abs(s.reshape(b, self.n_bins)).sum(axis=1) / np.where(total > 0, total, 1)
        out[total == 0] = np.nan
        return out


def _clip(p):
    return np.clip(p, EPS, 1.0 - EPS)


class _CalibrationEngine:
    """``{metric: [B]}`` for row weights ``[B, N]`` (the interface of metrics._MetricEngine).

    Names: ``ece``, ``ece_equal_mass``, ``brier``, ``nll``; multilabel also
    ``<metric>/<class name>``. Undefined values are NaN."""

    def __init__(self, labels, probs, task: str, label_names: Sequence[str],
                 n_bins: int = DEFAULT_BINS):
        labels, probs = _validate(labels, probs, task, label_names)
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.task, self.n_bins = task, int(n_bins)
        self.names = [str(x) for x in label_names]
        self.num_rows = probs.shape[0]
        self.curves = {name: _Curve(rows, v, t, self.n_bins)
                       for name, rows, v, t in _curves(labels, probs, task, self.names)}
        p = _clip(probs)
        if task == "multiclass":
            onehot = np.eye(probs.shape[1])[labels]
            self.brier_rows = np.sum((probs - onehot) ** 2, axis=1)
            self.nll_rows = -np.log(p[np.arange(len(p)), labels])
        else:
            self.present = (labels >= 0).astype(np.float64)
            y = (labels == 1).astype(np.float64)
            self.brier_rows = (probs - y) ** 2 * self.present
            self.nll_rows = -(y * np.log(p) + (1 - y) * np.log(1 - p)) * self.present

    def available(self) -> List[str]:
        if self.task == "multiclass":
            return list(CALIBRATION_METRICS)
        return list(CALIBRATION_METRICS) + [f"{m}/{n}" for m in CALIBRATION_METRICS
                                            for n in self.names]

    def _per_class(self, weights, metric):
        if metric == "ece":
            return np.stack([self.curves[n].ece_width(weights) for n in self.names], axis=1)
        if metric == "ece_equal_mass":
            return np.stack([self.curves[n].ece_mass(weights) for n in self.names], axis=1)
        rows = self.brier_rows if metric == "brier" else self.nll_rows
        num = weights @ rows
        den = weights @ self.present
        with np.errstate(invalid="ignore", divide="ignore"):
            out = num / den
        out[den == 0] = np.nan
        return out

    def __call__(self, weights: np.ndarray, metrics: Sequence[str]) -> Dict[str, np.ndarray]:
        res: Dict[str, np.ndarray] = {}
        cache: Dict[str, np.ndarray] = {}
        for m in metrics:
            base, _, cls = m.partition("/")
            if base not in CALIBRATION_METRICS or (cls and self.task == "multiclass"):
                raise ValueError(f"unknown calibration metric {m!r}; available: "
                                 f"{self.available()}")
            if self.task == "multiclass":
                if base == "ece":
                    res[m] = self.curves["top1"].ece_width(weights)
                elif base == "ece_equal_mass":
                    res[m] = self.curves["top1"].ece_mass(weights)
                else:
                    rows = self.brier_rows if base == "brier" else self.nll_rows
                    res[m] = (weights @ rows) / weights.sum(axis=1)
                continue
            if base not in cache:
                cache[base] = self._per_class(weights, base)
            per_class = cache[base]
            res[m] = per_class[:, self.names.index(cls)] if cls else _nanmean_rows(per_class)
        return res


def _point(engine: _CalibrationEngine, names: Sequence[str]) -> Dict[str, Optional[float]]:
    vals = engine(np.ones((1, engine.num_rows)), names)
    return {m: (None if np.isnan(v[0]) else float(v[0])) for m, v in vals.items()}


# ----------------------------------------------------------------------------------------------
# Point estimates
# ----------------------------------------------------------------------------------------------
def _names_for(probs, label_names):
    if label_names is None:
        label_names = [str(j) for j in range(np.shape(probs)[1])]
    return list(label_names)


def expected_calibration_error(labels, probs, task: str, n_bins: int = DEFAULT_BINS,
                               strategy: str = "width", label_names=None) -> Optional[float]:
    """ECE with ``strategy`` "width" (equal-width bins) or "mass" (equal-mass bins); the
    multilabel value is the macro mean over classes (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    engine = _CalibrationEngine(labels, probs, task, _names_for(probs, label_names), n_bins)
    key = "ece" if strategy == "width" else "ece_equal_mass"
    return _point(engine, [key])[key]


def brier_score(labels, probs, task: str, label_names=None) -> Optional[float]:
    """Multiclass: mean over rows of the squared distance to the one-hot label, summed over
    classes. Multilabel: macro mean of the per-class mean squared error on present entries."""
    engine = _CalibrationEngine(labels, probs, task, _names_for(probs, label_names))
    return _point(engine, ["brier"])["brier"]


def negative_log_likelihood(labels, probs, task: str, label_names=None) -> Optional[float]:
    """Mean -log p_y (multiclass) or macro mean binary cross-entropy (multilabel)."""
    engine = _CalibrationEngine(labels, probs, task, _names_for(probs, label_names))
    return _point(engine, ["nll"])["nll"]


def calibration_metrics(labels, probs, task: str, label_names: Sequence[str],
                        n_bins: int = DEFAULT_BINS) -> Dict[str, Any]:
    """Point estimates: ``ece``, ``ece_equal_mass``, ``brier``, ``nll`` and, for multilabel,
    ``<metric>_per_class`` ({class name: value or None})."""
    engine = _CalibrationEngine(labels, probs, task, label_names, n_bins)
    names = engine.available()
    point = _point(engine, names)
    out: Dict[str, Any] = {m: point[m] for m in CALIBRATION_METRICS}
    if task == "multilabel":
        for m in CALIBRATION_METRICS:
            out[f"{m}_per_class"] = {n: point[f"{m}/{n}"] for n in engine.names}
    return out


# ----------------------------------------------------------------------------------------------
# Reliability diagrams
# ----------------------------------------------------------------------------------------------
def _bin_table(values, targets, n_bins, strategy) -> List[Dict[str, Any]]:
    m = len(values)
    if strategy == "width":
        idx = _width_bins(values, n_bins)
        edges = [(k / n_bins, (k + 1) / n_bins) for k in range(n_bins)]
    else:
        order = np.argsort(values, kind="stable")
        sv = values[order]
        pos_bin = (np.arange(m) * n_bins) // max(m, 1)
        first = np.searchsorted(sv, sv, side="left")   # first position of each tied value
        idx = np.empty(m, dtype=np.int64)
        idx[order] = pos_bin[first]
        edges = None
    out = []
    for k in range(n_bins):
        sel = idx == k
        n = int(sel.sum())
        if edges is not None:
            lo, hi = edges[k]
        else:
            lo = float(values[sel].min()) if n else None
            hi = float(values[sel].max()) if n else None
        out.append({"bin": k, "lo": lo, "hi": hi, "count": n,
                    "confidence": float(values[sel].mean()) if n else None,
                    "accuracy": float(targets[sel].mean()) if n else None})
    return out


def reliability_data(labels, probs, task: str, label_names: Sequence[str],
                     n_bins: int = DEFAULT_BINS, strategy: str = "width") -> Dict[str, Any]:
    """Per bin: ``count``, mean ``confidence`` (mean binned value), ``accuracy`` (fraction
    correct for multiclass top-1; fraction positive for a multilabel class), and the bin's
    ``lo``/``hi`` (its edges for equal width; the smallest and largest value in it for equal
    mass). Returns ``{"strategy", "n_bins", "binned", "curves": {name: [bins]}}`` with one
    curve "top1" (multiclass) or one per class name (multilabel)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    labels, probs = _validate(labels, probs, task, label_names)
    curves = {name: _bin_table(v, t, int(n_bins), strategy)
              for name, _, v, t in _curves(labels, probs, task, [str(n) for n in label_names])}
    return {"strategy": strategy, "n_bins": int(n_bins),
            "binned": "top-1 confidence" if task == "multiclass"
            else "class probability (one-vs-rest, present entries)",
            "curves": curves}


def plot_reliability(labels, probs, task: str, label_names: Sequence[str], path,
                     n_bins: int = DEFAULT_BINS, strategy: str = "width",
                     title: Optional[str] = None) -> str:
    """Reliability diagram PNG at ``path``; returns the path.

    ``probs`` is one [N, C] array or a ``{series name: [N, C]}`` mapping drawn on the same axes
    (e.g. ``{"before": p, "after (T=1.8)": p_t}`` for temperature scaling). Each non-empty bin is
    a point (mean confidence, accuracy), joined per series, with the diagonal of perfect
    calibration; the legend gives each series' ECE and bars at the bottom the first series'
    share of rows per bin. Multilabel draws one panel per class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = dict(probs) if isinstance(probs, Mapping) else {"model": probs}
    names = [str(n) for n in label_names]
    data = {s: reliability_data(labels, p, task, names, n_bins, strategy)
            for s, p in series.items()}
    engines = {s: _CalibrationEngine(labels, p, task, names, n_bins)
               for s, p in series.items()}
    key = "ece" if strategy == "width" else "ece_equal_mass"
    panels = ["top1"] if task == "multiclass" else names
    ncols = min(3, len(panels))
    nrows = int(math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.6 * ncols, 4.2 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1,
                label="perfect calibration")
        first = True
        for s in series:
            bins = [b for b in data[s]["curves"][panel] if b["count"]]
            metric = key if task == "multiclass" else f"{key}/{panel}"
            ece = _point(engines[s], [metric])[metric]
            label = f"{s} (ECE {ece:.3f})" if ece is not None else f"{s} (no labelled rows)"
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins],
                    marker="o", linewidth=1.5, label=label)
            if first and bins:
                total = sum(b["count"] for b in bins)
                width = 1.0 / n_bins
                ax.bar([b["confidence"] for b in bins], [0.25 * b["count"] / total for b in bins],
                       width=width * 0.8, color="lightgrey", alpha=0.7, zorder=0,
                       label=f"share of rows per bin ({s}, scaled)")
                first = False
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        if task == "multiclass":
            ax.set_xlabel("Top-1 confidence")
            ax.set_ylabel("Accuracy (fraction correct)")
            ax.set_title(title or f"Reliability ({strategy} bins, B={n_bins})")
        else:
            ax.set_xlabel(f"Predicted probability of {panel}")
            ax.set_ylabel("Fraction positive")
            ax.set_title(panel if not title else f"{title}: {panel}", fontsize="medium")
        ax.legend(loc="upper left", fontsize="x-small")
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------------------------
# Temperature scaling
# ----------------------------------------------------------------------------------------------
def to_logits(probs, task: str) -> np.ndarray:
    """Logits from probabilities (see "Probabilities in, logits out" in the module docstring):
    ``log(clip(p, EPS, 1))`` for multiclass, ``logit(clip(p, EPS, 1 - EPS))`` for multilabel."""
    p = np.asarray(probs, dtype=np.float64)
    if task == "multiclass":
        return np.log(np.clip(p, EPS, 1.0))
    if task == "multilabel":
        p = _clip(p)
        return np.log(p) - np.log1p(-p)
    raise ValueError(f"unknown task {task!r}")


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z):
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))),
                    np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def apply_temperature(logits_or_probs, temperature, task: str,
                      from_logits: bool = False) -> np.ndarray:
    """Calibrated probabilities ``softmax(z / T)`` (multiclass) or ``sigmoid(z_c / T_c)``
    (multilabel; ``temperature`` a scalar or one per class). Inputs are probabilities unless
    ``from_logits``."""
    x = np.asarray(logits_or_probs, dtype=np.float64)
    z = x if from_logits else to_logits(x, task)
    t = np.asarray(temperature, dtype=np.float64)
    if np.any(~np.isfinite(t)) or np.any(t <= 0):
        raise ValueError(f"temperatures must be finite and > 0, got {temperature}")
    if task == "multiclass":
        if t.ndim:
            raise ValueError("multiclass temperature scaling uses one scalar temperature")
        return _softmax(z / t)
    if t.ndim and t.shape != (z.shape[1],):
        raise ValueError(f"{t.shape[0]} temperatures for {z.shape[1]} classes")
    return _sigmoid(z / t)


def _multiclass_nll(z, y, t):
    zs = z / t
    zs = zs - zs.max(axis=1, keepdims=True)
    lse = np.log(np.exp(zs).sum(axis=1))
    return float(np.mean(lse - zs[np.arange(len(y)), y]))


def _binary_nll(z, y, t):
    zs = z / t
    return float(np.mean(np.logaddexp(0.0, zs) - y * zs))


def _golden_section(f, lo, hi, tol=1e-7):
    """Minimum of a unimodal f on [lo, hi]."""
    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    u = (a + b) / 2.0
    candidates = [(f(lo), lo), (f(u), u), (f(hi), hi)]
    return min(candidates)[1]


def _fit_one(nll_of_t, bounds):
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    u = _golden_section(lambda v: nll_of_t(math.exp(v)), lo, hi)
    t = math.exp(u)
    at_bound = bool(abs(u - lo) < 1e-4 or abs(u - hi) < 1e-4)
    return t, at_bound


def fit_temperature(logits_or_probs, labels, task: str, from_logits: bool = False,
                    per_class: bool = True, bounds=TEMPERATURE_BOUNDS,
                    return_details: bool = False):
    """Temperature(s) minimising the NLL of ``labels`` on these predictions - pass the
    VALIDATION split's, never the test split's.

    Returns a float (multiclass, or multilabel with ``per_class=False``) or a float array [C]
    (multilabel, one per class; 1.0 for a class without both a positive and a negative present
    entry). With ``return_details`` returns ``(temperature, details)``, details =
    ``{"temperature" (float or list), "per_class", "bounds", "at_bound" (bool or list),
    "nll_before", "nll_after" (as in ``calibration_metrics``), "num_samples"}``."""
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"predictions must be a finite [N, C] array, got shape {x.shape}")
    names = [str(j) for j in range(x.shape[1])]
    labels_v, _ = _validate(labels, np.zeros_like(x), task, names)
    if not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be 0 < lo < hi, got {bounds}")
    z = x if from_logits else to_logits(x, task)
    if task == "multiclass":
        t, at_bound = _fit_one(lambda t: _multiclass_nll(z, labels_v, t), bounds)
        temperature: Union[float, np.ndarray] = t
    else:
        present = labels_v >= 0
        y = (labels_v == 1).astype(np.float64)
        if per_class:
            ts, at_bound = np.ones(x.shape[1]), [False] * x.shape[1]
            for j in range(x.shape[1]):
                yj, zj = y[present[:, j], j], z[present[:, j], j]
                if yj.size and 0 < yj.sum() < yj.size:
                    ts[j], at_bound[j] = _fit_one(lambda t: _binary_nll(zj, yj, t), bounds)
            temperature = ts
        else:
            if not (y[present].size and 0 < y[present].sum() < y[present].size):
                t, at_bound = 1.0, False
            else:
                t, at_bound = _fit_one(lambda t: _binary_nll(z[present], y[present], t),
                                       bounds)
            temperature = t
    if not return_details:
        return temperature
    before = _point(_CalibrationEngine(labels_v, _probs_from_logits(z, task), task, names),
                    ["nll"])["nll"]
    after = _point(_CalibrationEngine(labels_v, apply_temperature(z, temperature, task, True),
                                      task, names), ["nll"])["nll"]
    details = {"temperature": temperature.tolist() if isinstance(temperature, np.ndarray)
               else float(temperature),
               "per_class": bool(task == "multilabel" and per_class),
               "bounds": [float(bounds[0]), float(bounds[1])], "at_bound": at_bound,
               "nll_before": before, "nll_after": after, "num_samples": int(len(x))}
    return temperature, details


def _probs_from_logits(z, task):
    return _softmax(z) if task == "multiclass" else _sigmoid(z)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def calibration_report(labels, probs, task: str, label_names: Sequence[str],
                       n_boot: int = 1000, seed: int = 0, groups=None,
                       n_bins: int = DEFAULT_BINS, alpha: float = 0.05) -> Dict[str, Any]:
    """Calibration of one model's predictions, with case-bootstrap CIs.

    ``groups``: the case id of each row (rows of one case are resampled together; default:
    every row its own case). Returns ``{"task", "n_bins", "num_samples", "num_cases", "binned",
    "ece", "ece_equal_mass", "brier", "nll"`` (+ ``<metric>_per_class`` for multilabel)``,
    "n_boot", "seed", "ci95": {metric: [lo, hi]} (multilabel also "<metric>/<class>"),
    "ci95_skipped": {metric: resamples where undefined}}``; ``ci95`` is ``{}`` when
    ``n_boot == 0``."""
    engine = _CalibrationEngine(labels, probs, task, label_names, n_bins)
    groups = np.arange(engine.num_rows) if groups is None else np.asarray(groups)
    if len(groups) != engine.num_rows:
        raise ValueError(f"{len(groups)} group ids for {engine.num_rows} rows")
    out: Dict[str, Any] = {
        "task": task, "n_bins": int(n_bins), "num_samples": int(engine.num_rows),
        "num_cases": int(len(np.unique(groups))),
        "binned": "top-1 confidence" if task == "multiclass"
        else "class probability (one-vs-rest, present entries)"}
    out.update(calibration_metrics(labels, probs, task, label_names, n_bins))
    out["n_boot"], out["seed"] = int(n_boot), int(seed)
    if n_boot > 0:
        names = engine.available()
        (samples,) = _bootstrap_samples(engine, groups, names, n_boot, seed)
        out["ci95"] = {m: _percentile_ci(samples[m], alpha) for m in names}
        out["ci95_skipped"] = {m: int(np.isnan(samples[m]).sum()) for m in names}
    else:
        out["ci95"], out["ci95_skipped"] = {}, {}
    return out


def _fmt(x, digits=4):
    return "n/a" if x is None else f"{float(x):.{digits}f}"


def _fmt_ci(ci):
    return "n/a" if not ci or ci[0] is None else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def calibration_markdown(report: Mapping[str, Any],
                         after: Optional[Mapping[str, Any]] = None,
                         temperature: Optional[Mapping[str, Any]] = None) -> str:
    """A Markdown section for a ``calibration_report`` (and, optionally, the report after
    temperature scaling plus ``fit_temperature``'s details)."""
    lines = ["## Calibration", "",
             f"Binned: {report['binned']}; {report['n_bins']} bins; 95% CIs from "
             f"{report['n_boot']} case resamples.", ""]
    head = "| Metric | Value | 95% CI |"
    sep = "|---|---|---|"
    if after is not None:
        head += " After temperature scaling | 95% CI |"
        sep += "---|---|"
    lines += [head, sep]
    labels = {"ece": "ECE (equal-width bins)", "ece_equal_mass": "ECE (equal-mass bins)",
              "brier": "Brier score" + (" (summed over classes)" if report["task"] ==
                                        "multiclass" else " (macro over classes)"),
              "nll": "NLL"}
    for m in CALIBRATION_METRICS:
        row = f"| {labels[m]} | {_fmt(report.get(m))} | {_fmt_ci(report['ci95'].get(m))} |"
        if after is not None:
            row += f" {_fmt(after.get(m))} | {_fmt_ci(after['ci95'].get(m))} |"
        lines.append(row)
    if report["task"] == "multilabel":
        lines += ["", "| Class | ECE | 95% CI | Brier | 95% CI |", "|---|---|---|---|---|"]
        for name, v in report["ece_per_class"].items():
            lines.append(f"| {name} | {_fmt(v)} | {_fmt_ci(report['ci95'].get(f'ece/{name}'))} "
                         f"| {_fmt(report['brier_per_class'][name])} | "
                         f"{_fmt_ci(report['ci95'].get(f'brier/{name}'))} |")
    if temperature is not None:
        t = temperature["temperature"]
        shown = ", ".join(f"{v:.3f}" for v in t) if isinstance(t, list) else f"{t:.3f}"
        lines += ["", f"Temperature scaling fitted on the validation split: T = {shown} "
                  f"(validation NLL {_fmt(temperature['nll_before'])} -> "
                  f"{_fmt(temperature['nll_after'])})."]
    return "\n".join(lines) + "\n"

"""Calibration: ECE (equal-width and equal-mass bins), Brier, NLL against hand-computed values,
reliability data and plots, temperature scaling, and the case-bootstrap report."""
import io
import math

import numpy as np
import pytest
from PIL import Image

from micle_tf.evaluation import calibration as cal
from micle_tf.evaluation import metrics

# A tiny 3-class set. Top-1 confidence (max p), and whether argmax == label:
#   row  p                   y  conf  correct  width bin (B=5: floor(5 * conf))
#   1    [.90, .05, .05]     0  .90   1        4
#   2    [.85, .10, .05]     1  .85   0        4
#   3    [.10, .70, .20]     1  .70   1        3
#   4    [.30, .65, .05]     0  .65   0        3
#   5    [.20, .30, .50]     2  .50   1        2
#   6    [.40, .35, .25]     0  .40   1        2  (on the edge 0.4: the bin above, [.4, .6))
#   7    [.36, .34, .30]     2  .36   0        1
P = np.array([[.90, .05, .05], [.85, .10, .05], [.10, .70, .20], [.30, .65, .05],
              [.20, .30, .50], [.40, .35, .25], [.36, .34, .30]])
Y = np.array([0, 1, 1, 0, 2, 0, 2])
NAMES = ["a", "b", "c"]


def test_ece_equal_width_hand_computed():
    # ECE = (1/N) sum_b |sum_{i in b} (correct_i - conf_i)|, N = 7, B = 5:
    #   bin 4: correct 1, conf .90 + .85 = 1.75 -> |1 - 1.75| = .75
    #   bin 3: correct 1, conf .70 + .65 = 1.35 -> .35
    #   bin 2: correct 2, conf .50 + .40 = .90  -> 1.10
    #   bin 1: correct 0, conf .36             -> .36
    #   bin 0: empty                           -> 0
    # ECE = (.75 + .35 + 1.10 + .36) / 7 = 2.56 / 7
    assert cal.expected_calibration_error(Y, P, "multiclass", n_bins=5) == \
        pytest.approx(2.56 / 7)
    # B = 3 ([0, 1/3), [1/3, 2/3), [2/3, 1]): .36 .40 .50 .65 -> bin 1, .70 .85 .90 -> bin 2
    #   bin 1: correct 2 (.40, .50), conf 1.91 -> .09; bin 2: correct 2, conf 2.45 -> .45
    #   ECE = .54 / 7
    assert cal.expected_calibration_error(Y, P, "multiclass", n_bins=3) == \
        pytest.approx(0.54 / 7)


def test_ece_equal_mass_differs_from_equal_width():
    # Sorted confidences .36 .40 .50 .65 .70 .85 .90; position q -> bin floor(3q / 7):
    #   q = 0, 1, 2 -> 0; q = 3, 4 -> 1; q = 5, 6 -> 2
    #   bin 0 {.36, .40, .50}: correct 2, conf 1.26 -> .74
    #   bin 1 {.65, .70}:      correct 1, conf 1.35 -> .35
    #   bin 2 {.85, .90}:      correct 1, conf 1.75 -> .75
    # ECE_mass = (.74 + .35 + .75) / 7 = 1.84 / 7, vs 0.54 / 7 with 3 equal-width bins
    mass = cal.expected_calibration_error(Y, P, "multiclass", n_bins=3, strategy="mass")
    assert mass == pytest.approx(1.84 / 7)
    assert mass != pytest.approx(cal.expected_calibration_error(Y, P, "multiclass", n_bins=3))
    rel = cal.reliability_data(Y, P, "multiclass", NAMES, n_bins=3, strategy="mass")
    bins = rel["curves"]["top1"]
    assert [b["count"] for b in bins] == [3, 2, 2]
    assert [b["lo"] for b in bins] == [.36, .65, .85] and [b["hi"] for b in bins] == [.5, .7, .9]
    assert bins[0]["confidence"] == pytest.approx(1.26 / 3)
    assert bins[0]["accuracy"] == pytest.approx(2 / 3)


def test_equal_mass_keeps_ties_together():
    # values .3 .3 .3 .7 with B = 2: positions 0..3 -> bins 0 0 1 1, but the three tied .3
    # all go to the bin of the first one -> counts [3, 1]
    # a multilabel column: its binned value is p itself
    probs = np.array([[.3], [.3], [.3], [.7]])
    labels = np.array([[1], [0], [0], [1]])
    rel = cal.reliability_data(labels, probs, "multilabel", ["x"], n_bins=2, strategy="mass")
    assert [b["count"] for b in rel["curves"]["x"]] == [3, 1]
    # ECE_mass = (|1 - .9| + |1 - .7|) / 4 = .4 / 4
    assert cal.expected_calibration_error(labels, probs, "multilabel", 2, "mass") == \
        pytest.approx(0.1)
    # all four top-1 confidences tie at .7: one bin, the other empty
    p = np.array([[.3, .7], [.3, .7], [.3, .7], [.7, .3]])
    rel = cal.reliability_data([0, 0, 1, 1], p, "multiclass", ["u", "v"], 2, "mass")
    assert [b["count"] for b in rel["curves"]["top1"]] == [4, 0]
    assert rel["curves"]["top1"][1]["confidence"] is None


def test_width_bins_edges_and_empty():
    rel = cal.reliability_data(Y, P, "multiclass", NAMES, n_bins=5)
    bins = rel["curves"]["top1"]
    assert [b["count"] for b in bins] == [0, 1, 2, 2, 2]
    assert bins[0]["confidence"] is None and bins[0]["accuracy"] is None
    assert bins[2]["lo"] == pytest.approx(.4) and bins[2]["hi"] == pytest.approx(.6)
    assert bins[2]["confidence"] == pytest.approx(.45) and bins[2]["accuracy"] == 1.0
    # p = 1.0 lands in the last bin, 0.5 (an exact edge) in the bin above it
    probs = np.array([[1.0], [0.5], [0.0]])
    rel = cal.reliability_data(np.array([[1], [1], [0]]), probs, "multilabel", ["x"], n_bins=2)
    assert [b["count"] for b in rel["curves"]["x"]] == [1, 2]


def test_brier_and_nll_hand_computed():
    # Brier = mean over rows of sum_c (p_c - onehot_c)^2 (summed over classes):
    #   1: .01 + .0025 + .0025 = .015      2: .7225 + .81 + .0025 = 1.535
    #   3: .01 + .09 + .04 = .14            4: .49 + .4225 + .0025 = .915
    #   5: .04 + .09 + .25 = .38            6: .36 + .1225 + .0625 = .545
    #   7: .1296 + .1156 + .49 = .7352      sum 4.2652 -> / 7
    assert cal.brier_score(Y, P, "multiclass") == pytest.approx(4.2652 / 7)
    # NLL = -mean log p_y
    want = -(math.log(.9) + math.log(.1) + math.log(.7) + math.log(.3) + math.log(.5)
             + math.log(.4) + math.log(.3)) / 7
    assert cal.negative_log_likelihood(Y, P, "multiclass") == pytest.approx(want)


# Multilabel, 2 classes, B = 2 ([0, .5), [.5, 1]):
#   class A: p .2 .4 .6 .9, y 0 1 1 1
#   class B: p .1 .3 .7 .8, y 0 -1 (uncertain: excluded) 1 0
ML_P = np.array([[.2, .1], [.4, .3], [.6, .7], [.9, .8]])
ML_Y = np.array([[0, 0], [1, -1], [1, 1], [1, 0]])


def test_multilabel_per_class_ece_and_brier():
    out = cal.calibration_metrics(ML_Y, ML_P, "multilabel", ["A", "B"], n_bins=2)
    # A: bin 0 {.2, .4}: positives 1, sum p .6 -> .4; bin 1 {.6, .9}: 2 vs 1.5 -> .5
    #    ECE_A = (.4 + .5) / 4 = .225
    # B: bin 0 {.1}: 0 vs .1 -> .1; bin 1 {.7, .8}: 1 vs 1.5 -> .5; ECE_B = .6 / 3 = .2
    assert out["ece_per_class"] == {"A": pytest.approx(.225), "B": pytest.approx(.2)}
    assert out["ece"] == pytest.approx((.225 + .2) / 2)
    # Brier A: (.04 + .36 + .16 + .01) / 4 = .1425; B: (.01 + .09 + .64) / 3 = .74 / 3
    assert out["brier_per_class"]["A"] == pytest.approx(.1425)
    assert out["brier_per_class"]["B"] == pytest.approx(.74 / 3)
    assert out["brier"] == pytest.approx((.1425 + .74 / 3) / 2)
    # NLL A = -(log .8 + log .4 + log .6 + log .9) / 4
    assert out["nll_per_class"]["A"] == pytest.approx(
        -(math.log(.8) + math.log(.4) + math.log(.6) + math.log(.9)) / 4)
    # a class with no present entry is undefined, and left out of the macro mean
    y = ML_Y.copy()
    y[:, 1] = -2
    out = cal.calibration_metrics(y, ML_P, "multilabel", ["A", "B"], n_bins=2)
    assert out["ece_per_class"]["B"] is None and out["ece"] == pytest.approx(.225)


def test_weighted_engine_equals_duplicated_rows():
    """The bootstrap engine with integer weights == the metric on rows repeated that often,
    for both binnings (equal-mass bins recomputed on the resample)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 3)) * 2
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    p[5] = p[6]  # a tie between two rows
    y = rng.integers(0, 3, 40)
    w = rng.integers(0, 4, 40).astype(float)
    eng = cal._CalibrationEngine(y, p, "multiclass", NAMES, n_bins=6)
    got = eng(w[None, :], ["ece", "ece_equal_mass", "brier", "nll"])
    rep = np.repeat(np.arange(40), w.astype(int))
    want = cal.calibration_metrics(y[rep], p[rep], "multiclass", NAMES, n_bins=6)
    for m in ("ece", "ece_equal_mass", "brier", "nll"):
        assert got[m][0] == pytest.approx(want[m]), m
    yl = rng.integers(-2, 2, (40, 2))
    pl = 1 / (1 + np.exp(-rng.normal(size=(40, 2))))
    eng = cal._CalibrationEngine(yl, pl, "multilabel", ["A", "B"], n_bins=4)
    got = eng(w[None, :], eng.available())
    want = cal.calibration_metrics(yl[rep], pl[rep], "multilabel", ["A", "B"], n_bins=4)
    assert got["ece_equal_mass"][0] == pytest.approx(want["ece_equal_mass"])
    assert got["brier/B"][0] == pytest.approx(want["brier_per_class"]["B"])


# ----------------------------------------------------------------------------- temperature
def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_temperature_recovers_overconfidence_and_keeps_argmax():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(20000, 4)) * 1.5                  # a calibrated model's logits
    y = np.array([rng.choice(4, p=row) for row in _softmax(z)])
    over = _softmax(3.0 * z)                               # the same model, 3x over-confident
    t, details = cal.fit_temperature(over, y, "multiclass", return_details=True)
    assert isinstance(t, float) and t == pytest.approx(3.0, abs=0.1)
    assert details["nll_after"] < details["nll_before"] - 0.1
    fixed = cal.apply_temperature(over, t, "multiclass")
    np.testing.assert_array_equal(np.argmax(fixed, 1), np.argmax(over, 1))
    assert cal.negative_log_likelihood(y, fixed, "multiclass") == pytest.approx(
        details["nll_after"])
    assert cal.expected_calibration_error(y, fixed, "multiclass") < \
        cal.expected_calibration_error(y, over, "multiclass") / 3
    # from real logits: the same temperature (probabilities lose only what EPS clips)
    t_logits = cal.fit_temperature(3.0 * z, y, "multiclass", from_logits=True)
    assert t_logits == pytest.approx(t, abs=0.02)
    # a calibrated model keeps T ~ 1; an under-confident one gets T < 1
    assert cal.fit_temperature(_softmax(z), y, "multiclass") == pytest.approx(1.0, abs=0.05)
    assert cal.fit_temperature(_softmax(z / 2), y, "multiclass") == pytest.approx(0.5, abs=0.03)


def test_temperature_per_class_multilabel():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(20000, 4)) * 1.5
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(int)
    y[rng.random(z.shape) < 0.1] = -1                     # uncertain entries are ignored
    y[:, 3] = 1                                           # a class without negatives
    scale = np.array([3.0, 0.5, 1.0, 2.0])
    probs = 1 / (1 + np.exp(-z * scale))
    t, details = cal.fit_temperature(probs, y, "multilabel", return_details=True)
    assert t.shape == (4,)
    np.testing.assert_allclose(t[:3], scale[:3], rtol=0.06)
    assert t[3] == 1.0 and details["per_class"] is True
    assert details["nll_after"] < details["nll_before"]
    fixed = cal.apply_temperature(probs, t, "multilabel")
    # per-class order kept (non-decreasing: probabilities beyond the EPS clip become ties)
    for j in range(3):
        order = np.argsort(probs[:, j], kind="stable")
        assert np.all(np.diff(fixed[order, j]) >= 0)
    y[:, 3] = -2  # one shared T, pooled over the present entries of classes 0-2
    shared = cal.fit_temperature(probs, y, "multilabel", per_class=False)
    assert isinstance(shared, float) and 0.5 < shared < 3.0


def test_temperature_input_checks():
    with pytest.raises(ValueError, match="> 0"):
        cal.apply_temperature(P, 0.0, "multiclass")
    with pytest.raises(ValueError, match="one scalar"):
        cal.apply_temperature(P, [1.0, 2.0, 3.0], "multiclass")
    with pytest.raises(ValueError, match="2 temperatures for 3 classes"):
        cal.apply_temperature(P, [1.0, 2.0], "multilabel")
    with pytest.raises(ValueError, match="finite"):
        cal.fit_temperature(np.full((2, 2), np.nan), [0, 1], "multiclass")
    # clipping: probabilities of exactly 0 and 1 give finite logits
    z = cal.to_logits(np.array([[0.0, 1.0]]), "multilabel")
    assert np.all(np.isfinite(z)) and z[0, 1] == pytest.approx(math.log((1 - 1e-7) / 1e-7))


# ----------------------------------------------------------------------------- report, plot
def test_calibration_report_bootstrap_over_cases():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(300, 3)) * 2
    p = _softmax(z)
    y = np.array([rng.choice(3, p=row) for row in _softmax(z / 2)])  # over-confident model
    cases = np.repeat(np.arange(100), 3)  # 3 image rows per case
    rep = cal.calibration_report(y, p, "multiclass", NAMES, n_boot=200, seed=4, groups=cases)
    assert rep["num_cases"] == 100 and rep["num_samples"] == 300
    for m in ("ece", "ece_equal_mass", "brier", "nll"):
        lo, hi = rep["ci95"][m]
        assert lo <= rep[m] <= hi and lo < hi, m
        assert rep["ci95_skipped"][m] == 0
    again = cal.calibration_report(y, p, "multiclass", NAMES, n_boot=200, seed=4, groups=cases)
    assert again["ci95"] == rep["ci95"]
    # resampling cases, not rows: 100 cases of 3 rows give wider intervals than 300 rows
    rows = cal.calibration_report(y, p, "multiclass", NAMES, n_boot=200, seed=4)
    assert rows["num_cases"] == 300 and rows["ece"] == rep["ece"]
    ml = cal.calibration_report(ML_Y, ML_P, "multilabel", ["A", "B"], n_boot=50, seed=0,
                                n_bins=2)
    assert set(ml["ci95"]) >= {"ece", "ece/A", "ece/B", "brier/A", "nll/B", "ece_equal_mass/A"}
    assert ml["ece_per_class"]["A"] == pytest.approx(.225)
    assert cal.calibration_report(Y, P, "multiclass", NAMES, n_boot=0)["ci95"] == {}
    md = cal.calibration_markdown(rep, after=rep, temperature={"temperature": 1.5,
                                                               "nll_before": 1.0,
                                                               "nll_after": 0.9})
    assert "ECE (equal-mass bins)" in md and "T = 1.500" in md


def _check_png(path, min_size=(200, 200)):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        return im.size


def test_reliability_plots_are_pngs(tmp_path):
    t = cal.fit_temperature(P, Y, "multiclass")
    path = cal.plot_reliability(Y, {"before": P, "after": cal.apply_temperature(P, t,
                                                                                  "multiclass")},
                                "multiclass", NAMES, tmp_path / "figs" / "reliability.png",
                                n_bins=5)
    _check_png(path)
    path = cal.plot_reliability(ML_Y, ML_P, "multilabel", ["A", "B"], tmp_path / "ml.png",
                                n_bins=2, strategy="mass")
    w, h = _check_png(path)
    assert w > h  # two panels side by side
    y = ML_Y.copy()
    y[:, 1] = -2  # a class without labelled rows still gets a (empty) panel
    _check_png(cal.plot_reliability(y, ML_P, "multilabel", ["A", "B"], tmp_path / "e.png"))


def test_bad_inputs():
    with pytest.raises(ValueError, match="strategy"):
        cal.expected_calibration_error(Y, P, "multiclass", strategy="quantile")
    with pytest.raises(ValueError, match="n_bins"):
        cal.expected_calibration_error(Y, P, "multiclass", n_bins=0)
    with pytest.raises(ValueError, match="unlabelled"):
        cal.brier_score(np.array([0, -1, 1, 0, 2, 0, 2]), P, "multiclass")
    with pytest.raises(ValueError, match="group ids"):
        cal.calibration_report(Y, P, "multiclass", NAMES, n_boot=5, groups=[0, 1])
    assert metrics.TASKS == ("multiclass", "multilabel")


@pytest.mark.parametrize("strategy", ["width", "mass"])
def test_reliability_bins_reproduce_the_ece(strategy):
    """ECE = sum_b count_b / N * |accuracy_b - confidence_b| over the reliability data's bins
    (the diagram and the number agree), with many ties."""
    rng = np.random.default_rng(5)
    p = np.round(rng.dirichlet([1, 1, 1], size=500), 2)
    p /= p.sum(1, keepdims=True)
    y = rng.integers(0, 3, 500)
    rel = cal.reliability_data(y, p, "multiclass", NAMES, n_bins=10, strategy=strategy)
    bins = rel["curves"]["top1"]
    assert sum(b["count"] for b in bins) == 500
    from_bins = sum(b["count"] / 500 * abs(b["accuracy"] - b["confidence"])
                    for b in bins if b["count"])
    assert from_bins == pytest.approx(
        cal.expected_calibration_error(y, p, "multiclass", 10, strategy))

"""Tests for micle_tf.evaluation.metrics with hand-computed expectations."""
import json

import numpy as np
import pytest

from micle_tf.evaluation import metrics as M

# ---- 4-class, 6-sample hand example ------------------------------------------------------------
# row: probs                    label  argmax  in top-3?
# r0 [.50 .20 .20 .10]          0      0 ok    yes
# r1 [.10 .60 .20 .10]          2      1       yes (1, 2, then ties)
# r2 [.10 .20 .30 .40]          0      3       no  (3, 2, 1)
# r3 [.25 .40 .30 .05]          3      1       no  (1, 2, 0)
# r4 [.10 .10 .70 .10]          2      2 ok    yes
# r5 [.30 .40 .20 .10]          1      1 ok    yes
P4 = np.array([[.50, .20, .20, .10],
               [.10, .60, .20, .10],
               [.10, .20, .30, .40],
               [.25, .40, .30, .05],
               [.10, .10, .70, .10],
               [.30, .40, .20, .10]])
Y4 = np.array([0, 2, 0, 3, 2, 1])
N4 = ["a", "b", "c", "d"]
# One-vs-rest AUCs by pair counting (win = 1, tie = 0.5):
#  a: pos {.50, .10} vs neg {.10, .25, .10, .30}: .50 -> 4 wins; .10 -> 2 ties = 1  => 5/8
#  b: pos {.40} vs neg {.20, .60, .20, .40, .10}: 3 wins + 1 tie = 3.5          => 3.5/5
#  c: pos {.20, .70} vs neg {.20, .30, .30, .20}: .20 -> 2 ties = 1; .70 -> 4    => 5/8
#  d: pos {.05} vs neg {.10, .10, .40, .10, .10}: 0                             => 0
AUC4 = {"a": 0.625, "b": 0.7, "c": 0.625, "d": 0.0}


def test_top1_top3_hand_example():
    m = M.compute_metrics(Y4, P4, "multiclass", N4)
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top3"] == pytest.approx(4 / 6)
    assert "sensitivity" not in m and "specificity" not in m   # C > 2


def test_per_class_auc_and_macro_hand_example():
    m = M.compute_metrics(Y4, P4, "multiclass", N4)
    for k, v in AUC4.items():
        assert m["auc_per_class"][k] == pytest.approx(v)
    assert m["auc_macro"] == pytest.approx(1.95 / 4)
    assert m["support"] == {"a": 2, "b": 1, "c": 2, "d": 1}
    json.dumps(m)   # plain Python types
    assert all(type(v) is float for v in m["auc_per_class"].values())


def test_top3_is_one_when_three_or_fewer_classes():
    p = np.array([[.2, .3, .5], [.6, .3, .1]])
    m = M.compute_metrics(np.array([0, 2]), p, "multiclass", ["x", "y", "z"])
    assert m["top1"] == 0.0 and m["top3"] == 1.0


# ---- binary: 2 positives, 3 negatives -------------------------------------------------------------
# positive scores {.8, .4}, negative scores {.3, .4, .9}
# pairs: .8 beats .3, .4, loses .9 -> 2 ; .4 beats .3, ties .4, loses .9 -> 1.5 ; AUC = 3.5 / 6
S_BIN = np.array([.8, .4, .3, .4, .9])
Y_BIN = np.array([1, 1, 0, 0, 0])
P_BIN = np.stack([1 - S_BIN, S_BIN], axis=1)


def test_binary_auc_from_pair_counts():
    m = M.compute_metrics(Y_BIN, P_BIN, "multiclass", ["neg", "pos"])
    assert m["auc_per_class"]["pos"] == pytest.approx(3.5 / 6)
    assert m["auc_per_class"]["neg"] == pytest.approx(3.5 / 6)   # 1 - s ranks reversed
    # argmax: .8 -> 1 ok, .4 -> 0 wrong, .3 -> 0 ok, .4 -> 0 ok, .9 -> 1 wrong
    assert m["top1"] == pytest.approx(3 / 5)
    assert m["top3"] == 1.0


def test_binary_sensitivity_specificity_hand():
    m = M.compute_metrics(Y_BIN, P_BIN, "multiclass", ["neg", "pos"], threshold=0.5)
    # predicted positive (s >= .5): .8 (pos), .9 (neg) -> sens 1/2, spec 2/3
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(2 / 3)
    m = M.compute_metrics(Y_BIN, P_BIN, "multiclass", ["neg", "pos"], threshold=0.4)
    # s >= .4: .8, .4 (both pos), .4, .9 (neg) -> sens 1, spec 1/3
    assert m["sensitivity"] == pytest.approx(1.0)
    assert m["specificity"] == pytest.approx(1 / 3)


def test_undefined_auc_is_none_and_macro_excludes_it():
    p = np.array([[.70, .20, .10],
                  [.30, .60, .10],
                  [.60, .30, .10],
                  [.25, .30, .45]])
    y = np.array([0, 1, 0, 1])
    m = M.compute_metrics(y, p, "multiclass", ["x", "y", "z"])
    # x: pos {.7, .6} vs neg {.3, .25} -> 1.0 ; y: pos {.6, .3} vs neg {.2, .3} -> 3.5/4
    assert m["auc_per_class"]["x"] == pytest.approx(1.0)
    assert m["auc_per_class"]["y"] == pytest.approx(0.875)
    assert m["auc_per_class"]["z"] is None
    assert m["auc_macro"] == pytest.approx(0.9375)      # not (1 + .875 + 0) / 3


def test_all_auc_undefined_gives_none_macro():
    m = M.compute_metrics(np.array([0, 0]), np.array([[.6, .4], [.3, .7]]), "multiclass",
                          ["x", "y"])
    assert m["auc_macro"] is None
    assert m["sensitivity"] is None          # no positives
    assert m["specificity"] == pytest.approx(1 / 2)


# ---- multilabel with uncertain (-1) and missing (-2) ---------------------------------------------
Y_ML = np.array([[1, 0],
                 [0, -1],
                 [-2, 1],
                 [1, 1],
                 [0, -2]])
P_ML = np.array([[.9, .2],
                 [.6, .99],
                 [.1, .7],
                 [.3, .8],
                 [.2, .0]])


def test_multilabel_masks_uncertain_and_missing():
    m = M.compute_metrics(Y_ML, P_ML, "multilabel", ["A", "B"])
    # A present rows: (1,.9) (0,.6) (1,.3) (0,.2): .9 beats both, .3 beats .2 -> 3/4
    # B present rows: (0,.2) (1,.7) (1,.8) -> 2/2 (the uncertain .99 would make it 0.5 as a neg)
    assert m["auc_per_class"] == {"A": pytest.approx(0.75), "B": pytest.approx(1.0)}
    assert m["auc_macro"] == pytest.approx(0.875)
    # accuracy at .5: A: 1,1,0,0 vs 1,0,1,0 -> 2/4 ; B: 0,1,1 vs 0,1,1 -> 1 ; mean .75
    assert m["top1"] == pytest.approx(0.75)
    assert m["top3"] is None
    assert m["sensitivity"] == {"A": pytest.approx(0.5), "B": pytest.approx(1.0)}
    assert m["specificity"] == {"A": pytest.approx(0.5), "B": pytest.approx(1.0)}
    json.dumps(m)


def test_label_validation():
    with pytest.raises(ValueError, match="unlabelled"):
        M.compute_metrics(np.array([0, -1]), np.array([[.5, .5], [.5, .5]]), "multiclass",
                          ["x", "y"])
    with pytest.raises(ValueError, match="codes"):
        M.compute_metrics(np.array([[2, 0]]), np.array([[.5, .5]]), "multilabel", ["x", "y"])
    with pytest.raises(ValueError, match="label names"):
        M.compute_metrics(np.array([0]), np.array([[.5, .5]]), "multiclass", ["x"])
    with pytest.raises(ValueError, match="task"):
        M.compute_metrics(np.array([0]), np.array([[.5, .5]]), "binary", ["x", "y"])


# ---- aggregation ---------------------------------------------------------------------------------
def test_aggregate_by_case_mean_and_order():
    ids = np.array(["b", "a", "b", "c", "a", "b"])
    probs = np.array([[.2, .8], [.6, .4], [.4, .6], [1., 0.], [.8, .2], [.0, 1.]])
    labels = np.array([1, 0, 1, 0, 0, 1])
    u, p, y = M.aggregate_by_case(ids, probs, labels)
    assert list(u) == ["b", "a", "c"]
    np.testing.assert_allclose(p, [[.2, .8], [.7, .3], [1., 0.]])
    assert list(y) == [1, 0, 0]


def test_aggregate_by_case_multilabel_rows():
    ids = [7, 7, 3]
    u, p, y = M.aggregate_by_case(ids, np.array([[.1, .2], [.3, .4], [.5, .6]]),
                                  np.array([[1, -1], [1, -1], [0, 1]]))
    assert list(u) == [7, 3]
    np.testing.assert_allclose(p, [[.2, .3], [.5, .6]])
    np.testing.assert_array_equal(y, [[1, -1], [0, 1]])


def test_aggregate_conflicting_labels_names_case():
    with pytest.raises(ValueError, match="case_42"):
        M.aggregate_by_case(["ok", "case_42", "case_42"], np.full((3, 2), .5), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="'x'"):
        M.aggregate_by_case(["x", "x"], np.full((2, 2), .5), np.array([[1, 0], [1, -1]]))


# ---- weighted AUC engine == sklearn on duplicated rows ---------------------------------------------
def test_weighted_auc_equals_duplicated_rows():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(3)
    s = np.round(rng.random(60), 1)                  # many ties
    y = rng.random(60) < .4
    w = rng.integers(0, 4, size=(5, 60)).astype(float)
    got = M._WeightedAUC(s, y, ~y)(w)
    for b in range(5):
        idx = np.repeat(np.arange(60), w[b].astype(int))
        assert got[b] == pytest.approx(roc_auc_score(y[idx], s[idx]))


# ---- bootstrap -----------------------------------------------------------------------------------
def test_bootstrap_perfect_predictions_ci_is_one():
    y = np.array([0, 1, 2] * 10)
    p = np.eye(3)[y] * .9 + .1 / 3
    ci, det = M.bootstrap_ci(y, p, np.arange(30), "multiclass", ["x", "y", "z"], n_boot=300,
                             return_details=True)
    assert ci["top1"] == [1.0, 1.0]
    assert ci["auc_macro"] == [1.0, 1.0]
    for n in ["x", "y", "z"]:
        assert ci[f"auc/{n}"] == [1.0, 1.0]
    assert det["skipped"]["top1"] == 0


def test_bootstrap_resamples_cases_not_rows():
    # case A: 9 images all correct; case B: 1 image wrong. Case resampling gives only
    # {A,A} -> 1.0, {A,B} -> 9/10, {B,B} -> 0.0; row resampling would give e.g. 0.8, 0.7, ...
    y = np.zeros(10, dtype=int)
    p = np.tile([.9, .1], (10, 1))
    p[9] = [.1, .9]
    groups = np.array(["A"] * 9 + ["B"])
    ci, det = M.bootstrap_ci(y, p, groups, "multiclass", ["x", "y"], n_boot=2000, seed=1,
                             metrics=("top1",), return_details=True)
    vals = det["samples"]["top1"]
    assert set(np.round(vals, 12)) == {0.0, 0.9, 1.0}
    assert np.mean(vals == 0.9) == pytest.approx(0.5, abs=0.05)   # P(one of each) = 1/2
    assert ci["top1"] == [0.0, 1.0]
    # the same rows resampled as independent units take many more values
    _, det_rows = M.bootstrap_ci(y, p, np.arange(10), "multiclass", ["x", "y"], n_boot=2000,
                                 seed=1, metrics=("top1",), return_details=True)
    assert len(set(np.round(det_rows["samples"]["top1"], 12))) > 3


def test_bootstrap_deterministic_given_seed():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 80)
    p = rng.dirichlet(np.ones(3), 80)
    g = np.repeat(np.arange(40), 2)
    a = M.bootstrap_ci(y, p, g, "multiclass", ["x", "y", "z"], n_boot=200, seed=5)
    b = M.bootstrap_ci(y, p, g, "multiclass", ["x", "y", "z"], n_boot=200, seed=5)
    c = M.bootstrap_ci(y, p, g, "multiclass", ["x", "y", "z"], n_boot=200, seed=6)
    assert a == b
    assert a != c


def test_bootstrap_skips_undefined_and_counts():
    # class "z" is present in a single case: resamples missing it have undefined auc/z
    y = np.array([0, 1] * 10 + [2])
    p = np.full((21, 3), 1 / 3)
    ci, det = M.bootstrap_ci(y, p, np.arange(21), "multiclass", ["x", "y", "z"], n_boot=500,
                             return_details=True)
    # P(case never drawn in 21 draws) = (20/21)^21 ~ 0.36
    assert 0.25 < det["skipped"]["auc/z"] / 500 < 0.47
    assert det["skipped"]["auc_macro"] == 0
    assert np.isnan(det["samples"]["auc/z"]).sum() == det["skipped"]["auc/z"]


def _realistic(seed=0, n_cases=150, c=4):
    rng = np.random.default_rng(seed)
    case_y = rng.integers(0, c, n_cases)
    n_img = rng.integers(1, 5, n_cases)
    ids = np.repeat(np.array([f"case{i:03d}" for i in range(n_cases)]), n_img)
    y = np.repeat(case_y, n_img)
    logits = rng.normal(size=(len(y), c)) + 1.5 * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return ids, y, p, [f"class{j}" for j in range(c)]


@pytest.mark.parametrize("level", ["case", "image"])
def test_ci_contains_point_estimate(level):
    ids, y, p, names = _realistic()
    r = M.evaluate_predictions(ids, y, p, "multiclass", names, level=level, n_boot=500)
    for key in ["top1", "top3", "auc_macro"]:
        lo, hi = r["ci95"][key]
        assert lo <= r[key] <= hi and lo < hi
    for n in names:
        lo, hi = r["ci95"][f"auc/{n}"]
        assert lo <= r["auc_per_class"][n] <= hi


def test_bootstrap_evaluates_1000_resamples_of_200_cases_in_one_batched_pass(monkeypatch):
    """Vectorised, not a Python loop per resample: the metric engine sees every resample's
    row weights at once (one [1000, rows] matrix), and the batched values are those of
    rebuilding each resample row by row."""
    ids, y, p, names = _realistic(seed=1, n_cases=200, c=5)
    calls = []
    engine_call = M._MetricEngine.__call__

    def recording(self, weights, metrics):
        calls.append(weights.shape)
        return engine_call(self, weights, metrics)

    monkeypatch.setattr(M._MetricEngine, "__call__", recording)
    ci, details = M.bootstrap_ci(y, p, ids, "multiclass", names, n_boot=1000,
                                 metrics=("top1", "top3", "auc_macro"), return_details=True)
    assert calls == [(1000, len(y))]
    monkeypatch.setattr(M._MetricEngine, "__call__", engine_call)
    # resample 0 rebuilt explicitly: the same draw of cases, every row of a drawn case
    groups = np.asarray(ids)
    _, g_idx = M._first_appearance_unique(groups)
    draw = np.random.default_rng(0).integers(0, g_idx.max() + 1, size=(1000, g_idx.max() + 1))[0]
    rows = np.concatenate([np.flatnonzero(g_idx == g) for g in draw])
    top1 = float(np.mean(np.argmax(p[rows], 1) == y[rows]))
    assert details["samples"]["top1"][0] == pytest.approx(top1)


# ---- evaluate_predictions ------------------------------------------------------------------------
REQUIRED = {"task", "level", "num_cases", "num_images", "top1", "top3", "auc_macro",
            "auc_per_class", "ci95", "label_fraction", "init_from", "threshold", "n_boot"}


def test_evaluate_predictions_case_level_keys_and_aggregation():
    ids = ["p1", "p1", "p2", "p3", "p3", "p3"]
    y = [1, 1, 0, 0, 0, 0]
    s = np.array([.9, .5, .4, .2, .8, .5])    # case means: p1 .7, p2 .4, p3 .5
    p = np.stack([1 - s, s], axis=1)
    r = M.evaluate_predictions(ids, y, p, "multiclass", ["benign", "malignant"], level="case",
                               n_boot=200, label_fraction=0.1, init_from="micle")
    assert REQUIRED <= set(r)
    assert (r["num_cases"], r["num_images"], r["num_samples"]) == (3, 6, 3)
    assert r["level"] == "case" and r["label_fraction"] == 0.1 and r["init_from"] == "micle"
    # case level: p1 .7 -> 1 ok; p2 .4 -> 0 ok; p3 .5 -> argmax tie -> class 0 ok
    assert r["top1"] == pytest.approx(1.0)
    # sensitivity at .5: p1 .7 >= .5 -> 1/1; specificity: p2 .4 neg ok, p3 .5 >= .5 -> 1/2
    assert r["sensitivity"] == pytest.approx(1.0)
    assert r["specificity"] == pytest.approx(0.5)
    assert {"top1", "top3", "auc_macro", "auc/benign", "auc/malignant", "sensitivity",
            "specificity"} <= set(r["ci95"])
    json.dumps(r)


def test_evaluate_predictions_image_level_multilabel():
    r = M.evaluate_predictions([0, 0, 1, 2, 3], Y_ML, P_ML, "multilabel", ["A", "B"],
                               level="image", n_boot=100)
    assert (r["num_cases"], r["num_images"], r["num_samples"]) == (4, 5, 5)
    assert r["top1"] == pytest.approx(0.75) and r["top3"] is None
    assert "top3" not in r["ci95"]
    assert {"top1", "auc_macro", "auc/A", "sensitivity/B", "specificity/A"} <= set(r["ci95"])
    json.dumps(r)


def test_evaluate_predictions_no_bootstrap():
    r = M.evaluate_predictions(np.arange(6), Y4, P4, "multiclass", N4, n_boot=0)
    assert r["ci95"] == {} and r["top1"] == pytest.approx(0.5)


# ---- paired difference ---------------------------------------------------------------------------
def test_paired_difference_identical_models():
    ids, y, p, names = _realistic(seed=2)
    d = M.paired_bootstrap_difference(y, p, p.copy(), ids, "multiclass", names, n_boot=300)
    assert d["diff"] == 0.0
    assert d["ci95"] == [0.0, 0.0]
    assert d["significant"] is False


def test_paired_difference_clearly_better_model():
    ids, y, p_good, names = _realistic(seed=3)
    rng = np.random.default_rng(9)
    p_bad = rng.dirichlet(np.ones(len(names)), len(y))
    d = M.paired_bootstrap_difference(y, p_good, p_bad, ids, "multiclass", names,
                                      metric="auc_macro", n_boot=500)
    assert d["diff"] > 0.15 and d["ci95"][0] > 0 and d["significant"] is True
    r = M.paired_bootstrap_difference(y, p_bad, p_good, ids, "multiclass", names, metric="top1",
                                      n_boot=300)
    assert r["diff"] < 0 and r["ci95"][1] < 0 and r["significant"] is True


# ---- seed-averaged values and differences --------------------------------------------------------
def _seed_runs(k=3, seed=4):
    """k runs of one model (other seeds) and k of a worse one, on the same rows."""
    ids, y, _, names = _realistic(seed=seed, n_cases=60, c=3)
    rng = np.random.default_rng(seed)
    good = [np.exp(rng.normal(size=(len(y), 3)) + s * np.eye(3)[y]) for s in (1.0, 1.5, 2.0)[:k]]
    bad = [np.exp(rng.normal(size=(len(y), 3)) + 0.3 * np.eye(3)[y]) for _ in range(k)]
    norm = [p / p.sum(1, keepdims=True) for p in good + bad]
    return ids, y, names, norm[:k], norm[k:]


def test_seed_averaged_bootstrap_against_explicit_resamples():
    """Reference: the same draws of cases (default_rng(seed), one up-front [n_boot, cases]
    array, cases in first-appearance order), each run's AUC recomputed on the explicitly
    repeated rows, averaged over the runs; percentile CI."""
    ids, y, names, good, bad = _seed_runs()
    n_boot = 40
    got = M.seed_averaged_bootstrap(y, good, ids, "multiclass", names, probs_by_seed_b=bad,
                                    n_boot=n_boot, seed=7)
    per_seed = [M.compute_metrics(y, a, "multiclass", names)["auc_macro"]
                - M.compute_metrics(y, b, "multiclass", names)["auc_macro"]
                for a, b in zip(good, bad)]
    assert got["per_seed"] == pytest.approx(per_seed)
    assert got["value"] == pytest.approx(np.mean(per_seed))
    _, g_idx = M._first_appearance_unique(np.asarray(ids))
    g = g_idx.max() + 1
    draws = np.random.default_rng(7).integers(0, g, size=(n_boot, g))
    ref = []
    for draw in draws:
        rows = np.concatenate([np.flatnonzero(g_idx == c) for c in draw])
        ref.append(np.mean([M.compute_metrics(y[rows], a[rows], "multiclass", names)["auc_macro"]
                            - M.compute_metrics(y[rows], b[rows], "multiclass", names)["auc_macro"]
                            for a, b in zip(good, bad)]))
    assert got["ci95"] == pytest.approx(list(np.percentile(ref, [2.5, 97.5])))
    assert got["significant"] is True and got["ci95"][0] > 0 and got["num_seeds"] == 3


def test_seed_averaged_bootstrap_one_seed_is_the_paired_difference():
    ids, y, names, good, bad = _seed_runs(k=1)
    avg = M.seed_averaged_bootstrap(y, good, ids, "multiclass", names, probs_by_seed_b=bad,
                                    n_boot=200, seed=3)
    one = M.paired_bootstrap_difference(y, good[0], bad[0], ids, "multiclass", names,
                                        n_boot=200, seed=3)
    assert avg["value"] == pytest.approx(one["diff"])
    assert avg["ci95"] == pytest.approx(one["ci95"])


def test_seed_averaged_value_without_b_and_bad_inputs():
    ids, y, names, good, _ = _seed_runs(k=2)
    r = M.seed_averaged_bootstrap(y, good, ids, "multiclass", names, n_boot=100)
    aucs = [M.compute_metrics(y, p, "multiclass", names)["auc_macro"] for p in good]
    assert r["value"] == pytest.approx(np.mean(aucs)) and "significant" not in r
    assert r["ci95"][0] <= r["value"] <= r["ci95"][1]
    with pytest.raises(ValueError, match="2 runs of A but 1 of B"):
        M.seed_averaged_bootstrap(y, good, ids, "multiclass", names, probs_by_seed_b=good[:1])
    with pytest.raises(ValueError, match="same rows"):
        M.seed_averaged_bootstrap(y, [good[0], good[1][:-1]], ids, "multiclass", names)

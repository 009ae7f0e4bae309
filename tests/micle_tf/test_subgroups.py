"""Subgroup metrics on a fixture with hand-computed per-group AUCs, suppression of a small
group, the worst group and the largest gap."""
import numpy as np
import pytest

from micle_tf.evaluation import calibration, metrics, subgroups

# A binary (multiclass, C = 2) set; p1 = probability of class 1, one row per case.
#   sex=female (4 cases): positives p1 .9 .6, negatives .7 .2
#     AUC = pairs (pos > neg): .9>.7 .9>.2 .6>.2 (.6<.7) = 3 / 4
#     top-1 (argmax): .9 .6 right, .7 wrong, .2 right = 3 / 4
#   sex=male (5 cases): positives .8 .4 .3, negatives .45 .1
#     AUC: .8 beats both (2), .4 beats .1 (1), .3 beats .1 (1) = 4 / 6 = 2 / 3
#     top-1: .8 right, .4 .3 wrong, .45 .1 right = 3 / 5
#   sex=unknown (2 cases): positive .55, negative .35 -> suppressed with min_group_size = 3
# For C = 2 the class-0 AUC (scores 1 - p1) equals the class-1 AUC, so macro AUC = AUC.
ROWS = [("female", 1, .9), ("female", 1, .6), ("female", 0, .7), ("female", 0, .2),
        ("male", 1, .8), ("male", 1, .4), ("male", 1, .3), ("male", 0, .45), ("male", 0, .1),
        ("unknown", 1, .55), ("unknown", 0, .35)]
SEX = np.array([r[0] for r in ROWS], dtype=object)
Y = np.array([r[1] for r in ROWS])
P = np.array([[1 - r[2], r[2]] for r in ROWS])
NAMES = ["benign", "malignant"]


def test_known_per_group_aucs_worst_and_gap():
    rep = subgroups.subgroup_report(Y, P, "multiclass", NAMES, {"sex": SEX}, min_group_size=3,
                                    n_boot=200, seed=0)
    a = rep["attributes"]["sex"]
    g = a["groups"]
    assert list(g) == ["female", "male", "unknown"]
    assert g["female"]["auc_macro"] == pytest.approx(3 / 4)
    assert g["male"]["auc_macro"] == pytest.approx(2 / 3)
    assert g["female"]["top1"] == pytest.approx(3 / 4)
    assert g["male"]["top1"] == pytest.approx(3 / 5)
    assert g["male"]["n_cases"] == 5 and g["male"]["num_samples"] == 5
    # suppression: the size is not shown, no metric is
    assert g["unknown"] == {"n_cases": "n < 3", "suppressed": True}
    assert a["num_suppressed"] == 1
    # complementary suppression: with one group suppressed, the smallest reported group
    # (female, 4 cases) withholds its size, else 11 cases - 4 - 5 would give away "unknown"'s 2
    assert g["female"]["n_cases"] == "n >= 3 (withheld)" and g["female"]["size_withheld"]
    assert "num_samples" not in g["female"] and not g["female"]["suppressed"]
    assert "size_withheld" not in g["male"]
    # worst group and gap (the suppressed group's AUC would be 1.0 and its top-1 0.5: ignored)
    assert a["worst"]["auc_macro"] == {"group": "male", "value": pytest.approx(2 / 3)}
    assert a["gap"]["auc_macro"] == pytest.approx(3 / 4 - 2 / 3)
    assert a["worst"]["top1"] == {"group": "male", "value": pytest.approx(3 / 5)}
    assert a["gap"]["top1"] == pytest.approx(3 / 4 - 3 / 5)
    # calibration metrics per group equal calibration.py on the group's rows; for ECE and
    # Brier the worst group is the HIGHEST value
    female = SEX == "female"
    assert g["female"]["brier"] == pytest.approx(calibration.brier_score(Y[female], P[female],
                                                                         "multiclass"))
    eces = {v: g[v]["ece"] for v in ("female", "male")}
    assert a["worst"]["ece"]["group"] == max(eces, key=eces.get)
    assert a["gap"]["ece"] == pytest.approx(abs(eces["female"] - eces["male"]))
    # CIs: present for every reported metric, deterministic
    for v in ("female", "male"):
        for m in rep["metrics"]:
            lo, hi = g[v]["ci95"][m]
            assert lo is not None and lo <= hi
    again = subgroups.subgroup_report(Y, P, "multiclass", NAMES, {"sex": SEX},
                                      min_group_size=3, n_boot=200, seed=0)
    assert again == rep


def test_group_ci_matches_metrics_bootstrap():
    """Within a group the classification CIs are metrics.bootstrap_ci's on its rows (same
    draws), so subgroup and overall intervals are computed the same way."""
    rep = subgroups.subgroup_report(Y, P, "multiclass", NAMES, {"sex": SEX}, min_group_size=3,
                                    n_boot=300, seed=7)
    male = SEX == "male"
    ci = metrics.bootstrap_ci(Y[male], P[male], np.arange(male.sum()), "multiclass", NAMES,
                              n_boot=300, seed=7, metrics=("top1", "auc_macro"))
    got = rep["attributes"]["sex"]["groups"]["male"]["ci95"]
    assert got["top1"] == ci["top1"] and got["auc_macro"] == ci["auc_macro"]


def test_several_attributes_cases_and_unknown_values():
    """Two attributes, each separately; image-level rows grouped by case (sizes count cases);
    missing values form the group "unknown"."""
    case_ids = np.repeat(np.arange(len(ROWS)), 2)  # two image rows per case
    age = np.array(["40-49"] * 6 + [None] * 5, dtype=object)
    rep = subgroups.subgroup_report(np.repeat(Y, 2), np.repeat(P, 2, axis=0), "multiclass",
                                    NAMES, {"sex": np.repeat(SEX, 2), "age_band": np.repeat(age, 2)},
                                    groups=case_ids, min_group_size=5, n_boot=50)
    sex = rep["attributes"]["sex"]["groups"]
    assert sex["male"]["n_cases"] == 5 and sex["male"]["num_samples"] == 10
    assert sex["female"] == {"n_cases": "n < 5", "suppressed": True}
    # only one reported group: a worst group, but no gap
    assert rep["attributes"]["sex"]["worst"]["auc_macro"]["group"] == "male"
    assert rep["attributes"]["sex"]["gap"]["auc_macro"] is None
    ages = rep["attributes"]["age_band"]["groups"]
    assert ages["40-49"]["n_cases"] == 6 and ages["unknown"]["n_cases"] == 5
    # rows duplicated within a case do not change AUC / top-1
    assert sex["male"]["auc_macro"] == pytest.approx(2 / 3)
    md = subgroups.subgroup_markdown(rep)
    assert "### sex" in md and "### age_band" in md and "| female | n < 5 |" in md
    assert "**worst group**" in md and "male (0.667)" in md


def test_hidden_sizes_complementary_suppression():
    assert subgroups.hidden_sizes({"a": 12, "b": 3, "c": 20}, 10) == {"a", "b"}
    assert subgroups.hidden_sizes({"a": 2, "b": 3, "c": 20}, 10) == {"a", "b"}  # two: enough
    assert subgroups.hidden_sizes({"a": 12, "c": 20}, 10) == set()
    assert subgroups.hidden_sizes({"a": 4}, 5) == {"a"}
    assert subgroups.hidden_sizes({"a": 12, "b": 12, "c": 1}, 10) == {"a", "c"}  # tie: first
    # what is shown can no longer be turned into the suppressed size: for every table with one
    # small group, total minus the shown sizes is a sum of at least two hidden sizes
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = {f"g{i}": int(n) for i, n in enumerate(rng.integers(1, 30, rng.integers(2, 6)))}
        hidden = subgroups.hidden_sizes(sizes, 10)
        assert {g for g, n in sizes.items() if n < 10} <= hidden
        assert len(hidden) != 1


def test_one_suppressed_group_withholds_the_next_smallest_in_the_markdown():
    rep = subgroups.subgroup_report(Y, P, "multiclass", NAMES, {"sex": SEX}, min_group_size=3,
                                    n_boot=20, seed=0)
    md = subgroups.subgroup_markdown(rep)
    assert "| unknown | n < 3 |" in md and "| female | n >= 3 (withheld) | 0.750" in md
    assert "| male | 5 |" in md


def test_multilabel_subgroups_and_undefined_auc():
    # class A positives/negatives in both groups; class B only positives in group "g2"
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 1], [0, 1], [1, 1]])
    p = np.array([[.8, .2], [.3, .7], [.6, .9], [.4, .1], [.7, .6], [.2, .8], [.9, .4]])
    site = np.array(["g1"] * 4 + ["g2"] * 3, dtype=object)
    rep = subgroups.subgroup_report(y, p, "multilabel", ["A", "B"], {"site": site},
                                    min_group_size=2, n_boot=20,
                                    metrics=("top1", "top3", "auc_macro", "ece", "nll"))
    assert rep["metrics"] == ["top1", "auc_macro", "ece", "nll"]  # top3: multiclass only
    g = rep["attributes"]["site"]["groups"]
    # g1: A: pos .8 .6 vs neg .3 .4 -> 1; B: pos .7 .9 vs neg .2 .1 -> 1; macro 1.0
    assert g["g1"]["auc_macro"] == pytest.approx(1.0)
    # g2: A: pos .7 .9 vs neg .2 -> 1; B undefined (no negative) -> macro = A's = 1.0
    assert g["g2"]["auc_macro"] == pytest.approx(1.0)
    assert rep["attributes"]["site"]["gap"]["auc_macro"] == pytest.approx(0.0)


def test_attributes_for_rows_and_errors():
    case_attrs = {"c1": {"sex": "female", "age_band": "40-49"}, "c2": {"sex": "male"},
                  "c3": {}}
    got = subgroups.attributes_for_rows([b"c1", "c2", "c3", "c1"], case_attrs,
                                        ["sex", "age_band"])
    assert got["sex"].tolist() == ["female", "male", "unknown", "female"]
    assert got["age_band"].tolist() == ["40-49", "unknown", "unknown", "40-49"]
    with pytest.raises(ValueError, match=r"no case carries the attribute\(s\) \['view'\]"):
        subgroups.attributes_for_rows(["c1"], case_attrs, ["sex", "view"])
    with pytest.raises(ValueError, match="unknown subgroup metric"):
        subgroups.subgroup_report(Y, P, "multiclass", NAMES, {"sex": SEX}, metrics=("f1",))
    with pytest.raises(ValueError, match="3 values for 11 rows"):
        subgroups.subgroup_report(Y, P, "multiclass", NAMES, {"sex": SEX[:3]})
    with pytest.raises(ValueError, match="min_group_size"):
        subgroups.subgroup_report(Y, P, "multiclass", NAMES, {"sex": SEX}, min_group_size=0)
    assert subgroups.suppressed_label(10) == "n < 10"

"""The demo's seed-averaged comparison (micle_tf.demo.seed_averaged) and how the report shows
several seeds, on synthetic predictions (the end-to-end demo is tests/test_demo.py)."""
import numpy as np
import pytest

from micle_tf import demo, demo_report
from micle_tf.evaluation import metrics as M

NAMES = ["a", "b", "c"]


def _predictions(fractions=(0.5, 1.0), seeds=(0, 1), n_cases=40):
    """{(init, fraction, seed): (case ids, case probs, labels)}: one label vector, runs that
    differ in signal strength by init and noise by seed."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n_cases)
    ids = np.array([f"c{i:02d}" for i in range(n_cases)])
    strength = {"none": 0.5, "simclr": 1.0, "micle": 1.5}
    out = {}
    for init, k in strength.items():
        for f in fractions:
            for seed in seeds:
                logits = rng.normal(size=(n_cases, 3)) + k * f * np.eye(3)[labels]
                p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
                out[(init, float(f), seed)] = (ids, p, labels)
    return out


def _auc(p, labels):
    return M.compute_metrics(labels, p, "multiclass", NAMES)["auc_macro"]


def test_seed_averaged_means_and_pairs_by_seed():
    preds = _predictions()
    s = demo.DemoSettings(fractions=(0.5, 1.0), seeds=(0, 1), n_boot=60)
    out = demo.seed_averaged(preds, "multiclass", NAMES, s)
    assert {(r["init"], r["label_fraction"]) for r in out["auc"]} == {
        (i, f) for i in ("none", "simclr", "micle") for f in (0.5, 1.0)}
    row = next(r for r in out["auc"] if r["init"] == "micle" and r["label_fraction"] == 1.0)
    want = [_auc(preds[("micle", 1.0, x)][1], preds[("micle", 1.0, x)][2]) for x in (0, 1)]
    assert row["per_seed"] == pytest.approx(want) and row["value"] == pytest.approx(np.mean(want))
    assert row["ci95"][0] <= row["value"] <= row["ci95"][1]
    assert [(d["a"], d["b"]) for d in out["differences"][:3]] == list(demo.PAIRS)
    d = next(d for d in out["differences"]
             if (d["a"], d["b"], d["label_fraction"]) == ("micle", "none", 1.0))
    want = [_auc(preds[("micle", 1.0, x)][1], preds[("micle", 1.0, x)][2])
            - _auc(preds[("none", 1.0, x)][1], preds[("none", 1.0, x)][2]) for x in (0, 1)]
    assert d["per_seed"] == pytest.approx(want) and d["seeds"] == [0, 1]


def test_a_missing_seed_drops_out_of_that_average_only():
    preds = _predictions()
    del preds[("micle", 1.0, 1)]
    s = demo.DemoSettings(fractions=(0.5, 1.0), seeds=(0, 1), n_boot=30)
    out = demo.seed_averaged(preds, "multiclass", NAMES, s)
    by = {(r["init"], r["label_fraction"]): r for r in out["auc"]}
    assert by[("micle", 1.0)]["seeds"] == [0] and by[("none", 1.0)]["seeds"] == [0, 1]
    pairs = {(d["a"], d["b"], d["label_fraction"]): d["seeds"] for d in out["differences"]}
    assert pairs[("micle", "none", 1.0)] == [0] and pairs[("simclr", "none", 1.0)] == [0, 1]


def test_report_shows_the_seed_average_and_each_seed():
    preds = _predictions()
    s = demo.DemoSettings(fractions=(0.5, 1.0), seeds=(0, 1), n_boot=30)
    averaged = demo.seed_averaged(preds, "multiclass", NAMES, s)
    text = "\n".join(demo_report._seed_averaged_lines(averaged, s))
    assert "### Averaged over seeds 0, 1" in text
    assert "| label fraction | scratch | micle | simclr |" in text
    assert text.count("\n| 0.5 | ") == 4 and text.count("\n| 1 | ") == 4  # AUC row + 3 pairs
    assert f"of {len(averaged['differences'])} seed-averaged differences" in text
    comparisons = [{"a": "micle", "b": "none", "label_fraction": 1.0, "seed": x, "diff": 0.1,
                    "ci95": [-0.1, 0.3], "significant": False} for x in (0, 1)]
    per_seed = "\n".join(demo_report._per_seed_comparison_lines(comparisons, 2))
    assert "| 1 | 0 | micle − none |" in per_seed and "| 1 | 1 | micle − none |" in per_seed
    assert "says nothing about run-to-run" not in per_seed
    one = "\n".join(demo_report._per_seed_comparison_lines(comparisons[:1], 1))
    assert "says nothing about run-to-run variation" in one and "### Each seed" not in one

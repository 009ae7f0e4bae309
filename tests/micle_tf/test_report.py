"""Tests for micle_tf.evaluation.report: files are written and contain the numbers."""
import numpy as np
import pytest

from micle_tf.evaluation import metrics as M
from micle_tf.evaluation import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The 4-class, 6-sample example of test_metrics: top1 .5, top3 4/6, macro AUC 1.95/4 = .4875
P4 = np.array([[.50, .20, .20, .10], [.10, .60, .20, .10], [.10, .20, .30, .40],
               [.25, .40, .30, .05], [.10, .10, .70, .10], [.30, .40, .20, .10]])
Y4 = np.array([0, 2, 0, 3, 2, 1])
N4 = ["a", "b", "c", "d"]


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 100 and data[:8] == PNG_MAGIC


def test_plots_and_report(tmp_path):
    roc = R.plot_roc(Y4, P4, "multiclass", N4, tmp_path / "plots" / "roc.png")
    cm = R.plot_confusion(Y4, P4, N4, tmp_path / "plots" / "confusion.png")
    assert _is_png(tmp_path / "plots" / "roc.png") and _is_png(tmp_path / "plots" / "confusion.png")
    ids = [f"c{i}" for i in range(6)]
    m = M.evaluate_predictions(ids, Y4, P4, "multiclass", N4, n_boot=50,
                               label_fraction=0.25, init_from="simclr_imagenet")
    md_path = R.write_report(m, tmp_path / "report.md", plots={"ROC": roc, "Confusion": cm})
    md = (tmp_path / "report.md").read_text()
    assert md_path == str(tmp_path / "report.md")
    for s in ["0.5000", "0.6667", "0.4875", "0.6250", "0.7000", "0.0000",   # top1/top3/AUCs
              "simclr_imagenet", "| Label fraction | 0.25 |", "| Cases | 6 |", "| Images | 6 |", "| Level | case |",
              "![ROC](plots/roc.png)", "![Confusion](plots/confusion.png)"]:
        assert s in md, s
    lo, hi = m["ci95"]["auc_macro"]
    assert f"[{lo:.4f}, {hi:.4f}]" in md


def test_confusion_counts_hand():
    cm = R.confusion_counts(Y4, P4, 4)
    # (true, pred): (0,0) (2,1) (0,3) (3,1) (2,2) (1,1)
    expected = np.zeros((4, 4), int)
    for t, p in [(0, 0), (2, 1), (0, 3), (3, 1), (2, 2), (1, 1)]:
        expected[t, p] += 1
    np.testing.assert_array_equal(cm, expected)


def test_multilabel_roc_and_report_with_sens_spec(tmp_path):
    y = np.array([[1, 0], [0, -1], [-2, 1], [1, 1], [0, -2]])
    p = np.array([[.9, .2], [.6, .99], [.1, .7], [.3, .8], [.2, .0]])
    roc = R.plot_roc(y, p, "multilabel", ["A", "B"], tmp_path / "roc_ml.png")
    assert _is_png(tmp_path / "roc_ml.png")
    m = M.evaluate_predictions(np.arange(5), y, p, "multilabel", ["A", "B"], n_boot=50)
    R.write_report(m, tmp_path / "sub" / "r.md", plots=[roc])
    md = (tmp_path / "sub" / "r.md").read_text()
    assert "Sensitivity" in md and "0.7500" in md and "0.8750" in md
    assert "![roc_ml](../roc_ml.png)" in md


def test_binary_report_has_sensitivity_section(tmp_path):
    s = np.array([.8, .4, .3, .4, .9])
    m = M.evaluate_predictions(np.arange(5), [1, 1, 0, 0, 0], np.stack([1 - s, s], 1),
                               "multiclass", ["neg", "pos"], n_boot=20)
    R.write_report(m, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "| Sensitivity | 0.5000 |" in md and "| Specificity | 0.6667 |" in md
    assert "0.5833" in md     # AUC 3.5/6


ROWS = [
    {"init": "imagenet", "label_fraction": 0.1, "seed": 0, "auc_macro": 0.70},
    {"init": "imagenet", "label_fraction": 0.1, "seed": 1, "auc_macro": 0.72},
    {"init": "imagenet", "label_fraction": 0.1, "seed": 2, "auc_macro": 0.74},
    {"init": "imagenet", "label_fraction": 1.0, "seed": 0, "auc_macro": 0.80},
    {"init": "micle", "label_fraction": 0.1, "seed": 0, "auc_macro": 0.78},
    {"init": "micle", "label_fraction": 0.1, "seed": 1, "auc_macro": 0.82},
    {"init": "micle", "label_fraction": 1.0, "seed": 0, "auc_macro": 0.85},
    {"init": "micle", "label_fraction": 1.0, "seed": 1, "auc_macro": None},   # ignored
]


def test_label_efficiency_table_hand():
    summary, md = R.label_efficiency_table(ROWS, "auc_macro")
    by = {(s["init"], s["label_fraction"]): s for s in summary}
    s = by[("imagenet", 0.1)]
    assert s["n_seeds"] == 3 and s["mean"] == pytest.approx(0.72)
    assert s["std"] == pytest.approx(0.02)                 # sample std of .70 .72 .74
    assert (s["min"], s["max"]) == (0.70, 0.74)
    assert by[("micle", 0.1)]["std"] == pytest.approx(np.sqrt(0.0008))   # .78/.82: sqrt(2*.02^2/1)
    assert by[("micle", 1.0)]["n_seeds"] == 1 and by[("micle", 1.0)]["std"] == 0.0
    assert "0.7200 ± 0.0200 (n=3)" in md
    assert "0.8500 ± 0.0000 (n=1)" in md
    assert "| imagenet | micle |" in md


@pytest.mark.parametrize("band", ["std", "minmax"])
def test_plot_label_efficiency(tmp_path, band):
    path = R.plot_label_efficiency(ROWS, tmp_path / f"le_{band}.png", band=band)
    assert _is_png(tmp_path / f"le_{band}.png") and path.endswith(".png")

"""Temperature scaling of a model_dir (micle_tf/evaluation/temperature_scaling.py), wired into
micle-evaluate: fitted on the validation split only, for the evaluated checkpoint, and the
before/after figures of metrics_{split}.json equal the calibration functions applied to the
model's own predictions (computed here from the probabilities, not from the logits the
library uses)."""
import json
import os
import shutil

import numpy as np
import pytest

from micle_tf import inference, rundir
from micle_tf.evaluation import calibration, metrics
from micle_tf.evaluation import evaluate as ev
from micle_tf.evaluation import temperature_scaling as ts
from tests.helpers import shared_finetune

N_BOOT = 100
APPROX = dict(rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def run_copy(tmp_path_factory, ph2_records):
    """A private copy of the shared validated run (calibration.json is written into it)."""
    src = shared_finetune(tmp_path_factory, ph2_records, "micle")
    dst = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("metrics_*", "report_*", "*.png",
                                                            rundir.CALIBRATION_FILE))
    return str(dst)


@pytest.fixture(scope="module")
def fitted(run_copy, ph2_records):
    return ts.fit_model_dir(run_copy, ph2_records)


@pytest.fixture(scope="module")
def predictions(run_copy, ph2_records):
    """{split: (case_ids, labels, probs)} of the best checkpoint, predicted here."""
    model, cfg, _ = rundir.load_classifier(run_copy, "best")
    return {s: inference.predict_split(model, ph2_records, s, cfg.model.image_size)
            for s in ("val", "test")}


def _close(got, want):
    assert set(got) >= set(want), sorted(set(want) - set(got))
    for k, v in want.items():
        if isinstance(v, dict):
            _close(got[k], v)
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], (float, int, type(None))):
            assert got[k] == pytest.approx(v, **APPROX), k
        elif isinstance(v, float):
            assert got[k] == pytest.approx(v, **APPROX), k
        else:
            assert got[k] == v, k


def test_fit_on_validation_only_and_file(fitted, run_copy, ph2_records, predictions):
    with open(os.path.join(run_copy, rundir.CALIBRATION_FILE)) as f:
        assert json.load(f) == fitted
    assert fitted["fitted_on"]["split"] == "val" and fitted["fitted_on"]["level"] == "image"
    assert fitted["checkpoint"]["which"] == "best"
    assert fitted["task"] == "multiclass" and fitted["formula"] == "softmax(logits / T)"
    t = fitted["temperature"]
    assert isinstance(t, float) and 0.05 <= t <= 20
    # the fit is calibration.fit_temperature on the validation images' predictions
    _, labels, probs = predictions["val"]
    assert fitted["fitted_on"]["num_images"] == len(labels) == 300
    assert t == pytest.approx(calibration.fit_temperature(probs, labels, "multiclass"),
                              rel=1e-3)
    assert fitted["nll_after"] <= fitted["nll_before"] + 1e-9
    assert fitted["validation_before"]["nll"] == pytest.approx(fitted["nll_before"], rel=1e-4)
    for split in ("test", "train"):
        with pytest.raises(ValueError, match="validation split only"):
            ts.fit_model_dir(run_copy, ph2_records, split=split)


def test_stale_temperature_is_ignored(fitted, run_copy):
    best = rundir.classifier_checkpoint(run_copy, "best")
    assert rundir.read_calibration(run_copy, best)["temperature"] == fitted["temperature"]
    stale = dict(fitted, checkpoint={"which": "best", "step": fitted["checkpoint"]["step"] + 1})
    other = os.path.join(os.path.dirname(run_copy), "stale")
    os.makedirs(other, exist_ok=True)
    rundir.write_json(os.path.join(other, rundir.CALIBRATION_FILE), stale)
    assert rundir.read_calibration(other, best) is None
    # the same step with other weights (a run trained again in place): the fingerprint differs
    retrained = dict(fitted, checkpoint=dict(fitted["checkpoint"], fingerprint="0" * 16))
    rundir.write_json(os.path.join(other, rundir.CALIBRATION_FILE), retrained)
    assert fitted["checkpoint"]["fingerprint"] == rundir.checkpoint_fingerprint(best)
    assert rundir.read_calibration(other, best) is None
    assert ts.ensure_fitted(run_copy)["temperature"] == fitted["temperature"]  # reused


def test_evaluation_before_after_equal_calibration_functions(fitted, run_copy, ph2_records,
                                                             predictions, tmp_path):
    m = ev.evaluate_model_dir(run_copy, ph2_records, "test", n_boot=N_BOOT, out_dir=str(tmp_path))
    with open(tmp_path / "metrics_test.json") as f:
        assert json.load(f) == m
    case_ids, labels, probs = predictions["test"]
    names = m["label_names"]
    ids, p, y = metrics.aggregate_by_case(case_ids, probs, labels)
    before = calibration.calibration_report(y, p, "multiclass", names, n_boot=N_BOOT, seed=0)
    _close(m["calibration"], before)
    assert m["calibration"]["reliability"] == calibration.reliability_data(y, p, "multiclass",
                                                                           names)
    # after: T applied to every IMAGE's probabilities, then the case means
    t = fitted["temperature"]
    image_t = calibration.apply_temperature(probs, t, "multiclass")
    _, pt, _ = metrics.aggregate_by_case(case_ids, image_t, labels)
    after = calibration.calibration_report(y, pt, "multiclass", names, n_boot=N_BOOT, seed=0)
    _close(m["calibration_after"], after)
    assert m["temperature"]["temperature"] == t
    cm = m["calibrated_metrics"]
    want = metrics.compute_metrics(y, pt, "multiclass", names)
    assert cm["top1"] == pytest.approx(want["top1"]) and cm["auc_macro"] == pytest.approx(
        want["auc_macro"], **APPROX)
    assert cm["same_top1_predictions"] == bool(np.array_equal(p.argmax(1), pt.argmax(1)))
    if cm["same_top1_predictions"]:
        assert cm["top1"] == m["top1"] and cm["top3"] == m["top3"]
    assert "unchanged" in cm["note"]
    report = (tmp_path / "report_test.md").read_text()
    for needle in ("## Calibration", "ECE (equal-width bins)", "ECE (equal-mass bins)",
                   "Brier score", "After temperature scaling", f"T = {t:.3f}",
                   "Metrics of the calibrated probabilities", "reliability_test.png"):
        assert needle in report, needle
    assert m["plots"]["Reliability diagram"] == "reliability_test.png"
    assert (tmp_path / "reliability_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # evaluating the split the temperature was fitted on says so
    ev.evaluate_model_dir(run_copy, ph2_records, "val", n_boot=0, out_dir=str(tmp_path))
    assert "fitted on this split" in (tmp_path / "report_val.md").read_text()
    # and without the temperature the after-figures are absent
    plain = ev.evaluate_model_dir(run_copy, ph2_records, "test", n_boot=0,
                                  out_dir=str(tmp_path / "plain"), use_temperature=False)
    assert "calibration_after" not in plain and "temperature" not in plain

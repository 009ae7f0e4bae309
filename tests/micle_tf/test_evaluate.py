"""Evaluation of fine-tuned model_dirs: metrics files (their keys), reports and plots, the
leakage and label-name refusals, distribution-shift gaps and the micle-evaluate CLI (the
label-efficiency sweep, which trains too, is test_sweep.py). Uses the cached tiny runs of
tests/helpers.py."""
import json
import os

import numpy as np
import pytest

from micle_tf.evaluation import evaluate as ev
from tests.helpers import METRICS_KEYS, SWEEP_FRACTION, shared_finetune, shared_pretrain

N_BOOT = 200


@pytest.fixture(scope="module")
def micle_run(tmp_path_factory, ph2_records):
    return shared_finetune(tmp_path_factory, ph2_records, "micle")


def _records_copy(src, dst, replace=None, info_update=None):
    """A copy of a records dir made of symlinks; `replace` maps shard names to the source shard
    they should point at (the recorded shard sizes follow, as if the records had been written
    that way: otherwise the reader's size check refuses the swap first); `info_update` edits
    dataset_info.json."""
    os.makedirs(dst)
    with open(os.path.join(src, "dataset_info.json")) as f:
        info = json.load(f)
    for name in os.listdir(src):
        if name == "dataset_info.json":
            continue
        target = (replace or {}).get(name, name)
        os.symlink(os.path.join(src, target), os.path.join(dst, name))
        if target != name:
            split, index = name.split("-")[0], int(name.split("-")[1])
            info["splits"][split]["shard_bytes"][index] = os.path.getsize(
                os.path.join(src, target))
    info.update(info_update or {})
    with open(os.path.join(dst, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    return str(dst)


def _check_metrics(m):
    for key in METRICS_KEYS:
        assert key in m, key
    assert m["task"] == "multiclass" and m["level"] == "case"
    assert m["num_cases"] == 30 and m["num_images"] == 300  # 10 distinct patches a lesion
    assert 0.0 <= m["top1"] <= m["top3"] <= 1.0
    assert 0.0 <= m["auc_macro"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in m["auc_per_class"].values())
    for key in ("top1", "top3", "auc_macro"):
        lo, hi = m["ci95"][key]
        assert lo <= m[key] <= hi, (key, lo, m[key], hi)


def test_evaluate_model_dir_writes_metrics_report_and_plots(micle_run, ph2_records,
                                                            tmp_path_factory):
    m = ev.evaluate_model_dir(micle_run, ph2_records, "test", n_boot=N_BOOT)
    _check_metrics(m)
    assert m["label_fraction"] == SWEEP_FRACTION
    assert m["init_from"] == shared_pretrain(tmp_path_factory, ph2_records)
    with open(os.path.join(micle_run, "metrics_test.json")) as f:
        assert json.load(f) == m
    for name in ("report_test.md", "roc_test.png", "confusion_test.png"):
        assert os.path.getsize(os.path.join(micle_run, name)) > 0, name
    with open(os.path.join(micle_run, "report_test.md")) as f:
        report = f.read()
    assert "Macro AUC" in report and "roc_test.png" in report


def test_leakage_is_refused(micle_run, ph2_records, tmp_path):
    # a "test" split that is really a training shard
    train_shard = sorted(n for n in os.listdir(ph2_records) if n.startswith("train-"))[0]
    tampered = _records_copy(ph2_records, tmp_path / "tampered",
                             replace={"test-00000-of-00001.tfrecord": train_shard})
    with pytest.raises(ValueError, match="leakage"):
        ev.evaluate_model_dir(micle_run, tampered, "test", n_boot=0, out_dir=str(tmp_path))
    # the model's own training cases
    with pytest.raises(ValueError, match="leakage.*fine-tuning cases"):
        ev.evaluate_model_dir(micle_run, ph2_records, "train", n_boot=0,
                              out_dir=str(tmp_path))
    assert not os.path.exists(tmp_path / "metrics_test.json")
    assert not os.path.exists(tmp_path / "metrics_train.json")


def test_label_name_mismatch_is_refused(micle_run, ph2_records, tmp_path):
    with open(os.path.join(ph2_records, "dataset_info.json")) as f:
        names = json.load(f)["label_names"]
    relabelled = _records_copy(ph2_records, tmp_path / "relabelled",
                               info_update={"label_names": names[::-1]})
    with pytest.raises(ValueError, match="label names"):
        ev.evaluate_model_dir(micle_run, relabelled, "test", n_boot=0, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="label names"):
        ev.evaluate_shift(micle_run, ph2_records, relabelled, "test", n_boot=0,
                          out_dir=str(tmp_path))


def test_shift_evaluation_same_records_has_zero_gap(micle_run, ph2_records, tmp_path):
    same = ev.evaluate_shift(micle_run, ph2_records, ph2_records, "test", n_boot=100,
                             out_dir=str(tmp_path / "same"))
    assert abs(same["gap"]["top1"]) < 1e-12 and abs(same["gap"]["auc_macro"]) < 1e-12
    lo, hi = same["gap_ci95"]["auc_macro"]
    assert lo <= 0.0 <= hi
    assert "different case sets" in same["ci_note"]
    with open(tmp_path / "same" / "shift_test.json") as f:
        assert json.load(f)["gap"] == same["gap"]
    for name in ("metrics_test.json", "metrics_shifted_test.json", "report_shifted_test.md",
                 "roc_shifted_test.png"):
        assert (tmp_path / "same" / name).exists(), name

    # a different split as the "shifted" set: see test_evaluate_cli


@pytest.mark.slow
def test_evaluate_cli(micle_run, ph2_records, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "micle_tf.cli.evaluate", f"--data_dir={ph2_records}",
           f"--model_dir={micle_run}", "--split=test", "--n_boot=50", f"--out_dir={out}",
           f"--shift_data_dir={ph2_records}", "--shift_split=val"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["num_cases"] == 30 and 0.0 <= printed["auc_macro"] <= 1.0
    assert set(printed["gap"]) == {"top1", "auc_macro"}
    with open(out / "metrics_test.json") as f:
        m = json.load(f)
    assert m["n_boot"] == 50 and np.isclose(m["auc_macro"], printed["auc_macro"])
    for name in ("report_test.md", "shift_test.json", "metrics_shifted_test.json"):
        assert (out / name).exists(), name
    # the shift evaluation against another split (val)
    with open(out / "shift_test.json") as f:
        shift = json.load(f)
    shifted = shift["shifted"]["metrics"]
    assert shifted["split"] == "val" and shifted["num_cases"] == 30
    for key in ("top1", "auc_macro"):
        expected = shift["in_distribution"]["metrics"][key] - shifted[key]
        assert shift["gap"][key] == pytest.approx(expected) == pytest.approx(printed["gap"][key])
        lo, hi = shift["gap_ci95"][key]
        assert lo <= hi


# ------------------------------------------------------------- calibration and subgroups
def test_calibration_always_reported(micle_run, ph2_records, tmp_path):
    from micle_tf import inference, rundir
    from micle_tf.evaluation import calibration, metrics

    m = ev.evaluate_model_dir(micle_run, ph2_records, "test", n_boot=N_BOOT,
                              out_dir=str(tmp_path), use_temperature=False)
    model, cfg, _ = rundir.load_classifier(micle_run, "best")
    case_ids, labels, probs = inference.predict_split(model, ph2_records, "test",
                                                      cfg.model.image_size)
    _, p, y = metrics.aggregate_by_case(case_ids, probs, labels)
    want = calibration.calibration_report(y, p, "multiclass", m["label_names"], n_boot=N_BOOT)
    for key in ("ece", "ece_equal_mass", "brier", "nll", "n_bins", "num_cases"):
        assert m["calibration"][key] == pytest.approx(want[key]), key
    for key in calibration.CALIBRATION_METRICS:
        assert m["calibration"]["ci95"][key] == pytest.approx(want["ci95"][key]), key
        lo, hi = m["calibration"]["ci95"][key]
        assert lo <= m["calibration"][key] <= hi
    assert (tmp_path / "reliability_test.png").exists()
    assert "## Calibration" in (tmp_path / "report_test.md").read_text()


@pytest.fixture(scope="module")
def attr_records(tmp_path_factory):
    from tests.helpers import write_ph2_with_attributes
    return write_ph2_with_attributes(tmp_path_factory.mktemp("ph2_attrs"))


def test_subgroups_with_suppression(micle_run, attr_records, tmp_path):
    from data_pipelines import reader
    from micle_tf import inference, rundir
    from micle_tf.evaluation import metrics, subgroups

    k = 5
    m = ev.evaluate_model_dir(micle_run, attr_records, "test", n_boot=N_BOOT,
                              out_dir=str(tmp_path), subgroups=["sex", "age_band"],
                              min_group_size=k, use_temperature=False)
    # independent expectation: the records' attributes per test case, the case-level rows
    attrs = reader.read_case_attributes(attr_records, "test")
    model, cfg, _ = rundir.load_classifier(micle_run, "best")
    case_ids, labels, probs = inference.predict_split(model, attr_records, "test",
                                                      cfg.model.image_size)
    ids, p, y = metrics.aggregate_by_case(case_ids, probs, labels)
    rows = {a: [attrs[c][a] for c in ids] for a in ("sex", "age_band")}
    want = subgroups.subgroup_report(y, p, "multiclass", m["label_names"], rows,
                                     min_group_size=k, n_boot=N_BOOT)
    got = m["subgroups"]
    assert got["min_group_size"] == k and got["metrics"] == want["metrics"]
    report = (tmp_path / "report_test.md").read_text()
    suppressed = reported = num_withheld = 0
    for a in ("sex", "age_band"):
        counts = {v: rows[a].count(v) for v in set(rows[a])}
        groups = got["attributes"][a]["groups"]
        assert set(groups) == set(counts)
        small = [v for v, n in counts.items() if n < k]
        # one small group: the smallest reported one withholds its size as well
        withheld = ({min((n, v) for v, n in counts.items() if n >= k)[1]}
                    if len(small) == 1 and len(counts) > 1 else set())
        for value, n in counts.items():
            g = groups[value]
            if n < k:
                suppressed += 1
                assert g == {"n_cases": f"n < {k}", "suppressed": True}
                assert f"| {value} | n < {k} |" in report
            else:
                reported += 1
                assert not g["suppressed"]
                if value in withheld:
                    num_withheld += 1
                    assert g["n_cases"] == f"n >= {k} (withheld)" and g["size_withheld"]
                    assert f"| {value} | n >= {k} (withheld) |" in report
                else:
                    assert g["n_cases"] == n
                for metric in want["metrics"]:
                    assert g[metric] == pytest.approx(want["attributes"][a]["groups"][value][
                        metric]), (a, value, metric)
                    assert g["ci95"][metric] == pytest.approx(
                        want["attributes"][a]["groups"][value]["ci95"][metric])
        assert got["attributes"][a]["worst"] == want["attributes"][a]["worst"]
        assert got["attributes"][a]["gap"] == pytest.approx(want["attributes"][a]["gap"])
    assert suppressed >= 1 and reported >= 3  # "90+" is small in a 30-lesion test split
    assert num_withheld >= 1 and num_withheld == sum(1 for a in ("sex", "age_band") if sum(
        1 for v in set(rows[a]) if rows[a].count(v) < k) == 1)
    assert "## Subgroups" in report and "**worst group**" in report
    # an attribute the records lack is a clear error, before predicting
    with pytest.raises(ValueError, match="no case carries the attribute"):
        ev.evaluate_model_dir(micle_run, attr_records, "test", n_boot=0, out_dir=str(tmp_path),
                              subgroups=["view"])

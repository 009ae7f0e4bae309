"""The model card end to end (micle_tf/export/model_card.py): a fine-tuned run (from the shared
MICLe pretraining) gets a temperature fitted on its validation split, is evaluated on the test
split with subgroups, and exported; the SavedModel, loaded in a fresh process that imports only
TensorFlow, returns the card from `get_model_card`, and the card's metrics, calibration and
subgroups equal metrics_test.json. Plus the card's pieces: init description without paths,
attribute-count suppression, the path guard."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from micle_tf import rundir
from micle_tf.evaluation import evaluate as ev
from micle_tf.evaluation import temperature_scaling as ts
from micle_tf.export import model_card
from micle_tf.export import serving
from tests.helpers import child_env, shared_finetune, shared_pretrain, write_ph2_with_attributes

N_BOOT = 100

FRESH = r'''
import json, sys
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
out = m.signatures["get_model_card"]()
card = json.loads(out["model_card"].numpy().decode("utf-8"))
print(json.dumps({"card": card, "markdown": out["model_card_markdown"].numpy().decode("utf-8"),
                  "signatures": sorted(m.signatures),
                  "modules": sorted(k for k in sys.modules
                                    if k.split(".")[0] in ("micle_tf", "data_pipelines"))}))
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ph2_records):
    root = tmp_path_factory.mktemp("card")
    src = shared_finetune(tmp_path_factory, ph2_records, "micle")
    run = root / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("metrics_*", "report_*", "*.png",
                                                            rundir.CALIBRATION_FILE))
    run = str(run)
    records = write_ph2_with_attributes(root / "records_with_attributes")
    calibration = ts.fit_model_dir(run, ph2_records)
    metrics = ev.evaluate_model_dir(run, records, "test", n_boot=N_BOOT,
                                    subgroups=["sex", "age_band"], min_group_size=5)
    export_dir = str(root / "export" / "1")
    summary = serving.export_saved_model(run, export_dir)
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH, export_dir], capture_output=True,
                          text=True, timeout=300, env=child_env(), cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(os.path.join(run, "metrics_test.json")) as f:
        assert json.load(f) == metrics
    return dict(root=str(root), run=run, records=records, calibration=calibration,
                metrics=metrics, export_dir=export_dir, summary=summary, loaded=loaded,
                pretrain=shared_pretrain(tmp_path_factory, ph2_records),
                ph2_records=ph2_records)


def test_card_in_fresh_process_equals_metrics_file(exported):
    loaded, metrics = exported["loaded"], exported["metrics"]
    assert loaded["modules"] == []  # TensorFlow only
    assert "get_model_card" in loaded["signatures"]
    card = loaded["card"]
    with open(os.path.join(exported["export_dir"], "assets", "model_card.json")) as f:
        assert json.load(f) == card
    with open(os.path.join(exported["export_dir"], "assets", "model_card.md")) as f:
        assert f.read() == loaded["markdown"]
    evaluation = card["evaluation"]
    assert evaluation["metrics_file"] == "metrics_test.json"
    assert evaluation["split"] == metrics["split"] == "test"
    assert evaluation["level"] == metrics["level"] and evaluation["num_cases"] == 30
    assert evaluation["metrics"] == {k: metrics[k] for k in model_card.METRIC_KEYS
                                     if k in metrics}
    for key in ("calibration", "calibration_after", "calibrated_metrics", "subgroups",
                "subgroups_after"):
        assert evaluation[key] == metrics[key], key
    assert evaluation["checkpoint_matches_export"] is True
    assert evaluation["served_probabilities"].startswith("calibrated")


def test_card_describes_model_data_and_calibration(exported):
    card = exported["loaded"]["card"]
    init = card["model"]["init"]
    pre_cfg, _ = rundir.load_config(exported["pretrain"], "pretrain")
    assert init["kind"] == init["method"] == "micle" and init["steps"] == 2
    assert init["batch_size"] == pre_cfg.batch_size and init["image_size"] == 32
    assert init["pretraining_data"]["source"] == "ph2"
    assert init["started_from"] == "random initialisation"
    info = json.load(open(os.path.join(exported["ph2_records"], "dataset_info.json")))
    data = card["training_data"]
    assert data["source"] == "ph2" and data["label_names"] == info["label_names"]
    assert data["splits"] == {k: {"cases": v["cases"], "images": v["images"]}
                              for k, v in info["splits"].items()}
    assert data["duplicates"]["policy"] == "reject"
    assert data["duplicates"]["rejected_across_cases"] == \
        info["duplicates"]["rejected_across_cases"]
    assert data["num_rejected"] == info["num_rejected"]
    cal = card["calibration"]
    assert cal["temperature_scaling"] and cal["temperature"] == \
        exported["calibration"]["temperature"] == exported["summary"]["temperature"]
    assert cal["fitted_on"]["split"] == "val"
    assert card["citation"]["data"] == info["citation"]
    assert any("Azizi" in c for c in card["citation"]["method"])
    assert any("Guo" in c for c in card["citation"]["method"])
    limits = " ".join(card["limitations"])
    for needle in ("not a medical device", "small (30 cases)", "weakly visible",
                   "Subgroups by age_band", "not reported"):
        assert needle in limits, needle
    md = exported["loaded"]["markdown"]
    for needle in ("## Intended use", "## Out-of-scope use", "## Model", "## Training data",
                   "## Evaluation", "### Calibration", "### Subgroups", "n < 5",
                   "## Calibration of the served probabilities", "## Limitations",
                   "## Citation", "MICLe pretraining"):
        assert needle in md, needle


def test_export_holds_no_paths(exported):
    root = exported["root"]
    needles = [root, os.path.realpath(root), exported["pretrain"], exported["ph2_records"],
               "/tmp/"]
    for folder, _, files in os.walk(exported["export_dir"]):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            for needle in needles:
                assert needle.encode() not in data, (name, needle)


def test_describe_init_kinds(exported, tmp_path):
    assert model_card.describe_init("none")["kind"] == "none"
    d = model_card.describe_init("imagenet_simclr:/secret/ckpt")
    assert d["kind"] == "imagenet_simclr" and "/secret" not in json.dumps(d)
    d = model_card.describe_init(exported["pretrain"])
    assert exported["pretrain"] not in json.dumps(d)
    assert model_card.describe_init(str(tmp_path))["kind"] == "checkpoint"
    assert model_card.describe_init(exported["run"])["kind"] == "finetuned"


def test_suppress_counts():
    assert model_card.suppress_counts({"a": 12, "b": 3, "c": 20}, 10) == {
        "a": "n < 10", "b": "n < 10", "c": 20}  # one small cell hides the next smallest too
    assert model_card.suppress_counts({"a": 2, "b": 3, "c": 20}, 10) == {
        "a": "n < 10", "b": "n < 10", "c": 20}
    assert model_card.suppress_counts({"a": 12, "c": 20}, 10) == {"a": 12, "c": 20}
    assert model_card.suppress_counts({"a": 4}, 5) == {"a": "n < 5"}


def test_path_guard():
    model_card.check_no_paths('{"a": "fine: https://arxiv.org/abs/2101.05224, lr 0.1/256"}')
    for text in ('{"x": "/home/someone/data"}', "saved in C:\\data\\x", "at /work/runs/ft"):
        with pytest.raises(ValueError, match="file path"):
            model_card.check_no_paths(text)
    with pytest.raises(ValueError, match="runs/ft_micle"):
        model_card.check_no_paths("trained in runs/ft_micle", ["runs/ft_micle"])
    model_card.check_no_paths("source ph2", ["ph2"])  # a bare name is not a path

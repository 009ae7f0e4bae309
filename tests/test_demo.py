"""micle-demo --quick end to end (the main job), and its reuse of finished stages."""
import json
import os
import subprocess
import sys

import pytest

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def demo(workdir):
    proc = subprocess.run([sys.executable, "-m", "micle_tf.cli.demo", "--quick",
                           f"--workdir={workdir}"], env=ENV, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_demo_quick_runs_every_stage_then_reuses_them(tmp_path):
    workdir = tmp_path / "demo"
    proc = demo(workdir)
    report = (workdir / "report.md").read_text()
    for needle in ("SimCLR vs MICLe", "| 0.25 | none |", "| 1 | micle |", "| 1 | simclr |",
                   "micle − none", "Same-lesion retrieval", "fresh process"):
        assert needle in report, needle
    results = json.loads((workdir / "demo_results.json").read_text())
    rows = results["sweep_rows"]
    assert {(r["init"], r["label_fraction"]) for r in rows} == {
        (i, f) for i in ("none", "simclr", "micle") for f in (0.25, 1.0)}
    for r in rows:
        assert 0.0 <= r["auc_macro"] <= 1.0
        lo, hi = r["ci95"]["auc_macro"]
        assert lo <= r["auc_macro"] <= hi
    check = results["fresh_process_check"]
    assert len(check["probabilities"]) == 3 and abs(check["sum"] - 1.0) < 1e-5
    assert check["label_names"] == ["symmetric", "asymmetric_one_axis", "asymmetric_two_axes"]
    assert (workdir / "export" / "saved_model.pb").exists()
    # the export carries its model card and serves temperature-scaled probabilities; the
    # report links the card and the exported run's reliability diagram
    assert (workdir / "export" / "assets" / "model_card.md").exists()
    assert check["model_card_title"].startswith("micle-tf multiclass classifier")
    assert check["temperature"] is not None
    assert "(export/assets/model_card.md)" in report and "![reliability](sweep/" in report
    rel = report.split("![reliability](", 1)[1].split(")", 1)[0]
    assert (workdir / rel).exists(), rel
    for c in results["comparisons"]:
        assert c["ci95"][0] <= c["diff"] <= c["ci95"][1]
    # label-free retrieval: every encoder with its CI, the paired differences, the health block
    ret = results["retrieval"]
    assert set(ret["reports"]) == {"start", "simclr", "micle"}
    assert [(p["a"], p["b"]) for p in ret["paired"]] == [
        ("simclr", "start"), ("micle", "start"), ("micle", "simclr")]
    for p in ret["paired"]:
        lo, hi = p["top1"]["ci95"]
        assert lo <= p["top1"]["difference"] <= hi
        assert p["top1"]["difference"] == pytest.approx(
            ret["reports"][p["a"]]["top1"] - ret["reports"][p["b"]]["top1"])
    assert "| micle − simclr |" in report and "× chance" in report
    for method in ("simclr", "micle"):
        health = results["pretraining"][method]["learning_health"]
        assert health["chance_contrastive_accuracy"] == pytest.approx(1 / 63)  # batch 32
    # second run in the same workdir: every stage is reused, nothing retrained
    proc2 = demo(workdir)
    for stage in ("records exist", "simclr pretraining finished earlier",
                  "micle pretraining finished earlier", "comparisons computed earlier",
                  "export exists"):
        assert stage in proc2.stderr, stage
    assert "6 reused" in proc2.stderr or "0 trained, 6 reused" in proc2.stderr
    # nothing was trained or evaluated again: the demo's own log says which stages it reused
    assert "sweep: fine-tuning" not in proc2.stderr
    assert "Epoch 1/" not in proc2.stdout + proc2.stderr

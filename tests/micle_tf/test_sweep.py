"""The label-efficiency sweep (micle_tf.training.sweep): every init x fraction x seed is
fine-tuned and evaluated once; a second sweep reuses every finished run and its metrics, and
a finished run with other settings is refused. Reuses the cached tiny runs of tests/helpers.py
(they sit where the sweep puts its fraction-0.25 runs)."""
import os

import pytest

from micle_tf.training.sweep import run_sweep
from tests.helpers import (SWEEP_FRACTION, base_finetune_config, shared_finetune,
                           shared_pretrain, sweep_dir)

N_BOOT = 200


def test_label_efficiency_sweep_and_reuse(tmp_path_factory, ph2_records):
    pre = shared_pretrain(tmp_path_factory, ph2_records)
    # the two runs at fraction 0.25 exist already (shared fixtures); 0.1 is trained here
    shared = [shared_finetune(tmp_path_factory, ph2_records, n) for n in ("micle", "none")]
    out = str(sweep_dir(tmp_path_factory))
    inits = {"micle": pre, "none": "none"}
    args = (ph2_records, inits, [0.1, SWEEP_FRACTION], [0], base_finetune_config(ph2_records),
            out)
    sweep = run_sweep(*args, n_boot=N_BOOT)
    assert sweep["counts"]["trained"] == 2 and sweep["counts"]["reused"] == 2
    rows = {(r["init"], r["label_fraction"]): r for r in sweep["rows"]}
    assert len(rows) == 4
    for init in inits:
        assert rows[(init, 0.1)]["num_labelled_cases"] < rows[(init, 0.25)]["num_labelled_cases"]
        for f in (0.1, 0.25):
            r = rows[(init, f)]
            assert 0.0 <= r["auc_macro"] <= 1.0 and r["num_cases"] == 30
            assert os.path.exists(os.path.join(r["model_dir"], "metrics_test.json"))
    assert {rows[("micle", 0.25)]["model_dir"], rows[("none", 0.25)]["model_dir"]} == \
        {os.path.abspath(d) for d in shared}
    for name in ("sweep.json", "sweep.md", "label_efficiency.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "sweep.md")) as f:
        md = f.read()
    assert "auc_macro" in md and "| micle | none |" in md

    stamps = {r["model_dir"]: os.path.getmtime(os.path.join(r["model_dir"],
                                                            "finetune_summary.json"))
              for r in sweep["rows"]}
    again = run_sweep(*args, n_boot=N_BOOT)
    assert again["counts"] == {"trained": 0, "reused": 4, "evaluated": 0}
    assert [r["auc_macro"] for r in again["rows"]] == [r["auc_macro"] for r in sweep["rows"]]
    for d, t in stamps.items():
        assert os.path.getmtime(os.path.join(d, "finetune_summary.json")) == t

    changed = base_finetune_config(ph2_records)
    changed.learning_rate = 0.5
    with pytest.raises(ValueError, match="other settings"):
        run_sweep(ph2_records, inits, [0.1], [0], changed, out, n_boot=N_BOOT)

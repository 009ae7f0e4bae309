"""Learning-health callback and summary block (fake logs), and the KnnMonitor's retrieval logs."""
import logging as py_logging
import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from micle_tf.training import callbacks as cb
from micle_tf.training.pretrain import learning_health


class _Counter:
    def __init__(self):
        self.value = 0

    def numpy(self):
        return self.value


def _monitor(warmup, global_batch=16):
    mon = cb.LearningHealthMonitor(warmup, global_batch=global_batch)
    step = _Counter()
    mon.set_model(SimpleNamespace(optimizer=SimpleNamespace(iterations=step)))
    return mon, step


def test_monitor_warns_once_after_warmup(caplog):
    mon, step = _monitor(warmup=4)                    # B = 16: chance 1/31, 2x chance 0.0645
    chance = 1 / 31
    seen = []
    with caplog.at_level(py_logging.WARNING):
        for epoch, (steps, acc) in enumerate([(2, 0.01), (4, 0.02), (6, 0.05), (8, 0.06),
                                              (10, 0.5)]):
            step.value = steps
            logs = {"contrastive_accuracy": acc}
            mon.on_epoch_end(epoch, logs)
            seen.append(logs["contrastive_accuracy_over_chance"])
    np.testing.assert_allclose(seen, np.array([0.01, 0.02, 0.05, 0.06, 0.5]) / chance)
    # epochs ending at steps 2 and 4 are within the warmup: not judged
    assert [j["step"] for j in mon.judged] == [6, 8, 10]
    assert [j["learning"] for j in mon.judged] == [False, False, True]
    assert mon.warning.startswith("pretraining is not learning its task: contrastive accuracy "
                                  "0.05 vs chance 0.03226 after 6 steps")
    assert "--color_jitter_strength" in mon.warning and "lower learning rate" in mon.warning
    warnings = [r for r in caplog.records if "not learning its task" in r.getMessage()]
    assert len(warnings) == 1                          # once per run, not once per epoch


def test_monitor_uses_the_logged_chance_and_stays_quiet_when_learning():
    mon, step = _monitor(warmup=0, global_batch=None)
    step.value = 3
    logs = {"contrastive_accuracy": 0.3, "chance_contrastive_accuracy": 1 / 7}   # B = 4
    mon.on_epoch_end(0, logs)
    assert logs["contrastive_accuracy_over_chance"] == pytest.approx(2.1)
    assert mon.warning is None and mon.judged[0]["learning"]
    mon.on_epoch_end(1, {"contrastive_accuracy": 2 / 7 - 1e-9,
                         "chance_contrastive_accuracy": 1 / 7})
    assert mon.warning is not None                     # exactly within 2x chance
    # B = 1: one candidate, chance 1: nothing to judge
    one, step = _monitor(warmup=0, global_batch=1)
    step.value = 5
    one.on_epoch_end(0, {"contrastive_accuracy": 1.0})
    assert one.warning is None and one.judged == []


def test_learning_health_block():
    history = {"contrastive_accuracy": [0.02, 0.04], "contrastive_loss": [6.8, 6.7],
               "loss": [7.9, 7.8], "alignment": [0.5, 0.4], "uniformity": [-3.0, -3.2]}
    h = learning_health(history, 16, warmup_steps=2, final_step=6)
    assert h["global_batch"] == 16
    assert h["chance_contrastive_accuracy"] == pytest.approx(1 / 31)
    assert h["uniform_loss"] == pytest.approx(2 * math.log(31))
    assert h["final_contrastive_accuracy"] == 0.04 and h["final_loss"] == 6.7  # contrastive
    assert h["accuracy_over_chance"] == pytest.approx(0.04 * 31)
    assert h["final_alignment"] == 0.4 and h["final_uniformity"] == -3.2
    assert h["learning"] is False and "not learning its task" in h["warning"]
    mon, _ = _monitor(warmup=2)
    h = learning_health(history, 16, 2, 6, monitor=mon)
    assert h["learning"] is False and h["warning"] is None     # the monitor's record counts
    h = learning_health(dict(history, contrastive_accuracy=[0.02, 0.5]), 16, 2, 6)
    assert h["learning"] is True and h["warning"] is None
    h = learning_health(history, 16, warmup_steps=6, final_step=6)   # still in warmup
    assert h["learning"] is None and h["warning"] is None
    h = learning_health({}, 8, 0, 0)                                  # nothing trained
    assert h["final_contrastive_accuracy"] is None and h["learning"] is None
    assert h["chance_contrastive_accuracy"] == pytest.approx(1 / 15)


def test_knn_monitor_logs_same_case_top1_and_map():
    # identity "encoder" on 2-D images: cases 0 and 1 are tight clusters, case 2 a single image
    images = np.array([[1., 0.], [.98, .05], [0., 1.], [.05, .99], [-1., -1.]], np.float32)
    data = {"image": images, "label": np.array([0, 0, 1, 1, -1], np.int32),
            "case_id": np.array([b"a", b"a", b"b", b"b", b"c"])}
    make = lambda: tf.data.Dataset.from_tensor_slices(data).batch(2)  # noqa: E731
    mon = cb.KnnMonitor(make, make, "multiclass", k=1)
    mon.set_model(SimpleNamespace(encoder=keras.layers.Identity()))
    logs = {}
    mon.on_epoch_end(0, logs)
    assert logs["same_case_top1"] == 1.0 and logs["same_case_map"] == 1.0
    assert "knn_accuracy" in logs and "same_case_chance_top1" not in logs
    entry = mon.history[-1]
    # 4 scored queries (the single-image case is not scored), each with 1 of 4 candidates
    assert entry["same_case_num_queries"] == 4 and entry["same_case_chance_top1"] == 0.25

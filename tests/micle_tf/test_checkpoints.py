"""The checkpoints a run writes: resume checkpoints and the best-epoch store share one class,
so the chief/worker rule (only the chief writes into model_dir; other workers save into a
temporary folder they empty) holds for both."""
import json
import os

import pytest
import tensorflow as tf

from micle_tf import rundir
from micle_tf.training.checkpoints import BestCheckpoint, CheckpointState


class _Model(tf.Module):
    def __init__(self, value=0.0, shape=(2,)):
        super().__init__()
        self.w = tf.Variable(tf.fill(shape, value))


def test_resume_checkpoints_restore_and_refuse_another_model(tmp_path):
    model, optimizer = _Model(1.0), _Model(7.0)
    state = CheckpointState(str(tmp_path), model, optimizer, max_to_keep=2)
    assert state.latest is None and state.restore_latest() is None
    for step in (2, 4, 6):
        path = state.save(step)
    assert path == os.path.join(str(tmp_path), rundir.CHECKPOINT_SUBDIR, "ckpt-6")
    assert state.latest == path
    assert len([f for f in os.listdir(state.directory) if f.endswith(".index")]) == 2

    again, opt_again = _Model(0.0), _Model(0.0)
    assert CheckpointState(str(tmp_path), again, opt_again).restore_latest() == path
    assert again.w.numpy().tolist() == [1.0, 1.0] and opt_again.w.numpy()[0] == 7.0
    with pytest.raises(ValueError, match="does not match this run's model"):
        CheckpointState(str(tmp_path), _Model(0.0, shape=(3,)), _Model(0.0)).restore_latest()


def test_workers_other_than_the_chief_write_nothing_into_model_dir(tmp_path):
    worker = CheckpointState(str(tmp_path), _Model(), _Model(), chief=False)
    assert worker.save(3) is None
    best = BestCheckpoint(str(tmp_path), _Model(), chief=False)
    state = {"metric": "val_auc_macro", "value": 0.5}
    assert best.save(3, state) is None
    best.write_state(state)
    assert os.listdir(str(tmp_path)) == []
    assert os.listdir(worker._worker_dir) == [] and os.listdir(best._worker_dir) == []
    assert "checkpoint" not in state


def test_best_checkpoint_keeps_one_model_and_its_state(tmp_path):
    model = _Model(2.0)
    best = BestCheckpoint(str(tmp_path), model)
    assert best.load_state() == {} and best.latest is None
    best.save(5, {"metric": "val_auc_macro", "value": 0.6})
    path = best.save(10, {"metric": "val_auc_macro", "value": float("nan"), "epoch": 2})
    assert path == os.path.join(str(tmp_path), rundir.BEST_SUBDIR, "ckpt-10") == best.latest
    assert sorted(f for f in os.listdir(best.directory) if f.endswith(".index")) == \
        ["ckpt-10.index"]
    with open(os.path.join(best.directory, rundir.BEST_STATE_FILE)) as f:
        saved = json.load(f)  # strict JSON: NaN was written as null
    assert saved == {"metric": "val_auc_macro", "value": None, "epoch": 2, "checkpoint": path}
    assert best.load_state() == saved
    names = [name for name, _ in tf.train.list_variables(path)]
    assert not any(n.startswith("optimizer") for n in names)  # the model only
    assert rundir.checkpoint_origin(path) == ("best", 10)

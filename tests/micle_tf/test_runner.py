"""The runner core shared by pretraining and fine-tuning: schedule planning, fit segments,
history continuation, and the summary skeleton both runs write (through a real tiny run each:
test_pretrain.py and test_finetune.py check the run-specific fields)."""
import pytest

from micle_tf import config as C, rundir
from micle_tf.training.runner import continued, last, plan_schedule, segments


def test_plan_and_segments():
    cfg = C.PretrainConfig(batch_size=32, train_epochs=3, warmup_epochs=1)
    assert plan_schedule(cfg, 139) == (4, 12, 4)
    cfg = C.PretrainConfig(batch_size=32, train_steps=10, warmup_epochs=0.5)
    assert plan_schedule(cfg, 139) == (4, 10, 2)
    assert segments(0, 4, 10) == [(0, 2, 4), (2, 1, 2)]
    assert segments(8, 4, 10) == [(2, 1, 2)]
    assert segments(5, 4, 12) == [(1, 1, 3), (2, 1, 4)]  # mid-epoch: finish it, then go on
    assert segments(12, 4, 12) == []
    assert segments(5, 3, 5) == [] and segments(2, 45, 2) == []  # finished: no empty fit
    assert segments(10, 4, 8) == []  # schedule shortened below the resumed step
    with pytest.raises(ValueError, match="nothing to train"):
        plan_schedule(C.FinetuneConfig(train_steps=0, train_epochs=0), 10)


def test_history_continuation():
    previous = {"history": {"loss": [3.0, 2.0], "accuracy": [0.1, 0.2]}}
    merged = continued(previous, {"loss": [1.0]})
    assert merged == {"loss": [3.0, 2.0, 1.0], "accuracy": [0.1, 0.2]}
    assert previous["history"]["loss"] == [3.0, 2.0]  # not modified
    assert continued(None, {"loss": [1.0]}) == {"loss": [1.0]}
    assert last(merged, "loss") == 1.0 and last(merged, "val_loss") is None
    assert last({"loss": []}, "loss") is None


SKELETON = ("final_step", "train_steps", "steps_per_epoch", "resumed_from_step", "final_loss",
            "history", "images_per_second", "ms_per_step", "wall_seconds",
            "peak_learning_rate", "num_replicas", "checkpoint", "config", "dataset",
            "versions")


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_both_runners_write_the_same_skeleton(kind, tmp_path_factory, ph2_records):
    from tests.helpers import shared_finetune, shared_pretrain
    if kind == "pretrain":
        model_dir = shared_pretrain(tmp_path_factory, ph2_records)
        summary_file = rundir.PRETRAIN_SUMMARY_FILE
    else:
        model_dir = shared_finetune(tmp_path_factory, ph2_records, "none")
        summary_file = rundir.FINETUNE_SUMMARY_FILE
    summary = rundir.read_json(f"{model_dir}/{summary_file}")
    for key in SKELETON:
        assert key in summary, key
    assert summary["versions"] == rundir.versions()
    assert summary["final_loss"] == summary["history"]["loss"][-1]
    assert summary["checkpoint"].startswith(f"{model_dir}/{rundir.CHECKPOINT_SUBDIR}/")
    cfg, facts = rundir.load_config(model_dir, kind)
    assert summary["config"] == C.to_dict(cfg) and summary["dataset"] == facts
    assert set(rundir.DATASET_FACT_KEYS) <= set(facts)

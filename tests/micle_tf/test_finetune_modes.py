"""Fine-tuning modes through the public entry points (run_finetuning, micle-evaluate --sweep):
linear evaluation (`fine_tune_after_block=4`) trains the head only, `ft_proj_selector > 0`
trains through the chosen projection layer only, and a sweep started without --image_size
takes the image size of its pretraining run.

Weights are restored from the checkpoints the runs write (model_dir/checkpoints/, one per step
with steps_per_epoch=1) into freshly built layers, by object path (model.encoder,
model.projection_head, model.head)."""
import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from micle_tf import config as config_lib
from micle_tf.models.factory import build_encoder, build_projection_head
from micle_tf.training.finetune import run_finetuning
from tests.helpers import TINY_MODEL, base_finetune_config, run_cli, shared_pretrain

MODEL = config_lib.ModelConfig(**TINY_MODEL)


def _weights(prefix, name, layer):
    """{"i:path": value} of the variables of `layer` (built) restored from the `model.<name>`
    object of the checkpoint at `prefix` (every variable of the layer must be found there).
    Keys are the variable's index (auto-numbered layer names differ between builds) and its
    path in this build."""
    status = tf.train.Checkpoint(model=tf.train.Checkpoint(**{name: layer})).restore(prefix)
    status.expect_partial().assert_existing_objects_matched()
    return {f"{i}:{v.path}": v.numpy() for i, v in enumerate(layer.weights)}


def _encoder(prefix):
    return _weights(prefix, "encoder", build_encoder(MODEL).build_for(MODEL.image_size))


def _projection_head(prefix):
    head = build_projection_head(MODEL)
    head.build((None, build_encoder(MODEL).output_dim))
    return _weights(prefix, "projection_head", head)


def _head(prefix, num_classes=3, dim=None):
    head = keras.layers.Dense(num_classes, name="head_supervised")
    head.build((None, dim or build_encoder(MODEL).output_dim))
    return _weights(prefix, "head", head)


def _checkpoints(model_dir):
    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    return list(state.all_model_checkpoint_paths)


def _pretrained(pre):
    return tf.train.latest_checkpoint(os.path.join(pre, "checkpoints"))


def _changed(a, b):
    """Indices of the variables whose values differ between two `_weights` of one layer."""
    a, b = list(a.values()), list(b.values())
    assert len(a) == len(b) > 0
    return {i for i, (x, y) in enumerate(zip(a, b)) if not np.array_equal(x, y)}


def _finetune(ph2_records, model_dir, pre, **fields):
    cfg = dataclasses.replace(base_finetune_config(ph2_records), model_dir=str(model_dir),
                              init_from=pre, label_fraction=1.0, seed=1, train_steps=2,
                              steps_per_epoch=1, keep_checkpoints=2, **fields)
    return run_finetuning(cfg)


def test_linear_evaluation_trains_the_head_only(tmp_path, tmp_path_factory, ph2_records):
    pre = shared_pretrain(tmp_path_factory, ph2_records)
    summary = _finetune(ph2_records, tmp_path / "linear", pre, fine_tune_after_block=4)
    assert summary["final_step"] == 2
    first, last = _checkpoints(str(tmp_path / "linear"))
    pretrained = _encoder(_pretrained(pre))
    for prefix in (first, last):  # every encoder variable, BN statistics included
        assert not _changed(pretrained, _encoder(prefix))
    head = [_head(p) for p in (first, last)]
    assert _changed(*head) == {0, 1}  # kernel and bias both moved


def test_ft_proj_selector_trains_through_the_chosen_projection_layer(tmp_path, tmp_path_factory,
                                                                      ph2_records):
    pre = shared_pretrain(tmp_path_factory, ph2_records)
    _finetune(ph2_records, tmp_path / "proj1", pre, ft_proj_selector=1)
    with open(tmp_path / "proj1" / "finetune_config.json") as f:
        assert json.load(f)["config"]["ft_proj_selector"] == 1
    trained = _checkpoints(str(tmp_path / "proj1"))[-1]
    after = _projection_head(trained)
    changed = _changed(_projection_head(_pretrained(pre)), after)
    learned = {i: key for i, key in enumerate(after) if "moving_" not in key}  # kernel, BN
    # layer nl_0 feeds the head and is trained; the layers above it get no gradient
    assert {i for i, key in learned.items() if "/nl_0/" in key} <= changed
    assert not {i for i, key in learned.items() if "/nl_0/" not in key} & changed
    assert _head(trained)  # nl_0 is as wide as the encoder output (proj_hidden_dim=None)
    # the encoder is fine-tuned too (fine_tune_after_block=-1)
    assert _changed(_encoder(_pretrained(pre)), _encoder(trained))


@pytest.mark.slow
def test_sweep_cli_takes_the_image_size_of_the_pretraining_run(tmp_path, tmp_path_factory,
                                                               ph2_records):
    pre = shared_pretrain(tmp_path_factory, ph2_records)
    out = tmp_path / "sweep"
    proc = run_cli("micle_tf.cli.evaluate", "--sweep", f"--data_dir={ph2_records}",
                   f"--sweep_dir={out}", f"--sweep_inits=micle:{pre}", "--sweep_fractions=0.25",
                   "--sweep_seeds=0", f"--backbone={TINY_MODEL['backbone']}",
                   f"--width_multiplier={TINY_MODEL['width_multiplier']}", "--batch_size=16",
                   "--train_steps=1", "--eval_split=", "--n_boot=0", "--verbose=0",
                   "--split=test")  # no --image_size: the pretraining run's 32 px
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["counts"]["trained"] == 1 and printed["sweep_dir"] == str(out)
    with open(out / "sweep.json") as f:
        (row,) = json.load(f)["rows"]
    with open(os.path.join(row["model_dir"], "finetune_config.json")) as f:
        saved = json.load(f)["config"]
    assert saved["model"]["image_size"] == TINY_MODEL["image_size"] == 32
    assert saved["batch_size"] == 16 and saved["learning_rate"] == 0.16  # the recipe's lr
    assert os.path.exists(os.path.join(row["model_dir"], "metrics_test.json"))

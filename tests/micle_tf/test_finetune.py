"""Fine-tuning: loss targets and policies, label-fraction subsets, runs from a pretraining
model_dir and from scratch, resume, best-checkpoint selection and early stopping.

The tiny runs (resnet18 x0.125, 32 px, 2 steps) are cached on disk under the session's temp
root (`shared_*` in tests/helpers.py), so test_evaluate.py reuses them instead of training
again."""
import dataclasses
import json
import math
import os
import types

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import reader
from micle_tf import config as config_lib
from micle_tf.models.classifier import classification_loss, classification_targets
from tests.helpers import SWEEP_FRACTION, base_finetune_config, shared_finetune, shared_pretrain

# ------------------------------------------------------------------------ losses and targets
def _sigmoid_ce(x, z):
    return max(x, 0.0) - x * z + math.log1p(math.exp(-abs(x)))


MULTILABEL = np.array([[1, 0, -1, -2], [-1, 1, 0, -2], [0, -1, 1, 1]], np.int32)
LOGITS = np.array([[2.0, -1.0, 0.5, 3.0], [-0.5, 1.5, -2.0, 0.0], [0.3, 0.7, -1.2, 2.2]],
                  np.float32)


@pytest.mark.parametrize("policy,uncertain_target,uncertain_kept", [
    ("ignore", None, False), ("ones", 1.0, True), ("zeros", 0.0, True)])
def test_uncertainty_policies_match_hand_computation(policy, uncertain_target, uncertain_kept):
    targets, mask = classification_targets(MULTILABEL, "multilabel", policy)
    targets, mask = targets.numpy(), mask.numpy()
    total, count = 0.0, 0
    for i in range(MULTILABEL.shape[0]):
        for j in range(MULTILABEL.shape[1]):
            code = MULTILABEL[i, j]
            if code == -2 or (code == -1 and not uncertain_kept):  # missing always masked
                assert mask[i, j] == 0.0
                continue
            z = float(code) if code >= 0 else uncertain_target
            assert mask[i, j] == 1.0 and targets[i, j] == z
            total += _sigmoid_ce(float(LOGITS[i, j]), z)
            count += 1
    loss = classification_loss(LOGITS, MULTILABEL, "multilabel", policy).numpy()
    np.testing.assert_allclose(loss, total / count, rtol=1e-5)


def test_unknown_uncertainty_policy_rejected():
    with pytest.raises(ValueError, match="uncertainty policy"):
        classification_targets(MULTILABEL, "multilabel", "maybe")


def test_label_smoothing_and_unlabelled_mask_multiclass():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, 2.0, 3.0]], np.float32)
    labels = np.array([0, 2, -1])  # the third is unlabelled
    eps, c = 0.1, 3
    expected = []
    for row, y in zip(logits[:2], labels[:2]):
        logp = row - np.log(np.sum(np.exp(row)))
        q = np.full(c, eps / c)
        q[y] += 1 - eps  # (1 - eps) * onehot + eps / C
        expected.append(-np.sum(q * logp))
    loss = classification_loss(logits, labels, "multiclass", label_smoothing=eps).numpy()
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
    plain = classification_loss(logits, labels, "multiclass").numpy()
    logp0 = logits[0] - np.log(np.sum(np.exp(logits[0])))
    logp1 = logits[1] - np.log(np.sum(np.exp(logits[1])))
    np.testing.assert_allclose(plain, -(logp0[0] + logp1[2]) / 2, rtol=1e-5)


# ----------------------------------------------------------------------- label-fraction subsets
def test_label_fraction_subsets_by_case_are_reproducible_and_nested(ph2_records):
    from micle_tf.training.finetune import select_training_cases
    index = {c: (lab, n) for c, lab, n in reader.read_case_index(ph2_records, "train")}
    subsets = {}
    for f in (0.1, 0.25, 0.5):
        ids, facts = select_training_cases(ph2_records, "train", f, seed=0)
        again, _ = select_training_cases(ph2_records, "train", f, seed=0)
        assert ids == again and ids == facts["case_ids"]
        assert facts["num_labelled_cases"] == len(ids)
        assert facts["num_labelled_images"] == sum(index[c][1] for c in ids)
        # stratified by label: each class keeps ceil(f * n_class) cases
        per_class = {}
        for c, (lab, _) in index.items():
            per_class.setdefault(lab, []).append(c)
        for lab, members in per_class.items():
            assert sum(index[c][0] == lab for c in ids) == math.ceil(f * len(members))
        subsets[f] = set(ids)
    assert subsets[0.1] < subsets[0.25] < subsets[0.5]
    other, _ = select_training_cases(ph2_records, "train", 0.25, seed=1)
    assert set(other) != subsets[0.25]
    every, facts = select_training_cases(ph2_records, "train", 1.0, seed=0)
    assert every is None and facts["num_labelled_cases"] == len(index)  # no filter needed
    with pytest.raises(ValueError, match="label_fraction"):
        select_training_cases(ph2_records, "train", 0.0, seed=0)


# ---------------------------------------------------------------------------------- runs
def test_finetune_from_pretraining_run(tmp_path_factory, ph2_records):
    from micle_tf.models.factory import build_encoder
    from micle_tf.rundir import load_classifier, load_encoder_weights
    from micle_tf.training import finetune as ft
    pre = shared_pretrain(tmp_path_factory, ph2_records)
    run = shared_finetune(tmp_path_factory, ph2_records, "micle")
    with open(os.path.join(run, ft.SUMMARY_FILE)) as f:
        summary = json.load(f)
    ids, facts = ft.select_training_cases(ph2_records, "train", SWEEP_FRACTION, seed=0)
    assert summary["init_from"] == pre
    assert summary["init_checkpoint"].startswith(os.path.join(pre, "checkpoints"))
    assert summary["label_fraction"] == SWEEP_FRACTION
    assert summary["num_labelled_cases"] == facts["num_labelled_cases"] == len(ids)
    assert summary["num_labelled_images"] == facts["num_labelled_images"]
    assert summary["train_cases_fingerprint"] == facts["fingerprint"]
    assert summary["final_step"] == 2 and math.isfinite(summary["final_loss"])
    best = summary["best"]
    assert best["metric"] == "val_auc_macro" and 0.0 <= best["value"] <= 1.0
    assert summary["best_checkpoint"] and os.path.exists(summary["best_checkpoint"] + ".index")
    assert summary["val_history"][-1]["val_top1"] is not None

    # the on-disk contract read by micle-evaluate / micle-export
    with open(os.path.join(run, ft.CONFIG_FILE)) as f:
        saved = json.load(f)
    assert set(saved) == {"config", "dataset"}
    for key in ("task", "label_names", "source", "salt_fingerprint", "data_dir"):
        assert key in saved["dataset"]
    assert saved["config"]["model"]["width_multiplier"] == 0.125  # from the pretraining run
    with open(os.path.join(run, ft.TRAIN_CASES_FILE)) as f:
        assert json.load(f)["case_ids"] == ids
    assert tf.train.latest_checkpoint(os.path.join(run, "checkpoints"))

    # the encoder started from the pretrained weights (2 tiny LARS steps barely move them),
    # unlike the run from scratch (same seed, no init_from)
    model, cfg, dataset = load_classifier(run, "latest")
    assert dataset["label_names"] == ["symmetric", "asymmetric_one_axis",
                                      "asymmetric_two_axes"]
    pretrained = build_encoder(cfg.model)
    pretrained.build_for(32)
    load_encoder_weights(pretrained, pre)
    scratch, _, _ = load_classifier(shared_finetune(tmp_path_factory, ph2_records, "none"),
                                    "latest")

    def kernel(encoder):
        return next(v for v in encoder.weights if "kernel" in v.path).numpy()
    np.testing.assert_allclose(kernel(model.encoder), kernel(pretrained), atol=1e-3)
    assert np.abs(kernel(scratch.encoder) - kernel(pretrained)).max() > 1e-2

    # same model_dir again: resumes at the end, trains nothing more
    again = ft.run_finetuning(dataclasses.replace(
        base_finetune_config(ph2_records), model_dir=run, init_from=pre,
        label_fraction=SWEEP_FRACTION, seed=0, eval_split="val"))
    assert again["resumed_from_step"] == 2 and again["final_step"] == 2
    assert again["best"]["step"] == best["step"]
    assert again["history"] == summary["history"] and again["final_loss"] == summary["final_loss"]
    assert again["init_checkpoint"] == summary["init_checkpoint"]


def test_finetune_from_scratch(tmp_path_factory, ph2_records):
    from micle_tf.rundir import load_classifier
    from micle_tf.training import finetune as ft
    run = shared_finetune(tmp_path_factory, ph2_records, "none")
    with open(os.path.join(run, ft.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert summary["init_from"] == "none" and summary["init_checkpoint"] is None
    assert summary["final_step"] == 2 and math.isfinite(summary["final_loss"])
    assert summary["best"]["metric"] == "train_loss"  # no validation split configured
    assert summary["best_checkpoint"].startswith(os.path.join(run, "best"))
    model, cfg, _ = load_classifier(run)
    probs = model.probabilities(model(tf.zeros([2, 32, 32, 3]))["logits"]).numpy()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_bad_init_from_and_image_size(tmp_path, tmp_path_factory, ph2_records):
    from micle_tf.training import finetune as ft
    cfg = dataclasses.replace(base_finetune_config(ph2_records), model_dir=str(tmp_path / "x"),
                              init_from=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="init_from"):
        ft.resolve_model_config(cfg)
    pre = shared_pretrain(tmp_path_factory, ph2_records)
    big = dataclasses.replace(cfg, init_from=pre,
                              model=config_lib.ModelConfig(backbone="resnet50", image_size=224))
    with pytest.raises(ValueError, match="stem"):
        ft.resolve_model_config(big)
    same_stem = dataclasses.replace(big, model=config_lib.ModelConfig(image_size=48))
    resolved = ft.resolve_model_config(same_stem)
    assert (resolved.backbone, resolved.width_multiplier, resolved.image_size) == \
        ("resnet18", 0.125, 48)


class _FakeBest:
    def __init__(self):
        self.saved = []

    def save(self, step, state):
        self.saved.append((step, dict(state)))

    def write_state(self, state):
        self.state = dict(state)


def test_best_checkpoint_selection_and_early_stopping():
    from micle_tf.training.finetune import ValidationCallback
    aucs = iter([0.6, 0.7, 0.65, 0.69])
    best = _FakeBest()
    callback = ValidationCallback(lambda: {"auc_macro": next(aucs), "top1": 0.5}, best,
                                  guard=None, patience=2)
    step = tf.Variable(0, dtype=tf.int64)
    fake = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=step),
                                 stop_training=False)
    callback.set_model(fake)
    for epoch in range(4):
        step.assign_add(5)
        logs = {"loss": 1.0}
        callback.on_epoch_end(epoch, logs)
        assert logs["val_auc_macro"] > 0
        if fake.stop_training:
            break
    assert [s for s, _ in best.saved] == [5, 10]  # epochs 1 and 2 improved
    assert best.state["value"] == 0.7 and best.state["epoch"] == 2
    assert fake.stop_training and epoch == 3 and callback.early_stopped
    assert best.state["early_stopped"] and len(best.state["val_history"]) == 4

    # no validation data: lowest training loss wins
    best = _FakeBest()
    callback = ValidationCallback(None, best, guard=None)
    callback.set_model(fake)
    for epoch, loss in enumerate([2.0, 1.0, 1.5]):
        callback.on_epoch_end(epoch, {"loss": loss})
    assert best.state["metric"] == "train_loss" and best.state["value"] == 1.0


@pytest.mark.slow
def test_finetune_cli(tmp_path, ph2_records):
    import subprocess
    import sys
    out = tmp_path / "ft_cli"
    cmd = [sys.executable, "-m", "micle_tf.cli.finetune", f"--data_dir={ph2_records}",
           f"--model_dir={out}", "--init_from=none", "--label_fraction=0.1",
           "--backbone=resnet18", "--width_multiplier=0.125", "--image_size=32",
           "--batch_size=16", "--train_steps=1", "--eval_split=", "--verbose=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["final_step"] == 1 and printed["label_fraction"] == 0.1
    assert printed["best_metric"] == "train_loss"  # --eval_split= : no validation
    assert (out / "finetune_summary.json").exists() and (out / "best").is_dir()
    missing = subprocess.run([sys.executable, "-m", "micle_tf.cli.finetune",
                              f"--data_dir={ph2_records}", f"--model_dir={out}"],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "--init_from" in missing.stderr

"""Exact resume after a crash, no half-written checkpoint ever restored, and a non-finite loss
stopping training with the last good checkpoint kept.

Exact resume is bitwise on CPU without any determinism switch (no TF_DETERMINISTIC_OPS, no
`enable_op_determinism`): the reader's data of epoch e depends only on (seed, e), augmentations
are stateless, checkpoints hold model + optimizer (slots, iteration count, save counter), and
the CPU kernels this model uses give the same bits from run to run on one machine. So a run
SIGKILLed at a random moment and restarted ends with every checkpointed variable (weights, BN
moving statistics, LARS momenta, step) equal to an uninterrupted run's, `np.array_equal`.
(On GPU, cuDNN/atomic reductions may need `tf.config.experimental.enable_op_determinism()`;
not exercised here.)
"""
import contextlib
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import REPO, child_env, write_tiny_records

TRAIN_STEPS, STEPS_PER_EPOCH = 12, 2
RUN_TIMEOUT = 240  # seconds for one CLI run (a loaded 2-core machine)


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    return write_tiny_records(tmp_path_factory.mktemp("tiny_records"))


def pretrain_cmd(data_dir, model_dir, *extra):
    return [sys.executable, "-m", "micle_tf.cli.pretrain", "--method=micle",
            f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--backbone=resnet18",
            "--width_multiplier=0.125", "--image_size=32", "--batch_size=8",
            f"--train_steps={TRAIN_STEPS}", f"--steps_per_epoch={STEPS_PER_EPOCH}",
            "--knn_monitor=false", "--verbose=0", "--seed=3", "--keep_checkpoints=3", *extra]


@contextlib.contextmanager
def spawn(cmd, log_path, env=None):
    """Popen in its own process group; the whole group is SIGKILLed on exit if still alive."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env=env or child_env(), start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=30)
        log.close()


def wait_ok(proc, log_path, timeout=RUN_TIMEOUT):
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(proc.args[:3])} ran past {timeout}s; log tail:\n"
                    + open(log_path, errors="replace").read()[-3000:])
    assert rc == 0, open(log_path, errors="replace").read()[-3000:]


def checkpoint_variables(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(prefix)
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


@pytest.mark.slow
def test_sigkill_and_restart_resumes_exactly(tiny_records, tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    state_file = run_dir / "checkpoints" / "checkpoint"
    rng = random.Random()
    kill_delay = rng.uniform(0.0, 1.0)
    with spawn(pretrain_cmd(tiny_records, ref_dir), tmp_path / "ref.log") as ref, \
            spawn(pretrain_cmd(tiny_records, run_dir), tmp_path / "first.log") as first:
        deadline = time.time() + RUN_TIMEOUT
        while not state_file.exists():
            assert first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        time.sleep(kill_delay)  # a random moment after the first checkpoint
        assert first.poll() is None, (
            f"the run finished before the kill ({kill_delay:.2f}s after its first checkpoint)")
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
        wait_ok(ref, tmp_path / "ref.log")

    # What the crash left, plus a simulated crash in the middle of a later save: the files of
    # a checkpoint written but never recorded in the `checkpoint` state file (that file is only
    # replaced, atomically, after a save completes), a half-written temporary save folder, and
    # a stale temporary state file. None of them may be restored.
    ckpt_dir = run_dir / "checkpoints"
    good = tf.train.latest_checkpoint(str(ckpt_dir))
    assert good is not None
    good_step = int(good.rsplit("-", 1)[1])
    assert 0 < good_step < TRAIN_STEPS and good_step % STEPS_PER_EPOCH == 0
    (ckpt_dir / "ckpt-99.index").write_bytes(b"\x00garbage index" * 10)
    (ckpt_dir / "ckpt-99.data-00000-of-00001").write_bytes(b"partial")
    (ckpt_dir / "ckpt-98_temp").mkdir()
    (ckpt_dir / "ckpt-98_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    (ckpt_dir / "checkpoint.tmp0123456789abcdef").write_text(
        'model_checkpoint_path: "ckpt-99"\nall_model_checkpoint_paths: "ckpt-99"\n')
    assert tf.train.latest_checkpoint(str(ckpt_dir)) == good

    with spawn(pretrain_cmd(tiny_records, run_dir), tmp_path / "second.log") as second:
        wait_ok(second, tmp_path / "second.log")

    summary = json.loads((run_dir / "pretrain_summary.json").read_text())
    assert summary["resumed_from_step"] == good_step  # the complete checkpoint, not ckpt-99
    assert summary["final_step"] == TRAIN_STEPS
    a = checkpoint_variables(tf.train.latest_checkpoint(str(ref_dir / "checkpoints")))
    b = checkpoint_variables(tf.train.latest_checkpoint(str(ckpt_dir)))
    assert sorted(a) == sorted(b)
    assert any(k.startswith("optimizer/") and "_trainable_variables" not in k
               and "_iterations" not in k for k in a)  # optimizer slots (momenta) compared too
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, (f"killed {kill_delay:.2f}s after the first checkpoint, resumed at step "
                        f"{good_step}: {len(differ)} of {len(a)} variables differ, e.g. "
                        f"{differ[:5]}")
    iterations = [k for k in a if k.startswith("optimizer/_iterations")]
    assert iterations and int(b[iterations[0]]) == TRAIN_STEPS


def test_nonfinite_loss_stops_with_last_good_checkpoint(tiny_records, tmp_path, monkeypatch):
    """The loss turns NaN at step 4 (forced inside the graph, so the step is exact): training
    stops with FloatingPointError naming the step, and the newest checkpoint stays the one of
    step 2, whose variables are all finite (the NaN update of step 4 is never saved)."""
    from micle_tf import config as config_lib
    from micle_tf.models.contrastive import ContrastiveModel
    from micle_tf.training import pretrain

    original = ContrastiveModel.compute_losses

    def poisoned(self, data, training=True):
        total, values = original(self, data, training)
        if training:
            total = tf.where(self.optimizer.iterations >= 3, tf.constant(float("nan")), total)
        return total, values

    monkeypatch.setattr(ContrastiveModel, "compute_losses", poisoned)
    model_dir = tmp_path / "model"
    cfg = config_lib.PretrainConfig(
        method="micle", data_dir=tiny_records, model_dir=str(model_dir), batch_size=8,
        train_steps=8, steps_per_epoch=2, knn_monitor=False, verbose=0, optimizer="adam",
        model=config_lib.ModelConfig(backbone="resnet18", width_multiplier=0.125,
                                     image_size=32))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 4\b") as err:
        pretrain.run_pretraining(cfg)
    ckpt_dir = model_dir / "checkpoints"
    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    assert latest == str(ckpt_dir / "ckpt-2")
    assert latest in str(err.value)  # the message names the last good checkpoint
    assert not glob.glob(str(ckpt_dir / "ckpt-4*"))
    values = checkpoint_variables(latest)
    floats = {k: v for k, v in values.items() if np.issubdtype(np.asarray(v).dtype, np.floating)}
    assert floats and all(np.isfinite(v).all() for v in floats.values())
    assert not (model_dir / "pretrain_summary.json").exists()

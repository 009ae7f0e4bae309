"""`--strategy=multi_worker` with two real worker processes on 127.0.0.1, and the TPU branch of
`create_strategy` with fakes.

Multi-worker: two `micle-pretrain` processes (MultiWorkerMirroredStrategy from TF_CONFIG, one
CPU replica each, synchronized BN) train 2 steps with global batch 8 on 16 PH² cases in 2 shards,
so worker i's input pipeline reads shard i and the global batch is the union of the two
per-worker batches of 4.

How the workers' weights are compared: the non-chief saves its checkpoints into a temporary
folder that it deletes right after each save (a checkpoint is a collective; only the chief
keeps one), so there is nothing of it to read afterwards. Rather than adding a test-only flag
or environment variable to the library, each worker runs the unchanged CLI through a small
wrapper (WORKER below) that also dumps the model's variables to an .npz whenever
`CheckpointState` restores (step 0, the initial values) or saves (each epoch end). The test
then checks:
  (a) both workers hold bitwise identical variables at every step, and the chief's checkpoint
      in model_dir restores to the non-chief's final variables;
  (b) a single-process reference (default strategy, in this process) started from the same
      initial values and fed the concatenation of the two per-worker batches (rebuilt with
      `reader.make_dataset` and the same InputContexts) has the same loss at steps 1 and 2 as
      the workers and the same variables after step 2, within float tolerance. Synchronized BN
      makes the batch statistics global (16 images per step on both sides); without it each
      worker normalises with its own half-batch statistics and the losses differ.
The linear probe is off and augmentation is `none` only to keep the traced graph small; both
are independent of the distribution logic.

Not covered: several replicas per worker, workers on separate hosts, GPU collectives (NCCL),
fault tolerance (a worker dying mid-run), and the Keras-3 reduction workarounds on anything but
MultiWorkerMirroredStrategy (see `micle_tf.training.distribute.prepare_keras_fit`).
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import REPO, child_env, write_tiny_records

RUN_TIMEOUT = 240  # seconds for both workers together
STEPS = 2

WORKER = r"""
import os, runpy, sys
import numpy as np
from micle_tf.training import checkpoints

out, tag = os.environ["MICLE_TEST_DUMP_DIR"], os.environ["MICLE_TEST_DUMP_TAG"]

def dump(state, step):
    values = {v.path: np.asarray(v.numpy()) for v in state.checkpoint.model.weights}
    np.savez(os.path.join(out, f"{tag}-step{int(step)}.npz"), **values)

save, restore = checkpoints.CheckpointState.save, checkpoints.CheckpointState.restore_latest

def save_and_dump(self, step):
    path = save(self, step)
    dump(self, step)
    return path

def restore_and_dump(self):
    path = restore(self)
    dump(self, int(self.checkpoint.optimizer.iterations.numpy()))
    return path

checkpoints.CheckpointState.save = save_and_dump
checkpoints.CheckpointState.restore_latest = restore_and_dump
sys.argv = ["micle-pretrain"] + sys.argv[1:]
runpy.run_module("micle_tf.cli.pretrain", run_name="__main__", alter_sys=True)
"""


def free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def flags(data_dir, model_dir):
    return [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--method=micle",
            "--backbone=resnet18", "--width_multiplier=0.125", "--image_size=32",
            "--batch_size=8", f"--train_steps={STEPS}", "--steps_per_epoch=1",
            "--knn_monitor=false", "--linear_probe=false", "--augment=none",
            "--synchronized_bn", "--strategy=multi_worker", "--seed=5", "--verbose=2"]


@contextlib.contextmanager
def workers(cmds_envs, logs):
    """Starts each command in its own process group; SIGKILLs every group on exit."""
    procs, files = [], []
    try:
        for (cmd, env), log in zip(cmds_envs, logs):
            files.append(open(log, "wb"))
            procs.append(subprocess.Popen(cmd, stdout=files[-1], stderr=subprocess.STDOUT,
                                          cwd=REPO, env=env, start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=30)
        for f in files:
            f.close()


@pytest.mark.slow
def test_two_workers_match_each_other_and_single_process(tmp_path):
    data_dir = write_tiny_records(tmp_path / "records", num_cases=16, num_shards=2)
    model_dir, dumps = tmp_path / "model", tmp_path / "dumps"
    dumps.mkdir()
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    runs = []
    for i in range(2):
        worker_tmp = tmp_path / f"tmp{i}"  # where the non-chief's throwaway checkpoints go
        worker_tmp.mkdir()
        env = child_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                              "task": {"type": "worker", "index": i}}),
                        MICLE_TEST_DUMP_DIR=str(dumps), MICLE_TEST_DUMP_TAG=f"worker{i}",
                        TMPDIR=str(worker_tmp))
        runs.append(([sys.executable, "-c", WORKER] + flags(data_dir, model_dir), env))
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    with workers(runs, logs) as procs:
        deadline = time.time() + RUN_TIMEOUT
        for proc, log in zip(procs, logs):
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker ran past {RUN_TIMEOUT}s:\n{log.read_text()[-3000:]}")
            assert rc == 0, log.read_text()[-4000:]

    # (a) identical variables on both workers at every step, and the chief's checkpoint
    steps = range(STEPS + 1)
    per_worker = [[np.load(dumps / f"worker{i}-step{s}.npz") for s in steps] for i in range(2)]
    for s in steps:
        a, b = per_worker[0][s], per_worker[1][s]
        assert a.files == b.files and len(a.files) > 50
        differ = [k for k in a.files if not np.array_equal(a[k], b[k])]
        assert not differ, f"step {s}: workers differ in {differ[:5]}"
    final_nonchief = per_worker[1][STEPS]
    summary = json.loads((model_dir / "pretrain_summary.json").read_text())
    assert summary["num_replicas"] == 2 and summary["final_step"] == STEPS
    assert summary["checkpoint"] == str(model_dir / "checkpoints" / f"ckpt-{STEPS}")
    assert not list((tmp_path / "tmp1").glob("*/ckpt-*"))  # the non-chief cleaned up

    from data_pipelines import reader
    from data_pipelines.writer import read_info
    from micle_tf import augment, config as config_lib
    from micle_tf.optimizers import WarmupCosineDecay, build_optimizer, scale_learning_rate
    from micle_tf.training import pretrain, runner

    cfg = config_lib.PretrainConfig(
        method="micle", data_dir=data_dir, model_dir=str(tmp_path / "unused"), batch_size=8,
        train_steps=STEPS, steps_per_epoch=1, knn_monitor=False, linear_probe=False,
        augment="none", seed=5,
        model=config_lib.ModelConfig(backbone="resnet18", width_multiplier=0.125,
                                     image_size=32, synchronized_bn=True))
    # The reader's seeded shuffles also depend on TF's global seed, which run_pretraining sets
    # from cfg.seed: set it the same way, or the reference sees other batches.
    runner.seed_everything(cfg.seed)
    model = pretrain.build_pretraining_model(cfg)
    spe, total, warmup = runner.plan_schedule(cfg, 16)
    peak = scale_learning_rate(cfg.learning_rate, cfg.batch_size, cfg.learning_rate_scaling)
    model.compile(optimizer=build_optimizer(cfg.optimizer, WarmupCosineDecay(peak, warmup, total),
                                            cfg.weight_decay, cfg.momentum))
    model.optimizer.build(model.trainable_variables)

    def assign(values):  # by position: layer names may carry per-process suffixes
        arrays = [values[k] for k in values.files]
        assert len(arrays) == len(model.weights)
        for v, x in zip(model.weights, arrays):
            assert tuple(v.shape) == x.shape, (v.path, x.shape)
            v.assign(x)

    def compare(values, rtol=2e-4, atol=2e-5):
        for v, k in zip(model.weights, values.files):
            np.testing.assert_allclose(v.numpy(), values[k], rtol=rtol, atol=atol, err_msg=k)

    # (b) the single-process reference on the union of the per-worker batches
    assign(per_worker[0][0])
    info = read_info(data_dir)
    aug = augment.build_augment(cfg.augment, cfg.model.image_size)
    per_pipeline = []
    for i in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                         num_replicas_in_sync=2)
        ds = reader.make_dataset(data_dir, "train", "micle", ctx.get_per_replica_batch_size(8),
                                 32, augment_fn=aug, seed=cfg.seed, steps_per_epoch=1,
                                 start_epoch=0, input_context=ctx, info=info)
        per_pipeline.append(list(ds.take(STEPS)))
    ref_losses = []
    for s in range(STEPS):
        batch = {k: tf.concat([per_pipeline[0][s][k], per_pipeline[1][s][k]], axis=0)
                 for k in ("view1", "view2", "label", "case_id")}
        assert len(set(batch["case_id"].numpy())) == 8  # two disjoint shards -> 8 cases
        for m in model.metrics:
            m.reset_state()
        ref_losses.append(float(model.train_step(batch)["loss"]))
    np.testing.assert_allclose(ref_losses, summary["history"]["loss"], rtol=1e-4)
    compare(final_nonchief)
    # the update of step 2 moved the weights: the comparison above is not vacuous
    moved = [k for k in final_nonchief.files
             if not np.allclose(final_nonchief[k], per_worker[1][1][k])]
    assert len(moved) > 10

    # the chief's checkpoint restores to the non-chief's final variables (done last: restoring
    # through the model also restores its optimizer's step and slots)
    tf.train.Checkpoint(model=model).restore(summary["checkpoint"]).expect_partial()
    compare(final_nonchief, rtol=0, atol=0)


class _FakeResolver:
    def cluster_spec(self):
        return tf.train.ClusterSpec({})


def test_tpu_strategy_path_with_fakes(monkeypatch):
    """`create_strategy("tpu", ...)` connects to the cluster, initialises the TPU system and
    builds TPUStrategy, all with the one resolver; without an injected resolver it builds a
    TPUClusterResolver ("" for a local TPU VM). Not covered without a TPU: the real
    connection and initialisation, TPUStrategy's replica semantics (Keras's "first" reduction
    of logs), bfloat16 on TPU, and reading records from GCS."""
    from micle_tf.training import distribute

    calls = []
    sentinel = object()

    class FakeTPUStrategy:
        def __init__(self, resolver):
            calls.append(("TPUStrategy", resolver))
            self.cluster_resolver = resolver

    class FakeClusterResolver(_FakeResolver):
        def __init__(self, tpu=None):
            calls.append(("TPUClusterResolver", tpu))

    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster",
                        lambda r: calls.append(("connect", r)))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system",
                        lambda r: calls.append(("initialize", r)) or sentinel)
    monkeypatch.setattr(tf.distribute, "TPUStrategy", FakeTPUStrategy)
    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver",
                        FakeClusterResolver)

    resolver = _FakeResolver()
    strategy = distribute.create_strategy("tpu", tpu_resolver=resolver)
    assert isinstance(strategy, FakeTPUStrategy)
    assert calls == [("connect", resolver), ("initialize", resolver),
                     ("TPUStrategy", resolver)]
    assert distribute.is_chief(strategy)  # single host: empty cluster spec -> chief

    for tpu, expected in ((None, ""), ("local", ""), ("my-tpu", "my-tpu"),
                          ("grpc://10.0.0.2:8470", "grpc://10.0.0.2:8470")):
        calls.clear()
        distribute.create_strategy("tpu", tpu=tpu)
        assert calls[0] == ("TPUClusterResolver", expected)
        assert [c[0] for c in calls[1:]] == ["connect", "initialize", "TPUStrategy"]
        made = {id(c[1]) for c in calls[1:]}
        assert len(made) == 1  # the same resolver everywhere

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.create_strategy("multi_worker")

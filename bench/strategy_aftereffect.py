"""What a MirroredStrategy over two logical CPUs leaves behind in its process.

The test suite splits the CPU into two logical devices (tests/conftest.py) so MirroredStrategy
tests get two replicas. Training tests that ran after one of them were measured 1.5-2x slower,
which is why tests/conftest.py runs the two-replica tests last. This benchmark measures the
effect: each child process splits the CPU the same way, does one thing first (`--before`), then
times a short SimCLR pretraining run on the PH² records (`run_pretraining`, resnet18 width 0.25
at 32 px, batch 64) and reports its wall, user and system seconds. One fresh child per
(before, repeat), alternated, so the modes see the same machine load.

  none       nothing (the reference)
  build      create a MirroredStrategy and build a model in its scope
  all_reduce + strategy.run of a tf.function that all-reduces over the two replicas
  dist_data  + iterate a strategy.experimental_distribute_dataset once
  fit        + a Keras fit of a one-layer model under the strategy (what the tests do)

  python -m bench.strategy_aftereffect                  # every mode, 2 repeats (~4 min)
  python -m bench.strategy_aftereffect --modes=none,dist_data --repeats=3 --steps=15
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
MODES = ("none", "build", "all_reduce", "dist_data", "fit")
flags.DEFINE_list("modes", list(MODES), f"What each child does first: {', '.join(MODES)}.")
flags.DEFINE_integer("repeats", 2, "Children per mode (alternated between modes).")
flags.DEFINE_integer("steps", 15, "Pretraining steps of the timed run.")
flags.DEFINE_string("child", None, "(internal) run one measurement: the mode.")
flags.DEFINE_string("jsonl", None, "Also append the JSON lines to this file.")
MARK = "STRATEGY_AFTEREFFECT "


def _before(mode):
    import keras
    import numpy as np
    import tensorflow as tf

    if mode == "none":
        return
    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")][:2])
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
    if mode == "all_reduce":
        strategy.run(tf.function(
            lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.ones(3))))
    elif mode == "dist_data":
        for _ in strategy.experimental_distribute_dataset(tf.data.Dataset.range(32).batch(8)):
            pass
    elif mode == "fit":
        model.fit(np.ones((16, 3), "float32"), np.ones((16, 1), "float32"), batch_size=8,
                  verbose=0)


def run_child(mode, steps):
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from micle_tf import config as C
    from micle_tf.training.pretrain import run_pretraining

    records = common.ph2_records()
    _before(mode)
    cfg = C.PretrainConfig(
        method="simclr", data_dir=records, model_dir=tempfile.mkdtemp(prefix="aftereffect_"),
        model=C.ModelConfig(backbone="resnet18", width_multiplier=0.25, image_size=32),
        batch_size=64, train_steps=steps, steps_per_epoch=None, learning_rate=1.0,
        warmup_epochs=0, verbose=0, knn_monitor=False)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    run_pretraining(cfg)
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
    return {"wall_s": round(wall, 2), "user_s": round(r1.ru_utime - r0.ru_utime, 2),
            "sys_s": round(r1.ru_stime - r0.ru_stime, 2)}


def main(argv):
    del argv
    if FLAGS.child:
        print(MARK + json.dumps(run_child(FLAGS.child, FLAGS.steps)), flush=True)
        return
    unknown = [m for m in FLAGS.modes if m not in MODES]
    if unknown:
        raise app.UsageError(f"unknown mode(s) {unknown}; expected some of {MODES}")
    common.ph2_records()  # written once, before the children read it
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    runs = {m: [] for m in FLAGS.modes}
    for _ in range(FLAGS.repeats):
        for mode in FLAGS.modes:
            proc = subprocess.run([sys.executable, "-m", "bench.strategy_aftereffect",
                                   f"--child={mode}", f"--steps={FLAGS.steps}"],
                                  capture_output=True, text=True, env=env, timeout=900)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
            if proc.returncode or not lines:
                raise RuntimeError(f"child {mode} failed (rc={proc.returncode}): "
                                   f"{proc.stderr[-1500:]}")
            runs[mode].append(json.loads(lines[-1][len(MARK):]))
    rows = []
    for mode, figures in runs.items():
        med = {k: common.summarize([f[k] for f in figures]) for k in ("wall_s", "user_s", "sys_s")}
        rec = {"bench": "strategy_aftereffect", "machine": common.machine_info(),
               "versions": common.versions(), "config": {"before": mode, "steps": FLAGS.steps},
               "figures": {"runs": figures, **med}}
        common.emit(rec, FLAGS.jsonl)
        rows.append({"mode": mode, **{k: v["median"] for k, v in med.items()}})
    base = next((r for r in rows if r["mode"] == "none"), None)
    for r in rows:
        r["wall_vs_none"] = r["wall_s"] / base["wall_s"] if base else None
    print(common.table(rows, [("before", "mode", None), ("wall s", "wall_s", "{:.1f}"),
                              ("user s", "user_s", "{:.1f}"), ("sys s", "sys_s", "{:.1f}"),
                              ("wall / none", "wall_vs_none", "{:.2f}")],
                       title=f"median of {FLAGS.repeats} fresh processes, {FLAGS.steps} steps"))


if __name__ == "__main__":
    app.run(main)

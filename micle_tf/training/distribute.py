"""One factory for every tf.distribute strategy the CLIs accept (`--strategy`)."""
import json
import os

import tensorflow as tf
from absl import logging

from micle_tf.models import keras_compat as compat

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
MIXED_PRECISION = ("bfloat16", "float16")  # --mixed_precision values (None: float32)


def create_strategy(name="default", tpu=None, tpu_resolver=None):
    """Returns a strategy. Under any of them the per-replica batch is global / replicas and
    gradients are summed across replicas (the model scales its loss accordingly).

    - default: no distribution (one device).
    - mirrored: every local GPU (or the CPU), all-reduce over them.
    - multi_worker: MultiWorkerMirroredStrategy configured from TF_CONFIG (one process per
      host; the chief writes checkpoints and summaries).
    - tpu: TPUStrategy on `tpu` (a name or grpc address; "" or "local" for a TPU VM).
      `tpu_resolver` lets tests inject a resolver.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs TF_CONFIG (see README: Multi-worker)")
        cfg = json.loads(os.environ["TF_CONFIG"])
        logging.info("multi-worker: task %s of cluster with %d workers", cfg.get("task"),
                     len(cfg.get("cluster", {}).get("worker", [])))
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tpu_resolver or tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=("" if tpu in (None, "local") else tpu))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")


def is_chief(strategy):
    """True on the worker that writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0 and
                                            "chief" not in resolver.cluster_spec().as_dict())


def set_mixed_precision(policy):
    """`bfloat16` (TPU, Ampere+ GPUs) or `float16` (older GPUs; loss scaling is added by
    Model.compile) compute with float32 variables; None keeps float32."""
    import keras
    if policy in (None, "", "none", "float32"):
        keras.mixed_precision.set_global_policy("float32")
    elif policy in ("bfloat16", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    elif policy in ("float16", "mixed_float16"):
        keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        raise ValueError(f"unknown mixed precision policy {policy!r}; expected one of "
                         f"{MIXED_PRECISION}")


def prepare_keras_fit(model, strategy):
    """Works around two Keras 3 (3.15) `fit` bugs under a multi-replica tf.distribute strategy;
    call it on a built, compiled model (optimizer built) before `fit`.

    1. `fit` first pulls one batch and `strategy.reduce("MEAN", batch)`s it to build the model
       symbolically. That fails on dict batches (a string `case_id` cannot be averaged, and the
       collective strategy cannot reduce a dict at all), and the batch is not needed once the
       model and optimizer are built: the step is skipped.
    2. Under MultiWorkerMirroredStrategy `fit` reduces the train step's logs with
       `strategy.reduce("MEAN", v, axis=0)`, which fails for scalar logs ("Invalid reduction
       dimension 0 for input with 0 dimensions", tensorflow/tensorflow#72388). The logs are
       returned as [1] vectors there, which that reduction turns back into cross-worker means.

    Both rely on private Keras/TF attributes, checked in `micle_tf.models.keras_compat` (a
    missing one raises `KerasCompatError` instead of silently doing nothing).
    """
    if getattr(model, "built", False) and getattr(model.optimizer, "built", False):
        compat.skip_symbolic_build(model)
    if (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and compat.in_multi_worker_mode(strategy)):
        step = model.train_step

        def train_step(data):
            return {k: tf.reshape(v, [1]) for k, v in step(data).items()}

        model.train_step = train_step
    return model

"""Every Keras / TensorFlow private attribute micle-tf relies on, in one place.

setup.py allows any Keras 3 (`keras>=3.12,<4`), and private attributes can be renamed in any
release. Assigning to a renamed attribute silently does nothing, so each workaround here first
checks that what it patches or calls exists and otherwise raises `KerasCompatError` naming the
attribute and the installed versions. `check()` runs every such check at once
(tests/micle_tf/test_keras_compat.py calls it, so a Keras upgrade that breaks one fails a fast test
rather than a slow multi-worker run).

- `skip_symbolic_build(model)`: Keras' `fit` under a tf.distribute strategy pulls one batch and
  `strategy.reduce("MEAN", ...)`s it to build the model (`TensorFlowTrainer._maybe_symbolic_build`);
  that fails on dict batches with string entries and is not needed once model and optimizer
  are built (see `training.distribute.prepare_keras_fit`).
- `in_multi_worker_mode(strategy)`: `MultiWorkerMirroredStrategy.extended._in_multi_worker_mode()`
  (True when TF_CONFIG names more than one worker).
- `TFCheckpointListsMixin`: exposes Keras 3's list-held sub-layers to `tf.train.Checkpoint`
  through `_trackable_children` and `tf.__internal__.tracking.wrap`.
"""
import inspect
import sys

import keras
import tensorflow as tf

TESTED_KERAS = "3.15"  # the version the workarounds were written and tested against


class KerasCompatError(RuntimeError):
    """A private Keras/TensorFlow attribute a micle-tf workaround needs is missing."""


def versions():
    return f"Keras {keras.__version__}, TensorFlow {tf.__version__}"


def _require(owner, attribute, purpose):
    if not hasattr(owner, attribute):
        name = owner.__name__ if isinstance(owner, type) else type(owner).__name__
        raise KerasCompatError(
            f"{name}.{attribute} does not exist in {versions()} (micle-tf's workaround for "
            f"{purpose} was written for Keras {TESTED_KERAS}): update "
            "micle_tf/models/keras_compat.py for this version, or install a Keras version it "
            "was tested with")
    return getattr(owner, attribute)


# ------------------------------------------------------------------ fit's symbolic build
_SYMBOLIC_BUILD = "_maybe_symbolic_build"


def skip_symbolic_build(model):
    """Makes `model.fit` skip its one-batch symbolic build (the model must already be built)."""
    _require(model, _SYMBOLIC_BUILD, "fit's symbolic build under a distribution strategy")
    setattr(model, _SYMBOLIC_BUILD, lambda iterator=None, data_batch=None: None)
    return model


# ------------------------------------------------------------------ multi-worker mode
_MULTI_WORKER = "_in_multi_worker_mode"


def in_multi_worker_mode(strategy):
    """True when `strategy` spans more than one worker process."""
    method = _require(strategy.extended, _MULTI_WORKER, "reducing scalar logs across workers")
    return bool(method())


def _multi_worker_extended_class():
    module = sys.modules[tf.distribute.MultiWorkerMirroredStrategy.__module__]
    return _require(module, "CollectiveAllReduceExtended", "reducing scalar logs across workers")


# ------------------------------------------------------------------ checkpoints of layer lists
_TRACKABLE_CHILDREN = "_trackable_children"


class TFCheckpointListsMixin:
    """Exposes list-valued sub-layer attributes to ``tf.train.Checkpoint``.

    Keras 3 keeps layers held in Python lists in its own ``TrackedList``, which the
    TensorFlow object graph does not see: without this mixin ``tf.train.Checkpoint(
    model=resnet)`` would save *no* variables.  Listed attributes are exposed as TF
    ``ListWrapper`` children, giving simclr-like object paths such as
    ``model/block_groups/1/blocks/0/conv_layers/0/conv2d/_kernel``.  Keras'
    ``.weights.h5`` / ``.keras`` saving is unaffected.
    """

    _tf_checkpoint_lists = ()

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "checkpoint":
            wrappers = self.__dict__.get("_tf_list_wrappers")
            if wrappers is None:
                wrappers = {}
                object.__setattr__(self, "_tf_list_wrappers", wrappers)
            for attr in self._tf_checkpoint_lists:
                value = getattr(self, attr, None)
                if value is None or attr in children:
                    continue
                key = tuple(id(v) for v in value)
                cached = wrappers.get(attr)
                if cached is None or cached[0] != key:
                    # A plain list becomes a TF ListWrapper (children "0", "1", ...).
                    cached = (key, tf.__internal__.tracking.wrap(list(value)))
                    wrappers[attr] = cached
                children[attr] = cached[1]
        return children


# ------------------------------------------------------------------ all checks at once
def check():
    """Raises KerasCompatError unless every private attribute above exists on the installed
    Keras/TensorFlow, and Keras' `fit` still calls the build step `skip_symbolic_build`
    replaces. Returns the checked names."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    checked = []
    _require(keras.Model, _SYMBOLIC_BUILD, "fit's symbolic build under a distribution strategy")
    fit = inspect.getsource(TensorFlowTrainer.fit)
    if _SYMBOLIC_BUILD not in fit:
        raise KerasCompatError(
            f"TensorFlowTrainer.fit no longer calls {_SYMBOLIC_BUILD} in {versions()}: "
            "skip_symbolic_build would no longer skip fit's symbolic build; update "
            "micle_tf/models/keras_compat.py for this version")
    checked.append(f"keras.Model.{_SYMBOLIC_BUILD} (called by fit)")
    _require(_multi_worker_extended_class(), _MULTI_WORKER, "reducing scalar logs across workers")
    checked.append(f"MultiWorkerMirroredStrategy.extended.{_MULTI_WORKER}")
    _require(keras.layers.Layer, _TRACKABLE_CHILDREN, "checkpointing lists of layers")
    _require(tf.__internal__.tracking, "wrap", "checkpointing lists of layers")
    checked.append(f"keras.layers.Layer.{_TRACKABLE_CHILDREN}, tf.__internal__.tracking.wrap")
    return checked

"""Keras callbacks shared by pretraining and fine-tuning."""
import math

import keras
import numpy as np
import tensorflow as tf
from absl import logging


def current_learning_rate(optimizer):
    lr = optimizer.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(optimizer.iterations)
    return float(keras.ops.convert_to_numpy(lr))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the learning rate at the end of each epoch to the logs (and so to TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = current_learning_rate(self.model.optimizer)


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss. The checkpoint callback consults
    `triggered` and does not save, so the last good checkpoint stays the newest."""

    def __init__(self):
        super().__init__()
        self.triggered = False
        self.step = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.triggered = True
            self.step = int(self.model.optimizer.iterations.numpy())
            self.model.stop_training = True
            logging.error("non-finite loss (%s) at step %d: stopping", loss, self.step)


class CheckpointCallback(keras.callbacks.Callback):
    """Saves model + optimizer at each epoch end (epochs are the resume points)."""

    def __init__(self, state, guard=None):
        super().__init__()
        self.state = state
        self.guard = guard
        self.saved = []

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.triggered:
            return
        step = int(self.model.optimizer.iterations.numpy())
        path = self.state.save(step)
        if path:
            self.saved.append(path)


def embed(encoder, dataset, max_batches=None):
    """Encoder features (no augmentation, inference BN) of a supervised-mode dataset.
    Returns (embeddings [N, D] float32, labels, case_ids)."""
    fn = tf.function(lambda x: tf.cast(encoder(x, training=False), tf.float32))
    feats, labels, cases = [], [], []
    for i, batch in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            break
        feats.append(fn(batch["image"]).numpy())
        labels.append(batch["label"].numpy())
        cases.append(batch["case_id"].numpy())
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int32), np.zeros((0,), object)
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(cases)


class KnnMonitor(keras.callbacks.Callback):
    """Representation quality without training a classifier, every `every` epochs:
    - `knn_accuracy`: cosine kNN of eval-split images against labelled train images;
    - `same_case_top1`: how often an eval image's nearest other image is from its own case
      (label-free: did the encoder learn that the images of a case belong together?)."""

    def __init__(self, make_train_ds, make_eval_ds, task, every=1, k=20, max_batches=50):
        super().__init__()
        self.make_train_ds, self.make_eval_ds = make_train_ds, make_eval_ds
        self.task, self.every, self.k, self.max_batches = task, every, k, max_batches
        self.history = []

    def measure(self):
        from micle_tf.evaluation import knn
        encoder = self.model.encoder
        q_emb, q_labels, q_cases = embed(encoder, self.make_eval_ds(), self.max_batches)
        out = {}
        if len(q_emb) > 1:
            out["same_case_top1"] = knn.same_case_retrieval(q_emb, q_cases, k=1)["top1_hit_rate"]
        if self.task == "multiclass" and self.make_train_ds is not None:
            t_emb, t_labels, _ = embed(encoder, self.make_train_ds(), self.max_batches)
            keep_t, keep_q = t_labels >= 0, q_labels >= 0
            if keep_t.any() and keep_q.any():
                out["knn_accuracy"] = knn.knn_accuracy(t_emb[keep_t], t_labels[keep_t],
                                                       q_emb[keep_q], q_labels[keep_q],
                                                       k=min(self.k, int(keep_t.sum())))
        return out

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        values = self.measure()
        self.history.append({"epoch": epoch + 1, **values})
        if logs is not None:
            logs.update(values)


def fit_segments(model, make_data, segments, callbacks, guard, last_checkpoint, verbose=1,
                 should_stop=lambda: False, shard_check=None):
    """Runs `model.fit` once per schedule segment [(first_epoch, num_epochs, steps)] (see
    `pretrain._segments`), each on `make_data(first_epoch)`. Returns the merged history.

    A non-finite loss (seen by `guard`) ends training with FloatingPointError naming the step
    and the last good checkpoint (`last_checkpoint()`). A truncated shard makes TF raise
    DataLossError naming a byte offset only: `shard_check()` (e.g. reader.verify_shards) is
    then called to name the file."""
    history = {}
    for first_epoch, num_epochs, steps in segments:
        if guard.triggered or should_stop() or steps <= 0:
            break
        try:
            h = model.fit(make_data(first_epoch), initial_epoch=first_epoch,
                          epochs=first_epoch + num_epochs, steps_per_epoch=steps,
                          callbacks=callbacks, verbose=verbose,
                          shuffle=False)  # the reader shuffles (seeded, per epoch)
        except tf.errors.DataLossError:
            if shard_check is not None:
                shard_check()
            raise
        for k, v in h.history.items():
            history.setdefault(k, []).extend(float(x) for x in v)
    if guard.triggered:
        raise FloatingPointError(
            f"non-finite loss at step {guard.step}; training stopped. The last good checkpoint "
            f"is {last_checkpoint() or 'none (no checkpoint was saved before the failure)'}. "
            "Lower the learning rate or check the input data.")
    return history

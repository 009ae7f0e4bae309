"""Keras callbacks shared by pretraining and fine-tuning (the fit loop is `runner`'s)."""
import math

import keras
from absl import logging

from micle_tf.evaluation import knn, retrieval
from micle_tf.inference import embed
from micle_tf.losses import chance_contrastive_accuracy


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


class KnnMonitor(keras.callbacks.Callback):
    """Representation quality without training a classifier, every `every` epochs:
    - `knn_accuracy`: cosine kNN of eval-split images against labelled train images;
    - `same_case_top1` / `same_case_map`: same-case retrieval among the eval images
      (`evaluation.retrieval`: how often an image's nearest other image is from its own case,
      and the mean average precision of that ranking; label-free: did the encoder learn that
      the images of a case belong together?). Images of single-image cases are not scored (they
      stay in as distractors); with no multi-image case the two values are not logged.
    `same_case_top1`/`same_case_map`/`knn_accuracy` go to the epoch logs (and so to TensorBoard);
    `history` also keeps the chance levels and query counts of each measurement."""

    def __init__(self, make_train_ds, make_eval_ds, task, every=1, k=20, max_batches=50):
        super().__init__()
        self.make_train_ds, self.make_eval_ds = make_train_ds, make_eval_ds
        self.task, self.every, self.k, self.max_batches = task, every, k, max_batches
        self.history = []

    def measure(self, details=None):
        """The logged values; `details`, a dict, also receives the retrieval chance levels."""
        encoder = self.model.encoder
        q_emb, q_labels, q_cases = embed(encoder, self.make_eval_ds(), self.max_batches)
        out = {}
        if len(q_emb) > 1:
            rep = retrieval.same_case_retrieval_report(q_emb, q_cases, n_boot=0)
            if rep["num_queries"]:
                out["same_case_top1"] = rep["top1"]
                out["same_case_map"] = rep["map"]
                if details is not None:
                    details.update({f"same_case_{k}": rep[k] for k in (
                        "chance_top1", "chance_map", "num_queries", "num_cases")})
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
        details = {}
        values = self.measure(details)
        self.history.append({"epoch": epoch + 1, **values, **details})
        if logs is not None:
            logs.update(values)


def not_learning_message(accuracy, chance, step, warmup_steps, factor=2.0):
    """The warning text of `LearningHealthMonitor` (also used by the pretraining summary)."""
    return (f"pretraining is not learning its task: contrastive accuracy {accuracy:.4g} vs "
            f"chance {chance:.4g} after {step} steps (within {factor:g}x chance; warmup "
            f"{warmup_steps} steps); try weaker colour augmentation (--color_jitter_strength) "
            "or a lower learning rate")


class LearningHealthMonitor(keras.callbacks.Callback):
    """Warns when contrastive pretraining is not learning its task.

    At the end of every epoch that ends after the warmup (optimizer step > `warmup_steps`), the
    epoch's mean `contrastive_accuracy` is compared with its chance level 1/(2B-1) for the global
    batch B (the `chance_contrastive_accuracy` metric of the epoch logs, else computed from
    `global_batch`). Accuracy <= `factor` x chance ("within 2x chance") is judged not learning:
    the FIRST such epoch logs a WARNING (once per run, to keep logs readable; later epochs are
    still judged and recorded in `judged`) and the message is kept in `warning` for the
    pretraining summary. `warning` is not cleared if a later epoch recovers: the summary's
    `learning` flag reports the final state. Every epoch (warmup included) also gets
    `contrastive_accuracy_over_chance` in its logs (and so in TensorBoard), so place this
    callback before the TensorBoard callback.

    No judgement is possible when factor x chance >= 1 (B == 1: one candidate)."""

    def __init__(self, warmup_steps, global_batch=None, factor=2.0):
        super().__init__()
        self.warmup_steps = int(warmup_steps)
        self.global_batch = global_batch
        self.factor = float(factor)
        self.warning = None
        self.judged = []   # [{"epoch", "step", "contrastive_accuracy", "chance", "learning"}]

    def _chance(self, logs):
        chance = logs.get("chance_contrastive_accuracy")
        if chance is None and self.global_batch:
            chance = chance_contrastive_accuracy(self.global_batch)
        return None if chance is None else float(chance)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        acc = logs.get("contrastive_accuracy")
        chance = self._chance(logs)
        if acc is None or not chance:
            return
        acc = float(acc)
        logs["contrastive_accuracy_over_chance"] = acc / chance
        step = int(self.model.optimizer.iterations.numpy())
        if step <= self.warmup_steps or self.factor * chance >= 1.0:
            return
        learning = acc > self.factor * chance
        self.judged.append({"epoch": epoch + 1, "step": step, "contrastive_accuracy": acc,
                            "chance": chance, "learning": learning})
        if not learning and self.warning is None:
            self.warning = not_learning_message(acc, chance, step, self.warmup_steps,
                                                self.factor)
            logging.warning("%s", self.warning)

"""Checkpoints a run writes: atomic saves, exact resume, and the best-epoch store.

`tf.train.CheckpointManager` writes a checkpoint's files first and only then rewrites the
`checkpoint` index file (itself written to a temporary name and renamed), so the latest
checkpoint it points to is always complete: a run killed mid-save resumes from the previous one.
Resume checkpoints hold the whole model and the optimizer (slots and iteration count), so a
restored run continues at the saved step with the same learning rate and momentum.
Reading checkpoints back (lookup, encoder weights, classifiers) is `micle_tf.rundir`'s job.
"""
import os
import tempfile

import tensorflow as tf
from absl import logging

from micle_tf import rundir


class CheckpointState:
    """Checkpoints of `model` (+ `optimizer` when given) under `{model_dir}/{subdir}`.

    Under MultiWorkerMirroredStrategy every worker must take part in a save (it is a collective);
    only the chief writes into model_dir, the others write to a temporary folder they empty
    after each save."""

    def __init__(self, model_dir, model, optimizer=None, max_to_keep=3, chief=True,
                 subdir=rundir.CHECKPOINT_SUBDIR):
        self.directory = os.path.join(model_dir, subdir)
        self.chief = chief
        parts = {"model": model} if optimizer is None else {"model": model,
                                                            "optimizer": optimizer}
        self.checkpoint = tf.train.Checkpoint(**parts)
        directory = (self.directory if chief
                     else tempfile.mkdtemp(prefix=f"micle-worker-{subdir}-"))
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory,
                                                  max_to_keep=max_to_keep)
        self._worker_dir = None if chief else directory

    @property
    def latest(self):
        return tf.train.latest_checkpoint(self.directory)

    def restore_latest(self):
        """Restores the newest complete checkpoint; returns its path or None."""
        path = self.latest
        if path is None:
            return None
        rundir.restore(self.checkpoint, path, "does not match this run's model and optimizer "
                       "(was this model_dir written with other settings?)", partial=False)
        logging.info("restored %s", path)
        return path

    def save(self, step):
        """Saves at `step`; returns the path on the chief, None on other workers."""
        path = self.manager.save(checkpoint_number=int(step))
        if not self.chief:
            tf.io.gfile.rmtree(self._worker_dir)
            os.makedirs(self._worker_dir, exist_ok=True)
        return path if self.chief else None


class BestCheckpoint(CheckpointState):
    """`{model_dir}/best/`: the model (no optimizer) at its best epoch, one kept, and
    best_state.json beside it (the selection metric, its value, early-stopping bookkeeping;
    see finetune.ValidationCallback)."""

    def __init__(self, model_dir, model, chief=True):
        super().__init__(model_dir, model, max_to_keep=1, chief=chief, subdir=rundir.BEST_SUBDIR)
        self.state_path = os.path.join(self.directory, rundir.BEST_STATE_FILE)

    def load_state(self):
        return rundir.read_json(self.state_path) or {}

    def save(self, step, state):
        """Saves the model at `step` and `state` (with the checkpoint's path) beside it."""
        path = super().save(step)
        if path:
            state["checkpoint"] = path
            self.write_state(state)
        return path

    def write_state(self, state):
        if self.chief:
            os.makedirs(self.directory, exist_ok=True)
            rundir.write_json(self.state_path, state)

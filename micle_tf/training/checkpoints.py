"""Checkpoints: atomic saves, exact resume, and encoder-only initialisation.

`tf.train.CheckpointManager` writes a checkpoint's files first and only then rewrites the
`checkpoint` index file (itself written to a temporary name and renamed), so the latest
checkpoint it points to is always complete: a run killed mid-save resumes from the previous one.
Checkpoints hold the whole model and the optimizer (slots and iteration count), so a restored
run continues at the saved step with the same learning rate and momentum.
"""
import os
import tempfile

import tensorflow as tf
from absl import logging

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointState:
    """Model + optimizer checkpoints under `{model_dir}/checkpoints`.

    Under MultiWorkerMirroredStrategy every worker must take part in a save (it is a collective);
    only the chief writes into model_dir, the others write to a temporary folder they delete."""

    def __init__(self, model_dir, model, optimizer, max_to_keep=3, chief=True):
        self.directory = os.path.join(model_dir, CHECKPOINT_SUBDIR)
        self.chief = chief
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        directory = self.directory if chief else tempfile.mkdtemp(prefix="micle-worker-ckpt-")
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
        status = self.checkpoint.restore(path)
        status.assert_existing_objects_matched()
        logging.info("restored %s", path)
        return path

    def save(self, step):
        path = self.manager.save(checkpoint_number=int(step))
        if not self.chief:
            tf.io.gfile.rmtree(self._worker_dir)
            os.makedirs(self._worker_dir, exist_ok=True)
        return path if self.chief else None


def resolve_checkpoint(path):
    """A model_dir, a checkpoints folder or a checkpoint prefix -> a checkpoint prefix."""
    if tf.io.gfile.isdir(path):
        for folder in (os.path.join(path, CHECKPOINT_SUBDIR), path):
            latest = tf.train.latest_checkpoint(folder)
            if latest:
                return latest
        raise FileNotFoundError(f"no checkpoint found in {path}")
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise FileNotFoundError(f"checkpoint {path} not found")


def load_encoder_weights(encoder, path, projection_head=None):
    """Initialises `encoder` (and optionally `projection_head`), weights only, from a micle-tf
    checkpoint: a pretraining or fine-tuning model_dir, or a checkpoint prefix. Optimizer state
    and other heads are ignored. `imagenet_simclr:PATH` reads a google-research/simclr TF2
    checkpoint instead."""
    if path.startswith("imagenet_simclr:"):
        from micle_tf.models import simclr_import
        summary = simclr_import.load_simclr_encoder(encoder, path.split(":", 1)[1],
                                                    projection_head=projection_head)
        logging.info("encoder initialised from SimCLR checkpoint %s (%d variables)",
                     summary["checkpoint"], summary["assigned"])
        return summary["checkpoint"]
    prefix = resolve_checkpoint(path)
    parts = {"encoder": encoder}
    if projection_head is not None:
        parts["projection_head"] = projection_head
    holder = tf.train.Checkpoint(model=tf.train.Checkpoint(**parts))
    status = holder.restore(prefix)
    status.expect_partial()
    # every encoder variable must have been found in the checkpoint
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(f"{prefix} does not hold weights for this encoder "
                         f"(different backbone or width?): {str(e)[:500]}") from None
    logging.info("encoder initialised from %s", prefix)
    return prefix

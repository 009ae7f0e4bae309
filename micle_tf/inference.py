"""Inference on a split: a classifier's class probabilities, an encoder's features.

No augmentation (the reader's deterministic evaluation resize), inference-mode batch norm,
record order. Fine-tuning's validation, micle-evaluate, the demo's comparisons, the kNN and
retrieval monitors of pretraining and micle-evaluate --retrieval all go through these
functions, so every figure is computed on the same pixels (and micle-export serves the same
decode + resize, see `micle_tf.export.serving`).
"""
import numpy as np
import tensorflow as tf

from data_pipelines import reader


def make_predict_fn(model, with_logits=False):
    """A tf.function images -> class probabilities (inference mode, float32), or
    (probabilities, logits) with `with_logits` (temperature scaling needs the real logits).
    Reuse one for several splits: it is traced once per batch shape."""
    @tf.function
    def predict(images):
        logits = model(images, training=False)["logits"]
        probs = model.probabilities(logits)
        return (probs, tf.cast(logits, tf.float32)) if with_logits else probs
    return predict


def predict_split(model, data_dir, split, image_size, batch_size=256, info=None, predict_fn=None,
                  labelled_only=True, return_logits=False):
    """Image-level predictions of a split, in record order.

    Returns (case_ids [N] str, labels [N] or [N, C] int, probs [N, C] float32), and the
    logits [N, C] float32 as a fourth item with `return_logits` (then a given `predict_fn`
    must be a `make_predict_fn(model, with_logits=True)`). Unlabelled images are skipped
    unless labelled_only=False."""
    predict_fn = predict_fn or make_predict_fn(model, with_logits=return_logits)
    ds = reader.make_dataset(data_dir, split, "supervised", batch_size, image_size,
                             training=False, labelled_only=labelled_only, info=info)
    cases, labels, probs, logits = [], [], [], []
    for batch in ds:
        images = batch["image"]
        n = int(images.shape[0])
        if n < batch_size:  # pad the last batch: one traced shape (inference BN is per-row)
            images = tf.concat([images, tf.zeros([batch_size - n] + images.shape[1:].as_list(),
                                                 images.dtype)], 0)
        out = predict_fn(images)
        if return_logits:
            if not isinstance(out, (tuple, list)):
                raise ValueError("return_logits needs a predict_fn made with "
                                 "make_predict_fn(model, with_logits=True)")
            out, z = out
            logits.append(z.numpy()[:n])
        elif isinstance(out, (tuple, list)):
            out = out[0]
        probs.append(out.numpy()[:n])
        labels.append(batch["label"].numpy())
        cases.append(batch["case_id"].numpy())
    if not probs:
        raise ValueError(f"split {split!r} of {data_dir} has no labelled images to predict")
    case_ids = np.array([c.decode() for c in np.concatenate(cases)], dtype=object)
    result = (case_ids, np.concatenate(labels).astype(np.int64), np.concatenate(probs))
    return result + (np.concatenate(logits),) if return_logits else result


def embed(encoder, dataset, max_batches=None):
    """Encoder features of a supervised-mode dataset (at most `max_batches` batches).
    Returns (embeddings [N, D] float32, labels, case_ids as bytes)."""
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


def embed_split(encoder, data_dir, split, image_size, batch_size=256, info=None):
    """Features of every image of `split`: (embeddings [N, D], case ids [N] str)."""
    ds = reader.make_dataset(data_dir, split, "supervised", batch_size, image_size,
                             training=False, info=info)
    emb, _, cases = embed(encoder, ds)
    return emb, np.asarray([c.decode() if isinstance(c, bytes) else c for c in cases])

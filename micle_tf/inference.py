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


def make_predict_fn(model):
    """A tf.function images -> class probabilities (inference mode, float32). Reuse one for
    several splits: it is traced once per batch shape."""
    @tf.function
    def predict(images):
        return model.probabilities(model(images, training=False)["logits"])
    return predict


def predict_split(model, data_dir, split, image_size, batch_size=256, info=None, predict_fn=None,
                  labelled_only=True):
    """Image-level predictions of a split, in record order.

    Returns (case_ids [N] str, labels [N] or [N, C] int, probs [N, C] float32). Unlabelled
    images are skipped unless labelled_only=False."""
    predict_fn = predict_fn or make_predict_fn(model)
    ds = reader.make_dataset(data_dir, split, "supervised", batch_size, image_size,
                             training=False, labelled_only=labelled_only, info=info)
    cases, labels, probs = [], [], []
    for batch in ds:
        images = batch["image"]
        n = int(images.shape[0])
        if n < batch_size:  # pad the last batch: one traced shape (inference BN is per-row)
            images = tf.concat([images, tf.zeros([batch_size - n] + images.shape[1:].as_list(),
                                                 images.dtype)], 0)
        probs.append(predict_fn(images).numpy()[:n])
        labels.append(batch["label"].numpy())
        cases.append(batch["case_id"].numpy())
    if not probs:
        raise ValueError(f"split {split!r} of {data_dir} has no labelled images to predict")
    case_ids = np.array([c.decode() for c in np.concatenate(cases)], dtype=object)
    return case_ids, np.concatenate(labels).astype(np.int64), np.concatenate(probs)


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

"""Contrastive (NT-Xent) loss for SimCLR / MICLe, with cross-replica negatives.

This follows ``add_contrastive_loss`` in google-research/simclr ``tf2/objective.py``.

Scale convention
----------------
The paper (Chen et al. 2020, eq. 1 and Alg. 1) averages the per-anchor loss over all
``2N`` anchors: ``L = 1/(2N) * sum_k [l(2k-1, 2k) + l(2k, 2k-1)]``. The reference code
instead returns ``mean_i(loss_a[i] + loss_b[i])``: the mean over the ``N`` first-view
anchors of the view-1 loss PLUS the mean over the ``N`` second-view anchors of the
view-2 loss, i.e. exactly **2x the paper's value**. We keep the code's definition
because the published learning rates / weight decays (e.g. LARS lr 0.3 x B/256,
wd 1e-6, and the MICLe paper's settings, which were run on that code) were tuned
against it; halving the loss would silently halve every effective step size under
plain SGD (LARS trust ratios are scale invariant, but the weight-decay/gradient
balance is not).

Distribution
------------
Inside a ``tf.distribute`` replica context with more than one replica, both views are
all-gathered (``ReplicaContext.all_gather``, which is differentiable: its gradient
all-reduces the upstream gradient and slices out the local part), so every local
anchor is contrasted against the negatives of the GLOBAL batch. The returned loss is
the per-replica value (mean over this replica's anchors). Keras / tf.distribute SUM
gradients across replicas, so the caller must divide by ``num_replicas_in_sync``
before taking gradients (``loss / num_replicas``); the mean of the per-replica losses
then equals the single-device loss on the same global batch, and the summed gradients
equal the single-device gradients.

Chance levels (learning health)
-------------------------------
With a GLOBAL batch of ``B`` pairs, each anchor chooses among ``2B - 1`` candidates (the other
view of every pair and the other first/second views, itself masked). For uninformative (all equal)
logits, each direction's cross-entropy is ``ln(2B - 1)``; the loss above is the SUM of the two
directions' means, so the uniform-logit loss is ``2 ln(2B - 1)`` (``uniform_logits_loss``), and
a random-guess contrastive accuracy is ``1 / (2B - 1)`` (``chance_contrastive_accuracy``).
"""
import math

import tensorflow as tf

LARGE_NUM = 1e9

__all__ = ["LARGE_NUM", "nt_xent_loss", "alignment_uniformity", "chance_contrastive_accuracy",
           "uniform_logits_loss"]


def chance_contrastive_accuracy(global_batch):
    """Accuracy of a random guess among the ``2B - 1`` candidates of a global batch of B pairs."""
    return 1.0 / (2 * int(global_batch) - 1)


def uniform_logits_loss(global_batch):
    """``nt_xent_loss`` for all-equal logits: ``2 ln(2B - 1)`` (two directions summed, each the
    mean over anchors of ``ln(2B - 1)``)."""
    return 2.0 * math.log(2 * int(global_batch) - 1)


def alignment_uniformity(z1, z2, t=2.0):
    """Alignment and uniformity (Wang & Isola, ICML 2020) of L2-normalised projections.

    * ``alignment = mean_i ||z1_i - z2_i||^2`` (alpha = 2) over the B positive pairs: 0 when the
      two views of a pair map to the same point, 4 at most.
    * ``uniformity = log mean_{i<j} exp(-t ||z_i - z_j||^2)`` over all distinct pairs of the
      POOLED set of the 2B projections ``[z1; z2]`` (both views together, so the positive pairs
      are among the pairs; Wang & Isola's code averages the two views' separate values instead).
      It lies in ``[-4t, 0]``: 0 for a collapsed representation, lower is more uniform.

    Computed in float32 on the batch given (inside ``train_step``: this replica's local batch;
    Keras' Mean metrics then average the per-replica values). Both are plain TF ops (usable in a
    tf.function / under XLA: the pair mask is static-shape, no boolean_mask). Returns
    ``(alignment, uniformity)`` scalars; wrap the inputs in ``tf.stop_gradient`` for monitoring.
    """
    z1 = tf.math.l2_normalize(tf.cast(z1, tf.float32), axis=-1)
    z2 = tf.math.l2_normalize(tf.cast(z2, tf.float32), axis=-1)
    alignment = tf.reduce_mean(tf.reduce_sum(tf.square(z1 - z2), axis=-1))
    z = tf.concat([z1, z2], axis=0)
    n = tf.shape(z)[0]
    sq = tf.reduce_sum(tf.square(z), axis=-1)
    d2 = tf.maximum(sq[:, None] + sq[None, :] - 2.0 * tf.matmul(z, z, transpose_b=True), 0.0)
    ones = tf.ones([n, n], tf.float32)
    upper = tf.cast(ones - tf.linalg.band_part(ones, -1, 0), tf.bool)   # i < j
    logits = tf.where(upper, -float(t) * d2, tf.fill([n, n], -float("inf")))
    pairs = tf.cast(n * (n - 1) // 2, tf.float32)
    uniformity = tf.reduce_logsumexp(logits) - tf.math.log(pairs)
    return alignment, uniformity


def _replica_context_for_gather():
    """The replica context to all-gather in, or None to use the local batch."""
    if not tf.distribute.has_strategy():
        return None
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return None
    return ctx


def nt_xent_loss(z1, z2, temperature=0.1, return_metrics=False):
    """NT-Xent contrastive loss between two batches of paired projections.

    Args:
      z1: ``[B_local, D]`` projections of the first views (any float dtype; the loss is
        computed in float32). Row ``i`` of ``z1`` and row ``i`` of ``z2`` are a
        positive pair; every other row (of both views, across all replicas) is a
        negative.
      z2: ``[B_local, D]`` projections of the second views.
      temperature: softmax temperature ``tau``.
      return_metrics: also return a dict of contrastive metrics.

    Returns:
      The scalar per-replica loss ``mean_i(loss_a[i] + loss_b[i])`` (2x the paper's
      normalisation, see the module docstring), or ``(loss, metrics)`` with
      ``metrics = {"contrastive_accuracy", "contrastive_entropy",
      "chance_contrastive_accuracy", "uniform_contrastive_loss"}``:

      * ``contrastive_accuracy``: fraction of first-view anchors whose argmax over
        ``[logits_ab, logits_aa]`` (all 2*B_global - 1 candidates, the anchor itself
        masked) is the positive.
      * ``contrastive_entropy``: mean entropy of ``softmax([logits_ab, logits_aa])``
        over the first-view anchors.
      * ``chance_contrastive_accuracy`` = ``1 / (2 B_global - 1)`` and
        ``uniform_contrastive_loss`` = ``2 ln(2 B_global - 1)`` (the loss for all-equal
        logits), from the gathered batch size: the levels to compare the two above with.

      Metrics are computed on the local anchors and carry no gradient.
    """
    z1 = tf.math.l2_normalize(tf.cast(z1, tf.float32), axis=-1)
    z2 = tf.math.l2_normalize(tf.cast(z2, tf.float32), axis=-1)
    temperature = tf.cast(temperature, tf.float32)
    batch_size = tf.shape(z1)[0]

    ctx = _replica_context_for_gather()
    if ctx is not None:
        z1_large = ctx.all_gather(z1, axis=0)
        z2_large = ctx.all_gather(z2, axis=0)
        # Offset of this replica's rows in the gathered batch. Computed from the
        # gathered local sizes so that uneven per-replica batches are handled too.
        sizes = ctx.all_gather(tf.reshape(batch_size, [1]), axis=0)
        replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
        offset = tf.reduce_sum(sizes[:replica_id])
    else:
        z1_large, z2_large = z1, z2
        offset = tf.constant(0, tf.int32)
    large_batch_size = tf.shape(z1_large)[0]

    labels_idx = tf.range(batch_size) + offset  # positive's column in logits_ab
    masks = tf.one_hot(labels_idx, large_batch_size, dtype=tf.float32)

    logits_aa = tf.matmul(z1, z1_large, transpose_b=True) / temperature - masks * LARGE_NUM
    logits_bb = tf.matmul(z2, z2_large, transpose_b=True) / temperature - masks * LARGE_NUM
    logits_ab = tf.matmul(z1, z2_large, transpose_b=True) / temperature
    logits_ba = tf.matmul(z2, z1_large, transpose_b=True) / temperature

    logits_a = tf.concat([logits_ab, logits_aa], axis=1)
    logits_b = tf.concat([logits_ba, logits_bb], axis=1)
    loss_a = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels_idx, logits=logits_a)
    loss_b = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels_idx, logits=logits_b)
    loss = tf.reduce_mean(loss_a + loss_b)

    if not return_metrics:
        return loss

    logits_con = tf.stop_gradient(logits_a)
    pred = tf.argmax(logits_con, axis=1, output_type=tf.int32)
    accuracy = tf.reduce_mean(tf.cast(tf.equal(pred, labels_idx), tf.float32))
    log_prob = tf.nn.log_softmax(logits_con, axis=1)
    # Exact entropy (masked entries have p == 0 and a finite log-prob, so they add 0).
    entropy = -tf.reduce_mean(tf.reduce_sum(tf.exp(log_prob) * log_prob, axis=1))
    candidates = tf.cast(2 * large_batch_size - 1, tf.float32)
    return loss, {"contrastive_accuracy": accuracy, "contrastive_entropy": entropy,
                  "chance_contrastive_accuracy": 1.0 / candidates,
                  "uniform_contrastive_loss": 2.0 * tf.math.log(candidates)}

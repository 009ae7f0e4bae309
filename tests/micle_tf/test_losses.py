"""NT-Xent loss: plain-numpy reference, metrics, and cross-replica equivalence."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from micle_tf.losses import (alignment_uniformity, chance_contrastive_accuracy, nt_xent_loss,
                             uniform_logits_loss)


@pytest.fixture(autouse=True)
def _distinct_collective_keys():
    """Gives every MirroredStrategy created in a test its own collective group key.

    Each new MirroredStrategy restarts collective instance keys at the same values
    for the same devices; the runtime caches each instance's shape, so a second
    strategy in the same process whose collectives have different shapes fails with
    "Shape mismatch in the collective instance N". TensorFlow's own tests bump this
    (test-only) class attribute for the same reason. Autouse fixtures are set up
    before `two_replica_strategy`, so the strategy it builds picks up the new base.
    """
    tf.distribute.MirroredStrategy._collective_key_base += 1000
    yield


def _numpy_nt_xent(z1, z2, temperature):
    """NT-Xent written from the paper's formula with explicit loops (float64).

    Returns (paper_loss, accuracy, entropy) where paper_loss averages
    l(i, j) = -log(exp(s_ij/t) / sum_{k != i} exp(s_ik/t)) over all 2N anchors, and
    accuracy / entropy are over the first-view anchors' 2N-1 candidates.
    """
    z1 = np.asarray(z1, np.float64)
    z2 = np.asarray(z2, np.float64)
    n = z1.shape[0]
    z = np.concatenate([z1, z2], axis=0)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    total, correct, entropy = 0.0, 0, 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        logits = [float(z[i] @ z[k]) / temperature for k in range(2 * n) if k != i]
        cand = [k for k in range(2 * n) if k != i]
        mx = max(logits)
        lse = mx + math.log(sum(math.exp(v - mx) for v in logits))
        total += -(float(z[i] @ z[pos]) / temperature - lse)
        if i < n:
            correct += int(cand[int(np.argmax(logits))] == pos)
            probs = [math.exp(v - lse) for v in logits]
            entropy += -sum(p * (v - lse) for p, v in zip(probs, logits))
    return total / (2 * n), correct / n, entropy / n


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_matches_numpy_reference(batch_size, temperature):
    rng = np.random.default_rng(batch_size * 100 + int(temperature * 100))
    z1 = rng.normal(size=(batch_size, 6)).astype(np.float32)
    z2 = rng.normal(size=(batch_size, 6)).astype(np.float32)
    loss, metrics = nt_xent_loss(z1, z2, temperature=temperature, return_metrics=True)
    paper, acc, ent = _numpy_nt_xent(z1, z2, temperature)
    # The code's loss (mean of loss_a + loss_b) is twice the paper's 1/(2N) average.
    np.testing.assert_allclose(float(loss), 2.0 * paper, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["contrastive_accuracy"]), acc, atol=1e-6)
    np.testing.assert_allclose(float(metrics["contrastive_entropy"]), ent, rtol=1e-4, atol=1e-5)


def test_default_returns_scalar_and_casts_inputs():
    z = np.random.default_rng(0).normal(size=(4, 3))
    loss = nt_xent_loss(tf.constant(z, tf.float16), tf.constant(z[::-1].copy(), tf.float64))
    assert loss.dtype == tf.float32 and loss.shape == ()
    paper, _, _ = _numpy_nt_xent(z.astype(np.float16), z[::-1], 0.1)
    np.testing.assert_allclose(float(loss), 2 * paper, rtol=1e-3)


def test_metrics_on_well_separated_pairs():
    b = 4
    z = np.eye(b, 8, dtype=np.float32) * 3.0
    loss, metrics = nt_xent_loss(z, z, temperature=0.1, return_metrics=True)
    assert float(metrics["contrastive_accuracy"]) == 1.0
    # Positive logit 10, negatives 0: the softmax is nearly one-hot.
    assert 0.0 <= float(metrics["contrastive_entropy"]) < 0.01
    assert float(loss) < 0.01
    # At a high temperature the distribution over the 2B-1 candidates flattens.
    _, hot = nt_xent_loss(z, z, temperature=100.0, return_metrics=True)
    assert abs(float(hot["contrastive_entropy"]) - math.log(2 * b - 1)) < 1e-3
    # Mismatched pairs: every anchor's nearest candidate is its own copy in the other
    # view, which is not its positive.
    _, bad = nt_xent_loss(z, z[::-1].copy(), temperature=0.1, return_metrics=True)
    assert float(bad["contrastive_accuracy"]) == 0.0


def _per_replica(strategy, arrays, splits):
    """Distributes row-slices [splits[r]:splits[r+1]] of each array to replica r."""
    def value_fn(ctx):
        r = ctx.replica_id_in_sync_group
        return tuple(tf.constant(a[splits[r]:splits[r + 1]]) for a in arrays)
    return strategy.experimental_distribute_values_from_function(value_fn)


@pytest.mark.parametrize("splits", [(0, 4, 8), (0, 3, 7)], ids=["even", "uneven"])
def test_two_replicas_match_single_device(two_replica_strategy, splits):
    strategy = two_replica_strategy
    global_b = splits[-1]
    rng = np.random.default_rng(7)
    x1 = rng.normal(size=(global_b, 5)).astype(np.float32)
    x2 = rng.normal(size=(global_b, 5)).astype(np.float32)
    temperature = 0.2

    with strategy.scope():
        dense = keras.layers.Dense(4, use_bias=False)
        dense.build((None, 5))
    local = keras.layers.Dense(4, use_bias=False)
    local.build((None, 5))
    local.set_weights(dense.get_weights())

    # Single device, full global batch.
    with tf.GradientTape() as tape:
        ref_loss = nt_xent_loss(local(x1), local(x2), temperature=temperature)
    ref_grad = tape.gradient(ref_loss, local.kernel)

    weights = np.diff(splits) / global_b  # anchors per replica / global anchors

    @tf.function
    def step(inputs):
        def replica_fn(a, b):
            ctx = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                loss = nt_xent_loss(dense(a), dense(b), temperature=temperature)
                scaled = loss / ctx.num_replicas_in_sync
            grad = tape.gradient(scaled, dense.kernel)
            return loss, grad
        return strategy.run(replica_fn, args=inputs)

    losses, grads = step(_per_replica(strategy, (x1, x2), splits))
    per_replica_losses = [float(v) for v in strategy.experimental_local_results(losses)]
    if splits == (0, 4, 8):
        mean_loss = float(strategy.reduce(tf.distribute.ReduceOp.MEAN, losses, axis=None))
        np.testing.assert_allclose(mean_loss, float(ref_loss), rtol=1e-5, atol=1e-5)
        summed = strategy.reduce(tf.distribute.ReduceOp.SUM, grads, axis=None)
        np.testing.assert_allclose(summed.numpy(), ref_grad.numpy(), rtol=1e-5, atol=1e-5)
    # Anchor-weighted mean holds for uneven splits too (global negatives, correct
    # positive offsets).
    np.testing.assert_allclose(np.dot(weights, per_replica_losses), float(ref_loss),
                               rtol=1e-5, atol=1e-5)


def test_gather_skipped_in_cross_replica_context(two_replica_strategy):
    z = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
    expected = float(nt_xent_loss(z, z[::-1].copy()))
    with two_replica_strategy.scope():  # cross-replica context: local batch only
        got = float(nt_xent_loss(z, z[::-1].copy()))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def _numpy_alignment_uniformity(z1, z2, t):
    """Wang & Isola's definitions with explicit loops (float64), uniformity over the pooled 2B."""
    z1 = np.asarray(z1, np.float64)
    z2 = np.asarray(z2, np.float64)
    z1 = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    z2 = z2 / np.linalg.norm(z2, axis=1, keepdims=True)
    align = np.mean([np.sum((a - b) ** 2) for a, b in zip(z1, z2)])
    z = np.concatenate([z1, z2])
    terms = [math.exp(-t * np.sum((z[i] - z[j]) ** 2))
             for i in range(len(z)) for j in range(i + 1, len(z))]
    return align, math.log(np.mean(terms))


@pytest.mark.parametrize("batch_size,t", [(1, 2.0), (3, 2.0), (8, 2.0), (5, 0.5)])
def test_alignment_uniformity_matches_numpy_reference(batch_size, t):
    rng = np.random.default_rng(batch_size)
    z1 = rng.normal(size=(batch_size, 6)).astype(np.float32)
    z2 = rng.normal(size=(batch_size, 6)).astype(np.float32)
    align, unif = alignment_uniformity(z1, z2, t=t)
    want_a, want_u = _numpy_alignment_uniformity(z1, z2, t)
    np.testing.assert_allclose(float(align), want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(unif), want_u, rtol=1e-5, atol=1e-5)


def test_alignment_uniformity_extremes():
    z = np.eye(4, 6, dtype=np.float32) * 5.0
    align, unif = alignment_uniformity(z, z)
    assert float(align) == 0.0                      # identical views: perfectly aligned
    # pooled set: 4 points twice; of the 28 pairs, 4 are identical (d^2 = 0) and 24 are
    # orthogonal (d^2 = 2): log((4 + 24 exp(-4)) / 28)
    np.testing.assert_allclose(float(unif), math.log((4 + 24 * math.exp(-4.0)) / 28), rtol=1e-6)
    collapsed = np.ones((5, 3), np.float32)
    align, unif = alignment_uniformity(collapsed, collapsed * 2)
    assert abs(float(align)) < 1e-6 and abs(float(unif)) < 1e-6    # one point: uniformity 0
    align, _ = alignment_uniformity(z, -z)
    np.testing.assert_allclose(float(align), 4.0, rtol=1e-6)       # antipodal views: max


@pytest.mark.parametrize("b", [1, 2, 5, 16])
def test_uniform_logits_give_the_uniform_loss(b):
    """All projections equal -> every logit equal: each direction's cross-entropy is ln(2B-1)
    and the loss (the SUM of the two directions' means) is 2 ln(2B-1)."""
    z = np.tile(np.array([[0.3, -1.0, 2.0]], np.float32), (b, 1))
    loss, m = nt_xent_loss(z, z, temperature=0.1, return_metrics=True)
    np.testing.assert_allclose(float(loss), 2 * math.log(2 * b - 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), uniform_logits_loss(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m["uniform_contrastive_loss"]), uniform_logits_loss(b),
                               rtol=1e-6)
    np.testing.assert_allclose(float(m["chance_contrastive_accuracy"]), 1 / (2 * b - 1),
                               rtol=1e-6)
    assert chance_contrastive_accuracy(b) == 1 / (2 * b - 1)
    # the entropy of a uniform distribution over the 2B-1 candidates is the same ln(2B-1)
    np.testing.assert_allclose(float(m["contrastive_entropy"]), math.log(2 * b - 1), atol=1e-5)


def test_chance_levels_use_the_global_batch(two_replica_strategy):
    strategy = two_replica_strategy
    z = np.random.default_rng(5).normal(size=(8, 4)).astype(np.float32)

    @tf.function
    def step(inputs):
        def replica_fn(a, b):
            _, m = nt_xent_loss(a, b, return_metrics=True)
            return m["chance_contrastive_accuracy"], m["uniform_contrastive_loss"]
        return strategy.run(replica_fn, args=inputs)

    chance, uniform = step(_per_replica(strategy, (z, z[::-1].copy()), (0, 4, 8)))
    for c, u in zip(strategy.experimental_local_results(chance),
                    strategy.experimental_local_results(uniform)):
        np.testing.assert_allclose(float(c), 1 / 15, rtol=1e-6)    # B = 8 global, not 4
        np.testing.assert_allclose(float(u), 2 * math.log(15), rtol=1e-6)

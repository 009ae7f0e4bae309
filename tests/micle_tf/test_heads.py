"""Tests for micle_tf.models.heads."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from micle_tf.models.heads import LinearLayer, ProjectionHead, select_hidden


def _features(batch=8, dim=16, seed=0):
    return tf.random.stateless_normal([batch, dim], seed=[seed, 7])


def test_default_head_layers_hiddens_and_shapes():
    head = ProjectionHead()  # 3 layers, 128-d output, hidden = input dim (simclr)
    feats = _features(dim=16)
    z, hiddens = head(feats, training=True)
    assert len(head.linear_layers) == 3
    assert all(isinstance(l, LinearLayer) for l in head.linear_layers)
    assert isinstance(hiddens, list) and len(hiddens) == 4
    assert hiddens[0] is feats or np.array_equal(hiddens[0].numpy(), feats.numpy())
    assert [tuple(h.shape) for h in hiddens] == [(8, 16), (8, 16), (8, 16), (8, 128)]
    assert tuple(z.shape) == (8, 128) and z.dtype == tf.float32
    np.testing.assert_array_equal(z.numpy(), hiddens[-1].numpy())
    assert head.compute_output_dim(16) == 128


def test_hidden_dim_and_bias_bn_layout():
    head = ProjectionHead(num_proj_layers=3, proj_out_dim=8, hidden_dim=32)
    z, hiddens = head(_features(dim=16), training=False)
    assert [tuple(h.shape) for h in hiddens] == [(8, 16), (8, 32), (8, 32), (8, 8)]
    middle, last = head.linear_layers[:-1], head.linear_layers[-1]
    for layer in head.linear_layers:
        assert not layer.dense.use_bias and layer.dense.bias is None
        assert layer.use_bn and not layer.bn_relu.relu
    for layer in middle:  # BN with beta, ReLU applied by the head
        assert layer.bn_relu.bn.center and layer.bn_relu.bn.beta is not None
        assert len(layer.trainable_weights) == 3  # kernel, gamma, beta
    assert not last.bn_relu.bn.center and last.bn_relu.bn.beta is None
    assert len(last.trainable_weights) == 2  # kernel, gamma: no bias anywhere
    assert len(head.trainable_weights) == 3 + 3 + 2


def test_last_layer_has_no_relu_middle_layers_do():
    head = ProjectionHead(num_proj_layers=2, proj_out_dim=16)
    z, hiddens = head(_features(batch=16, dim=16), training=True)
    assert np.all(hiddens[1].numpy() >= 0)  # ReLU
    assert np.any(z.numpy() < 0)  # BN-normalised, no ReLU, no beta


def test_identity_head():
    head = ProjectionHead(num_proj_layers=0)
    feats = _features()
    z, hiddens = head(feats, training=True)
    assert len(hiddens) == 1 and not head.weights
    np.testing.assert_array_equal(z.numpy(), feats.numpy())
    assert head.compute_output_dim(16) == 16


def test_single_layer_is_linear_mode():
    head = ProjectionHead(num_proj_layers=1, proj_out_dim=4)
    z, hiddens = head(_features(), training=True)
    assert len(hiddens) == 2 and tuple(z.shape) == (8, 4)
    assert np.any(z.numpy() < 0)


def test_select_hidden():
    head = ProjectionHead(num_proj_layers=3, proj_out_dim=4, hidden_dim=8)
    feats = _features()
    _, hiddens = head(feats, training=False)
    assert select_hidden(hiddens, 0) is hiddens[0]
    assert tuple(select_hidden(hiddens, 1).shape) == (8, 8)
    assert select_hidden(hiddens, -1) is hiddens[-1]


def test_builds_on_keras_input_and_build():
    head = ProjectionHead(num_proj_layers=2, proj_out_dim=4)
    z, hiddens = head(keras.Input((16,)))
    assert tuple(z.shape) == (None, 4) and len(hiddens) == 3
    head2 = ProjectionHead(num_proj_layers=2, proj_out_dim=4)
    head2.build((None, 16))
    assert len(head2.weights) == len(head.weights) > 0


def test_tf_checkpoint_tracks_linear_layers(tmp_path):
    head = ProjectionHead(num_proj_layers=2, proj_out_dim=4)
    feats = _features()
    head(feats, training=True)
    path = tf.train.Checkpoint(head=head).save(str(tmp_path / "ckpt"))
    names = {n for n, _ in tf.train.list_variables(path)}
    assert "head/linear_layers/1/dense/_kernel/.ATTRIBUTES/VARIABLE_VALUE" in names
    assert "head/linear_layers/0/bn_relu/bn/beta/.ATTRIBUTES/VARIABLE_VALUE" in names
    restored = ProjectionHead(num_proj_layers=2, proj_out_dim=4)
    tf.train.Checkpoint(head=restored).restore(path)
    np.testing.assert_allclose(restored(feats, training=False)[0].numpy(),
                               head(feats, training=False)[0].numpy(), rtol=1e-6)


def test_mixed_precision_output_is_float32():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        head = ProjectionHead(num_proj_layers=2, proj_out_dim=4)
        z, hiddens = head(_features(), training=True)
        assert z.dtype == tf.float32
        assert hiddens[-1].dtype == tf.bfloat16
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_synchronized_bn_head(two_replica_strategy):
    strategy = two_replica_strategy
    with strategy.scope():
        head = ProjectionHead(num_proj_layers=2, proj_out_dim=4, synchronized_bn=True)
        head.build((None, 16))
    assert head.linear_layers[0].bn_relu.bn.synchronized
    feats = _features(batch=4)
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: feats[2 * ctx.replica_id_in_sync_group:][:2])
    out = strategy.run(lambda x: head(x, training=True)[0], args=(shards,))
    assert [tuple(t.shape) for t in strategy.experimental_local_results(out)] == [
        (2, 4), (2, 4)]


def test_invalid_num_layers():
    with pytest.raises(ValueError):
        ProjectionHead(num_proj_layers=-1)

"""Tests for micle_tf.models.resnet (tiny widths / 32px images to stay fast on CPU)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from micle_tf.models import resnet as resnet_lib
from micle_tf.models.resnet import (BatchNormRelu, BottleneckBlock, Conv2dFixedPadding,
                                    ResidualBlock, ResNet, SKConv2D, build_resnet)

TINY = 0.125  # 8-channel stem: keeps variable creation cheap


def _images(batch=2, size=32, seed=0):
    return tf.random.stateless_uniform([batch, size, size, 3], seed=[seed, 1])


def _spatial_after_stem_and_groups(model, size):
    x = _images(1, size)
    for layer in model.stem_layers:
        x = layer(x, training=False)
    sizes = [int(x.shape[1])]
    for group in model.block_groups:
        x = group(x, training=False)
        sizes.append(int(x.shape[1]))
    return sizes


def test_resnet18_small_stem_shapes_and_structure():
    model = ResNet(18, width_multiplier=TINY, small_image_stem=True)
    assert model.output_dim == 64
    feats = model(_images(), training=False)
    assert tuple(feats.shape) == (2, 64)
    # Structure used by the checkpoint importer.
    assert len(model.stem_layers) == 2 and model.stem_simclr_indices == (0, 2)
    assert [len(g.blocks) for g in model.block_groups] == [2, 2, 2, 2]
    for group in model.block_groups:
        first, rest = group.blocks[0], group.blocks[1:]
        assert isinstance(first, ResidualBlock)
        assert [type(l) for l in first.shortcut_layers] == [Conv2dFixedPadding,
                                                             BatchNormRelu]
        assert all(not b.shortcut_layers for b in rest)
        assert first.conv_simclr_indices == (0, 1, 2, 3)
        # simclr's init_zero: last BN gamma of each block starts at zero.
        assert np.all(first.conv_layers[-1].bn.gamma.numpy() == 0)
    # Spatial behaviour of the CIFAR-style stem: no downsampling in the stem.
    assert _spatial_after_stem_and_groups(model, 32) == [32, 32, 16, 8, 4]


def test_standard_stem_downsamples_by_four():
    model = ResNet(18, width_multiplier=TINY, small_image_stem=False)
    assert model.stem_simclr_indices == (0, 2, 3)
    assert model.stem_layers[0].kernel_size == 7 and model.stem_layers[0].strides == 2
    assert _spatial_after_stem_and_groups(model, 32) == [8, 8, 4, 2, 1]
    assert tuple(model(_images()).shape) == (2, 64)


def test_fixed_padding_matches_simclr_formula():
    conv = Conv2dFixedPadding(4, 3, 2)
    y = conv(tf.zeros([1, 7, 7, 2]))
    assert conv.conv2d.padding == "valid" and tuple(y.shape) == (1, 4, 4, 4)
    conv1 = Conv2dFixedPadding(4, 3, 1)
    assert conv1.conv2d.padding == "same" and tuple(conv1(tf.zeros([1, 7, 7, 2])).shape) \
        == (1, 7, 7, 4)
    assert not conv.conv2d.use_bias


def test_resnet50_builds_on_keras_input():
    model = build_resnet(50, width_multiplier=TINY, image_size=32)
    assert model.small_image_stem
    assert model.output_dim == 256
    out = model(keras.Input((32, 32, 3)))
    assert tuple(out.shape) == (None, 256)
    n_weights = len(model.weights)
    assert n_weights > 0
    assert [len(g.blocks) for g in model.block_groups] == [3, 4, 6, 3]
    block = model.block_groups[1].blocks[0]
    assert isinstance(block, BottleneckBlock)
    assert len(block.conv_layers) == 6 and block.conv_simclr_indices == (0, 1, 3, 4, 6, 7)
    # v1.5: stride on the 3x3 conv.
    assert block.conv_layers[0].strides == 1 and block.conv_layers[2].strides == 2
    assert block.conv_layers[2].kernel_size == 3
    feats = model(_images(), training=True)
    assert tuple(feats.shape) == (2, 256)
    assert len(model.weights) == n_weights  # fully built by the symbolic call


def test_sk_resnet50_builds():
    model = ResNet(50, width_multiplier=TINY, sk_ratio=0.0625)
    assert model.stem_simclr_indices == (0, 1, 2, 3, 4, 6, 7)
    assert [l.kernel_size for l in model.stem_layers[:6:2]] == [3, 3, 3]
    model.build((None, 32, 32, 3))
    assert model.built and len(model.weights) > 0
    block = model.block_groups[1].blocks[0]
    assert isinstance(block.conv_layers[2], SKConv2D)
    assert block.conv_simclr_indices == (0, 1, 3, 5, 6)
    assert [type(l).__name__ for l in block.shortcut_layers] == [
        "FixedPadding", "AveragePooling2D", "Conv2dFixedPadding", "BatchNormRelu"]
    # Stride-1 group: no fixed padding, 'same' avg-pool.
    assert [type(l).__name__ for l in model.block_groups[0].blocks[0].shortcut_layers] \
        == ["AveragePooling2D", "Conv2dFixedPadding", "BatchNormRelu"]
    feats = model(_images(), training=True)
    assert tuple(feats.shape) == (2, 256)
    assert np.all(np.isfinite(feats.numpy()))


def test_resnet50_parameter_count_matches_torchvision_without_fc():
    model = ResNet(50)
    model.build((None, 64, 64, 3))
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert trainable == 23_508_032
    assert model.output_dim == 2048


@pytest.mark.parametrize("k", [0, 2])
def test_fine_tune_after_block_stops_gradients(k):
    model = ResNet(18, width_multiplier=TINY, small_image_stem=True,
                   fine_tune_after_block=k)
    images = _images()
    model(images, training=False)
    stem_vars = [v for l in model.stem_layers for v in l.weights]
    group_vars = [g.weights for g in model.block_groups]
    frozen = stem_vars + [v for g in group_vars[:k] for v in g]
    # Frozen part is non-trainable (simclr sets trainable=False below the cut).
    trainable_ids = {id(v) for v in model.trainable_weights}
    assert not any(id(v) in trainable_ids for v in frozen)
    assert all(id(v) in trainable_ids for g in group_vars[k:] for v in g
               if v.trainable)

    all_vars = stem_vars + [v for g in group_vars for v in g]
    with tf.GradientTape() as tape:
        for v in all_vars:
            tape.watch(v.value)
        feats = model(images, training=True)
        loss = tf.reduce_sum(feats * tf.random.stateless_normal(feats.shape, [1, 2]))
    grads = tape.gradient(loss, [v.value for v in all_vars],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    grad_of = {id(v): g for v, g in zip(all_vars, grads)}
    assert all(not np.any(grad_of[id(v)].numpy()) for v in frozen)
    for g in group_vars[k:]:
        assert any(np.any(grad_of[id(v)].numpy()) for v in g)

    # Frozen BNs run in inference mode even with training=True.
    stem_bn = model.stem_layers[1].bn
    top_bn = model.block_groups[-1].blocks[-1].conv_layers[1].bn
    before_stem, before_top = stem_bn.moving_mean.numpy(), top_bn.moving_mean.numpy()
    model(images, training=True)
    np.testing.assert_array_equal(stem_bn.moving_mean.numpy(), before_stem)
    assert np.any(top_bn.moving_mean.numpy() != before_top)


def test_no_freezing_by_default_gradients_reach_stem():
    model = ResNet(18, width_multiplier=TINY, small_image_stem=True)
    images = _images()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(images, training=True) ** 2)
    stem_kernel = model.stem_layers[0].conv2d.kernel
    grad = tape.gradient(loss, stem_kernel)
    assert grad is not None and np.any(grad.numpy())
    assert len(model.trainable_weights) == sum(
        1 for v in model.weights if "moving" not in v.path)


def test_tf_checkpoint_and_keras_weights_round_trip(tmp_path):
    model = ResNet(18, width_multiplier=TINY, small_image_stem=True)
    images = _images(seed=5)
    model(images, training=True)
    expected = model(images, training=False).numpy()
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    names = {n for n, _ in tf.train.list_variables(path)}
    # Every variable is in the TF object graph, under simclr-like list paths.
    assert sum(n.startswith("model/") for n in names) == len(model.weights)
    assert "model/stem_layers/0/conv2d/_kernel/.ATTRIBUTES/VARIABLE_VALUE" in names
    assert ("model/block_groups/1/blocks/0/shortcut_layers/1/bn/moving_mean/"
            ".ATTRIBUTES/VARIABLE_VALUE") in names
    # Deferred restore into an unbuilt model.
    restored = ResNet(18, width_multiplier=TINY, small_image_stem=True)
    status = tf.train.Checkpoint(model=restored).restore(path)
    np.testing.assert_allclose(restored(images, training=False).numpy(), expected,
                               rtol=1e-6, atol=1e-6)
    status.assert_consumed()
    # Keras-native weights file.
    model.save_weights(str(tmp_path / "w.weights.h5"))
    other = ResNet(18, width_multiplier=TINY, small_image_stem=True)
    other.build((None, 32, 32, 3))
    other.load_weights(str(tmp_path / "w.weights.h5"))
    np.testing.assert_allclose(other(images, training=False).numpy(), expected,
                               rtol=1e-6, atol=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ResNet(20)
    with pytest.raises(ValueError):
        ResNet(18, fine_tune_after_block=5)


def test_mixed_bfloat16_policy():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = ResNet(18, width_multiplier=TINY, small_image_stem=True)
        feats = model(_images(), training=True)
        assert feats.dtype == tf.bfloat16
        assert np.all(np.isfinite(tf.cast(feats, tf.float32).numpy()))
        assert all(v.dtype == "float32" for v in model.weights)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_synchronized_bn_under_two_replicas(two_replica_strategy):
    strategy = two_replica_strategy
    with strategy.scope():
        model = ResNet(18, width_multiplier=TINY, small_image_stem=True,
                       synchronized_bn=True)
        model.build((None, 32, 32, 3))
    assert model.stem_layers[1].bn.synchronized
    initial_weights = model.get_weights()
    images = _images(batch=4)

    def replica_fn(ctx):
        shard = images[2 * ctx.replica_id_in_sync_group:][:2]
        return shard

    shards = strategy.experimental_distribute_values_from_function(replica_fn)
    out = strategy.run(lambda xs: model(xs, training=True), args=(shards,))
    local = strategy.experimental_local_results(out)
    assert len(local) == 2 and all(tuple(t.shape) == (2, 64) for t in local)
    # Cross-replica statistics: the stem BN's moving variance equals the one of a
    # single-device model trained on the whole batch of 4.
    reference = ResNet(18, width_multiplier=TINY, small_image_stem=True)
    reference.build((None, 32, 32, 3))
    reference.set_weights(initial_weights)
    reference(images, training=True)
    np.testing.assert_allclose(model.stem_layers[1].bn.moving_variance.numpy(),
                               reference.stem_layers[1].bn.moving_variance.numpy(),
                               rtol=1e-4, atol=1e-6)
    # Also fine outside a strategy.
    assert tuple(model(images, training=True).shape) == (4, 64)


def test_module_constants():
    assert resnet_lib.MODEL_PARAMS[50] == ("bottleneck", (3, 4, 6, 3))

"""ResNet v1.5 backbones (optionally with selective kernels) for SimCLR / MICLe.

A Keras 3 (TensorFlow backend) port of ``google-research/simclr`` ``tf2/resnet.py``.
All options come from constructor arguments (no absl flags).

Architecture
------------
* ``depth`` 18/34 use basic residual blocks, 50/101/152 use bottleneck blocks with the
  stride on the 3x3 convolution (v1.5).  Post-activation (BN-ReLU after each conv),
  ReLU after the residual sum, zero-initialised gamma on the last BN of every block.
* Convolutions have no bias and ``VarianceScaling()`` kernels; strided convolutions use
  explicit fixed padding (``(k-1)//2`` before, the rest after) and ``'valid'`` padding,
  stride-1 convolutions use ``'same'`` -- exactly as simclr's ``Conv2dFixedPadding``.
* ``sk_ratio > 0`` (SimCLRv2): the standard stem becomes three 3x3 convs (ResNet-D),
  projection shortcuts become (fixed-pad) + 2x2 avg-pool + 1x1 conv, and the 3x3 conv
  of every *bottleneck* block becomes a selective-kernel conv (``SKConv2D``).  As in
  simclr, basic blocks (depth 18/34) keep plain 3x3 convs (only the shortcut changes).
* ``small_image_stem=True`` (simclr's ``cifar_stem``): one 3x3 stride-1 conv + BN-ReLU,
  no max-pool.  It ignores ``sk_ratio`` for the stem, as simclr does.
* ``fine_tune_after_block=k`` (k >= 0): ``tf.stop_gradient`` is applied after the stem
  (k = 0) or after block group k (1..4), and every layer below that point is created
  with ``trainable=False`` (its variables are non-trainable and its BNs use moving
  statistics), as simclr does in fine-tune mode.  ``-1`` trains everything.

Correspondence with simclr checkpoints (for a checkpoint importer)
-----------------------------------------------------------------
simclr object paths look like ``model/resnet_model/<...>/<var>`` and
``model/_projection_head/linear_layers/{j}/{dense,bn_relu/bn}/<var>``.  Our objects:

===============================================  ==============================================
simclr (``model/resnet_model/...``)              ours (``ResNet`` instance ``r``)
===============================================  ==============================================
``initial_conv_relu_max_pool/{i}``               ``r.stem_layers[n]`` where
                                                 ``r.stem_simclr_indices[n] == i``
``block_groups/{g}``                             ``r.block_groups[g]`` (g = 0..3)
``block_groups/{g}/layers/{b}``                  ``r.block_groups[g].blocks[b]``
``.../projection_layers/{i}`` (bottleneck) or    ``blk.shortcut_layers[n]`` where
``.../shortcut_layers/{i}`` (basic)              ``blk.shortcut_simclr_indices[n] == i``
``.../conv_relu_dropblock_layers/{i}``           ``blk.conv_layers[n]`` where
(bottleneck) or ``.../conv2d_bn_layers/{i}``     ``blk.conv_simclr_indices[n] == i``
(basic)
===============================================  ==============================================

Our lists hold only layers that do something (simclr's ``IdentityLayer`` naming
placeholders and its always-disabled ``DropBlock`` layers are omitted), which is why
each list has a parallel tuple of simclr list indices.  The leaf objects mirror simclr's
attribute names: ``Conv2dFixedPadding.conv2d`` (a ``keras.layers.Conv2D``: ``kernel``),
``BatchNormRelu.bn`` (a ``keras.layers.BatchNormalization``: ``gamma``, ``beta``,
``moving_mean``, ``moving_variance``), and ``SKConv2D.{conv2d_fixed_padding,
batch_norm_relu, conv2d_0, batch_norm_relu_1, conv2d_1}``.  Variable shapes are the same
as simclr's (channels-last).

``tf.train.Checkpoint(model=r)`` (see ``micle_tf.models.keras_compat.TFCheckpointListsMixin``)
saves the same structure under ``model/stem_layers/{n}/...``, ``model/block_groups/{g}/blocks/{b}/
{shortcut_layers,conv_layers}/{n}/...`` (Keras 3 names conv/dense kernels ``_kernel``).

Note: freezing is done with per-layer ``trainable`` flags set at construction; setting
``model.trainable = True`` afterwards propagates to every sub-layer and unfreezes them
(the ``stop_gradient`` stays).  Rebuild from ``get_config`` to change the cut.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from micle_tf.models.keras_compat import TFCheckpointListsMixin

_PACKAGE = "micle_tf"

BATCH_NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9

# depth -> (block kind, blocks per group)
MODEL_PARAMS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def _conv_initializer():
    return keras.initializers.VarianceScaling()


def _build_chain(layers, input_shape):
    """Builds ``layers`` in order by shape propagation; returns the final shape.

    Explicit ``build`` methods avoid Keras' fallback of symbolically tracing ``call``
    of every nested composite layer (which is slow for deep nesting).
    """
    shape = tuple(input_shape)
    for layer in layers:
        if not layer.built:
            layer.build(shape)
        shape = tuple(layer.compute_output_shape(shape))
    return shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BatchNormRelu(keras.layers.Layer):
    """BatchNormalization (+ optional ReLU); simclr's ``BatchNormRelu`` (attribute ``bn``)."""

    def __init__(self, relu=True, init_zero=False, center=True, scale=True,
                 momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON,
                 synchronized=False, **kwargs):
        super().__init__(**kwargs)
        self.relu = bool(relu)
        self.init_zero = bool(init_zero)
        self.center = bool(center)
        self.scale = bool(scale)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.synchronized = bool(synchronized)
        self.bn = keras.layers.BatchNormalization(
            axis=-1,
            momentum=self.momentum,
            epsilon=self.epsilon,
            center=self.center,
            scale=self.scale,
            gamma_initializer="zeros" if self.init_zero else "ones",
            synchronized=self.synchronized,
            trainable=self.trainable,
            dtype=self.dtype_policy,
            name="bn",
        )

    def build(self, input_shape):
        self.bn.build(tuple(input_shape))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def call(self, inputs, training=None):
        x = self.bn(inputs, training=training)
        if self.relu:
            x = tf.nn.relu(x)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(relu=self.relu, init_zero=self.init_zero, center=self.center,
                      scale=self.scale, momentum=self.momentum, epsilon=self.epsilon,
                      synchronized=self.synchronized)
        return config


def _fixed_pad(inputs, kernel_size):
    pad_total = kernel_size - 1
    pad_beg = pad_total // 2
    pad_end = pad_total - pad_beg
    return tf.pad(inputs, [[0, 0], [pad_beg, pad_end], [pad_beg, pad_end], [0, 0]])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FixedPadding(keras.layers.Layer):
    """Pads H and W by ``(k-1)//2`` before and the rest after (simclr ``FixedPadding``)."""

    def __init__(self, kernel_size, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size = int(kernel_size)

    def call(self, inputs):
        return _fixed_pad(inputs, self.kernel_size)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.kernel_size - 1
        return (b, None if h is None else h + p, None if w is None else w + p, c)

    def get_config(self):
        config = super().get_config()
        config.update(kernel_size=self.kernel_size)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Conv2dFixedPadding(keras.layers.Layer):
    """Bias-free conv; explicit fixed padding + 'valid' when strided, else 'same'.

    simclr's ``Conv2dFixedPadding`` (attribute ``conv2d``).
    """

    def __init__(self, filters, kernel_size, strides, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.conv2d = keras.layers.Conv2D(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding="same" if self.strides == 1 else "valid",
            use_bias=False,
            kernel_initializer=_conv_initializer(),
            trainable=self.trainable,
            dtype=self.dtype_policy,
            name="conv2d",
        )

    def _padded_shape(self, input_shape):
        b, h, w, c = input_shape
        if self.strides == 1:
            return (b, h, w, c)
        p = self.kernel_size - 1
        return (b, None if h is None else h + p, None if w is None else w + p, c)

    def build(self, input_shape):
        self.conv2d.build(self._padded_shape(tuple(input_shape)))

    def compute_output_shape(self, input_shape):
        return tuple(self.conv2d.compute_output_shape(
            self._padded_shape(tuple(input_shape))))

    def call(self, inputs, training=None):
        if self.strides > 1:
            inputs = _fixed_pad(inputs, self.kernel_size)
        return self.conv2d(inputs)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size,
                      strides=self.strides)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SKConv2D(keras.layers.Layer):
    """Selective-kernel 3x3 conv (https://arxiv.org/abs/1903.06586), simclr ``SK_Conv2D``.

    Two 3x3 streams computed by one conv with ``2*filters`` outputs, mixed per channel
    by softmax weights predicted from globally pooled features.  Output is already
    BN-ReLU'd (no separate BN follows it in the block).
    """

    def __init__(self, filters, strides, sk_ratio, min_dim=32,
                 bn_momentum=BATCH_NORM_MOMENTUM, bn_epsilon=BATCH_NORM_EPSILON,
                 synchronized_bn=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)
        self.sk_ratio = float(sk_ratio)
        self.min_dim = int(min_dim)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.synchronized_bn = bool(synchronized_bn)
        common = dict(trainable=self.trainable, dtype=self.dtype_policy)
        bn = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                  synchronized=self.synchronized_bn, **common)
        self.conv2d_fixed_padding = Conv2dFixedPadding(
            2 * self.filters, 3, self.strides, name="conv2d_fixed_padding", **common)
        self.batch_norm_relu = BatchNormRelu(name="batch_norm_relu", **bn)
        mid_dim = max(int(self.filters * self.sk_ratio), self.min_dim)
        self.conv2d_0 = keras.layers.Conv2D(
            mid_dim, 1, strides=1, use_bias=False,
            kernel_initializer=_conv_initializer(), name="conv2d_0", **common)
        self.batch_norm_relu_1 = BatchNormRelu(name="batch_norm_relu_1", **bn)
        self.conv2d_1 = keras.layers.Conv2D(
            2 * self.filters, 1, strides=1, use_bias=False,
            kernel_initializer=_conv_initializer(), name="conv2d_1", **common)

    def build(self, input_shape):
        shape = _build_chain([self.conv2d_fixed_padding, self.batch_norm_relu],
                             input_shape)
        _build_chain([self.conv2d_0, self.batch_norm_relu_1, self.conv2d_1],
                     (shape[0], 1, 1, self.filters))

    def compute_output_shape(self, input_shape):
        shape = self.conv2d_fixed_padding.compute_output_shape(input_shape)
        return tuple(shape[:-1]) + (self.filters,)

    def call(self, inputs, training=None):
        x = self.conv2d_fixed_padding(inputs, training=training)
        x = self.batch_norm_relu(x, training=training)
        x = tf.stack(tf.split(x, num_or_size_splits=2, axis=-1))  # [2, B, H, W, F]
        global_features = tf.reduce_mean(tf.reduce_sum(x, axis=0), [1, 2], keepdims=True)
        global_features = self.conv2d_0(global_features)
        global_features = self.batch_norm_relu_1(global_features, training=training)
        mixing = self.conv2d_1(global_features)
        mixing = tf.stack(tf.split(mixing, num_or_size_splits=2, axis=-1))
        mixing = tf.nn.softmax(mixing, axis=0)
        return tf.reduce_sum(x * mixing, axis=0)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, strides=self.strides, sk_ratio=self.sk_ratio,
                      min_dim=self.min_dim, bn_momentum=self.bn_momentum,
                      bn_epsilon=self.bn_epsilon, synchronized_bn=self.synchronized_bn)
        return config


class _BlockBase(TFCheckpointListsMixin, keras.layers.Layer):
    """Shared plumbing of residual / bottleneck blocks."""

    expansion = 1
    _tf_checkpoint_lists = ("shortcut_layers", "conv_layers")

    def __init__(self, filters, strides, use_projection=False, sk_ratio=0.0,
                 bn_momentum=BATCH_NORM_MOMENTUM, bn_epsilon=BATCH_NORM_EPSILON,
                 synchronized_bn=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)
        self.use_projection = bool(use_projection)
        self.sk_ratio = float(sk_ratio)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.synchronized_bn = bool(synchronized_bn)
        self._common = dict(trainable=self.trainable, dtype=self.dtype_policy)
        self._bn = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                        synchronized=self.synchronized_bn, **self._common)

        shortcut, shortcut_idx = [], []
        if self.use_projection:
            filters_out = self.expansion * self.filters
            if self.sk_ratio > 0:  # ResNet-D shortcut (https://arxiv.org/abs/1812.01187)
                if self.strides > 1:
                    shortcut.append(FixedPadding(2, **self._common))
                shortcut.append(keras.layers.AveragePooling2D(
                    pool_size=2, strides=self.strides,
                    padding="same" if self.strides == 1 else "valid", **self._common))
                shortcut.append(Conv2dFixedPadding(filters_out, 1, 1, **self._common))
            else:
                shortcut.append(Conv2dFixedPadding(filters_out, 1, self.strides,
                                                   **self._common))
            shortcut.append(BatchNormRelu(relu=False, **self._bn))
            shortcut_idx = list(range(len(shortcut)))
        self.shortcut_layers = shortcut
        self.shortcut_simclr_indices = tuple(shortcut_idx)

    def build(self, input_shape):
        _build_chain(self.shortcut_layers, input_shape)
        _build_chain(self.conv_layers, input_shape)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.conv_layers:
            shape = tuple(layer.compute_output_shape(shape))
        return shape

    def call(self, inputs, training=None):
        shortcut = inputs
        for layer in self.shortcut_layers:
            shortcut = layer(shortcut, training=training)
        x = inputs
        for layer in self.conv_layers:
            x = layer(x, training=training)
        return tf.nn.relu(x + shortcut)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, strides=self.strides,
                      use_projection=self.use_projection, sk_ratio=self.sk_ratio,
                      bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                      synchronized_bn=self.synchronized_bn)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResidualBlock(_BlockBase):
    """Basic block (depth 18/34): 3x3(stride) BN-ReLU, 3x3 BN(zero gamma), add, ReLU.

    simclr ``ResidualBlock``: ``conv_layers`` <-> ``conv2d_bn_layers`` (indices 0..3).
    """

    expansion = 1

    def __init__(self, filters, strides, **kwargs):
        super().__init__(filters, strides, **kwargs)
        c, bn = self._common, self._bn
        self.conv_layers = [
            Conv2dFixedPadding(self.filters, 3, self.strides, **c),
            BatchNormRelu(**bn),
            Conv2dFixedPadding(self.filters, 3, 1, **c),
            BatchNormRelu(relu=False, init_zero=True, **bn),
        ]
        self.conv_simclr_indices = (0, 1, 2, 3)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BottleneckBlock(_BlockBase):
    """Bottleneck block (depth >= 50), v1.5: stride on the 3x3 (or SK) conv.

    simclr ``BottleneckBlock``: ``shortcut_layers`` <-> ``projection_layers`` and
    ``conv_layers`` <-> ``conv_relu_dropblock_layers`` (whose DropBlock entries, always
    disabled in simclr, are skipped; see ``conv_simclr_indices``).
    """

    expansion = 4

    def __init__(self, filters, strides, **kwargs):
        super().__init__(filters, strides, **kwargs)
        c, bn = self._common, self._bn
        layers = [
            Conv2dFixedPadding(self.filters, 1, 1, **c),  # simclr 0
            BatchNormRelu(**bn),                          # simclr 1 (2: DropBlock)
        ]
        if self.sk_ratio > 0:
            layers.append(SKConv2D(self.filters, self.strides, self.sk_ratio,
                                   bn_momentum=self.bn_momentum,
                                   bn_epsilon=self.bn_epsilon,
                                   synchronized_bn=self.synchronized_bn, **c))  # 3
            idx = [0, 1, 3, 5, 6]  # (4: DropBlock), 5: conv, 6: BN, (7: DropBlock)
        else:
            layers.append(Conv2dFixedPadding(self.filters, 3, self.strides, **c))  # 3
            layers.append(BatchNormRelu(**bn))                                     # 4
            idx = [0, 1, 3, 4, 6, 7]  # (5: DropBlock), 6: conv, 7: BN, (8: DropBlock)
        layers.append(Conv2dFixedPadding(4 * self.filters, 1, 1, **c))
        layers.append(BatchNormRelu(relu=False, init_zero=True, **bn))
        self.conv_layers = layers
        self.conv_simclr_indices = tuple(idx)


_BLOCKS = {"basic": ResidualBlock, "bottleneck": BottleneckBlock}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BlockGroup(TFCheckpointListsMixin, keras.layers.Layer):
    """A stage of ``num_blocks`` blocks; the first one projects the shortcut and strides.

    simclr ``BlockGroup``: ``blocks`` <-> ``layers``.
    """

    _tf_checkpoint_lists = ("blocks",)

    def __init__(self, filters, block_type, num_blocks, strides, sk_ratio=0.0,
                 bn_momentum=BATCH_NORM_MOMENTUM, bn_epsilon=BATCH_NORM_EPSILON,
                 synchronized_bn=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.block_type = str(block_type)
        self.num_blocks = int(num_blocks)
        self.strides = int(strides)
        self.sk_ratio = float(sk_ratio)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.synchronized_bn = bool(synchronized_bn)
        block_cls = _BLOCKS[self.block_type]
        kw = dict(sk_ratio=self.sk_ratio, bn_momentum=self.bn_momentum,
                  bn_epsilon=self.bn_epsilon, synchronized_bn=self.synchronized_bn,
                  trainable=self.trainable, dtype=self.dtype_policy)
        self.blocks = [block_cls(self.filters, self.strides, use_projection=True, **kw)]
        for _ in range(1, self.num_blocks):
            self.blocks.append(block_cls(self.filters, 1, **kw))

    def build(self, input_shape):
        _build_chain(self.blocks, input_shape)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        for block in self.blocks:
            shape = tuple(block.compute_output_shape(shape))
        return shape

    def call(self, inputs, training=None):
        x = inputs
        for block in self.blocks:
            x = block(x, training=training)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, block_type=self.block_type,
                      num_blocks=self.num_blocks, strides=self.strides,
                      sk_ratio=self.sk_ratio, bn_momentum=self.bn_momentum,
                      bn_epsilon=self.bn_epsilon, synchronized_bn=self.synchronized_bn)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResNet(TFCheckpointListsMixin, keras.Model):
    """ResNet backbone returning globally average-pooled features ``[B, output_dim]``.

    Args:
      depth: 18, 34 (basic blocks) or 50, 101, 152 (bottleneck blocks).
      width_multiplier: channel multiplier (1, 2, 4, ...).  A fraction (e.g. 0.125) is
        accepted for tiny test models: every width becomes ``int(c * width_multiplier)``.
      sk_ratio: > 0 enables SimCLRv2 selective kernels + ResNet-D stem/shortcuts.
      small_image_stem: 3x3 stride-1 stem without max-pool (CIFAR-style, for <= 64px).
      bn_momentum, bn_epsilon: BatchNormalization hyper-parameters.
      synchronized_bn: use cross-replica ``BatchNormalization(synchronized=True)``.
      fine_tune_after_block: -1 trains everything; k >= 0 freezes (stop_gradient and
        ``trainable=False``) the stem and block groups 1..k.
    """

    _tf_checkpoint_lists = ("stem_layers", "block_groups")

    def __init__(self, depth=50, width_multiplier=1, sk_ratio=0.0,
                 small_image_stem=False, bn_momentum=BATCH_NORM_MOMENTUM,
                 bn_epsilon=BATCH_NORM_EPSILON, synchronized_bn=False,
                 fine_tune_after_block=-1, **kwargs):
        super().__init__(**kwargs)
        depth = int(depth)
        if depth not in MODEL_PARAMS:
            raise ValueError(f"Unsupported ResNet depth {depth}; "
                             f"expected one of {sorted(MODEL_PARAMS)}")
        fine_tune_after_block = int(fine_tune_after_block)
        if not -1 <= fine_tune_after_block <= 4:
            raise ValueError("fine_tune_after_block must be in [-1, 4], got "
                             f"{fine_tune_after_block}")
        self.depth = depth
        wm = float(width_multiplier)
        if wm <= 0 or 64 * wm < 2:
            raise ValueError(f"width_multiplier too small: {width_multiplier}")
        self.width_multiplier = int(wm) if wm.is_integer() else wm
        self.sk_ratio = float(sk_ratio)
        self.small_image_stem = bool(small_image_stem)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.synchronized_bn = bool(synchronized_bn)
        self.fine_tune_after_block = fine_tune_after_block
        self.block_type, self.blocks_per_group = MODEL_PARAMS[depth]
        expansion = _BLOCKS[self.block_type].expansion
        wm = self.width_multiplier

        def width(c):
            return int(c * wm)

        self.output_dim = expansion * width(512)
        frozen = self.fine_tune_after_block >= 0
        c = dict(trainable=not frozen, dtype=self.dtype_policy)
        bn = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                  synchronized=self.synchronized_bn, **c)
        if self.small_image_stem:
            # simclr: [conv, Identity('initial_conv'), bn_relu, Identity('initial_max_pool')]
            stem = [Conv2dFixedPadding(width(64), 3, 1, **c), BatchNormRelu(**bn)]
            stem_idx = (0, 2)
        elif self.sk_ratio > 0:
            # simclr: [conv, bn, conv, bn, conv, Identity, bn, max_pool, Identity]
            stem = [
                Conv2dFixedPadding(width(64) // 2, 3, 2, **c), BatchNormRelu(**bn),
                Conv2dFixedPadding(width(64) // 2, 3, 1, **c), BatchNormRelu(**bn),
                Conv2dFixedPadding(width(64), 3, 1, **c), BatchNormRelu(**bn),
                keras.layers.MaxPooling2D(pool_size=3, strides=2, padding="same", **c),
            ]
            stem_idx = (0, 1, 2, 3, 4, 6, 7)
        else:
            # simclr: [conv, Identity('initial_conv'), bn_relu, max_pool, Identity]
            stem = [
                Conv2dFixedPadding(width(64), 7, 2, **c), BatchNormRelu(**bn),
                keras.layers.MaxPooling2D(pool_size=3, strides=2, padding="same", **c),
            ]
            stem_idx = (0, 2, 3)
        self.stem_layers = stem
        self.stem_simclr_indices = stem_idx

        self.block_groups = []
        for g, (filters, num_blocks, strides) in enumerate(
                zip((64, 128, 256, 512), self.blocks_per_group, (1, 2, 2, 2))):
            frozen = self.fine_tune_after_block >= g + 1
            self.block_groups.append(BlockGroup(
                width(filters), self.block_type, num_blocks, strides,
                sk_ratio=self.sk_ratio, bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon, synchronized_bn=self.synchronized_bn,
                trainable=not frozen, dtype=self.dtype_policy,
                name=f"block_group{g + 1}"))

    def call(self, images, training=False):
        x = images
        for layer in self.stem_layers:
            x = layer(x, training=training)
        for g, group in enumerate(self.block_groups):
            if self.fine_tune_after_block == g:
                x = tf.stop_gradient(x)
            x = group(x, training=training)
        if self.fine_tune_after_block == 4:
            x = tf.stop_gradient(x)
        return tf.reduce_mean(x, axis=[1, 2])

    def build(self, input_shape):
        """Creates all variables (``model.build((None, H, W, 3))``) without a forward pass."""
        _build_chain(list(self.stem_layers) + list(self.block_groups), input_shape)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def build_for(self, image_size, channels=3, batch_size=2):
        """Creates every variable by running one dummy batch (inference mode)."""
        self(tf.zeros([batch_size, image_size, image_size, channels]), training=False)
        return self

    def get_config(self):
        config = super().get_config()
        config.update(depth=self.depth, width_multiplier=self.width_multiplier,
                      sk_ratio=self.sk_ratio, small_image_stem=self.small_image_stem,
                      bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                      synchronized_bn=self.synchronized_bn,
                      fine_tune_after_block=self.fine_tune_after_block)
        return config


SMALL_IMAGE_STEM_MAX_SIZE = 64


def uses_small_image_stem(image_size):
    """The one rule for the stem: images of at most ``SMALL_IMAGE_STEM_MAX_SIZE`` (64) px get
    the small-image (CIFAR) stem; larger ones (and an unknown size) the standard stem."""
    return image_size is not None and int(image_size) <= SMALL_IMAGE_STEM_MAX_SIZE


def build_resnet(depth, width_multiplier=1, sk_ratio=0.0, image_size=None,
                 small_image_stem=None, **kwargs):
    """Convenience constructor.

    ``small_image_stem`` defaults to ``uses_small_image_stem(image_size)`` (<= 64 px).
    The model is returned unbuilt; call ``model.build_for(image_size)`` (or call it on
    a batch / ``keras.Input``) inside the strategy scope to create all variables.
    """
    if small_image_stem is None:
        small_image_stem = uses_small_image_stem(image_size)
    model = ResNet(depth=depth, width_multiplier=width_multiplier, sk_ratio=sk_ratio,
                   small_image_stem=small_image_stem, **kwargs)
    return model

"""SimCLR projection head (Keras 3 port of ``google-research/simclr`` ``tf2/model.py``).

``ProjectionHead`` is simclr's "nonlinear" head: ``num_proj_layers`` ``LinearLayer``s,
each a bias-free ``Dense`` (``RandomNormal(stddev=0.01)`` kernel) followed by
BatchNormalization.  Middle layers use a BN with beta (``center=True``) and a ReLU; the
last layer's BN has no beta (``center=False``) and no ReLU.  ``num_proj_layers=0`` is
simclr's ``proj_head_mode='none'`` (identity).  A single layer equals simclr's
``'linear'`` mode.

Checkpoint correspondence: simclr ``model/_projection_head/linear_layers/{j}/dense/kernel``
and ``.../linear_layers/{j}/bn_relu/bn/{gamma,beta,moving_mean,moving_variance}`` map to
``head.linear_layers[j].dense.kernel`` and ``head.linear_layers[j].bn_relu.bn.*``.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from micle_tf.models.keras_compat import TFCheckpointListsMixin
from micle_tf.models.resnet import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM, BatchNormRelu

_PACKAGE = "micle_tf"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LinearLayer(keras.layers.Layer):
    """Dense (+ BN), simclr's ``LinearLayer`` (attributes ``dense`` and ``bn_relu``).

    As in simclr, ``use_bias`` only affects the dense layer when ``use_bn=False``; with
    BN it controls the BN's beta (``center``).  ``units=None`` means "same as the input
    dimension" (resolved in ``build``).
    """

    def __init__(self, units=None, use_bias=True, use_bn=False,
                 bn_momentum=BATCH_NORM_MOMENTUM, bn_epsilon=BATCH_NORM_EPSILON,
                 synchronized_bn=False, **kwargs):
        super().__init__(**kwargs)
        self.units = None if units is None else int(units)
        self.use_bias = bool(use_bias)
        self.use_bn = bool(use_bn)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.synchronized_bn = bool(synchronized_bn)
        common = dict(trainable=self.trainable, dtype=self.dtype_policy)
        self.dense = keras.layers.Dense(
            self.units if self.units is not None else 1,  # replaced in build()
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
            use_bias=self.use_bias and not self.use_bn,
            name="dense", **common)
        if self.use_bn:
            self.bn_relu = BatchNormRelu(
                relu=False, center=self.use_bias, momentum=self.bn_momentum,
                epsilon=self.bn_epsilon, synchronized=self.synchronized_bn,
                name="bn_relu", **common)

    def build(self, input_shape):
        if self.units is None:
            if input_shape[-1] is None:
                raise ValueError("LinearLayer(units=None) needs a known input dimension")
            self.dense.units = int(input_shape[-1])
        self.dense.build(input_shape)
        if self.use_bn:
            self.bn_relu.build(tuple(input_shape[:-1]) + (self.dense.units,))
        self.built = True

    def call(self, inputs, training=None):
        x = self.dense(inputs)
        if self.use_bn:
            x = self.bn_relu(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        units = self.units if self.units is not None else input_shape[-1]
        return tuple(input_shape[:-1]) + (units,)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, use_bias=self.use_bias, use_bn=self.use_bn,
                      bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                      synchronized_bn=self.synchronized_bn)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ProjectionHead(TFCheckpointListsMixin, keras.layers.Layer):
    """SimCLR nonlinear projection head.

    Args:
      num_proj_layers: number of Dense+BN layers (0 = identity head).
      proj_out_dim: output dimension of the last layer.
      hidden_dim: width of the middle layers; ``None`` = input dimension (simclr).
      bn_momentum, bn_epsilon, synchronized_bn: BatchNormalization settings.

    ``call(features, training)`` returns ``(z, hiddens)``: ``hiddens`` is the list
    ``[features, h_1, ..., h_n]`` (simclr's ``hiddens_list``; ``hiddens[0]`` is the
    input) and ``z = float32(hiddens[-1])`` is the contrastive embedding.
    """

    _tf_checkpoint_lists = ("linear_layers",)

    def __init__(self, num_proj_layers=3, proj_out_dim=128, hidden_dim=None,
                 bn_momentum=BATCH_NORM_MOMENTUM, bn_epsilon=BATCH_NORM_EPSILON,
                 synchronized_bn=False, **kwargs):
        super().__init__(**kwargs)
        self.num_proj_layers = int(num_proj_layers)
        if self.num_proj_layers < 0:
            raise ValueError(f"num_proj_layers must be >= 0, got {num_proj_layers}")
        self.proj_out_dim = int(proj_out_dim)
        self.hidden_dim = None if hidden_dim is None else int(hidden_dim)
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.synchronized_bn = bool(synchronized_bn)
        kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                  synchronized_bn=self.synchronized_bn, trainable=self.trainable,
                  dtype=self.dtype_policy)
        self.linear_layers = []
        for j in range(self.num_proj_layers):
            if j != self.num_proj_layers - 1:
                # Middle layers: BN with beta, ReLU applied in call().
                self.linear_layers.append(LinearLayer(
                    self.hidden_dim, use_bias=True, use_bn=True, name=f"nl_{j}", **kw))
            else:
                # Final layer: neither bias (BN beta) nor ReLU.
                self.linear_layers.append(LinearLayer(
                    self.proj_out_dim, use_bias=False, use_bn=True, name=f"nl_{j}", **kw))

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.linear_layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.built = True

    def call(self, features, training=None):
        hiddens = [features]
        for j, layer in enumerate(self.linear_layers):
            h = layer(hiddens[-1], training=training)
            if j != self.num_proj_layers - 1:
                h = tf.nn.relu(h)
            hiddens.append(h)
        z = tf.cast(hiddens[-1], tf.float32)
        return z, hiddens

    def compute_output_dim(self, input_dim):
        """Dimension of ``z`` for backbone features of size ``input_dim``."""
        return self.proj_out_dim if self.num_proj_layers else int(input_dim)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        shapes = [shape]
        for layer in self.linear_layers:
            shape = layer.compute_output_shape(shape)
            shapes.append(shape)
        return shapes[-1], shapes

    def get_config(self):
        config = super().get_config()
        config.update(num_proj_layers=self.num_proj_layers,
                      proj_out_dim=self.proj_out_dim, hidden_dim=self.hidden_dim,
                      bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                      synchronized_bn=self.synchronized_bn)
        return config


def select_hidden(hiddens, ft_proj_selector=0):
    """Returns ``hiddens[ft_proj_selector]`` (simclr's ``ft_proj_selector``).

    Fine-tuning / linear evaluation attaches its classifier to the layer picked here:
    0 = backbone features (the head's input), j = output of projection layer j
    (simclr v2 fine-tunes from the first projection layer, ``ft_proj_selector=1``).
    Negative indices count from the end.
    """
    return hiddens[ft_proj_selector]

"""ContrastiveModel: SimCLR and MICLe pretraining as one Keras model with a custom train_step.

SimCLR and MICLe share everything but the source of the positive pair: SimCLR gets two
augmentations of one image, MICLe two augmented *different* images of one patient case (the
reader builds the pair; see `data_pipelines.reader`). So the model only sees `view1`/`view2`.

train_step: both views go through the encoder in one batch (BN statistics over both, as in
SimCLR), the projection head maps them to z, NT-Xent with negatives gathered from every replica.
An optional linear probe on stop-gradient encoder features learns from the labelled cases of
the batch: it measures the representation during pretraining without shaping it.

Metrics (epoch means; in the fit history, the progress bar and TensorBoard): `loss`,
`contrastive_loss`, `contrastive_accuracy`, `contrastive_entropy`, learning health:
`alignment` / `uniformity` of the projections (Wang & Isola 2020, `losses.alignment_uniformity`,
no gradient), and the chance levels they are to be read against for this global batch B,
`chance_contrastive_accuracy` = 1/(2B-1) and `uniform_contrastive_loss` = 2 ln(2B-1) (the
contrastive loss for all-equal logits); plus `probe_loss`/`probe_accuracy` with a probe.
"""
import keras
import tensorflow as tf

from micle_tf import augment
from micle_tf.losses import alignment_uniformity, nt_xent_loss

METHODS = ("simclr", "micle")  # where the positive pair comes from (--method)


def _probe_loss_and_accuracy(logits, labels, task):
    """Masked probe loss over labelled entries (multiclass label -1 / multilabel codes other
    than 0/1 are ignored). Returns (loss, accuracy, weight)."""
    logits = tf.cast(logits, tf.float32)
    if task == "multiclass":
        mask = tf.cast(labels >= 0, tf.float32)
        safe = tf.maximum(labels, 0)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe, logits=logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), safe), tf.float32)
    else:
        mask = tf.cast((labels == 0) | (labels == 1), tf.float32)
        target = tf.cast(tf.equal(labels, 1), tf.float32)
        ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits)
        correct = tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), target), tf.float32)
    weight = tf.reduce_sum(mask)
    loss = tf.math.divide_no_nan(tf.reduce_sum(ce * mask), weight)
    accuracy = tf.math.divide_no_nan(tf.reduce_sum(correct * mask), weight)
    return loss, accuracy, weight


@keras.saving.register_keras_serializable(package="micle_tf")
class ContrastiveModel(keras.Model):
    """Encoder + projection head (+ optional linear probe) trained with NT-Xent.

    Args:
      encoder: a backbone mapping images [B,H,W,3] to features [B,D] (e.g. `ResNet`).
      projection_head: `ProjectionHead` returning (z, hiddens).
      temperature: NT-Xent temperature.
      method: "simclr" or "micle" — recorded in the config (the data decides the pairs).
      num_classes: size of the online linear probe; 0 disables it.
      task: "multiclass" or "multilabel" (probe loss).
      device_augment: an augmentation preset whose photometric ops (colour jitter, grayscale,
        blur) run here, batched, at the start of the train step, with the per-view draws the
        input pipeline put in "view1_augment_params"/"view2_augment_params"
        (`augment.build_augment(preset, size, placement="device")`); `image_size` and
        `color_jitter_strength` resolve the preset as the pipeline did. None: the pipeline did
        the whole augmentation.
    """

    def __init__(self, encoder, projection_head, temperature=0.1, method="simclr",
                 num_classes=0, task="multiclass", device_augment=None, image_size=None,
                 color_jitter_strength=None, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"unknown pretraining method {method!r}; expected one of {METHODS}")
        self.encoder = encoder
        self.projection_head = projection_head
        self.temperature = float(temperature)
        self.method = method
        self.num_classes = int(num_classes)
        self.task = task
        self.device_augment = device_augment
        self.image_size = image_size
        self.color_jitter_strength = color_jitter_strength
        self._post_crop = (augment.post_crop(device_augment, image_size, color_jitter_strength)
                           if device_augment else None)
        self.probe = (keras.layers.Dense(self.num_classes, name="linear_probe", dtype="float32")
                      if self.num_classes else None)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.contrastive_loss_tracker = keras.metrics.Mean(name="contrastive_loss")
        self.contrastive_acc_tracker = keras.metrics.Mean(name="contrastive_accuracy")
        self.contrastive_entropy_tracker = keras.metrics.Mean(name="contrastive_entropy")
        self.alignment_tracker = keras.metrics.Mean(name="alignment")
        self.uniformity_tracker = keras.metrics.Mean(name="uniformity")
        self.chance_acc_tracker = keras.metrics.Mean(name="chance_contrastive_accuracy")
        self.uniform_loss_tracker = keras.metrics.Mean(name="uniform_contrastive_loss")
        self.probe_loss_tracker = keras.metrics.Mean(name="probe_loss")
        self.probe_acc_tracker = keras.metrics.Mean(name="probe_accuracy")

    def call(self, images, training=False):
        features = self.encoder(images, training=training)
        z, _ = self.projection_head(features, training=training)
        return {"features": features, "projection": z}

    def build_for(self, image_size, channels=3):
        """Creates every variable (needed before fit/restore under a tf.distribute strategy)."""
        images = tf.zeros([2, image_size, image_size, channels], self.compute_dtype)
        features = self.encoder(images, training=False)
        self.projection_head(features, training=False)
        if self.probe is not None:
            self.probe(tf.cast(features, tf.float32))
        self.built = True
        return self

    def build(self, input_shape):
        self.build_for(int(input_shape[1]), int(input_shape[-1]))

    @property
    def metrics(self):
        out = [self.loss_tracker, self.contrastive_loss_tracker, self.contrastive_acc_tracker,
               self.contrastive_entropy_tracker, self.alignment_tracker, self.uniformity_tracker,
               self.chance_acc_tracker, self.uniform_loss_tracker]
        if self.probe is not None:
            out += [self.probe_loss_tracker, self.probe_acc_tracker]
        return out

    def _views(self, data, training):
        """The two views of a batch, finishing a device-placed augmentation if there is one."""
        view1, view2 = data["view1"], data["view2"]
        has_params = "view1_augment_params" in data
        # Params without a preset would train on half-augmented views; a preset without params
        # would skip the photometric ops. Evaluation batches (training=False) may lack them.
        if has_params != (self._post_crop is not None) and (has_params or training):
            raise ValueError(
                "the batch carries augmentation params but the model has no device_augment "
                "preset" if has_params else
                f"device_augment={self.device_augment!r} but the batch has no "
                "view1_augment_params: build the reader's augment_fn with "
                "placement='device'")
        if has_params:
            view1 = self._post_crop.apply_photometric_batch(view1, data["view1_augment_params"])
            view2 = self._post_crop.apply_photometric_batch(view2, data["view2_augment_params"])
        return view1, view2

    def compute_losses(self, data, training=True):
        """Forward pass of one (per-replica) batch -> (total loss, metric values)."""
        view1, view2 = self._views(data, training)
        batch = tf.shape(view1)[0]
        features = self.encoder(tf.concat([view1, view2], axis=0), training=training)
        z, _ = self.projection_head(features, training=training)
        z1, z2 = z[:batch], z[batch:]
        contrastive, m = nt_xent_loss(z1, z2, self.temperature, return_metrics=True)
        alignment, uniformity = alignment_uniformity(tf.stop_gradient(z1), tf.stop_gradient(z2))
        total = contrastive
        values = {"contrastive_loss": contrastive, **m, "alignment": alignment,
                  "uniformity": uniformity}
        if self.probe is not None and "label" in data:
            labels = tf.concat([data["label"], data["label"]], axis=0)
            logits = self.probe(tf.stop_gradient(tf.cast(features, tf.float32)))
            probe_loss, probe_acc, weight = _probe_loss_and_accuracy(logits, labels, self.task)
            total = total + probe_loss
            values.update(probe_loss=probe_loss, probe_accuracy=probe_acc, probe_weight=weight)
        return total, values

    def train_step(self, data):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            total, values = self.compute_losses(data, training=True)
            # Keras sums gradients over replicas: scale so the sum is the global mean's gradient.
            scaled = total / replicas
            if hasattr(self.optimizer, "scale_loss"):
                scaled = self.optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        return self._update_metrics(total, values)

    def test_step(self, data):
        total, values = self.compute_losses(data, training=False)
        return self._update_metrics(total, values)

    def _update_metrics(self, total, values):
        self.loss_tracker.update_state(total)
        self.contrastive_loss_tracker.update_state(values["contrastive_loss"])
        self.contrastive_acc_tracker.update_state(values["contrastive_accuracy"])
        self.contrastive_entropy_tracker.update_state(values["contrastive_entropy"])
        self.alignment_tracker.update_state(values["alignment"])
        self.uniformity_tracker.update_state(values["uniformity"])
        self.chance_acc_tracker.update_state(values["chance_contrastive_accuracy"])
        self.uniform_loss_tracker.update_state(values["uniform_contrastive_loss"])
        if "probe_loss" in values:
            # Weighted by the number of labelled entries, so unlabelled batches do not count.
            self.probe_loss_tracker.update_state(values["probe_loss"],
                                                 sample_weight=values["probe_weight"])
            self.probe_acc_tracker.update_state(values["probe_accuracy"],
                                                sample_weight=values["probe_weight"])
        return {m.name: m.result() for m in self.metrics}

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            projection_head=keras.saving.serialize_keras_object(self.projection_head),
            temperature=self.temperature, method=self.method, num_classes=self.num_classes,
            task=self.task, device_augment=self.device_augment, image_size=self.image_size,
            color_jitter_strength=self.color_jitter_strength)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        config["projection_head"] = keras.saving.deserialize_keras_object(
            config["projection_head"])
        return cls(**config)

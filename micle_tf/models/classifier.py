"""ClassifierModel: the fine-tuning model (stage 3) — encoder (+ projection layers) + a head.

- multiclass: softmax cross-entropy (optional label smoothing); labels int, -1 = unlabelled.
- multilabel: sigmoid binary cross-entropy over the *present* labels. Codes follow
  data_pipelines.schema (1 positive, 0 negative, -1 uncertain, -2 missing); the
  `uncertainty_policy` decides what uncertain means: "ignore" (masked out of the loss, U-Ignore),
  "ones" (positive, U-Ones) or "zeros" (negative, U-Zeros). Missing is always masked.
- `ft_proj_selector` picks which projection-head layer feeds the head (0 = encoder features;
  SimCLRv2 found fine-tuning from the middle projection layer helps with few labels).
- Linear evaluation = a frozen encoder (`fine_tune_after_block=4` in the encoder, or
  `encoder.trainable = False`).
"""
import keras
import tensorflow as tf

from data_pipelines.schema import TASKS
from micle_tf.models.heads import select_hidden

UNCERTAINTY_POLICIES = ("ignore", "ones", "zeros")  # --uncertainty_policy


def classification_targets(labels, task, uncertainty_policy="ignore"):
    """labels -> (targets, mask) as float32. multiclass: targets int labels clamped to >= 0,
    mask [B]; multilabel: targets/mask [B, C]."""
    if task == "multiclass":
        labels = tf.cast(labels, tf.int32)
        return tf.maximum(labels, 0), tf.cast(labels >= 0, tf.float32)
    if uncertainty_policy not in UNCERTAINTY_POLICIES:
        raise ValueError(f"unknown uncertainty policy {uncertainty_policy!r}; expected one of "
                         f"{UNCERTAINTY_POLICIES}")
    labels = tf.cast(labels, tf.int32)
    positive = tf.equal(labels, 1)
    negative = tf.equal(labels, 0)
    uncertain = tf.equal(labels, -1)
    if uncertainty_policy == "ones":
        positive = positive | uncertain
        present = positive | negative
    elif uncertainty_policy == "zeros":
        negative = negative | uncertain
        present = positive | negative
    else:
        present = positive | negative
    return tf.cast(positive, tf.float32), tf.cast(present, tf.float32)


def classification_loss(logits, labels, task, uncertainty_policy="ignore", label_smoothing=0.0):
    """Mean loss over present labels of the (per-replica) batch."""
    logits = tf.cast(logits, tf.float32)
    targets, mask = classification_targets(labels, task, uncertainty_policy)
    if task == "multiclass":
        num_classes = tf.shape(logits)[-1]
        onehot = tf.one_hot(targets, num_classes)
        if label_smoothing:
            onehot = onehot * (1.0 - label_smoothing) + label_smoothing / tf.cast(
                num_classes, tf.float32)
        per_example = tf.nn.softmax_cross_entropy_with_logits(labels=onehot, logits=logits)
    else:
        per_example = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    return tf.math.divide_no_nan(tf.reduce_sum(per_example * mask), tf.reduce_sum(mask))


@keras.saving.register_keras_serializable(package="micle_tf")
class ClassifierModel(keras.Model):
    """Encoder (+ projection layers up to `ft_proj_selector`) + linear head."""

    def __init__(self, encoder, num_classes, task="multiclass", projection_head=None,
                 ft_proj_selector=0, uncertainty_policy="ignore", label_smoothing=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if ft_proj_selector and projection_head is None:
            raise ValueError("ft_proj_selector > 0 needs the projection head")
        self.encoder = encoder
        self.projection_head = projection_head
        self.ft_proj_selector = int(ft_proj_selector)
        self.num_classes = int(num_classes)
        self.task = task
        self.uncertainty_policy = uncertainty_policy
        self.label_smoothing = float(label_smoothing)
        self.head = keras.layers.Dense(self.num_classes, name="head_supervised", dtype="float32")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")

    def embed(self, images, training=False):
        features = self.encoder(images, training=training)
        if self.ft_proj_selector:
            _, hiddens = self.projection_head(features, training=training)
            features = select_hidden(hiddens, self.ft_proj_selector)
        return tf.cast(features, tf.float32)

    def call(self, images, training=False):
        embedding = self.embed(images, training=training)
        return {"logits": self.head(embedding), "embedding": embedding}

    def probabilities(self, logits):
        return tf.nn.softmax(logits) if self.task == "multiclass" else tf.nn.sigmoid(logits)

    def build_for(self, image_size, channels=3):
        images = tf.zeros([2, image_size, image_size, channels], self.compute_dtype)
        self.head(self.embed(images, training=False))
        self.built = True
        return self

    def build(self, input_shape):
        self.build_for(int(input_shape[1]), int(input_shape[-1]))

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def _step_outputs(self, data, training):
        logits = self(data["image"], training=training)["logits"]
        loss = classification_loss(logits, data["label"], self.task, self.uncertainty_policy,
                                   self.label_smoothing)
        targets, mask = classification_targets(data["label"], self.task,
                                               self.uncertainty_policy)
        if self.task == "multiclass":
            correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), targets),
                              tf.float32)
        else:
            correct = tf.cast(tf.equal(tf.cast(logits > 0, tf.float32), targets), tf.float32)
        accuracy = tf.math.divide_no_nan(tf.reduce_sum(correct * mask), tf.reduce_sum(mask))
        return loss, accuracy, tf.reduce_sum(mask)

    def train_step(self, data):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss, accuracy, weight = self._step_outputs(data, training=True)
            scaled = loss / replicas
            if hasattr(self.optimizer, "scale_loss"):
                scaled = self.optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        return self._update(loss, accuracy, weight)

    def test_step(self, data):
        return self._update(*self._step_outputs(data, training=False))

    def _update(self, loss, accuracy, weight):
        self.loss_tracker.update_state(loss, sample_weight=weight)
        self.accuracy_tracker.update_state(accuracy, sample_weight=weight)
        return {m.name: m.result() for m in self.metrics}

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            projection_head=(keras.saving.serialize_keras_object(self.projection_head)
                             if self.projection_head is not None else None),
            num_classes=self.num_classes, task=self.task,
            ft_proj_selector=self.ft_proj_selector, uncertainty_policy=self.uncertainty_policy,
            label_smoothing=self.label_smoothing)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        if config.get("projection_head") is not None:
            config["projection_head"] = keras.saving.deserialize_keras_object(
                config["projection_head"])
        return cls(**config)

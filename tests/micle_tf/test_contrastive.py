"""ContrastiveModel: probe masking, device augmentation, and 2 replicas == 1 device (its config
round trip: test_serialization.py)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from micle_tf import config as C
from micle_tf.models.contrastive import ContrastiveModel, _probe_loss_and_accuracy
from micle_tf.models.factory import build_encoder, build_projection_head
from micle_tf.optimizers import build_optimizer

TINY = C.ModelConfig(backbone="resnet18", width_multiplier=0.125, image_size=16,
                     proj_out_dim=8, synchronized_bn=True)


def tiny_model(num_classes=3, cfg=TINY, seed=0):
    keras.utils.set_random_seed(seed)
    model = ContrastiveModel(build_encoder(cfg), build_projection_head(cfg), temperature=0.2,
                             method="micle", num_classes=num_classes)
    return model.build_for(cfg.image_size)


def batch(n=8, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"view1": rng.random((n, size, size, 3), dtype=np.float32),
            "view2": rng.random((n, size, size, 3), dtype=np.float32),
            "label": np.array([0, 1, 2, -1, 1, 0, -1, 2][:n], np.int32)}


def test_probe_loss_ignores_unlabelled_entries():
    logits = tf.constant([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    labels = tf.constant([0, 2, -1])
    loss, acc, weight = _probe_loss_and_accuracy(logits, labels, "multiclass")
    ce0 = -np.log(np.exp(2) / (np.exp(2) + 2))
    ce1 = -np.log(1 / (np.exp(1) + 2))
    assert weight.numpy() == 2
    np.testing.assert_allclose(loss.numpy(), (ce0 + ce1) / 2, rtol=1e-6)
    assert acc.numpy() == 0.5
    ml_logits = tf.constant([[1.0, -1.0, 3.0]])
    ml_labels = tf.constant([[1, -1, -2]])  # only the first entry is present
    loss, acc, weight = _probe_loss_and_accuracy(ml_logits, ml_labels, "multilabel")
    np.testing.assert_allclose(loss.numpy(), np.log1p(np.exp(-1.0)), rtol=1e-6)
    assert weight.numpy() == 1 and acc.numpy() == 1.0


def _one_step(strategy, data, global_batch):
    with strategy.scope():
        model = tiny_model()
        model.compile(optimizer=build_optimizer("lars", 0.5, weight_decay=1e-4))
    ds = tf.data.Dataset.from_tensor_slices(data).batch(global_batch).repeat()
    hist = model.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)
    return hist.history, model


def test_two_replicas_match_one_device(two_replica_strategy):
    """Same global batch: identical loss, weights after one LARS step and BN statistics
    (synchronized BN, negatives gathered across replicas, loss divided by replicas)."""
    data = batch(8)
    h1, m1 = _one_step(tf.distribute.get_strategy(), data, 8)
    h2, m2 = _one_step(two_replica_strategy, data, 8)
    np.testing.assert_allclose(h1["contrastive_loss"], h2["contrastive_loss"], rtol=1e-5)
    names = [v.path for v in m1.variables]
    for name, a, b in zip(names, m1.get_weights(), m2.get_weights()):
        # float32 reduction order differs across replicas; LARS amplifies it slightly
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5, err_msg=name)
    moving = [v for v in m2.variables if "moving_mean" in v.path]
    assert moving and any(np.abs(v.numpy()).max() > 0 for v in moving)  # stats did update


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="unknown pretraining method"):
        ContrastiveModel(build_encoder(TINY), build_projection_head(TINY), method="byol")


def test_device_augment_finishes_the_host_pipeline_views(ph2_records):
    """Same seed: a batch augmented wholly on the host equals the device-placed batch after
    the model's photometric step; the pairs picked are the same."""
    from data_pipelines import reader
    from micle_tf import augment

    # colour jitter given explicitly: the 32-px default (crop + flip) has nothing to place
    def first_batch(placement):
        ds = reader.make_dataset(ph2_records, "train", "micle", 16, 32, seed=5,
                                 augment_fn=augment.build_augment("derm", 32, placement,
                                                                  color_jitter_strength=1.0))
        return next(iter(ds))

    host, device = first_batch("host"), first_batch("device")
    assert "view1_augment_params" not in host
    post = augment.post_crop("derm", 32, 1.0)
    assert device["view1_augment_params"].shape == (16, post.num_params)
    np.testing.assert_array_equal(host["image_indices"], device["image_indices"])
    model = tiny_model(cfg=C.ModelConfig(backbone="resnet18", width_multiplier=0.125,
                                         image_size=32, proj_out_dim=8))
    model.device_augment, model._post_crop = "derm", post
    v1, v2 = model._views(device, training=True)
    np.testing.assert_allclose(v1, host["view1"], atol=2e-5)
    np.testing.assert_allclose(v2, host["view2"], atol=2e-5)
    assert np.abs(device["view1"] - host["view1"]).max() > 0.05  # the step did real work


def test_device_augment_round_trips_and_refuses_mismatched_batches():
    model = ContrastiveModel(build_encoder(TINY), build_projection_head(TINY),
                             device_augment="cxr").build_for(TINY.image_size)
    clone = ContrastiveModel.from_config(model.get_config())
    assert clone.device_augment == "cxr" and clone._post_crop.jitter_ops == (
        "brightness", "contrast")
    data = batch(4)
    with pytest.raises(ValueError, match="batch has no view1_augment_params"):
        model.compute_losses(data, training=True)
    model.compute_losses(data, training=False)  # evaluation batches need no params
    params = np.zeros((4, model._post_crop.num_params), np.float32)
    with pytest.raises(ValueError, match="model has no device_augment"):
        tiny_model().compute_losses(dict(data, view1_augment_params=params,
                                         view2_augment_params=params))


def test_train_step_reports_learning_health_metrics():
    """alignment / uniformity (no gradient) and the chance levels of the batch are metrics, so
    they reach the fit history, the progress bar and TensorBoard."""
    from micle_tf.losses import alignment_uniformity
    model = tiny_model()
    model.compile(optimizer=build_optimizer("lars", 0.0, weight_decay=0.0))
    data = batch(8)
    _, values = model.compute_losses(data, training=False)
    z = model(np.concatenate([data["view1"], data["view2"]]))["projection"]
    align, unif = alignment_uniformity(z[:8], z[8:])
    np.testing.assert_allclose(float(values["alignment"]), float(align), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(values["uniformity"]), float(unif), rtol=1e-4, atol=1e-5)
    hist = model.fit(tf.data.Dataset.from_tensor_slices(data).batch(8).repeat(),
                     steps_per_epoch=2, epochs=1, verbose=0).history
    for name in ("alignment", "uniformity", "chance_contrastive_accuracy",
                 "uniform_contrastive_loss"):
        assert name in hist and np.isfinite(hist[name][-1]), name
    np.testing.assert_allclose(hist["chance_contrastive_accuracy"][-1], 1 / 15, rtol=1e-6)
    np.testing.assert_allclose(hist["uniform_contrastive_loss"][-1], 2 * np.log(15), rtol=1e-6)
    assert 0.0 <= hist["alignment"][-1] <= 4.0 and -8.0 <= hist["uniformity"][-1] <= 0.0

"""One training step of each model under `mixed_bfloat16` (and `mixed_float16`, whose compile
wraps the optimizer in a loss-scale optimizer): bfloat16 compute, float32 variables, the loss goes
through `optimizer.scale_loss`, the update is finite and changes the weights."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from micle_tf import config as config_lib
from micle_tf.models.classifier import ClassifierModel
from micle_tf.models.contrastive import ContrastiveModel
from micle_tf.models.factory import build_encoder, build_projection_head
from micle_tf.optimizers import build_optimizer
from micle_tf.training.distribute import set_mixed_precision

TINY = config_lib.ModelConfig(backbone="resnet18", width_multiplier=0.125, image_size=16,
                              proj_out_dim=8, num_proj_layers=2)


@pytest.fixture(params=["bfloat16", "float16"])
def policy(request):
    set_mixed_precision(request.param)
    try:
        yield "mixed_" + request.param
    finally:
        set_mixed_precision(None)


def _images(n, seed):
    return np.random.default_rng(seed).random((n, 16, 16, 3), dtype=np.float32)


def _contrastive():
    return ContrastiveModel(build_encoder(TINY), build_projection_head(TINY), num_classes=2)


def _classifier():
    return ClassifierModel(build_encoder(TINY), 2)


CASES = {
    "contrastive": (_contrastive, lambda: {"view1": _images(4, 0), "view2": _images(4, 1),
                                           "label": np.array([0, 1, -1, 1], np.int32)}),
    "classifier": (_classifier, lambda: {"image": _images(4, 2),
                                         "label": np.array([0, 1, 1, 0], np.int32)}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_train_step_scales_the_loss_under_mixed_precision(name, policy, monkeypatch):
    make_model, make_batch = CASES[name]
    keras.utils.set_random_seed(0)
    model = make_model().build_for(TINY.image_size)
    assert model.compute_dtype == policy.split("_")[1]
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    model.compile(optimizer=build_optimizer("lars", 0.1, weight_decay=1e-6))
    model.optimizer.build(model.trainable_variables)
    if policy == "mixed_float16":  # compile adds dynamic loss scaling for float16
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

    scaled = []
    scale_loss = model.optimizer.scale_loss

    def recording(loss):
        out = scale_loss(loss)
        scaled.append((float(loss), float(out)))
        return out

    monkeypatch.setattr(model.optimizer, "scale_loss", recording)
    before = [v.numpy().copy() for v in model.trainable_variables]
    scale = float(model.optimizer.dynamic_scale) if policy == "mixed_float16" else 1.0
    logs = model.train_step(make_batch())
    loss = float(logs["loss"])
    assert np.isfinite(loss) and len(scaled) == 1
    unscaled, out = scaled[0]
    assert out == pytest.approx(unscaled * scale, rel=1e-3)
    after = [v.numpy() for v in model.trainable_variables]
    assert all(np.isfinite(a).all() for a in after)
    if policy == "mixed_bfloat16":  # (float16: a first step that overflows is skipped)
        assert any(not np.array_equal(a, b) for a, b in zip(after, before))
    assert all(v.dtype == tf.float32 for v in model.trainable_variables)

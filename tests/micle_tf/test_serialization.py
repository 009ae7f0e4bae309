"""Every registered micle_tf model and layer goes through the one Keras serialization round trip
(tests/helpers.py `run_serialization_test`): plain-JSON config, `from_config(get_config())` and
the Keras registry give an equal config, the same weights and the same outputs.

Runs are saved as dataclass JSON + `tf.train.Checkpoint`, not `.keras` files; these configs are
what `keras.saving` would use, and what a `.keras` export of a model would need."""
import numpy as np
import pytest

from micle_tf.models import heads, resnet
from micle_tf.models.classifier import ClassifierModel
from micle_tf.models.contrastive import ContrastiveModel
from tests.helpers import run_serialization_test

SIZE = 16


def _x(*shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _tiny_resnet(**kw):
    return resnet.build_resnet(18, width_multiplier=0.125, image_size=SIZE, name="encoder", **kw)


def _built(obj, x):
    obj.build_for(x.shape[1])
    return obj(x, training=False)


LAYERS = {
    "BatchNormRelu": (lambda: resnet.BatchNormRelu(relu=False, init_zero=True, center=False,
                                                   momentum=0.99), _x(2, 4, 4, 8)),
    "FixedPadding": (lambda: resnet.FixedPadding(3), _x(2, 5, 5, 3)),
    "Conv2dFixedPadding": (lambda: resnet.Conv2dFixedPadding(8, 3, 2), _x(2, 8, 8, 3)),
    "SKConv2D": (lambda: resnet.SKConv2D(8, 2, 0.0625, min_dim=4), _x(2, 8, 8, 4)),
    "ResidualBlock": (lambda: resnet.ResidualBlock(8, 2, use_projection=True), _x(2, 8, 8, 4)),
    "BottleneckBlock": (lambda: resnet.BottleneckBlock(4, 1, use_projection=True,
                                                       sk_ratio=0.0625), _x(2, 8, 8, 4)),
    "BlockGroup": (lambda: resnet.BlockGroup(4, "basic", 2, 2, bn_epsilon=1e-3), _x(2, 8, 8, 4)),
    "ResNet": (lambda: resnet.ResNet(18, width_multiplier=0.125, small_image_stem=True,
                                     bn_momentum=0.99, name="backbone"), _x(2, SIZE, SIZE, 3)),
    "ResNet-sk-frozen": (lambda: resnet.ResNet(50, width_multiplier=0.0625, sk_ratio=0.0625,
                                               fine_tune_after_block=2), _x(2, SIZE, SIZE, 3)),
    "LinearLayer-bn": (lambda: heads.LinearLayer(None, use_bias=False, use_bn=True), _x(2, 6)),
    "LinearLayer-bias": (lambda: heads.LinearLayer(5, use_bias=True), _x(2, 6)),
    "ProjectionHead": (lambda: heads.ProjectionHead(3, proj_out_dim=8, hidden_dim=12,
                                                    bn_epsilon=1e-3, name="proj"), _x(2, 16)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_round_trip(name):
    make, x = LAYERS[name]
    run_serialization_test(make(), x)


def test_contrastive_model_round_trip():
    model = ContrastiveModel(_tiny_resnet(), heads.ProjectionHead(2, proj_out_dim=8),
                             temperature=0.2, method="micle", num_classes=3,
                             task="multiclass", device_augment="derm", image_size=SIZE,
                             color_jitter_strength=0.5, name="contrastive")
    revived = run_serialization_test(model, _x(2, SIZE, SIZE, 3), call=_built)
    assert (revived.method, revived.num_classes, revived.image_size,
            revived.color_jitter_strength) == ("micle", 3, SIZE, 0.5)
    assert revived.probe is not None and revived._post_crop is not None


def test_classifier_model_round_trip():
    model = ClassifierModel(_tiny_resnet(fine_tune_after_block=4), 3, task="multilabel",
                            projection_head=heads.ProjectionHead(2, proj_out_dim=8),
                            ft_proj_selector=1, uncertainty_policy="ones", label_smoothing=0.1,
                            name="classifier")
    revived = run_serialization_test(model, _x(2, SIZE, SIZE, 3), call=_built)
    assert revived.ft_proj_selector == 1 and revived.encoder.fine_tune_after_block == 4
    plain = ClassifierModel(_tiny_resnet(), 2, name="classifier")
    run_serialization_test(plain, _x(2, SIZE, SIZE, 3), call=_built)


def test_top_level_configs_carry_the_keras_base_config():
    """get_config is super().get_config() + the model's arguments: name, trainable, dtype."""
    for model in (resnet.ResNet(18, width_multiplier=0.125, name="r"),
                  ContrastiveModel(_tiny_resnet(), heads.ProjectionHead(1), name="c"),
                  ClassifierModel(_tiny_resnet(), 2, name="k")):
        config = model.get_config()
        assert {"name", "trainable", "dtype"} <= set(config), type(model).__name__
        assert config["name"] == model.name

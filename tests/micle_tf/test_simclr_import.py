"""google-research/simclr TF2 checkpoint import (micle_tf.models.simclr_import).

The ground truth of the upstream layout is the pair of key lists `r50_1x_sk0.txt` and
`r50_2x_sk0.0625.txt` (what `tf.train.list_variables` prints for checkpoints that code writes),
looked up in $SIMCLR_KEYS_DIR, then tests/micle_tf/data/simclr_tf2_checkpoint_keys/, then
/work/shared/simclr_tf2_checkpoint_keys/; our writer must produce exactly those keys and shapes.
"""
import os

import numpy as np
import pytest
import tensorflow as tf

from micle_tf.models import resnet as resnet_lib
from micle_tf.models import simclr_import
from micle_tf.models.heads import ProjectionHead
from micle_tf.models.resnet import ResNet
from micle_tf.rundir import load_encoder_weights
from tests.helpers import write_simclr_checkpoint

# Copies of ../shared/simclr_tf2_checkpoint_keys (the upstream layout's ground truth).
KEY_DIR = os.path.join(os.path.dirname(__file__), "data", "simclr_tf2_checkpoint_keys")
SUFFIX = simclr_import.VALUE_SUFFIX


def _reference(name):
    """{key: shape} of an upstream key list, without global_step / supervised head / optimizer."""
    path = os.path.join(KEY_DIR, name)
    out = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            key, shape = line.strip().split(" ", 1)
            if (key.startswith("global_step") or key.startswith("model/supervised_head")
                    or "OPTIMIZER_SLOT" in key or key.startswith("optimizer")):
                continue
            out[key] = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
    return out


def _diff(ours, ref):
    return {"only_ours": sorted(set(ours) - set(ref))[:10],
            "only_upstream": sorted(set(ref) - set(ours))[:10],
            "shapes": [(k, ours[k], ref[k]) for k in ours if k in ref and ours[k] != ref[k]][:10]}


def _randomize(variables, seed):
    """Random values everywhere (BN variances positive), so equality checks mean something."""
    rng = np.random.default_rng(seed)
    for v in variables:
        shape = tuple(v.shape)
        if "moving_variance" in v.path:
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        v.assign(value.astype(v.dtype))


def _cheap(monkeypatch):
    """Zero conv initialisers: shapes are all a layout test needs (saves ~10 s of RNG)."""
    monkeypatch.setattr(resnet_lib, "_conv_initializer", lambda: "zeros")


@pytest.fixture(scope="module")
def r50_1x_checkpoint(tmp_path_factory):
    """An R50 1x + 3-layer head written in the simclr layout, plus a supervised head."""
    enc = resnet_lib.build_resnet(50, width_multiplier=1, image_size=224)
    head = ProjectionHead(num_proj_layers=3, proj_out_dim=128)
    enc.build((None, 64, 64, 3))  # parameter shapes do not depend on the image size
    head.build((None, enc.output_dim))
    path = str(tmp_path_factory.mktemp("simclr_r50_1x") / "ckpt-100")
    extra = {"model/supervised_head/linear_layer/dense/kernel": np.zeros([2048, 10], np.float32),
             "model/supervised_head/linear_layer/dense/bias": np.zeros([10], np.float32)}
    prefix = write_simclr_checkpoint(enc, path, head, global_step=100,
                                                   extra=extra)
    return prefix, enc


def test_writer_layout_equals_upstream_r50_1x(r50_1x_checkpoint):
    ref = _reference("r50_1x_sk0.txt")
    listed = dict(tf.train.list_variables(r50_1x_checkpoint[0]))
    written = {k: list(s) for k, s in listed.items()
               if k.startswith("model/") and not k.startswith("model/supervised_head")}
    assert written == ref, _diff(written, ref)
    assert "global_step" + SUFFIX in listed
    assert len(ref) == 279  # 265 backbone + 14 projection-head variables


def test_layout_equals_upstream_r50_2x_sk(monkeypatch):
    """R50 2x with selective kernels (SimCLRv2 r50_2x_sk1): ResNet-D stem and shortcuts,
    SK convs. Variables only (no forward pass), float16 and zero init to keep it cheap; the
    writer saves exactly `simclr_layout` (checked on the 1x model above and below)."""
    ref = _reference("r50_2x_sk0.0625.txt")
    _cheap(monkeypatch)
    enc = ResNet(50, width_multiplier=2, sk_ratio=0.0625, dtype="float16")
    head = ProjectionHead(num_proj_layers=3, proj_out_dim=128, dtype="float16")
    layout = simclr_import.simclr_layout(enc, head)
    assert layout == ref, _diff(layout, ref)
    desc = simclr_import.describe_simclr_checkpoint(
        {k[:-len(SUFFIX)]: s for k, s in ref.items()})
    assert desc["depth"] == 50 and desc["width_multiplier"] == 2 and desc["sk"]
    assert desc["proj_layers"] == 3 and desc["proj_out_dim"] == 128


def test_writer_writes_exactly_the_layout_basic_blocks(tmp_path):
    """ResNet-18 with SK: simclr's ResidualBlock names (conv2d_bn_layers, shortcut_layers)."""
    enc = ResNet(18, width_multiplier=0.125, sk_ratio=0.0625)
    head = ProjectionHead(num_proj_layers=2, proj_out_dim=16)
    prefix = write_simclr_checkpoint(enc, str(tmp_path / "ckpt-0"), head)
    listed = {k: list(s) for k, s in tf.train.list_variables(prefix) if k.startswith("model/")}
    assert listed == simclr_import.simclr_layout(enc, head)
    assert any("/conv2d_bn_layers/" in k for k in listed)
    assert ("model/resnet_model/block_groups/1/layers/0/shortcut_layers/2/conv2d/kernel"
            + SUFFIX) in listed  # ResNet-D shortcut: pad, avg-pool, conv, bn
    assert not any("conv_relu_dropblock_layers" in k for k in listed)


@pytest.mark.parametrize("depth,sk,small", [(50, 0.0625, False), (18, 0.0, True)])
def test_round_trip_identical_weights_and_outputs(tmp_path, depth, sk, small):
    kw = dict(width_multiplier=0.125, sk_ratio=sk, small_image_stem=small)
    x = tf.random.stateless_uniform([2, 32, 32, 3], seed=[1, 2])
    enc_a, head_a = ResNet(depth, **kw), ProjectionHead(3, 16)
    enc_a.build((None, 32, 32, 3))
    head_a.build((None, enc_a.output_dim))
    _randomize(enc_a.weights + head_a.weights, seed=depth)
    prefix = write_simclr_checkpoint(enc_a, str(tmp_path / "ckpt-7"), head_a)

    enc_b, head_b = ResNet(depth, **kw), ProjectionHead(3, 16)
    enc_b.build((None, 32, 32, 3))
    head_b.build((None, enc_b.output_dim))
    summary = simclr_import.load_simclr_encoder(enc_b, str(tmp_path), projection_head=head_b)
    assert summary["checkpoint"] == prefix
    assert summary["assigned"] == len(enc_b.weights) + len(head_b.weights)
    assert summary["head_variables"] == len(head_b.weights)
    for va, vb in zip(enc_a.weights + head_a.weights, enc_b.weights + head_b.weights):
        assert va.shape == vb.shape
        assert np.array_equal(va.numpy(), vb.numpy()), va.path
    fa, fb = enc_a(x, training=False), enc_b(x, training=False)
    np.testing.assert_array_equal(fa.numpy(), fb.numpy())
    np.testing.assert_array_equal(head_a(fa, training=False)[0].numpy(),
                                  head_b(fb, training=False)[0].numpy())

    # Encoder only: the checkpoint's head keys are skipped without complaint.
    _randomize(enc_b.weights, seed=99)
    summary = simclr_import.load_simclr_encoder(enc_b, prefix)
    assert summary["head_variables"] == 0 and summary["skipped_head_keys"] > 0
    for va, vb in zip(enc_a.weights, enc_b.weights):
        assert np.array_equal(va.numpy(), vb.numpy()), va.path


def test_r50_1x_loads_and_ignores_supervised_head(r50_1x_checkpoint):
    prefix, enc = r50_1x_checkpoint
    summary = simclr_import.load_simclr_encoder(enc, os.path.dirname(prefix))
    assert summary["encoder_variables"] == 265
    assert summary["skipped_head_keys"] == 14
    assert summary["ignored_keys"] == 3  # global_step + supervised head kernel/bias


def test_r50_1x_into_2x_raises_listing_unmatched(r50_1x_checkpoint, monkeypatch):
    _cheap(monkeypatch)
    enc = ResNet(50, width_multiplier=2, dtype="float16")
    with pytest.raises(ValueError) as err:
        simclr_import.load_simclr_encoder(enc, r50_1x_checkpoint[0])
    msg = str(err.value)
    assert "checkpoint: ResNet-50 width 1x, no SK" in msg
    assert "ours:       ResNet-50 width 2x, no SK" in msg
    assert "shape mismatches" in msg
    assert ("model/resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel: "
            "ours [7, 7, 3, 128], checkpoint [7, 7, 3, 64]") in msg


def test_mismatches_list_keys_and_leave_model_untouched(tmp_path):
    enc = ResNet(18, width_multiplier=0.125)
    prefix = write_simclr_checkpoint(enc, str(tmp_path / "ckpt-0"))
    # selective kernels / ResNet-D: stem and shortcut keys missing, plain ones unused
    sk = ResNet(18, width_multiplier=0.125, sk_ratio=0.0625)
    with pytest.raises(ValueError) as err:
        simclr_import.load_simclr_encoder(sk, prefix)
    msg = str(err.value)
    assert "of our variables have no checkpoint key" in msg
    assert "initial_conv_relu_max_pool/4/conv2d/kernel [3, 3, 4, 8]" in msg
    assert "left unused" in msg
    assert "block_groups/1/layers/0/shortcut_layers/1/bn/gamma [16]" in msg
    # other depth
    deeper = ResNet(34, width_multiplier=0.125)
    deeper.build((None, 32, 32, 3))
    before = [v.numpy().copy() for v in deeper.weights]
    with pytest.raises(ValueError, match="checkpoint: ResNet-18 width 0.125x") as err:
        simclr_import.load_simclr_encoder(deeper, prefix)
    assert "ours:       ResNet-34" in str(err.value)
    assert "block_groups/1/layers/2/" in str(err.value)  # R18 has 2 blocks there
    for b, v in zip(before, deeper.weights):
        assert np.array_equal(b, v.numpy())
    # a head asked for but absent from the checkpoint
    with pytest.raises(ValueError, match="no checkpoint key"):
        simclr_import.load_simclr_encoder(enc, prefix, projection_head=ProjectionHead(2, 8))


def test_not_a_simclr_checkpoint(tmp_path):
    ckpt = tf.train.Checkpoint(encoder=tf.Module())
    ckpt.encoder.w = tf.Variable([1.0])
    prefix = ckpt.write(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not a google-research/simclr TF2 checkpoint"):
        simclr_import.load_simclr_encoder(ResNet(18, width_multiplier=0.125), prefix)
    with pytest.raises(FileNotFoundError):
        simclr_import.load_simclr_encoder(ResNet(18, width_multiplier=0.125),
                                          str(tmp_path / "nothing"))


def test_load_encoder_weights_imagenet_simclr_prefix(tmp_path):
    x = tf.random.stateless_uniform([2, 32, 32, 3], seed=[3, 4])
    enc_a = ResNet(18, width_multiplier=0.125, sk_ratio=0.0625)
    enc_a.build((None, 32, 32, 3))
    _randomize(enc_a.weights, seed=5)
    prefix = write_simclr_checkpoint(enc_a, str(tmp_path / "simclr" / "ckpt-1"))
    enc_b = ResNet(18, width_multiplier=0.125, sk_ratio=0.0625)
    out = load_encoder_weights(enc_b, "imagenet_simclr:" + prefix)
    assert out == prefix  # returns the resolved checkpoint prefix, like the micle-tf path
    np.testing.assert_array_equal(enc_a(x).numpy(), enc_b(x).numpy())
    # the folder form works too
    load_encoder_weights(enc_b, "imagenet_simclr:" + str(tmp_path / "simclr"))

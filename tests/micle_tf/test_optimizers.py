"""LARS, the warmup-cosine schedule, lr scaling and build_optimizer."""
import math
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

from micle_tf.optimizers import (DEFAULT_EXCLUDE_FROM_WEIGHT_DECAY, LARS, WarmupCosineDecay,
                                 build_optimizer, scale_learning_rate)


@pytest.fixture(autouse=True)
def _distinct_collective_keys():
    """Own collective group key per MirroredStrategy (see test_losses.py)."""
    tf.distribute.MirroredStrategy._collective_key_base += 1000
    yield


def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, bias_initializer="ones", name="dense")(inputs)
    b = keras.layers.BatchNormalization(name="batch_normalization")(inputs)
    # Separate branches so that the bias gradient is not cancelled by the BN.
    out = keras.ops.sum(h * h, axis=-1) + keras.ops.sum(b * b * b, axis=-1)
    return keras.Model(inputs, out)


def _numpy_lars(w, g, v, lr, m, wd, eta, decay, adapt, nesterov=False, classic=True):
    """simclr's LARS update for one variable, in float64. Returns (w_new, v_new)."""
    w, g, v = (np.asarray(a, np.float64) for a in (w, g, v))
    if decay:
        g = g + wd * w
    w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
    if classic:
        tr = eta * w_norm / g_norm if (adapt and w_norm > 0 and g_norm > 0) else 1.0
        slr = lr * tr
        v_new = m * v + slr * g
        update = m * v_new + slr * g if nesterov else v_new
    else:
        v_new = m * v + g
        update = m * v_new + g if nesterov else v_new
        u_norm = np.linalg.norm(update)
        tr = eta * w_norm / u_norm if (adapt and w_norm > 0 and u_norm > 0) else 1.0
        update = lr * tr * update
    return w - update, v_new


@pytest.mark.parametrize("nesterov,classic", [(False, True), (True, True), (False, False)])
def test_lars_steps_match_numpy(nesterov, classic):
    model = _tiny_model()
    variables = model.trainable_variables
    paths = [v.path for v in variables]
    assert sorted(p.split("/")[-1] for p in paths) == ["beta", "bias", "gamma", "kernel"]
    k = [p.split("/")[-1] for p in paths].index("kernel")
    lr, m, wd, eta = 0.5, 0.9, 0.1, 0.01
    opt = LARS(lr, momentum=m, weight_decay=wd, trust_coefficient=eta, nesterov=nesterov,
               classic_momentum=classic)
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)

    ref_w = [v.numpy().astype(np.float64) for v in variables]
    ref_v = [np.zeros_like(w) for w in ref_w]
    flags = {"kernel": (True, True), "bias": (False, False),
             "gamma": (False, False), "beta": (False, False)}
    for _ in range(2):  # the second step exercises the momentum buffer
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x, training=True))
        grads = tape.gradient(loss, variables)
        before = [v.numpy() for v in variables]
        opt.apply(grads, variables)
        for i, (path, g) in enumerate(zip(paths, grads)):
            decay, adapt = flags[path.split("/")[-1]]
            ref_w[i], ref_v[i] = _numpy_lars(before[i], g.numpy(), ref_v[i], lr, m, wd, eta,
                                             decay, adapt, nesterov, classic)
            np.testing.assert_allclose(variables[i].numpy() - before[i],
                                       ref_w[i] - before[i], rtol=1e-5, atol=1e-7,
                                       err_msg=path)
            np.testing.assert_allclose(opt.momentums[i].numpy(), ref_v[i], rtol=1e-5,
                                       atol=1e-7, err_msg=path)
            assert np.abs(g.numpy()).max() > 1e-3, path  # every rule is exercised
        # The trust ratio and the decay really change the kernel's step.
        plain, _ = _numpy_lars(before[k], grads[k].numpy(), np.zeros_like(ref_v[k]), lr, m,
                               wd, eta, False, False, nesterov, classic)
        assert not np.allclose(plain, ref_w[k], rtol=1e-2)


def test_trust_ratio_falls_back_to_one_for_zero_weights():
    w = keras.Variable(np.zeros((2, 2), np.float32), name="kernel")
    opt = LARS(0.1, momentum=0.0, weight_decay=0.0)
    opt.apply([tf.ones((2, 2))], [w])
    np.testing.assert_allclose(w.numpy(), -0.1 * np.ones((2, 2)), rtol=1e-6)


def test_exclusion_decided_from_variable_paths():
    model = _tiny_model()
    opt = LARS(0.1, weight_decay=1e-4)
    opt.build(model.trainable_variables)
    names = [v.path.split("/")[-1] for v in model.trainable_variables]
    expected = {"kernel": True, "bias": False, "gamma": False, "beta": False}
    assert dict(zip(names, opt._lars_use_decay)) == expected
    assert dict(zip(names, opt._lars_use_adaptation)) == expected

    def path_flags(path, **kwargs):
        var = SimpleNamespace(path=path, name=path.split("/")[-1])  # only .path is read
        o = LARS(0.1, weight_decay=1e-4, **kwargs)
        return o.use_weight_decay_for(var), o.use_layer_adaptation_for(var)

    assert path_flags("net/gamma_net/kernel") == (True, True)
    assert path_flags("net/conv1_bn/gamma") == (False, False)
    assert path_flags("net/bn2/scale") == (False, False)
    assert path_flags("net/subnet/kernel") == (True, True)
    assert path_flags("net/dense/bias") == (False, False)
    assert path_flags("net/layer_normalization/beta") == (False, False)
    assert path_flags("resnet/batch_normalization_3/moving_mean") == (False, False)
    # Separate adaptation list; empty decay list decays everything.
    assert path_flags("dense/bias", exclude_from_weight_decay=[],
                      exclude_from_layer_adaptation=["bias"]) == (True, False)
    assert path_flags("head_supervised/kernel",
                      exclude_from_weight_decay=["head_supervised"]) == (False, False)
    # No decay at all when weight_decay == 0; no adaptation when trust_coefficient is None.
    var = keras.Variable(np.ones(2, np.float32), name="kernel")
    assert not LARS(0.1, weight_decay=0.0).use_weight_decay_for(var)
    assert not LARS(0.1, trust_coefficient=None).use_layer_adaptation_for(var)


def test_lars_config_round_trip():
    schedule = WarmupCosineDecay(1.2, 5, 50, end_learning_rate=0.01)
    opt = LARS(schedule, momentum=0.8, weight_decay=1e-6, trust_coefficient=0.002,
               exclude_from_weight_decay=["bias"], exclude_from_layer_adaptation=["bn"],
               classic_momentum=False, nesterov=True, name="my_lars", clipnorm=1.0)
    assert opt.weight_decay is None  # the base class's decoupled decay stays off
    config = opt.get_config()
    assert config["weight_decay"] == 1e-6
    clone = LARS.from_config(dict(config))  # from_config edits its argument
    assert clone.get_config() == config
    assert isinstance(clone._learning_rate, WarmupCosineDecay)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, LARS) and restored.get_config() == config
    # Default lists resolve at construction and round-trip as lists.
    default = LARS(0.1)
    assert default.get_config()["exclude_from_weight_decay"] == list(
        DEFAULT_EXCLUDE_FROM_WEIGHT_DECAY)
    assert LARS.from_config(default.get_config()).get_config() == default.get_config()


def test_warmup_cosine_values():
    peak, warmup, total, end = 2.0, 10, 30, 0.1
    s = WarmupCosineDecay(peak, warmup, total, end_learning_rate=end)
    expected = {
        0: 0.0,
        5: peak * 5 / warmup,
        10: peak,
        20: end + (peak - end) * 0.5 * (1 + math.cos(math.pi * 0.5)),
        25: end + (peak - end) * 0.5 * (1 + math.cos(math.pi * 0.75)),
        30: end,
        100: end,
    }
    for step, value in expected.items():
        np.testing.assert_allclose(float(s(step)), value, rtol=1e-6, atol=1e-7,
                                   err_msg=str(step))
    # int64 step tensors (optimizer.iterations) work too.
    np.testing.assert_allclose(float(s(tf.constant(5, tf.int64))), 1.0, rtol=1e-6)
    # end_learning_rate=0 equals simclr's CosineDecay(scaled_lr, total - warmup) branch.
    s0 = WarmupCosineDecay(peak, warmup, total)
    cosine = keras.optimizers.schedules.CosineDecay(peak, total - warmup)
    for step in (10, 13, 22, 29, 30, 40):
        np.testing.assert_allclose(float(s0(step)), float(cosine(step - warmup)), rtol=1e-5,
                                   atol=1e-7)
    # No warmup: starts at the peak.
    np.testing.assert_allclose(float(WarmupCosineDecay(1.0, 0, 10)(0)), 1.0)
    with pytest.raises(ValueError):
        WarmupCosineDecay(1.0, 10, 5)


def test_warmup_cosine_config_round_trip():
    s = WarmupCosineDecay(0.3, 7, 70, end_learning_rate=0.003)
    clone = WarmupCosineDecay.from_config(s.get_config())
    assert clone.get_config() == s.get_config()
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(s))
    assert isinstance(restored, WarmupCosineDecay)
    np.testing.assert_allclose(float(restored(30)), float(s(30)))


def test_scale_learning_rate():
    assert scale_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scale_learning_rate(0.3, 256, "linear") == pytest.approx(0.3)
    assert scale_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    with pytest.raises(ValueError, match="cubic"):
        scale_learning_rate(0.1, 256, "cubic")


def test_build_optimizer():
    lars = build_optimizer("lars", 0.1, weight_decay=1e-6, momentum=0.8)
    assert isinstance(lars, LARS)
    assert (lars.trust_coefficient, lars.lars_weight_decay, lars.momentum) == (0.001, 1e-6, 0.8)

    sgd = build_optimizer("SGD", 0.1, weight_decay=1e-4)
    assert isinstance(sgd, LARS) and sgd.trust_coefficient is None
    assert sgd.lars_weight_decay == 1e-4

    model = _tiny_model()
    by_name = {v.path.split("/")[-1]: v for v in model.trainable_variables}
    kernel, bias, gamma, beta = (by_name[n] for n in ("kernel", "bias", "gamma", "beta"))
    adamw = build_optimizer("adam", 1e-3, weight_decay=1e-2)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 1e-2
    assert adamw._use_weight_decay(kernel)
    assert not any(adamw._use_weight_decay(v) for v in (bias, gamma, beta))
    adam = build_optimizer("adam", 1e-3)
    assert type(adam) is keras.optimizers.Adam

    with pytest.raises(ValueError, match="rmsprop"):
        build_optimizer("rmsprop", 0.1)


def test_sgd_mode_is_momentum_sgd_with_coupled_l2():
    w = keras.Variable(np.array([1.0, -2.0], np.float32), name="kernel")
    opt = build_optimizer("sgd", 0.1, weight_decay=0.5, momentum=0.9)
    g = np.array([0.2, 0.4], np.float32)
    opt.apply([tf.constant(g)], [w])
    v1 = 0.1 * (g + 0.5 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(w.numpy(), np.array([1.0, -2.0]) - v1, rtol=1e-6)


def _fit_model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, name="dense"),
        keras.layers.BatchNormalization(synchronized=True, name="batch_normalization"),
        keras.layers.Dense(1, name="out"),
    ])
    model.compile(optimizer=LARS(0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.01),
                  loss="mse")
    return model


def test_lars_in_fit_two_replicas_matches_single_device(two_replica_strategy):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype(np.float32)
    y = rng.normal(size=(16, 1)).astype(np.float32)

    single = _fit_model(seed=3)
    init = single.get_weights()
    with two_replica_strategy.scope():
        dist = _fit_model(seed=3)
    dist.set_weights(init)

    single.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    dist.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert int(dist.optimizer.iterations.numpy()) == 2

    for w0, ws, wd, var in zip(init, single.get_weights(), dist.get_weights(), single.weights):
        assert not np.allclose(w0, ws) or "moving" in var.path, var.path
        np.testing.assert_allclose(wd, ws, rtol=1e-5, atol=1e-6, err_msg=var.path)

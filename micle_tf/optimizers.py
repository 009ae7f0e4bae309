"""Optimizers and learning-rate schedules for SimCLR / MICLe (Keras 3).

* :class:`LARS` -- Layer-wise Adaptive Rate Scaling (You et al. 2017), a port of
  google-research/simclr ``tf2/lars_optimizer.py`` to the Keras 3 optimizer API.
* :class:`WarmupCosineDecay` -- linear warmup then cosine decay (simclr
  ``tf2/model.py::WarmUpAndCosineDecay``, with the lr scaling pulled out into
  :func:`scale_learning_rate`).
* :func:`scale_learning_rate` -- SimCLR's 'linear' / 'sqrt' batch-size scaling.
* :func:`build_optimizer` -- 'lars' / 'sgd' / 'adam' by name.
"""
import math
import re

import keras
from keras import ops

__all__ = [
    "DEFAULT_EXCLUDE_FROM_WEIGHT_DECAY",
    "LARS",
    "LR_SCALINGS",
    "OPTIMIZERS",
    "WarmupCosineDecay",
    "build_optimizer",
    "scale_learning_rate",
]

OPTIMIZERS = ("lars", "sgd", "adam")  # build_optimizer names (--optimizer)
LR_SCALINGS = ("linear", "sqrt")  # scale_learning_rate modes (--learning_rate_scaling)

# Regular expressions (searched with ``re.search``) matched against each variable's
# ``.path`` (Keras 3, e.g. "sequential/batch_normalization/gamma") or, for raw
# tf.Variables, its ``.name``. Covers Keras BatchNormalization (variables named
# gamma / beta / moving_*, also LayerNormalization's gamma / beta; matched as the
# last path component so e.g. a layer called "gamma_net" is not caught), layers
# named "batch_normalization*", "bn*" or "*_bn*", and every path containing "bias".
# This is the SimCLR recipe (simclr excludes ['batch_normalization', 'bias',
# 'head_supervised']; its supervised head is decayed through an explicit L2 loss
# instead, which is the training loop's business, not the optimizer's).
DEFAULT_EXCLUDE_FROM_WEIGHT_DECAY = (
    "batch_normalization",
    r"(^|[/_])bn\d*($|[/_])",
    "bias",
    r"(^|/)(gamma|beta|moving_mean|moving_variance)(:\d+)?$",
)


def _variable_path(variable):
    path = getattr(variable, "path", None)
    if path is None:
        path = variable.name
    return path


def _matches_any(patterns, path):
    return any(re.search(p, path) is not None for p in patterns)


@keras.saving.register_keras_serializable(package="micle_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling with classic momentum and COUPLED L2 decay.

    Per variable ``w`` with gradient ``g`` (classic momentum, simclr's default)::

        g  <- g + weight_decay * w                        (unless excluded from decay)
        tr  = eta * ||w|| / ||g||  if ||w|| > 0 and ||g|| > 0 else 1
                                                          (1 if excluded from adaptation)
        slr = lr * tr
        v  <- momentum * v + slr * g
        w  <- w - (momentum * v + slr * g  if nesterov else  v)

    With ``classic_momentum=False`` ("popular" momentum) the learning rate and trust
    ratio are applied after the momentum update:
    ``v <- m*v + g; u = (m*v + g if nesterov else v); tr = eta*||w||/||u||;
    w <- w - lr*tr*u``.

    The weight decay here is L2 added to the gradient (and therefore rescaled by the
    trust ratio), as in simclr. It is NOT Keras' decoupled ``weight_decay``: the base
    class's ``weight_decay`` is always None and the coefficient lives in
    ``self.lars_weight_decay`` (``get_config()["weight_decay"]``).

    Args:
      learning_rate: float, schedule or callable.
      momentum: momentum coefficient.
      weight_decay: coupled L2 coefficient.
      trust_coefficient: LARS ``eta``. ``None`` disables layer adaptation for every
        variable (plain momentum SGD with coupled L2 and the same exclusions).
      exclude_from_weight_decay: regexes (``re.search`` against ``variable.path``;
        plain substrings work) of variables excluded from weight decay. ``None`` ->
        :data:`DEFAULT_EXCLUDE_FROM_WEIGHT_DECAY` (BatchNorm and biases); ``[]``
        decays everything.
      exclude_from_layer_adaptation: same, for layer adaptation. ``None`` -> the
        (resolved) weight-decay exclusion list; ``[]`` adapts everything.
      classic_momentum: see above.
      nesterov: Nesterov momentum.
      name: optimizer name.
      **kwargs: other base-optimizer arguments (clipnorm, global_clipnorm, use_ema,
        gradient_accumulation_steps, ...).

    Exclusion is decided once per variable in :meth:`build` from its ``.path`` and
    stored in ``self._lars_use_decay`` / ``self._lars_use_adaptation`` (lists indexed
    like the momentum slots).
    """

    def __init__(
        self,
        learning_rate,
        momentum=0.9,
        weight_decay=0.0,
        trust_coefficient=0.001,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        classic_momentum=True,
        nesterov=False,
        name="lars",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        momentum = float(momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1], got {momentum}.")
        if weight_decay is None:
            weight_decay = 0.0
        if float(weight_decay) < 0.0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if trust_coefficient is not None and float(trust_coefficient) <= 0.0:
            raise ValueError(
                f"`trust_coefficient` must be > 0 or None, got {trust_coefficient}.")
        self.momentum = momentum
        self.lars_weight_decay = float(weight_decay)
        self.trust_coefficient = None if trust_coefficient is None else float(trust_coefficient)
        if exclude_from_weight_decay is None:
            exclude_from_weight_decay = DEFAULT_EXCLUDE_FROM_WEIGHT_DECAY
        self.lars_exclude_from_weight_decay = list(exclude_from_weight_decay)
        if exclude_from_layer_adaptation is None:
            exclude_from_layer_adaptation = self.lars_exclude_from_weight_decay
        self.lars_exclude_from_layer_adaptation = list(exclude_from_layer_adaptation)
        self.classic_momentum = bool(classic_momentum)
        self.nesterov = bool(nesterov)

    # -- per-variable policy -------------------------------------------------------
    def use_weight_decay_for(self, variable):
        """Whether coupled L2 decay applies to ``variable`` (by its ``.path``)."""
        if not self.lars_weight_decay:
            return False
        return not _matches_any(self.lars_exclude_from_weight_decay, _variable_path(variable))

    def use_layer_adaptation_for(self, variable):
        """Whether the LARS trust ratio applies to ``variable`` (by its ``.path``)."""
        if self.trust_coefficient is None:
            return False
        return not _matches_any(self.lars_exclude_from_layer_adaptation,
                                _variable_path(variable))

    # -- Keras 3 optimizer API -----------------------------------------------------
    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.momentums = self.add_optimizer_variables(var_list, "momentum")
        self._lars_use_decay = [self.use_weight_decay_for(v) for v in var_list]
        self._lars_use_adaptation = [self.use_layer_adaptation_for(v) for v in var_list]

    def _trust_ratio(self, w_norm, u_norm, dtype):
        eta = ops.cast(self.trust_coefficient, dtype)
        one = ops.cast(1.0, dtype)
        safe_u = ops.where(u_norm > 0, u_norm, one)
        return ops.where(w_norm > 0, ops.where(u_norm > 0, eta * w_norm / safe_u, one), one)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        m = ops.cast(self.momentum, dtype)
        grad = ops.cast(ops.convert_to_tensor(gradient), dtype)  # densifies IndexedSlices
        param = ops.convert_to_tensor(variable)
        v = self.momentums[index]

        if self._lars_use_decay[index]:
            grad = grad + ops.cast(self.lars_weight_decay, dtype) * param
        adapt = self._lars_use_adaptation[index]

        if self.classic_momentum:
            scaled_lr = lr
            if adapt:
                scaled_lr = lr * self._trust_ratio(ops.norm(ops.reshape(param, [-1])),
                                                   ops.norm(ops.reshape(grad, [-1])), dtype)
            next_v = m * v + scaled_lr * grad
            update = m * next_v + scaled_lr * grad if self.nesterov else next_v
        else:
            next_v = m * v + grad
            update = m * next_v + grad if self.nesterov else next_v
            scaled_lr = lr
            if adapt:
                scaled_lr = lr * self._trust_ratio(ops.norm(ops.reshape(param, [-1])),
                                                   ops.norm(ops.reshape(update, [-1])), dtype)
            update = scaled_lr * update
        self.assign(v, next_v)
        self.assign_sub(variable, update)

    def get_config(self):
        config = super().get_config()
        config.update({
            "momentum": self.momentum,
            "weight_decay": self.lars_weight_decay,  # coupled L2, not the base's
            "trust_coefficient": self.trust_coefficient,
            "exclude_from_weight_decay": list(self.lars_exclude_from_weight_decay),
            "exclude_from_layer_adaptation": list(self.lars_exclude_from_layer_adaptation),
            "classic_momentum": self.classic_momentum,
            "nesterov": self.nesterov,
        })
        return config


@keras.saving.register_keras_serializable(package="micle_tf")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to ``peak_learning_rate``, then cosine decay to ``end``.

    ``lr(s) = peak * s / warmup_steps`` for ``s < warmup_steps`` (simclr's warmup), and
    ``end + (peak - end) * 0.5 * (1 + cos(pi * p))`` with
    ``p = min((s - warmup_steps) / (total_steps - warmup_steps), 1)`` otherwise, so the
    rate equals ``peak`` at ``warmup_steps`` and stays at ``end`` from ``total_steps``
    on. With ``end_learning_rate=0`` this equals simclr's ``WarmUpAndCosineDecay``
    (which wraps ``CosineDecay(scaled_lr, total - warmup)``) given the already-scaled
    peak rate (see :func:`scale_learning_rate`).
    """

    def __init__(self, peak_learning_rate, warmup_steps, total_steps, end_learning_rate=0.0,
                 name=None):
        super().__init__()
        warmup_steps, total_steps = int(warmup_steps), int(total_steps)
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}.")
        if total_steps < warmup_steps:
            raise ValueError(
                f"`total_steps` ({total_steps}) must be >= `warmup_steps` ({warmup_steps}).")
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.end_learning_rate = float(end_learning_rate)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = ops.cast(self.peak_learning_rate, "float32")
        end = ops.cast(self.end_learning_rate, "float32")
        warmup = float(self.warmup_steps)
        decay_steps = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        if self.warmup_steps == 0:
            return cosine
        warm = peak * step / warmup
        return ops.where(step < warmup, warm, cosine)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "end_learning_rate": self.end_learning_rate,
            "name": self.name,
        }


def scale_learning_rate(base_lr, global_batch_size, scaling):
    """SimCLR's learning-rate scaling: 'linear' -> lr*B/256, 'sqrt' -> lr*sqrt(B)."""
    if scaling == "linear":
        return base_lr * global_batch_size / 256.0
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch_size)
    raise ValueError(f"Unknown learning rate scaling {scaling!r}; expected 'linear' or 'sqrt'.")


def build_optimizer(name, learning_rate, weight_decay=0.0, momentum=0.9):
    """Builds an optimizer by name.

    * ``'lars'``: :class:`LARS` (coupled L2, trust coefficient 0.001, BN/bias excluded
      from decay and adaptation).
    * ``'sgd'``: momentum SGD with COUPLED L2 decay and the same BN/bias exclusions,
      implemented as ``LARS(trust_coefficient=None)`` (no layer adaptation), because
      keras' SGD only offers decoupled decay.
    * ``'adam'``: ``keras.optimizers.AdamW`` with DECOUPLED decay (BN/bias excluded via
      ``exclude_from_weight_decay(var_names=...)``, matched against ``variable.name``)
      when ``weight_decay > 0``, else ``keras.optimizers.Adam``. ``momentum`` is
      ignored.
    """
    key = str(name).lower()
    weight_decay = float(weight_decay or 0.0)
    if key == "lars":
        return LARS(learning_rate, momentum=momentum, weight_decay=weight_decay, name="lars")
    if key == "sgd":
        return LARS(learning_rate, momentum=momentum, weight_decay=weight_decay,
                    trust_coefficient=None, name="sgd")
    if key == "adam":
        if weight_decay > 0:
            opt = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
            opt.exclude_from_weight_decay(var_names=list(DEFAULT_EXCLUDE_FROM_WEIGHT_DECAY))
            return opt
        return keras.optimizers.Adam(learning_rate=learning_rate)
    raise ValueError(f"Unknown optimizer {name!r}; expected one of 'lars', 'sgd', 'adam'.")

"""Import google-research/simclr TF2 checkpoints.

The released SimCLR / SimCLRv2 TF2 checkpoints (which users download themselves from that
project's storage; nothing here downloads) are object-based checkpoints whose variable keys
look like::

    model/resnet_model/initial_conv_relu_max_pool/0/conv2d/kernel/.ATTRIBUTES/VARIABLE_VALUE
    model/resnet_model/block_groups/2/layers/0/conv_relu_dropblock_layers/3/conv2d_0/kernel/...
    model/_projection_head/linear_layers/1/bn_relu/bn/moving_mean/.ATTRIBUTES/VARIABLE_VALUE

`load_simclr_encoder` builds the list of keys *our* ``ResNet`` (and optionally
``ProjectionHead``) would have in that layout -- walking ``stem_layers`` /
``block_groups[g].blocks[b].{shortcut,conv}_layers`` with their ``*_simclr_indices`` (see
``micle_tf.models.resnet``) -- checks every key exists with the same shape, and only then
assigns. Anything that does not match (other depth, width, selective kernels, stem, head size)
raises a ``ValueError`` that lists our variables without a checkpoint key, checkpoint keys left
unused and shape mismatches, with shapes, plus what the checkpoint looks like.
The supervised (linear-eval) head ``model/supervised_head``, ``global_step``, the optimizer and
its slots are ignored.

`simclr_variable_map` / `simclr_layout` give that layout for one of our models (the tests write
checkpoints "as upstream writes them" from it: tests/helpers.py `write_simclr_checkpoint`).
"""
import collections
import os

import numpy as np
import tensorflow as tf
from absl import logging

from micle_tf.models import resnet as resnet_lib

VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
ENCODER_PREFIX = "model/resnet_model"
HEAD_PREFIX = "model/_projection_head"
_BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
_MAX_LISTED = 30


# ----------------------------------------------------------------------------------------------
# Our model -> simclr keys
# ----------------------------------------------------------------------------------------------

def _bn_vars(bn, prefix):
    """keras BatchNormalization -> {prefix/bn/<var>: variable} (gamma/beta only if present)."""
    out = {}
    for name in _BN_VARIABLES:
        var = getattr(bn, name, None)
        if var is not None:
            out[f"{prefix}/{name}"] = var
    return out


def _layer_vars(layer, prefix):
    """{simclr key (no suffix): variable} for one of our leaf layers at simclr path `prefix`."""
    import keras

    from micle_tf.models.heads import LinearLayer

    if isinstance(layer, resnet_lib.Conv2dFixedPadding):
        return {f"{prefix}/conv2d/kernel": layer.conv2d.kernel}
    if isinstance(layer, resnet_lib.BatchNormRelu):
        return _bn_vars(layer.bn, f"{prefix}/bn")
    if isinstance(layer, resnet_lib.SKConv2D):
        out = {}
        out.update(_layer_vars(layer.conv2d_fixed_padding, f"{prefix}/conv2d_fixed_padding"))
        out.update(_layer_vars(layer.batch_norm_relu, f"{prefix}/batch_norm_relu"))
        out[f"{prefix}/conv2d_0/kernel"] = layer.conv2d_0.kernel
        out.update(_layer_vars(layer.batch_norm_relu_1, f"{prefix}/batch_norm_relu_1"))
        out[f"{prefix}/conv2d_1/kernel"] = layer.conv2d_1.kernel
        return out
    if isinstance(layer, LinearLayer):
        out = {f"{prefix}/dense/kernel": layer.dense.kernel}
        if layer.dense.use_bias:
            out[f"{prefix}/dense/bias"] = layer.dense.bias
        if layer.use_bn:
            out.update(_layer_vars(layer.bn_relu, f"{prefix}/bn_relu"))
        return out
    if isinstance(layer, keras.layers.BatchNormalization):
        return _bn_vars(layer, prefix)
    if not layer.weights:  # pooling, padding: no variables (same as simclr)
        return {}
    raise TypeError(f"no simclr checkpoint mapping for layer {layer.name!r} "
                    f"({type(layer).__name__}) at {prefix}")


def _ensure_built(encoder, projection_head):
    if not encoder.built:
        # Parameter shapes do not depend on the image size; this creates them without a pass.
        encoder.build((None, 224, 224, 3))
    if projection_head is not None and not projection_head.built:
        projection_head.build((None, encoder.output_dim))


def simclr_variable_map(encoder, projection_head=None):
    """Ordered {simclr key without the `/.ATTRIBUTES/VARIABLE_VALUE` suffix: our variable}.

    `encoder` is a `micle_tf.models.resnet.ResNet` (built or not: unbuilt models are built
    without a forward pass); `projection_head` an optional `ProjectionHead`."""
    if not isinstance(encoder, resnet_lib.ResNet):
        raise TypeError(f"expected a micle_tf ResNet encoder, got {type(encoder).__name__}")
    _ensure_built(encoder, projection_head)
    out = collections.OrderedDict()
    for layer, i in zip(encoder.stem_layers, encoder.stem_simclr_indices):
        out.update(_layer_vars(layer, f"{ENCODER_PREFIX}/initial_conv_relu_max_pool/{i}"))
    bottleneck = encoder.block_type == "bottleneck"
    shortcut_name = "projection_layers" if bottleneck else "shortcut_layers"
    conv_name = "conv_relu_dropblock_layers" if bottleneck else "conv2d_bn_layers"
    for g, group in enumerate(encoder.block_groups):
        for b, block in enumerate(group.blocks):
            base = f"{ENCODER_PREFIX}/block_groups/{g}/layers/{b}"
            for layer, i in zip(block.shortcut_layers, block.shortcut_simclr_indices):
                out.update(_layer_vars(layer, f"{base}/{shortcut_name}/{i}"))
            for layer, i in zip(block.conv_layers, block.conv_simclr_indices):
                out.update(_layer_vars(layer, f"{base}/{conv_name}/{i}"))
    if projection_head is not None:
        for j, layer in enumerate(projection_head.linear_layers):
            out.update(_layer_vars(layer, f"{HEAD_PREFIX}/linear_layers/{j}"))
    return out


def simclr_layout(encoder, projection_head=None):
    """{full checkpoint key: shape list} of this model in simclr's layout (without
    `global_step`): what `tf.train.list_variables` lists for an upstream checkpoint of the same
    architecture, minus the object graph."""
    return {k + VALUE_SUFFIX: [int(d) for d in v.shape]
            for k, v in simclr_variable_map(encoder, projection_head).items()}


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def resolve_simclr_checkpoint(path):
    """A checkpoint prefix (`.../ckpt-250228`) or a folder holding a `checkpoint` state file
    (or a `checkpoint/` subfolder, as in the released SimCLRv2 folders) -> the prefix."""
    path = os.fspath(path)
    if tf.io.gfile.isdir(path):
        for folder in (path, os.path.join(path, "checkpoint"), os.path.join(path, "checkpoints")):
            if tf.io.gfile.isdir(folder):
                latest = tf.train.latest_checkpoint(folder)
                if latest:
                    return latest
        raise FileNotFoundError(
            f"no TF2 checkpoint in {path}: expected a `checkpoint` state file next to "
            "`ckpt-N.index`/`ckpt-N.data-*` files (or pass the prefix .../ckpt-N)")
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise FileNotFoundError(f"simclr checkpoint {path} not found (no {path}.index)")


def read_simclr_shapes(prefix):
    """{key without suffix: shape} of the model variables of a checkpoint (optimizer slots,
    the object graph and non-variable entries dropped)."""
    shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    return {k[:-len(VALUE_SUFFIX)]: [int(d) for d in s] for k, s in shapes.items()
            if k.endswith(VALUE_SUFFIX) and "/.OPTIMIZER_SLOT/" not in k}


def describe_simclr_checkpoint(shapes):
    """What a checkpoint's keys say about its model: {"depth", "width_multiplier", "sk",
    "stem", "proj_layers", "proj_out_dim"} (entries that cannot be told are None).
    `shapes` is `read_simclr_shapes` output or a checkpoint prefix."""
    if isinstance(shapes, (str, os.PathLike)):
        shapes = read_simclr_shapes(resolve_simclr_checkpoint(shapes))
    enc = {k[len(ENCODER_PREFIX) + 1:]: s for k, s in shapes.items()
           if k.startswith(ENCODER_PREFIX + "/")}
    out = dict(depth=None, block="bottleneck", width_multiplier=None, sk=False, stem=None,
               proj_layers=0, proj_out_dim=None)
    if any("/conv2d_bn_layers/" in k for k in enc):
        out["block"] = "basic"
    conv_name = "conv2d_bn_layers" if out["block"] == "basic" else "conv_relu_dropblock_layers"
    blocks = []
    for g in range(4):
        ids = {k.split("/")[3] for k in enc if k.startswith(f"block_groups/{g}/layers/")}
        blocks.append(len(ids))
    for depth, (kind, counts) in resnet_lib.MODEL_PARAMS.items():
        if kind == out["block"] and tuple(blocks) == counts:
            out["depth"] = depth
    out["blocks_per_group"] = blocks
    first = enc.get(f"block_groups/0/layers/0/{conv_name}/0/conv2d/kernel")
    if first:
        out["width_multiplier"] = first[-1] / 64
        if float(out["width_multiplier"]).is_integer():
            out["width_multiplier"] = int(out["width_multiplier"])
    out["sk"] = any("/conv2d_fixed_padding/" in k for k in enc) or \
        "initial_conv_relu_max_pool/4/conv2d/kernel" in enc
    stem = enc.get("initial_conv_relu_max_pool/0/conv2d/kernel")
    if "initial_conv_relu_max_pool/4/conv2d/kernel" in enc:
        out["stem"] = "resnet_d (three 3x3 convs)"
    elif stem:
        out["stem"] = f"{stem[0]}x{stem[1]} conv"
    head = sorted({int(k.split("/")[3]) for k in shapes
                   if k.startswith(HEAD_PREFIX + "/linear_layers/")})
    if head:
        out["proj_layers"] = len(head)
        last = shapes.get(f"{HEAD_PREFIX}/linear_layers/{head[-1]}/dense/kernel")
        out["proj_out_dim"] = last[-1] if last else None
    return out


def _describe_ours(encoder, projection_head):
    stem = "resnet_d (three 3x3 convs)" if (encoder.sk_ratio > 0 and not
                                            encoder.small_image_stem) else \
        ("3x3 conv (small-image stem)" if encoder.small_image_stem else "7x7 conv")
    head = (f", {projection_head.num_proj_layers} projection layer(s) to "
            f"{projection_head.proj_out_dim}" if projection_head is not None else "")
    return (f"ResNet-{encoder.depth} width {encoder.width_multiplier}x, "
            f"{'SK ' + str(encoder.sk_ratio) if encoder.sk_ratio > 0 else 'no SK'}, "
            f"stem {stem}{head}")


def _describe_theirs(d):
    depth = d["depth"] or f"? ({d['block']} blocks {d['blocks_per_group']})"
    head = (f", {d['proj_layers']} projection layer(s) to {d['proj_out_dim']}"
            if d["proj_layers"] else ", no projection head")
    return (f"ResNet-{depth} width {d['width_multiplier']}x, {'SK' if d['sk'] else 'no SK'}, "
            f"stem {d['stem']}{head}")


def _listing(title, lines):
    if not lines:
        return ""
    shown = "\n".join("  " + l for l in lines[:_MAX_LISTED])
    more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return f"\n{len(lines)} {title}:\n{shown}{more}"


def load_simclr_encoder(encoder, path, projection_head=None):
    """Initialises `encoder` (a micle_tf ResNet) and optionally `projection_head` from a
    google-research/simclr TF2 checkpoint (a prefix, or a folder with a `checkpoint` file).

    Every variable is checked (key and shape) before any is assigned, so a failed load
    leaves the model untouched. With `projection_head=None` the checkpoint's head is skipped.
    Returns a summary dict (counts)."""
    prefix = resolve_simclr_checkpoint(path)
    shapes = read_simclr_shapes(prefix)
    if not any(k.startswith(ENCODER_PREFIX + "/") for k in shapes):
        tops = sorted({k.split("/")[0] for k in shapes})[:10]
        raise ValueError(
            f"{prefix} is not a google-research/simclr TF2 checkpoint: it has no "
            f"{ENCODER_PREFIX}/ variables (top-level names: {tops}). TF1 (tf.estimator) "
            "checkpoints of that project are not supported; use its TF2 checkpoints.")
    ours = simclr_variable_map(encoder, projection_head)
    relevant = [ENCODER_PREFIX + "/"]
    if projection_head is not None:
        relevant.append(HEAD_PREFIX + "/")
    theirs = {k: s for k, s in shapes.items() if any(k.startswith(p) for p in relevant)}

    missing = [f"{k} {list(v.shape)}" for k, v in ours.items() if k not in theirs]
    unused = [f"{k} {s}" for k, s in sorted(theirs.items()) if k not in ours]
    mismatched = [f"{k}: ours {list(v.shape)}, checkpoint {theirs[k]}"
                  for k, v in ours.items()
                  if k in theirs and [int(d) for d in v.shape] != theirs[k]]
    if missing or unused or mismatched:
        raise ValueError(
            f"the simclr checkpoint {prefix} does not fit this model.\n"
            f"  checkpoint: {_describe_theirs(describe_simclr_checkpoint(shapes))}\n"
            f"  ours:       {_describe_ours(encoder, projection_head)}"
            + _listing("of our variables have no checkpoint key", missing)
            + _listing(f"checkpoint keys under {' or '.join(p.rstrip('/') for p in relevant)} "
                       "left unused", unused)
            + _listing("shape mismatches", mismatched))

    reader = tf.train.load_checkpoint(prefix)
    num_params = 0
    for key, var in ours.items():
        value = reader.get_tensor(key + VALUE_SUFFIX)
        var.assign(np.asarray(value).astype(var.dtype))
        num_params += int(np.size(value))
    n_head = sum(1 for k in ours if k.startswith(HEAD_PREFIX + "/"))
    skipped_head = 0 if projection_head is not None else \
        sum(1 for k in shapes if k.startswith(HEAD_PREFIX + "/"))
    summary = {
        "checkpoint": prefix,
        "assigned": len(ours),
        "encoder_variables": len(ours) - n_head,
        "head_variables": n_head,
        "parameters": num_params,
        "skipped_head_keys": skipped_head,
        "ignored_keys": len(shapes) - len(ours) - skipped_head,
    }
    logging.info("loaded %d variables (%d parameters) from simclr checkpoint %s",
                 summary["assigned"], num_params, prefix)
    return summary

"""Stateless, per-image data augmentation for SimCLR / MICLe pretraining and fine-tuning.

Presets (``build_augment(preset, image_size)`` -> ``fn(image, seed)``):

* ``"derm"``     SimCLR's ImageNet set (Chen et al. 2020; google-research/simclr
  ``tf2/data_util.py``): random resized crop (area 0.08-1) -> horizontal flip ->
  colour jitter (strength 1.0, p=0.8) -> grayscale (p=0.2) -> Gaussian blur (p=0.5).
* ``"cxr"``      Chest X-ray set (Azizi et al. 2021): random resized crop (area 0.08-1)
  -> flip -> rotation (+-20 deg) -> brightness/contrast jitter (strength 0.5, p=0.8).
  X-rays are grayscale, so hue, saturation and the grayscale op would be no-ops.
* ``"finetune"`` Supervised fine-tuning: milder crop (area 0.5-1) -> flip ->
  rotation (+-15 deg); no colour changes (colour can carry diagnostic signal).
* ``"none"``     ``resize_for_eval`` only; the seed is ignored.

Input: float32 ``[H, W, 3]`` in [0, 1]; H and W may be dynamic. Integer images are
converted with ``tf.image.convert_image_dtype`` and a statically 1-channel image is
tiled to 3 channels. Output: float32 ``[size, size, 3]`` in [0, 1] with a static shape.

Determinism contract: every random op is stateless and driven by an explicit ``seed``
(int32/int64 tensor of shape [2]); sub-seeds are derived with
``tf.random.experimental.stateless_split``. The same image and seed therefore give the
same output regardless of ``tf.data`` parallelism, thread scheduling or the global seed;
different seeds give different outputs. No stateful RNG op is used anywhere.
"""
import math

import tensorflow as tf

PRESETS = ("derm", "cxr", "finetune", "none")

_FINETUNE_AREA_RANGE = (0.5, 1.0)  # keep at least half the image: lesions/findings stay in view.


# ----------------------------------------------------------------------------- helpers
def _as_image(image):
    """Returns a float32 [H, W, 3] tensor (converting integer dtypes, tiling 1 channel)."""
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.float32:
        image = tf.image.convert_image_dtype(image, tf.float32)
    if image.shape.rank is not None and image.shape[-1] == 1:
        image = tf.tile(image, [1, 1, 3])
    return image


def _as_seed(seed):
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        seed = tf.cast(seed, tf.int64)
    return tf.ensure_shape(seed, [2])


def _split(seed, num):
    """`num` independent [2]-shaped sub-seeds of `seed`."""
    return tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), num=num))


def _finish(image, size):
    """Clips to [0, 1] and pins the static output shape."""
    return tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), [size, size, 3])


def _random_apply(fn, p, image, seed):
    """Applies ``fn(image, sub_seed)`` with probability ``p`` (stateless coin flip).

    The coin and ``fn`` use separate sub-seeds, so p=1 gives exactly ``fn``'s output for
    that seed and p=0 is the identity (both short-circuited when ``p`` is a Python number).
    """
    coin_seed, fn_seed = _split(seed, 2)
    if isinstance(p, (int, float)):
        if p <= 0:
            return image
        if p >= 1:
            return fn(image, fn_seed)
    coin = tf.random.stateless_uniform([], coin_seed, dtype=tf.float32)
    return tf.cond(coin < tf.cast(p, tf.float32), lambda: fn(image, fn_seed), lambda: image)


# ----------------------------------------------------------------------------- geometric
def random_resized_crop(image, seed, size, area_range=(0.08, 1.0),
                        aspect_ratio_range=(3 / 4, 4 / 3), method="bicubic"):
    """SimCLR's ``crop_and_resize``: random crop (area fraction, aspect w/h) -> size x size.

    Uses ``stateless_sample_distorted_bounding_box`` with the whole image as the object
    (min_object_covered=0.1, 100 attempts, whole image on failure) exactly like SimCLR;
    bicubic resize as in SimCLR, followed by a clip since bicubic can overshoot [0, 1].
    """
    image = _as_image(image)
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=bbox, seed=_as_seed(seed),
        min_object_covered=0.1, aspect_ratio_range=list(aspect_ratio_range),
        area_range=list(area_range), max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(extent)
    crop = tf.image.crop_to_bounding_box(image, offset_y, offset_x, height, width)
    out = tf.image.resize(crop[tf.newaxis], [size, size], method=method)[0]
    return _finish(out, size)


def random_flip(image, seed):
    """Horizontal flip with probability 1/2."""
    return tf.image.stateless_random_flip_left_right(_as_image(image), _as_seed(seed))


def rotate(image, degrees, fill_mode="REFLECT", interpolation="BILINEAR"):
    """Rotates ``image`` counter-clockwise by ``degrees`` about its centre (same shape).

    ``ImageProjectiveTransformV3`` maps each output pixel to an input location; reflect
    fill avoids the black corners that would otherwise be a trivial cue for the network.
    """
    image = _as_image(image)
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float32) - 1.0
    w = tf.cast(shape[1], tf.float32) - 1.0
    theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    # Output pixel (x, y) samples input (cos*x - sin*y + dx, sin*x + cos*y + dy); the
    # offsets keep the centre (w/2, h/2) fixed. With y pointing down this is a
    # counter-clockwise rotation on screen (90 deg == np.rot90(image, 1)).
    dx = (w - (cos * w - sin * h)) / 2.0
    dy = (h - (sin * w + cos * h)) / 2.0
    transform = tf.stack([cos, -sin, dx, sin, cos, dy, 0.0, 0.0])[tf.newaxis]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis], transforms=transform, output_shape=shape[:2],
        fill_value=0.0, interpolation=interpolation, fill_mode=fill_mode)[0]
    return tf.ensure_shape(out, image.shape)


def random_rotation(image, seed, max_degrees, fill_mode="REFLECT"):
    """Rotation by an angle ~ U(-max_degrees, max_degrees) (or U(lo, hi) for a pair)."""
    if isinstance(max_degrees, (tuple, list)):
        lo, hi = max_degrees
    else:
        lo, hi = -float(max_degrees), float(max_degrees)
    angle = tf.random.stateless_uniform([], _as_seed(seed), minval=lo, maxval=hi)
    return rotate(image, angle, fill_mode=fill_mode)


# ----------------------------------------------------------------------------- colour
def _brightness(x, seed, delta):
    # SimCLR v2 brightness: multiplicative factor in [max(1 - delta, 0), 1 + delta].
    factor = tf.random.stateless_uniform([], seed, max(1.0 - delta, 0.0), 1.0 + delta)
    return x * factor


def color_jitter(image, seed, strength, p=0.8, random_order=True, hue=True, saturation=True):
    """SimCLR colour jitter, applied with probability ``p``, clipped to [0, 1] after each op.

    Brightness 0.8s (SimCLR v2 multiplicative), contrast 0.8s, saturation 0.8s, hue 0.2s.
    ``random_order`` applies the enabled ops in a stateless random permutation; each op
    keeps its own sub-seed whatever its position. ``hue``/``saturation`` can be disabled
    (grayscale X-rays). Lower bounds are floored at 0 (and hue capped at 0.5) so strengths
    above 1.25 stay valid for the TF ops.
    """
    image = _as_image(image)
    s = float(strength)
    b, c, sat, h = 0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5)
    ops = []
    if b > 0:
        ops.append(lambda x, sd: _brightness(x, sd, b))
    if c > 0:
        ops.append(lambda x, sd: tf.image.stateless_random_contrast(
            x, max(1.0 - c, 0.0), 1.0 + c, sd))
    if saturation and sat > 0:
        ops.append(lambda x, sd: tf.image.stateless_random_saturation(
            x, max(1.0 - sat, 0.0), 1.0 + sat, sd))
    if hue and h > 0:
        ops.append(lambda x, sd: tf.image.stateless_random_hue(x, h, sd))
    if not ops:
        return image

    def _jitter(x, sd):
        seeds = _split(sd, len(ops) + 1)
        if random_order and len(ops) > 1:
            perm = tf.argsort(tf.random.stateless_uniform([len(ops)], seeds[-1]))
            for i in range(len(ops)):
                branches = [lambda op=op, s_=s_, x=x: op(x, s_)
                            for op, s_ in zip(ops, seeds)]
                x = tf.clip_by_value(tf.switch_case(perm[i], branches), 0.0, 1.0)
        else:
            for op, s_ in zip(ops, seeds):
                x = tf.clip_by_value(op(x, s_), 0.0, 1.0)
        return x

    return _random_apply(_jitter, p, image, seed)


def to_grayscale(image):
    """RGB -> luma, tiled back to 3 channels (shape preserved)."""
    return tf.tile(tf.image.rgb_to_grayscale(_as_image(image)), [1, 1, 3])


def random_grayscale(image, seed, p=0.2):
    """Converts to grayscale with probability ``p``."""
    return _random_apply(lambda x, _: to_grayscale(x), p, _as_image(image), seed)


# ----------------------------------------------------------------------------- blur
def gaussian_blur(image, sigma, kernel_size=None):
    """Separable Gaussian blur with reflect padding (no dark borders, shape preserved).

    ``kernel_size`` defaults to SimCLR's ``height // 10``, here ``min(H, W) // 10`` so the
    reflect padding (radius = kernel_size // 2) always fits a non-square image; the actual
    kernel is ``2 * radius + 1`` (odd) as in SimCLR. Radius 0 is the identity.

    Each 1-D pass is a matmul with a banded (Toeplitz) matrix instead of SimCLR's
    ``depthwise_conv2d``: same result (to float rounding), ~8x faster on CPU at 224 px,
    where the depthwise kernel dominated the whole "derm" pipeline. Cost grows as
    O(H*W*(H+W)), fine at training resolution (the presets blur after the crop/resize).
    """
    image = _as_image(image)
    shape = tf.shape(image)
    if kernel_size is None:
        kernel_size = tf.minimum(shape[0], shape[1]) // 10
    radius = tf.cast(kernel_size, tf.int32) // 2
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    sigma = tf.cast(sigma, tf.float32)
    kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
    kernel /= tf.reduce_sum(kernel)

    def band(n):
        # [n + 2r, n]: column j holds the kernel at rows j..j+2r ("VALID" conv of padded).
        offset = tf.range(n + 2 * radius)[:, tf.newaxis] - tf.range(n)[tf.newaxis, :]
        inside = (offset >= 0) & (offset <= 2 * radius)
        return tf.where(inside, tf.gather(kernel, tf.clip_by_value(offset, 0, 2 * radius)),
                        0.0)

    padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    out = tf.einsum("hwc,wv->hvc", padded, band(shape[1]))
    out = tf.einsum("hwc,hv->vwc", out, band(shape[0]))
    return tf.ensure_shape(out, image.shape)


def random_gaussian_blur(image, seed, p=0.5, sigma_range=(0.1, 2.0), kernel_size=None):
    """Gaussian blur with sigma ~ U(sigma_range), applied with probability ``p``."""
    def _blur(x, sd):
        sigma = tf.random.stateless_uniform([], sd, sigma_range[0], sigma_range[1])
        return gaussian_blur(x, sigma, kernel_size)
    return _random_apply(_blur, p, _as_image(image), seed)


# ----------------------------------------------------------------------------- eval / presets
def resize_for_eval(image, size):
    """Deterministic bilinear (antialiased) resize to size x size.

    The single eval/serving transform: supervised evaluation and the exported serving
    signature must both call this function so train/serve preprocessing cannot drift.
    """
    out = tf.image.resize(_as_image(image)[tf.newaxis], [size, size],
                          method="bilinear", antialias=True)[0]
    return _finish(out, size)


def build_augment(preset, image_size):
    """Returns ``fn(image, seed) -> float32 [image_size, image_size, 3]`` for ``preset``."""
    size = int(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")

    if preset == "derm":
        def fn(image, seed):
            s = _split(seed, 5)
            x = random_resized_crop(image, s[0], size, area_range=(0.08, 1.0))
            x = random_flip(x, s[1])
            x = color_jitter(x, s[2], strength=1.0, p=0.8)
            x = random_grayscale(x, s[3], p=0.2)
            x = random_gaussian_blur(x, s[4], p=0.5)
            return _finish(x, size)
    elif preset == "cxr":
        def fn(image, seed):
            s = _split(seed, 4)
            x = random_resized_crop(image, s[0], size, area_range=(0.08, 1.0))
            x = random_flip(x, s[1])
            x = random_rotation(x, s[2], 20.0)
            x = color_jitter(x, s[3], strength=0.5, p=0.8, hue=False, saturation=False)
            return _finish(x, size)
    elif preset == "finetune":
        def fn(image, seed):
            s = _split(seed, 3)
            x = random_resized_crop(image, s[0], size, area_range=_FINETUNE_AREA_RANGE)
            x = random_flip(x, s[1])
            x = random_rotation(x, s[2], 15.0)
            return _finish(x, size)
    elif preset == "none":
        def fn(image, seed=None):
            del seed
            return resize_for_eval(image, size)
    else:
        raise ValueError(f"Unknown augmentation preset {preset!r}; valid: {', '.join(PRESETS)}")
    return fn

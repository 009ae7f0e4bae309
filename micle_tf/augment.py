"""Stateless, per-image data augmentation for SimCLR / MICLe pretraining and fine-tuning.

Presets (``build_augment(preset, image_size)`` -> ``fn(image, seed)``), as specified at 224 px:

* ``"derm"``     SimCLR's ImageNet set (Chen et al. 2020; google-research/simclr
  ``tf2/data_util.py``): random resized crop (area 0.08-1) -> horizontal flip ->
  colour jitter (strength 1.0, p=0.8) -> grayscale (p=0.2) -> Gaussian blur (p=0.5).
* ``"cxr"``      Chest X-ray set (Azizi et al. 2021): random resized crop (area 0.08-1)
  -> flip -> rotation (+-20 deg) -> brightness/contrast jitter (strength 0.5, p=0.8).
  X-rays are grayscale, so hue, saturation and the grayscale op would be no-ops.
* ``"finetune"`` Supervised fine-tuning: milder crop (area 0.5-1) -> flip ->
  rotation (+-15 deg); no colour changes (colour can carry diagnostic signal).
* ``"none"``     ``resize_for_eval`` only; the seed is ignored.

Size scaling (`preset_settings(preset, image_size, color_jitter_strength, crop_area_min)`
resolves a preset at a size; `build_augment` and `post_crop` use it): the blur kernel stays
SimCLR's 10% of the side, sigma is U(0.1, 2.0) * side / 224 and blur is skipped when the
kernel would be under 3 taps (sides < 20 px). Images of <= ``SMALL_IMAGE_MAX_SIZE`` (64) px
take ``SMALL_IMAGE_DEFAULTS`` instead of the 224-px values: for "derm", measured on the PH²
patches (docs/augmentation_sweep.md), crop (area 0.08-1) + flip only: no colour jitter, no
grayscale, no blur (SimCLR itself drops blur and halves the jitter for 32-px CIFAR; here any
colour change erased the signal). ``color_jitter_strength`` and ``crop_area_min``
override the defaults for any size.

Every preset is a random resized crop followed by `PostCrop` ops whose random draws are made
explicit (a small float vector per view). With ``placement="device"`` the input pipeline only
crops and draws; the batched ops run on the accelerator in the train step (at 224 px the
post-crop ops are ~2/3 of the host's CPU time per view; see bench/README.md).

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
def color_jitter(image, seed, strength, p=0.8, random_order=True, hue=True, saturation=True):
    """SimCLR colour jitter, applied with probability ``p``, clipped to [0, 1] after each op.

    Brightness 0.8s (SimCLR v2 multiplicative), contrast 0.8s, saturation 0.8s, hue 0.2s.
    ``random_order`` applies the enabled ops in a stateless random permutation (else in that
    order). ``hue``/``saturation`` can be disabled (grayscale X-rays). Lower bounds are floored
    at 0 (and hue capped at 0.5) so strengths above 1.25 stay valid for the TF ops. The presets
    run the same code through `PostCrop`.
    """
    post = PostCrop(flip=False, jitter_strength=strength, jitter_p=p, hue=hue,
                    saturation=saturation)
    params = post.draw(seed)
    if not random_order and post.jitter_ops:
        first, n = post.param_names.index("order_0"), len(post.jitter_ops)
        params = tf.concat([params[:first], tf.range(n, dtype=tf.float32),
                            params[first + n:]], axis=0)
    return post.apply_photometric(image, params)


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
    sigma = tf.reshape(tf.cast(sigma, tf.float32), [1])
    out = _gaussian_blur_batch(image[tf.newaxis], sigma, kernel_size)[0]
    return tf.ensure_shape(out, image.shape)


def random_gaussian_blur(image, seed, p=0.5, sigma_range=(0.1, 2.0), kernel_size=None):
    """Gaussian blur with sigma ~ U(sigma_range), applied with probability ``p``."""
    def _blur(x, sd):
        sigma = tf.random.stateless_uniform([], sd, sigma_range[0], sigma_range[1])
        return gaussian_blur(x, sigma, kernel_size)
    return _random_apply(_blur, p, _as_image(image), seed)


# ----------------------------------------------------------------------------- post-crop ops
_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


class PostCrop:
    """The ops of a preset after the crop, with their random draws made explicit.

    ``draw(seed)`` makes every random choice of one view (flip, angle, jitter on/off, factors,
    op order, grayscale, blur sigma) as a float32 vector of ``num_params``; ``apply(image,
    params)`` applies them to one image with TF's fused per-image kernels (the host path) and
    ``apply_photometric_batch(images, params)`` applies the photometric part to a batch with
    plain batched ops that compile under XLA (the accelerator path, ``placement="device"``).
    Both give the same image for the same params (to float rounding), so moving the work to
    the accelerator keeps the augmentation distribution and the determinism contract: the
    draws still come from each element's seed.

    Order: flip -> rotation -> colour jitter (random order, clip after each op) -> grayscale
    -> Gaussian blur, each with its probability. The geometric ops (flip, rotation) always
    run on the host, with the crop; the photometric ones (jitter, grayscale, blur) are what
    `placement="device"` moves to the accelerator.
    """

    def __init__(self, flip=True, max_degrees=0.0, jitter_strength=0.0, jitter_p=0.0,
                 hue=True, saturation=True, gray_p=0.0, blur_p=0.0, sigma_range=(0.1, 2.0),
                 kernel_size=None):
        self.flip, self.max_degrees = bool(flip), float(max_degrees)
        # Blur kernel (taps, odd; radius = kernel_size // 2). None: SimCLR's side // 10 of
        # the image being blurred, i.e. the kernel `preset_settings` resolves for that side.
        self.kernel_size = None if kernel_size is None else int(kernel_size)
        s = float(jitter_strength)
        ranges = {"brightness": (max(1.0 - 0.8 * s, 0.0), 1.0 + 0.8 * s),
                  "contrast": (max(1.0 - 0.8 * s, 0.0), 1.0 + 0.8 * s),
                  "saturation": (max(1.0 - 0.8 * s, 0.0), 1.0 + 0.8 * s),
                  "hue": (-min(0.2 * s, 0.5), min(0.2 * s, 0.5))}
        enabled = {"brightness": s > 0, "contrast": s > 0, "saturation": saturation and s > 0,
                   "hue": hue and s > 0}
        self.jitter_ops = tuple(op for op in _JITTER_OPS if enabled[op]) if jitter_p > 0 else ()
        self.jitter_ranges = [ranges[op] for op in self.jitter_ops]
        self.jitter_p, self.gray_p, self.blur_p = float(jitter_p), float(gray_p), float(blur_p)
        self.sigma_range = tuple(float(v) for v in sigma_range)
        names = ["flip", "angle", "jitter"] + [f"factor_{op}" for op in self.jitter_ops]
        names += [f"order_{i}" for i in range(len(self.jitter_ops))]
        names += ["gray", "blur", "sigma"]
        self.param_names = tuple(names)
        self.num_params = len(names)

    def _index(self, name):
        return self.param_names.index(name)

    def _check_params(self, params):
        """Params drawn by a PostCrop with other ops (e.g. colour strength 0 vs > 0) have
        another layout: fail loudly instead of reading the wrong columns."""
        n = params.shape[-1] if params.shape.rank else None
        if n is not None and n != self.num_params:
            raise ValueError(
                f"augmentation params have {n} columns but this PostCrop expects "
                f"{self.num_params} {self.param_names}: build it with the settings of the "
                "build_augment that drew them (post_crop(preset, image_size, "
                "color_jitter_strength))")

    # -- host: the random draws
    def draw(self, seed):
        """float32 [num_params]: every random choice of one view, from one stateless seed."""
        s = _split(seed, 8)
        u = lambda i, n=None, lo=0.0, hi=1.0: tf.random.stateless_uniform(  # noqa: E731
            [] if n is None else [n], s[i], lo, hi)
        coin = lambda i, p: tf.cast(u(i) < p, tf.float32)  # noqa: E731
        values = [coin(0, 0.5) if self.flip else tf.constant(0.0),
                  u(1, lo=-self.max_degrees, hi=self.max_degrees) if self.max_degrees
                  else tf.constant(0.0),
                  coin(2, self.jitter_p)]
        n = len(self.jitter_ops)
        if n:
            draws = u(3, n)  # one U(0,1) per op, mapped onto its range
            lo = tf.constant([r[0] for r in self.jitter_ranges])
            hi = tf.constant([r[1] for r in self.jitter_ranges])
            values += tf.unstack(lo + (hi - lo) * draws)
            values += tf.unstack(tf.cast(tf.argsort(u(4, n)), tf.float32))
        values += [coin(5, self.gray_p), coin(6, self.blur_p),
                   u(7, lo=self.sigma_range[0], hi=self.sigma_range[1])]
        return tf.stack(values)

    # -- host: one image, fused kernels
    def apply_geometric(self, image, params):
        """Flip and rotation of one [H, W, 3] image (these always run on the host)."""
        p = lambda name: params[self._index(name)]  # noqa: E731
        x = _as_image(image)
        if self.flip:
            x = tf.cond(p("flip") > 0.5, lambda: tf.reverse(x, [1]), lambda: x)
        if self.max_degrees:
            x = rotate(x, p("angle"))
        return x

    def apply_photometric(self, image, params):
        """Colour jitter, grayscale and blur of one [H, W, 3] image, fused per-image kernels."""
        params = tf.convert_to_tensor(params, tf.float32)
        self._check_params(params)
        p = lambda name: params[self._index(name)]  # noqa: E731
        x = _as_image(image)
        if self.jitter_ops:
            def jitter(y):
                kernels = {"brightness": lambda z, f: z * f,
                           "contrast": tf.image.adjust_contrast,
                           "saturation": tf.image.adjust_saturation,
                           "hue": tf.image.adjust_hue}
                branches = [lambda z, op=op: kernels[op](z, p(f"factor_{op}"))
                            for op in self.jitter_ops]
                for i in range(len(self.jitter_ops)):
                    k = tf.cast(p(f"order_{i}"), tf.int32)
                    y = tf.clip_by_value(
                        tf.switch_case(k, [lambda b=b, y=y: b(y) for b in branches]), 0.0, 1.0)
                return y
            x = tf.cond(p("jitter") > 0.5, lambda: jitter(x), lambda: x)
        if self.gray_p:
            x = tf.cond(p("gray") > 0.5, lambda: to_grayscale(x), lambda: x)
        if self.blur_p:
            x = tf.cond(p("blur") > 0.5,
                        lambda: gaussian_blur(x, p("sigma"), self.kernel_size), lambda: x)
        return x

    def apply(self, image, params):
        """Applies one view's params to one float32 [H, W, 3] image (the host path)."""
        return self.apply_photometric(self.apply_geometric(image, params), params)

    @property
    def has_photometric(self):
        return bool(self.jitter_ops or self.gray_p or self.blur_p)

    # -- accelerator: a batch, batched ops, static shapes
    def apply_photometric_batch(self, images, params):
        """`apply_photometric` for a batch [B, S, S, 3] with per-view params [B, num_params]
        (the accelerator path; flip and rotation were applied on the host).

        Every op runs on the whole batch and `tf.where` keeps it where the view drew it (no
        data-dependent shapes, so it compiles under XLA); a colour-jitter round does one
        brightness/contrast affine map and one HSV round trip for saturation/hue, whichever
        op each view drew for that round."""
        x = tf.convert_to_tensor(images, tf.float32)
        params = tf.convert_to_tensor(params, tf.float32)
        self._check_params(params)
        col = lambda name: params[:, self._index(name)]  # noqa: E731
        per_image = lambda v: v[:, tf.newaxis, tf.newaxis, tf.newaxis]  # noqa: E731
        on = lambda name: per_image(col(name) > 0.5)  # noqa: E731
        if self.jitter_ops:
            jitter_on = col("jitter") > 0.5
            one = tf.ones_like(col("jitter"))
            for i in range(len(self.jitter_ops)):
                which = tf.cast(col(f"order_{i}"), tf.int32)
                factor = {op: tf.where(jitter_on & tf.equal(which, k), col(f"factor_{op}"),
                                       1.0 if op != "hue" else 0.0)
                          for k, op in enumerate(self.jitter_ops)}
                # brightness: f*x; contrast: f*x + (1-f)*mean; both are identity at f = 1.
                contrast = factor.get("contrast", one)
                scale = factor.get("brightness", one) * contrast
                mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
                y = per_image(scale) * x + per_image(1.0 - contrast) * mean
                if "saturation" in factor or "hue" in factor:
                    hsv_op = tf.zeros_like(jitter_on)
                    for k, op in enumerate(self.jitter_ops):
                        if op in ("saturation", "hue"):
                            hsv_op |= jitter_on & tf.equal(which, k)
                    y = tf.where(per_image(hsv_op),
                                 _adjust_hsv_batch(y, factor.get("saturation"),
                                                   factor.get("hue")), y)
                x = tf.clip_by_value(y, 0.0, 1.0)
        if self.gray_p:
            x = tf.where(on("gray"), tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 1, 3]), x)
        if self.blur_p:
            x = tf.where(on("blur"), _gaussian_blur_batch(x, col("sigma"), self.kernel_size), x)
        x = tf.clip_by_value(x, 0.0, 1.0)
        x.set_shape(images.shape)
        return x


def _adjust_hsv_batch(images, saturation=None, hue=None):
    """Per-image saturation factor / hue shift via one HSV round trip (what the fused
    AdjustSaturation / AdjustHue kernels do per image)."""
    h, s, v = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)
    if saturation is not None:
        s = tf.clip_by_value(s * saturation[:, tf.newaxis, tf.newaxis], 0.0, 1.0)
    if hue is not None:
        h = tf.math.floormod(h + hue[:, tf.newaxis, tf.newaxis], 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def _gaussian_blur_batch(images, sigmas, kernel_size=None):
    """`gaussian_blur` for a batch [B, H, W, C] with one sigma per image: each 1-D pass is a
    batched matmul with [B, n + 2r, n] banded (Toeplitz) matrices, column j holding image
    b's kernel at rows j..j+2r (a "VALID" correlation of the reflect-padded image)."""
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    if kernel_size is None:
        kernel_size = tf.minimum(h, w) // 10
    radius = tf.cast(kernel_size, tf.int32) // 2
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernels = tf.exp(-tf.square(x)[tf.newaxis] / (2.0 * tf.square(sigmas)[:, tf.newaxis]))
    kernels /= tf.reduce_sum(kernels, axis=1, keepdims=True)

    def bands(n):
        offset = tf.range(n + 2 * radius)[:, tf.newaxis] - tf.range(n)[tf.newaxis, :]
        inside = (offset >= 0) & (offset <= 2 * radius)
        taps = tf.gather(kernels, tf.clip_by_value(offset, 0, 2 * radius), axis=1)
        return tf.where(inside[tf.newaxis], taps, 0.0)

    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                    mode="REFLECT")
    out = tf.einsum("bhwc,bwv->bhvc", padded, bands(w))
    return tf.einsum("bhwc,bhv->bvwc", out, bands(h))


# ----------------------------------------------------------------------------- eval
def resize_for_eval(image, size):
    """Deterministic bilinear (antialiased) resize to size x size.

    The single eval/serving transform: supervised evaluation and the exported serving
    signature must both call this function so train/serve preprocessing cannot drift.
    """
    out = tf.image.resize(_as_image(image)[tf.newaxis], [size, size],
                          method="bilinear", antialias=True)[0]
    return _finish(out, size)


# ----------------------------------------------------------------------------- preset recipes
PLACEMENTS = ("host", "device")

# SimCLR's Gaussian blur is specified for 224-px ImageNet views: sigma ~ U(0.1, 2.0) and a
# kernel of 10% of the side (`height // 10`, made odd: 2 * (k // 2) + 1 taps, 23 at 224 px).
# `preset_settings` keeps the kernel at 10% of the side and scales sigma by side / 224, so the
# blur removes the same fraction of the image's detail at every size; when the kernel would be
# under MIN_BLUR_KERNEL taps (sides < 20 px, where it would be the identity) blur is skipped.
REFERENCE_SIZE = 224
REFERENCE_SIGMA_RANGE = (0.1, 2.0)
MIN_BLUR_KERNEL = 3
_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)

# Each preset's recipe as specified at the reference size (224 px).
_RECIPES = {
    "derm": dict(crop_area_min=0.08, flip=True, max_degrees=0.0, color_jitter_strength=1.0,
                 jitter_p=0.8, hue=True, saturation=True, gray_p=0.2, blur_p=0.5),
    "cxr": dict(crop_area_min=0.08, flip=True, max_degrees=20.0, color_jitter_strength=0.5,
                jitter_p=0.8, hue=False, saturation=False, gray_p=0.0, blur_p=0.0),
    "finetune": dict(crop_area_min=_FINETUNE_AREA_RANGE[0], flip=True, max_degrees=15.0,
                     color_jitter_strength=0.0, jitter_p=0.0, hue=True, saturation=True,
                     gray_p=0.0, blur_p=0.0),
}

# Images of at most SMALL_IMAGE_MAX_SIZE px per side use these values instead of the
# reference ones (keys of `_RECIPES`). MEASURED (docs/augmentation_sweep.md, reproduced by
# bench/augment_sweep.py): on the deduplicated PH² patches at 32 px, colour jitter strength
# 0 / 0.25 / 0.5 / 1.0 x crop floor 0.08 / 0.2 / 0.5 x SimCLR/MICLe, 300 steps, judged on the
# validation split. Any colour jitter cut held-out same-lesion retrieval (SimCLR 0.49 -> 0.39 at
# strength 0.25 -> 0.20 at 1.0; MICLe 0.57 -> 0.29 -> 0.22) and pushed the contrastive accuracy
# towards chance; dropping grayscale too raised it again (SimCLR 0.49 -> 0.61, MICLe 0.57 ->
# 0.58, contrastive accuracy 0.63 -> 0.92 and 0.16 -> 0.24). At this size the colour is what
# tells one skin patch from another. So: SimCLR's own crop floor 0.08, flip, nothing else.
SMALL_IMAGE_MAX_SIZE = 64
SMALL_IMAGE_DEFAULTS_STATUS = "measured"
SMALL_IMAGE_DEFAULTS = {
    "derm": dict(crop_area_min=0.08, color_jitter_strength=0.0, gray_p=0.0, blur_p=0.0),
}


def _check_size(image_size):
    size = int(image_size)
    if size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return size


def _check_preset(preset):
    if preset == "none":
        raise ValueError("preset 'none' is a resize only: it has no ops after a crop")
    if preset not in _RECIPES:
        raise ValueError(f"Unknown augmentation preset {preset!r}; valid: {', '.join(PRESETS)}")


def blur_kernel_size(image_size):
    """SimCLR's blur kernel for a side of `image_size` px: `side // 10`, made odd (taps)."""
    return 2 * ((_check_size(image_size) // 10) // 2) + 1


def blur_sigma_range(image_size):
    """SimCLR's sigma range U(0.1, 2.0) at 224 px, scaled by image_size / 224."""
    scale = _check_size(image_size) / REFERENCE_SIZE
    return (REFERENCE_SIGMA_RANGE[0] * scale, REFERENCE_SIGMA_RANGE[1] * scale)


def preset_settings(preset, image_size, color_jitter_strength=None, crop_area_min=None):
    """The resolved recipe of `preset` at `image_size` px, as plain Python values (no TF).

    Starts from the preset's reference (224-px) recipe, takes `SMALL_IMAGE_DEFAULTS[preset]`
    when `image_size <= SMALL_IMAGE_MAX_SIZE`, then the explicit overrides (None = that
    default): `color_jitter_strength` (>= 0; factor ranges 1 +- 0.8 s for brightness, contrast
    and saturation, hue +- 0.2 s; 0 removes the colour jitter) and `crop_area_min` (the floor
    of the crop's area fraction, in (0, 1]). The blur kernel is 10% of the side and sigma is
    U(0.1, 2.0) * side / 224; blur is skipped (blur_p 0) when the kernel is under 3 taps.

    Returns a dict: preset, image_size, size_defaults ("reference" or "small (measured)"),
    crop_area_range, aspect_ratio_range, flip, max_degrees, color_jitter_strength, jitter_p,
    hue, saturation, gray_p, blur_p, blur_sigma_range and blur_kernel_size (both None without
    blur). `build_augment` and `post_crop` build their ops from it.
    """
    _check_preset(preset)
    size = _check_size(image_size)
    recipe = dict(_RECIPES[preset])
    small = size <= SMALL_IMAGE_MAX_SIZE and preset in SMALL_IMAGE_DEFAULTS
    if small:
        recipe.update(SMALL_IMAGE_DEFAULTS[preset])
    if color_jitter_strength is not None:
        strength = float(color_jitter_strength)
        if not (math.isfinite(strength) and strength >= 0):
            raise ValueError(f"color_jitter_strength must be >= 0, got {color_jitter_strength!r}")
        if strength > 0 and not recipe["jitter_p"]:
            raise ValueError(f"preset {preset!r} has no colour jitter to scale "
                             f"(color_jitter_strength={color_jitter_strength!r})")
        recipe["color_jitter_strength"] = strength
    if crop_area_min is not None:
        floor = float(crop_area_min)
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"crop_area_min must be in (0, 1], got {crop_area_min!r}")
        recipe["crop_area_min"] = floor
    strength = float(recipe["color_jitter_strength"])
    kernel = blur_kernel_size(size)
    blur_p = float(recipe["blur_p"]) if kernel >= MIN_BLUR_KERNEL else 0.0
    return {
        "preset": preset,
        "image_size": size,
        "size_defaults": f"small ({SMALL_IMAGE_DEFAULTS_STATUS})" if small else "reference",
        "crop_area_range": (float(recipe["crop_area_min"]), 1.0),
        "aspect_ratio_range": _ASPECT_RATIO_RANGE,
        "flip": bool(recipe["flip"]),
        "max_degrees": float(recipe["max_degrees"]),
        "color_jitter_strength": strength,
        "jitter_p": float(recipe["jitter_p"]) if strength > 0 else 0.0,
        "hue": bool(recipe["hue"]),
        "saturation": bool(recipe["saturation"]),
        "gray_p": float(recipe["gray_p"]),
        "blur_p": blur_p,
        "blur_sigma_range": blur_sigma_range(size) if blur_p else None,
        "blur_kernel_size": kernel if blur_p else None,
    }


def _post_crop_from(settings, kernel_size):
    return PostCrop(flip=settings["flip"], max_degrees=settings["max_degrees"],
                    jitter_strength=settings["color_jitter_strength"],
                    jitter_p=settings["jitter_p"], hue=settings["hue"],
                    saturation=settings["saturation"], gray_p=settings["gray_p"],
                    blur_p=settings["blur_p"],
                    sigma_range=settings["blur_sigma_range"] or REFERENCE_SIGMA_RANGE,
                    kernel_size=kernel_size)


def post_crop(preset, image_size=None, color_jitter_strength=None):
    """The `PostCrop` ops of a preset (everything after its random resized crop).

    With `image_size`: the ops `build_augment(preset, image_size, color_jitter_strength=...)`
    uses (same draws, same kernel). Without (`ContrastiveModel(device_augment=preset)`): the
    preset's reference (224-px) recipe with the blur kernel taken from the images it is
    applied to (10% of their side, i.e. the kernel `preset_settings` resolves for that side).
    Its `apply_photometric*` methods depend only on which ops exist and on the params, so
    they finish views drawn at any size as long as the op layout is the same (true for every
    default of "derm" and "cxr"; a colour strength of 0 removes the jitter columns, and the
    mismatch is reported). `draw` of this size-less form follows the 224-px recipe.
    """
    _check_preset(preset)
    if image_size is None:
        settings = preset_settings(preset, REFERENCE_SIZE, color_jitter_strength)
        return _post_crop_from(settings, kernel_size=None)
    settings = preset_settings(preset, image_size, color_jitter_strength)
    return _post_crop_from(settings, kernel_size=settings["blur_kernel_size"])


def build_augment(preset, image_size, placement="host", color_jitter_strength=None,
                  crop_area_min=None):
    """Returns the per-view augmentation ``fn(image, seed)`` of ``preset`` at ``image_size``.

    The recipe is `preset_settings(preset, image_size, color_jitter_strength, crop_area_min)`
    (None = the preset's default for that size; see `SMALL_IMAGE_DEFAULTS`).

    placement="host" (default): ``fn -> float32 [image_size, image_size, 3]``, the whole
    augmentation per image (in tf.data). placement="device": ``fn -> (view, params)``: only
    the crop and the geometric ops (flip, rotation) run per image; ``params`` (float32
    [num_params]) holds the draws for the photometric rest, which
    `post_crop(preset, image_size, color_jitter_strength).apply_photometric_batch` applies to
    the batch on the accelerator (`ContrastiveModel(device_augment=preset)` does it in its
    train step). Same seed -> same view either way, to float rounding. Presets without
    photometric ops (finetune, none) have nothing to move and reject "device".
    """
    size = _check_size(image_size)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if preset == "none":
        if placement == "device":
            raise ValueError("preset 'none' has nothing to run on the device")
        if color_jitter_strength is not None or crop_area_min is not None:
            raise ValueError("preset 'none' is a resize only: color_jitter_strength and "
                             "crop_area_min do not apply")

        def resize_only(image, seed=None):
            del seed
            return resize_for_eval(image, size)
        return resize_only
    settings = preset_settings(preset, size, color_jitter_strength, crop_area_min)
    area_range, aspect_range = settings["crop_area_range"], settings["aspect_ratio_range"]
    post = _post_crop_from(settings, kernel_size=settings["blur_kernel_size"])

    def crop_and_draw(image, seed):
        crop_seed, post_seed = _split(seed, 2)
        crop = random_resized_crop(image, crop_seed, size, area_range=area_range,
                                   aspect_ratio_range=aspect_range)
        return crop, post.draw(post_seed)

    if placement == "device":
        if not post.has_photometric:
            raise ValueError(
                f"preset {preset!r} at {size} px has no photometric ops to run on the device "
                "(small images default to crop + flip only); use --augment_placement=host, "
                "or add colour jitter with --color_jitter_strength")

        def crop_geometric_and_draw(image, seed):
            crop, params = crop_and_draw(image, seed)
            return _finish(post.apply_geometric(crop, params), size), params
        return crop_geometric_and_draw

    def fn(image, seed):
        crop, params = crop_and_draw(image, seed)
        return _finish(post.apply(crop, params), size)
    return fn

"""A patched copy of `data_pipelines.reader.make_dataset` to measure proposed optimisations.

NOT library code: it exists so bench/pipeline_variants.py can compare the reader as it is with
changed versions without touching data_pipelines/. With every option off it builds the same
graph as the original for the arguments the benchmarks use (no input_context, case filter or
steps_per_epoch). Options:

  intra_op=1          tf.data Options.threading.max_intra_op_parallelism = 1: each map element
                      runs its ops single-threaded, parallelism comes from num_parallel_calls
                      only (the usual tf.data advice; no change to the data).
  cache_decoded=True  decode every image of a case once to uint8 and keep the decoded cases in
                      memory (Dataset.cache) before the shuffle; later epochs skip read, parse
                      and decode. Memory = all decoded train images (uint8). Same data except
                      that uint8 caching would drop 16-bit PNG precision (a real version would
                      cache uint16 or float16 for those).
  batch_augment=PRESET  per-element: decode + random_resized_crop only (same crop as the
                      preset for the same seed); everything after the crop (flip, colour
                      jitter in per-image random order, grayscale, blur) runs once per batch,
                      vectorised (`derm_batch_post`), its random draws seeded per batch.
                      Same distribution as the per-image preset; different random stream.
  host_post=False     with batch_augment: skip the per-batch part on the host -- the CPU cost
                      left if flip/jitter/grayscale/blur ran on the accelerator inside the
                      train step (derm_batch_post is plain batched TF ops, so it can).
"""
import tensorflow as tf

from data_pipelines import reader as _reader
from data_pipelines import schema
from data_pipelines.decode import decode_image, resize_image
from data_pipelines.writer import read_info
from micle_tf import augment as A


# ----------------------------------------------------------------------------- batch augment
def _bands(kernels, n, radius):
    """[B, n + 2r, n] banded matrices (one per image) for a VALID 1-D correlation."""
    offset = tf.range(n + 2 * radius)[:, tf.newaxis] - tf.range(n)[tf.newaxis, :]
    inside = (offset >= 0) & (offset <= 2 * radius)
    taps = tf.gather(kernels, tf.clip_by_value(offset, 0, 2 * radius), axis=1)  # [B, n+2r, n]
    return tf.where(inside[tf.newaxis], taps, 0.0)


def batch_gaussian_blur(images, sigmas):
    """Per-image sigma, same kernel size rule as micle_tf.augment.gaussian_blur."""
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    radius = (tf.minimum(h, w) // 10) // 2
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    k = tf.exp(-tf.square(x)[tf.newaxis] / (2.0 * tf.square(sigmas)[:, tf.newaxis]))
    k /= tf.reduce_sum(k, axis=1, keepdims=True)
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                    mode="REFLECT")
    out = tf.einsum("bhwc,bwv->bhvc", padded, _bands(k, w, radius))
    return tf.einsum("bhwc,bhv->bvwc", out, _bands(k, h, radius))


def _contrast(x, f):
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    return (x - mean) * f[:, None, None, None] + mean


def _saturation(x, f):
    h, s, v = tf.unstack(tf.image.rgb_to_hsv(x), axis=-1)
    s = tf.clip_by_value(s * f[:, None, None], 0.0, 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def _hue(x, d):
    h, s, v = tf.unstack(tf.image.rgb_to_hsv(x), axis=-1)
    h = tf.math.floormod(h + d[:, None, None], 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, s, v], axis=-1))


def derm_batch_post(images, seed, strength=1.0, p_jitter=0.8, p_gray=0.2, p_blur=0.5,
                    static_shapes=False):
    """The derm preset after the crop, on a batch [B, S, S, 3]: flip -> colour jitter (p, per
    image random order, each op applied only to the images whose turn it is) -> grayscale (p)
    -> Gaussian blur (p, sigma ~ U(0.1, 2)). One stateless seed per batch.

    static_shapes=True computes every op on the whole batch and selects per image (4x the
    jitter work, 2x the blur) instead of partitioning the batch: same result, no dynamic
    shapes, so it compiles with XLA (GPU/TPU)."""
    b = tf.shape(images)[0]
    s = tf.unstack(tf.random.experimental.stateless_split(seed, 10))
    u = lambda i, lo=0.0, hi=1.0: tf.random.stateless_uniform([b], s[i], lo, hi)  # noqa: E731
    x = tf.where((u(0) < 0.5)[:, None, None, None], tf.reverse(images, [2]), images)
    st = float(strength)
    factors = [u(1, max(1 - 0.8 * st, 0), 1 + 0.8 * st), u(2, max(1 - 0.8 * st, 0), 1 + 0.8 * st),
               u(3, max(1 - 0.8 * st, 0), 1 + 0.8 * st), u(4, -min(0.2 * st, 0.5),
                                                          min(0.2 * st, 0.5))]
    ops = [lambda y, f: y * f[:, None, None, None], _contrast, _saturation, _hue]
    jitter = u(5) < p_jitter
    order = tf.argsort(tf.random.stateless_uniform([b, 4], s[6]), axis=1)
    idx = tf.range(b)
    for i in range(4):
        which = tf.where(jitter, order[:, i], 4)  # 4: no colour op for this image this round
        if static_shapes:
            for k, op in enumerate(ops):
                y = tf.clip_by_value(op(x, factors[k]), 0.0, 1.0)
                x = tf.where(tf.equal(which, k)[:, None, None, None], y, x)
            continue
        parts = tf.dynamic_partition(x, which, 5)
        ids = tf.dynamic_partition(idx, which, 5)
        outs = [tf.clip_by_value(op(parts[k], tf.gather(factors[k], ids[k])), 0.0, 1.0)
                for k, op in enumerate(ops)] + [parts[4]]
        x = tf.dynamic_stitch(ids, outs)
    gray = tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 1, 3])
    x = tf.where((u(7) < p_gray)[:, None, None, None], gray, x)
    blur = tf.cast(u(8) < p_blur, tf.int32)
    if static_shapes:
        x = tf.where((blur > 0)[:, None, None, None], batch_gaussian_blur(x, u(9, 0.1, 2.0)), x)
    else:
        parts, ids = tf.dynamic_partition(x, blur, 2), tf.dynamic_partition(idx, blur, 2)
        sig = tf.gather(u(9, 0.1, 2.0), ids[1])
        # REFLECT padding rejects an empty batch: skip the blur when no image drew it.
        blurred = tf.cond(tf.size(ids[1]) > 0, lambda: batch_gaussian_blur(parts[1], sig),
                          lambda: parts[1])
        x = tf.dynamic_stitch(ids, [parts[0], blurred])
    x.set_shape(images.shape)
    return tf.clip_by_value(x, 0.0, 1.0)


# ----------------------------------------------------------------------------- make_dataset
def make_dataset(data_dir, split, mode, batch_size, image_size, *, augment_fn=None, seed=0,
                 training=True, shuffle_buffer=512, drop_remainder=None,
                 num_parallel_calls=tf.data.AUTOTUNE, cycle_length=4, info=None,
                 intra_op=None, cache_decoded=False, batch_augment=None, host_post=True,
                 **unused):
    if unused.get("steps_per_epoch") or unused.get("input_context") or unused.get("case_ids"):
        raise NotImplementedError("bench copy: steps_per_epoch/input_context/case_ids")
    info = info or read_info(data_dir)
    task, num_classes = info["task"], len(info["label_names"])
    files = _reader.list_shards(data_dir, split)
    if drop_remainder is None:
        drop_remainder = training
    if batch_augment not in (None, "derm"):
        raise ValueError("batch_augment: only the derm preset is prototyped")
    use_batch_aug = batch_augment is not None and training and mode != "supervised"

    def to_float(img):
        return tf.image.convert_image_dtype(img, tf.float32) if cache_decoded else img

    def view(image, s):
        image = to_float(image)
        if use_batch_aug:
            out = A.random_resized_crop(image, A._split(s, 5)[0], image_size)
        elif augment_fn is not None and training:
            out = augment_fn(image, s)
        else:
            out = resize_image(image, image_size)
        return tf.ensure_shape(tf.cast(out, tf.float32), [image_size, image_size, 3])

    def get_image(case, k):
        if cache_decoded:
            return tf.reshape(case["pixels"][k], case["pixel_shapes"][k])
        return decode_image(case["encoded"][k])

    if mode == "supervised":
        def element(ex, s):
            image = (tf.reshape(ex["pixels"], ex["pixel_shapes"]) if cache_decoded
                     else decode_image(ex["encoded"]))
            return {"image": view(image, s), "label": ex["label"], "case_id": ex["case_id"]}
    else:
        def element(case, s):
            pick_i, pick_j, aug_1, aug_2 = tf.unstack(
                tf.random.experimental.stateless_split(s, num=4))
            n = tf.shape(case["encoded"])[0]
            i = tf.random.stateless_uniform([], pick_i, 0, n, dtype=tf.int32)
            if mode == "micle":
                j = tf.random.stateless_uniform([], pick_j, 0, tf.maximum(n - 1, 1),
                                                dtype=tf.int32)
                j = tf.where(n > 1, j + tf.cast(j >= i, tf.int32), i)
            else:
                j = i
            image_i = get_image(case, i)
            image_j = tf.cond(tf.equal(i, j), lambda: image_i, lambda: get_image(case, j))
            return {"view1": view(image_i, aug_1), "view2": view(image_j, aug_2),
                    "label": case["label"], "case_id": case["case_id"],
                    "image_indices": tf.stack([i, j])}

    def decode_bag(case):
        # Images of a bag may differ in size: keep them flattened in a ragged [N, None] uint8
        # tensor plus their [N, 3] shapes.
        def one(e):
            img = tf.image.convert_image_dtype(decode_image(e), tf.uint8, saturate=True)
            return tf.reshape(img, [-1]), tf.shape(img)
        pixels, shapes = tf.map_fn(
            one, case["encoded"],
            fn_output_signature=(tf.RaggedTensorSpec([None], tf.uint8, ragged_rank=0),
                                 tf.TensorSpec([3], tf.int32)))
        return dict(case, pixels=pixels, pixel_shapes=shapes)

    epoch = tf.constant(0, tf.int64)
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training and not cache_decoded:
        ds = ds.shuffle(len(files), seed=seed * 7919 + epoch, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
                       block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(lambda r: schema.parse_case(r, task, num_classes),
                num_parallel_calls=num_parallel_calls, deterministic=True)
    if cache_decoded:
        ds = ds.map(decode_bag, num_parallel_calls=num_parallel_calls, deterministic=True).cache()
    if mode == "supervised":
        def explode(c):
            out = {"encoded": c["encoded"],
                   "case_id": tf.fill(tf.shape(c["encoded"]), c["case_id"]),
                   "label": tf.repeat(c["label"][tf.newaxis], tf.shape(c["encoded"])[0], axis=0)}
            if cache_decoded:
                out["pixels"], out["pixel_shapes"] = c["pixels"], c["pixel_shapes"]
            return out
        ds = ds.map(explode).unbatch()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed * 7919 + epoch + 1,
                        reshuffle_each_iteration=True).repeat()
    base = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(seed, tf.int64), tf.constant(0, tf.int64)]), epoch)
    ds = ds.enumerate().map(
        lambda k, x: element(x, tf.random.experimental.stateless_fold_in(base, k)),
        num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if use_batch_aug and host_post:
        batch_base = tf.random.experimental.stateless_fold_in(base, -1)

        def post(k, b):
            s1, s2 = tf.unstack(tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(batch_base, k), 2))
            return dict(b, view1=derm_batch_post(b["view1"], s1),
                        view2=derm_batch_post(b["view2"], s2))
        ds = ds.enumerate().map(post, num_parallel_calls=num_parallel_calls, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    if intra_op:
        options.threading.max_intra_op_parallelism = int(intra_op)
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class Variant:
    """A reader-like object (has make_dataset) with fixed options, for bench.pipeline.measure."""

    def __init__(self, **options):
        self.options = options

    def make_dataset(self, *args, **kwargs):
        return make_dataset(*args, **kwargs, **self.options)

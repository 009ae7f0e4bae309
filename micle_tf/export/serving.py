"""SavedModel export of a fine-tuned classifier, for TF Serving or `tf.saved_model.load`.

Signatures (the serving contract, README "micle-export"):

- `serving_default(image_bytes: tf.string [None])` -> `probabilities` float32 [None, C],
  `embedding` float32 [None, D]. Each item is PNG, JPEG, BMP or GIF bytes, decoded and resized
  with `data_pipelines.decode.decode_image` / `resize_image` — the very functions evaluation uses,
  so served and evaluated predictions agree.
- `serve_pixels(images: float32 [None, H, W, 3] in [0, 1])` -> the same outputs. Images whose
  H x W differ from the model's size go through `resize_image`; values are clipped to [0, 1].
- `get_label_names()` -> `label_names` tf.string [C] (class order of `probabilities`).

Probabilities are softmax (multiclass) or per-label sigmoid (multilabel). Label names are not an
output of the two prediction signatures: TF Serving's REST "instances" format needs every output
to share the batch dimension. They also travel as `assets/label_names.txt` (one per line) and in
`assets.extra/micle_export.json` (task, image size, preprocessing, versions; no paths or ids).

Malformed input fails the whole request with InvalidArgumentError (TF Serving answers it as an
error response; the server keeps running) whose message names the first bad item:
"image_bytes[i] is not a PNG, JPEG, BMP or GIF image ..." (unrecognised or empty bytes, found by
sniffing the magic bytes) or "image_bytes[i] could not be decoded ..." (truncated or corrupt data
behind a valid header: items are decoded in a tf.data pipeline that drops failures, and a
missing index is reported). An empty batch gives empty outputs.
"""
import json
import os
import shutil
import tempfile

import tensorflow as tf

from data_pipelines.decode import decode_image, resize_image
from micle_tf import rundir

EXPORT_INFO_FILE = "micle_export.json"
LABEL_NAMES_FILE = "label_names.txt"
IMAGE_FORMATS = "PNG, JPEG, BMP or GIF"
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF87a", b"GIF89a")
PREPROCESSING = ("tf.io.decode_image (PNG/JPEG/BMP/GIF; first frame), float32 RGB in [0, 1] "
                 "(greyscale tiled, alpha dropped), bilinear antialiased resize to "
                 "image_size x image_size, clipped to [0, 1] "
                 "(data_pipelines.decode.decode_image + resize_image)")


def _known_format(image_bytes):
    """bool [N]: the item starts with a PNG, JPEG, BMP or GIF signature."""
    ok = tf.zeros_like(image_bytes, dtype=tf.bool)
    for magic in _MAGIC:
        prefix = tf.strings.substr(image_bytes, 0, len(magic), unit="BYTE")
        ok = ok | tf.equal(prefix, magic)
    return ok


def _first_false(mask):
    # a trailing False keeps argmin defined for an empty batch (the assert passes then anyway)
    return tf.argmin(tf.concat([tf.cast(mask, tf.int32), [0]], 0), output_type=tf.int32)


def decode_batch(image_bytes, image_size):
    """tf.string [N] -> float32 [N, size, size, 3]; InvalidArgumentError naming a bad item."""
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    n = tf.size(image_bytes)
    shape = tf.shape(image_bytes)
    check_rank = tf.debugging.Assert(  # rank 1 (see prepare_pixels for why not tf.rank)
        tf.equal(tf.pad(shape, [[0, 1]])[0], n),
        [tf.strings.format("image_bytes must be a 1-D batch of encoded images; got shape {}",
                           shape)])
    with tf.control_dependencies([check_rank]):
        image_bytes = tf.reshape(image_bytes, [-1])
    known = _known_format(image_bytes)
    check_format = tf.debugging.Assert(
        tf.reduce_all(known),
        [tf.strings.format("image_bytes[{}] is not a " + IMAGE_FORMATS + " image "
                           "(empty or unrecognised bytes)", _first_false(known))])
    with tf.control_dependencies([check_format]):
        indices = tf.range(n)
    # Decoding errors (truncated/corrupt data) cannot be caught inside a graph, but tf.data can
    # drop the elements that fail; an index missing afterwards names the bad item.
    dataset = tf.data.Dataset.from_tensor_slices((indices, image_bytes))
    dataset = dataset.map(lambda i, b: (i, resize_image(decode_image(b), image_size)),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.ignore_errors().batch(tf.cast(tf.maximum(n, 1), tf.int64))
    decoded_indices, images = dataset.reduce(
        (tf.zeros([0], tf.int32), tf.zeros([0, image_size, image_size, 3], tf.float32)),
        lambda state, batch: (tf.concat([state[0], batch[0]], 0),
                              tf.concat([state[1], batch[1]], 0)))
    decoded = tf.scatter_nd(decoded_indices[:, None], tf.ones_like(decoded_indices), [n]) > 0
    check_decoded = tf.debugging.Assert(
        tf.reduce_all(decoded),
        [tf.strings.format("image_bytes[{}] could not be decoded (truncated or corrupt image "
                           "data)", _first_false(decoded))])
    with tf.control_dependencies([check_decoded]):
        images = tf.identity(images)
    images.set_shape([None, image_size, image_size, 3])
    return images


def prepare_pixels(images, image_size):
    """float32 [N, H, W, 3] -> [N, size, size, 3] in [0, 1] (resize_image when H x W differ)."""
    images = tf.convert_to_tensor(images, tf.float32)
    # Checked at run time too: a loaded signature (and TF Serving) does not enforce its spec,
    # and the runtime may fold tf.rank to the spec's 4, so the rank test compares the element
    # count with the product of the first four dimensions (zero-padded) instead.
    shape = tf.shape(images)
    dims = tf.pad(shape, [[0, 4]])[:4]
    check = tf.debugging.Assert(
        tf.logical_and(tf.equal(tf.reduce_prod(dims), tf.size(images)), tf.equal(dims[3], 3)),
        [tf.strings.format("images must be float32 [batch, height, width, 3] RGB in [0, 1]; "
                           "got shape {}", shape)])
    with tf.control_dependencies([check]):
        shape = tf.identity(dims)
        images = tf.identity(images)
    same = tf.logical_and(tf.equal(shape[1], image_size), tf.equal(shape[2], image_size))

    def resize():
        return tf.map_fn(lambda im: resize_image(im, image_size), images,
                         fn_output_signature=tf.TensorSpec([image_size, image_size, 3],
                                                           tf.float32))

    def keep():
        return tf.reshape(images, [-1, image_size, image_size, 3])

    images = tf.cond(same, keep, resize)
    images.set_shape([None, image_size, image_size, 3])
    return tf.clip_by_value(images, 0.0, 1.0)


class ServingModule(tf.Module):
    """Holds the classifier's variables and the serving functions."""

    def __init__(self, model, label_names, image_size, task):
        super().__init__(name="micle_serving")
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"unknown task {task!r}")
        label_names = [str(n) for n in label_names]
        if len(label_names) != model.num_classes:
            raise ValueError(f"{len(label_names)} label names for a model with "
                             f"{model.num_classes} classes")
        # only the variables are tracked and saved: no Keras objects in the SavedModel
        self._model = self._no_dependency(model)
        self.model_variables = list(model.variables)
        self.image_size = int(image_size)
        self.task = task
        self.label_names = label_names
        self._label_names = tf.constant(label_names, tf.string, name="label_names")
        self.serving_default = tf.function(
            self._serve_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        self.serve_pixels = tf.function(
            self._serve_pixels,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
        self.get_label_names = tf.function(self._get_label_names, input_signature=[])

    def _predict(self, images):
        outputs = self._model(tf.cast(images, self._model.compute_dtype), training=False)
        logits = tf.cast(outputs["logits"], tf.float32)
        probabilities = tf.nn.softmax(logits) if self.task == "multiclass" else tf.sigmoid(logits)
        return {"probabilities": tf.identity(probabilities, name="probabilities"),
                "embedding": tf.identity(tf.cast(outputs["embedding"], tf.float32),
                                         name="embedding")}

    def _serve_bytes(self, image_bytes):
        return self._predict(decode_batch(image_bytes, self.image_size))

    def _serve_pixels(self, images):
        return self._predict(prepare_pixels(images, self.image_size))

    def _get_label_names(self):
        return {"label_names": tf.identity(self._label_names)}

    def signatures(self):
        return {"serving_default": self.serving_default.get_concrete_function(),
                "serve_pixels": self.serve_pixels.get_concrete_function(),
                "get_label_names": self.get_label_names.get_concrete_function()}


def build_serving_module(model, label_names, image_size, task):
    """A tf.Module whose `serving_default`, `serve_pixels` and `get_label_names` tf.functions
    are the SavedModel signatures (`module.signatures()` gives the concrete functions)."""
    return ServingModule(model, label_names, image_size, task)


def _is_remote(path):
    return "://" in path


def export_saved_model(model_dir, export_dir, which="best", overwrite=False):
    """Exports `model_dir`'s fine-tuned classifier as a SavedModel at `export_dir`.

    Written to `export_dir + ".tmp-<pid>"` and renamed into place, so `export_dir` is either
    absent or complete (local filesystems; remote paths are written in place). Refuses a
    non-empty `export_dir` unless `overwrite`. Returns a summary dict."""
    export_dir = export_dir.rstrip("/") or export_dir
    if tf.io.gfile.exists(export_dir) and tf.io.gfile.listdir(export_dir) and not overwrite:
        raise FileExistsError(f"{export_dir} exists and is not empty (use overwrite=True / "
                              "--overwrite)")
    # rebuilt in float32 whatever precision training used, so serving is float32
    model, cfg, dataset = rundir.load_classifier(model_dir, which, dtype_policy="float32")
    restored, step = rundir.checkpoint_origin(model.checkpoint_path)
    label_names = [str(n) for n in dataset["label_names"]]
    task = dataset["task"]
    image_size = cfg.model.image_size
    module = build_serving_module(model, label_names, image_size, task)
    embedding_dim = int(module.serving_default.get_concrete_function()
                        .structured_outputs["embedding"].shape[-1])

    info = {
        "format": "micle-tf classifier SavedModel",
        "task": task,
        "label_names": label_names,
        "num_classes": len(label_names),
        "image_size": image_size,
        "embedding_dim": embedding_dim,
        "output": ("softmax probabilities" if task == "multiclass"
                   else "per-label sigmoid probabilities"),
        "preprocessing": PREPROCESSING,
        "signatures": {
            "serving_default": {"inputs": {"image_bytes": "string [None]"},
                                "outputs": {"probabilities": f"float32 [None, {len(label_names)}]",
                                            "embedding": f"float32 [None, {embedding_dim}]"}},
            "serve_pixels": {"inputs": {"images": "float32 [None, H, W, 3] in [0, 1]"},
                             "outputs": {"probabilities": f"float32 [None, {len(label_names)}]",
                                         "embedding": f"float32 [None, {embedding_dim}]"}},
            "get_label_names": {"inputs": {},
                                "outputs": {"label_names": f"string [{len(label_names)}]"}},
        },
        "checkpoint": {"which": restored, "step": step},
        "model": {k: getattr(cfg.model, k) for k in (
            "backbone", "width_multiplier", "sk_ratio", "image_size", "proj_out_dim",
            "num_proj_layers")},
        "ft_proj_selector": cfg.ft_proj_selector,
        "versions": rundir.versions(),
    }

    remote = _is_remote(export_dir)
    target = export_dir if remote else f"{export_dir}.tmp-{os.getpid()}"
    if not remote and os.path.exists(target):
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory(prefix="micle-export-") as scratch:
        labels_file = os.path.join(scratch, LABEL_NAMES_FILE)
        with open(labels_file, "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in label_names))
        module.label_names_file = tf.saved_model.Asset(labels_file)
        try:
            # custom-gradient tracing only matters for training a reloaded model
            tf.saved_model.save(module, target, signatures=module.signatures(),
                                options=tf.saved_model.SaveOptions(
                                    experimental_custom_gradients=False))
            extra = os.path.join(target, "assets.extra")
            tf.io.gfile.makedirs(extra)
            with tf.io.gfile.GFile(os.path.join(extra, EXPORT_INFO_FILE), "w") as f:
                f.write(json.dumps(info, indent=2) + "\n")
        except BaseException:
            if not remote and os.path.exists(target):
                shutil.rmtree(target, ignore_errors=True)
            raise
    if not remote:
        old = None
        if os.path.exists(export_dir):
            if os.listdir(export_dir):
                old = f"{export_dir}.old-{os.getpid()}"
                os.rename(export_dir, old)
            else:
                os.rmdir(export_dir)
        os.rename(target, export_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    return {"export_dir": export_dir, "checkpoint": restored, "step": step, "task": task,
            "num_classes": len(label_names), "label_names": label_names,
            "image_size": image_size, "embedding_dim": embedding_dim,
            "signatures": sorted(module.signatures())}

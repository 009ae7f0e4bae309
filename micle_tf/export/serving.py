"""SavedModel export of a fine-tuned classifier, for TF Serving or `tf.saved_model.load`.

Signatures (the serving contract, README "micle-export"):

- `serving_default(image_bytes: tf.string [None])` -> `probabilities` float32 [None, C],
  `embedding` float32 [None, D]. Each item is PNG, JPEG, BMP or GIF bytes, decoded and resized
  with `data_pipelines.decode.decode_image` / `resize_image` — the very functions evaluation uses,
  so served and evaluated predictions agree.
- `serve_pixels(images: float32 [None, H, W, 3] in [0, 1])` -> the same outputs. Images whose
  H x W differ from the model's size go through `resize_image`; values are clipped to [0, 1].
- `get_label_names()` -> `label_names` tf.string [C] (class order of `probabilities`).
- `get_model_card()` -> `model_card` tf.string scalar (the model card's JSON, see
  `micle_tf.export.model_card`) and `model_card_markdown` (the same as a document).

Probabilities are softmax (multiclass) or per-label sigmoid (multilabel) of the classifier's
logits - divided first by the temperature(s) of `calibration.json` when the model_dir holds a
temperature fitted on its validation split for the exported checkpoint (temperature scaling,
`micle_tf.evaluation.temperature_scaling`): ``softmax(logits / T)`` or
``sigmoid(logits_c / T_c)``, exactly `calibration.apply_temperature(logits, T,
from_logits=True)`. Label names are not an output of the two prediction signatures: TF
Serving's REST "instances" format needs every output to share the batch dimension. They also
travel as `assets/label_names.txt` (one per line) and in `assets.extra/micle_export.json`
(task, image size, preprocessing, calibration, versions; no paths or ids). The model card
travels as `assets/model_card.json` and `assets/model_card.md`.

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

import numpy as np
import tensorflow as tf
from absl import logging

from data_pipelines.decode import decode_image, resize_image
from micle_tf import rundir
from micle_tf.export import model_card as model_card_lib

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

    def __init__(self, model, label_names, image_size, task, temperature=None,
                 model_card=None):
        super().__init__(name="micle_serving")
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"unknown task {task!r}")
        label_names = [str(n) for n in label_names]
        if len(label_names) != model.num_classes:
            raise ValueError(f"{len(label_names)} label names for a model with "
                             f"{model.num_classes} classes")
        self._temperature = None
        if temperature is not None:
            t = np.asarray(temperature, np.float32)
            if (t.ndim > 1 or (t.ndim == 1 and (task == "multiclass" or
                                                t.shape[0] != model.num_classes))
                    or not np.all(np.isfinite(t)) or np.any(t <= 0)):
                raise ValueError(f"temperature must be one finite value > 0 (or, multilabel, "
                                 f"one per class), got {temperature}")
            self._temperature = tf.constant(t, name="temperature")
        self.model_card = None  # (json text, markdown text) once attached
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
        if model_card is not None:
            self.attach_model_card(*model_card)

    def attach_model_card(self, card_json, card_markdown):
        """Adds the `get_model_card` signature returning these texts."""
        self.model_card = (card_json, card_markdown)
        self._card_json = tf.constant(card_json, tf.string, name="model_card")
        self._card_md = tf.constant(card_markdown, tf.string, name="model_card_markdown")
        self.get_model_card = tf.function(self._get_model_card, input_signature=[])

    def _predict(self, images):
        outputs = self._model(tf.cast(images, self._model.compute_dtype), training=False)
        logits = tf.cast(outputs["logits"], tf.float32)
        if self._temperature is not None:
            logits = logits / self._temperature
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

    def _get_model_card(self):
        return {"model_card": tf.identity(self._card_json),
                "model_card_markdown": tf.identity(self._card_md)}

    def signatures(self):
        out = {"serving_default": self.serving_default.get_concrete_function(),
               "serve_pixels": self.serve_pixels.get_concrete_function(),
               "get_label_names": self.get_label_names.get_concrete_function()}
        if self.model_card is not None:
            out["get_model_card"] = self.get_model_card.get_concrete_function()
        return out


def build_serving_module(model, label_names, image_size, task, temperature=None,
                         model_card=None):
    """A tf.Module whose `serving_default`, `serve_pixels`, `get_label_names` (and, with
    `model_card` = (json text, markdown text), `get_model_card`) tf.functions are the
    SavedModel signatures (`module.signatures()` gives the concrete functions).
    `temperature`: divides the logits before softmax/sigmoid (a scalar, or one per class for
    multilabel); None serves the uncalibrated probabilities."""
    return ServingModule(model, label_names, image_size, task, temperature, model_card)


def _is_remote(path):
    return "://" in path


def _calibration_info(task, calibration):
    """micle_export.json's "calibration" block (no paths)."""
    if calibration is None:
        return {"temperature_scaling": False}
    fitted = calibration.get("fitted_on") or {}
    return {"temperature_scaling": True, "temperature": calibration["temperature"],
            "formula": calibration.get("formula"),
            "fitted_on": {k: fitted.get(k) for k in ("split", "level", "num_cases",
                                                     "num_images")},
            "validation_nll_before": calibration.get("nll_before"),
            "validation_nll_after": calibration.get("nll_after")}


def export_saved_model(model_dir, export_dir, which="best", overwrite=False, calibrate=False,
                       data_dir=None, apply_calibration=True, intended_use=None,
                       out_of_scope_use=None, limitations=None, metrics_file=None,
                       min_group_size=model_card_lib.DEFAULT_MIN_GROUP_SIZE):
    """Exports `model_dir`'s fine-tuned classifier as a SavedModel at `export_dir`.

    Written to `export_dir + ".tmp-<pid>"` and renamed into place, so `export_dir` is either
    absent or complete (local filesystems; remote paths are written in place). Refuses a
    non-empty `export_dir` unless `overwrite`.

    Calibration: a temperature fitted for the exported checkpoint (model_dir/calibration.json)
    is applied in the serving signatures unless `apply_calibration=False`; `calibrate` fits one
    first when there is none (on the validation split of `data_dir`, default the model's own
    training data). Model card: built from the run directory (`model_card.build_model_card`;
    the evaluation from `metrics_file`, default model_dir/metrics_test.json or the newest
    metrics file), with `intended_use` (text), `out_of_scope_use` (texts) replacing the
    defaults and `limitations` (texts) added to the data-aware ones; case attribute counts
    under `min_group_size` are suppressed. Returns a summary dict."""
    export_dir = export_dir.rstrip("/") or export_dir
    if tf.io.gfile.exists(export_dir) and tf.io.gfile.listdir(export_dir) and not overwrite:
        raise FileExistsError(f"{export_dir} exists and is not empty (use overwrite=True / "
                              "--overwrite)")
    if calibrate and not apply_calibration:
        raise ValueError("calibrate=True fits a temperature to apply it: it contradicts "
                         "apply_calibration=False (--noapply_calibration)")
    if calibrate:
        from micle_tf.evaluation import temperature_scaling
        temperature_scaling.ensure_fitted(model_dir, data_dir, which=which)
    # rebuilt in float32 whatever precision training used, so serving is float32
    model, cfg, dataset = rundir.load_classifier(model_dir, which, dtype_policy="float32")
    restored, step = rundir.checkpoint_origin(model.checkpoint_path)
    calibration = (rundir.read_calibration(model_dir, model.checkpoint_path)
                   if apply_calibration else None)
    if calibration is not None:
        logging.info("serving temperature-scaled probabilities (T = %s, fitted on %s)",
                     calibration["temperature"], (calibration.get("fitted_on") or {}).get("split"))
    label_names = [str(n) for n in dataset["label_names"]]
    task = dataset["task"]
    image_size = cfg.model.image_size
    module = build_serving_module(model, label_names, image_size, task,
                                  temperature=None if calibration is None
                                  else calibration["temperature"])
    embedding_dim = int(module.serving_default.get_concrete_function()
                        .structured_outputs["embedding"].shape[-1])
    output = ("softmax probabilities" if task == "multiclass"
              else "per-label sigmoid probabilities")
    if calibration is not None:
        t = calibration["temperature"]
        shown = (", ".join(f"{v:.4g}" for v in t) if isinstance(t, list) else f"{t:.4g}")
        output += (f" of the logits divided by the temperature (temperature scaling: "
                   f"{calibration.get('formula')}, T = {shown})")

    info = {
        "format": "micle-tf classifier SavedModel",
        "task": task,
        "label_names": label_names,
        "num_classes": len(label_names),
        "image_size": image_size,
        "embedding_dim": embedding_dim,
        "output": output,
        "preprocessing": PREPROCESSING,
        "calibration": _calibration_info(task, calibration),
        "signatures": {
            "serving_default": {"inputs": {"image_bytes": "string [None]"},
                                "outputs": {"probabilities": f"float32 [None, {len(label_names)}]",
                                            "embedding": f"float32 [None, {embedding_dim}]"}},
            "serve_pixels": {"inputs": {"images": "float32 [None, H, W, 3] in [0, 1]"},
                             "outputs": {"probabilities": f"float32 [None, {len(label_names)}]",
                                         "embedding": f"float32 [None, {embedding_dim}]"}},
            "get_label_names": {"inputs": {},
                                "outputs": {"label_names": f"string [{len(label_names)}]"}},
            "get_model_card": {"inputs": {},
                               "outputs": {"model_card": "string [] (JSON)",
                                           "model_card_markdown": "string [] (Markdown)"}},
        },
        "model_card": {"json": f"assets/{model_card_lib.CARD_JSON}",
                       "markdown": f"assets/{model_card_lib.CARD_MD}"},
        "checkpoint": {"which": restored, "step": step},
        "model": {k: getattr(cfg.model, k) for k in (
            "backbone", "width_multiplier", "sk_ratio", "image_size", "proj_out_dim",
            "num_proj_layers")},
        "ft_proj_selector": cfg.ft_proj_selector,
        "versions": rundir.versions(),
    }
    card = model_card_lib.build_model_card(
        model_dir, cfg, dataset, {"which": restored, "step": step}, info,
        calibration=calibration, intended_use=intended_use, out_of_scope_use=out_of_scope_use,
        limitations=limitations, metrics_file=metrics_file, min_group_size=min_group_size)
    info_text = json.dumps(info, indent=2) + "\n"

    remote = _is_remote(export_dir)
    target = export_dir if remote else f"{export_dir}.tmp-{os.getpid()}"
    if not remote and os.path.exists(target):
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory(prefix="micle-export-") as scratch:
        labels_file = os.path.join(scratch, LABEL_NAMES_FILE)
        with open(labels_file, "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in label_names))
        card_json, card_md, card_text = model_card_lib.write_card_files(card, scratch)
        with open(card_md, encoding="utf-8") as f:
            card_markdown = f.read()
        known = [model_dir, export_dir, target, scratch, cfg.data_dir, cfg.model_dir,
                 dataset.get("data_dir"), data_dir, metrics_file,
                 None if cfg.init_from in (None, "none") else cfg.init_from,
                 ((calibration or {}).get("fitted_on") or {}).get("data_dir")]
        model_card_lib.check_no_paths(card_text + card_markdown + info_text, known)
        module.attach_model_card(card_text, card_markdown)
        module.label_names_file = tf.saved_model.Asset(labels_file)
        module.model_card_json_file = tf.saved_model.Asset(card_json)
        module.model_card_md_file = tf.saved_model.Asset(card_md)
        try:
            # custom-gradient tracing only matters for training a reloaded model
            tf.saved_model.save(module, target, signatures=module.signatures(),
                                options=tf.saved_model.SaveOptions(
                                    experimental_custom_gradients=False))
            extra = os.path.join(target, "assets.extra")
            tf.io.gfile.makedirs(extra)
            with tf.io.gfile.GFile(os.path.join(extra, EXPORT_INFO_FILE), "w") as f:
                f.write(info_text)
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
            "temperature": None if calibration is None else calibration["temperature"],
            "model_card": [model_card_lib.CARD_JSON, model_card_lib.CARD_MD],
            "evaluation_in_card": card["evaluation"].get("metrics_file"),
            "signatures": sorted(module.signatures())}

"""A prepared TFDS image dataset as a contrastive (stage 1) input pipeline.

`micle-pretrain --tfds_name=NAME --tfds_data_dir=DIR` pretrains on natural images (e.g.
`imagenet2012`, `cifar10`, an `ImageFolder` you built, or our own `case_bags` datasets) with
the same model and loop as the records. `make_tfds_dataset` yields exactly the elements of
`data_pipelines.reader.make_dataset`:

- contrastive modes (`simclr`, `micle`): {"view1", "view2": float32 [B, S, S, 3] in [0, 1],
  "label", "case_id", "image_indices": int32 [B, 2]}. An image dataset has one image per
  example, so each image is its own case and `micle` equals `simclr` (two views of one
  image). A dataset with an `images` sequence (`case_bags`) is read as bags: `micle` then
  pairs two distinct images of a case, exactly as the record reader does.
- `supervised`: {"image", "label", "case_id"}, one element per image.

Labels come from a `label` feature when there is one (ClassLabel -> int32 index; an int
vector -> multilabel codes), else -1. `case_id` is the example's `case_id` feature, else a
hash of its `tfds_id` (file + position), so it is stable across runs.

Offline by construction: the dataset must already be prepared in the data_dir (it is opened
with `tfds.builder_from_directory`, which never downloads); an unprepared name is a clear
FileNotFoundError, never a download attempt.

Determinism and resuming: file order is shuffled once with the seed; example order, the
image pick and the augmentations of epoch e depend only on (seed, e), like the record reader,
so a run resumed at an epoch boundary sees the batches of an uninterrupted one.
"""
import os
import re

import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import reader
from data_pipelines.decode import decode_image

MODES = reader.MODES
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def default_data_dir():
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"),
                                                          "tensorflow_datasets")


def _versions(folder):
    if not tf.io.gfile.isdir(folder):
        return []
    found = []
    for name in tf.io.gfile.listdir(folder):
        name = name.rstrip("/")
        if _VERSION_RE.match(name) and tf.io.gfile.exists(
                os.path.join(folder, name, "dataset_info.json")):
            found.append(name)
    return sorted(found, key=lambda v: tuple(int(p) for p in v.split(".")))


def resolve_tfds_dir(name, data_dir=None):
    """`name` ("ds", "ds/config", "ds:1.2.0", "ds/config:1.2.0") -> the prepared folder
    `{data_dir}/ds[/config]/{version}` (newest version when none is given)."""
    data_dir = os.fspath(data_dir or default_data_dir())
    base, _, version = name.partition(":")
    parts = [p for p in base.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"bad TFDS name {name!r}; expected NAME, NAME/CONFIG or NAME:VERSION")
    folder = os.path.join(data_dir, *parts)
    where = f"{folder}/{version or '<version>'}/dataset_info.json"
    if len(parts) == 1 and not _versions(folder) and tf.io.gfile.isdir(folder):
        configs = [c.rstrip("/") for c in tf.io.gfile.listdir(folder)
                   if _versions(os.path.join(folder, c.rstrip("/")))]
        if len(configs) == 1:
            folder = os.path.join(folder, configs[0])
        elif configs:
            raise ValueError(f"TFDS dataset {name!r} in {data_dir} has several configs "
                             f"{sorted(configs)}: pass --tfds_name={parts[0]}/CONFIG")
    versions = _versions(folder)
    if version:
        versions = [v for v in versions if v == version]
    if not versions:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {data_dir} (no {where}). Prepare it "
            "first (e.g. `tfds build` with the source files in its manual_dir, or "
            "data_pipelines.tfds_builder.prepare_case_bags for micle-data records); "
            "micle-tf never downloads data.")
    return os.path.join(folder, versions[-1])


def load_builder(name, data_dir=None):
    """The prepared dataset as a (read-only) TFDS builder, offline."""
    return tfds.builder_from_directory(resolve_tfds_dir(name, data_dir))


def _image_key(features):
    for key in ("image", "images"):
        if key in features:
            return key
    for key, feature in features.items():
        if isinstance(feature, tfds.features.Image) or (
                isinstance(feature, tfds.features.Sequence)
                and isinstance(feature.feature, tfds.features.Image)):
            return key
    raise ValueError(f"no image feature in {sorted(features)}")


def describe(builder):
    """Facts about a prepared dataset, in the shape of records' dataset_info.json:
    {"task", "label_names", "splits": {name: {"cases", "images"}}, "num_cases", "num_images",
    "source", "image_key", "bags"}."""
    features = builder.info.features
    key = _image_key(features)
    bags = isinstance(features[key], tfds.features.Sequence)
    label = features["label"] if "label" in features else None
    task, names = "multiclass", []
    if isinstance(label, tfds.features.ClassLabel):
        names = list(label.names)
    elif label is not None and len(label.shape) == 1:
        task = "multilabel"
        meta = builder.info.metadata or {}
        names = list(meta.get("label_names") or [str(i) for i in range(label.shape[0])])
    splits = {s: {"cases": int(v.num_examples), "images": None if bags else int(v.num_examples)}
              for s, v in builder.info.splits.items()}
    return {
        "task": task,
        "label_names": names,
        "splits": splits,
        "num_cases": sum(v["cases"] for v in splits.values()),
        "num_images": None if bags else sum(v["cases"] for v in splits.values()),
        "source": f"tfds:{builder.info.full_name}",
        "image_size": None,
        "image_key": key,
        "bags": bags,
    }


def tfds_info(name, data_dir=None):
    return describe(load_builder(name, data_dir))


def _decode_any(feature):
    """Whether we read the feature's bytes (uint8/uint16 images: decode_image) or let TFDS
    decode it (float images)."""
    return getattr(feature, "np_dtype", None) is not None and \
        str(feature.np_dtype) in ("uint8", "uint16")


def make_tfds_dataset(name, data_dir, split, mode, batch_size, image_size, *, augment_fn=None,
                      seed=0, training=True, steps_per_epoch=None, start_epoch=0,
                      input_context=None, shuffle_buffer=2048, drop_remainder=None,
                      num_parallel_calls=tf.data.AUTOTUNE, builder=None, image_key=None):
    """Builds the dataset for one split of a prepared TFDS dataset (arguments as in
    `data_pipelines.reader.make_dataset`; `batch_size` is per replica with `input_context`).
    `builder` (from `load_builder`) skips the lookup; `image_key` overrides the image
    feature's name."""
    if mode not in MODES:
        raise ValueError(f"unknown reader mode {mode!r}; expected one of {MODES}")
    builder = builder or load_builder(name, data_dir)
    facts = describe(builder)
    if split not in builder.info.splits:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r} "
                         f"(splits: {sorted(builder.info.splits)})")
    features = builder.info.features
    key = image_key or facts["image_key"]
    bags = isinstance(features[key], tfds.features.Sequence)
    inner = features[key].feature if bags else features[key]
    own_decode = _decode_any(inner)
    task, num_classes = facts["task"], len(facts["label_names"])
    has_label = "label" in features
    has_case_id = "case_id" in features
    if drop_remainder is None:
        drop_remainder = training

    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    num_files = builder.info.splits[split].num_shards
    tfds_shards = num_pipelines > 1 and num_files >= num_pipelines
    read_config = tfds.ReadConfig(
        shuffle_seed=seed, shuffle_reshuffle_each_iteration=False, add_tfds_id=True,
        input_context=input_context if tfds_shards else None, try_autocache=False)
    decoders = {key: tfds.decode.SkipDecoding()} if own_decode else None
    base = builder.as_dataset(split=split, shuffle_files=training, read_config=read_config,
                              decoders=decoders)
    if num_pipelines > 1 and not tfds_shards:  # fewer files than pipelines: every k-th example
        base = base.shard(num_pipelines, pipeline_id)

    def to_float(image):
        if own_decode:
            return decode_image(image)
        image = tf.image.convert_image_dtype(image, tf.float32)
        channels = tf.shape(image)[-1]
        image = tf.cond(tf.equal(channels, 1), lambda: tf.tile(image, [1, 1, 3]),
                        lambda: image[..., :3])
        image.set_shape([None, None, 3])
        return image

    def common(ex):
        if has_label:
            label = tf.cast(ex["label"], tf.int32)
        elif task == "multilabel":
            label = tf.fill([num_classes], -2)
        else:
            label = tf.constant(-1, tf.int32)
        if has_case_id:
            case_id = ex["case_id"]
        else:
            case_id = tf.strings.as_string(tf.strings.to_hash_bucket_fast(ex["tfds_id"],
                                                                          2 ** 63 - 1))
        return label, case_id

    def normalise(ex):
        """-> {"encoded": [N, ...] (N = 1 for an image dataset), "label", "case_id"}."""
        label, case_id = common(ex)
        images = ex[key] if bags else ex[key][tf.newaxis]
        return {"encoded": images, "label": label, "case_id": case_id}

    def one_stream(epoch):
        epoch = tf.cast(epoch, tf.int64)
        ds = base.map(normalise, num_parallel_calls=num_parallel_calls, deterministic=True)
        return reader.bag_stream(ds, mode, batch_size, image_size, to_float=to_float,
                                 augment_fn=augment_fn, seed=seed, pipeline_id=pipeline_id,
                                 epoch=epoch, training=training, shuffle_buffer=shuffle_buffer,
                                 drop_remainder=drop_remainder,
                                 steps_per_epoch=steps_per_epoch,
                                 num_parallel_calls=num_parallel_calls)

    return reader.epoch_streams(one_stream, training, steps_per_epoch, start_epoch)


def distributed_tfds_dataset(strategy, name, data_dir, split, mode, global_batch_size,
                             image_size, **kwargs):
    """Per-replica batches under `strategy.distribute_datasets_from_function` (see
    `data_pipelines.reader.distributed_dataset`)."""
    if global_batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"global batch {global_batch_size} is not divisible by "
                         f"{strategy.num_replicas_in_sync} replicas")
    builder = kwargs.pop("builder", None) or load_builder(name, data_dir)

    def dataset_fn(input_context):
        return make_tfds_dataset(name, data_dir, split, mode,
                                 input_context.get_per_replica_batch_size(global_batch_size),
                                 image_size, input_context=input_context, builder=builder,
                                 **kwargs)

    return strategy.distribute_datasets_from_function(dataset_fn)

"""Streaming tf.data reader for case-bag records.

Modes:
- `simclr`: one image drawn from each case, two augmented views of it.
- `micle`: two *distinct* images of the same case, each augmented; a one-image case falls back to
  two views of its single image. The pair is re-drawn every time the case comes round (each
  epoch), uniformly at random.
- `supervised`: one element per image with its case's label and hashed case id (for image-level
  training and for case-level evaluation, which averages a case's images).

Determinism: every random choice (which image, which augmentation) is a stateless op fed by a
per-element seed folded from (seed, input pipeline, epoch, position in the stream); file order,
interleave and shuffle are seeded and the pipeline is deterministic, so one seed gives one stream
however many parallel calls run. Memory is bounded by the shuffle buffers, not the dataset size.
"""
import glob
import os
import re

import tensorflow as tf

from data_pipelines import schema
from data_pipelines.decode import (decode_image, decode_to_pixels, pixels_to_float,
                                   resize_image)
from data_pipelines.writer import read_info

MODES = ("simclr", "micle", "supervised")
_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


def list_shards(data_dir, split):
    """The shard files of a split, checked to be complete (all i of N present, one N)."""
    paths = sorted(glob.glob(os.path.join(data_dir, f"{split}-*-of-*.tfrecord")))
    found = {}
    for p in paths:
        m = _SHARD_RE.match(os.path.basename(p))
        if m and m.group("split") == split:
            found[int(m.group("index"))] = (int(m.group("count")), p)
    if not found:
        raise FileNotFoundError(f"no shards for split {split!r} in {data_dir}")
    counts = {c for c, _ in found.values()}
    if len(counts) != 1:
        raise ValueError(f"split {split!r} in {data_dir} mixes shard sets of sizes {sorted(counts)}")
    count = counts.pop()
    missing = sorted(set(range(count)) - set(found))
    if missing:
        raise FileNotFoundError(f"split {split!r} in {data_dir} is missing shard(s) "
                                f"{missing[:10]} of {count}")
    return [found[i][1] for i in range(count)]


class ShardError(IOError):
    """A shard that cannot be read to its end (truncated or corrupt), or a record in it that
    does not parse; `path` names the file."""

    def __init__(self, path, message):
        super().__init__(message)
        self.path = path


def _tf_message(error):
    """A TF op error's message without the function-node prefix and op suffix."""
    msg = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", msg, flags=re.S).strip()


def verify_shards(data_dir, split, info=None, parse=True):
    """Reads every record of every shard of a split, one file at a time, and raises ShardError
    naming the first file that is truncated or corrupt (and, with `parse`, a record that does
    not parse: bad label, empty bag; the message then also names the case id). Returns
    {shard path: number of records}.

    Why it exists: TensorFlow's DataLossError for a record cut in its payload names only a byte
    offset, not the file, and a file cut inside a record's 12-byte header reads as a clean end
    of file (the partial record is silently lost). Here the bytes of the records read must add
    up to the file size. Training calls this to name the file when reading fails; it reads the
    whole split, so it runs on demand, not before every run."""
    info = info or read_info(data_dir)
    task, num_classes = info["task"], len(info["label_names"])
    counts = {}
    for path in list_shards(data_dir, split):
        ds = tf.data.TFRecordDataset(path)
        if parse:
            ds = ds.map(lambda r: (tf.strings.length(r),
                                   schema.parse_case(r, task, num_classes)["case_id"]))
        else:
            ds = ds.map(lambda r: (tf.strings.length(r), tf.constant(b"")))
        n = nbytes = 0
        try:
            for length, _ in ds:
                n += 1
                nbytes += int(length) + 16  # length (8) + its CRC (4) + data + data CRC (4)
        except tf.errors.DataLossError as e:
            raise ShardError(path, f"{path}: truncated or corrupt TFRecord shard (read {n} good "
                                   f"records; {_tf_message(e)})") from None
        except tf.errors.InvalidArgumentError as e:
            raise ShardError(path, f"{path}: record {n} is invalid: {_tf_message(e)}") from None
        size = tf.io.gfile.stat(path).length
        if size != nbytes:
            raise ShardError(path, f"{path}: truncated TFRecord shard ({size - nbytes} bytes "
                                   f"after the last complete record, {n} records read)")
        counts[path] = n
    return counts


def check_shard_sizes(files, info, split):
    """Raises ShardError naming the first shard whose size differs from the one the writer
    recorded in dataset_info.json (splits.<split>.shard_bytes): a truncated, padded or
    replaced file. One stat per shard, so it runs whenever a dataset is built. Records written
    before the sizes were recorded are not checked (`verify_shards` reads them)."""
    expected = info.get("splits", {}).get(split, {}).get("shard_bytes")
    if not expected:
        return
    if len(expected) != len(files):
        raise ShardError(files[0], f"split {split!r} has {len(files)} shard files, "
                                   f"dataset_info.json lists {len(expected)}")
    for path, size in zip(files, expected):
        actual = tf.io.gfile.stat(path).length
        if actual != size:
            what = "truncated" if actual < size else "longer than written"
            raise ShardError(path, f"{path}: {what} TFRecord shard ({actual} bytes, "
                                   f"dataset_info.json records {size}); rewrite it with "
                                   f"micle-data or restore the file")


def read_pixel_hashes(data_dir, split, info=None):
    """{pixel_sha256: number of images} of a split, reading only the hash and id features
    (no image is decoded). Images of records written before the hashes existed count under
    the key None. Damaged shards raise ShardError naming the file, as in `read_case_index`."""
    info = info or read_info(data_dir)
    task, num_classes = info["task"], len(info["label_names"])
    files = list_shards(data_dir, split)
    check_shard_sizes(files, info, split)
    counts = {}
    for path in files:
        ds = tf.data.TFRecordDataset(path).map(
            lambda r: (schema.parse_pixel_hashes(r)["pixel_sha256"],
                       tf.strings.length(r, unit="BYTE")))
        nbytes = 0
        for hashes, length in _read_shard(ds, path, task, num_classes):
            nbytes += int(length) + 16
            if len(hashes) == 0:
                counts[None] = counts.get(None, 0) + 1
            for h in hashes:
                counts[h.decode()] = counts.get(h.decode(), 0) + 1
        size = tf.io.gfile.stat(path).length
        if size != nbytes:
            raise ShardError(path, f"{path}: truncated TFRecord shard ({size - nbytes} bytes "
                                   "after the last complete record); rewrite it with "
                                   "micle-data or restore the file")
    return counts


def read_case_attributes(data_dir, split, info=None):
    """{case_id: {attribute: token}} of a split (`case/attr/*`, see `data_pipelines.schema`),
    reading only the id and attribute features (no image is decoded). A case without
    attributes (a source that has none, or records written before the keys existed) maps to
    {}. Damaged shards raise ShardError naming the file, as in `read_case_index`."""
    info = info or read_info(data_dir)
    task, num_classes = info["task"], len(info["label_names"])
    files = list_shards(data_dir, split)
    check_shard_sizes(files, info, split)
    names = schema.CASE_ATTRIBUTES
    out = {}
    for path in files:
        ds = tf.data.TFRecordDataset(path).map(
            lambda r: (schema.parse_case_attributes(r), tf.strings.length(r, unit="BYTE")))
        nbytes = 0
        for parsed, length in _read_shard(ds, path, task, num_classes):
            nbytes += int(length) + 16
            values = parsed["attributes"]
            out[parsed["case_id"].decode()] = {n: values[n].decode() for n in names
                                               if values[n]}
        size = tf.io.gfile.stat(path).length
        if size != nbytes:
            raise ShardError(path, f"{path}: truncated TFRecord shard ({size - nbytes} bytes "
                                   "after the last complete record); rewrite it with "
                                   "micle-data or restore the file")
    return out


def _case_filter(case_ids):
    keys = tf.constant(sorted(set(case_ids)), tf.string)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(keys, tf.ones_like(keys, tf.int32)), default_value=0)
    return lambda case: tf.equal(table.lookup(case["case_id"]), 1)


def _has_label(case):
    label = case["label"]
    if label.shape.rank == 0:
        return label >= 0
    return tf.reduce_any(label >= 0)


def make_dataset(data_dir, split, mode, batch_size, image_size, *, augment_fn=None, seed=0,
                 training=True, steps_per_epoch=None, start_epoch=0, shuffle_buffer=512,
                 input_context=None, case_ids=None, labelled_only=False, drop_remainder=None,
                 num_parallel_calls=tf.data.AUTOTUNE, cycle_length=4, info=None,
                 cache_decoded=False):
    """Builds the dataset for one split.

    batch_size: per-replica batch when `input_context` is given (see `distributed_dataset`),
      else the global batch.
    augment_fn: `fn(image, seed) -> [image_size, image_size, 3]` (stateless, e.g.
      `micle_tf.augment.build_augment`). None = deterministic resize only. A function that
      returns `(view, params)` (`build_augment(..., placement="device")`) adds
      "view1_augment_params"/"view2_augment_params" to the batches: the photometric draws
      that the train step applies on the accelerator.
    training: True -> shuffled, repeated forever, augmented; False -> one ordered pass, no
      augmentation (evaluation).
    steps_per_epoch, start_epoch: with `steps_per_epoch`, training epoch e is a stream seeded
      by (seed, e) cut to `steps_per_epoch` batches, and the dataset starts at `start_epoch`.
      Data of epoch e is then the same whether a run starts at 0 or resumes at e: this is what
      makes resuming from a checkpoint taken at an epoch boundary exact.
    case_ids: optional iterable of hashed case ids to keep (label-fraction subsets).
    labelled_only: keep labelled cases only (unlabelled cases are not training data here).
    cache_decoded: decode every image once and keep the decoded cases in memory (their own
      8- or 16-bit samples: H*W*3 bytes per 8-bit image); later epochs skip read, parse and
      decode (1.3-2.0x the pairs/s at 32 px, 1.0-1.2x at 64-224 px where augmentation
      dominates; bench/README.md). For data sets that fit in
      RAM (PH2: 12 MB). Training then shuffles all cases each epoch instead of files + a
      buffer: a different stream from the default, equally deterministic and resumable.

    Elements: contrastive modes -> {"view1", "view2": float32 [B,S,S,3], "label",
    "case_id", "image_indices": int32 [B,2]}; supervised -> {"image", "label", "case_id"}.
    """
    if mode not in MODES:
        raise ValueError(f"unknown reader mode {mode!r}; expected one of {MODES}")
    info = info or read_info(data_dir)
    task, num_classes = info["task"], len(info["label_names"])
    files = list_shards(data_dir, split)
    check_shard_sizes(files, info, split)
    num_pipelines = input_context.num_input_pipelines if input_context else 1
    pipeline_id = input_context.input_pipeline_id if input_context else 0
    if drop_remainder is None:
        drop_remainder = training
    shard_records = num_pipelines > 1 and len(files) < num_pipelines
    if num_pipelines > 1 and not shard_records:
        files = files[pipeline_id::num_pipelines]
    keep_case = _case_filter(case_ids) if case_ids is not None else None

    def cases(epoch, shuffle_files):
        """Files (shuffled per epoch) -> parsed, filtered cases."""
        ds = tf.data.Dataset.from_tensor_slices(files)
        if shuffle_files:
            ds = ds.shuffle(len(files), seed=seed * 7919 + epoch, reshuffle_each_iteration=True)
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
                           block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True)
        if shard_records:  # fewer files than pipelines: each keeps every k-th case
            ds = ds.shard(num_pipelines, pipeline_id)
        ds = ds.map(lambda r: schema.parse_case(r, task, num_classes),
                    num_parallel_calls=num_parallel_calls, deterministic=True)
        if keep_case is not None:
            ds = ds.filter(keep_case)
        if labelled_only:
            ds = ds.filter(_has_label)
        return ds

    decoded = None
    if cache_decoded:  # built once, outside the per-epoch streams, so every epoch shares it
        decoded = cases(tf.constant(0, tf.int64), False).map(
            _decode_bag, num_parallel_calls=num_parallel_calls, deterministic=True).cache()
        # A full shuffle: the buffer holds references to cached tensors, not copies.
        counts = info["splits"].get(split, {})
        shuffle_buffer = int(counts.get("images" if mode == "supervised" else "cases", 0)) + 1

    def one_stream(epoch):
        """Cases (-> images) -> [shuffle, repeat] -> seeded elements -> batches."""
        epoch = tf.cast(epoch, tf.int64)
        ds = decoded if cache_decoded else cases(epoch, training)
        return bag_stream(ds, mode, batch_size, image_size, to_float=decode_image,
                          augment_fn=augment_fn, seed=seed, pipeline_id=pipeline_id,
                          epoch=epoch, training=training, shuffle_buffer=shuffle_buffer,
                          drop_remainder=drop_remainder, steps_per_epoch=steps_per_epoch,
                          num_parallel_calls=num_parallel_calls)

    return epoch_streams(one_stream, training, steps_per_epoch, start_epoch)


def _decode_bag(case):
    """A parsed case with its images decoded: "encoded" -> "pixels" (ragged uint8 [N, None],
    see `decode.decode_to_pixels`), "shapes" [N, 3], "is_16bit" [N]."""
    encoded = case["encoded"]
    n = tf.shape(encoded)[0]
    arrays = (tf.TensorArray(tf.uint8, size=n, infer_shape=False),
              tf.TensorArray(tf.int64, size=n), tf.TensorArray(tf.bool, size=n),
              tf.TensorArray(tf.int32, size=n))

    def body(k, pix, shapes, is_16bit, lengths):
        p, shape, sixteen = decode_to_pixels(encoded[k])
        # int64: a Shape op's int32 output in a TensorList trips TF's type inference warnings
        return (k + 1, pix.write(k, p), shapes.write(k, tf.cast(shape, tf.int64)),
                is_16bit.write(k, sixteen),
                lengths.write(k, tf.size(p)))

    _, pix, shapes, is_16bit, lengths = tf.while_loop(lambda k, *_: k < n, body,
                                                      (tf.constant(0), *arrays))
    out = {k: v for k, v in case.items() if k != "encoded"}
    out.update(pixels=tf.RaggedTensor.from_row_lengths(pix.concat(), lengths.stack()),
               shapes=tf.reshape(tf.cast(shapes.stack(), tf.int32), [-1, 3]),
               is_16bit=is_16bit.stack())
    return out


def bag_stream(bags, mode, batch_size, image_size, *, to_float, augment_fn, seed, pipeline_id,
               epoch, training, shuffle_buffer, drop_remainder, steps_per_epoch,
               num_parallel_calls=tf.data.AUTOTUNE):
    """What every source shares, from bags to batches: bags {"encoded": [N] items, "label",
    "case_id"} (-> one element per image in supervised mode) -> [shuffle, repeat] -> one seed
    per element -> image pair or image, augmented -> batches (-> first `steps_per_epoch`).

    `to_float(item) -> float32 [H, W, 3]` decodes one item (bytes for records, a uint8 image
    for some TFDS features). Bags already decoded by `_decode_bag` (the decoded-case cache)
    carry "pixels"/"shapes"/"is_16bit" instead of "encoded"."""
    image_keys = ("pixels", "shapes", "is_16bit") if "pixels" in bags.element_spec else (
        "encoded",)

    def image(bag, k=None):
        """Image k of a bag as float32 (k None: the element holds one image)."""
        items = [bag[key] if k is None else bag[key][k] for key in image_keys]
        return pixels_to_float(*items) if len(items) == 3 else to_float(items[0])

    def view(img, s):
        """-> (view, params): params are the photometric draws left to the accelerator when
        `augment_fn` was built with placement="device", else None."""
        params = None
        if augment_fn is not None and training:
            out = augment_fn(img, s)
            if isinstance(out, tuple):
                out, params = out
        else:
            out = resize_image(img, image_size)
        return tf.ensure_shape(tf.cast(out, tf.float32), [image_size, image_size, 3]), params

    def with_params(element, **params):
        element.update({f"{name}_augment_params": p for name, p in params.items()
                        if p is not None})
        return element

    if mode == "supervised":
        def element(ex, s):
            img, params = view(image(ex), s)
            if params is not None:
                raise ValueError("device-placed augmentation is for the contrastive modes; "
                                 "supervised mode augments on the host")
            return {"image": img, "label": ex["label"], "case_id": ex["case_id"]}
    else:
        def element(case, s):
            pick_i, pick_j, aug_1, aug_2 = tf.unstack(
                tf.random.experimental.stateless_split(s, num=4))
            n = tf.shape(case[image_keys[-1]])[0]
            i = tf.random.stateless_uniform([], pick_i, 0, n, dtype=tf.int32)
            if mode == "micle":  # j uniform over the other n-1 images, or i for a 1-image bag
                j = tf.random.stateless_uniform([], pick_j, 0, tf.maximum(n - 1, 1),
                                                dtype=tf.int32)
                j = tf.where(n > 1, j + tf.cast(j >= i, tf.int32), i)
            else:
                j = i
            image_i = image(case, i)
            image_j = tf.cond(tf.equal(i, j), lambda: image_i, lambda: image(case, j))
            (view1, params1), (view2, params2) = view(image_i, aug_1), view(image_j, aug_2)
            return with_params({"view1": view1, "view2": view2, "label": case["label"],
                                "case_id": case["case_id"], "image_indices": tf.stack([i, j])},
                               view1=params1, view2=params2)

    ds = bags
    if mode == "supervised":
        def explode(c):
            n = tf.shape(c[image_keys[-1]])[:1]
            out = {key: c[key] for key in image_keys}
            out.update(case_id=tf.fill(n, c["case_id"]),
                       label=tf.repeat(c["label"][tf.newaxis], n[0], axis=0))
            return out
        ds = ds.map(explode).unbatch()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed * 7919 + epoch + 1,
                        reshuffle_each_iteration=True).repeat()
    # One seed per element from (seed, pipeline, epoch, position): stateless, so the same
    # element gets the same image pick and augmentation however many threads run.
    base = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(seed, tf.int64), tf.constant(pipeline_id, tf.int64)]), epoch)
    ds = ds.enumerate().map(
        lambda k, x: element(x, tf.random.experimental.stateless_fold_in(base, k)),
        num_parallel_calls=num_parallel_calls, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.take(steps_per_epoch) if steps_per_epoch else ds


def epoch_streams(one_stream, training, steps_per_epoch, start_epoch):
    """With `steps_per_epoch`, training epoch e is `one_stream(e)` cut to that many batches and
    the dataset starts at `start_epoch`; otherwise one stream. Deterministic, prefetched."""
    if training and steps_per_epoch:
        ds = tf.data.Dataset.range(start_epoch, 2 ** 62).flat_map(one_stream)
    else:
        ds = one_stream(start_epoch)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def distributed_dataset(strategy, data_dir, split, mode, global_batch_size, image_size, **kwargs):
    """Per-replica batches under `strategy.distribute_datasets_from_function`: each input
    pipeline reads its own shards (or every k-th case when shards are fewer than pipelines) and
    batches `global_batch_size / num_replicas` examples."""
    info = kwargs.pop("info", None) or read_info(data_dir)
    if global_batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"global batch {global_batch_size} is not divisible by "
                         f"{strategy.num_replicas_in_sync} replicas")

    def dataset_fn(input_context):
        return make_dataset(data_dir, split, mode,
                            input_context.get_per_replica_batch_size(global_batch_size),
                            image_size, input_context=input_context, info=info, **kwargs)

    return strategy.distribute_datasets_from_function(dataset_fn)


def read_case_index(data_dir, split, info=None):
    """[(case_id, label, num_images)] of a split, in record order, without decoding images.
    Used to pick label-fraction subsets and to check split disjointness.

    Reads shard by shard and raises ShardError naming the file for a corrupt record, a record
    that does not parse, or a file whose size is not the sum of its records' (a shard cut
    inside a record header, which TF reads as a clean end of file): the index is read before
    fine-tuning and evaluation, so a damaged shard stops them with its name instead of losing
    cases silently, also for records written without `shard_bytes` in dataset_info.json."""
    info = info or read_info(data_dir)
    task, num_classes = info["task"], len(info["label_names"])
    files = list_shards(data_dir, split)
    check_shard_sizes(files, info, split)

    def summary(record):
        case = schema.parse_case(record, task, num_classes)
        return (case["case_id"], case["label"], tf.shape(case["encoded"])[0],
                tf.strings.length(record, unit="BYTE"))

    out = []
    for path in files:
        ds = tf.data.TFRecordDataset(path).map(summary, num_parallel_calls=tf.data.AUTOTUNE,
                                               deterministic=True).batch(1024)
        n = nbytes = 0
        for case_ids, labels, num_images, lengths in _read_shard(ds, path, task, num_classes):
            n += len(case_ids)
            nbytes += int(lengths.sum(dtype="int64")) + 16 * len(case_ids)  # framing
            for case_id, label, count in zip(case_ids, labels, num_images):
                if task == "multiclass":
                    label = int(label) if int(label) >= 0 else None
                else:
                    label = ([int(v) for v in label] if (label != schema.MISSING).any()
                             else None)
                out.append((case_id.decode(), label, int(count)))
        size = tf.io.gfile.stat(path).length
        if size != nbytes:
            raise ShardError(path, f"{path}: truncated TFRecord shard ({size - nbytes} bytes "
                                   f"after the last complete record, {n} records read; cut "
                                   f"short or with bytes appended); rewrite it with "
                                   f"micle-data or restore the file")
    return out


def _read_shard(ds, path, task, num_classes):
    """Yields the numpy elements of `ds` (one shard), turning read and parse errors into a
    ShardError naming `path`."""
    try:
        yield from ds.as_numpy_iterator()
    except tf.errors.DataLossError as e:
        good = _records_before_error(path, task, num_classes)
        raise ShardError(path, f"{path}: truncated or corrupt TFRecord shard (read {good} "
                               f"good records; {_tf_message(e)})") from None
    except tf.errors.InvalidArgumentError as e:
        good = _records_before_error(path, task, num_classes)
        msg = _tf_message(e)  # TF quotes the whole record when it is not an Example
        msg = msg if len(msg) <= 400 else msg[:400] + " ..."
        raise ShardError(path, f"{path}: record {good} is invalid: {msg}") from None
    except UnicodeDecodeError:
        # TF quotes the record's raw bytes in the message of a record that is not a
        # tf.train.Example; its Python wrapper then fails to decode the message itself.
        good = _records_before_error(path, task, num_classes)
        raise ShardError(path, f"{path}: record {good} is invalid: not a serialized "
                               f"tf.train.Example (binary garbage)") from None


def _records_before_error(path, task, num_classes):
    """How many records of `path` read and parse before the first error (the error path of
    `read_case_index`, which reads in batches)."""
    ds = tf.data.TFRecordDataset(path).map(
        lambda r: tf.shape(schema.parse_case(r, task, num_classes)["encoded"])[0])
    n = 0
    try:
        for _ in ds:
            n += 1
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, UnicodeDecodeError):
        pass
    return n

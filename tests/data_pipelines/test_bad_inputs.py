"""The bad-input matrix, one test (or one parametrized case) per row, each showing its outcome:
a clear error naming the item, or a counted rejection in dataset_info.json. Nothing is dropped
silently: a conversion reports items read = written + rejected.

| row                                           | outcome                                         |
|-----------------------------------------------|-------------------------------------------------|
| corrupt image bytes                           | rejection "cases.csv:4" (not a recognised image)|
| zero-byte file                                | rejection "cases.csv:6" (zero-byte image file)  |
| truncated image                               | rejection "cases.csv:10" (cannot decode image)  |
| missing file                                  | rejection "cases.csv:8" (missing file)          |
| empty case (no usable image)                  | case rejection "case at cases.csv:12" (+ :11)   |
| one case id, rows with conflicting labels     | every row + the case rejected (cases.csv:13-14) |
| unknown label                                 | rejection "cases.csv:11" (unknown label ...)    |
| label out of range in a record                | reader error naming the case id                 |
| truncated (or padded) TFRecord shard          | ShardError naming the file when the dataset is  |
|                                               | built (sizes in dataset_info.json); records     |
|                                               | without sizes: DataLossError while reading (TF  |
|                                               | names only a byte offset); `verify_shards` and  |
|                                               | the training path (ShardError) name the file    |
| missing CSV column                            | ValueError naming the column and the CSV        |
| mixed grey / grey+alpha / RGBA / 16-bit /     | written, and decoded to [S, S, 3] in [0, 1] with|
|   palette images in one bag                   | the expected pixel values                       |
| NaN/inf loss during training                  | tests/micle_tf/test_resume.py::                 |
|                                               |   test_nonfinite_loss_stops_with_last_good_... |
| serving: malformed bytes / wrong shape        | tests/micle_tf/test_export.py: request error    |
|                                               | naming the item; wrong pixel shapes refused     |

The image rows reuse the folder fixture of test_sources.py (converted once for the module);
test_sources.py checks the same conversion as a whole, this file row by row.
"""
import csv
import io
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import reader, schema, writer
from data_pipelines.sources import folder
from tests.data_pipelines.images import coded_rgb, encode
from tests.helpers import build_records, write_folder_fixture


@pytest.fixture(scope="module")
def folder_conversion(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    source = folder.build(str(write_folder_fixture(root)), label_names=["benign", "malignant"])
    info = writer.write_dataset(source, str(root / "out"), b"salt", seed=0,
                                fractions=(("train", 1.0),))
    return info, {r["item"]: r for r in info["rejected"]}


@pytest.mark.parametrize("row,items,reason", [
    ("corrupt image bytes", ["cases.csv:4"], r"^(not a recognised image|cannot decode image)"),
    ("zero-byte file", ["cases.csv:6"], r"zero-byte image file"),
    ("truncated image", ["cases.csv:10"], r"^cannot decode image"),
    ("missing file", ["cases.csv:8"], r"^missing file$"),
    ("empty case", ["case at cases.csv:12", "case at cases.csv:11"], r"^empty case"),
    ("one case id with conflicting labels",
     ["cases.csv:13", "cases.csv:14", "case at cases.csv:13-14"], r"conflicting labels"),
    ("unknown label", ["cases.csv:11"], r"unknown label 'unknown-dx'"),
])
def test_rejected_with_the_item_named(folder_conversion, row, items, reason):
    info, rejected = folder_conversion
    for item in items:
        assert item in rejected, f"{row}: {item} not in {sorted(rejected)}"
        assert re.search(reason, rejected[item]["reason"]), (row, rejected[item])


def test_conversion_accounts_for_every_item(folder_conversion):
    info, _ = folder_conversion
    assert info["items_read"] == info["items_written"] + info["items_rejected"] == 15
    assert info["num_rejected"] == len(info["rejected"])
    assert info["items_rejected"] == sum(r["kind"] == "image" for r in info["rejected"])


def _record_dir(tmp_path, records, label_names=("a", "b"), shards=1):
    """A data_dir with hand-built records (bypassing the writer's validation)."""
    per_shard = [records[i::shards] for i in range(shards)]
    for i, recs in enumerate(per_shard):
        with tf.io.TFRecordWriter(writer.shard_path(str(tmp_path), "train", i, shards)) as w:
            for r in recs:
                w.write(r)
    writer.write_json_atomic(str(tmp_path / writer.INFO_FILE), {
        "task": "multiclass", "label_names": list(label_names),
        "splits": {"train": {"cases": len(records), "images": len(records)}}})
    return str(tmp_path)


def _raw_case(case_id, label):
    png = encode(coded_rgb(7), "PNG")
    feature = {
        schema.CASE_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[case_id])),
        schema.NUM_IMAGES: tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        schema.IMAGE_ENCODED: tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
        schema.IMAGE_FORMAT: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"png"])),
        schema.LABEL_CLASS: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.mark.parametrize("mode", ["supervised", "micle"])
def test_label_out_of_range_in_a_record_names_the_case(tmp_path, mode):
    data_dir = _record_dir(tmp_path, [_raw_case(b"good-case", 1), _raw_case(b"bad-case-77", 7)])
    ds = reader.make_dataset(data_dir, "train", mode, 2, 8, training=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)outside \[0, 2\).*bad-case-77"):
        for _ in ds:
            pass
    with pytest.raises(reader.ShardError, match=r"(?s)train-00000-of-00001.*bad-case-77"):
        reader.verify_shards(data_dir, "train")


def _truncate(data_dir, cut):
    bad = writer.shard_path(data_dir, "train", 1, 2)
    with open(bad, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[:cut(data)])
    return bad


@pytest.fixture
def shard_pair(tmp_path):
    return _record_dir(tmp_path, [_raw_case(f"case-{i}".encode(), i % 2) for i in range(8)],
                       shards=2)


def test_truncated_shard_is_named(shard_pair):
    """Cut inside a record's payload: TF raises DataLossError while reading, naming a byte
    offset but not the file; `reader.verify_shards` names the file."""
    bad = _truncate(shard_pair, lambda data: len(data) // 2 + 40)
    with pytest.raises(tf.errors.DataLossError, match="truncated record") as tf_err:
        for _ in reader.make_dataset(shard_pair, "train", "supervised", 2, 8, training=False):
            pass
    assert "train-00001" not in str(tf_err.value)
    with pytest.raises(reader.ShardError, match=r"train-00001-of-00002\.tfrecord: truncated"
                                                r" or corrupt.*read 2 good records") as err:
        reader.verify_shards(shard_pair, "train", parse=False)
    assert err.value.path == bad


def test_shard_cut_inside_a_record_header_is_named(shard_pair):
    """Cut inside a record's 12-byte header of records written without shard sizes (hand-built
    here; the writer records sizes, see the last test): TF reads it as a clean end of file and
    the partial record is lost without an error (TF behaviour, also in training); only
    `reader.verify_shards`, which checks the records' bytes against the file size, notices."""
    _truncate(shard_pair, lambda data: len(data) // 2 + 5)  # 4 equal records per shard
    seen = [b["case_id"].numpy() for b in reader.make_dataset(
        shard_pair, "train", "supervised", 1, 8, training=False)]
    assert len(seen) == 6  # 8 cases written, 2 lost silently by TF
    with pytest.raises(reader.ShardError, match=r"train-00001-of-00002\.tfrecord: truncated "
                                                r"TFRecord shard \(5 bytes after"):
        reader.verify_shards(shard_pair, "train")


def test_truncated_shard_during_training_names_the_file(shard_pair):
    """The training path (run_pretraining) turns TF's DataLossError into a ShardError naming
    the shard."""
    from micle_tf import config as config_lib
    from micle_tf.training import pretrain

    data_dir = shard_pair
    _truncate(data_dir, lambda data: len(data) // 2 + 40)
    cfg = config_lib.PretrainConfig(
        method="simclr", data_dir=data_dir, model_dir=os.path.join(data_dir, "model"),
        batch_size=4, train_steps=2,
        steps_per_epoch=1, knn_monitor=False, linear_probe=False, verbose=0, augment="none",
        model=config_lib.ModelConfig(backbone="resnet18", width_multiplier=0.125,
                                     image_size=8, num_proj_layers=1))
    with pytest.raises(reader.ShardError, match=r"train-00001-of-00002\.tfrecord: truncated"):
        pretrain.run_pretraining(cfg)


def test_missing_csv_column_is_named(tmp_path):
    # (test_sources.py covers a missing case_id column; this is the image_path column)
    (tmp_path / "rows.csv").write_text("case_id,path,label\nx,a.png,b\n")
    with pytest.raises(ValueError,
                       match=r"rows\.csv: missing required column\(s\) \['image_path'\]"):
        folder.build(str(tmp_path / "rows.csv"))


def test_mixed_image_kinds_in_one_bag_are_written_and_decoded(tmp_path):
    """Greyscale 8-bit, greyscale+alpha, RGBA, 16-bit greyscale, palette and RGB JPEG images
    in one case: all written, all decoded to RGB in [0, 1] with the expected values."""
    from PIL import Image

    def palette_png():
        im = Image.new("P", (8, 8), color=3)
        im.putpalette([0, 0, 0] * 3 + [200, 100, 50] + [0, 0, 0] * 252)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    images = {  # name: (bytes, expected red value 0..255)
        "gray8.png": (encode(np.full((8, 8), 60, np.uint8), "PNG"), 60),
        "gray_alpha.png": (encode(np.dstack([np.full((8, 8), 80, np.uint8),
                                             np.full((8, 8), 10, np.uint8)]), "PNG"), 80),
        "rgba.png": (encode(np.dstack([coded_rgb(100), np.full((8, 8), 0, np.uint8)]), "PNG"),
                     100),
        "gray16.png": (encode(np.full((8, 8), 52428, np.uint16), "PNG"), 204),  # 0.8 * 255
        "palette.png": (palette_png(), 200),
        "rgb.jpg": (encode(coded_rgb(150), "JPEG"), 150),
    }
    (tmp_path / "img").mkdir()
    with open(tmp_path / "bag.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image_path", "label"])
        for name, (data, _) in images.items():
            (tmp_path / "img" / name).write_bytes(data)
            w.writerow(["one-case", f"img/{name}", "x"])
    info = writer.write_dataset(folder.build(str(tmp_path / "bag.csv")), str(tmp_path / "out"),
                                b"s", fractions=(("train", 1.0),))
    assert info["num_rejected"] == 0 and info["num_cases"] == 1
    assert info["items_read"] == info["items_written"] == len(images)
    data_dir = str(tmp_path / "out")
    batch = next(iter(reader.make_dataset(data_dir, "train", "supervised", len(images), 8,
                                          training=False)))
    pixels = batch["image"].numpy()
    assert pixels.shape == (len(images), 8, 8, 3)
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1
    got = sorted(np.round(pixels[:, 2:6, 2:6, 0].mean(axis=(1, 2)) * 255).astype(int))
    want = sorted(v for _, v in images.values())
    assert np.allclose(got, want, atol=3), (got, want)
    grey = pixels[np.argsort(pixels[:, 4, 4, 0])]
    # greyscale kinds come out as three equal channels
    for k, (name, (_, v)) in enumerate(sorted(images.items(), key=lambda kv: kv[1][1])):
        if name.startswith("gray"):
            np.testing.assert_allclose(grey[k, 4, 4], [v / 255] * 3, atol=3 / 255)
    # and the bag feeds the contrastive modes (two distinct images of the one case)
    pair = next(iter(reader.make_dataset(data_dir, "train", "micle", 2, 8, seed=1)))
    assert pair["view1"].shape == (2, 8, 8, 3)
    idx = pair["image_indices"].numpy()
    assert (idx[:, 0] != idx[:, 1]).all()


def _record_spans(path):
    """[(start, end)] byte spans of the records of a TFRecord file."""
    spans, start = [], 0
    for r in tf.data.TFRecordDataset(path):
        end = start + 12 + len(r.numpy()) + 4
        spans.append((start, end))
        start = end
    return spans


@pytest.mark.parametrize("damage", ["cut in a header", "cut in a payload", "bytes appended"])
def test_writer_shard_sizes_catch_a_damaged_shard_before_reading(tmp_path, damage):
    """The writer records each shard's size; building a dataset (or a case index) stats the
    shards and names a damaged one before anything is read -- including the header cut that
    TF itself would read as a clean end of file, losing a case silently."""
    build_records(tmp_path, [1, 2, 3, 4, 2, 1, 3, 2], labels=[0, 1] * 4, num_shards=2)
    data_dir = str(tmp_path)
    files = reader.list_shards(data_dir, "train")
    info = writer.read_info(data_dir)
    assert info["splits"]["train"]["shard_bytes"] == [os.path.getsize(f) for f in files]
    assert len(reader.read_case_index(data_dir, "train")) == 8  # intact: reads fine
    spans = _record_spans(files[1])
    assert len(spans) == 4
    with open(files[1], "rb") as f:
        data = f.read()
    cut = {"cut in a header": spans[1][0] + 5, "cut in a payload": spans[1][0] + 12 + 10,
           "bytes appended": None}[damage]
    with open(files[1], "wb") as f:
        f.write(data[:cut] if cut else data + b"\0" * 7)
    what = "longer than written" if cut is None else "truncated"
    pattern = rf"train-00001-of-00002\.tfrecord: {what} TFRecord shard \(\d+ bytes, "
    with pytest.raises(reader.ShardError, match=pattern) as err:
        reader.make_dataset(data_dir, "train", "micle", 2, 8)
    assert err.value.path == files[1]
    with pytest.raises(reader.ShardError, match=pattern):
        reader.read_case_index(data_dir, "train")

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import schema
from tests.data_pipelines.images import coded_rgb, encode


def _parse(record, task="multiclass", num_classes=3):
    return {k: v.numpy() for k, v in schema.parse_case(tf.constant(record), task, num_classes).items()}


@pytest.mark.parametrize("n", [1, 2, 7])
def test_round_trip_multiclass_bag_sizes(n):
    images = [encode(coded_rgb(10 * i), "PNG") for i in range(n)]
    rec = schema.encode_case("abc123", images, ["png"] * n, label=2, num_classes=3)
    out = _parse(rec)
    assert out["case_id"] == b"abc123"
    assert list(out["encoded"]) == images
    assert out["label"] == 2


def test_round_trip_multilabel_and_unlabelled():
    img = [encode(coded_rgb(1), "PNG")]
    codes = [schema.POSITIVE, schema.NEGATIVE, schema.UNCERTAIN, schema.MISSING]
    rec = schema.encode_case("c", img, ["png"], label=codes, task="multilabel", num_classes=4)
    np.testing.assert_array_equal(_parse(rec, "multilabel", 4)["label"], codes)
    rec = schema.encode_case("c", img, ["png"], label=None, task="multilabel", num_classes=4)
    np.testing.assert_array_equal(_parse(rec, "multilabel", 4)["label"], [schema.MISSING] * 4)
    rec = schema.encode_case("c", img, ["png"], label=None)
    assert _parse(rec)["label"] == schema.UNLABELLED


def test_view_tags_and_formats_stored():
    imgs = [encode(coded_rgb(1), "PNG"), encode(coded_rgb(2), "JPEG")]
    rec = schema.encode_case("c", imgs, ["png", "jpeg"], views=["PA", "lateral"], label=0,
                             num_classes=3)
    ex = tf.train.Example.FromString(rec)
    f = ex.features.feature
    assert list(f[schema.IMAGE_VIEW].bytes_list.value) == [b"PA", b"lateral"]
    assert list(f[schema.IMAGE_FORMAT].bytes_list.value) == [b"png", b"jpeg"]
    assert f[schema.NUM_IMAGES].int64_list.value[0] == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"images": []}, "empty bag"),
    ({"label": 3}, "out of range"),
    ({"formats": ["bmp"]}, "format"),
    ({"task": "regression"}, "unknown task"),
])
def test_encode_rejects_invalid(kwargs, match):
    args = {"case_id": "c", "images": [b"x"], "formats": ["png"], "label": 0, "num_classes": 3}
    args.update(kwargs)
    if "images" in kwargs and not kwargs["images"]:
        args["formats"] = []
    with pytest.raises(ValueError, match=match):
        schema.encode_case(**args)


def _raw_example(label_values, n_declared=1, n_images=1):
    feature = {
        schema.CASE_ID: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"case-xyz"])),
        schema.NUM_IMAGES: tf.train.Feature(int64_list=tf.train.Int64List(value=[n_declared])),
        schema.IMAGE_ENCODED: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[b"img"] * n_images)),
        schema.LABEL_CLASS: tf.train.Feature(int64_list=tf.train.Int64List(value=label_values)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@pytest.mark.parametrize("record,match", [
    (_raw_example([7]), "label/class outside"),
    (_raw_example([0], n_declared=2), "num_images disagrees"),
    (_raw_example([0], n_declared=0, n_images=0), "empty case bag"),
], ids=["label", "count", "empty"])  # the serialized bytes are no stable id across processes
def test_parse_rejects_bad_records_naming_the_case(record, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"(?s){match}.*case-xyz"):
        _parse(record)

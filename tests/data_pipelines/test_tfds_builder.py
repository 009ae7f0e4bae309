"""data_pipelines.tfds_builder: case-bag records as an offline TFDS dataset."""
import io
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import reader, writer
from data_pipelines.sources import ph2
from data_pipelines.tfds_builder import CaseBags, prepare_case_bags
from tests.data_pipelines.images import coded_rgb, encode

NUM_LESIONS = 10


@pytest.fixture(scope="module")
def small_ph2(tmp_path_factory):
    """The first 10 PH² lesion bags (10 distinct patches each) as records."""
    src = ph2.first_lesions(ph2.build(), NUM_LESIONS)
    out = str(tmp_path_factory.mktemp("ph2_small"))
    info = writer.write_dataset(src, out, salt=b"tfds-test", seed=0, overwrite=True)
    return out, info


@pytest.fixture(scope="module")
def prepared(small_ph2, tmp_path_factory):
    records, info = small_ph2
    data_dir = str(tmp_path_factory.mktemp("ph2_tfds"))
    return records, info, prepare_case_bags(records, data_dir), data_dir


def _multilabel_source():
    """Four cases: multi-image with view tags, greyscale + JPEG images, and one without labels."""
    grey = np.full((6, 5), 77, np.uint8)
    cases = []
    for i in range(4):
        images = [writer.SourceImage(item=f"c{i}_0.png", view="PA",
                                     load=lambda i=i: encode(coded_rgb(10 * i), "PNG")),
                  writer.SourceImage(item=f"c{i}_1.jpg", view="lateral",
                                     load=lambda i=i: encode(coded_rgb(10 * i + 5), "JPEG"))]
        if i == 1:
            images.append(writer.SourceImage(item="c1_2.png", load=lambda: encode(grey, "PNG")))
        label = None if i == 3 else [1, 0, -1, -2][i:] + [1, 0, -1, -2][:i]
        cases.append(writer.SourceCase(key=f"patient{i}", images=images, label=label,
                                       split="train"))
    return writer.SourceData(name="synthetic-cxr", task="multilabel",
                             label_names=["a", "b", "c", "d"], cases=cases,
                             items_read=sum(len(c.images) for c in cases))


def test_prepare_reads_every_case_image_and_label(prepared):
    records, info, builder, _ = prepared
    assert builder.data_dir.endswith("case_bags/ph2/1.0.0")
    assert set(builder.info.splits) == {s for s, v in info["splits"].items() if v["cases"]}
    assert builder.info.features["label"].names == ph2.LABEL_NAMES
    assert builder.info.metadata["task"] == "multiclass"
    total_images = 0
    for split, facts in info["splits"].items():
        index = {cid: (label, n) for cid, label, n in reader.read_case_index(records, split)}
        examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
        assert builder.info.splits[split].num_examples == facts["cases"] == len(examples)
        for ex in examples:
            label, n = index[ex["case_id"].decode()]
            assert ex["images"].shape == (n, 32, 32, 3) and ex["images"].dtype == np.uint8
            assert int(ex["label"]) == label
            assert list(ex["views"]) == [b""] * n
            total_images += n
    assert total_images == info["num_images"] == NUM_LESIONS * ph2.PATCHES_PER_LESION

    # Pixels are the records' (PNG, lossless): compare one case with a PIL decode of its bytes.
    first = next(iter(tf.data.TFRecordDataset(reader.list_shards(records, "train")).map(
        lambda r: reader.schema.parse_case(r, "multiclass", 3))))
    want = np.asarray(Image.open(io.BytesIO(first["encoded"][3].numpy())).convert("RGB"))
    got = [ex for ex in tfds.as_numpy(builder.as_dataset(split="train"))
           if ex["case_id"] == first["case_id"].numpy()][0]["images"][3]
    np.testing.assert_array_equal(got, want)


def test_builder_from_directory_reloads_without_this_module(prepared):
    records, info, builder, data_dir = prepared
    # preparing again reuses the data (nothing regenerated)
    mtime = os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json"))
    assert prepare_case_bags(records, data_dir).data_dir == builder.data_dir
    assert os.path.getmtime(os.path.join(builder.data_dir, "dataset_info.json")) == mtime
    reloaded = tfds.builder_from_directory(builder.data_dir)
    assert type(reloaded).__name__ == "ReadOnlyBuilder"
    assert reloaded.info.metadata["label_names"] == ph2.LABEL_NAMES
    n = sum(1 for _ in reloaded.as_dataset(split="train"))
    assert n == info["splits"]["train"]["cases"]
    # bytes only (no decode), as micle-pretrain --tfds_name reads bags
    ds = reloaded.as_dataset(split="val", decoders={"images": tfds.decode.SkipDecoding()})
    assert ds.element_spec["images"].dtype == tf.string
    # the class itself reopens a prepared config without the records
    again = CaseBags(config_name="ph2", data_dir=data_dir)
    assert again.info.splits["train"].num_examples == info["splits"]["train"]["cases"]


def test_multilabel_views_greyscale_and_unlabelled(tmp_path):
    records = str(tmp_path / "records")
    info = writer.write_dataset(_multilabel_source(), records, salt=b"x", overwrite=True)
    builder = prepare_case_bags(records, str(tmp_path / "tfds"))
    assert builder.data_dir.endswith("case_bags/synthetic_cxr/1.0.0")
    # bags mix 8x8 and 6x5 images: read the stored bytes, decode per image
    ds = builder.as_dataset(split="train", decoders={"images": tfds.decode.SkipDecoding()})
    examples = {}
    for ex in ds:
        images = [tf.io.decode_image(b, channels=3).numpy() for b in ex["images"]]
        ex = tfds.as_numpy(ex)
        ex["images"] = images
        examples[ex["case_id"].decode()] = ex
    assert len(examples) == info["splits"]["train"]["cases"] == 4
    index = {cid: (label, n) for cid, label, n in reader.read_case_index(records, "train")}
    labels = sorted(tuple(ex["label"].tolist()) for ex in examples.values())
    assert (-2, -2, -2, -2) in labels  # the unlabelled case: every label missing
    for cid, ex in examples.items():
        label, n = index[cid]
        assert ex["label"].dtype == np.int32
        assert ex["label"].tolist() == (label if label is not None else [-2] * 4)
        assert len(ex["images"]) == n
        assert list(ex["views"][:2]) == [b"PA", b"lateral"]
        if n == 3:
            grey = ex["images"][2]
            assert grey.shape == (6, 5, 3) and (grey == 77).all()  # tiled to RGB

"""Stage 1 on a prepared TFDS image dataset: data_pipelines.tfds_source + micle-pretrain
--tfds_name. Everything is built offline in tmp (an ImageFolder of PNGs stored as a TFDS
dataset); no registered dataset is ever loaded."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import tfds_source, writer
from data_pipelines.tfds_builder import prepare_case_bags
from micle_tf import config as C
from micle_tf.training.pretrain import run_pretraining
from tests.data_pipelines.images import coded_rgb, encode

CLASSES = ("cat", "dog", "eel")
NAME = "tiny_folder"


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """24 training PNGs in root/train/{class}/ (+ 3 in val, one greyscale), read with
    tfds.folder_dataset.ImageFolder and stored as a prepared TFDS dataset."""
    tmp = tmp_path_factory.mktemp("tfds_folder")
    root, data_dir = tmp / "images", tmp / "tfds"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("val", 1)):
        for c, name in enumerate(CLASSES):
            os.makedirs(root / split / name)
            for i in range(per_class):
                a = rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)
                a[..., 0] = 80 * c  # class-coded red channel
                if split == "val" and c == 0:
                    a = a[..., 1]  # greyscale PNG
                Image.fromarray(a).save(root / split / name / f"{i}.png")
    folder = tfds.folder_dataset.ImageFolder(str(root))
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "label": tfds.features.ClassLabel(names=folder.info.features["label"].names)})
    splits = {s: folder.as_dataset(split=s, shuffle_files=False).map(
        lambda ex: {"image": ex["image"], "label": ex["label"]}) for s in ("train", "val")}
    tfds.dataset_builders.store_as_tfds_dataset(NAME, "1.0.0", features, splits,
                                                data_dir=str(data_dir))
    return str(data_dir)


def _batches(ds, n):
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def test_describe_and_unprepared_name(tiny_tfds, tmp_path):
    info = tfds_source.tfds_info(NAME, tiny_tfds)
    assert info["task"] == "multiclass" and info["label_names"] == list(CLASSES)
    assert info["splits"] == {"train": {"cases": 24, "images": 24},
                              "val": {"cases": 3, "images": 3}}
    assert not info["bags"] and info["image_key"] == "image"
    assert tfds_source.resolve_tfds_dir(f"{NAME}:1.0.0", tiny_tfds).endswith("tiny_folder/1.0.0")
    with pytest.raises(FileNotFoundError, match="not prepared"):  # no download attempt
        tfds_source.load_builder("cifar10", str(tmp_path))


def test_simclr_elements_match_the_record_reader_format(tiny_tfds):
    def make(start_epoch=0, mode="simclr"):
        return tfds_source.make_tfds_dataset(
            NAME, tiny_tfds, "train", mode, 8, 16, augment_fn=None, seed=3, training=True,
            steps_per_epoch=3, start_epoch=start_epoch)

    batches = _batches(make(), 6)
    b = batches[0]
    assert set(b) == {"view1", "view2", "label", "case_id", "image_indices"}
    assert b["view1"].shape == b["view2"].shape == (8, 16, 16, 3)
    assert b["view1"].dtype == np.float32 and 0 <= b["view1"].min() <= b["view1"].max() <= 1
    assert b["label"].dtype == np.int32 and b["image_indices"].dtype == np.int32
    assert (b["image_indices"] == 0).all()  # one image per case
    # labels and pixels agree (class-coded red channel; resize keeps a flat channel flat)
    np.testing.assert_allclose(b["view1"][..., 0].mean(axis=(1, 2)) * 255,
                               80 * b["label"], atol=1)
    # one epoch = 3 batches of distinct images; every image is its own case
    epoch0 = np.concatenate([x["case_id"] for x in batches[:3]])
    assert len(set(epoch0)) == 24
    # deterministic, and epoch e is the same when a run resumes at e
    again = _batches(make(), 6)
    resumed = _batches(make(start_epoch=1), 3)
    for x, y in zip(batches, again):
        np.testing.assert_array_equal(x["view1"], y["view1"])
    for x, y in zip(batches[3:], resumed):
        np.testing.assert_array_equal(x["case_id"], y["case_id"])
        np.testing.assert_array_equal(x["view1"], y["view1"])
    # micle on single-image cases is simclr
    m = _batches(make(mode="micle"), 1)[0]
    assert (m["image_indices"] == 0).all()


def test_supervised_mode_reads_each_image_once(tiny_tfds):
    ds = tfds_source.make_tfds_dataset(NAME, tiny_tfds, "val", "supervised", 2, 16,
                                       training=False)
    batches = _batches(ds, 10)
    assert sum(len(b["label"]) for b in batches) == 3
    assert set(batches[0]) == {"image", "label", "case_id"}
    assert sorted(np.concatenate([b["label"] for b in batches]).tolist()) == [0, 1, 2]


def test_case_bags_micle_pairs_distinct_images(tmp_path):
    cases = [writer.SourceCase(
        key=f"p{i}", label=i % 2, split="train",
        images=[writer.SourceImage(item=f"{i}_{k}.png",
                                   load=lambda v=10 * i + k: encode(coded_rgb(v), "PNG"))
                for k in range(3)]) for i in range(4)]
    src = writer.SourceData(name="bags", task="multiclass", label_names=["a", "b"],
                            cases=cases, items_read=12)
    writer.write_dataset(src, str(tmp_path / "rec"), salt=b"s", overwrite=True)
    prepare_case_bags(str(tmp_path / "rec"), str(tmp_path / "tfds"))
    ds = tfds_source.make_tfds_dataset("case_bags", str(tmp_path / "tfds"), "train", "micle",
                                       4, 8, seed=0, steps_per_epoch=1)
    b = _batches(ds, 1)[0]
    i, j = b["image_indices"][:, 0], b["image_indices"][:, 1]
    assert (i != j).all() and (b["image_indices"] < 3).all()
    # the pair really is those two images of the case (red channel codes case and index)
    red1 = np.round(b["view1"][:, 0, 0, 0] * 255)
    red2 = np.round(b["view2"][:, 0, 0, 0] * 255)
    np.testing.assert_allclose(red1 % 10, i, atol=0)
    np.testing.assert_allclose(red2 % 10, j, atol=0)
    np.testing.assert_allclose(red1 // 10, red2 // 10)


def test_run_pretraining_on_tfds_dataset(tiny_tfds, tmp_path):
    cfg = C.PretrainConfig(
        method="simclr", tfds_name=NAME, tfds_data_dir=tiny_tfds, model_dir=str(tmp_path / "m"),
        model=C.ModelConfig(backbone="resnet18", width_multiplier=0.125, image_size=32,
                            proj_out_dim=16),
        batch_size=8, train_steps=3, learning_rate=0.3, warmup_epochs=0, verbose=0,
        knn_monitor=True)
    summary = run_pretraining(cfg)
    assert summary["final_step"] == 3 and summary["steps_per_epoch"] == 3
    assert np.isfinite(summary["final_loss"])
    assert summary["dataset"]["source"] == "tfds:tiny_folder/1.0.0"
    assert summary["dataset"]["label_names"] == list(CLASSES)
    assert summary["knn_monitor"] and "knn_accuracy" in summary["knn_monitor"][-1]
    assert summary["checkpoint"].endswith("ckpt-3")


def test_input_pipelines_read_disjoint_examples(tiny_tfds):
    """Two input pipelines (one file: TFDS cannot shard files) split the examples."""
    seen = []
    for pipeline in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                         num_replicas_in_sync=2)
        ds = tfds_source.make_tfds_dataset(NAME, tiny_tfds, "train", "simclr", 4, 8, seed=0,
                                           steps_per_epoch=3, input_context=ctx)
        seen.append({c for b in _batches(ds, 3) for c in b["case_id"]})
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]

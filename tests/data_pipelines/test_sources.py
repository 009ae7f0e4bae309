import collections
import csv
import os

import numpy as np
import pytest

from data_pipelines import reader, splits, writer
from data_pipelines.sources import SOURCES, folder, get_source, ph2
from tests.data_pipelines.images import coded_rgb, encode
from tests.helpers import write_folder_fixture


def test_ph2_records(ph2_records):
    info = writer.read_info(ph2_records)
    assert info["num_cases"] == 199 and info["num_images"] == 1990
    assert info["items_read"] == info["items_written"] + info["items_rejected"] == 3980
    assert info["num_rejected"] == 1990 and info["task"] == "multiclass"
    assert all(r["item"].endswith("b.bmp") for r in info["rejected"])
    assert info["label_names"] == ph2.LABEL_NAMES
    index = {s: reader.read_case_index(ph2_records, s) for s in ("train", "val", "test")}
    splits.check_disjoint({s: [c for c, _, _ in rows] for s, rows in index.items()})
    for s, rows in index.items():
        files = reader.list_shards(ph2_records, s)
        assert info["splits"][s] == {"cases": len(rows), "images": 10 * len(rows),
                                     "shards": len(files),
                                     "shard_bytes": [os.path.getsize(f) for f in files]}
        assert all(n == 10 for _, _, n in rows)
    # independent label reference: the CSV's Labels column, lesions 0..198
    with open(os.path.join(ph2.package_data_dir(), "ShapeScores.csv")) as f:
        expected = collections.Counter(int(r["Labels"]) for r in list(csv.DictReader(f))[:199])
    got = collections.Counter(l for rows in index.values() for _, l, _ in rows)
    assert got == expected
    assert set(info["splits"]) == {"train", "val", "test"}
    assert info["splits"]["train"]["cases"] == 139


def test_ph2_labels_agree_between_files():
    labels, numbers = ph2.read_labels(ph2.package_data_dir())
    assert len(labels) == 200 and numbers[0] == "IMD003"
    assert collections.Counter(labels) == {0: 117, 1: 31, 2: 52}


def test_ph2_missing_patch_is_rejected_by_name(tmp_path):
    src_dir = ph2.package_data_dir()
    data = tmp_path / "data"
    patches = data / "patchesDataSet" / "Similar"
    patches.mkdir(parents=True)
    for name in ("ShapeScores.csv", "symtab.xlsx"):
        (data / name).write_bytes(open(os.path.join(src_dir, name), "rb").read())
    for name in ("patch0a.bmp", "patch0b.bmp"):
        (patches / name).write_bytes(
            open(os.path.join(src_dir, "patchesDataSet", "Similar", name), "rb").read())
    source = ph2.first_lesions(ph2.build(data_dir=str(data)), 1)
    assert source.items_read == 20
    info = writer.write_dataset(source, str(tmp_path / "out"), b"s", fractions=(("train", 1),))
    assert info["num_images"] == 1 and info["items_rejected"] == 19
    assert {"item": "patch1a.bmp", "kind": "image", "reason": "missing file"} in info["rejected"]
    assert {"item": "patch1b.bmp", "kind": "image", "reason": "missing file"} in info["rejected"]
    reasons = {r["item"]: r["reason"] for r in info["rejected"]}
    assert "patch0a.bmp" in reasons["patch0b.bmp"]  # its partner, found by content


def test_folder_source_rejects_each_bad_item_by_name(tmp_path):
    csv_path = write_folder_fixture(tmp_path)
    source = folder.build(str(csv_path), label_names=["benign", "malignant"])
    info = writer.write_dataset(source, str(tmp_path / "out"), b"salt", seed=0,
                                fractions=(("train", 1.0),))
    reasons = {r["item"]: r["reason"] for r in info["rejected"]}
    assert reasons["cases.csv:4"].startswith(("not a recognised image", "cannot decode image"))
    assert "zero-byte" in reasons["cases.csv:6"]
    assert reasons["cases.csv:8"] == "missing file"
    assert "cannot decode" in reasons["cases.csv:10"]
    assert "unknown label 'unknown-dx'" in reasons["cases.csv:11"]
    assert reasons["cases.csv:12"] == "empty image_path"
    assert "conflicting labels" in reasons["cases.csv:13"]
    assert "conflicting labels" in reasons["cases.csv:14"]
    assert "duplicate image" in reasons["cases.csv:15"]
    assert reasons["case at cases.csv:11"].startswith("empty case")
    assert reasons["case at cases.csv:12"].startswith("empty case")
    # read = written + rejected, over the 15 image rows
    assert info["items_read"] == 15
    assert info["items_written"] == 6 and info["items_rejected"] == 9
    assert info["num_cases"] == 4  # p1, p2, p3, p7
    index = reader.read_case_index(str(tmp_path / "out"), "train")
    assert sorted(n for _, _, n in index) == [1, 1, 2, 2]
    assert sorted(repr(l) for _, l, _ in index) == sorted(["0", "1", "0", "None"])
    # no raw case ids or source paths in what was written
    blob = b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir())
    for secret in (b"p1", b"ok_png", str(tmp_path).encode()):
        assert secret not in blob.replace(b"tfrecord", b"")


def test_folder_images_decode_to_expected_pixels(tmp_path):
    csv_path = write_folder_fixture(tmp_path)
    source = folder.build(str(csv_path), label_names=["benign", "malignant"])
    writer.write_dataset(source, str(tmp_path / "out"), b"salt", fractions=(("train", 1.0),))
    ds = reader.make_dataset(str(tmp_path / "out"), "train", "supervised", 16, 8, training=False)
    images = next(iter(ds))["image"].numpy()
    means = sorted(np.round(images[:, 2:6, 2:6, 0].mean(axis=(1, 2)) * 255).astype(int))
    # red channels: png 10, jpg ~20, bmp 30, 16-bit gray 30000/65535*255 ~ 117, rgba 40, gray 90
    for want in (10, 20, 30, 117, 40, 90):
        assert min(abs(m - want) for m in means) <= 3, (want, means)


def test_folder_label_inference_and_unlabelled(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(coded_rgb(1), "PNG"))
    (tmp_path / "l.csv").write_text("case_id,image_path,label\nx,a.png,zeta\ny,a.png,alpha\n")
    assert folder.build(str(tmp_path / "l.csv")).label_names == ["alpha", "zeta"]
    (tmp_path / "u.csv").write_text("case_id,image_path\nx,a.png\n")
    src = folder.build(str(tmp_path / "u.csv"))
    assert src.label_names == [] and src.cases[0].label is None
    (tmp_path / "m.csv").write_text("case_id,image_path,label\nx,a.png,b|a\ny,a.png,\n")
    src = folder.build(str(tmp_path / "m.csv"), task="multilabel")
    assert src.label_names == ["a", "b"] and src.cases[0].label == [1, 1]
    assert src.cases[1].label == [0, 0]


def test_folder_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "bad.csv").write_text("patient,image_path\nx,a.png\n")
    with pytest.raises(ValueError, match=r"bad.csv: missing required column\(s\) \['case_id'\]"):
        folder.build(str(tmp_path / "bad.csv"))


def test_salted_ids_stable_and_salt_file(tmp_path):
    assert writer.hash_case_id("p1", b"s") == writer.hash_case_id("p1", b"s")
    assert writer.hash_case_id("p1", b"s") != writer.hash_case_id("p1", b"t")
    salt_path = tmp_path / "out.salt"
    first = writer.load_or_create_salt(str(salt_path))
    assert writer.load_or_create_salt(str(salt_path)) == first and len(first) == 64
    assert oct(salt_path.stat().st_mode & 0o777) == "0o600"


def test_writer_refuses_to_mix_with_existing_records(tmp_path, ph2_records):
    src = folder.build(str(write_folder_fixture(tmp_path)))
    writer.write_dataset(src, str(tmp_path / "o"), b"s", fractions=(("train", 1.0),))
    with pytest.raises(FileExistsError, match="overwrite"):
        writer.write_dataset(src, str(tmp_path / "o"), b"s", fractions=(("train", 1.0),))


def test_every_source_is_implemented_and_unknown_ones_are_refused():
    for name in SOURCES:
        assert callable(get_source(name).build), name
    with pytest.raises(ValueError, match="unknown source"):
        get_source("imagenet")

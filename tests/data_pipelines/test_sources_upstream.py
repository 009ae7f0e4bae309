"""The upstream-layout sources (ham10000, chexpert, nih_cxr14, medmnist, dicom) on fixtures laid
out like the real releases and built from real images (see upstream_fixtures.py)."""
import collections
import io
import os
import shutil
import zipfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import reader, schema, writer
from data_pipelines.sources import chexpert, get_source, ham10000, medmnist, nih_cxr14
from tests.data_pipelines import upstream_fixtures as fx

SALT = b"upstream-test-salt"


# ----------------------------------------------------------------------------- helpers
def convert(source, out_dir):
    info = writer.write_dataset(source, str(out_dir), SALT, fractions=(("train", 1.0),))
    return str(out_dir), info


def reasons(info):
    return {r["item"]: r["reason"] for r in info["rejected"]}


def check_accounting(info, items_read, written, rejected_items):
    assert info["items_read"] == items_read
    assert info["items_written"] == info["num_images"] == written
    assert info["items_rejected"] == rejected_items
    assert info["items_read"] == info["items_written"] + info["items_rejected"]


def check_cases(out, split, expected):
    """`expected`: {raw case key: (num_images, label)}; compared through the salted hashes."""
    got = {cid: (n, label) for cid, label, n in reader.read_case_index(out, split)}
    want = {writer.hash_case_id(k, SALT): v for k, v in expected.items()}
    assert got == want


def record_views(out, split="train"):
    views = set()
    for path in reader.list_shards(out, split):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            ex = tf.train.Example.FromString(raw)
            feature = ex.features.feature[schema.IMAGE_VIEW]
            views.update(v.decode() for v in feature.bytes_list.value)
    return views


def check_micle_batch(out, info, split="train"):
    """One micle batch over the whole split: two distinct images for multi-image cases."""
    n_cases = info["splits"][split]["cases"]
    sizes = {cid: n for cid, _, n in reader.read_case_index(out, split)}
    ds = reader.make_dataset(out, split, "micle", n_cases, 32, training=False)
    batch = next(iter(ds))
    assert batch["view1"].shape == (n_cases, 32, 32, 3) == batch["view2"].shape
    assert np.isfinite(batch["view1"].numpy()).all()
    for cid, (i, j) in zip(batch["case_id"].numpy(), batch["image_indices"].numpy()):
        assert (i != j) == (sizes[cid.decode()] > 1)


def check_no_secrets(out, secrets):
    blob = b"".join(open(os.path.join(out, n), "rb").read() for n in os.listdir(out))
    for secret in secrets:
        assert secret not in blob, secret


# ----------------------------------------------------------------------------- HAM10000
def test_ham10000_lesion_bags_and_rejections(tmp_path):
    csv_path, expect = fx.write_ham10000(tmp_path / "ham")
    source = get_source("ham10000").build(input_path=csv_path, task="multiclass")
    assert source.label_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    out, info = convert(source, tmp_path / "out")
    check_accounting(info, expect["items_read"], expect["written"], expect["rejected_items"])
    assert info["num_cases"] == len(expect["cases"]) and info["task"] == "multiclass"
    why = reasons(info)
    for line, reason in expect["reasons"].items():
        assert reason in why[f"HAM10000_metadata.csv:{line}"], (line, why)
    assert why["case at HAM10000_metadata.csv:8"].startswith("empty case")
    check_cases(out, "train", expect["cases"])
    check_micle_batch(out, info)
    check_no_secrets(out, expect["secrets"])


def test_ham10000_label_subset_and_errors(tmp_path):
    csv_path, _ = fx.write_ham10000(tmp_path / "ham")
    source = ham10000.build(input_path=csv_path, label_names=["mel", "nv"])
    assert source.label_names == ["mel", "nv"]
    assert sorted(c.label for c in source.cases) == [0, 1]  # the mel and the nv lesions
    with pytest.raises(ValueError, match="distinct names from"):
        ham10000.build(input_path=csv_path, label_names=["melanoma"])
    (tmp_path / "bad.csv").write_text("lesion_id,image\nx,y\n")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['image_id', 'dx'\]"):
        ham10000.build(input_path=str(tmp_path / "bad.csv"))


# ----------------------------------------------------------------------------- CheXpert
def test_chexpert_patient_cases_first_study_labels(tmp_path):
    csv_path, expect = fx.write_chexpert(tmp_path / "chex")
    source = get_source("chexpert").build(input_path=csv_path, task="multiclass")
    assert source.task == "multilabel" and source.label_names == fx.CHEXPERT_OBS
    out, info = convert(source, tmp_path / "out")
    e = expect["patient"]
    check_accounting(info, expect["items_read"], e["written"], e["rejected_items"])
    why = reasons(info)
    for line, reason in expect["reasons"].items():
        assert reason in why[f"train.csv:{line}"], (line, why)
    check_cases(out, "train", e["cases"])
    assert record_views(out) == expect["views"]
    check_micle_batch(out, info)
    check_no_secrets(out, expect["secrets"])


def test_chexpert_study_cases_competition_labels(tmp_path):
    csv_path, expect = fx.write_chexpert(tmp_path / "chex")
    source = chexpert.build(input_path=csv_path, chexpert_case="study",
                            chexpert_labels="competition")
    assert source.label_names == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                  "Pleural Effusion"]
    out, info = convert(source, tmp_path / "out")
    e = expect["study"]
    check_accounting(info, expect["items_read"], e["written"], e["rejected_items"])
    pick = [fx.CHEXPERT_OBS.index(n) for n in source.label_names]
    check_cases(out, "train", {k: (n, [codes[i] for i in pick]) for k, (n, codes)
                               in e["cases"].items()})
    # uncertain (-1) and missing (-2) stay distinct: study2 of patient00001 has both
    assert [fx.CODES_B[i] for i in pick] == [-1, 1, -2, 1, -2]
    assert reasons(info)["case at train.csv:11"].startswith("empty case")  # patient00006/study1


def test_chexpert_frontal_only_and_path_bases(tmp_path):
    csv_path, expect = fx.write_chexpert(tmp_path / "chex")
    source = chexpert.build(input_path=csv_path, frontal_only=True)
    out, info = convert(source, tmp_path / "out")
    e = expect["frontal_only"]
    check_accounting(info, expect["items_read"], e["written"], e["rejected_items"])
    why = reasons(info)
    for line in (3, 10, 12):
        assert why[f"train.csv:{line}"] == "lateral view excluded (frontal_only)"
    check_cases(out, "train", e["cases"])
    assert record_views(out) == {"frontal_PA", "frontal_AP"}
    # the dataset folder renamed: Path's first component no longer exists on disk
    renamed, _ = fx.write_chexpert(tmp_path / "renamed", folder_name="chexpert_small")
    src = chexpert.build(input_path=renamed)
    assert sum(len(c.images) for c in src.cases) == 8  # 11 rows - 3 rejected before loading
    assert os.path.isfile(src.cases[0].images[0].load.__closure__[0].cell_contents)
    with pytest.raises(ValueError, match="chexpert_case"):
        chexpert.build(input_path=csv_path, chexpert_case="visit")


# ----------------------------------------------------------------------------- NIH CXR14
def test_nih_cxr14_patient_bags_max_labels(tmp_path):
    csv_path, expect = fx.write_nih(tmp_path / "nih")
    source = get_source("nih_cxr14").build(input_path=csv_path)
    assert source.task == "multilabel" and source.label_names == fx.NIH_FINDINGS
    out, info = convert(source, tmp_path / "out")
    check_accounting(info, expect["items_read"], expect["written"], expect["rejected_items"])
    why = reasons(info)
    for line, reason in expect["reasons"].items():
        assert why[f"Data_Entry_2017.csv:{line}"].startswith(reason), (line, why)
    check_cases(out, "train", expect["cases"])
    assert record_views(out) == expect["views"]
    check_micle_batch(out, info)
    check_no_secrets(out, expect["secrets"])
    assert nih_cxr14.parse_findings("No Finding|Mass", fx.NIH_FINDINGS).reason.startswith(
        "'No Finding' together")


# ----------------------------------------------------------------------------- MedMNIST
def test_medmnist_multiclass_keeps_splits(tmp_path):
    derma_path, arrays, _, _ = fx.write_medmnist(tmp_path)
    with zipfile.ZipFile(derma_path) as zf:  # like the official files: compressed members
        assert zf.getinfo("train_images.npy").compress_type == zipfile.ZIP_DEFLATED
    source = get_source("medmnist").build(input_path=derma_path)
    assert source.task == "multiclass" and source.label_names == ham10000.LABEL_NAMES
    # images come back pixel-exact as in-memory PNGs
    first = source.cases[0]
    assert first.key == "train/0" and first.split == "train"
    assert first.images[0].item == "dermamnist.npz:train[0]"
    png = first.images[0].load()
    assert png.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))),
                                  arrays["train_images"][0])
    out, info = convert(source, tmp_path / "out")
    check_accounting(info, 10, 9, 1)
    assert reasons(info)["dermamnist.npz:train[5]"] == "label 9 outside [0, 7)"
    assert {s: v["cases"] for s, v in info["splits"].items()} == {"train": 5, "val": 2,
                                                                  "test": 2}
    check_cases(out, "val", {"val/0": (1, 5), "val/1": (1, 6)})
    check_micle_batch(out, info, "test")


def test_medmnist_multilabel_uncompressed_memmap(tmp_path):
    _, _, chest_path, arrays = fx.write_medmnist(tmp_path)
    source = medmnist.build(input_path=chest_path)
    assert source.task == "multilabel" and source.label_names == fx.NIH_FINDINGS
    img = source.cases[0].images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img.load()))),
                                  arrays["train_images"][0])
    out, info = convert(source, tmp_path / "out")
    check_accounting(info, 8, 8, 0)
    check_cases(out, "train", {f"train/{i}": (1, [int(v) for v in arrays["train_labels"][i]])
                               for i in range(4)})
    # unknown set name -> class_i; --label_names must match the class count
    other = tmp_path / "fancymnist_64.npz"
    np.savez(other, train_images=arrays["train_images"],
             train_labels=np.array([[0], [2], [1], [2]], np.uint8))
    assert medmnist.build(input_path=str(other)).label_names == ["class_0", "class_1", "class_2"]
    with pytest.raises(ValueError, match="3 classes, but --label_names gives 2"):
        medmnist.build(input_path=str(other), label_names=["a", "b"])
    np.savez(other, train_images=np.zeros((2, 28, 28, 28), np.uint8),
             train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(ValueError, match="3D MedMNIST volumes are not supported"):
        medmnist.build(input_path=str(other))


# ----------------------------------------------------------------------------- DICOM
def test_dicom_folder_grouping_labels_and_privacy(tmp_path):
    folder, labels_csv, expect = fx.write_dicom_folder(tmp_path)
    source = get_source("dicom").build(input_path=folder, dicom_labels=labels_csv,
                                       task="multiclass")
    assert source.label_names == ["abnormal", "normal"]
    out, info = convert(source, tmp_path / "out")
    check_accounting(info, expect["items_read"], expect["written"], expect["rejected_items"])
    why = reasons(info)
    for item, reason in expect["reasons"].items():
        assert why[item].startswith(reason), (item, why)
    got = collections.Counter((n, l) for _, l, n in reader.read_case_index(out, "train"))
    assert got == collections.Counter(expect["patient_cases"])
    # the view tag only from the fixed vocabulary (free text dropped)
    assert record_views(out) == {"PA", "AP", ""}
    check_micle_batch(out, info)
    check_no_secrets(out, expect["secrets"])

    by_study = get_source("dicom").build(input_path=folder, dicom_labels=labels_csv,
                                         dicom_case="study")
    got = collections.Counter((len(c.images), c.label) for c in by_study.cases
                              if c.images[0].item != "syn/broken.dcm")
    assert got == collections.Counter(expect["study_cases"])


def test_dicom_pixel_conversion_exact_and_inversion(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.pixels import pixel_array
    import pydicom.data
    from data_pipelines.sources import dicom

    folder, _, _ = fx.write_dicom_folder(tmp_path)
    source = dicom.build(input_path=folder)
    images = {img.item: img for case in source.cases for img in case.images}

    def decoded(item):
        return np.asarray(Image.open(io.BytesIO(images[item].load())))

    # synthetic MONOCHROME1 + slope/intercept + window: exact 8-bit values per band
    mono1 = decoded("syn/mono1.dcm")
    assert mono1.dtype == np.uint8 and mono1.shape == (10, 16)
    assert [int(v) for v in mono1[::2, 0]] == fx.SYN_MONO1_EXPECTED
    assert (mono1 == mono1[:, :1]).all()
    # no window: min-max
    assert [int(v) for v in decoded("syn/minmax.dcm")[::2, 0]] == fx.SYN_MINMAX_EXPECTED
    # RGB kept as RGB
    rgb = decoded("syn/rgb.dcm")
    assert rgb.shape == (8, 12, 3) and tuple(rgb[0, 0]) == (200, 100, 50)

    # the real MONOCHROME1 chest CR: after conversion the lung fields are darker than the
    # mediastinum; without the inversion it would be the other way round
    cr = decoded("patientA/RG1_UNCI.dcm")
    meta = Dataset()
    arr = pixel_array(pydicom.data.get_testdata_file("RG1_UNCI.dcm"), ds_out=meta)
    assert meta.PhotometricInterpretation == "MONOCHROME1" and cr.shape == arr.shape
    meta.PhotometricInterpretation = "MONOCHROME2"
    plain = dicom.pixels_to_uint8(arr, meta)
    np.testing.assert_array_equal(cr.astype(int), 255 - plain.astype(int))

    def lung_minus_mediastinum(img):
        h, w = img.shape
        rows = slice(int(h * 0.35), int(h * 0.6))
        lungs = np.concatenate([img[rows, int(w * 0.2):int(w * 0.35)].ravel(),
                                img[rows, int(w * 0.65):int(w * 0.8)].ravel()])
        return lungs.mean() - img[rows, int(w * 0.45):int(w * 0.55)].mean()

    assert lung_minus_mediastinum(cr) < -30
    assert lung_minus_mediastinum(plain) > 30


def test_dicom_compressed_colour_and_multiframe(tmp_path):
    """pydicom's own bundled files: YBR_FULL JPEG -> RGB; a 2-frame RLE -> its middle frame."""
    import pydicom.data
    from data_pipelines.sources import dicom

    for name in ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm"):
        shutil.copy(pydicom.data.get_testdata_file(name), tmp_path / name)
    source = dicom.build(input_path=str(tmp_path))
    out = {img.item: np.asarray(Image.open(io.BytesIO(img.load())))
           for case in source.cases for img in case.images}
    # SC_rgb test pattern: a red band on top (frame 2 of the RLE file is its colour inverse)
    assert out["SC_rgb_jpeg_dcmtk.dcm"].shape == (100, 100, 3)
    assert np.abs(out["SC_rgb_jpeg_dcmtk.dcm"][0, 0].astype(int) - [255, 0, 0]).max() <= 3
    assert tuple(out["SC_rgb_rle_2frame.dcm"][0, 0]) == (0, 255, 255)


def test_dicom_label_conflicts_and_ambiguous_names(tmp_path):
    from data_pipelines.sources import dicom

    folder = tmp_path / "d"
    for sub, pid, sop in (("a", "P1", "11"), ("b", "P1", "12"), ("c", "P2", "13")):
        fx.write_synthetic_dicom(str(folder / sub / "img.dcm"), fx._bands(fx.SYN_STORED),
                                 pid, sop)
    (tmp_path / "l.csv").write_text("file,label\na/img.dcm,x\nb/img.dcm,y\nimg.dcm,x\n"
                                    "c/img.dcm,z\n")
    source = dicom.build(input_path=str(folder), dicom_labels=str(tmp_path / "l.csv"),
                         label_names=["x", "y"])
    with pytest.raises(writer.EmptyDatasetError) as e:  # every image rejected: nothing written
        writer.write_dataset(source, str(tmp_path / "o"), SALT, fractions=(("train", 1.0),))
    why = {r["item"]: r["reason"] for r in e.value.rejected}
    assert why["a/img.dcm"].startswith("conflicting labels within one case")
    assert why["b/img.dcm"].startswith("conflicting labels within one case")
    assert why["l.csv:4"].startswith("file name matches 3 DICOM files")
    assert "unknown label 'z'" in why["c/img.dcm"]
    assert source.cases == []


def test_cli_passes_the_new_flags(tmp_path):
    from data_pipelines import cli

    csv_path, expect = fx.write_chexpert(tmp_path / "chex")
    out = tmp_path / "out"
    try:
        cli.FLAGS(["micle-data", "--source=chexpert", f"--input={csv_path}",
                   f"--output_dir={out}", "--chexpert_labels=competition",
                   "--chexpert_case=study", "--frontal_only", "--salt=s",
                   "--split_fractions=1,0,0"])
        cli.main([])
    finally:
        cli.FLAGS.unparse_flags()
    info = writer.read_info(str(out))
    assert len(info["label_names"]) == 5 and info["items_rejected"] == 6
    assert info["num_cases"] == 5  # study cases, laterals excluded

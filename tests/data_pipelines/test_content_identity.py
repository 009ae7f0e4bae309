"""Content identity at write time: decode-verified images, metadata removed, pixel hashes,
duplicate policies, PH² rebuilt from its distinct patches.

Expectations are independent of the code under test: planted strings are searched for in the
raw shard bytes, metadata is planted by hand-written chunk/segment bytes, pixels are decoded
with PIL and hashed with hashlib here.
"""
import collections
import glob
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines import reader, schema, splits, writer
from data_pipelines.sources import chexpert, folder, ham10000, nih_cxr14, ph2
from tests.data_pipelines import upstream_fixtures as up
from tests.data_pipelines.images import coded_rgb, encode

SECRET = b"PATIENT=Jane Doe 1958-03-07 MRN 0043721"


# ------------------------------------------------------------------ planting metadata by hand
def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def plant_png(data, secret=SECRET):
    """tEXt, zTXt, iTXt and tIME chunks after IHDR, and bytes after IEND."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    ihdr_end = 8 + 8 + struct.unpack(">I", data[8:12])[0] + 4
    extra = (_png_chunk(b"tEXt", b"Comment\x00" + secret)
             + _png_chunk(b"zTXt", b"Author\x00\x00" + zlib.compress(secret))
             + _png_chunk(b"iTXt", b"Description\x00\x00\x00en\x00\x00" + secret)
             + _png_chunk(b"tIME", struct.pack(">HBBBBB", 2026, 3, 7, 10, 0, 0)))
    return data[:ihdr_end] + extra + data[ihdr_end:] + secret


def _jpeg_segment(marker, payload):
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def plant_jpeg(data, secret=SECRET):
    """EXIF (APP1), XMP (APP1), IPTC (APP13) and COM segments after SOI, bytes after EOI."""
    assert data[:2] == b"\xff\xd8"
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + struct.pack(
        ">HHII", 0x010E, 2, len(secret) + 1, 26) + b"\x00\x00\x00\x00" + secret + b"\x00"
    extra = (_jpeg_segment(0xE1, b"Exif\x00\x00" + tiff)
             + _jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>" + secret
                             + b"</x:xmpmeta>")
             + _jpeg_segment(0xED, b"Photoshop 3.0\x00" + secret)
             + _jpeg_segment(0xFE, secret))
    return data[:2] + extra + data[2:] + secret


def plant(data):
    return plant_png(data) if data[:4] == b"\x89PNG" else plant_jpeg(data)


def plant_in_files(paths):
    """Rewrites every image file in place with metadata planted; returns {path: original}."""
    originals = {}
    for p in paths:
        with open(p, "rb") as f:
            originals[p] = f.read()
        if originals[p][:4] == b"\x89PNG" or originals[p][:2] == b"\xff\xd8":
            with open(p, "wb") as f:
                f.write(plant(originals[p]))
    return originals


def shard_bytes(out):
    return b"".join(open(p, "rb").read() for p in glob.glob(os.path.join(out, "*.tfrecord")))


def stored_images(out):
    """[(case_id, image bytes, pixel_sha256)] of every record of every split."""
    rows = []
    for p in sorted(glob.glob(os.path.join(out, "*.tfrecord"))):
        for r in tf.data.TFRecordDataset(p):
            f = tf.train.Example.FromString(r.numpy()).features.feature
            hashes = list(f[schema.IMAGE_PIXEL_SHA256].bytes_list.value)
            for i, b in enumerate(f[schema.IMAGE_ENCODED].bytes_list.value):
                rows.append((f[schema.CASE_ID].bytes_list.value[0], b, hashes[i]))
    return rows


def pil_rgb(data):
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def tf_pixels(data):
    return tf.io.decode_image(data, channels=3, dtype=tf.uint8,
                              expand_animations=False).numpy()


def independent_hash(data):
    """The documented pixel_sha256 of an 8-bit image: PIL's decode for PNG (lossless: the same
    samples as any decoder), TensorFlow's for JPEG (IDCTs differ by a grey level)."""
    a = pil_rgb(data) if data[:4] == b"\x89PNG" else tf_pixels(data)
    h, w, _ = a.shape
    return hashlib.sha256(f"micle-tf pixels v1 {h}x{w}x3 8-bit ".encode()
                          + a.tobytes()).hexdigest()


# ------------------------------------------------------------------ metadata, every source
def _check_clean(out, originals):
    blob = shard_bytes(out)
    for secret in (SECRET, zlib.compress(SECRET), b"Jane Doe", b"MRN 0043721"):
        assert secret not in blob
    stored = stored_images(out)
    assert stored
    # every stored image decodes (TF and PIL) to the pixels of one of the original files
    want = {}
    for o in originals.values():
        try:
            want[tf_pixels(o).tobytes()] = o
        except tf.errors.InvalidArgumentError:  # the fixtures' deliberately corrupt files
            pass
    for _, data, _ in stored:
        assert tf_pixels(data).tobytes() in want
        original = want[tf_pixels(data).tobytes()]
        np.testing.assert_array_equal(pil_rgb(data), pil_rgb(original))
    return stored


def test_folder_source_stores_no_planted_text(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    files = {"a.png": encode(coded_rgb(10, 16), "PNG"), "b.jpg": encode(up.ph2_patch(0), "JPEG"),
             "c.png": encode(up.ph2_patch(10), "PNG"), "d.jpg": encode(up.ph2_patch(20), "JPEG")}
    for name, data in files.items():
        (img / name).write_bytes(plant(data))
    (tmp_path / "cases.csv").write_text("case_id,image_path,label\n" + "".join(
        f"p{i % 2},img/{n},x\n" for i, n in enumerate(files)))
    out = str(tmp_path / "out")
    info = writer.write_dataset(folder.build(str(tmp_path / "cases.csv")), out, b"s",
                                fractions=(("train", 1.0),))
    assert info["num_images"] == 4 and info["num_rejected"] == 0
    _check_clean(out, {n: d for n, d in files.items()})


def test_ham10000_source_stores_no_planted_text(tmp_path):
    csv_path, expect = up.write_ham10000(tmp_path)
    originals = plant_in_files(glob.glob(str(tmp_path / "**" / "*.jpg"), recursive=True))
    out = str(tmp_path / "out")
    info = writer.write_dataset(ham10000.build(csv_path), out, b"s", fractions=(("train", 1.0),))
    assert info["items_written"] == expect["written"]
    _check_clean(out, originals)


def test_chexpert_source_stores_no_planted_text(tmp_path):
    csv_path, expect = up.write_chexpert(tmp_path)
    originals = plant_in_files(glob.glob(str(tmp_path / "**" / "*.jpg"), recursive=True))
    out = str(tmp_path / "out")
    info = writer.write_dataset(chexpert.build(csv_path), out, b"s", fractions=(("train", 1.0),))
    assert info["items_written"] == expect["patient"]["written"]
    _check_clean(out, originals)


def test_nih_source_stores_no_planted_text(tmp_path):
    csv_path, expect = up.write_nih(tmp_path)
    originals = plant_in_files(glob.glob(str(tmp_path / "**" / "*.png"), recursive=True))
    out = str(tmp_path / "out")
    info = writer.write_dataset(nih_cxr14.build(csv_path), out, b"s", fractions=(("train", 1.0),))
    assert info["items_written"] == expect["written"]
    _check_clean(out, originals)


# ------------------------------------------------------------------ decode-verified writes
def _one_case_source(images):
    return writer.SourceData(
        name="test", task="multiclass", label_names=["a"], items_read=len(images),
        cases=[writer.SourceCase(key="c", item="case c", label=0, images=[
            writer.SourceImage(item=name, load=lambda d=data: d) for name, data in images])])


def _bad_crc_png():
    data = bytearray(encode(coded_rgb(77, 16), "PNG"))
    i = data.index(b"IDAT")
    length = struct.unpack(">I", data[i - 4:i])[0]
    data[i + 4 + length] ^= 0xFF  # first byte of the IDAT CRC
    return bytes(data)


def _declared_png(width, height):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def test_bad_crc_and_oversized_images_are_rejected_by_name(tmp_path):
    bad_crc = _bad_crc_png()
    Image.open(io.BytesIO(bad_crc)).load()  # PIL decodes it; TensorFlow does not
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_png(bad_crc)
    source = _one_case_source([("ok.png", encode(coded_rgb(1), "PNG")), ("crc.png", bad_crc),
                               ("bomb.png", _declared_png(20000, 20000)),
                               ("big.png", encode(coded_rgb(2, 64), "PNG"))])
    info = writer.write_dataset(source, str(tmp_path / "o"), b"s", fractions=(("train", 1.0),),
                                max_pixels=60 * 60)
    reasons = {r["item"]: r["reason"] for r in info["rejected"]}
    assert set(reasons) == {"crc.png", "bomb.png", "big.png"}
    assert "TensorFlow" in reasons["crc.png"]
    assert "20000x20000" in reasons["bomb.png"] and "pixel limit" in reasons["bomb.png"]
    assert "64x64" in reasons["big.png"]
    assert info["items_written"] == 1 and info["items_read"] == 4


def test_pixel_hash_is_the_documented_digest_of_the_decoded_pixels(tmp_path):
    rgba = np.dstack([coded_rgb(40), np.full((8, 8), 9, np.uint8)])
    images = [("rgb.png", encode(coded_rgb(5), "PNG")), ("rgba.png", encode(rgba, "PNG")),
              ("j.jpg", encode(up.ph2_patch(0), "JPEG")), ("b.bmp", encode(coded_rgb(6), "BMP"))]
    out = str(tmp_path / "o")
    writer.write_dataset(_one_case_source(images), out, b"s", fractions=(("train", 1.0),))
    stored = stored_images(out)
    assert len(stored) == 4
    for _, data, digest in stored:
        assert digest.decode() == independent_hash(data)
    # alpha is not part of what the model sees: the RGBA image hashes like its RGB part
    assert stored[1][2].decode() == independent_hash(encode(coded_rgb(40), "PNG"))


# ------------------------------------------------------------------ duplicates
def _dup_fixture(root, n_cases=12):
    """n_cases cases of 2 distinct images each; case 0's first image is also (as a re-saved
    file with other metadata) the first image of case n-1."""
    img = root / "img"
    img.mkdir()
    rows = []
    for c in range(n_cases):
        for j in range(2):
            name = f"c{c}_{j}.png"
            (img / name).write_bytes(encode(coded_rgb(c * 2 + j + 1), "PNG"))
            rows.append(f"P{c},img/{name},{'ab'[c % 2]}")
    (img / "copy.png").write_bytes(plant_png(encode(coded_rgb(1), "PNG")))
    rows.append(f"P{n_cases - 1},img/copy.png,{'ab'[(n_cases - 1) % 2]}")
    (root / "cases.csv").write_text("case_id,image_path,label\n" + "\n".join(rows) + "\n")
    return str(root / "cases.csv"), len(rows)


def _split_of_pixels(out):
    where = collections.defaultdict(set)
    for split in ("train", "val", "test"):
        try:
            files = reader.list_shards(out, split)
        except FileNotFoundError:
            continue
        for _, data, _ in stored_images_of(files):
            where[pil_rgb(data).tobytes()].add(split)
    return where


def stored_images_of(files):
    rows = []
    for p in files:
        for r in tf.data.TFRecordDataset(p):
            f = tf.train.Example.FromString(r.numpy()).features.feature
            rows += [(None, b, None) for b in f[schema.IMAGE_ENCODED].bytes_list.value]
    return rows


def test_duplicates_reject_keeps_the_first_and_names_both(tmp_path):
    csv_path, n_rows = _dup_fixture(tmp_path)
    out = str(tmp_path / "o")
    info = writer.write_dataset(folder.build(csv_path), out, b"s")
    last = f"cases.csv:{n_rows + 1}"
    rej = [r for r in info["rejected"] if r["item"] == last]
    assert len(rej) == 1 and "cases.csv:2" in rej[0]["reason"] and "reject" in rej[0]["reason"]
    assert info["duplicates"] == {"policy": "reject", "across_cases": 1,
                                  "rejected_across_cases": 1, "across_splits": 0,
                                  "distinct_images": 24, "within_case": 0}
    assert info["items_written"] == 24 and info["items_read"] == 25
    assert all(len(s) == 1 for s in _split_of_pixels(out).values())
    blob = shard_bytes(out)
    assert b"P0" not in blob.replace(b"tfrecord", b"") and b"P11" not in blob


@pytest.mark.parametrize("seed", range(4))
def test_duplicates_group_puts_sharing_cases_in_one_split(tmp_path, seed):
    csv_path, _ = _dup_fixture(tmp_path)
    out = str(tmp_path / "o")
    info = writer.write_dataset(folder.build(csv_path), out, b"s", duplicates="group",
                                seed=seed)
    assert info["items_written"] == 25 and info["num_rejected"] == 0
    assert info["duplicates"]["across_cases"] == 1 and info["duplicates"]["across_splits"] == 0
    ids = json.load(open(os.path.join(out, "splits.json")))
    split_of = {h: s for s, hs in ids.items() for h in hs}
    first, last = writer.hash_case_id("P0", b"s"), writer.hash_case_id("P11", b"s")
    assert split_of[first] == split_of[last]
    assert all(len(s) == 1 for s in _split_of_pixels(out).values())


def test_duplicates_allow_keeps_copies_and_counts_them(tmp_path):
    csv_path, _ = _dup_fixture(tmp_path)
    info = writer.write_dataset(folder.build(csv_path), str(tmp_path / "o"), b"s",
                                duplicates="allow", fractions=(("train", 1.0),))
    assert info["items_written"] == 25
    assert info["duplicates"]["policy"] == "allow" and info["duplicates"]["across_cases"] == 1
    assert info["duplicates"]["distinct_images"] == 24


def test_same_image_twice_in_a_case_counts_once(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(coded_rgb(3), "PNG"))
    (tmp_path / "b.png").write_bytes(plant_png(encode(coded_rgb(3), "PNG")))  # same pixels
    (tmp_path / "c.png").write_bytes(encode(coded_rgb(4), "PNG"))
    (tmp_path / "cases.csv").write_text(
        "case_id,image_path\nx,a.png\nx,./a.png\nx,b.png\nx,c.png\n")
    info = writer.write_dataset(folder.build(str(tmp_path / "cases.csv")), str(tmp_path / "o"),
                                b"s", fractions=(("train", 1.0),))
    reasons = {r["item"]: r["reason"] for r in info["rejected"]}
    assert info["items_written"] == 2 and set(reasons) == {"cases.csv:3", "cases.csv:4"}
    assert "cases.csv:2" in reasons["cases.csv:3"] and "cases.csv:2" in reasons["cases.csv:4"]
    assert info["duplicates"]["within_case"] == 2


def test_evaluator_refuses_a_split_sharing_pixels_with_training(tmp_path):
    from micle_tf import config as config_lib
    from micle_tf.evaluation.evaluate import check_no_image_leakage
    csv_path, _ = _dup_fixture(tmp_path, n_cases=20)
    first, last = writer.hash_case_id("P0", b"s"), writer.hash_case_id("P19", b"s")

    def split_of(out, hid):
        ids = json.load(open(os.path.join(out, "splits.json")))
        return next(s for s, hs in ids.items() if hid in hs)

    for seed in range(40):  # a split seed that puts the two copies in train and elsewhere
        out = str(tmp_path / f"allow{seed}")
        writer.write_dataset(folder.build(csv_path), out, b"s", duplicates="allow", seed=seed)
        pair = {split_of(out, first), split_of(out, last)}
        if "train" in pair and len(pair) == 2:
            break
    else:
        raise AssertionError("no seed in 0..39 split the copies between train and another split")
    evaluated = (pair - {"train"}).pop()
    cfg = config_lib.FinetuneConfig(init_from="none", data_dir=out)
    with pytest.raises(ValueError, match=r"image leakage\): 1 of \d+ images"):
        check_no_image_leakage(out, cfg, {}, out, evaluated)
    # the same seed under "group": the copies share a split, so nothing is refused
    out = str(tmp_path / "group")
    writer.write_dataset(folder.build(csv_path), out, b"s", duplicates="group", seed=seed)
    assert split_of(out, first) == split_of(out, last)
    cfg.data_dir = out
    for split in set(json.load(open(os.path.join(out, "splits.json")))) - {"train"}:
        check_no_image_leakage(out, cfg, {}, out, split)


# ------------------------------------------------------------------ clean failures
def test_failed_run_leaves_no_temporary_files(tmp_path):
    def boom():
        raise RuntimeError("disk on fire")
    source = _one_case_source([("ok.png", encode(coded_rgb(1), "PNG"))])
    source.cases.append(writer.SourceCase(key="d", item="case d", label=0, images=[
        writer.SourceImage(item="x.png", load=boom)]))
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="disk on fire"):
        writer.write_dataset(source, str(out), b"s", fractions=(("train", 1.0),))
    assert [n for n in os.listdir(out) if ".tmp-" in n] == []
    # --overwrite removes a killed run's leftovers and the old splits.json
    (out / "train-00000-of-00001.tfrecord.tmp-99999").write_bytes(b"junk")
    (out / "splits.json").write_text("{}")
    with pytest.raises(FileExistsError):
        writer.write_dataset(_one_case_source([("a.png", encode(coded_rgb(2), "PNG"))]),
                             str(out), b"s", fractions=(("train", 1.0),))
    writer.write_dataset(_one_case_source([("a.png", encode(coded_rgb(2), "PNG"))]), str(out),
                         b"s", fractions=(("train", 1.0),), overwrite=True)
    assert sorted(os.listdir(out)) == ["dataset_info.json", "splits.json",
                                       "train-00000-of-00001.tfrecord"]


def test_nothing_written_is_an_error_with_the_reasons(tmp_path):
    source = _one_case_source([("z.png", b""), ("c.png", _bad_crc_png())])
    with pytest.raises(writer.EmptyDatasetError, match="all 2 image") as e:
        writer.write_dataset(source, str(tmp_path / "o"), b"s", fractions=(("train", 1.0),))
    assert {r["item"] for r in e.value.rejected} >= {"z.png", "c.png"}
    assert not os.path.exists(tmp_path / "o" / "dataset_info.json")


def test_fifo_as_image_is_rejected_not_a_hang(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(coded_rgb(1), "PNG"))
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "cases.csv").write_text("case_id,image_path\nx,a.png\nx,fifo.png\n")
    info = writer.write_dataset(folder.build(str(tmp_path / "cases.csv")), str(tmp_path / "o"),
                                b"s", fractions=(("train", 1.0),))
    reasons = {r["item"]: r["reason"] for r in info["rejected"]}
    assert "not a regular file" in reasons["cases.csv:3"] and info["items_written"] == 1


def _micle_data(*args):
    return subprocess.run([sys.executable, "-m", "data_pipelines.cli", *args], text=True,
                          capture_output=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def test_cli_exit_status_and_paths(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    (tmp_path / "cases.csv").write_text("case_id,image_path\nx,z.png\n")
    proc = _micle_data("--source=folder", f"--input={tmp_path / 'cases.csv'}",
                       f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode == 1
    assert "no case could be written" in proc.stderr and "cases.csv:2: zero-byte" in proc.stdout
    proc = _micle_data("--source=ph2", f"--output_dir={tmp_path / 'p'}", "--image_size=0")
    assert proc.returncode != 0 and "image_size" in proc.stderr
    # ~ is expanded, and the printed path is where the records are
    (tmp_path / "a.png").write_bytes(encode(coded_rgb(1), "PNG"))
    (tmp_path / "ok.csv").write_text("case_id,image_path\nx,a.png\n")
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipelines.cli", "--source=folder",
         f"--input={tmp_path / 'ok.csv'}", "--output_dir=~/recs", "--split_fractions=1,0,0"],
        text=True, capture_output=True, timeout=300,
        env=dict(os.environ, HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"-> {tmp_path / 'recs'} (" in proc.stdout
    assert (tmp_path / "recs" / "dataset_info.json").exists() and not os.path.exists("~")


def test_invalid_dataset_info_json_names_the_file(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{"task": "multiclass",')
    with pytest.raises(ValueError, match=r"dataset_info.json is not valid JSON \(line 1"):
        writer.read_info(str(tmp_path))


# ------------------------------------------------------------------ PH² from its distinct patches
def test_ph2_records_hold_each_distinct_patch_once(ph2_records):
    info = writer.read_info(ph2_records)
    assert info["num_cases"] == 199 and info["num_images"] == 1990
    assert info["items_read"] == 3980 and info["items_rejected"] == 1990
    rejected = {r["item"]: r["reason"] for r in info["rejected"]}
    assert set(rejected) == {f"patch{k}b.bmp" for k in range(1990)}
    kinds = collections.Counter(
        "shift" if "shifted" in r else "own" if "its partner" in r else
        "same lesion" if "same lesion" in r else "other lesion" if "another lesion" in r
        else r for r in rejected.values())
    # re-derived from the package's files: 936 shifted, 59 identical partners,
    # 735 copies within the lesion, 260 copies of an earlier lesion's patch
    assert kinds == {"shift": 936, "own": 59, "same lesion": 735, "other lesion": 260}
    stored = stored_images(ph2_records)
    assert len(stored) == 1990
    contents = collections.Counter(pil_rgb(data).tobytes() for _, data, _ in stored)
    assert len(contents) == 1990  # no decoded content twice, in any split
    assert info["duplicates"]["across_splits"] == 0 and info["duplicates"]["across_cases"] == 0
    per_case = collections.Counter(c for c, _, _ in stored)
    assert set(per_case.values()) == {10}
    # each lesion's 10 stored patches are exactly its 10 "a" files
    a_pixels = {}
    data_dir = ph2.package_data_dir()
    for sub in ("Similar", "nonSimilar"):
        for name in os.listdir(os.path.join(data_dir, "patchesDataSet", sub)):
            if name.endswith("a.bmp"):
                with Image.open(os.path.join(data_dir, "patchesDataSet", sub, name)) as im:
                    a_pixels[np.asarray(im.convert("RGB")).tobytes()] = int(name[5:-5]) // 10
    lesions_of_case = collections.defaultdict(set)
    for case, data, _ in stored:
        lesions_of_case[case].add(a_pixels[pil_rgb(data).tobytes()])
    assert all(len(v) == 1 for v in lesions_of_case.values())
    assert sorted(v.pop() for v in lesions_of_case.values()) == list(range(199))
    ids = json.load(open(os.path.join(ph2_records, "splits.json")))
    splits.check_disjoint(ids)

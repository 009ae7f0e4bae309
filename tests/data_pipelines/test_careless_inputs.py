"""What a careless user does, and the clear error (or counted rejection) each one gets:

| mistake                                              | outcome                                   |
|------------------------------------------------------|-------------------------------------------|
| label column spelt `Label` / `diagnosis` while       | ValueError naming the columns found: the  |
|   --label_names is given; `Label` without it         |   column must be called `label`           |
| CSV saved as Latin-1 (`é` in a row)                  | ValueError naming the file and the line;  |
|                                                      |   re-save as UTF-8 (a UTF-8 BOM is fine)  |
| `a.png`, `./a.png`, `sub/../a.png` in one case       | later rows rejected as duplicates naming  |
|                                                      |   the first row                           |
| damaged shard, dataset_info.json without its size    | read_case_index: ShardError naming the    |
|   (header cut, payload cut, byte appended, corrupt   |   file (TF alone loses a header-cut case  |
|   or unparseable record)                             |   silently)                               |

Every image in these fixtures has its own pixels (coded_rgb(10), coded_rgb(20), ...).
"""
import csv
import json
import os
import re
import shutil

import pytest
import tensorflow as tf

from data_pipelines import reader, schema, writer
from data_pipelines.sources import folder
from tests.data_pipelines.images import coded_rgb, encode

SALT = b"s"


def _write_csv(path, header, rows, encoding="utf-8"):
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _images(root, names):
    (root / "img").mkdir(exist_ok=True)
    for k, name in enumerate(names):
        (root / "img" / name).write_bytes(encode(coded_rgb(10 * (k + 1)), "PNG"))


# 1. label column spelt differently ---------------------------------------------------------

@pytest.mark.parametrize("column", ["Label", "diagnosis", "LABEL", "labels"])
def test_label_column_spelt_differently_with_label_names(tmp_path, column):
    _images(tmp_path, ["a.png", "b.png"])
    csv_path = _write_csv(tmp_path / "cases.csv", ["case_id", "image_path", column],
                          [("p1", "img/a.png", "benign"), ("p2", "img/b.png", "malignant")])
    with pytest.raises(ValueError) as err:
        folder.build(csv_path, label_names=["benign", "malignant"])
    msg = str(err.value)
    assert msg.startswith("cases.csv: ")
    assert "must be called 'label'" in msg
    assert f"columns found: ['case_id', 'image_path', '{column}']" in msg


@pytest.mark.parametrize("column", ["Label", "LABEL", "lAbEl"])
def test_label_column_in_the_wrong_case_without_label_names(tmp_path, column):
    _images(tmp_path, ["a.png"])
    csv_path = _write_csv(tmp_path / "cases.csv", ["case_id", "image_path", column],
                          [("p1", "img/a.png", "benign")])
    with pytest.raises(ValueError, match=rf"^cases\.csv: the label column must be called "
                                         rf"'label' \(lower case\), found '{column}'"):
        folder.build(csv_path)


def test_no_label_column_without_label_names_is_an_unlabelled_set(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    csv_path = _write_csv(tmp_path / "cases.csv", ["case_id", "image_path", "diagnosis"],
                          [("p1", "img/a.png", "benign"), ("p2", "img/b.png", "malignant")])
    source = folder.build(csv_path)
    assert source.label_names == []
    assert [c.label for c in source.cases] == [None, None]
    # a padded header still names the `label` column (headers are stripped)
    csv_path = _write_csv(tmp_path / "padded.csv", ["case_id", "image_path", " label "],
                          [("p1", "img/a.png", "benign"), ("p2", "img/b.png", "malignant")])
    source = folder.build(csv_path, label_names=["benign", "malignant"])
    assert [c.label for c in source.cases] == [0, 1]


# 2. a CSV that is not UTF-8 ----------------------------------------------------------------

@pytest.mark.parametrize("bad_line", [3, 700])  # 700: past the text decoder's first chunk
def test_latin1_csv_names_the_file_and_line(tmp_path, bad_line):
    lines = ["case_id,image_path,label"] + [f"p{k},img/a{k}.png,benign"
                                            for k in range(2, 800)]
    lines[bad_line - 1] = f"p{bad_line},img/caf\u00e9.png,benign"
    (tmp_path / "latin.csv").write_bytes(("\r\n".join(lines) + "\r\n").encode("latin-1"))
    with pytest.raises(ValueError) as err:
        folder.build(str(tmp_path / "latin.csv"))
    msg = str(err.value)
    assert msg.startswith(f"latin.csv: line {bad_line} is not valid UTF-8 (byte 0xe9 ")
    assert "re-save the CSV as UTF-8" in msg
    assert str(tmp_path) not in msg
    # the shared reader (ham10000, chexpert, nih_cxr14, dicom labels) says the same
    with pytest.raises(ValueError, match=rf"^latin\.csv: line {bad_line} is not valid UTF-8"):
        list(folder.read_csv_rows(str(tmp_path / "latin.csv")))


def test_latin1_header_is_named_too(tmp_path):
    (tmp_path / "h.csv").write_bytes("case_id,image_path,r\u00e9sultat\np1,a.png,x\n"
                                     .encode("latin-1"))
    with pytest.raises(ValueError, match=r"^h\.csv: line 1 is not valid UTF-8"):
        folder.build(str(tmp_path / "h.csv"))


def test_utf8_with_bom_and_accents_still_reads(tmp_path):
    _images(tmp_path, ["caf\u00e9.png", "b.png"])
    csv_path = _write_csv(tmp_path / "bom.csv", ["case_id", "image_path", "label"],
                          [("p\u00e9", "img/caf\u00e9.png", "b\u00e9nin"),
                           ("p2", "img/b.png", "malin")], encoding="utf-8-sig")
    with open(csv_path, "rb") as f:
        assert f.read(3) == b"\xef\xbb\xbf"
    source = folder.build(csv_path)
    assert source.label_names == ["b\u00e9nin", "malin"]
    assert [(c.key, c.label) for c in source.cases] == [("p\u00e9", 0), ("p2", 1)]
    info = writer.write_dataset(source, str(tmp_path / "out"), SALT,
                                fractions=(("train", 1.0),))
    assert info["num_rejected"] == 0 and info["items_written"] == 2


# 3. one file named two ways in one case ----------------------------------------------------

def test_same_file_spelt_differently_is_a_duplicate(tmp_path):
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "img" / "sub").mkdir()
    rows = [("p1", "img/a.png", "x"),         # 2
            ("p1", "./img/a.png", "x"),       # 3 same file
            ("p1", "img/sub/../a.png", "x"),  # 4 same file
            ("p1", "img/b.png", "x"),         # 5
            ("p1", str(tmp_path / "img" / "." / "b.png"), "x"),  # 6 same file, absolute
            ("p2", "./img/c.png", "x")]       # 7
    source = folder.build(_write_csv(tmp_path / "cases.csv", ["case_id", "image_path",
                                                              "label"], rows))
    reasons = {r["item"]: r["reason"] for r in source.rejected}
    assert reasons == {
        "cases.csv:3": "duplicate image within the case (same file as cases.csv:2)",
        "cases.csv:4": "duplicate image within the case (same file as cases.csv:2)",
        "cases.csv:6": "duplicate image within the case (same file as cases.csv:5)",
    }
    assert [[i.item for i in c.images] for c in source.cases] == [
        ["cases.csv:2", "cases.csv:5"], ["cases.csv:7"]]
    info = writer.write_dataset(source, str(tmp_path / "out"), SALT,
                                fractions=(("train", 1.0),))
    assert (info["items_read"], info["items_written"], info["items_rejected"]) == (6, 3, 3)


# 4. read_case_index on damaged shards without recorded sizes --------------------------------

BAGS = [(1, 0), (2, 1), (3, None), (1, 1), (2, 0)]  # (images, label) per case


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("careless_records")
    cases = []
    for c, (n, label) in enumerate(BAGS):
        images = [writer.SourceImage(item=f"c{c}i{i}",
                                     load=lambda v=10 * (c + 1) + i: encode(coded_rgb(v), "PNG"))
                  for i in range(n)]
        cases.append(writer.SourceCase(key=f"case{c}", images=images, label=label))
    source = writer.SourceData(name="test", task="multiclass", label_names=["a", "b"],
                               cases=cases, items_read=sum(n for n, _ in BAGS))
    writer.write_dataset(source, str(out / "data"), SALT, fractions=(("train", 1.0),),
                         num_shards=1)
    return out / "data"


def _raw_records(path):
    return [r.numpy() for r in tf.data.TFRecordDataset(path)]


def _expected_index(path):
    """The index read independently of the reader: the records' own features."""
    out = []
    for raw in _raw_records(path):
        f = tf.train.Example.FromString(raw).features.feature
        labels = list(f[schema.LABEL_CLASS].int64_list.value)
        out.append((f[schema.CASE_ID].bytes_list.value[0].decode(),
                    labels[0] if labels else None, len(f[schema.IMAGE_ENCODED].bytes_list.value)))
    return out


def _copy_without_sizes(written, tmp_path, how):
    data_dir = tmp_path / "data"
    shutil.copytree(written, data_dir)
    info_path = data_dir / writer.INFO_FILE
    info = json.loads(info_path.read_text())
    if how == "no split":
        del info["splits"]["train"]
    else:
        del info["splits"]["train"]["shard_bytes"]
    info_path.write_text(json.dumps(info))
    (shard,) = reader.list_shards(str(data_dir), "train")
    return str(data_dir), shard


def test_read_case_index_intact(written, tmp_path):
    data_dir, shard = _copy_without_sizes(written, tmp_path, "no sizes")
    want = _expected_index(shard)
    ids = {writer.hash_case_id(f"case{c}", SALT): (n, label) for c, (n, label) in enumerate(BAGS)}
    assert sorted((cid, label, n) for cid, label, n in want) == sorted(
        (cid, label, n) for cid, (n, label) in ids.items())
    assert reader.read_case_index(data_dir, "train") == want
    assert reader.read_case_index(str(written), "train") == want


@pytest.mark.parametrize("how", ["no split", "no sizes"])
@pytest.mark.parametrize("damage", ["cut in a header", "cut in a payload", "byte appended"])
def test_read_case_index_names_a_damaged_shard_without_sizes(written, tmp_path, how, damage):
    data_dir, shard = _copy_without_sizes(written, tmp_path, how)
    with open(shard, "rb") as f:
        data = f.read()
    first = 12 + len(_raw_records(shard)[0]) + 4  # end of the first record
    damaged = {"cut in a header": data[:first + 5], "cut in a payload": data[:first + 12 + 10],
               "byte appended": data + b"\0"}[damage]
    with open(shard, "wb") as f:
        f.write(damaged)
    if damage == "cut in a header":  # what TF alone does: one record, no error
        assert len(_raw_records(shard)) == 1
    with pytest.raises(reader.ShardError) as err:
        reader.read_case_index(data_dir, "train")
    assert err.value.path == shard
    msg = str(err.value)
    assert os.path.basename(shard) in msg
    assert "truncated" in msg
    if damage == "cut in a header":
        assert "truncated TFRecord shard (5 bytes after the last complete record, 1 records" \
            in msg


@pytest.mark.parametrize("damage", ["corrupt byte", "not an Example", "binary garbage",
                                    "label out of range"])
def test_read_case_index_names_a_corrupt_or_unparseable_record(written, tmp_path, damage):
    data_dir, shard = _copy_without_sizes(written, tmp_path, "no sizes")
    records = _raw_records(shard)
    if damage == "corrupt byte":  # flip a payload byte of record 2: its CRC no longer matches
        with open(shard, "rb") as f:
            data = bytearray(f.read())
        start = sum(12 + len(r) + 4 for r in records[:2])
        data[start + 12 + 3] ^= 0xFF
        with open(shard, "wb") as f:
            f.write(bytes(data))
        pattern = r"truncated or corrupt TFRecord shard \(read 2 good records; .*corrupted"
    elif damage in ("not an Example", "binary garbage"):  # well framed, does not parse
        garbage = b"not a tf.train.Example" if damage == "not an Example" else b"\xff\xfe\x00"
        with tf.io.TFRecordWriter(shard) as w:
            for r in records[:3] + [garbage] + records[3:]:
                w.write(r)
        pattern = r"record 3 is invalid: .*(parse|tf\.train\.Example)"
    else:  # the info file says one class; the records hold labels 0 and 1
        info_path = os.path.join(data_dir, writer.INFO_FILE)
        with open(info_path) as f:
            info = json.load(f)
        info["label_names"] = ["a"]
        with open(info_path, "w") as f:
            json.dump(info, f)
        bad = next(k for k, (_, label, _) in enumerate(_expected_index(shard)) if label == 1)
        bad_id = _expected_index(shard)[bad][0]
        pattern = rf"record {bad} is invalid: .*outside \[0, 1\).*{bad_id}"
    with pytest.raises(reader.ShardError, match=rf"(?s)^{re.escape(shard)}: {pattern}") as err:
        reader.read_case_index(data_dir, "train")
    assert err.value.path == shard


def test_read_case_index_multilabel_and_several_shards(tmp_path):
    """The batched read keeps multilabel codes and record order across shards."""
    cases = [writer.SourceCase(key=f"m{c}", label=label, images=[writer.SourceImage(
        item=f"m{c}", load=lambda v=20 + 10 * c: encode(coded_rgb(v), "PNG"))])
        for c, label in enumerate([[1, 0, -1], [-2, -2, -2], [0, 1, -2], [0, 0, 1]])]
    source = writer.SourceData(name="t", task="multilabel", label_names=["x", "y", "z"],
                               cases=cases, items_read=4)
    writer.write_dataset(source, str(tmp_path), SALT, fractions=(("train", 1.0),),
                         num_shards=2)
    want = []
    for shard in reader.list_shards(str(tmp_path), "train"):
        for raw in _raw_records(shard):
            f = tf.train.Example.FromString(raw).features.feature
            codes = list(f[schema.LABEL_MULTI].int64_list.value)
            want.append((f[schema.CASE_ID].bytes_list.value[0].decode(),
                         None if set(codes) == {schema.MISSING} else codes, 1))
    assert len(want) == 4 and sum(label is None for _, label, _ in want) == 1
    assert reader.read_case_index(str(tmp_path), "train") == want

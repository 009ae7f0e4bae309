"""Non-identifying case attributes (`case/attr/*`): the token mapping, the schema and writer
contract, each converter's extraction on its upstream-layout fixture, and a data-level privacy
grep (no raw age, date, free text or id in the records)."""
import csv
import os

import pytest
import tensorflow as tf

from data_pipelines import attributes, reader, schema, writer
from data_pipelines.sources import get_source
from tests.data_pipelines import upstream_fixtures as fx
from tests.data_pipelines.images import coded_rgb, encode

SALT = b"attribute-test-salt"
KNOWN_KEYS = {schema.CASE_ID, schema.NUM_IMAGES, schema.IMAGE_ENCODED, schema.IMAGE_FORMAT,
              schema.IMAGE_VIEW, schema.IMAGE_PIXEL_SHA256, schema.LABEL_CLASS,
              schema.LABEL_MULTI} | {schema.attribute_key(n) for n in schema.CASE_ATTRIBUTES}


# ----------------------------------------------------------------------------- helpers
def convert(source, out_dir):
    info = writer.write_dataset(source, str(out_dir), SALT, fractions=(("train", 1.0),))
    return str(out_dir), info


def by_hash(expected):
    return {writer.hash_case_id(k, SALT): v for k, v in expected.items()}


def records(out, split="train"):
    for path in reader.list_shards(out, split):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            yield tf.train.Example.FromString(raw)


def check_record_attributes(out, info):
    """Every record's keys are documented ones and every case/attr value is a vocabulary token;
    dataset_info's counts agree with the records."""
    counts = {}
    for ex in records(out):
        feats = ex.features.feature
        assert set(feats) <= KNOWN_KEYS, set(feats) - KNOWN_KEYS
        for name in schema.CASE_ATTRIBUTES:
            key = schema.attribute_key(name)
            if key in feats:
                values = [v.decode("ascii") for v in feats[key].bytes_list.value]
                assert len(values) == 1 and values[0] in schema.CASE_ATTRIBUTE_VALUES[name]
                counts.setdefault(name, {}).setdefault(values[0], 0)
                counts[name][values[0]] += 1
    assert info["case_attributes"]["train"] == counts


def output_blob(out):
    return b"".join(open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)))


def check_privacy(out, raw_values, tokens):
    blob = output_blob(out)
    for raw in raw_values:
        assert raw not in blob, raw
    for token in tokens:
        assert token in blob, token


# ----------------------------------------------------------------------------- token mapping
@pytest.mark.parametrize("value,band", [
    ("47.0", "40-49"), (47, "40-49"), ("47", "40-49"), ("047Y", "40-49"), ("058Y", "50-59"),
    ("006M", "0-9"), ("010W", "0-9"), ("003D", "0-9"), ("0", "0-9"), (9.99, "0-9"),
    ("10", "10-19"), ("089Y", "80-89"), ("89.9", "80-89"), ("90", "90+"), ("095Y", "90+"),
    (120, "90+"), ("414", "unknown"), ("-5", "unknown"), ("", "unknown"), (None, "unknown"),
    ("nan", "unknown"), (float("nan"), "unknown"), ("about 40", "unknown"), ("040X", "unknown"),
    ("1985-03-04", "unknown"), ("19850304", "unknown"),
])
def test_age_bands(value, band):
    assert attributes.age_band(value) == band


def test_age_string_units():
    assert attributes.age_years("018M") == pytest.approx(1.5)
    assert attributes.age_years("052W") == pytest.approx(52 * 7 / 365.25)
    assert attributes.age_years(" 045y ") == 45.0


@pytest.mark.parametrize("fn,cases", [
    (attributes.sex, {"F": "female", "female": "female", "Female": "female", "M": "male",
                      "MALE": "male", "O": "other", "Unknown": "unknown", "": "unknown",
                      "X": "unknown", None: "unknown", b"F": "female"}),
    (attributes.view, {"frontal_PA": "pa", "PA": "pa", "frontal_AP": "ap", "AP": "ap",
                       "lateral": "lateral", "LAT": "lateral", "LL": "lateral",
                       "frontal": "frontal", "frontal_LL": "frontal", "": "unknown",
                       "oblique left": "other"}),
    (attributes.site, {"lower extremity": "lower_extremity", "Upper Extremity":
                       "upper_extremity", "back": "back", "unknown": "unknown", "": "unknown",
                       "left knee of Mr Smith": "other"}),
    (attributes.dx_type, {"histo": "histo", "follow_up": "follow_up", "follow-up": "follow_up",
                          "consensus": "consensus", "confocal": "confocal", "": "unknown",
                          "biopsy": "other"}),
    (attributes.modality, {"CR": "cr", "dx": "dx", "MR": "mr", "XC": "xc", "": "unknown",
                           "HOLOGRAM": "other"}),
    (attributes.manufacturer, {
        "GE MEDICAL SYSTEMS": "ge", "GE Healthcare": "ge", "General Electric Co.": "ge",
        "Gemini Imaging": "other", "Philips Medical Systems": "philips",
        "SIEMENS": "siemens", "Siemens Healthineers": "siemens",
        "FUJIFILM Corporation": "fujifilm", "FUJI PHOTO FILM Co., ltd.": "fujifilm",
        "TOSHIBA_MEC": "toshiba", "Canon Medical Systems": "canon", "KONICA MINOLTA": "konica_minolta",
        "Agfa-Gevaert": "agfa", "Carestream Health": "carestream", "Eastman Kodak": "kodak",
        "Hologic, Inc.": "hologic", "SAMSUNG MEDISON": "samsung", "ACME Imaging": "other",
        "": "unknown", None: "unknown"}),
])
def test_tokens_from_fixed_vocabularies(fn, cases):
    name = {attributes.sex: "sex", attributes.view: "view", attributes.site: "site",
            attributes.dx_type: "dx_type", attributes.modality: "modality",
            attributes.manufacturer: "manufacturer"}[fn]
    for value, token in cases.items():
        assert fn(value) == token, value
        assert token in schema.CASE_ATTRIBUTE_VALUES[name]


def test_case_value_and_resolution():
    assert attributes.case_value(["pa", "pa"]) == "pa"
    assert attributes.case_value(["pa", "lateral"]) == "mixed"
    assert attributes.case_value([]) == "unknown"
    got = attributes.resolve_case_attributes({"sex": "male", "view": ["pa", "lateral", "pa"]},
                                             kept=[0, 2])
    assert got == {"sex": "male", "view": "pa"}
    assert attributes.resolve_case_attributes({"view": ["pa", "ap"]}) == {"view": "mixed"}


# ----------------------------------------------------------------------------- schema
def test_schema_round_trip_and_validation():
    img = [encode(coded_rgb(1), "PNG")]
    rec = schema.encode_case("c1", img, ["png"], label=0, num_classes=2,
                             attributes={"sex": "female", "age_band": "40-49"})
    parsed = schema.parse_case_attributes(tf.constant(rec))
    got = {k: v.numpy() for k, v in parsed["attributes"].items()}
    assert parsed["case_id"].numpy() == b"c1"
    assert got["sex"] == b"female" and got["age_band"] == b"40-49"
    assert all(got[n] == b"" for n in schema.CASE_ATTRIBUTES if n not in ("sex", "age_band"))
    # parse_case ignores the keys
    assert schema.parse_case(tf.constant(rec), "multiclass", 2)["label"].numpy() == 0
    with pytest.raises(ValueError, match="unknown case attribute 'birth_date'"):
        schema.encode_case("c", img, ["png"], attributes={"birth_date": "unknown"})
    with pytest.raises(ValueError, match="'age_band' must be one of") as e:
        schema.encode_case("c", img, ["png"], attributes={"age_band": "047Y"})
    assert "047Y" not in str(e.value)  # the raw value is never echoed into logs
    with pytest.raises(ValueError, match="'sex' must be one of"):
        schema.encode_case("c", img, ["png"], attributes={"sex": "Female"})
    assert set(schema.CASE_ATTRIBUTES) == {"sex", "age_band", "view", "site", "dx_type",
                                           "modality", "manufacturer"}
    for name, vocab in schema.CASE_ATTRIBUTE_VALUES.items():
        assert "unknown" in vocab and all(v.isascii() and len(v) <= 16 for v in vocab)
        assert ("mixed" in vocab) == (name in schema.IMAGE_LEVEL_ATTRIBUTES)


def test_writer_checks_attributes_before_reading_images(tmp_path):
    def boom():
        raise AssertionError("an image was read before the attributes were checked")

    def source(attrs, n_images=1):
        case = writer.SourceCase(key="k", attributes=attrs, images=[
            writer.SourceImage(f"{i}.png", boom) for i in range(n_images)])
        return writer.SourceData(name="t", task="multiclass", label_names=["x"], cases=[case],
                                 items_read=n_images)

    with pytest.raises(ValueError, match="1 view values for 2 images"):
        writer.write_dataset(source({"view": ["pa"]}, 2), str(tmp_path / "o1"), SALT)
    with pytest.raises(ValueError, match="may be given per image, not 'sex'"):
        writer.write_dataset(source({"sex": ["male"]}), str(tmp_path / "o2"), SALT)
    with pytest.raises(ValueError, match="'site' must be one of"):
        writer.write_dataset(source({"site": "left knee"}), str(tmp_path / "o3"), SALT)


# ----------------------------------------------------------------------------- converters
def test_ham10000_attributes(tmp_path):
    csv_path, expect = fx.write_ham10000(tmp_path / "ham")
    out, info = convert(get_source("ham10000").build(input_path=csv_path), tmp_path / "out")
    assert reader.read_case_attributes(out, "train") == by_hash(expect["attributes"])
    check_record_attributes(out, info)
    assert info["case_attributes"]["train"]["age_band"] == {"0-9": 1, "40-49": 1, "60-69": 1,
                                                            "90+": 1, "unknown": 1}
    check_privacy(out, expect["raw_attributes"] + expect["secrets"],
                  [b"40-49", b"lower_extremity", b"upper_extremity", b"follow_up"])


def test_ham10000_without_attribute_columns(tmp_path):
    csv_path, _ = fx.write_ham10000(tmp_path / "ham")
    with open(csv_path) as f:
        rows = list(csv.reader(f))
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([r[:3] for r in rows])  # lesion_id, image_id, dx only
    out, info = convert(get_source("ham10000").build(input_path=csv_path), tmp_path / "out")
    got = reader.read_case_attributes(out, "train")
    assert len(got) == info["num_cases"] and all(v == {} for v in got.values())
    assert info["case_attributes"] == {"train": {}}


def test_chexpert_attributes(tmp_path):
    csv_path, expect = fx.write_chexpert(tmp_path / "chex")
    out, info = convert(get_source("chexpert").build(input_path=csv_path), tmp_path / "out")
    assert reader.read_case_attributes(out, "train") == by_hash(expect["attributes"])
    check_record_attributes(out, info)
    # CheXpert ages are 2-digit numbers (too short for a byte grep): the records' attribute
    # values are vocabulary tokens (checked above), so no raw age is among them
    values = {v for a in reader.read_case_attributes(out, "train").values() for v in a.values()}
    assert not values & expect["raw_ages"]
    check_privacy(out, expect["secrets"] + [b"Male", b"Unknown"], [b"60-69", b"90+", b"mixed"])
    # study cases: patient00001's study1 has a frontal and a lateral image, study2 one AP
    by_study = get_source("chexpert").build(input_path=csv_path, chexpert_case="study")
    out2, _ = convert(by_study, tmp_path / "out2")
    got = reader.read_case_attributes(out2, "train")
    assert got[writer.hash_case_id("patient00001/study1", SALT)]["view"] == "mixed"
    assert got[writer.hash_case_id("patient00001/study2", SALT)]["view"] == "ap"


def test_nih_attributes(tmp_path):
    csv_path, expect = fx.write_nih(tmp_path / "nih")
    out, info = convert(get_source("nih_cxr14").build(input_path=csv_path), tmp_path / "out")
    assert reader.read_case_attributes(out, "train") == by_hash(expect["attributes"])
    check_record_attributes(out, info)
    check_privacy(out, expect["raw_attributes"] + expect["secrets"], [b"50-59", b"40-49"])


def test_dicom_attributes_and_privacy(tmp_path):
    folder, labels_csv, expect = fx.write_dicom_folder(tmp_path)
    source = get_source("dicom").build(input_path=folder, dicom_labels=labels_csv)
    keys = {c.item[len("case of "):]: c.key for c in source.cases}
    out, info = convert(source, tmp_path / "out")
    want = {writer.hash_case_id(keys[first], SALT): v
            for first, v in expect["attributes"].items()}
    assert reader.read_case_attributes(out, "train") == want
    check_record_attributes(out, info)
    check_privacy(out, expect["raw_attributes"] + expect["secrets"],
                  [b"40-49", b"90+", b"siemens", b"mixed"])


def test_folder_optional_attribute_columns(tmp_path):
    rows = [("p1", "a.png", "x", "F", "47.0", "PA", "back"),
            ("p1", "b.png", "x", "M", "63", "lateral", "face"),  # first row wins for sex/age
            ("p2", "c.png", "y", "", "", "", "Left Shoulder Blade"),
            ("p3", "d.png", "y", "male", "091Y", "AP", "scalp")]
    for i, (_, name, *_) in enumerate(rows):
        (tmp_path / name).write_bytes(encode(coded_rgb(20 * i + 1, 16), "PNG"))
    with open(tmp_path / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image_path", "label", "sex", "age", "view", "site"])
        w.writerows(rows)
    source = get_source("folder").build(input_path=str(tmp_path / "cases.csv"))
    out, info = convert(source, tmp_path / "out")
    assert reader.read_case_attributes(out, "train") == by_hash({
        "p1": {"sex": "female", "age_band": "40-49", "view": "mixed", "site": "back"},
        "p2": {"sex": "unknown", "age_band": "unknown", "view": "unknown", "site": "other"},
        "p3": {"sex": "male", "age_band": "90+", "view": "ap", "site": "scalp"}})
    check_record_attributes(out, info)
    check_privacy(out, [b"47.0", b"091Y", b"Shoulder", b"p1,"], [b"40-49"])
    # no attribute column: no attribute key in the records
    (tmp_path / "plain.csv").write_text("case_id,image_path,label\np1,a.png,x\np2,c.png,y\n")
    out2, info2 = convert(get_source("folder").build(input_path=str(tmp_path / "plain.csv")),
                          tmp_path / "out2")
    assert all(v == {} for v in reader.read_case_attributes(out2, "train").values())
    assert info2["case_attributes"] == {"train": {}}


def test_attribute_counts_per_split(tmp_path):
    cases = []
    for i in range(12):
        data = encode(coded_rgb(10 * i + 3, 16), "PNG")
        cases.append(writer.SourceCase(
            key=f"case{i}", images=[writer.SourceImage(f"{i}.png", lambda d=data: d)],
            label=i % 2, attributes={"sex": "female" if i % 3 else "male"}))
    source = writer.SourceData(name="t", task="multiclass", label_names=["a", "b"],
                               cases=cases, items_read=12)
    info = writer.write_dataset(source, str(tmp_path / "o"), SALT,
                                fractions=(("train", 0.5), ("test", 0.5)))
    counts = info["case_attributes"]
    assert set(counts) == set(info["splits"])
    for split, per_name in counts.items():
        assert sum(per_name["sex"].values()) == info["splits"][split]["cases"]
        got = reader.read_case_attributes(str(tmp_path / "o"), split)
        assert len(got) == info["splits"][split]["cases"]
    assert sum(c["sex"].get("male", 0) for c in counts.values()) == 4
    assert sum(c["sex"].get("female", 0) for c in counts.values()) == 8

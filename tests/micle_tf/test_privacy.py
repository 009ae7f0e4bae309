"""No patient id, source path, raw age or date leaks from `micle-data`, `micle-pretrain`,
`micle-finetune`, `micle-evaluate` and `micle-export` outputs or logs, no file path at all is in
the exported model (its model card included), and no case lands in two splits.

What is checked: a folder-source CSV whose case ids are distinctive patient ids
("PATIENT-JOHN-DOE-123", ...), with raw ages ("0041.000Y", ...), sexes and a date-of-birth column,
and whose images live under a distinctive folder with distinctive file names, is converted
with the `micle-data` CLI and pretrained for 2 steps with the `micle-pretrain` CLI (kNN
monitor on, so the val split is embedded and logged too); the pretrained encoder is fine-tuned
for 2 steps with `micle-finetune --calibrate` (temperature scaling on the val split), evaluated
with `micle-evaluate --subgroups=sex,age_band` and exported with `micle-export`. Then every byte
of the records (shards), `dataset_info.json`, `splits.json`, everything under the model_dirs
(checkpoints, TensorBoard event files, configs, summaries, `calibration.json`,
`metrics_test.json`, `report_test.md`), the SavedModel (its `model_card.json`/`.md` assets,
`micle_export.json`) and the captured stdout/stderr of every CLI is searched,
case-insensitively, for: each raw patient id, its name part ("JOHN-DOE"), the source folder's
name and absolute path, the image file names, the raw ages and the birth dates. None may
appear. The records' `case/attr/*` keys hold only the coarse tokens (sex, 10-year age band).
The export, and the model card its `get_model_card` signature returns, must not hold the
temporary root of the whole run either: no file path of any kind.

Not a leak, and so not searched for outside the export: the output paths the user chose
(`--data_dir` is recorded in pretrain_config.json, `--output_dir` in the micle-data summary
line) and the CSV's base name, which rejections use with a line number ("cases.csv:7") by
design. The raw ids must not be guessable from the salted hashes either: the salt here is
fixed only to recompute them.
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import reader, splits, writer
from tests.data_pipelines.images import coded_rgb, encode
from tests.helpers import REPO, child_env

PATIENTS = [f"PATIENT-{first}-{last}-{i:03d}" for i, (first, last) in enumerate(
    [("JOHN", "DOE"), ("JANE", "ROE"), ("MAX", "MUSTER"), ("ERIKA", "MUSTERMANN"),
     ("MARIO", "ROSSI"), ("JUAN", "PEREZ"), ("IVAN", "IVANOV"), ("TARO", "YAMADA"),
     ("OLA", "NORDMANN"), ("JAN", "JANSEN"), ("PIET", "PUK"), ("ANNA", "SVENSSON")], start=123)]
SOURCE_FOLDER = "SECRET-CLINIC-FOLDER-XYZ"
SALT = "privacy-test-salt"
# "0041.000Y" -> age band "40-49"; long enough not to occur by chance in binary weights
RAW_AGES = [f"00{41 + p}.000Y" for p in range(len(PATIENTS))]
BIRTH_DATES = [f"19{61 + p}-03-{10 + p}" for p in range(len(PATIENTS))]


def _run(cmd, log_path, timeout=240):
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                              env=child_env(), timeout=timeout)
    text = open(log_path, "rb").read()
    assert proc.returncode == 0, text.decode(errors="replace")[-3000:]
    return text


def _write_source(root):
    folder = root / SOURCE_FOLDER
    (folder / "imgs").mkdir(parents=True)
    rows, files = [], []
    for p, patient in enumerate(PATIENTS):
        extra = ("F" if p % 2 else "M", RAW_AGES[p], BIRTH_DATES[p])
        for k in range(2):
            name = f"scan-of-{patient.lower()}-{k}.png"
            (folder / "imgs" / name).write_bytes(encode(coded_rgb(10 * p + k, 16), "PNG"))
            rows.append((patient, f"imgs/{name}", "benign" if p % 2 else "malignant", *extra))
            files.append(name)
    # one row whose file is missing: its rejection must name the CSV row, not the path or id
    rows.append((PATIENTS[0], f"imgs/missing-{PATIENTS[0]}.png", "malignant", "M",
                 RAW_AGES[0], BIRTH_DATES[0]))
    with open(folder / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image_path", "label", "sex", "age", "date_of_birth"])
        w.writerows(rows)
    return folder, files


def _secrets(folder, files):
    out = {str(folder), SOURCE_FOLDER, "scan-of-"}
    for patient in PATIENTS:
        out.add(patient)
        out.add(patient.split("-", 1)[1].rsplit("-", 1)[0])  # "JOHN-DOE"
    out.update(files)
    out.update(RAW_AGES)
    out.update(BIRTH_DATES)
    return sorted(s.lower().encode() for s in out)


def _all_files(*roots):
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                yield os.path.join(dirpath, n)


@pytest.mark.slow
def test_no_ids_or_source_paths_leak_and_splits_are_disjoint(tmp_path):
    folder, files = _write_source(tmp_path)
    # positive control: every secret is present in what the user supplied
    supplied = ((folder / "cases.csv").read_bytes() + str(folder).encode()).lower()
    assert all(s in supplied for s in _secrets(folder, files))
    data_dir, model_dir = tmp_path / "records", tmp_path / "model"
    data_log = _run([sys.executable, "-m", "data_pipelines.cli", "--source=folder",
                     f"--input={folder / 'cases.csv'}", f"--output_dir={data_dir}",
                     f"--salt={SALT}", "--num_shards=2", "--split_fractions=0.5,0.25,0.25"],
                    tmp_path / "data.log")
    train_log = _run([sys.executable, "-m", "micle_tf.cli.pretrain", "--method=micle",
                      f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                      "--backbone=resnet18", "--width_multiplier=0.125", "--image_size=32",
                      "--batch_size=4", "--train_steps=2", "--steps_per_epoch=1",
                      "--knn_monitor=true", "--verbose=2",
                      # the speed options go through the same CLI and logs
                      "--cache_decoded", "--augment_placement=device",
                      "--color_jitter_strength=0.5"], tmp_path / "train.log")

    ft_dir, export_dir = tmp_path / "finetuned", tmp_path / "export"
    tiny = ["--backbone=resnet18", "--width_multiplier=0.125", "--image_size=32"]
    finetune_log = _run([sys.executable, "-m", "micle_tf.cli.finetune", f"--data_dir={data_dir}",
                         f"--model_dir={ft_dir}", f"--init_from={model_dir}",
                         "--label_fraction=1.0", "--batch_size=4", "--train_steps=2",
                         "--steps_per_epoch=1", "--verbose=2", "--calibrate", *tiny],
                        tmp_path / "finetune.log")
    evaluate_log = _run([sys.executable, "-m", "micle_tf.cli.evaluate", f"--data_dir={data_dir}",
                         f"--model_dir={ft_dir}", "--split=test", "--n_boot=20",
                         "--subgroups=sex,age_band", "--min_group_size=2"],
                        tmp_path / "evaluate.log")
    export_log = _run([sys.executable, "-m", "micle_tf.cli.export", f"--model_dir={ft_dir}",
                       f"--export_dir={export_dir}"], tmp_path / "export.log")

    info = writer.read_info(str(data_dir))
    assert info["items_read"] == info["items_written"] + info["items_rejected"] == 25
    assert [r["item"] for r in info["rejected"]] == ["cases.csv:26"]
    searched = list(_all_files(data_dir, model_dir, ft_dir, export_dir))
    names = {os.path.relpath(p, tmp_path) for p in searched}
    assert {"records/dataset_info.json", "records/splits.json",
            "model/pretrain_config.json", "model/pretrain_summary.json",
            "model/checkpoints/checkpoint"} <= names
    assert any(n.endswith(".tfrecord") for n in names)
    assert any(n.startswith("model/checkpoints/ckpt-") for n in names)
    assert any("tfevents" in n for n in names)
    blobs = {os.path.relpath(p, tmp_path): open(p, "rb").read() for p in searched}
    assert {"finetuned/calibration.json", "finetuned/metrics_test.json",
            "finetuned/report_test.md", "export/assets/model_card.json",
            "export/assets/model_card.md", "export/saved_model.pb"} <= names
    blobs["micle-data output"], blobs["micle-pretrain output"] = data_log, train_log
    blobs["micle-finetune output"], blobs["micle-evaluate output"] = finetune_log, evaluate_log
    blobs["micle-export output"] = export_log
    assert b"same_case_top1" in train_log  # the kNN monitor ran and was logged
    config = json.loads(blobs["model/pretrain_config.json"])["config"]
    assert config["cache_decoded"] is True and config["augment_placement"] == "device"
    for secret in _secrets(folder, files):
        leaks = [name for name, blob in blobs.items() if secret in blob.lower()]
        assert not leaks, f"{secret!r} appears in {leaks}"
    # the export holds no file path at all, nor the card its signature returns
    root = [str(tmp_path).encode(), os.path.realpath(tmp_path).encode()]
    for name, blob in blobs.items():
        if name.startswith("export/"):
            assert not [r for r in root if r in blob], name
    card = json.loads(blobs["export/assets/model_card.json"])
    assert card["evaluation"]["subgroups"]["min_group_size"] == 2
    assert set(card["evaluation"]["subgroups"]["attributes"]) == {"sex", "age_band"}
    assert card["calibration"]["temperature_scaling"] is True
    counts = card["training_data"]["case_attributes"]["train"]
    assert set(counts) == {"sex", "age_band"}
    for table in counts.values():
        assert all(isinstance(n, int) and n >= 10 or n == "n < 10" for n in table.values())
    # the records' attribute keys carry only coarse tokens
    attrs = {c: a for s in info["splits"]
             for c, a in reader.read_case_attributes(str(data_dir), s).items()}
    assert len(attrs) == len(PATIENTS)
    assert {a["sex"] for a in attrs.values()} == {"female", "male"}
    assert {a["age_band"] for a in attrs.values()} == {"40-49", "50-59"}
    assert all(set(a) == {"sex", "age_band"} for a in attrs.values())

    # no case in two splits; together the splits hold exactly the salted ids of all patients
    index = {s: [c for c, _, _ in reader.read_case_index(str(data_dir), s)]
             for s in info["splits"]}
    assert set(index) == {"train", "val", "test"} and all(index.values())
    splits.check_disjoint(index)
    every = [c for ids in index.values() for c in ids]
    assert len(every) == len(set(every)) == len(PATIENTS)
    assert set(every) == {writer.hash_case_id(p, SALT.encode()) for p in PATIENTS}
    assert np.all([len(c) == 32 and c not in PATIENTS for c in every])

"""No patient id or source path leaks from `micle-data` and `micle-pretrain` outputs or logs, and
no case lands in two splits.

What is checked: a folder-source CSV whose case ids are distinctive patient ids
("PATIENT-JOHN-DOE-123", ...) and whose images live under a distinctive folder with
distinctive file names is converted with the `micle-data` CLI and pretrained for 2 steps with
the `micle-pretrain` CLI (kNN monitor on, so the val split is embedded and logged too). Then
every byte of the records (shards), `dataset_info.json`, `splits.json`, everything under the
model_dir (checkpoints, TensorBoard event files, `pretrain_config.json`,
`pretrain_summary.json`) and the captured stdout/stderr of both CLIs is searched,
case-insensitively, for: each raw patient id, its name part ("JOHN-DOE"), the source folder's
name and absolute path, and the image file names. None may appear.

Not a leak, and so not searched for: the output paths the user chose (`--data_dir` is recorded
in pretrain_config.json, `--output_dir` in the micle-data summary line) and the CSV's base
name, which rejections use with a line number ("cases.csv:7") by design. The raw ids must not
be guessable from the salted hashes either: the salt here is fixed only to recompute them.
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
        for k in range(2):
            name = f"scan-of-{patient.lower()}-{k}.png"
            (folder / "imgs" / name).write_bytes(encode(coded_rgb(10 * p + k, 16), "PNG"))
            rows.append((patient, f"imgs/{name}", "benign" if p % 2 else "malignant"))
            files.append(name)
    # one row whose file is missing: its rejection must name the CSV row, not the path or id
    rows.append((PATIENTS[0], f"imgs/missing-{PATIENTS[0]}.png", "malignant"))
    with open(folder / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image_path", "label"])
        w.writerows(rows)
    return folder, files


def _secrets(folder, files):
    out = {str(folder), SOURCE_FOLDER, "scan-of-"}
    for patient in PATIENTS:
        out.add(patient)
        out.add(patient.split("-", 1)[1].rsplit("-", 1)[0])  # "JOHN-DOE"
    out.update(files)
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
                      "--cache_decoded", "--augment_placement=device"], tmp_path / "train.log")

    info = writer.read_info(str(data_dir))
    assert info["items_read"] == info["items_written"] + info["items_rejected"] == 25
    assert [r["item"] for r in info["rejected"]] == ["cases.csv:26"]
    searched = list(_all_files(data_dir, model_dir))
    names = {os.path.relpath(p, tmp_path) for p in searched}
    assert {"records/dataset_info.json", "records/splits.json",
            "model/pretrain_config.json", "model/pretrain_summary.json",
            "model/checkpoints/checkpoint"} <= names
    assert any(n.endswith(".tfrecord") for n in names)
    assert any(n.startswith("model/checkpoints/ckpt-") for n in names)
    assert any("tfevents" in n for n in names)
    blobs = {os.path.relpath(p, tmp_path): open(p, "rb").read() for p in searched}
    blobs["micle-data output"], blobs["micle-pretrain output"] = data_log, train_log
    assert b"same_case_top1" in train_log  # the kNN monitor ran and was logged
    config = json.loads(blobs["model/pretrain_config.json"])["config"]
    assert config["cache_decoded"] is True and config["augment_placement"] == "device"
    for secret in _secrets(folder, files):
        leaks = [name for name, blob in blobs.items() if secret in blob.lower()]
        assert not leaks, f"{secret!r} appears in {leaks}"

    # no case in two splits; together the splits hold exactly the salted ids of all patients
    index = {s: [c for c, _, _ in reader.read_case_index(str(data_dir), s)]
             for s in info["splits"]}
    assert set(index) == {"train", "val", "test"} and all(index.values())
    splits.check_disjoint(index)
    every = [c for ids in index.values() for c in ids]
    assert len(every) == len(set(every)) == len(PATIENTS)
    assert set(every) == {writer.hash_case_id(p, SALT.encode()) for p in PATIENTS}
    assert np.all([len(c) == 32 and c not in PATIENTS for c in every])

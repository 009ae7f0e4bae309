import json
import os
import subprocess
import sys

import pytest

from tests.helpers import write_folder_fixture

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def micle_data(*args):
    return subprocess.run([sys.executable, "-m", "data_pipelines.cli", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_ph2_end_to_end(tmp_path):
    out = tmp_path / "ph2"
    proc = micle_data("--source=ph2", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "199 cases, 1990 images" in proc.stdout and "rejected 1990" in proc.stdout
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["num_cases"] == 199 and info["num_images"] == 1990
    assert sum(s["cases"] for s in info["splits"].values()) == 199
    assert (tmp_path / "ph2.salt").exists() and not (out / "ph2.salt").exists()
    assert "micle-data:" in proc.stderr  # progress is logged


def test_cli_folder_with_rejections_and_fixed_salt(tmp_path):
    csv_path = write_folder_fixture(tmp_path)
    ids = []
    for run in ("a", "b"):
        out = tmp_path / run
        proc = micle_data("--source=folder", f"--input={csv_path}", f"--output_dir={out}",
                          "--label_names=benign,malignant", "--salt=fixed",
                          "--split_fractions=1,0,0")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "rejected cases.csv:8: missing file" in proc.stdout
        ids.append(json.loads((out / "splits.json").read_text()))
    assert ids[0] == ids[1]  # same salt -> same hashed case ids


def test_cli_usage_errors(tmp_path):
    proc = micle_data("--source=folder", f"--output_dir={tmp_path}")
    assert proc.returncode != 0 and "--input" in proc.stderr
    proc = micle_data("--helpfull")  # absl prints the help and exits 1 by design
    assert "--source" in proc.stdout and "--salt_file" in proc.stdout

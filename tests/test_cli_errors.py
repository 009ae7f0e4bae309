"""The one CLI error path (data_pipelines/cli_errors.py): a user error of any CLI (a missing or
wrong --data_dir/--model_dir, a bad flag value, a split that does not exist) ends with one line
`micle-<cmd>: error: ...`, no traceback, exit status 2; a bug keeps its traceback.

One subprocess per CLI, all started at once (each mostly waits for TensorFlow to import; slow:
about a minute on a loaded 2-core machine)."""
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import cli_errors, splits
from tests.helpers import REPO, build_records, child_env

BUG = ("from data_pipelines import cli_errors\n"
       "import numpy as np\n"
       "cli_errors.run_main(lambda argv: np.zeros(-1), 'micle-x')\n")


def _commands(tmp):
    records = tmp / "records"
    build_records(records, [1, 1, 1])  # one split: train
    m = [sys.executable, "-m"]
    return {
        "pretrain_data_dir": m + ["micle_tf.cli.pretrain", "--method=micle",
                                  f"--data_dir={tmp / 'nowhere'}", f"--model_dir={tmp / 'p'}"],
        "pretrain_bad_value": m + ["micle_tf.cli.pretrain", "--backbone=resnet7"],
        "finetune_split": m + ["micle_tf.cli.finetune", f"--data_dir={records}",
                               f"--model_dir={tmp / 'f'}", "--init_from=none",
                               "--label_fraction=1", "--train_split=nosuch"],
        "evaluate_model_dir": m + ["micle_tf.cli.evaluate", f"--data_dir={records}",
                                   f"--model_dir={tmp / 'no_model'}", "--split=train"],
        "export_model_dir": m + ["micle_tf.cli.export", f"--model_dir={tmp / 'no_model'}",
                                 f"--export_dir={tmp / 'e'}"],
        "finetune_calibrate": m + ["micle_tf.cli.finetune", f"--data_dir={records}",
                                   f"--model_dir={tmp / 'fc'}", "--init_from=none",
                                   "--label_fraction=1", "--calibrate"],
        "evaluate_group_size": m + ["micle_tf.cli.evaluate", f"--data_dir={records}",
                                    f"--model_dir={tmp / 'no_model'}", "--split=train",
                                    "--subgroups=sex", "--min_group_size=0"],
        "evaluate_subgroups_retrieval": m + ["micle_tf.cli.evaluate", f"--data_dir={records}",
                                             f"--model_dir={tmp / 'no_model'}", "--split=train",
                                             "--retrieval", "--subgroups=sex"],
        "export_intended_use": m + ["micle_tf.cli.export", f"--model_dir={tmp / 'no_model'}",
                                    f"--export_dir={tmp / 'e2'}", "--intended_use=research",
                                    f"--intended_use_file={tmp / 'use.md'}"],
        "demo_flags": m + ["micle_tf.cli.demo", "--quick", "--reproduce"],
        "data_missing_input": m + ["data_pipelines.cli", "--source=folder",
                                   f"--output_dir={tmp / 'd'}"],
        "bug": [sys.executable, "-c", BUG],
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_errors")
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=child_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, cmd in _commands(tmp).items()}
    out = {}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=300)
            out[name] = (proc.returncode, err, tmp)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return out


def _user_error(results, name, cmd):
    rc, err, tmp = results[name]
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith(f"{cmd}: error: "), err[-3000:]
    return lines[-1], tmp


@pytest.mark.slow
def test_missing_data_dir(results):
    line, tmp = _user_error(results, "pretrain_data_dir", "micle-pretrain")
    assert f"{tmp / 'nowhere' / 'dataset_info.json'} not found" in line
    assert "micle-data output directory" in line


@pytest.mark.slow
def test_bad_flag_value(results):
    line, _ = _user_error(results, "pretrain_bad_value", "micle-pretrain")
    assert "--backbone=resnet7" in line and "resnet18" in line
    assert "micle-pretrain --help" in line


@pytest.mark.slow
def test_split_that_does_not_exist(results):
    line, tmp = _user_error(results, "finetune_split", "micle-finetune")
    assert f"--train_split=nosuch: {tmp / 'records'} has no split 'nosuch'" in line
    assert "its splits are train" in line


@pytest.mark.slow
def test_wrong_model_dir(results):
    line, tmp = _user_error(results, "evaluate_model_dir", "micle-evaluate")
    assert str(tmp / "no_model") in line
    line, tmp = _user_error(results, "export_model_dir", "micle-export")
    assert str(tmp / "no_model") in line


@pytest.mark.slow
def test_contradictory_flags(results):
    line, _ = _user_error(results, "demo_flags", "micle-demo")
    assert "--quick and --reproduce" in line


@pytest.mark.slow
def test_calibration_subgroup_and_card_flags(results):
    line, tmp = _user_error(results, "finetune_calibrate", "micle-finetune")
    assert "--calibrate" in line and "no 'val' split" in line
    assert not (tmp / "fc").exists()  # refused before training
    line, _ = _user_error(results, "evaluate_group_size", "micle-evaluate")
    assert "--min_group_size must be >= 1" in line
    line, _ = _user_error(results, "evaluate_subgroups_retrieval", "micle-evaluate")
    assert "--subgroups apply to evaluating one fine-tuned --model_dir, not to --retrieval" in line
    line, _ = _user_error(results, "export_intended_use", "micle-export")
    assert "--intended_use or --intended_use_file" in line


@pytest.mark.slow
def test_micle_data_follows_the_same_rule(results):
    line, _ = _user_error(results, "data_missing_input", "micle-data")
    assert "--input" in line


@pytest.mark.slow
def test_a_bug_keeps_its_traceback(results):
    rc, err, _ = results["bug"]
    assert rc == 1 and "Traceback" in err and "negative dimensions" in err
    assert "error:" not in err.splitlines()[-1]


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("no exception")


def test_rule_user_errors_and_bugs():
    packages = ("data_pipelines", "micle_tf")
    on_purpose = _raised(lambda: splits.label_fraction_subset(["a"], [0], 2.0))
    assert cli_errors.is_user_error(on_purpose, packages)  # a `raise` in data_pipelines
    assert not cli_errors.is_user_error(_raised(lambda: np.zeros(-1)), packages)  # in numpy
    assert not cli_errors.is_user_error(_raised(lambda: int("x")), packages)  # not a raise
    assert cli_errors.is_user_error(_raised(lambda: open("/nonexistent/x")), packages)
    assert not cli_errors.is_user_error(_raised(lambda: [][1]), packages)

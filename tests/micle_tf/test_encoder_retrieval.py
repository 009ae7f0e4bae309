"""micle-evaluate --retrieval: label-free same-case retrieval of pretrained encoders."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import writer
from data_pipelines.sources import folder
from micle_tf import config as C
from micle_tf.evaluation import encoder_retrieval
from micle_tf.training.pretrain import run_pretraining
from tests.data_pipelines.images import coded_rgb, encode


@pytest.fixture(scope="module")
def two_encoders(ph2_records, tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    dirs = {}
    for method in ("simclr", "micle"):
        cfg = C.PretrainConfig(
            method=method, data_dir=ph2_records, model_dir=str(root / method),
            model=C.ModelConfig(backbone="resnet18", width_multiplier=0.125, image_size=32,
                                proj_out_dim=16),
            batch_size=16, train_steps=2, steps_per_epoch=2, learning_rate=0.5,
            warmup_epochs=0, verbose=0, knn_monitor=False, seed=3)
        run_pretraining(cfg)
        dirs[method] = str(root / method)
    return dirs


def _numpy_top1(emb, cases):
    """Independent reference: cosine nearest other image, same case?"""
    emb = np.asarray(emb, np.float64)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argmax(sim, axis=1)
    multi = np.array([np.sum(cases == c) > 1 for c in cases])
    return float(np.mean((cases[nearest] == cases)[multi]))


def test_retrieval_of_two_encoders_and_their_paired_difference(ph2_records, two_encoders,
                                                                tmp_path):
    encoders = {"micle": two_encoders["micle"], "simclr": two_encoders["simclr"],
                "micle_again": two_encoders["micle"]}
    result = encoder_retrieval.evaluate_retrieval(
        encoders, ph2_records, "test", out_dir=str(tmp_path), n_boot=200, seed=0,
        pairs=[("micle", "simclr"), ("micle", "micle_again")])
    info = writer.read_info(ph2_records)
    for name, path in encoders.items():
        r = result["reports"][name]
        assert r["num_queries"] == info["splits"]["test"]["images"]
        assert r["num_cases"] == info["splits"]["test"]["cases"]
        emb, cases = encoder_retrieval.embed_split(path, ph2_records, "test")
        assert r["top1"] == pytest.approx(_numpy_top1(emb, cases))
        lo, hi = r["ci95"]["top1"]
        assert lo <= r["top1"] <= hi and lo < hi
        # 10 images per lesion among N: chance 9 / (N - 1)
        assert r["chance_top1"] == pytest.approx(9 / (r["num_queries"] - 1))
    same = result["paired"][1]
    assert same["top1"]["difference"] == 0 and same["top1"]["ci95"] == [0, 0]
    diff = result["paired"][0]
    assert diff["top1"]["difference"] == pytest.approx(
        result["reports"]["micle"]["top1"] - result["reports"]["simclr"]["top1"])
    saved = json.loads((tmp_path / "retrieval_test.json").read_text())
    assert saved["paired"][0]["a"] == "micle" and saved["split"] == "test"
    md = (tmp_path / "retrieval_test.md").read_text()
    assert "| micle − simclr |" in md and "| simclr |" in md


def test_retrieval_refuses_the_pretraining_split(ph2_records, two_encoders):
    with pytest.raises(ValueError, match="case leakage"):
        encoder_retrieval.evaluate_retrieval({"micle": two_encoders["micle"]}, ph2_records,
                                             "train", n_boot=10)


def test_retrieval_refuses_a_split_with_repeated_pixels(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(encode(coded_rgb(10 * i + 1), "PNG"))
    (tmp_path / "cases.csv").write_text(
        "case_id,image_path\na,0.png\na,1.png\nb,2.png\nb,1.png\n".replace("b,1.png", "c,1.png"))
    out = str(tmp_path / "o")
    writer.write_dataset(folder.build(str(tmp_path / "cases.csv")), out, b"s",
                         duplicates="allow", fractions=(("test", 1.0),))
    with pytest.raises(ValueError, match=r"2 images with 1 repeated pixel contents"):
        encoder_retrieval.check_split_for_retrieval(out, "test", {})


@pytest.mark.slow
def test_cli_retrieval_mode(ph2_records, two_encoders, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "micle_tf.cli.evaluate", "--retrieval",
         f"--data_dir={ph2_records}", f"--model_dir={two_encoders['micle']}", "--split=val",
         f"--compare_to=simclr:{two_encoders['simclr']}", f"--out_dir={tmp_path}",
         "--n_boot=50"], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(printed) == {"micle", "simclr"}
    saved = json.loads((tmp_path / "retrieval_val.json").read_text())
    assert saved["paired"][0]["a"] == "micle" and saved["paired"][0]["b"] == "simclr"

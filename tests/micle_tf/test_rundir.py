"""The run directory contract: file names, JSON cleaning, the config loader, dataset facts,
checkpoint lookup, and the one loader of trained classifiers and encoders (what evaluation,
export and the demo rebuild a run with). Model dirs are written by hand here, in the layout
the runners write (test_finetune.py / test_pretrain.py check that the runners do)."""
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from micle_tf import config as C, rundir

SIZE = 32
TINY = C.ModelConfig(backbone="resnet18", width_multiplier=0.125, image_size=SIZE)
LABELS = ["a", "b", "c"]
INFO = {"task": "multiclass", "label_names": LABELS, "source": "test", "salt_fingerprint": "f0",
        "num_cases": 3, "num_images": 9, "splits": {"train": {"cases": 3}}, "extra": "dropped"}


def _finetune_dir(path, cfg=None, folders=("best",), seed=0):
    """A fine-tuning model_dir with a classifier checkpoint in each of `folders`."""
    cfg = cfg or C.FinetuneConfig(model=TINY)
    keras.utils.set_random_seed(seed)
    model = rundir.build_classifier(cfg, "multiclass", len(LABELS))
    os.makedirs(path)
    rundir.write_json(os.path.join(path, rundir.FINETUNE_CONFIG_FILE),
                      {"config": C.to_dict(cfg), "dataset": rundir.dataset_facts(INFO)})
    for step, folder in enumerate(folders, start=3):
        tf.train.CheckpointManager(tf.train.Checkpoint(model=model), os.path.join(path, folder),
                                   max_to_keep=1).save(checkpoint_number=step)
    return model


def test_clean_and_json_files(tmp_path):
    x = {1: [np.float32(0.5), float("nan"), np.int64(3), np.bool_(True), (math.inf, "s")]}
    assert rundir.clean(x) == {"1": [0.5, None, 3, True, [None, "s"]]}
    path = str(tmp_path / "x.json")
    assert rundir.read_json(path) is None
    rundir.write_json(path, x)
    with open(path) as f:
        assert json.loads(f.read(), parse_constant=pytest.fail) == rundir.clean(x)


def test_dataset_facts_and_versions():
    facts = rundir.dataset_facts(INFO, "rel/dir", "train")
    assert set(facts) == set(rundir.DATASET_FACT_KEYS) | {"data_dir", "train_split"}
    assert facts["data_dir"] == os.path.abspath("rel/dir") and "extra" not in facts
    assert set(rundir.dataset_facts(INFO)) == set(rundir.DATASET_FACT_KEYS)
    assert rundir.versions() == {"micle_tf": __import__("micle_tf").__version__,
                                 "tensorflow": tf.__version__, "keras": keras.__version__}


def test_configs_and_architecture(tmp_path):
    pre, ft, start, other = (str(tmp_path / n) for n in ("pre", "ft", "start", "other"))
    for d in (pre, ft, start, other):
        os.makedirs(d)
    pcfg = C.PretrainConfig(model=TINY, method="micle", data_dir="/data")
    rundir.write_json(os.path.join(pre, rundir.PRETRAIN_CONFIG_FILE),
                      {"config": C.to_dict(pcfg), "dataset": {"task": "multiclass"}})
    fcfg = C.FinetuneConfig(model=C.ModelConfig(backbone="resnet34"), label_fraction=0.5)
    rundir.write_json(os.path.join(ft, rundir.FINETUNE_CONFIG_FILE),
                      {"config": C.to_dict(fcfg), "dataset": {}})
    rundir.write_json(os.path.join(start, rundir.START_ENCODER_FILE),
                      {"source": "random", "model": C.to_dict(TINY)})

    assert rundir.load_config(pre, "pretrain") == (pcfg, {"task": "multiclass"})
    assert rundir.load_config(ft, "finetune")[0] == fcfg
    with pytest.raises(FileNotFoundError, match=r"finetune_config.json not found.*micle-finetune"):
        rundir.load_config(pre, "finetune")
    assert [rundir.run_kind(d) for d in (pre, ft, start, other)] == \
        ["pretrain", "finetune", None, None]
    assert rundir.architecture(pre) == (TINY, pcfg)
    assert rundir.architecture(ft) == (fcfg.model, fcfg)
    assert rundir.architecture(start) == (TINY, None)
    assert rundir.architecture(other) is None


def test_checkpoint_lookup(tmp_path):
    d = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError):
        rundir.resolve_checkpoint(d)
    _finetune_dir(d, folders=(rundir.CHECKPOINT_SUBDIR,))
    latest = os.path.join(d, rundir.CHECKPOINT_SUBDIR, "ckpt-3")
    for path in (d, os.path.join(d, rundir.CHECKPOINT_SUBDIR), latest):
        assert rundir.resolve_checkpoint(path) == latest
    with pytest.raises(FileNotFoundError, match="not found"):
        rundir.resolve_checkpoint(latest + "0")
    # no best/ yet: "best" falls back to the latest checkpoint
    assert rundir.classifier_checkpoint(d, "best") == rundir.classifier_checkpoint(d, "latest")
    assert rundir.checkpoint_origin(latest) == ("latest", 3)
    with pytest.raises(ValueError, match="best.*latest"):
        rundir.classifier_checkpoint(d, "newest")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        rundir.classifier_checkpoint(str(tmp_path), "best")


def test_load_classifier_rebuilds_the_trained_model(tmp_path):
    d = str(tmp_path / "run")
    trained = _finetune_dir(d, folders=(rundir.CHECKPOINT_SUBDIR, rundir.BEST_SUBDIR))
    images = tf.random.stateless_uniform([2, SIZE, SIZE, 3], seed=[1, 2])
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # as training may leave it
    try:
        model, cfg, facts = rundir.load_classifier(d, "best", dtype_policy="float32")
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.compute_dtype == "float32" and cfg.model == TINY
    assert facts["label_names"] == LABELS
    assert rundir.checkpoint_origin(model.checkpoint_path) == ("best", 4)
    np.testing.assert_allclose(model(images, training=False)["logits"],
                               trained(images, training=False)["logits"], atol=1e-5)

    wrong = str(tmp_path / "wrong")
    _finetune_dir(wrong)
    with open(os.path.join(wrong, rundir.FINETUNE_CONFIG_FILE)) as f:
        saved = json.load(f)
    saved["config"]["model"]["width_multiplier"] = 0.25
    rundir.write_json(os.path.join(wrong, rundir.FINETUNE_CONFIG_FILE), saved)
    with pytest.raises(ValueError, match="does not match the model described by"):
        rundir.load_classifier(wrong)


def test_load_encoder_of_a_run(tmp_path):
    d = str(tmp_path / "run")
    trained = _finetune_dir(d, folders=(rundir.CHECKPOINT_SUBDIR,), seed=4)
    encoder = rundir.load_encoder(d)  # architecture from finetune_config.json
    for got, want in zip(encoder.weights, trained.encoder.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    with pytest.raises(FileNotFoundError, match="micle-pretrain model_dir"):
        rundir.load_encoder(str(tmp_path))
    for other in (dict(width_multiplier=0.25), dict(backbone="resnet34")):  # shape; missing
        with pytest.raises(ValueError, match="does not hold weights for this encoder"):
            rundir.load_encoder(d, C.ModelConfig(**{**C.to_dict(TINY), **other}))

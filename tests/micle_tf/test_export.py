"""micle-export: the SavedModel serves what evaluation computes, in a process with only TF.

One tiny classifier (resnet18 x 0.125, 32 px) is written in the micle-finetune model_dir layout
and exported once. The slow checks run as subprocesses started together (loading the export
with TensorFlow alone, saved_model_cli, the CLI), each test waiting for its own.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipelines.decode import decode_image, resize_image
from micle_tf import config as config_lib
from micle_tf.export import serving
from micle_tf.models.classifier import ClassifierModel
from micle_tf.models.factory import build_encoder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LABELS = ["symmetric", "asymmetric_one_axis", "asymmetric_two_axes"]
FAKE_CASE_IDS = ["CASEID-FAKE-7f3a91", "CASEID-FAKE-b20c44"]
SIZE = 32

# Runs in a fresh interpreter: TensorFlow is the only library imported.
LOADER = r'''
import json, sys
import numpy as np
import tensorflow as tf

export_dir, inputs_path, out_path = sys.argv[1:4]
with open(inputs_path) as f:
    inputs = json.load(f)
read = lambda p: open(p, "rb").read()
m = tf.saved_model.load(export_dir)
res = {"modules": sorted(k for k in sys.modules if k.split(".")[0] in ("micle_tf", "data_pipelines")),
       "signatures": sorted(m.signatures)}
serve = m.signatures["serving_default"]
pixels = m.signatures["serve_pixels"]

def out(d):
    return {k: v.numpy().tolist() for k, v in d.items()}

def error(fn, **kw):
    try:
        fn(**kw)
    except tf.errors.InvalidArgumentError as e:
        return e.message
    except Exception as e:  # any other exception type is recorded for the test to reject
        return "UNEXPECTED %s: %s" % (type(e).__name__, e)
    return None

res["label_names"] = [s.decode() for s in m.signatures["get_label_names"]()["label_names"].numpy()]
card = m.signatures["get_model_card"]()
res["card"] = json.loads(card["model_card"].numpy().decode("utf-8"))
res["card_md"] = card["model_card_markdown"].numpy().decode("utf-8")
res["png"] = out(serve(image_bytes=tf.constant([read(p) for p in inputs["png"]])))
res["jpeg"] = out(serve(image_bytes=tf.constant([read(p) for p in inputs["jpeg"]])))
res["empty_batch"] = {k: v.shape.as_list()
                      for k, v in serve(image_bytes=tf.constant([], tf.string)).items()}
good = read(inputs["png"][0])
res["bad"] = {name: error(serve, image_bytes=tf.constant([good, read(p)]))
              for name, p in inputs["bad"].items()}
res["after_bad"] = out(serve(image_bytes=tf.constant([good])))
arr = lambda name: tf.constant(np.load(inputs[name]))
res["pixels"] = out(pixels(images=arr("pixels")))
res["pixels_resized"] = out(pixels(images=arr("pixels_resized")))
res["pixels_bad"] = {str(shape): error(pixels, images=tf.zeros(shape))
                     for shape in ([2, SIZE, SIZE, 1], [SIZE, SIZE, 3])}
res["after_pixels_bad"] = out(pixels(images=arr("pixels")))
with open(out_path, "w") as f:
    json.dump(res, f)
'''.replace("SIZE", str(SIZE))


class _Proc:
    """A started subprocess; `result()` waits once and caches (stdout, stderr, rc)."""

    def __init__(self, args, **kw):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, **kw)
        self._result = None

    def result(self, timeout=300):
        if self._result is None:
            out, err = self.popen.communicate(timeout=timeout)
            self._result = (out, err, self.popen.returncode)
        return self._result

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.communicate()


def _model(seed):
    keras.utils.set_random_seed(seed)
    cfg = config_lib.FinetuneConfig(model=config_lib.ModelConfig(
        backbone="resnet18", width_multiplier=0.125, image_size=SIZE))
    model = ClassifierModel(build_encoder(cfg.model, cfg.fine_tune_after_block),
                            num_classes=len(LABELS), task="multiclass",
                            name="classifier").build_for(SIZE)
    # a larger head spreads the probabilities, so a mismatch cannot hide near 1/3
    kernel = model.head.kernel
    kernel.assign(np.random.default_rng(seed).normal(0, 3, kernel.shape).astype("float32"))
    return cfg, model


# A metrics file as micle-evaluate writes it (values made up); the card must copy its metrics
# and leave out its paths.
FAKE_METRICS = {
    "task": "multiclass", "level": "case", "num_cases": 30, "num_images": 300,
    "num_samples": 30, "threshold": 0.5, "n_boot": 200, "seed": 0, "label_fraction": 0.25,
    "init_from": "/nonexistent/FAKE-INIT-DIR", "top1": 0.6, "top3": 0.9, "auc_macro": 0.71,
    "auc_per_class": dict(zip(LABELS, (0.7, 0.65, 0.78))),
    "support": dict(zip(LABELS, (17, 5, 8))),
    "ci95": {"top1": [0.43, 0.77], "top3": [0.8, 1.0], "auc_macro": [0.55, 0.85],
             **{f"auc/{n}": [0.5, 0.9] for n in LABELS}},
    "ci95_skipped": {"top1": 0}, "split": "test", "data_dir": "/nonexistent/FAKE-DATA-DIR",
    "model_dir": "/nonexistent/FAKE-MODEL-DIR", "label_names": LABELS,
    "checkpoint": "/nonexistent/FAKE-MODEL-DIR/best/ckpt-5", "source": "ph2",
    "calibration": {"task": "multiclass", "ece": 0.12, "ece_equal_mass": 0.15, "brier": 0.5,
                    "nll": 0.9, "n_boot": 200,
                    "ci95": {"ece": [0.05, 0.2], "ece_equal_mass": [0.08, 0.25],
                             "brier": [0.4, 0.6], "nll": [0.8, 1.0]}},
    "plots": {"Reliability diagram": "reliability_test.png"},
}


def _write_model_dir(path, cfg, model, folder, with_optimizer=False):
    os.makedirs(path)
    cfg.model_dir = path
    cfg.data_dir = os.path.join(path, "records-data-dir")
    dataset = {"task": "multiclass", "label_names": LABELS, "num_train_cases": 2,
               "example_case_ids": FAKE_CASE_IDS}
    with open(os.path.join(path, "finetune_config.json"), "w") as f:
        json.dump({"config": config_lib.to_dict(cfg), "dataset": dataset}, f)
    parts = {"model": model}
    if with_optimizer:
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
        optimizer.build(model.trainable_variables)
        parts["optimizer"] = optimizer
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(**parts),
                                         os.path.join(path, folder), max_to_keep=1)
    manager.save(checkpoint_number=5)


def _ph2_images(count):
    from data_pipelines.sources import ph2
    folder = os.path.join(ph2.package_data_dir(), "patchesDataSet", "Similar")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".bmp"))[:count]
    return [Image.open(os.path.join(folder, n)).convert("RGB") for n in names]


def _encode(image, fmt):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _expected(model, images):
    outputs = model(tf.stack(images), training=False)
    return {"probabilities": tf.nn.softmax(outputs["logits"]).numpy(),
            "embedding": outputs["embedding"].numpy(), "logits": outputs["logits"].numpy()}


def _evaluation_preprocess(data):
    return resize_image(decode_image(tf.constant(data)), SIZE)


@pytest.fixture(scope="module")
def env(tmp_path_factory, request):
    root = str(tmp_path_factory.mktemp("export"))
    procs = []
    run_cli = any(item.name == "test_cli_overwrites_and_falls_back_to_latest"
                  for item in request.session.items)  # not with -m "not slow"
    cli = None
    try:
        # model_dir 2 (latest only, with optimizer) goes to the CLI, which starts first
        cfg2, model2 = _model(seed=2)
        cli_model_dir = os.path.join(root, "cli_model_dir")
        _write_model_dir(cli_model_dir, cfg2, model2, "checkpoints", with_optimizer=True)
        cli_export = os.path.join(root, "cli_export")
        os.makedirs(cli_export)
        with open(os.path.join(cli_export, "stale.txt"), "w") as f:
            f.write("old export")
        if run_cli:
            cli = _Proc([sys.executable, "-m", "micle_tf.cli.export",
                         f"--model_dir={cli_model_dir}", f"--export_dir={cli_export}",
                         "--checkpoint=best", "--overwrite"], cwd=REPO)
            procs.append(cli)

        cfg, model = _model(seed=1)
        model_dir = os.path.join(root, "model_dir")
        _write_model_dir(model_dir, cfg, model, "best")
        with open(os.path.join(model_dir, "metrics_test.json"), "w") as f:
            json.dump(FAKE_METRICS, f)
        export_dir = os.path.join(root, "serving", "1")
        summary = serving.export_saved_model(model_dir, export_dir)

        inputs_dir = os.path.join(root, "inputs")
        os.makedirs(inputs_dir)

        def save(name, data):
            path = os.path.join(inputs_dir, name)
            with open(path, "wb") as f:
                f.write(data)
            return path

        images = _ph2_images(3)
        images.append(images[0].resize((45, 37), Image.BICUBIC))  # exercises the resize
        png = [_encode(im, "PNG") for im in images]
        jpeg = [_encode(im, "JPEG") for im in images]
        rng = np.random.default_rng(0)
        pixels = rng.uniform(0, 1, (3, SIZE, SIZE, 3)).astype("float32")
        pixels_resized = rng.uniform(0, 1, (2, 48, 40, 3)).astype("float32")
        np.save(os.path.join(inputs_dir, "pixels.npy"), pixels)
        np.save(os.path.join(inputs_dir, "pixels_resized.npy"), pixels_resized)
        inputs = {
            "png": [save(f"{i}.png", b) for i, b in enumerate(png)],
            "jpeg": [save(f"{i}.jpg", b) for i, b in enumerate(jpeg)],
            "bad": {"garbage": save("garbage", b"this is not an image at all"),
                    "truncated_png": save("truncated.png", png[1][:len(png[1]) // 2]),
                    "empty": save("empty", b"")},
            "pixels": os.path.join(inputs_dir, "pixels.npy"),
            "pixels_resized": os.path.join(inputs_dir, "pixels_resized.npy"),
        }
        with open(os.path.join(inputs_dir, "inputs.json"), "w") as f:
            json.dump(inputs, f)
        script = os.path.join(inputs_dir, "load_with_tf_only.py")
        with open(script, "w") as f:
            f.write(LOADER)
        results_path = os.path.join(root, "loader_results.json")
        loader = _Proc([sys.executable, "-I", script, export_dir,
                        os.path.join(inputs_dir, "inputs.json"), results_path], cwd=inputs_dir)
        procs.append(loader)
        cli_tool = shutil.which("saved_model_cli", path=os.path.dirname(sys.executable))
        show = _Proc(([cli_tool] if cli_tool else
                      [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"])
                     + ["show", "--all", "--dir", export_dir], cwd=root)
        procs.append(show)

        expected = {
            "png": _expected(model, [_evaluation_preprocess(b) for b in png]),
            "jpeg": _expected(model, [_evaluation_preprocess(b) for b in jpeg]),
            "pixels": _expected(model, list(pixels)),
            "pixels_resized": _expected(
                model, [resize_image(tf.constant(p), SIZE) for p in pixels_resized]),
        }

        def loaded():
            out, err, rc = loader.result()
            assert rc == 0, err[-3000:]
            with open(results_path) as f:
                return json.load(f)

        yield types.SimpleNamespace(
            root=root, model_dir=model_dir, export_dir=export_dir, summary=summary,
            expected=expected, loaded=loaded, show=show, cli=cli, model=model,
            cli_model_dir=cli_model_dir, cli_export=cli_export)
    finally:
        for proc in procs:
            proc.kill()


def _assert_outputs_match(got, want):
    assert set(got) == {"probabilities", "embedding"}
    np.testing.assert_allclose(np.array(got["probabilities"]), want["probabilities"],
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.array(got["embedding"]), want["embedding"], rtol=1e-5,
                               atol=1e-5)


def test_export_summary_and_files(env):
    s = env.summary
    assert s["checkpoint"] == "best" and s["step"] == 5
    assert s["label_names"] == LABELS and s["task"] == "multiclass" and s["image_size"] == SIZE
    assert s["signatures"] == ["get_label_names", "get_model_card", "serve_pixels",
                               "serving_default"]
    assert s["temperature"] is None  # no calibration.json in this model_dir
    assert os.path.exists(os.path.join(env.export_dir, "saved_model.pb"))
    for name in ("model_card.json", "model_card.md"):
        assert os.path.getsize(os.path.join(env.export_dir, "assets", name)) > 0
    with open(os.path.join(env.export_dir, "assets", "label_names.txt")) as f:
        assert f.read().splitlines() == LABELS
    with open(os.path.join(env.export_dir, "assets.extra", "micle_export.json")) as f:
        info = json.load(f)
    assert info["label_names"] == LABELS and info["embedding_dim"] == s["embedding_dim"]
    assert info["versions"]["tensorflow"] == tf.__version__
    # atomic write: no temporary folders left beside the export
    assert os.listdir(os.path.dirname(env.export_dir)) == ["1"]


def test_export_refuses_non_empty_dir_and_bad_arguments(env, tmp_path):
    with pytest.raises(FileExistsError, match="not empty"):
        serving.export_saved_model(env.model_dir, env.export_dir)
    with pytest.raises(ValueError, match="best.*latest"):
        serving.export_saved_model(env.model_dir, str(tmp_path / "x"), which="newest")
    with pytest.raises(FileNotFoundError, match="finetune_config.json"):
        serving.export_saved_model(str(tmp_path), str(tmp_path / "y"))
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(os.path.join(env.model_dir, "finetune_config.json"), empty)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        serving.export_saved_model(str(empty), str(tmp_path / "z"))
    assert not (tmp_path / "z").exists()


def test_loads_with_tensorflow_only_and_serves_png(env):
    res = env.loaded()
    assert res["modules"] == []  # neither micle_tf nor data_pipelines was imported
    assert res["signatures"] == ["get_label_names", "get_model_card", "serve_pixels",
                                 "serving_default"]
    assert res["label_names"] == LABELS
    probs = np.array(res["png"]["probabilities"])
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.array(res["png"]["embedding"]).shape == (4, env.summary["embedding_dim"])
    assert np.ptp(probs[:3], axis=0).max() > 1e-3  # rows differ, so the order is checked too
    assert res["empty_batch"] == {"probabilities": [0, 3],
                                  "embedding": [0, env.summary["embedding_dim"]]}


def test_outputs_equal_evaluation_preprocessing(env):
    res = env.loaded()
    for name in ("png", "jpeg", "pixels", "pixels_resized"):
        _assert_outputs_match(res[name], env.expected[name])


def test_malformed_bytes_name_the_item_and_server_keeps_answering(env):
    res = env.loaded()
    bad = res["bad"]
    for name, message in bad.items():
        assert message is not None and not message.startswith("UNEXPECTED"), (name, message)
        assert "image_bytes[1]" in message, (name, message)
    assert "is not a PNG, JPEG" in bad["garbage"] and "is not a PNG, JPEG" in bad["empty"]
    assert "could not be decoded" in bad["truncated_png"]
    after = res["after_bad"]
    np.testing.assert_allclose(np.array(after["probabilities"]),
                               env.expected["png"]["probabilities"][:1], atol=1e-5)


def test_serve_pixels_rejects_wrong_shapes(env):
    res = env.loaded()
    for shape, message in res["pixels_bad"].items():
        assert message is not None and not message.startswith("UNEXPECTED"), (shape, message)
        assert "images must be float32 [batch, height, width, 3]" in message, message
    _assert_outputs_match(res["after_pixels_bad"], env.expected["pixels"])


def test_saved_model_cli_lists_signatures(env):
    out, err, rc = env.show.result()
    assert rc == 0, err[-3000:]
    for text in ("signature_def['serving_default']", "signature_def['serve_pixels']",
                 "signature_def['get_label_names']", "signature_def['get_model_card']",
                 "outputs['model_card']", "inputs['image_bytes']",
                 "inputs['images']", "outputs['probabilities']", "outputs['embedding']",
                 "outputs['label_names']", "DT_STRING"):
        assert text in out, text


def test_export_holds_no_paths_or_case_ids(env):
    needles = [env.root, env.model_dir, "records-data-dir", "/tmp", "/nonexistent",
               "FAKE-INIT-DIR", "FAKE-DATA-DIR", "FAKE-MODEL-DIR", *FAKE_CASE_IDS]
    for folder, _, files in os.walk(env.export_dir):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            for needle in needles:
                assert needle.encode() not in data, (name, needle)


@pytest.mark.slow
def test_cli_overwrites_and_falls_back_to_latest(env):
    out, err, rc = env.cli.result()
    assert rc == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["checkpoint"] == "latest" and summary["step"] == 5
    assert sorted(os.listdir(env.cli_export)) == ["assets", "assets.extra", "fingerprint.pb",
                                                  "saved_model.pb", "variables"]
    assert sorted(os.listdir(env.root)).count("cli_export") == 1
    assert not [n for n in os.listdir(env.root) if n.startswith("cli_export.")]
    with open(os.path.join(env.cli_export, "assets.extra", "micle_export.json")) as f:
        assert json.load(f)["checkpoint"] == {"which": "latest", "step": 5}


def test_multilabel_module_in_process():
    """build_serving_module without saving: sigmoid per label, label names checked."""
    keras.utils.set_random_seed(3)
    cfg = config_lib.ModelConfig(backbone="resnet18", width_multiplier=0.125, image_size=SIZE)
    model = ClassifierModel(build_encoder(cfg), num_classes=2, task="multilabel",
                            name="classifier").build_for(SIZE)
    with pytest.raises(ValueError, match="3 label names for a model with 2 classes"):
        serving.build_serving_module(model, LABELS, SIZE, "multilabel")
    module = serving.build_serving_module(model, ["effusion", "edema"], SIZE, "multilabel")
    images = np.random.default_rng(1).uniform(0, 1, (2, SIZE, SIZE, 3)).astype("float32")
    got = module.serve_pixels(tf.constant(images))
    logits = model(tf.constant(images), training=False)["logits"]
    np.testing.assert_allclose(got["probabilities"].numpy(), tf.sigmoid(logits).numpy(),
                               atol=1e-5)
    # one temperature per class: sigmoid(logits_c / T_c), calibration.apply_temperature's
    from micle_tf.evaluation import calibration
    t = [0.5, 3.0]
    scaled = serving.build_serving_module(model, ["effusion", "edema"], SIZE, "multilabel",
                                          temperature=t)
    np.testing.assert_allclose(
        scaled.serve_pixels(tf.constant(images))["probabilities"].numpy(),
        calibration.apply_temperature(logits.numpy(), t, "multilabel", from_logits=True),
        atol=1e-5)
    for bad in ([1.0], [1.0, -1.0], [[1.0, 1.0]]):
        with pytest.raises(ValueError, match="temperature"):
            serving.build_serving_module(model, ["effusion", "edema"], SIZE, "multilabel",
                                         temperature=bad)
    assert [s.decode() for s in module.get_label_names()["label_names"].numpy()] == [
        "effusion", "edema"]


def test_model_card_from_signature_in_fresh_process(env):
    """The card the signature returns (TensorFlow only) is the asset, and its metrics are the
    metrics file's."""
    res = env.loaded()
    card = res["card"]
    with open(os.path.join(env.export_dir, "assets", "model_card.json")) as f:
        assert json.load(f) == card
    with open(os.path.join(env.export_dir, "assets", "model_card.md")) as f:
        assert f.read() == res["card_md"]
    ev = card["evaluation"]
    assert ev["available"] and ev["split"] == "test" and ev["metrics_file"] == "metrics_test.json"
    from micle_tf.export.model_card import METRIC_KEYS
    assert ev["metrics"] == {k: FAKE_METRICS[k] for k in METRIC_KEYS if k in FAKE_METRICS}
    assert ev["calibration"] == FAKE_METRICS["calibration"]
    assert ev["checkpoint_matches_export"] is True
    assert card["model"]["label_names"] == LABELS and card["model"]["input"]["image_size"] == SIZE
    assert card["model"]["init"]["kind"] == "none"
    assert card["calibration"]["temperature_scaling"] is False
    assert "not a medical device" in card["intended_use"]
    assert any("small (30 cases)" in t for t in card["limitations"])
    assert any("PH² patches are 32 x 32 px" in t for t in card["limitations"])
    assert any("Azizi" in t for t in card["citation"]["method"])
    md = res["card_md"]
    for needle in ("## Intended use", "## Out-of-scope use", "## Limitations", "## Citation",
                   "| Macro AUC | 0.710 | [0.550, 0.850] |", "ECE (equal-width bins)"):
        assert needle in md, needle


def test_export_applies_the_fitted_temperature(env, tmp_path):
    """calibration.json for the exported checkpoint -> the signatures serve
    softmax(logits / T) = calibration.apply_temperature of the uncalibrated outputs."""
    from micle_tf.evaluation import calibration

    model_dir = str(tmp_path / "calibrated_model_dir")
    shutil.copytree(env.model_dir, model_dir)
    t = 2.5
    with open(os.path.join(model_dir, "calibration.json"), "w") as f:
        json.dump({"task": "multiclass", "temperature": t, "per_class": False,
                   "formula": "softmax(logits / T)", "nll_before": 1.2, "nll_after": 1.0,
                   "fitted_on": {"split": "val", "level": "image", "num_cases": 30,
                                 "num_images": 300, "data_dir": str(tmp_path / "SECRET-VAL")},
                   "checkpoint": {"which": "best", "step": 5}}, f)
    export_dir = str(tmp_path / "export")
    summary = serving.export_saved_model(model_dir, export_dir)
    assert summary["temperature"] == t
    loaded = tf.saved_model.load(export_dir)
    pixels = np.load(os.path.join(env.root, "inputs", "pixels.npy"))
    got = loaded.signatures["serve_pixels"](images=tf.constant(pixels))
    probs = got["probabilities"].numpy()
    want = env.expected["pixels"]
    np.testing.assert_allclose(probs, calibration.apply_temperature(
        want["logits"], t, "multiclass", from_logits=True), atol=1e-5)
    np.testing.assert_allclose(probs, calibration.apply_temperature(
        want["probabilities"], t, "multiclass"), atol=1e-4)
    np.testing.assert_allclose(got["embedding"].numpy(), want["embedding"], atol=1e-5)
    assert np.abs(probs - want["probabilities"]).max() > 1e-3  # T really changed them
    card = json.loads(loaded.signatures["get_model_card"]()["model_card"].numpy())
    assert card["calibration"]["temperature_scaling"] and card["calibration"]["temperature"] == t
    assert card["calibration"]["fitted_on"] == {"split": "val", "level": "image",
                                                "num_cases": 30, "num_images": 300}
    with open(os.path.join(export_dir, "assets.extra", "micle_export.json")) as f:
        info = json.load(f)
    assert info["calibration"]["temperature"] == t and "T = 2.5" in info["output"]
    for folder, _, files in os.walk(export_dir):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert b"SECRET-VAL" not in f.read(), name
    # --noapply_calibration serves the raw softmax; a temperature of another checkpoint is unused
    raw = serving.export_saved_model(model_dir, str(tmp_path / "raw"), apply_calibration=False)
    assert raw["temperature"] is None
    with open(os.path.join(model_dir, "calibration.json")) as f:
        stale = json.load(f)
    stale["checkpoint"]["step"] = 6
    with open(os.path.join(model_dir, "calibration.json"), "w") as f:
        json.dump(stale, f)
    assert serving.export_saved_model(model_dir, str(tmp_path / "stale"))["temperature"] is None


def test_card_refuses_paths_and_takes_user_text(env, tmp_path):
    with pytest.raises(ValueError, match="file path"):
        serving.export_saved_model(env.model_dir, str(tmp_path / "a"),
                                   intended_use=f"see {env.model_dir}/notes")
    out = serving.export_saved_model(env.model_dir, str(tmp_path / "b"),
                                     intended_use="Teaching only.",
                                     out_of_scope_use=["Anything clinical."],
                                     limitations=["Only adults."])
    with open(os.path.join(out["export_dir"], "assets", "model_card.json")) as f:
        card = json.load(f)
    assert card["intended_use"] == "Teaching only."
    assert card["out_of_scope_use"] == ["Anything clinical."]
    assert card["limitations"][-1] == "Only adults." and len(card["limitations"]) > 2

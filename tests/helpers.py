"""Fixtures and helpers shared by several test files. Test files import them from here (or from
tests/data_pipelines/images.py, the image encoders), never from another test file.

- processes: `REPO`, `child_env`, `run_cli` (a CLI in a subprocess, as a user runs it);
- data: `write_tiny_records` (a few PH² lesions), `write_folder_fixture` (a folder/CSV source
  with one bad item of each kind), `build_records` (cases whose pixels encode their identity),
  `write_ph2_with_attributes` (the session's PH² records again, with case attributes);
- runs: `TINY_MODEL`, `shared_pretrain` / `shared_finetune` (tiny runs cached once per test
  session, in the layout a label-efficiency sweep uses), `base_finetune_config`, `sweep_dir`;
- models: `run_serialization_test` (the one Keras config round trip every model and layer
  goes through), `write_simclr_checkpoint` (our weights in google-research/simclr's layout);
- `METRICS_KEYS`: the keys every metrics_{split}.json has.
"""
import collections
import copy
import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np

from tests.data_pipelines.images import coded_rgb, encode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- processes
def child_env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def run_cli(module, *args, timeout=300):
    """`python -m module args...` from the repository root -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------ data
def write_tiny_records(out_dir, num_cases=16, num_shards=2, fractions=(("train", 1.0),)):
    """The first `num_cases` PH² lesions (10 patches each), all in `train`, `num_shards` shards."""
    from data_pipelines import writer
    from data_pipelines.sources import ph2

    source = ph2.first_lesions(ph2.build(), num_cases)
    writer.write_dataset(source, str(out_dir), salt=b"tiny", seed=0, fractions=fractions,
                         num_shards=num_shards, overwrite=True)
    return str(out_dir)


def write_folder_fixture(root):
    """A folder-source CSV under `root` with good images of every format and one bad item of
    each kind (corrupt, zero-byte, missing, truncated, unknown label, empty case, conflicting
    labels, a duplicate, an unlabelled case). Returns the CSV path; rows are numbered as in
    the file (header = line 1)."""
    img = root / "img"
    img.mkdir()
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    files = {
        "ok_png.png": encode(coded_rgb(10), "PNG"),
        "ok_jpg.jpg": encode(coded_rgb(20, 16), "JPEG"),
        "ok_bmp.bmp": encode(coded_rgb(30), "BMP"),
        "ok_gray16.png": encode(np.full((8, 8), 30000, np.uint16), "PNG"),
        "ok_rgba.png": encode(np.dstack([coded_rgb(40), np.full((8, 8), 128, np.uint8)]), "PNG"),
        "ok_gray.jpg": encode(np.full((16, 16), 90, np.uint8), "JPEG"),
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20,
        "zero.png": b"",
        "truncated.jpg": encode(big, "JPEG")[:600],
        "conflict1.png": encode(coded_rgb(50), "PNG"),
        "conflict2.png": encode(coded_rgb(60), "PNG"),
    }
    for name, data in files.items():
        (img / name).write_bytes(data)
    rows = [  # (case_id, image_path, label)
        ("p1", "img/ok_png.png", "benign"),        # 2
        ("p1", "img/ok_jpg.jpg", "benign"),        # 3
        ("p1", "img/corrupt.png", "benign"),       # 4 corrupt bytes
        ("p2", "img/ok_bmp.bmp", "malignant"),     # 5
        ("p2", "img/zero.png", "malignant"),       # 6 zero-byte
        ("p2", str(img / "ok_gray16.png"), "malignant"),  # 7 absolute path
        ("p3", "img/missing.png", "benign"),       # 8 missing file
        ("p3", "img/ok_rgba.png", "benign"),       # 9
        ("p3", "img/truncated.jpg", "benign"),     # 10 truncated
        ("p4", "img/ok_gray.jpg", "unknown-dx"),   # 11 unknown label -> p4 empty
        ("p5", "", "benign"),                      # 12 empty case (no image)
        ("p6", "img/conflict1.png", "benign"),     # 13 conflicting labels
        ("p6", "img/conflict2.png", "malignant"),  # 14
        ("p1", "img/ok_png.png", "benign"),        # 15 duplicate image in a case
        ("p7", "img/ok_gray.jpg", ""),             # 16 unlabelled case
    ]
    with open(root / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "image_path", "label"])
        w.writerows(rows)
    return root / "cases.csv"


PH2_SALT = b"test-salt"  # tests/conftest.py's ph2_records


def ph2_attributes(index):
    """The case attributes `write_ph2_with_attributes` gives the lesion at `index` (source
    order): sex alternating, three age bands, and "90+" for every tenth lesion (a small group,
    for suppression)."""
    age = "90+" if index % 10 == 0 else ("30-39", "50-59", "70-79")[index % 3]
    return {"sex": "female" if index % 2 else "male", "age_band": age}


def write_ph2_with_attributes(out_dir):
    """The PH² records of tests/conftest.py (same salt and seed: the same case ids, splits and
    pixels) with `case/attr/sex` and `case/attr/age_band` from `ph2_attributes`, so a model
    fine-tuned on ph2_records can be evaluated on them by subgroup."""
    from data_pipelines import writer
    from data_pipelines.sources import ph2

    source = ph2.build()
    source.cases = [dataclasses.replace(c, attributes=ph2_attributes(i))
                    for i, c in enumerate(source.cases)]
    writer.write_dataset(source, str(out_dir), salt=PH2_SALT, seed=0, overwrite=True)
    return str(out_dir)


READER_SALT = b"reader-test"


def build_records(out_dir, bag_sizes, labels=None, num_shards=None, fractions=None):
    """Writes cases whose image i of case c has red value 10*c + i, all in split 'train'.
    Returns {hashed case id: c}."""
    from data_pipelines import writer

    cases = []
    for c, n in enumerate(bag_sizes):
        imgs = [writer.SourceImage(item=f"c{c}i{i}",
                                   load=(lambda v=10 * c + i: encode(coded_rgb(v), "PNG")))
                for i in range(n)]
        cases.append(writer.SourceCase(key=f"case{c}", images=imgs,
                                       label=None if labels is None else labels[c]))
    src = writer.SourceData(name="test", task="multiclass", label_names=["a", "b"], cases=cases,
                            items_read=sum(bag_sizes))
    writer.write_dataset(src, str(out_dir), READER_SALT, fractions=fractions or (("train", 1.0),),
                         num_shards=num_shards, overwrite=True)
    return {writer.hash_case_id(f"case{c}", READER_SALT): c for c in range(len(bag_sizes))}


# ---------------------------------------------------------------------- shared tiny runs
TINY_MODEL = dict(backbone="resnet18", width_multiplier=0.125, image_size=32)
SWEEP_FRACTION = 0.25  # the shared runs sit where a sweep over this fraction puts them


def shared_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "micle_ft_shared"


def shared_pretrain(tmp_path_factory, ph2_records):
    """A 2-step MICLe pretraining run on the PH2 records (cached for the session)."""
    from micle_tf import config as config_lib
    from micle_tf.training.pretrain import run_pretraining
    d = shared_root(tmp_path_factory) / "pretrain_micle"
    if not (d / "pretrain_summary.json").exists():
        run_pretraining(config_lib.PretrainConfig(
            method="micle", model=config_lib.ModelConfig(**TINY_MODEL), data_dir=ph2_records,
            model_dir=str(d), batch_size=16, train_steps=2, knn_monitor=False, verbose=0,
            seed=7))  # another seed than the fine-tuning runs: different random inits
    return str(d)


def base_finetune_config(ph2_records):
    """Sweep runs skip per-epoch validation (eval_split="": best = lowest training loss) to
    keep the tests short; the shared "micle" run validates (see shared_finetune)."""
    from micle_tf import config as config_lib
    return config_lib.FinetuneConfig(
        model=config_lib.ModelConfig(**TINY_MODEL), data_dir=ph2_records, batch_size=16,
        train_steps=2, learning_rate=0.16, warmup_epochs=0.0, weight_decay=0.0,
        keep_checkpoints=1, verbose=0, eval_split="")


def sweep_dir(tmp_path_factory):
    return shared_root(tmp_path_factory) / "sweep"


def shared_finetune(tmp_path_factory, ph2_records, name):
    """Fine-tuned run `name` ("micle": from the shared pretraining, validated on "val" each
    epoch; "none": random init) at label fraction 0.25, seed 0, in the layout run_sweep uses
    (so the sweep test reuses it: eval_split is not part of a sweep run's identity)."""
    from micle_tf.training.finetune import run_finetuning
    init = shared_pretrain(tmp_path_factory, ph2_records) if name == "micle" else "none"
    d = sweep_dir(tmp_path_factory) / name / f"f{SWEEP_FRACTION:g}_s0"
    if not (d / "finetune_summary.json").exists():
        run_finetuning(dataclasses.replace(base_finetune_config(ph2_records), model_dir=str(d),
                                           init_from=init, label_fraction=SWEEP_FRACTION,
                                           seed=0, eval_split="val" if name == "micle" else ""))
    return str(d)


# ----------------------------------------------------------------------------- evaluation
METRICS_KEYS = ("task", "level", "num_cases", "num_images", "top1", "top3", "auc_macro",
                "auc_per_class", "ci95", "label_fraction", "init_from")


# -------------------------------------------------------------------------------- models
def run_serialization_test(instance, inputs, call=None):
    """The one Keras serialization round trip (keras-hub's `run_serialization_test`).

    `instance` must be fresh (not built yet). Checks that its config is plain JSON, that
    `from_config(get_config())` and a trip through the Keras registry
    (`serialize_keras_object` -> `deserialize_keras_object`) give an object of the same class
    and an equal config, and that original and revived, built on the same `inputs`, have the
    same weights (count and shapes) and, with the original's weights copied over, the same
    outputs. `call(obj, inputs)` runs one forward pass (default `obj(inputs, training=False)`).
    Returns the revived object."""
    import keras
    import tensorflow as tf

    call = call or (lambda obj, x: obj(x, training=False))
    cls = type(instance)
    config = instance.get_config()
    assert json.loads(json.dumps(config)) == config, "config is not plain JSON"
    revived = cls.from_config(copy.deepcopy(config))
    assert type(revived) is cls
    assert revived.get_config() == config
    registered = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(instance))))
    assert type(registered) is cls and registered.get_config() == config

    expected = call(instance, inputs)
    got = call(revived, inputs)
    assert [tuple(w.shape) for w in revived.weights] == [tuple(w.shape) for w in instance.weights]
    assert len(instance.weights) == len(revived.weights)
    revived.set_weights(instance.get_weights())
    got = call(revived, inputs)
    tf.nest.assert_same_structure(expected, got)
    for a, b in zip(tf.nest.flatten(expected), tf.nest.flatten(got)):
        assert tuple(a.shape) == tuple(b.shape)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-5, atol=1e-5)
    return revived


def _tree(mapping):
    """Nested AutoTrackable objects whose object paths are the keys of `mapping`."""
    import tensorflow as tf

    root = tf.__internal__.tracking.AutoTrackable()
    nodes = {(): root}
    for key, var in mapping.items():
        parts = key.split("/")
        parent = root
        for depth in range(1, len(parts)):
            path = tuple(parts[:depth])
            node = nodes.get(path)
            if node is None:
                node = tf.__internal__.tracking.AutoTrackable()
                setattr(parent, parts[depth - 1], node)
                nodes[path] = node
            parent = node
        setattr(parent, parts[-1], var)
    return root


def write_simclr_checkpoint(encoder, path, projection_head=None, global_step=0, extra=None):
    """Writes our weights as a google-research/simclr TF2 checkpoint at prefix `path`
    (e.g. `/tmp/r50/ckpt-0`): a checkpoint "as upstream writes it", plus a `checkpoint` state
    file in its folder so the folder itself can be passed to `load_simclr_encoder`. `extra`
    ({key without suffix: array}) adds further variables (e.g. a `model/supervised_head/...`
    the loader must ignore). Returns the prefix."""
    import tensorflow as tf

    from micle_tf.models.simclr_import import simclr_variable_map

    mapping = collections.OrderedDict(simclr_variable_map(encoder, projection_head))
    for key, value in (extra or {}).items():
        if key in mapping:
            raise ValueError(f"extra key {key} collides with a model variable")
        mapping[key] = tf.Variable(value)
    root = _tree(mapping)
    ckpt = tf.train.Checkpoint(model=root.model,
                               global_step=tf.Variable(int(global_step), dtype=tf.int64))
    for name in sorted(k for k in vars(root) if not k.startswith("_") and k != "model"):
        setattr(ckpt, name, getattr(root, name))  # other top-level names from `extra`
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tf.io.gfile.makedirs(folder)
    prefix = ckpt.write(path)
    # The `checkpoint` state file (text proto) that tf.train.latest_checkpoint reads.
    name = os.path.basename(prefix)
    with tf.io.gfile.GFile(os.path.join(folder, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n')
    return prefix

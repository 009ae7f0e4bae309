"""Case-bag records as a TensorFlow Datasets (TFDS) dataset, offline.

`CaseBags` is a `tfds.core.GeneratorBasedBuilder` whose examples are the cases of a
`micle-data` output directory, so a record set can be used with `tfds` tooling
(`as_dataset`, `tfds.builder_from_directory`, `tfds.as_numpy`, `micle-pretrain --tfds_name`):

    from data_pipelines.tfds_builder import prepare_case_bags
    builder = prepare_case_bags("/tmp/ph2_records", data_dir="/tmp/tfds")   # writes, offline
    ds = builder.as_dataset(split="train")
    # later, without this module: tfds.builder_from_directory(builder.data_dir)
    # or micle-pretrain --tfds_name=case_bags/ph2 --tfds_data_dir=/tmp/tfds

Features (one example per case, keyed by its hashed id):

| feature   | type                                  | meaning                                     |
|-----------|---------------------------------------|---------------------------------------------|
| `case_id` | Text                                  | the salted case hash from the records        |
| `images`  | Sequence(Image(shape=(None, None, 3)))| the bag; bytes stored as written (PNG/JPEG)  |
| `views`   | Sequence(Text)                        | per-image view tags ("" where unknown)       |
| `label`   | multiclass: ClassLabel(names)         | -1 = unlabelled                              |
|           | multilabel: Tensor int32 [C]          | codes 1/0/-1 (uncertain)/-2 (missing)        |

TFDS decodes a `Sequence(Image)` by stacking, so a bag whose images differ in size (a PA and a
lateral radiograph, say) cannot be decoded by a plain `as_dataset`; read such data sets with
`as_dataset(..., decoders={"images": tfds.decode.SkipDecoding()})` and decode each image
(`data_pipelines.decode.decode_image`): the stored bytes are the records' PNG/JPEG bytes, and
`micle-pretrain --tfds_name` always reads bags that way. Bags of equal-size images (PH²,
MedMNIST, resized sets) decode directly to uint8 `[N, H, W, 3]`.

Splits are the record splits (`dataset_info.json`). The builder config is named after the
record set's `source` (data lands in `{data_dir}/case_bags/{source}/1.0.0`), so several record
sets can share one TFDS data_dir. Nothing is downloaded: `download_dir` points to a temporary
folder and the examples come from the local records.
"""
import os
import re
import tempfile

import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipelines import schema
from data_pipelines.reader import check_shard_sizes, list_shards
from data_pipelines.writer import read_info

NAME = "case_bags"
_VIEW_SPEC = {schema.IMAGE_VIEW: tf.io.VarLenFeature(tf.string)}


def config_name_for(info):
    """A TFDS-safe config name from a record set's `source` (e.g. "ph2", "folder")."""
    name = re.sub(r"[^a-z0-9_]+", "_", str(info.get("source") or "records").lower()).strip("_")
    return name or "records"


def case_bag_features(task, label_names):
    if task == "multiclass":
        label = tfds.features.ClassLabel(names=list(label_names))
    elif task == "multilabel":
        label = tfds.features.Tensor(shape=(len(label_names),), dtype=tf.int32)
    else:
        raise ValueError(f"unknown task {task!r}")
    return tfds.features.FeaturesDict({
        "case_id": tfds.features.Text(),
        "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
        "views": tfds.features.Sequence(tfds.features.Text()),
        "label": label,
    })


class CaseBags(tfds.core.GeneratorBasedBuilder):
    """A `micle-data` record directory exposed as a TFDS dataset (see the module docstring).

    Args:
      records_dir: the record directory (shards + dataset_info.json). May be omitted when the
        dataset is already prepared in `data_dir` (then features come from there).
      config_name: overrides the config name (default: the records' `source`).
      data_dir: the TFDS data_dir to prepare into / read from.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Case bags from micle-data records."}

    def __init__(self, records_dir=None, *, config_name=None, data_dir=None, **kwargs):
        self._records_dir = os.fspath(records_dir) if records_dir is not None else None
        self._records_info = read_info(self._records_dir) if self._records_dir else None
        if "config" not in kwargs:
            if config_name is None and self._records_info is None:
                raise ValueError("CaseBags needs records_dir (or config_name of a dataset "
                                 "already prepared in data_dir)")
            name = config_name or config_name_for(self._records_info)
            kwargs["config"] = tfds.core.BuilderConfig(
                name=name, version=self.VERSION,
                description=f"micle-data records of source {name!r}")
        super().__init__(data_dir=data_dir, **kwargs)

    def _info(self):
        if self._records_info is not None:
            info = self._records_info
            features = case_bag_features(info["task"], info["label_names"])
            metadata = tfds.core.MetadataDict(
                task=info["task"], label_names=list(info["label_names"]),
                source=info.get("source"), image_size=info.get("image_size"),
                salt_fingerprint=info.get("salt_fingerprint"))
        else:  # prepared earlier: the features are stored with the data
            path = os.fspath(self.data_path)
            if not tf.io.gfile.exists(os.path.join(path, "features.json")):
                raise FileNotFoundError(f"no prepared case_bags dataset in {path}; pass "
                                        "records_dir to prepare one")
            features = tfds.features.FeatureConnector.from_config(path)
            metadata = tfds.core.MetadataDict()
        return self.dataset_info_from_configs(
            description="Patient cases (bags of images) converted by micle-data.",
            features=features,
            supervised_keys=None,
            metadata=metadata,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the records are local
        if self._records_info is None:
            raise ValueError("preparing case_bags needs records_dir")
        splits = [s for s, v in self._records_info["splits"].items() if v.get("cases")]
        return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
        info = self._records_info
        task, num_classes = info["task"], len(info["label_names"])
        files = list_shards(self._records_dir, split)
        check_shard_sizes(files, info, split)

        def parse(record):
            case = schema.parse_case(record, task, num_classes)
            views = tf.sparse.to_dense(
                tf.io.parse_single_example(record, _VIEW_SPEC)[schema.IMAGE_VIEW],
                default_value="")
            return case, views

        ds = tf.data.TFRecordDataset(files).map(parse)
        for case, views in ds.as_numpy_iterator():
            case_id = case["case_id"].decode()
            images = list(case["encoded"])
            views = [v.decode() for v in views]
            if len(views) != len(images):  # records written without view tags
                views = [""] * len(images)
            label = case["label"]
            label = int(label) if task == "multiclass" else label.astype("int32")
            yield case_id, {"case_id": case_id, "images": images, "views": views,
                            "label": label}


def prepare_case_bags(records_dir, data_dir, config_name=None, download_dir=None):
    """Builds (or reuses) the TFDS version of a record directory in `data_dir`; returns the
    prepared builder. Offline: `download_dir` defaults to a temporary folder that stays empty."""
    builder = CaseBags(records_dir, config_name=config_name, data_dir=data_dir)
    tmp = None
    if download_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="case_bags_dl_")
        download_dir = tmp.name
    try:
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
                manual_dir=os.fspath(records_dir)))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return builder

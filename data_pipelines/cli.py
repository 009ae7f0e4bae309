"""`micle-data`: convert a dataset into case-bag TFRecords + dataset_info.json.

  micle-data --source=ph2 --output_dir=/tmp/ph2
  micle-data --source=folder --input=cases.csv --output_dir=/tmp/mine --label_names=benign,malignant
"""
import os
import sys

from absl import app, flags, logging

from data_pipelines import cli_errors, prepare, schema, sources, writer
from data_pipelines.sources import chexpert, dicom  # light: their choices only

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", None, list(sources.SOURCES), "Dataset layout to convert.")
flags.DEFINE_string("output_dir", None, "Where shards and dataset_info.json are written.")
flags.DEFINE_string("input", None, "Source input: a CSV (folder, ham10000, chexpert, nih_cxr14), "
                    "an .npz (medmnist) or a folder (dicom). Not used by ph2.")
flags.DEFINE_list("label_names", None, "Fixes the label vocabulary and its order "
                  "(folder source); default: inferred from the data and sorted.")
flags.DEFINE_enum("task", schema.TASKS[0], list(schema.TASKS),
                  "Label type for the folder source (multilabel cells are '|'-separated).")
flags.DEFINE_string("salt", None, "Salt for hashing case ids (overrides --salt_file).")
flags.DEFINE_string("salt_file", None, "File holding the salt; created with a random salt if "
                    "absent. Default: OUTPUT_DIR.salt, beside (not inside) the output, so "
                    "records can be shared without it.")
flags.DEFINE_list("split_fractions", ["0.7", "0.15", "0.15"],
                  "train,val,test fractions of cases (split by case, stratified by label).")
flags.DEFINE_integer("seed", 0, "Seed for the case split.")
flags.DEFINE_integer("num_shards", None, "Shards per split (default: one per ~2000 images).")
flags.DEFINE_integer("image_size", None, "Store images with the shorter side resized to this "
                     "(default: original size).", lower_bound=1)
flags.DEFINE_enum("duplicates", "reject", list(writer.DUPLICATE_POLICIES),
                  "Images whose decoded pixels are already in another case: reject (keep the "
                  "first in source order, reject later copies, naming both), group (keep them, "
                  "every case sharing an image in one split) or allow (keep them; evaluation "
                  "then refuses a split sharing an image with training).")
flags.DEFINE_integer("max_image_pixels", prepare.DEFAULT_MAX_PIXELS, "Reject images whose "
                     "declared width x height exceeds this, before decoding them (guards "
                     "against decompression bombs).", lower_bound=1)
flags.DEFINE_bool("overwrite", False, "Replace records already in --output_dir.")
flags.DEFINE_enum("chexpert_labels", "all", list(chexpert.LABEL_SETS),
                  "chexpert: the 14 observations, or the paper's 5 competition tasks "
                  "(Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion).")
flags.DEFINE_enum("chexpert_case", "patient", list(chexpert.CASE_KEYS),
                  "chexpert: one case per patient (labels of the patient's first study) or per "
                  "study.")
flags.DEFINE_bool("frontal_only", False, "chexpert: reject lateral views (counted rejections).")
flags.DEFINE_enum("dicom_case", "patient", list(dicom.CASE_KEYS),
                  "dicom: one case per PatientID, or per PatientID + StudyInstanceUID.")
flags.DEFINE_string("dicom_labels", None, "dicom: optional CSV with a 'label' column and a "
                    "'SOPInstanceUID' or 'file' (path relative to --input) column.")


def _fractions(values):
    parts = [float(v) for v in values]
    if len(parts) != 3:
        raise app.UsageError("--split_fractions needs three numbers: train,val,test")
    return tuple(zip(("train", "val", "test"), parts))


def _path(value):
    """A user path with `~` expanded, absolute: what is printed is where the data went."""
    return os.path.abspath(os.path.expanduser(value)) if value else value


def _print_rejections(rejected, where, limit=20):
    for r in rejected[:limit]:
        print(f"  rejected {r['item']}: {r['reason']}")
    if len(rejected) > limit:
        print(f"  ... {len(rejected) - limit} more {where}")


def main(argv):
    del argv
    if not FLAGS.source or not FLAGS.output_dir:
        raise app.UsageError("--source and --output_dir are required")
    output_dir = _path(FLAGS.output_dir)
    module = sources.get_source(FLAGS.source)
    if FLAGS.salt:
        salt = FLAGS.salt.encode()
    else:
        salt = writer.load_or_create_salt(
            _path(FLAGS.salt_file) or output_dir.rstrip(os.sep) + ".salt")
    logging.info("micle-data: reading the %s source", FLAGS.source)
    data = module.build(input_path=_path(FLAGS.input), label_names=FLAGS.label_names,
                        task=FLAGS.task, chexpert_labels=FLAGS.chexpert_labels,
                        chexpert_case=FLAGS.chexpert_case, frontal_only=FLAGS.frontal_only,
                        dicom_case=FLAGS.dicom_case, dicom_labels=_path(FLAGS.dicom_labels))
    logging.info("micle-data: %d cases, %d image rows described (%d rejected before loading)",
                 len(data.cases), data.items_read, len(data.rejected))
    try:
        info = writer.write_dataset(data, output_dir, salt,
                                    fractions=_fractions(FLAGS.split_fractions),
                                    seed=FLAGS.seed, num_shards=FLAGS.num_shards,
                                    resize_to=FLAGS.image_size, overwrite=FLAGS.overwrite,
                                    duplicates=FLAGS.duplicates,
                                    max_pixels=FLAGS.max_image_pixels)
    except writer.EmptyDatasetError as e:
        print(f"micle-data: error: {e}; nothing was written to {output_dir}", file=sys.stderr)
        _print_rejections(e.rejected, "rejections")
        return 1
    summary = ", ".join(f"{k} {v['cases']} cases / {v['images']} images"
                        for k, v in info["splits"].items())
    dup = info["duplicates"]
    print(f"micle-data: {info['num_cases']} cases, {info['num_images']} images -> "
          f"{output_dir} ({summary}); rejected {info['num_rejected']}; duplicates "
          f"({dup['policy']}): {dup['across_cases']} across cases, {dup['within_case']} within "
          f"cases, {dup['across_splits']} across splits")
    _print_rejections(info["rejected"], "in dataset_info.json")


def run():
    # A user error: one line "micle-data: error: ..." and exit status 2 (data_pipelines/
    # cli_errors.py); no case written (EmptyDatasetError): status 1, as before.
    cli_errors.run_main(main, "micle-data")


if __name__ == "__main__":
    sys.exit(run())

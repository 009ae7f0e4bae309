"""`micle-data`: convert a dataset into case-bag TFRecords + dataset_info.json.

  micle-data --source=ph2 --output_dir=/tmp/ph2
  micle-data --source=folder --input=cases.csv --output_dir=/tmp/mine --label_names=benign,malignant
"""
import os
import sys

from absl import app, flags, logging

from data_pipelines import sources, writer

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", None, list(sources.SOURCES), "Dataset layout to convert.")
flags.DEFINE_string("output_dir", None, "Where shards and dataset_info.json are written.")
flags.DEFINE_string("input", None, "Source input: a CSV (folder, ham10000, chexpert, nih_cxr14), "
                    "an .npz (medmnist) or a folder (dicom). Not used by ph2.")
flags.DEFINE_list("label_names", None, "Fixes the label vocabulary and its order "
                  "(folder source); default: inferred from the data and sorted.")
flags.DEFINE_enum("task", "multiclass", ["multiclass", "multilabel"],
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
                     "(default: original size).")
flags.DEFINE_bool("overwrite", False, "Replace records already in --output_dir.")
flags.DEFINE_enum("chexpert_labels", "all", ["all", "competition"],
                  "chexpert: the 14 observations, or the paper's 5 competition tasks "
                  "(Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion).")
flags.DEFINE_enum("chexpert_case", "patient", ["patient", "study"],
                  "chexpert: one case per patient (labels of the patient's first study) or per "
                  "study.")
flags.DEFINE_bool("frontal_only", False, "chexpert: reject lateral views (counted rejections).")
flags.DEFINE_enum("dicom_case", "patient", ["patient", "study"],
                  "dicom: one case per PatientID, or per PatientID + StudyInstanceUID.")
flags.DEFINE_string("dicom_labels", None, "dicom: optional CSV with a 'label' column and a "
                    "'SOPInstanceUID' or 'file' (path relative to --input) column.")


def _fractions(values):
    parts = [float(v) for v in values]
    if len(parts) != 3:
        raise app.UsageError("--split_fractions needs three numbers: train,val,test")
    return tuple(zip(("train", "val", "test"), parts))


def main(argv):
    del argv
    if not FLAGS.source or not FLAGS.output_dir:
        raise app.UsageError("--source and --output_dir are required")
    module = sources.get_source(FLAGS.source)
    if FLAGS.salt:
        salt = FLAGS.salt.encode()
    else:
        salt = writer.load_or_create_salt(
            FLAGS.salt_file or os.path.abspath(FLAGS.output_dir).rstrip(os.sep) + ".salt")
    logging.info("micle-data: reading the %s source", FLAGS.source)
    data = module.build(input_path=FLAGS.input, label_names=FLAGS.label_names, task=FLAGS.task,
                        chexpert_labels=FLAGS.chexpert_labels, chexpert_case=FLAGS.chexpert_case,
                        frontal_only=FLAGS.frontal_only, dicom_case=FLAGS.dicom_case,
                        dicom_labels=FLAGS.dicom_labels)
    logging.info("micle-data: %d cases, %d image rows described (%d rejected before loading)",
                 len(data.cases), data.items_read, len(data.rejected))
    info = writer.write_dataset(data, FLAGS.output_dir, salt,
                                fractions=_fractions(FLAGS.split_fractions), seed=FLAGS.seed,
                                num_shards=FLAGS.num_shards, resize_to=FLAGS.image_size,
                                overwrite=FLAGS.overwrite)
    summary = ", ".join(f"{k} {v['cases']} cases / {v['images']} images"
                        for k, v in info["splits"].items())
    print(f"micle-data: {info['num_cases']} cases, {info['num_images']} images -> "
          f"{FLAGS.output_dir} ({summary}); rejected {info['num_rejected']}")
    for r in info["rejected"][:20]:
        print(f"  rejected {r['item']}: {r['reason']}")
    if info["num_rejected"] > 20:
        print(f"  ... {info['num_rejected'] - 20} more in dataset_info.json")


def run():
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())

"""`micle-export`: a fine-tuned classifier as a SavedModel for TF Serving, with its model card.

  micle-export --model_dir=/tmp/micle_ft --export_dir=/tmp/serving/micle/1
  micle-export ... --calibrate --data_dir=/tmp/ph2      (fit temperature scaling on the
                                                         validation split first if not fitted)
  micle-export ... --intended_use_file=use.md --limitations="Dermoscopy of adults only"

Signatures: `serving_default` (image_bytes: string [None], PNG/JPEG/BMP/GIF) and `serve_pixels`
(images: float32 [None, H, W, 3] in [0, 1]) both return `probabilities` [None, C] and
`embedding` [None, D]; `get_label_names` returns `label_names` [C]; `get_model_card` returns
`model_card` (the card's JSON) and `model_card_markdown`. With a temperature fitted on the
validation split for the exported checkpoint (model_dir/calibration.json, from
micle-finetune --calibrate or --calibrate here), `probabilities` are temperature-scaled. The
model card (`assets/model_card.json`, `assets/model_card.md`) describes the model, its
initialisation, the training data, the evaluation found in --model_dir (metrics_test.json,
else the newest metrics file), calibration, subgroups, intended and out-of-scope use,
limitations and citations; it holds no file path or id. TF Serving expects the export_dir to
be a numbered version folder under the model's base path. The SavedModel loads with
TensorFlow alone: `tf.saved_model.load(export_dir)`.
"""
import json
import sys

from absl import app, flags

from micle_tf.cli import common
from micle_tf.export.model_card import DEFAULT_MIN_GROUP_SIZE
from micle_tf.rundir import CHECKPOINT_CHOICES

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "micle-finetune output directory (finetune_config.json, "
                    "best/ and checkpoints/).")
flags.DEFINE_string("export_dir", None, "Where the SavedModel goes (e.g. BASE/1 for TF Serving).")
flags.DEFINE_enum("checkpoint", "best", list(CHECKPOINT_CHOICES),
                  "Which checkpoint to export: the best by validation (falls back to latest "
                  "when there is none) or the latest.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --export_dir.")
flags.DEFINE_bool("calibrate", False, "Fit temperature scaling on the validation split first "
                  "when --model_dir has none for the exported checkpoint (calibration.json), "
                  "then serve temperature-scaled probabilities.")
flags.DEFINE_string("data_dir", None, "With --calibrate: the records holding the validation "
                    "split (default: the data the model was fine-tuned on).")
flags.DEFINE_bool("apply_calibration", True, "Serve temperature-scaled probabilities when "
                  "--model_dir holds a temperature fitted for the exported checkpoint "
                  "(--noapply_calibration: the raw softmax/sigmoid).")
flags.DEFINE_string("intended_use", None, "Model card: the intended-use text (default: a "
                    "research model, not a medical device).")
flags.DEFINE_string("intended_use_file", None, "Model card: a UTF-8 text file whose content is "
                    "the intended-use text (instead of --intended_use).")
flags.DEFINE_list("out_of_scope_use", None, "Model card: out-of-scope uses (comma-separated), "
                  "replacing the default list.")
flags.DEFINE_multi_string("limitations", [], "Model card: a limitation to add to the data-aware "
                          "defaults (repeat the flag for several).")
flags.DEFINE_string("metrics_file", None, "Model card: the micle-evaluate metrics file to "
                    "report (default: --model_dir/metrics_test.json, else the newest "
                    "metrics_*.json there).")
flags.DEFINE_integer("min_group_size", DEFAULT_MIN_GROUP_SIZE, "Model card: case attribute "
                     "counts below this are shown as \"n < k\".")


def main(argv):
    del argv
    common.setup_logging()
    common.require("model_dir", "export_dir")
    if FLAGS.intended_use and FLAGS.intended_use_file:
        raise app.UsageError("give --intended_use or --intended_use_file, not both")
    if FLAGS.min_group_size < 1:
        raise app.UsageError(f"--min_group_size must be >= 1, got {FLAGS.min_group_size}")
    intended_use = FLAGS.intended_use
    if FLAGS.intended_use_file:
        try:
            with open(FLAGS.intended_use_file, encoding="utf-8") as f:
                intended_use = f.read()
        except OSError as e:
            raise app.UsageError(f"--intended_use_file: cannot read it ({e.strerror})")
        if not intended_use.strip():
            raise app.UsageError(f"--intended_use_file={FLAGS.intended_use_file} is empty")
    from micle_tf.export.serving import export_saved_model
    summary = export_saved_model(FLAGS.model_dir, FLAGS.export_dir, which=FLAGS.checkpoint,
                                 overwrite=FLAGS.overwrite, calibrate=FLAGS.calibrate,
                                 data_dir=FLAGS.data_dir,
                                 apply_calibration=FLAGS.apply_calibration,
                                 intended_use=intended_use,
                                 out_of_scope_use=FLAGS.out_of_scope_use,
                                 limitations=FLAGS.limitations,
                                 metrics_file=FLAGS.metrics_file,
                                 min_group_size=FLAGS.min_group_size)
    print(json.dumps(summary))


def run():
    common.run_main(main, "micle-export")


if __name__ == "__main__":
    sys.exit(run())

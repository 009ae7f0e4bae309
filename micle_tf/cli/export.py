"""`micle-export`: a fine-tuned classifier as a SavedModel for TF Serving.

  micle-export --model_dir=/tmp/micle_ft --export_dir=/tmp/serving/micle/1

Signatures: `serving_default` (image_bytes: string [None], PNG/JPEG/BMP/GIF) and `serve_pixels`
(images: float32 [None, H, W, 3] in [0, 1]) both return `probabilities` [None, C] and
`embedding` [None, D]; `get_label_names` returns `label_names` [C]. TF Serving expects the
export_dir to be a numbered version folder under the model's base path. The SavedModel loads
with TensorFlow alone: `tf.saved_model.load(export_dir)`.
"""
import json
import sys

from absl import flags

from micle_tf.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "micle-finetune output directory (finetune_config.json, "
                    "best/ and checkpoints/).")
flags.DEFINE_string("export_dir", None, "Where the SavedModel goes (e.g. BASE/1 for TF Serving).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to export: the "
                  "best by validation (falls back to latest when there is none) or the latest.")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --export_dir.")


def main(argv):
    del argv
    common.setup_logging()
    common.require("model_dir", "export_dir")
    from micle_tf.export.serving import export_saved_model
    summary = export_saved_model(FLAGS.model_dir, FLAGS.export_dir, which=FLAGS.checkpoint,
                                 overwrite=FLAGS.overwrite)
    print(json.dumps(summary))


def run():
    common.run_main(main, "micle-export")


if __name__ == "__main__":
    sys.exit(run())

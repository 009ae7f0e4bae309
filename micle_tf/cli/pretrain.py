"""`micle-pretrain`: SimCLR or MICLe pretraining on case-bag records.

  micle-pretrain --method=micle --data_dir=/tmp/ph2 --model_dir=/tmp/micle \
      --backbone=resnet18 --image_size=32 --batch_size=32 --train_epochs=20

Re-running with the same --model_dir resumes from its newest checkpoint.
`--init_checkpoint` starts the encoder from another run (a model_dir) or from a
google-research/simclr TF2 checkpoint (`imagenet_simclr:PATH`) — stage 2 of the recipe.
"""
import json
import sys

from absl import app, flags

from micle_tf import config as config_lib
from micle_tf.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", None, ["simclr", "micle"], "Where positive pairs come from: two "
                  "views of one image (simclr) or two images of one case (micle).")
common.define_model_flags()
common.define_train_flags()
flags.DEFINE_float("temperature", 0.1, "NT-Xent temperature.")
flags.DEFINE_enum("augment", "derm", ["derm", "cxr", "finetune", "none"], "Augmentation preset.")
flags.DEFINE_enum("augment_placement", "host", ["host", "device"], "Where the photometric "
                  "augmentation (colour jitter, grayscale, blur) runs: in the input pipeline "
                  "(host) or batched at the start of the train step on the accelerator (device; "
                  "for GPU/TPU hosts whose CPUs cannot keep up, see bench/README.md).")
flags.DEFINE_float("color_jitter_strength", None, "Colour jitter strength s of the preset "
                   "(brightness/contrast/saturation factors 1 +- 0.8s, hue +- 0.2s; 0 = no "
                   "jitter). Default: the preset's value for --image_size (derm: 1.0 at 224 px, "
                   "0.5 at <= 64 px; see micle_tf.augment.preset_settings).")
flags.DEFINE_float("crop_area_min", None, "Smallest area fraction (0, 1] of the random resized "
                   "crop. Default: the preset's value for --image_size (derm: 0.08 at 224 px, "
                   "0.2 at <= 64 px).")
flags.DEFINE_string("init_checkpoint", None, "Encoder weights to start from: a model_dir, a "
                    "checkpoint prefix, or imagenet_simclr:PATH.")
flags.DEFINE_bool("linear_probe", True, "Online linear probe on stop-gradient features.")
flags.DEFINE_bool("knn_monitor", True, "kNN accuracy and same-case retrieval on the val split "
                  "at each epoch end.")
flags.DEFINE_string("tfds_name", None, "Pretrain on a prepared TFDS image dataset instead of "
                    "records (stage 1, e.g. imagenet2012).")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for --tfds_name.")


def _check_augment_flags():
    """Rejects --color_jitter_strength / --crop_area_min values the preset cannot take."""
    if FLAGS.color_jitter_strength is None and FLAGS.crop_area_min is None:
        return
    if FLAGS.augment == "none":
        raise app.UsageError("--augment=none is a resize only: --color_jitter_strength and "
                             "--crop_area_min do not apply")
    from micle_tf import augment
    try:
        augment.preset_settings(FLAGS.augment, FLAGS.image_size, FLAGS.color_jitter_strength,
                                FLAGS.crop_area_min)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def main(argv):
    del argv
    common.setup_logging()
    common.require("method", "model_dir")
    if not FLAGS.tfds_name:
        common.require("data_dir")
    _check_augment_flags()
    cfg = config_lib.PretrainConfig(
        method=FLAGS.method, model=common.model_config_from_flags(),
        temperature=FLAGS.temperature, augment=FLAGS.augment,
        augment_placement=FLAGS.augment_placement,
        color_jitter_strength=FLAGS.color_jitter_strength, crop_area_min=FLAGS.crop_area_min,
        init_checkpoint=FLAGS.init_checkpoint, linear_probe=FLAGS.linear_probe,
        knn_monitor=FLAGS.knn_monitor, tfds_name=FLAGS.tfds_name,
        tfds_data_dir=FLAGS.tfds_data_dir, **common.train_kwargs_from_flags())
    from micle_tf.training.pretrain import run_pretraining
    summary = run_pretraining(cfg)
    if summary is not None:
        keys = ("method", "final_step", "final_loss", "final_contrastive_accuracy",
                "images_per_second", "checkpoint")
        print(json.dumps({k: summary.get(k) for k in keys}))


def run():
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())

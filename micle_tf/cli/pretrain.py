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

from micle_tf import augment, config as config_lib
from micle_tf.cli import common
from micle_tf.models.contrastive import METHODS

FLAGS = flags.FLAGS
_D = config_lib.PretrainConfig()  # the flag defaults: the pretraining recipe
flags.DEFINE_enum("method", None, list(METHODS), "Where positive pairs come from: two "
                  "views of one image (simclr) or two images of one case (micle).")
common.define_model_flags()
common.define_train_flags(config_lib.PretrainConfig)
flags.DEFINE_float("temperature", _D.temperature, "NT-Xent temperature.")
flags.DEFINE_enum("augment", _D.augment, list(augment.PRESETS), "Augmentation preset.")
flags.DEFINE_enum("augment_placement", _D.augment_placement, list(augment.PLACEMENTS),
                  "Where the photometric augmentation (colour jitter, grayscale, blur) runs: in "
                  "the input pipeline (host) or batched at the start of the train step on the "
                  "accelerator (device; for GPU/TPU hosts whose CPUs cannot keep up, see "
                  "bench/README.md).")
flags.DEFINE_float("color_jitter_strength", _D.color_jitter_strength, "Colour jitter strength s "
                   "of the preset (brightness/contrast/saturation factors 1 +- 0.8s, hue +- "
                   "0.2s; 0 = no jitter). Default: the preset's value for --image_size (derm: "
                   "1.0 at 224 px, 0.5 at <= 64 px; see micle_tf.augment.preset_settings).")
flags.DEFINE_float("crop_area_min", _D.crop_area_min, "Smallest area fraction (0, 1] of the "
                   "random resized crop. Default: the preset's value for --image_size (derm: "
                   "0.08 at 224 px, 0.2 at <= 64 px).")
flags.DEFINE_string("init_checkpoint", _D.init_checkpoint, "Encoder weights to start from: a "
                    "model_dir, a checkpoint prefix, or imagenet_simclr:PATH.")
flags.DEFINE_bool("linear_probe", _D.linear_probe, "Online linear probe on stop-gradient "
                  "features.")
flags.DEFINE_bool("knn_monitor", _D.knn_monitor, "kNN accuracy and same-case retrieval on the "
                  "val split at each epoch end.")
flags.DEFINE_string("tfds_name", _D.tfds_name, "Pretrain on a prepared TFDS image dataset "
                    "instead of records (stage 1, e.g. imagenet2012).")
flags.DEFINE_string("tfds_data_dir", _D.tfds_data_dir, "TFDS data_dir for --tfds_name.")


def _check_augment_flags():
    """Rejects --color_jitter_strength / --crop_area_min values the preset cannot take."""
    if FLAGS.color_jitter_strength is None and FLAGS.crop_area_min is None:
        return
    if FLAGS.augment == "none":
        raise app.UsageError("--augment=none is a resize only: --color_jitter_strength and "
                             "--crop_area_min do not apply")
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
    common.run_main(main, "micle-pretrain")


if __name__ == "__main__":
    sys.exit(run())

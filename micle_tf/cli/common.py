"""absl flags shared by the training CLIs, and their conversion into config objects.
Flags live only in micle_tf/cli/ (and data_pipelines/cli.py); library code takes configs."""
import logging as std_logging
import os

from absl import flags, logging

from micle_tf import config as config_lib

FLAGS = flags.FLAGS


def define_model_flags(image_size=224):
    flags.DEFINE_enum("backbone", "resnet50", sorted(config_lib.BACKBONE_DEPTHS),
                      "ResNet depth.")
    flags.DEFINE_float("width_multiplier", 1.0, "ResNet width multiplier (1, 2, 4; fractions "
                       "such as 0.25 give small CPU models).")
    flags.DEFINE_float("sk_ratio", 0.0, "Selective-kernel ratio (SimCLRv2 uses 0.0625).")
    flags.DEFINE_integer("image_size", image_size, "Input size; <= 64 uses the small-image stem.")
    flags.DEFINE_integer("proj_out_dim", 128, "Projection head output width.")
    flags.DEFINE_integer("num_proj_layers", 3, "Projection head depth (0 = none).")
    flags.DEFINE_bool("synchronized_bn", False, "Batch-norm statistics across replicas.")


def define_train_flags(batch_size=256, learning_rate=0.3, epochs=100, optimizer="lars",
                       weight_decay=1e-6, warmup_epochs=10.0):
    flags.DEFINE_string("data_dir", None, "micle-data output directory (case-bag records).")
    flags.DEFINE_string("model_dir", None, "Where checkpoints, logs and summaries go.")
    flags.DEFINE_integer("batch_size", batch_size, "Global batch size (split over replicas).")
    flags.DEFINE_integer("train_epochs", epochs, "Epochs (passes over the training cases).")
    flags.DEFINE_integer("train_steps", None, "Total steps; overrides --train_epochs.")
    flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch/checkpoint "
                         "(default: training cases // batch size).")
    flags.DEFINE_float("learning_rate", learning_rate, "Base learning rate (before scaling).")
    flags.DEFINE_enum("learning_rate_scaling", "linear", ["linear", "sqrt"],
                      "linear: lr*B/256; sqrt: lr*sqrt(B).")
    flags.DEFINE_float("warmup_epochs", warmup_epochs, "Linear warmup length in epochs.")
    flags.DEFINE_float("weight_decay", weight_decay, "Weight decay (coupled for lars/sgd, "
                       "decoupled for adam); BN and biases are excluded.")
    flags.DEFINE_enum("optimizer", optimizer, ["lars", "sgd", "adam"], "Optimizer.")
    flags.DEFINE_float("momentum", 0.9, "Momentum for lars/sgd.")
    flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"],
                      "tf.distribute strategy (multi_worker reads TF_CONFIG).")
    flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu ('local' on a TPU VM).")
    flags.DEFINE_enum("mixed_precision", None, ["bfloat16", "float16"],
                      "Mixed-precision compute (float32 variables).")
    flags.DEFINE_integer("seed", 0, "Seed for weights, data order and augmentation.")
    flags.DEFINE_bool("cache_decoded", False, "Decode the training images once and keep them "
                      "in memory (H*W*3 bytes per image): later epochs skip reading and "
                      "decoding. For data sets that fit in RAM.")
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept in model_dir.")
    flags.DEFINE_integer("verbose", 1, "Keras progress: 0 silent, 1 progress bar, 2 one line "
                         "per epoch.")


def model_config_from_flags():
    wm = FLAGS.width_multiplier
    return config_lib.ModelConfig(
        backbone=FLAGS.backbone, width_multiplier=int(wm) if float(wm).is_integer() else wm,
        sk_ratio=FLAGS.sk_ratio, image_size=FLAGS.image_size, proj_out_dim=FLAGS.proj_out_dim,
        num_proj_layers=FLAGS.num_proj_layers, synchronized_bn=FLAGS.synchronized_bn)


def train_kwargs_from_flags():
    names = ["data_dir", "model_dir", "batch_size", "train_epochs", "train_steps",
             "steps_per_epoch", "learning_rate", "learning_rate_scaling", "warmup_epochs",
             "weight_decay", "optimizer", "momentum", "strategy", "tpu", "mixed_precision",
             "seed", "keep_checkpoints", "verbose", "cache_decoded"]
    return {n: getattr(FLAGS, n) for n in names}


def require(*names):
    from absl import app
    missing = [n for n in names if not getattr(FLAGS, n)]
    if missing:
        raise app.UsageError("missing required flag(s): " + ", ".join(f"--{n}" for n in missing))


def setup_logging():
    """INFO logs to stderr; quiets TensorFlow's C++ chatter unless the user asked for it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.INFO)
    std_logging.getLogger("tensorflow").setLevel(std_logging.ERROR)

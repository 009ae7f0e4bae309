"""absl flags shared by the micle_tf CLIs, their conversion into config objects, and the one
error path every CLI runs under.

Flags live only in micle_tf/cli/ (and data_pipelines/cli.py); library code takes configs. No
default and no list of choices is written here: flag defaults are read from the config
dataclasses (micle_tf/config.py: each dataclass's defaults are its recipe) and enum choices
from the libraries' own tuples (augment.PRESETS, config.BACKBONE_DEPTHS, optimizers.OPTIMIZERS,
distribute.STRATEGIES, ...). micle-finetune and micle-evaluate --sweep share one definition of
the fine-tuning flags (`define_finetune_flags`).

Errors: `run_main(main, name)` runs a CLI's main; a user error (a missing or wrong flag, path
or split) ends with one line `micle-<cmd>: error: ...` and exit status 2, a bug keeps its
traceback. The rule is in data_pipelines/cli_errors.py (micle-data shares it).
"""
import os

# Before TensorFlow loads (the libraries whose tuples are imported below load it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging as std_logging  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from data_pipelines import cli_errors  # noqa: E402
from micle_tf import augment, config as config_lib  # noqa: E402
from micle_tf.models.classifier import UNCERTAINTY_POLICIES  # noqa: E402
from micle_tf.models.resnet import SMALL_IMAGE_STEM_MAX_SIZE  # noqa: E402
from micle_tf.optimizers import LR_SCALINGS, OPTIMIZERS  # noqa: E402
from micle_tf.training.distribute import MIXED_PRECISION, STRATEGIES  # noqa: E402

FLAGS = flags.FLAGS
PACKAGES = ("data_pipelines", "micle_tf")  # whose deliberate ValueErrors are user errors

TRAIN_FLAGS = ("data_dir", "model_dir", "batch_size", "train_epochs", "train_steps",
               "steps_per_epoch", "learning_rate", "learning_rate_scaling", "warmup_epochs",
               "weight_decay", "optimizer", "momentum", "strategy", "tpu", "mixed_precision",
               "seed", "keep_checkpoints", "verbose", "cache_decoded")
FINETUNE_FLAGS = ("ft_proj_selector", "fine_tune_after_block", "uncertainty_policy",
                  "label_smoothing", "augment", "crop_area_min", "early_stopping_patience",
                  "train_split", "eval_split")


def run_main(main, name):
    """absl's app.run(main) for the CLI `name` (e.g. "micle-pretrain") with the one error path
    (data_pipelines/cli_errors.py)."""
    cli_errors.run_main(main, name, PACKAGES)


# ----------------------------------------------------------------------------------- flags
def define_model_flags():
    d = config_lib.ModelConfig()
    flags.DEFINE_enum("backbone", d.backbone, sorted(config_lib.BACKBONE_DEPTHS),
                      "ResNet depth.")
    flags.DEFINE_float("width_multiplier", float(d.width_multiplier), "ResNet width multiplier "
                       "(1, 2, 4; fractions such as 0.25 give small CPU models).")
    flags.DEFINE_float("sk_ratio", d.sk_ratio, "Selective-kernel ratio (SimCLRv2 uses 0.0625).")
    flags.DEFINE_integer("image_size", d.image_size, f"Input size; <= {SMALL_IMAGE_STEM_MAX_SIZE} "
                         "uses the small-image stem.")
    flags.DEFINE_integer("proj_out_dim", d.proj_out_dim, "Projection head output width.")
    flags.DEFINE_integer("num_proj_layers", d.num_proj_layers,
                         "Projection head depth (0 = none).")
    flags.DEFINE_bool("synchronized_bn", d.synchronized_bn,
                      "Batch-norm statistics across replicas.")


def define_train_flags(config_cls):
    """The TrainConfig flags, with the defaults of `config_cls` (PretrainConfig or
    FinetuneConfig: their recipes differ)."""
    d = config_cls()
    flags.DEFINE_string("data_dir", None, "micle-data output directory (case-bag records).")
    flags.DEFINE_string("model_dir", None, "Where checkpoints, logs and summaries go.")
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size (split over replicas).")
    flags.DEFINE_integer("train_epochs", d.train_epochs,
                         "Epochs (passes over the training cases).")
    flags.DEFINE_integer("train_steps", d.train_steps, "Total steps; overrides --train_epochs.")
    flags.DEFINE_integer("steps_per_epoch", d.steps_per_epoch, "Steps per epoch/checkpoint "
                         "(default: training cases // batch size).")
    flags.DEFINE_float("learning_rate", d.learning_rate, "Base learning rate (before scaling).")
    flags.DEFINE_enum("learning_rate_scaling", d.learning_rate_scaling, list(LR_SCALINGS),
                      "linear: lr*B/256; sqrt: lr*sqrt(B).")
    flags.DEFINE_float("warmup_epochs", d.warmup_epochs, "Linear warmup length in epochs.")
    flags.DEFINE_float("weight_decay", d.weight_decay, "Weight decay (coupled for lars/sgd, "
                       "decoupled for adam); BN and biases are excluded.")
    flags.DEFINE_enum("optimizer", d.optimizer, list(OPTIMIZERS), "Optimizer.")
    flags.DEFINE_float("momentum", d.momentum, "Momentum for lars/sgd.")
    flags.DEFINE_enum("strategy", d.strategy, list(STRATEGIES),
                      "tf.distribute strategy (multi_worker reads TF_CONFIG).")
    flags.DEFINE_string("tpu", d.tpu, "TPU name or address for --strategy=tpu ('local' on a TPU "
                        "VM).")
    flags.DEFINE_enum("mixed_precision", d.mixed_precision, list(MIXED_PRECISION),
                      "Mixed-precision compute (float32 variables).")
    flags.DEFINE_integer("seed", d.seed, "Seed for weights, data order and augmentation.")
    flags.DEFINE_bool("cache_decoded", d.cache_decoded, "Decode the training images once and "
                      "keep them in memory (H*W*3 bytes per image): later epochs skip reading "
                      "and decoding. For data sets that fit in RAM.")
    flags.DEFINE_integer("keep_checkpoints", d.keep_checkpoints, "Checkpoints kept in model_dir.")
    flags.DEFINE_integer("verbose", d.verbose, "Keras progress: 0 silent, 1 progress bar, 2 one "
                         "line per epoch.")


def define_finetune_flags(help_prefix=""):
    """Every fine-tuning flag (model, schedule and FinetuneConfig's own), FinetuneConfig's
    defaults: micle-finetune's flags, and micle-evaluate's for --sweep (`help_prefix`)."""
    d = config_lib.FinetuneConfig()
    define_model_flags()
    define_train_flags(config_lib.FinetuneConfig)
    p = help_prefix
    flags.DEFINE_integer("ft_proj_selector", d.ft_proj_selector, p + "Projection-head layer "
                         "feeding the classifier (0 = encoder output; SimCLRv2 uses 1 with few "
                         "labels).")
    flags.DEFINE_integer("fine_tune_after_block", d.fine_tune_after_block, p + "-1 trains every "
                         "layer; k in 0..4 freezes the stem and block groups up to k (4 = linear "
                         "evaluation).")
    flags.DEFINE_enum("uncertainty_policy", d.uncertainty_policy, list(UNCERTAINTY_POLICIES),
                      p + "Multilabel 'uncertain' labels: masked out (ignore), positive (ones) "
                      "or negative (zeros).")
    flags.DEFINE_float("label_smoothing", d.label_smoothing, p + "Label smoothing (multiclass).")
    flags.DEFINE_enum("augment", d.augment, list(augment.PRESETS), p + "Training augmentation "
                      "preset (finetune: crop 50-100%, flip, rotation).")
    flags.DEFINE_float("crop_area_min", d.crop_area_min, p + "Smallest area fraction (0, 1] of "
                       "the random resized crop (default: the preset's, finetune: 0.5).")
    flags.DEFINE_integer("early_stopping_patience", d.early_stopping_patience, p + "Stop after "
                         "this many epochs without a gain in val AUC (default: never).")
    flags.DEFINE_string("train_split", d.train_split, p + "Split to fine-tune on.")
    flags.DEFINE_string("eval_split", d.eval_split, p + "Split validated at each epoch end "
                        "(best checkpoint).")


# ------------------------------------------------------------------------- flags -> configs
def model_config_from_flags():
    wm = FLAGS.width_multiplier
    return config_lib.ModelConfig(
        backbone=FLAGS.backbone, width_multiplier=int(wm) if float(wm).is_integer() else wm,
        sk_ratio=FLAGS.sk_ratio, image_size=FLAGS.image_size, proj_out_dim=FLAGS.proj_out_dim,
        num_proj_layers=FLAGS.num_proj_layers, synchronized_bn=FLAGS.synchronized_bn)


def train_kwargs_from_flags():
    return {n: getattr(FLAGS, n) for n in TRAIN_FLAGS}


def pretraining_image_size(init_from):
    """The image size of a micle-pretrain model_dir, else None (`none`, imagenet_simclr:PATH,
    a fine-tuning run, a path that is not a run)."""
    if not init_from or init_from == "none" or init_from.startswith("imagenet_simclr:"):
        return None
    from micle_tf import rundir
    if rundir.run_kind(init_from) != "pretrain":
        return None
    return rundir.load_config(init_from, "pretrain")[0].model.image_size


def model_config_for(init_froms):
    """Model flags -> ModelConfig. Without an explicit --image_size, the image size of the
    first pretraining run among `init_froms` is used (its architecture always is: the
    fine-tuning run takes it from the run, see micle_tf.rundir)."""
    model = model_config_from_flags()
    if not FLAGS["image_size"].present:
        for init in init_froms:
            size = pretraining_image_size(init)
            if size is not None:
                model.image_size = size
                break
    return model


def check_finetune_flags():
    if FLAGS.crop_area_min is not None and (FLAGS.augment == "none" or
                                            not 0.0 < FLAGS.crop_area_min <= 1.0):
        raise app.UsageError(f"--crop_area_min must be in (0, 1] and needs a cropping "
                             f"--augment preset, got {FLAGS.crop_area_min} with "
                             f"--augment={FLAGS.augment}")


def finetune_config_from_flags(init_froms, **fields):
    """A FinetuneConfig from the fine-tuning flags; `fields` (init_from, label_fraction) are
    set as given; the image size may come from a pretraining run (`model_config_for`)."""
    check_finetune_flags()
    return config_lib.FinetuneConfig(model=model_config_for(init_froms),
                                     **{n: getattr(FLAGS, n) for n in FINETUNE_FLAGS},
                                     **train_kwargs_from_flags(), **fields)


# ---------------------------------------------------------------------------------- checks
def require(*names):
    missing = [n for n in names if not getattr(FLAGS, n)]
    if missing:
        raise app.UsageError("missing required flag(s): " + ", ".join(f"--{n}" for n in missing))


def check_splits(data_dir, **flag_splits):
    """`data_dir`'s dataset_info.json, after checking that every split named by a flag
    (`flag_splits`: flag name -> split; empty ones skipped) is one of its splits: else a
    UsageError naming the flag, the directory and the splits it has. A `data_dir` that is not
    a micle-data output directory raises FileNotFoundError naming the missing file."""
    from data_pipelines.writer import read_info
    info = read_info(data_dir)
    for flag, split in flag_splits.items():
        if split and split not in info["splits"]:
            raise app.UsageError(f"--{flag}={split}: {data_dir} has no split {split!r}; its "
                                 f"splits are {', '.join(sorted(info['splits']))}")
    return info


def setup_logging():
    """INFO logs to stderr; quiets TensorFlow's C++ chatter unless the user asked for it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.INFO)
    std_logging.getLogger("tensorflow").setLevel(std_logging.ERROR)

"""`micle-demo`: the whole pipeline on the embedded PH² data in one command.

  micle-demo                      # default settings (about 15 min on a 2-core CPU)
  micle-demo --quick              # tiny settings (a few minutes; used by the tests)
  micle-demo --workdir=runs/demo  # a second run reuses every finished stage
  micle-demo --reproduce          # the longer reproduction run (not a test): label fractions
                                  # 0.1/0.25/0.5/1.0 x 3 fine-tuning seeds, retrieval, CIs
"""
import dataclasses
import sys

from absl import app, flags

from micle_tf import demo
from micle_tf.cli import common

FLAGS = flags.FLAGS
_D = demo.DemoSettings()  # the flag defaults: the default settings
flags.DEFINE_string("workdir", "micle_demo_run", "Where every stage writes.")
flags.DEFINE_bool("quick", False, "Tiny settings: a smoke run of every stage.")
flags.DEFINE_bool("reproduce", False, "The default settings with the label-efficiency sweep "
                  "widened to fractions 0.1,0.25,0.5,1.0 and fine-tuning seeds 0,1,2 (about an "
                  "hour on a 2-core CPU; see README). Default --workdir: micle_reproduce_run.")
flags.DEFINE_integer("seed", _D.seed, "Seed for splits, weights, data order.")
flags.DEFINE_list("label_fractions", None, "Override the label fractions (e.g. 0.1,0.5,1.0).")
flags.DEFINE_list("seeds", None, "Fine-tuning seeds (default: 0).")
flags.DEFINE_integer("pretrain_steps", None, "Override the pretraining steps.")
flags.DEFINE_string("init_checkpoint", _D.init_checkpoint, "Starting encoder for both methods, "
                    "e.g. imagenet_simclr:/path/to/checkpoint (default: a seeded random init).")


def main(argv):
    del argv
    common.setup_logging()
    if FLAGS.quick and FLAGS.reproduce:
        raise app.UsageError("--quick and --reproduce exclude each other")
    base = demo.QUICK if FLAGS.quick else demo.REPRODUCE if FLAGS.reproduce else \
        demo.DemoSettings()
    s = dataclasses.replace(base, seed=FLAGS.seed, init_checkpoint=FLAGS.init_checkpoint)
    if FLAGS.label_fractions:
        s = dataclasses.replace(s, fractions=tuple(float(f) for f in FLAGS.label_fractions))
    if FLAGS.seeds:
        s = dataclasses.replace(s, seeds=tuple(int(x) for x in FLAGS.seeds))
    if FLAGS.pretrain_steps:
        s = dataclasses.replace(s, pretrain_steps=FLAGS.pretrain_steps)
    workdir = FLAGS.workdir
    if FLAGS.reproduce and not FLAGS["workdir"].present:
        workdir = "micle_reproduce_run"
    path = demo.run_demo(workdir, s)
    print(f"micle-demo: report written to {path}")


def run():
    common.run_main(main, "micle-demo")


if __name__ == "__main__":
    sys.exit(run())

"""Cost of the post-crop derm augmentation (flip, colour jitter, grayscale, blur) run batched
on the compute device -- the on-device half of the "crop on the host, the rest on the
accelerator" proposal in bench/README.md (bench/reader_patched.derm_batch_post).

Times derm_batch_post on two views of a [batch, size, size, 3] batch resident on the device
(XLA off and on) and prints one JSON line per setting. Compare its ms with the train step's.

  python -m bench.gpu_augment --batch_size=128 --image_size=224
"""
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Pairs per batch (two views are augmented).")
flags.DEFINE_integer("image_size", 224, "View size.")
flags.DEFINE_integer("steps", 20, "Timed calls (after 3 warm-up calls).")
flags.DEFINE_list("jit", ["off", "on"], "XLA settings to time.")
flags.DEFINE_string("jsonl", None, "Also append the JSON lines to this file.")


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from bench.reader_patched import derm_batch_post
    gpus = tf.config.list_physical_devices("GPU")
    device = "/GPU:0" if gpus else "/CPU:0"
    b, s = FLAGS.batch_size, FLAGS.image_size
    with tf.device(device):
        views = tf.identity(np.random.default_rng(0).uniform(
            size=(2, b, s, s, 3)).astype("float32"))
    for jit in FLAGS.jit:
        on = jit in ("on", "true", "1")

        @tf.function(jit_compile=on)
        def post(v, k):
            seed = tf.stack([k, k + 1])
            # XLA needs static shapes: select instead of partitioning the batch.
            return (derm_batch_post(v[0], seed, static_shapes=on),
                    derm_batch_post(v[1], seed + 7, static_shapes=on))

        rec = {"bench": "gpu_augment", "machine": common.machine_info(),
               "versions": common.versions(),
               "config": {"batch_size": b, "image_size": s, "jit": on, "device": device}}
        try:
            t0 = time.perf_counter()
            float(tf.reduce_sum(post(views, tf.constant(0, tf.int64))[0][0, 0, 0]))
            first = time.perf_counter() - t0
            for i in range(3):
                post(views, tf.constant(i + 1, tf.int64))
            times = []
            for i in range(FLAGS.steps):
                t0 = time.perf_counter()
                out = post(views, tf.constant(100 + i, tf.int64))
                float(out[1][0, 0, 0, 0])  # wait for the device
                times.append(time.perf_counter() - t0)
            med = float(np.median(times))
            rec["figures"] = {"ms_per_batch": med * 1000, "first_call_s": round(first, 2),
                              "pairs_per_s": b / med, "timed_calls": len(times)}
        except Exception as e:  # XLA may reject an op; report and go on
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        common.emit(rec, FLAGS.jsonl)
        print(f"# derm_batch_post x2 views, batch {b} @ {s}px on {device}, XLA {jit}: "
              + (f"{rec['figures']['ms_per_batch']:.2f} ms/batch" if "figures" in rec
                 else rec["error"].splitlines()[0][:200]), flush=True)


if __name__ == "__main__":
    app.run(main)

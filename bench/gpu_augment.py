"""Device cost of `--augment_placement=device`: the photometric ops of a preset (colour
jitter, grayscale, blur), batched, as `ContrastiveModel` runs them at the start of its train
step (`micle_tf.augment.PostCrop.apply_photometric_batch`).

Times both views of a [batch, size, size, 3] batch resident on the device, with per-view
params drawn as the reader draws them, XLA off and on; one JSON line per setting. Compare
its ms with the train step's (`bench.train_step --device_augment=derm` times the two
together).

  python -m bench.gpu_augment --batch_size=128 --image_size=224
"""
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Pairs per batch (two views are augmented).")
flags.DEFINE_integer("image_size", 224, "View size.")
flags.DEFINE_string("preset", "derm", "Augmentation preset (derm, cxr).")
flags.DEFINE_integer("steps", 20, "Timed calls (after 3 warm-up calls).")
flags.DEFINE_list("jit", ["off", "on"], "XLA settings to time.")
flags.DEFINE_string("jsonl", None, "Also append the JSON lines to this file.")


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from micle_tf.augment import post_crop
    gpus = tf.config.list_physical_devices("GPU")
    device = "/GPU:0" if gpus else "/CPU:0"
    b, s = FLAGS.batch_size, FLAGS.image_size
    post = post_crop(FLAGS.preset)
    params = tf.stack([tf.stack([post.draw(tf.constant([v, i], tf.int64)) for i in range(b)])
                       for v in range(2)])
    with tf.device(device):
        views = tf.identity(np.random.default_rng(0).uniform(
            size=(2, b, s, s, 3)).astype("float32"))
        params = tf.identity(params)
    for jit in FLAGS.jit:
        on = jit in ("on", "true", "1")

        @tf.function(jit_compile=on)
        def both_views(v, p):
            return (post.apply_photometric_batch(v[0], p[0]),
                    post.apply_photometric_batch(v[1], p[1]))

        rec = {"bench": "gpu_augment", "machine": common.machine_info(),
               "versions": common.versions(),
               "config": {"preset": FLAGS.preset, "batch_size": b, "image_size": s, "jit": on,
                          "device": device}}
        try:
            t0 = time.perf_counter()
            float(both_views(views, params)[0][0, 0, 0, 0])
            first = time.perf_counter() - t0
            for _ in range(3):
                both_views(views, params)
            times = []
            for i in range(FLAGS.steps):
                p = tf.roll(params, shift=i + 1, axis=1)  # new draws per call, same cost
                t0 = time.perf_counter()
                out = both_views(views, p)
                float(out[1][0, 0, 0, 0])  # wait for the device
                times.append(time.perf_counter() - t0)
            med = float(np.median(times))
            rec["figures"] = {"ms_per_batch": med * 1000, "first_call_s": round(first, 2),
                              "pairs_per_s": b / med, "timed_calls": len(times)}
        except Exception as e:  # report and go on
            rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        common.emit(rec, FLAGS.jsonl)
        print(f"# {FLAGS.preset} photometric ops x2 views, batch {b} @ {s}px on {device}, "
              f"XLA {jit}: " + (f"{rec['figures']['ms_per_batch']:.2f} ms/batch" if "figures" in rec
                                else rec["error"].splitlines()[0][:200]), flush=True)


if __name__ == "__main__":
    app.run(main)

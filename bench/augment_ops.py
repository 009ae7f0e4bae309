"""Where the augmentation time goes: CPU milliseconds per image for each op of a preset.

Each op runs inside a tf.data map (as in the reader) over one fixed input image, consumed
in-graph; cost = process CPU time / images (all threads), which is much less sensitive to
other load on a shared machine than wall-clock rates. Ops are applied with probability 1
here; `expected_ms` weights them by the preset's probabilities (derm: jitter 0.8, grayscale
0.2, blur 0.5).

  python -m bench.augment_ops --sizes=32,64,224
"""
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["32", "64", "224"], "Output sizes (input is stored_px).")
flags.DEFINE_string("preset", "derm", "Preset whose ops are broken down (derm only).")
flags.DEFINE_integer("n", 0, "Images per timing (0: 2000 / 800 / 200 for <=32 / <=64 / larger).")
flags.DEFINE_integer("repeats", 3, "Timings per op (median).")
flags.DEFINE_integer("num_parallel_calls", 1, "Map parallelism (1: per-op cost, no overlap).")
flags.DEFINE_integer("intra_op", 0, "tf.data max_intra_op_parallelism (0: TF default).")
flags.DEFINE_string("jsonl", None, "Also append the JSON lines to this file.")


def stored_px(size):
    return 32 if size <= 32 else (64 if size <= 64 else 256)


def op_table(size):
    """(name, fn(image, crop, seed), probability in the derm preset)."""
    import tensorflow as tf

    from micle_tf import augment as A
    return [
        ("full_derm_view", lambda x, c, s: A.build_augment("derm", size)(x, s), 1.0),
        ("random_resized_crop(bicubic)", lambda x, c, s: A.random_resized_crop(x, s, size), 1.0),
        ("flip", lambda x, c, s: A.random_flip(c, s), 1.0),
        ("color_jitter(p=1)", lambda x, c, s: A.color_jitter(c, s, 1.0, p=1.0), 0.8),
        ("  brightness", lambda x, c, s: c * tf.random.stateless_uniform([], s, 0.2, 1.8),
         None),
        ("  contrast", lambda x, c, s: tf.image.stateless_random_contrast(c, 0.2, 1.8, s), None),
        ("  saturation", lambda x, c, s: tf.image.stateless_random_saturation(c, 0.2, 1.8, s),
         None),
        ("  hue", lambda x, c, s: tf.image.stateless_random_hue(c, 0.2, s), None),
        ("grayscale(p=1)", lambda x, c, s: A.to_grayscale(c), 0.2),
        ("gaussian_blur(p=1)", lambda x, c, s: A.gaussian_blur(
            c, tf.random.stateless_uniform([], s, 0.1, 2.0)), 0.5),
        ("map overhead (identity)", lambda x, c, s: c + 0.0, None),
        ("resize_for_eval (no aug)", lambda x, c, s: A.resize_for_eval(x, size), None),
    ]


def cpu_ms(fn, image, crop, n, repeats, npc, intra_op=0):
    import numpy as np
    import tensorflow as tf
    ds = tf.data.Dataset.range(n).map(
        lambda k: fn(image, crop, tf.stack([k, k * 7 + 1])), num_parallel_calls=npc)
    if intra_op:
        options = tf.data.Options()
        options.threading.max_intra_op_parallelism = intra_op
        ds = ds.with_options(options)

    def consume(d):
        return d.reduce(tf.constant(0.0), lambda a, x: a + x[0, 0, 0])
    consume(ds.take(max(10, n // 20)))
    out = []
    for _ in range(repeats):
        t = time.process_time()
        consume(ds)
        out.append((time.process_time() - t) * 1000 / n)
    return float(np.median(out))


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf
    rows = []
    for size in (int(s) for s in FLAGS.sizes):
        px = stored_px(size)
        rng = np.random.default_rng(0)
        image = tf.constant(rng.uniform(size=(px, px, 3)).astype("float32"))
        crop = tf.constant(rng.uniform(size=(size, size, 3)).astype("float32"))
        n = FLAGS.n or (2000 if size <= 32 else 800 if size <= 64 else 200)
        load = common.load_average()
        for name, fn, p in op_table(size):
            ms = cpu_ms(fn, image, crop, n, FLAGS.repeats, FLAGS.num_parallel_calls,
                        FLAGS.intra_op)
            rec = {"bench": "augment_ops", "machine": common.machine_info(),
                   "versions": common.versions(),
                   "config": {"preset": FLAGS.preset, "image_size": size, "input_px": px,
                              "op": name.strip(), "num_parallel_calls": FLAGS.num_parallel_calls,
                              "intra_op": FLAGS.intra_op or "default", "images": n},
                   "figures": {"cpu_ms_per_image": ms,
                               "expected_ms_per_view": ms * p if p is not None else None,
                               "probability": p, "load_avg_before": load,
                               "load_avg_after": common.load_average()}}
            common.emit(rec, FLAGS.jsonl)
            rows.append(rec)
    print(common.table(rows, [
        ("size", lambda r: r["config"]["image_size"], None),
        ("op", lambda r: r["config"]["op"], None),
        ("cpu ms/img", lambda r: r["figures"]["cpu_ms_per_image"], "{:.3f}"),
        ("p", lambda r: r["figures"]["probability"], None),
        ("expected ms/view", lambda r: r["figures"]["expected_ms_per_view"], "{:.3f}"),
        ("load1", lambda r: r["figures"]["load_avg_after"][0], None)],
        title="\n# augmentation cost per op (CPU ms per image, median)"))


if __name__ == "__main__":
    app.run(main)

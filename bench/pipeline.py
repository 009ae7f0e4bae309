r"""Input-pipeline throughput of the case-bag reader (`data_pipelines.reader.make_dataset`).

Stages, each measured on the `train` split of a record set at one image size:

  raw           TFRecordDataset over the shards, repeated: records (cases) read per second,
                converted to images/s with the split's mean bag size. Consumed in-graph
                (Dataset.reduce), so no Python per record.
  parse         raw + schema.parse_case (case-level, no decode).
  decode        make_dataset(mode="supervised", training=False), repeated: read + parse + decode
                + deterministic resize, one element per image. The decode-only ceiling.
  simclr_noaug  make_dataset(mode="simclr", augment_fn=None): 1 decode + 2 resizes per pair.
  micle_noaug   make_dataset(mode="micle", augment_fn=None): 2 decodes + 2 resizes per pair.
  simclr/micle  make_dataset(mode, augment_fn=build_augment(preset, size)): the training input.
  *_cached      the same with make_dataset(cache_decoded=True): decoded cases kept in memory.
  *_device      the same with build_augment(..., placement="device"): the host's share when
                colour jitter, grayscale and blur run on the accelerator (crop + flip here).
  (suffixes combine: micle_cached_device)

Units: `examples_per_s` is batch elements per second: pairs (view1, view2) in the contrastive
modes -- the unit the train step consumes, and what `images/s` means in pretrain summaries --
images in `decode`, records in `raw`/`parse`. `views_per_s` = 2 x pairs; `decoded_per_s` =
images decoded per second (1 per simclr pair, 2 per micle pair with n > 1 images).

Each configuration prints one JSON line; a table and the ratios follow at the end.

  python -m bench.pipeline --quick          # ~3-4 min on 2 (busy) cores
  python -m bench.pipeline --configs=synth256@224 --stages=decode,micle \
      --num_parallel_calls=1,2,autotune
"""
import os
import sys
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS


def define_flags():
    """Flags of `python -m bench.pipeline` (defined only when run as a script, so other
    benchmarks can import this module)."""
    flags.DEFINE_list("configs", ["ph2@32", "synth64@32", "synth64@64", "synth256@224"],
                      "DATA@IMAGE_SIZE pairs. DATA: ph2 (32x32 PNG patches, 20 per lesion), "
                      "synth64 / synth256 (random JPEG bags of 1-6 images stored at 64 / 256 px).")
    flags.DEFINE_list("stages", ["raw", "parse", "decode", "simclr_noaug", "micle_noaug", "simclr",
                                 "micle", "simclr_cached", "micle_cached", "simclr_device",
                                 "micle_device"], "Stages to measure (see the module docstring).")
    flags.DEFINE_list("num_parallel_calls", ["autotune"],
                      "Values of make_dataset(num_parallel_calls=...): integers or 'autotune'.")
    flags.DEFINE_integer("batch_size", 64, "Batch size (examples per batch).")
    flags.DEFINE_string("augment", "derm", "build_augment preset for the simclr/micle stages.")
    flags.DEFINE_float("window_s", 3.0, "Target seconds per timed window (a whole number of "
                       "batches, at least --min_batches).")
    flags.DEFINE_integer("min_batches", 3, "Minimum batches per timed window.")
    flags.DEFINE_integer("repeats", 5, "Timed windows per configuration (the median is reported).")
    flags.DEFINE_float("warmup_s", 2.0, "Seconds of warm-up (shuffle-buffer fill, autotune) "
                       "before timing; at least 2 batches.")
    flags.DEFINE_bool("quick", False, "Short run: ph2@32, synth64@64, synth256@224; stages raw, "
                      "decode, simclr, micle, micle_cached, micle_device; 3 windows of 2 s.")
    flags.DEFINE_string("jsonl", None, "Also append the JSON lines to this file.")
    flags.DEFINE_string("data_root", common.DEFAULT_DATA_ROOT, "Where records are written/reused.")


CONTRASTIVE = ("simclr", "micle")


def data_dir_for(name, root=common.DEFAULT_DATA_ROOT):
    """(records dir, stored px, format) of a named record set (written on first use)."""
    if name == "ph2":
        return common.ph2_records(root), 32, "png"
    if name.startswith("synth"):
        px = int(name[len("synth"):])
        return common.synthetic_records(px, root=root), px, "jpeg"
    raise ValueError(f"unknown data {name!r} (ph2, synth64, synth256, synthN)")


def parse_npc(value):
    import tensorflow as tf
    if str(value).lower() in ("autotune", "auto", "-1"):
        return tf.data.AUTOTUNE, "autotune"
    return int(value), str(int(value))


BENCH_JITTER_STRENGTH = 1.0


def build_stage(stage, data_dir, image_size, batch_size, npc, augment="derm", reader=None,
                augment_fn=None):
    """(dataset, kind) for one stage; kind is 'records' (raw/parse) or 'batches'.

    `reader` lets a benchmark pass a patched copy of `data_pipelines.reader` (same API);
    `augment_fn` overrides build_augment(augment, image_size) for the augmented stages."""
    import tensorflow as tf

    from data_pipelines import reader as default_reader
    from data_pipelines import schema
    from data_pipelines.writer import read_info
    from micle_tf.augment import build_augment

    reader = reader or default_reader
    info = read_info(data_dir)
    files = default_reader.list_shards(data_dir, "train")
    if stage in ("raw", "parse"):
        ds = tf.data.TFRecordDataset(files).repeat()
        if stage == "parse":
            ds = ds.map(lambda r: schema.parse_case(r, info["task"], len(info["label_names"])),
                        num_parallel_calls=npc, deterministic=True)
        return ds, "records"
    if stage == "decode":
        ds = reader.make_dataset(data_dir, "train", "supervised", batch_size, image_size,
                                 training=False, drop_remainder=True, num_parallel_calls=npc,
                                 info=info).repeat()
        return ds, "batches"
    mode, *options = stage.split("_")
    if mode not in CONTRASTIVE or not set(options) <= {"noaug", "cached", "device"} or (
            "noaug" in options and "device" in options):
        raise ValueError(f"unknown stage {stage!r}")
    fn = None
    if "noaug" not in options:
        # colour jitter at every size (the small-image default has none, so nothing to place):
        # the benchmark measures the SimCLR-style recipe's cost and where it runs
        fn = augment_fn or build_augment(augment, image_size,
                                         "device" if "device" in options else "host",
                                         color_jitter_strength=BENCH_JITTER_STRENGTH)
    extra = {"cache_decoded": True} if "cached" in options else {}
    ds = reader.make_dataset(data_dir, "train", mode, batch_size, image_size, augment_fn=fn,
                             training=True, num_parallel_calls=npc, info=info, **extra)
    return ds, "batches"


def _time_records(ds, window_s, repeats, warmup_s):
    """Records/s and MB/s of a record stream, consumed in-graph in chunks of n records."""
    import tensorflow as tf

    def consume(n):
        def body(acc, x):
            r = x["encoded"] if isinstance(x, dict) else x
            return acc + tf.cast(tf.reduce_sum(tf.strings.length(r)), tf.int64)
        t, c = time.perf_counter(), time.process_time()
        nbytes = int(ds.take(n).reduce(tf.constant(0, tf.int64), body))
        cpu_s.append(time.process_time() - c)
        return time.perf_counter() - t, nbytes

    cpu_s = []
    n = 64
    dt, _ = consume(n)
    while dt < 0.2:  # size the chunk to ~window_s
        n *= 4
        dt, _ = consume(n)
    n = max(16, int(n * window_s / dt))
    consume(max(16, int(n * warmup_s / window_s)))
    rates, mbps, cpu_ms = [], [], []
    for _ in range(repeats):
        dt, nbytes = consume(n)
        rates.append(n / dt)
        mbps.append(nbytes / dt / 1e6)
        cpu_ms.append(cpu_s[-1] * 1000 / n)
    return rates, {"records_per_window": n, "mb_per_s": common.summarize(mbps)["median"],
                   "cpu_ms_per_example": common.summarize(cpu_ms)["median"]}


def _time_batches(ds, batch_size, window_s, repeats, warmup_s, min_batches):
    """Examples/s over `repeats` windows of whole batches, after a warm-up."""
    it = iter(ds)
    t0 = time.perf_counter()
    next(it)
    first_batch_s = time.perf_counter() - t0
    warm = 1
    t1 = time.perf_counter()
    while warm < 2 or time.perf_counter() - t1 < warmup_s:
        next(it)
        warm += 1
    per_batch = (time.perf_counter() - t1) / max(warm - 1, 1)
    n = max(min_batches, int(round(window_s / max(per_batch, 1e-6))))
    rates, cpu_ms = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            batch = next(it)
        # Make sure the last batch really exists (eager tensors are already materialised).
        _ = batch["view1" if "view1" in batch else "image"].shape
        rates.append(n * batch_size / (time.perf_counter() - t))
        cpu_ms.append((time.process_time() - c) * 1000 / (n * batch_size))
    return rates, {"batches_per_window": n, "warmup_batches": warm,
                   "first_batch_s": round(first_batch_s, 3),
                   "cpu_ms_per_example": common.summarize(cpu_ms)["median"]}


def measure(data, image_size, stage, npc_value="autotune", batch_size=64, augment="derm",
            window_s=3.0, repeats=5, warmup_s=2.0, min_batches=3, root=common.DEFAULT_DATA_ROOT,
            reader=None, augment_fn=None, variant=None):
    """Measures one configuration; returns the JSON record (not printed)."""
    from data_pipelines.writer import read_info

    data_dir, stored_px, fmt = data_dir_for(data, root)
    info = read_info(data_dir)
    split = info["splits"]["train"]
    mean_bag = split["images"] / split["cases"]
    npc, npc_name = parse_npc(npc_value)
    load_before = common.load_average()
    ds, kind = build_stage(stage, data_dir, image_size, batch_size, npc, augment, reader,
                           augment_fn)
    t0 = time.perf_counter()
    if kind == "records":
        rates, extra = _time_records(ds, window_s, repeats, warmup_s)
    else:
        rates, extra = _time_batches(ds, batch_size, window_s, repeats, warmup_s, min_batches)
    stats = common.summarize(rates)
    ex = stats["median"]
    figures = {"examples_per_s": ex, "examples_per_s_min": stats["min"],
               "examples_per_s_max": stats["max"], "repeats": stats["n"]}
    if kind == "records":
        figures["images_per_s"] = ex * mean_bag  # images carried by the records read
        figures["unit"] = "records (cases)"
    elif stage == "decode":
        figures.update(images_per_s=ex, decoded_per_s=ex, unit="images")
    else:
        # micle decodes 2 images per pair unless the bag has one image (fallback to 1 image)
        one = _one_image_fraction(data_dir) if stage.startswith("micle") else 1.0
        figures.update(views_per_s=2 * ex, decoded_per_s=ex * (2 - one),
                       unit="pairs (view1, view2)")
    figures.update(extra)
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    figures["load_avg_before"] = load_before
    figures["load_avg_after"] = common.load_average()
    figures["peak_rss_mb"] = common.peak_rss_mb()
    config = {"data": data, "stored_px": stored_px, "format": fmt, "image_size": image_size,
              "stage": stage, "variant": variant or "baseline",
              "augment": augment if (stage.split("_")[0] in CONTRASTIVE
                                     and "noaug" not in stage) else None,
              "batch_size": batch_size if kind == "batches" else None,
              "num_parallel_calls": npc_name, "mean_images_per_case": round(mean_bag, 2),
              "train_cases": split["cases"]}
    return {"bench": "pipeline", "machine": common.machine_info(),
            "versions": common.versions(), "config": config, "figures": figures}


_ONE_IMAGE = {}


def _one_image_fraction(data_dir):
    """Fraction of train cases with a single image (they decode once in micle mode)."""
    if data_dir not in _ONE_IMAGE:
        from data_pipelines.reader import read_case_index
        idx = read_case_index(data_dir, "train")
        _ONE_IMAGE[data_dir] = sum(1 for _, _, n in idx if n == 1) / max(len(idx), 1)
    return _ONE_IMAGE[data_dir]


def ratios(records):
    """Per (data, size, npc): mode / mode_noaug and views/s vs the decode ceiling."""
    by = {}
    for r in records:
        c = r["config"]
        if c["variant"] != "baseline":
            continue
        by.setdefault((c["data"], c["image_size"], c["num_parallel_calls"]), {})[c["stage"]] = \
            r["figures"]
    out = []
    for (data, size, npc), st in sorted(by.items()):
        row = {"data": data, "image_size": size, "num_parallel_calls": npc}
        dec = st.get("decode", {}).get("images_per_s")
        raw = st.get("raw", {}).get("images_per_s")
        row["decode_img_s"] = dec
        row["raw_img_s"] = raw
        row["decode_vs_raw"] = dec / raw if dec and raw else None
        for m in CONTRASTIVE:
            aug = st.get(m, {}).get("examples_per_s")
            noaug = st.get(f"{m}_noaug", {}).get("examples_per_s")
            row[f"{m}_pairs_s"] = aug
            row[f"{m}_vs_noaug"] = aug / noaug if aug and noaug else None
            row[f"{m}_decoded_vs_ceiling"] = (st[m]["decoded_per_s"] / dec) if aug and dec else None
            for option in ("cached", "device"):  # optimisation / baseline: wall and CPU
                new = st.get(f"{m}_{option}", {})
                row[f"{m}_{option}_speedup"] = (new["examples_per_s"] / aug
                                                if aug and new.get("examples_per_s") else None)
                base_cpu, new_cpu = (st.get(m, {}).get("cpu_ms_per_example"),
                                     new.get("cpu_ms_per_example"))
                row[f"{m}_{option}_cpu_ratio"] = (base_cpu / new_cpu
                                                  if base_cpu and new_cpu else None)
        out.append(row)
    return out


def print_summary(records):
    cols = [("data", lambda r: r["config"]["data"], None),
            ("size", lambda r: r["config"]["image_size"], None),
            ("stage", lambda r: r["config"]["stage"], None),
            ("variant", lambda r: r["config"]["variant"], None),
            ("npc", lambda r: r["config"]["num_parallel_calls"], None),
            ("batch", lambda r: r["config"]["batch_size"], None),
            ("unit", lambda r: r["figures"]["unit"], None),
            ("ex/s", lambda r: r["figures"]["examples_per_s"], "{:.1f}"),
            ("img/s", lambda r: r["figures"].get("images_per_s"), "{:.1f}"),
            ("views/s", lambda r: r["figures"].get("views_per_s"), "{:.1f}"),
            ("decoded/s", lambda r: r["figures"].get("decoded_per_s"), "{:.1f}"),
            ("min..max", lambda r: "{:.0f}..{:.0f}".format(r["figures"]["examples_per_s_min"],
                                                         r["figures"]["examples_per_s_max"]),
             None),
            ("cpu ms/ex", lambda r: r["figures"].get("cpu_ms_per_example"), "{:.2f}"),
            ("load1", lambda r: r["figures"]["load_avg_after"][0]
             if r["figures"]["load_avg_after"] else None, None)]
    print(common.table(records, cols, title="\n# pipeline (medians)"))
    rr = ratios(records)
    if rr:
        print(common.table(rr, [
            ("data", "data", None), ("size", "image_size", None), ("npc", "num_parallel_calls",
                                                                   None),
            ("raw img/s", "raw_img_s", "{:.0f}"), ("decode img/s", "decode_img_s", "{:.0f}"),
            ("decode/raw", "decode_vs_raw", "{:.3f}"),
            ("simclr pairs/s", "simclr_pairs_s", "{:.1f}"),
            ("simclr/noaug", "simclr_vs_noaug", "{:.2f}"),
            ("simclr dec/ceil", "simclr_decoded_vs_ceiling", "{:.2f}"),
            ("micle pairs/s", "micle_pairs_s", "{:.1f}"),
            ("micle/noaug", "micle_vs_noaug", "{:.2f}"),
            ("micle dec/ceil", "micle_decoded_vs_ceiling", "{:.2f}")],
            title="\n# ratios (x/noaug: cost of augmentation; dec/ceil: images decoded per "
                  "second in that mode / decode-only ceiling)"))
        opt_cols = [("data", "data", None), ("size", "image_size", None)]
        for m in CONTRASTIVE:
            for option in ("cached", "device"):
                opt_cols += [(f"{m}_{option} x wall", f"{m}_{option}_speedup", "{:.2f}"),
                             (f"{m}_{option} x cpu", f"{m}_{option}_cpu_ratio", "{:.2f}")]
        if any(r[key] for r in rr for _, key, _ in opt_cols[2:]):
            print(common.table(rr, opt_cols, title="\n# optimisations vs the default reader "
                                                   "(pairs/s ratio; CPU ms/pair ratio, base/new)"))
    sys.stdout.flush()


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configs, stages = FLAGS.configs, FLAGS.stages
    repeats, window_s = FLAGS.repeats, FLAGS.window_s
    if FLAGS.quick:
        if not FLAGS["configs"].present:
            configs = ["ph2@32", "synth64@64", "synth256@224"]
        if not FLAGS["stages"].present:
            stages = ["raw", "decode", "simclr", "micle", "micle_cached", "micle_device"]
        if not FLAGS["repeats"].present:
            repeats = 3
        if not FLAGS["window_s"].present:
            window_s = 2.0
    records = []
    for spec in configs:
        data, _, size = spec.partition("@")
        for npc in FLAGS.num_parallel_calls:
            for stage in stages:
                if stage == "raw" and npc != FLAGS.num_parallel_calls[0]:
                    continue  # raw read has no map: one measurement is enough
                try:
                    rec = measure(data, int(size), stage, npc, FLAGS.batch_size, FLAGS.augment,
                                  window_s, repeats, FLAGS.warmup_s, FLAGS.min_batches,
                                  FLAGS.data_root)
                except Exception as e:  # keep going: report the failure as its own line
                    rec = {"bench": "pipeline", "config": {"data": data, "image_size": int(size),
                                                           "stage": stage,
                                                           "num_parallel_calls": npc},
                           "error": f"{type(e).__name__}: {e}"}
                    common.emit(rec, FLAGS.jsonl)
                    continue
                common.emit(rec, FLAGS.jsonl)
                records.append(rec)
    print_summary(records)


if __name__ == "__main__":
    define_flags()
    app.run(main)

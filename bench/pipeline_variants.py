"""Before/after measurements of proposed input-pipeline changes (bench/reader_patched.py).

Each (record set @ size, mode) is measured with the reader as it is ("baseline") and with each
variant; variants are interleaved round by round (A B C ... A B C ...) so slow drifts of the
machine's load hit all of them alike, and each figure is the median over rounds. Both the
wall rate (pairs/s) and the CPU cost (CPU ms per pair, all threads) are reported; on a shared
machine the CPU cost is the steadier of the two.

  python -m bench.pipeline_variants --configs=ph2@32,synth64@64,synth256@224 --modes=micle
"""
import sys

from absl import app, flags

from bench import common
from bench import pipeline as P

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["ph2@32", "synth64@64", "synth256@224"], "DATA@SIZE pairs.")
flags.DEFINE_list("modes", ["micle"], "Reader modes (augmented).")
flags.DEFINE_list("variants", ["baseline", "npc=1", "npc=2", "copy", "intra_op=1",
                               "cache_decoded", "batch_augment", "all", "crop_only"],
                  "baseline | npc=N | copy (patched copy, all options off) | intra_op=1 | "
                  "cache_decoded | batch_augment | all (intra_op=1 + cache + batch_augment) | "
                  "crop_only (decode + crop on the host; the rest would run on the accelerator)")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds (median over rounds).")
flags.DEFINE_float("window_s", 2.0, "Timed window per measurement (s).")
flags.DEFINE_integer("repeats", 2, "Windows per measurement (median).")
flags.DEFINE_float("warmup_s", 1.5, "Warm-up per measurement (s).")
flags.DEFINE_string("jsonl", None, "Also append the JSON lines to this file.")


def variant_args(name):
    """(reader or None, npc) for a variant name."""
    from bench.reader_patched import Variant
    if name == "baseline":
        return None, "autotune"
    if name.startswith("npc="):
        return None, name.split("=", 1)[1]
    if name == "copy":
        return Variant(), "autotune"
    if name == "intra_op=1":
        return Variant(intra_op=1), "autotune"
    if name == "cache_decoded":
        return Variant(cache_decoded=True), "autotune"
    if name == "batch_augment":
        return Variant(batch_augment="derm"), "autotune"
    if name == "crop_only":
        return Variant(batch_augment="derm", host_post=False), "autotune"
    if name == "all":
        return Variant(intra_op=1, cache_decoded=True, batch_augment="derm"), "autotune"
    raise ValueError(f"unknown variant {name!r}")


def main(argv):
    del argv
    import statistics
    results = {}
    for spec in FLAGS.configs:
        data, _, size = spec.partition("@")
        for mode in FLAGS.modes:
            for rnd in range(FLAGS.rounds):
                for v in FLAGS.variants:
                    reader, npc = variant_args(v)
                    try:
                        rec = P.measure(data, int(size), mode, npc, FLAGS.batch_size, "derm",
                                        FLAGS.window_s, FLAGS.repeats, FLAGS.warmup_s, 3,
                                        reader=reader, variant=v)
                    except Exception as e:
                        print(f"# {spec} {mode} {v}: {type(e).__name__}: {e}", file=sys.stderr)
                        continue
                    rec["config"]["round"] = rnd
                    common.emit(rec, FLAGS.jsonl)
                    results.setdefault((data, int(size), mode, v), []).append(rec["figures"])
    rows = []
    for (data, size, mode, v), figs in results.items():
        rate = statistics.median(f["examples_per_s"] for f in figs)
        cpu = statistics.median(f["cpu_ms_per_example"] for f in figs)
        base = results.get((data, size, mode, "baseline"))
        brate = statistics.median(f["examples_per_s"] for f in base) if base else None
        bcpu = statistics.median(f["cpu_ms_per_example"] for f in base) if base else None
        loads = [f["load_avg_after"][0] for f in figs if f.get("load_avg_after")]
        rows.append({"data": data, "size": size, "mode": mode, "variant": v, "pairs_s": rate,
                     "cpu_ms": cpu, "speedup": rate / brate if brate else None,
                     "cpu_saving": bcpu / cpu if bcpu else None,
                     "rounds": len(figs), "load": statistics.median(loads) if loads else None})
    summary = {"bench": "pipeline_variants_summary", "machine": common.machine_info(),
               "versions": common.versions(), "rows": rows}
    common.emit(summary, FLAGS.jsonl)
    print(common.table(rows, [
        ("data", "data", None), ("size", "size", None), ("mode", "mode", None),
        ("variant", "variant", None), ("pairs/s", "pairs_s", "{:.1f}"),
        ("x baseline", "speedup", "{:.2f}"), ("cpu ms/pair", "cpu_ms", "{:.2f}"),
        ("cpu saving x", "cpu_saving", "{:.2f}"), ("rounds", "rounds", None),
        ("load1", "load", "{:.1f}")],
        title="\n# pipeline variants (medians over interleaved rounds; batch "
              f"{FLAGS.batch_size})"))


if __name__ == "__main__":
    app.run(main)

r"""Steady-state throughput of the ContrastiveModel train step (SimCLR / MICLe pretraining).

For every configuration (backbone x image size x batch x precision x XLA) a fresh child
process builds the model exactly as `micle_tf.training.pretrain` does (build_pretraining_model,
LARS + warmup-cosine, `model.compile(optimizer, jit_compile=...)`), then times the same
function Keras' `fit` runs per step -- `model.train_step` under `tf.function(jit_compile=
model.jit_compile, reduce_retracing=True)` -- on ONE in-memory batch (view1, view2, label)
held on the compute device, so neither the input pipeline nor host->device copies are timed.

Reported per configuration (one JSON line each): first-step time (trace + compile), median
ms/step and images/s over the timed windows (warm-up excluded), achieved TFLOP/s (forward
FLOPs per image counted by the TF profiler on the encoder graph, x3 for forward+backward,
x2 views), peak RSS of the child (resource.getrusage), GPU peak memory when on a GPU.
`images/s` counts examples (pairs (view1, view2)) per second -- the unit of `batch_size` and of
the pretraining summary's `images_per_second`; the encoder sees 2x that many images.

With --pipeline_ratio (default on) the input pipeline (bench.pipeline) is measured at the same
image size, batch and mode(s) and the ratio pipeline pairs/s / train-step pairs/s is reported.

  python -m bench.train_step --quick
  python -m bench.train_step --backbones=resnet50 --sizes=224 --batch_sizes=224:8 \
      --precisions=fp32,bf16 --jit=off,on
"""
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_list("backbones", ["resnet18", "resnet50"], "Backbones.")
flags.DEFINE_list("sizes", ["32", "64", "224"], "Image sizes (<= 64 px uses the small-image "
                  "stem: 3x3 stride-1 conv, no max-pool, as build_resnet does).")
flags.DEFINE_list("batch_sizes", ["32:16", "64:8", "224:8"],
                  "Global batches (pairs): SIZE:BATCH entries (repeat a size for several "
                  "batches) and/or plain numbers applied to every size.")
flags.DEFINE_list("precisions", ["fp32", "bf16"], "fp32 and/or bf16 (mixed_bfloat16 policy).")
flags.DEFINE_list("jit", ["off", "on"], "model.compile(jit_compile=...) values: off/on.")
flags.DEFINE_list("device_augment", ["off"], "off and/or an augmentation preset (derm, cxr): "
                  "the train step also runs that preset's photometric ops on the batch "
                  "(--augment_placement=device), with params drawn per view.")
flags.DEFINE_float("width_multiplier", 1.0, "ResNet width multiplier (the demo uses 0.25).")
flags.DEFINE_integer("steps", 8, "Timed steps (after warm-up).")
flags.DEFINE_integer("window", 1, "Steps per timed window (sync once per window); the median "
                     "window gives ms/step. Use >1 on GPUs.")
flags.DEFINE_integer("warmup", 2, "Warm-up steps after the first (compiling) step.")
flags.DEFINE_float("max_timed_s", 60.0, "Stop timing a configuration after this many seconds "
                   "(at least 3 windows are run).")
flags.DEFINE_integer("timeout", 900, "Seconds per configuration (child process) before it is "
                     "killed and reported as a timeout; the run goes on with the next one.")
flags.DEFINE_integer("probe_classes", 3, "Online linear probe size (0 = none), as in "
                     "pretraining on a labelled set.")
flags.DEFINE_string("optimizer", "lars", "lars, sgd or adam (build_optimizer).")
flags.DEFINE_bool("flops", True, "Count forward FLOPs with the TF profiler.")
flags.DEFINE_bool("pipeline_ratio", True, "Also measure the input pipeline at each size.")
flags.DEFINE_list("pipeline_modes", ["micle", "simclr"], "Reader modes for the ratio.")
flags.DEFINE_list("pipeline_data", ["32:ph2", "64:synth64", "224:synth256"],
                  "Record set per image size for the ratio (SIZE:DATA, see bench.pipeline).")
flags.DEFINE_string("pipeline_npc", "autotune", "num_parallel_calls for the ratio pipeline.")
flags.DEFINE_float("pipeline_window_s", 3.0, "Pipeline timed window (s).")
flags.DEFINE_integer("pipeline_repeats", 3, "Pipeline timed windows.")
flags.DEFINE_bool("quick", False, "Short CPU run: resnet18@32 batch 4 fp32 XLA off/on + bf16, "
                  "resnet50@64 batch 4 fp32, 3 timed steps, pipeline ratio at 32/64.")
flags.DEFINE_string("jsonl", None, "Also append the JSON lines to this file.")
flags.DEFINE_string("child", None, "(internal) JSON config to run in this process.")
flags.DEFINE_string("data_root", common.DEFAULT_DATA_ROOT, "Where bench records live.")

MARK = "@@RESULT@@ "


# ----------------------------------------------------------------------------- child
def forward_flops(encoder, size, dtype):
    """FLOPs of one image through the encoder (TF profiler: 2 FLOPs per multiply-add)."""
    import tensorflow as tf
    from tensorflow.python.profiler import model_analyzer, option_builder
    fn = tf.function(lambda x: encoder(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec([1, size, size, 3], dtype)).graph
    opts = option_builder.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return int(model_analyzer.profile(graph, options=opts).total_float_ops)


def cached_forward_flops(model, cfg, dtype):
    """forward_flops, remembered per (backbone, size) in <data_root>/flops.json."""
    path = os.path.join(cfg.get("data_root", common.DEFAULT_DATA_ROOT), "flops.json")
    key = f"{cfg['backbone']}@{cfg['image_size']}"
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = forward_flops(model.encoder, cfg["image_size"], dtype)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + f".tmp{os.getpid()}", "w") as f:
                json.dump(cache, f)
            os.replace(path + f".tmp{os.getpid()}", path)
        except OSError:
            pass
    return cache[key]


def run_child(cfg):
    """Builds and times one configuration in this process; returns the record."""
    t_start = time.perf_counter()
    import keras
    import numpy as np
    import tensorflow as tf

    from micle_tf.config import ModelConfig, PretrainConfig
    from micle_tf.optimizers import WarmupCosineDecay, build_optimizer, scale_learning_rate
    from micle_tf.training.pretrain import build_pretraining_model
    from micle_tf.training.runner import seed_everything

    seed_everything(0)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if cfg["precision"] == "bf16" else "float32")
    size, batch = cfg["image_size"], cfg["batch_size"]
    wm = cfg.get("width_multiplier", 1.0)
    device_augment = cfg.get("device_augment")
    pcfg = PretrainConfig(model=ModelConfig(backbone=cfg["backbone"], image_size=size,
                                            width_multiplier=int(wm) if wm == int(wm) else wm),
                          batch_size=batch, optimizer=cfg["optimizer"],
                          augment=device_augment or "derm",
                          augment_placement="device" if device_augment else "host",
                          # jitter at every size: the small-image default has nothing to place
                          color_jitter_strength=1.0 if device_augment == "derm" else None)
    t0 = time.perf_counter()
    model = build_pretraining_model(pcfg, num_classes=cfg["probe_classes"], task="multiclass")
    schedule = WarmupCosineDecay(scale_learning_rate(pcfg.learning_rate, batch, "linear"),
                                 10, 100000)
    optimizer = build_optimizer(pcfg.optimizer, schedule, pcfg.weight_decay, pcfg.momentum)
    model.compile(optimizer=optimizer, jit_compile=cfg["jit"])
    model.optimizer.build(model.trainable_variables)
    build_s = time.perf_counter() - t0

    gpus = tf.config.list_physical_devices("GPU")
    device = "/GPU:0" if gpus else "/CPU:0"
    rng = np.random.default_rng(0)
    with tf.device(device):  # resident on the compute device: no per-step copy
        data = {"view1": tf.identity(rng.uniform(size=(batch, size, size, 3)).astype("float32")),
                "view2": tf.identity(rng.uniform(size=(batch, size, size, 3)).astype("float32")),
                "label": tf.identity(rng.integers(0, max(cfg["probe_classes"], 1),
                                                  size=(batch,)).astype("int32"))}
        if device_augment:  # per-view draws, as the reader makes them
            from micle_tf.augment import post_crop
            post = post_crop(device_augment, size, pcfg.color_jitter_strength)
            for k, view in enumerate(("view1", "view2")):
                data[f"{view}_augment_params"] = tf.identity(tf.stack(
                    [post.draw(tf.constant([k, i], tf.int64)) for i in range(batch)]))

    # What Keras' fit runs per step (backend/tensorflow/trainer.py, one_step_on_data).
    @tf.autograph.experimental.do_not_convert
    def one_step(d):
        return model.distribute_strategy.run(model.train_step, args=(d,))

    step = tf.function(one_step, reduce_retracing=True, jit_compile=model.jit_compile)

    def run(n):
        logs = None
        for _ in range(n):
            logs = step(data)
        return float(logs["loss"]) if logs is not None else None  # host fetch: device sync

    t0 = time.perf_counter()
    loss0 = run(1)
    first_step_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(cfg["warmup"])
    warmup_s = time.perf_counter() - t0
    window = max(1, cfg["window"])
    windows = max(1, cfg["steps"] // window)
    times, cpu, t_timed = [], [], time.perf_counter()
    loss = loss0
    for i in range(windows):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = run(window)
        times.append((time.perf_counter() - t0) / window)
        cpu.append((time.process_time() - c0) / window)
        if i >= 2 and time.perf_counter() - t_timed > cfg["max_timed_s"]:
            break
    med = float(np.median(times))
    figures = {
        "ms_per_step": med * 1000, "ms_per_step_min": min(times) * 1000,
        "ms_per_step_max": max(times) * 1000, "timed_steps": len(times) * window,
        "images_per_s": batch / med, "encoder_images_per_s": 2 * batch / med,
        "cpu_s_per_step": float(np.median(cpu)),
        "first_step_s": round(first_step_s, 2), "warmup_s": round(warmup_s, 2),
        "build_s": round(build_s, 2), "loss_first": loss0, "loss_last": loss,
        "finite": bool(np.isfinite(loss)),
    }
    if cfg["flops"]:
        try:
            fwd = cached_forward_flops(model, cfg, tf.float32)
            per_example = fwd * 3 * 2  # forward + backward (~2x forward), two views
            figures.update(forward_gflops_per_image=fwd / 1e9,
                           train_gflops_per_example=per_example / 1e9,
                           achieved_tflops=per_example * batch / med / 1e12)
        except Exception as e:  # the profiler is a best-effort extra
            figures["flops_error"] = f"{type(e).__name__}: {e}"
    if gpus:
        try:
            figures["gpu_peak_mem_gb"] = round(
                tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 30, 2)
        except Exception:
            pass
    figures["peak_rss_mb"] = common.peak_rss_mb()
    figures["child_wall_s"] = round(time.perf_counter() - t_start, 1)
    config = dict(cfg)
    config.update(jit_compile_effective=bool(model.jit_compile), device=device,
                  policy=keras.mixed_precision.global_policy().name,
                  small_image_stem=size <= 64, params_m=round(model.count_params() / 1e6, 2),
                  input="in-memory batch on the compute device")
    return {"bench": "train_step", "machine": common.machine_info(),
            "versions": common.versions(), "config": config, "figures": figures}


# ----------------------------------------------------------------------------- parent
def _pairs(values, cast=str):
    out = {}
    for v in values:
        k, _, x = str(v).partition(":")
        out[int(k)] = cast(x)
    return out


def run_config(cfg, timeout, jsonl=None):
    """Runs one configuration in a child process; returns its record (or an error record)."""
    cmd = [sys.executable, "-m", "bench.train_step", f"--child={json.dumps(cfg)}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    load_before = common.load_average()
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timeout after {timeout}s", "timeout"
    rec = None
    for line in out.splitlines():
        if line.startswith(MARK):
            rec = json.loads(line[len(MARK):])
    if rec is None:
        tail = (err or "")[-1500:]
        rec = {"bench": "train_step", "config": cfg, "error": f"rc={rc}", "stderr_tail": tail}
    else:
        rec["figures"]["load_avg_before"] = load_before
        rec["figures"]["load_avg_after"] = common.load_average()
    rec.setdefault("figures", {})["wall_s"] = round(time.time() - t0, 1)
    common.emit(rec, jsonl)
    return rec


def pipeline_rate(size, mode, batch, data, npc, window_s, repeats, root, timeout=600):
    """Pairs/s of the reader (augmented `mode`) at `size`, in a child process."""
    cmd = [sys.executable, "-m", "bench.pipeline", f"--configs={data}@{size}",
           f"--stages={mode}", f"--batch_size={batch}", f"--num_parallel_calls={npc}",
           f"--window_s={window_s}", f"--repeats={repeats}", f"--data_root={root}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"bench": "pipeline", "error": "timeout", "config": {"image_size": size,
                                                                     "stage": mode}}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return {"bench": "pipeline", "error": f"rc={proc.returncode}",
            "stderr_tail": proc.stderr[-1500:], "config": {"image_size": size, "stage": mode}}


def summary_table(records, ratios):
    ok = [r for r in records if "error" not in r]
    cols = [("backbone", lambda r: r["config"]["backbone"], None),
            ("size", lambda r: r["config"]["image_size"], None),
            ("batch", lambda r: r["config"]["batch_size"], None),
            ("prec", lambda r: r["config"]["precision"], None),
            ("xla", lambda r: "on" if r["config"]["jit"] else "off", None),
            ("width", lambda r: r["config"].get("width_multiplier", 1.0), None),
            ("dev aug", lambda r: r["config"].get("device_augment") or "-", None),
            ("ms/step", lambda r: r["figures"]["ms_per_step"], "{:.0f}"),
            ("min..max", lambda r: "{:.0f}..{:.0f}".format(r["figures"]["ms_per_step_min"],
                                                         r["figures"]["ms_per_step_max"]), None),
            ("img/s", lambda r: r["figures"]["images_per_s"], "{:.1f}"),
            ("TFLOP/s", lambda r: r["figures"].get("achieved_tflops"), "{:.3f}"),
            ("cpu s/step", lambda r: r["figures"].get("cpu_s_per_step"), "{:.1f}"),
            ("1st step s", lambda r: r["figures"]["first_step_s"], "{:.1f}"),
            ("RSS MB", lambda r: r["figures"]["peak_rss_mb"], "{:.0f}"),
            ("load1", lambda r: (r["figures"].get("load_avg_after") or [None])[0], None)]
    print(common.table(ok, cols, title="\n# train step (medians; img/s = pairs/s)"))
    for r in records:
        if "error" in r:
            c = r["config"]
            print(f"# FAILED {c.get('backbone')}@{c.get('image_size')} {c.get('precision')} "
                  f"xla={c.get('jit')}: {r['error']}")
    if ratios:
        print(common.table(ratios, [
            ("backbone", "backbone", None), ("size", "image_size", None),
            ("batch", "batch_size", None), ("prec", "precision", None), ("xla", "xla", None),
            ("mode", "mode", None), ("pipeline pairs/s", "pipeline_pairs_s", "{:.1f}"),
            ("step pairs/s", "step_pairs_s", "{:.1f}"), ("ratio", "ratio", "{:.2f}"),
            ("ok (>=3)", "ok", None)],
            title="\n# pipeline / train-step (same size, batch and mode; both measured alone)"))
    sys.stdout.flush()


def main(argv):
    del argv
    if FLAGS.child:
        cfg = json.loads(FLAGS.child)
        rec = run_child(cfg)
        print(MARK + json.dumps(rec, default=str), flush=True)
        return
    backbones, sizes, batches = FLAGS.backbones, [int(s) for s in FLAGS.sizes], FLAGS.batch_sizes
    precisions, jits = FLAGS.precisions, FLAGS.jit
    configs = None
    steps, warmup, pipe_window, pipe_repeats = (FLAGS.steps, FLAGS.warmup,
                                                FLAGS.pipeline_window_s, FLAGS.pipeline_repeats)
    if FLAGS.quick:
        # Small batches: on 2 CPU cores one resnet50@64 pair costs ~60 GFLOP (small-image stem).
        # bf16 without XLA is ~10x slower than fp32 on a CPU without bf16 instructions.
        configs = [("resnet18", 32, 4, "fp32", False), ("resnet18", 32, 4, "fp32", True),
                   ("resnet18", 32, 4, "bf16", False), ("resnet50", 64, 4, "fp32", False)]
        configs = [c + (None,) for c in configs]
        steps = steps if FLAGS["steps"].present else 3
        warmup = warmup if FLAGS["warmup"].present else 1
        pipe_window = pipe_window if FLAGS["pipeline_window_s"].present else 2.0
    if configs is None:
        bmap = {}  # size -> [batch, ...]; "B" applies to every size, "S:B" to size S
        for v in batches:
            if ":" in str(v):
                k, _, b = str(v).partition(":")
                bmap.setdefault(int(k), []).append(int(b))
            else:
                for s in sizes:
                    bmap.setdefault(s, []).append(int(v))
        missing = [s for s in sizes if s not in bmap]
        if missing:
            raise app.UsageError(f"--batch_sizes gives no batch for size(s) {missing}")
        configs = [(b, s, bs, p, j in ("on", "true", "1"), None if da == "off" else da)
                   for b in backbones for s in sizes for bs in bmap[s] for p in precisions
                   for j in jits for da in FLAGS.device_augment]
    records = []
    for backbone, size, batch, precision, jit, device_augment in configs:
        cfg = {"backbone": backbone, "image_size": size, "batch_size": batch,
               "precision": precision, "jit": jit, "steps": steps,
               "device_augment": device_augment, "width_multiplier": FLAGS.width_multiplier,
               "window": FLAGS.window, "warmup": warmup, "max_timed_s": FLAGS.max_timed_s,
               "probe_classes": FLAGS.probe_classes, "optimizer": FLAGS.optimizer,
               "flops": FLAGS.flops, "data_root": FLAGS.data_root}
        records.append(run_config(cfg, FLAGS.timeout, FLAGS.jsonl))
    ratios = []
    if FLAGS.pipeline_ratio:
        data_for = _pairs(FLAGS.pipeline_data)
        pipe = {}
        for r in records:
            if "error" in r:
                continue
            c = r["config"]
            for mode in FLAGS.pipeline_modes:
                key = (c["image_size"], c["batch_size"], mode)
                if key not in pipe:
                    data = data_for.get(c["image_size"], "synth256")
                    pipe[key] = pipeline_rate(c["image_size"], mode, c["batch_size"], data,
                                              FLAGS.pipeline_npc, pipe_window,
                                              pipe_repeats, FLAGS.data_root)
                    common.emit(pipe[key], FLAGS.jsonl)
                p = pipe[key]
                if "error" in p:
                    continue
                pr, sr = p["figures"]["examples_per_s"], r["figures"]["images_per_s"]
                ratios.append({"bench": "pipeline_vs_step", "backbone": c["backbone"],
                               "image_size": c["image_size"], "batch_size": c["batch_size"],
                               "precision": c["precision"], "xla": "on" if c["jit"] else "off",
                               "mode": mode, "pipeline_pairs_s": pr, "step_pairs_s": sr,
                               "ratio": pr / sr, "ok": pr / sr >= 3,
                               "pipeline_data": p["config"]["data"],
                               "pipeline_npc": p["config"]["num_parallel_calls"],
                               "load_avg": common.load_average()})
        for x in ratios:
            common.emit(x, FLAGS.jsonl)
    summary_table(records, ratios)


if __name__ == "__main__":
    app.run(main)

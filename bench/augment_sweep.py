r"""Augmentation sweep for small-image pretraining: colour strength x crop floor x method.

For every configuration the demo model (ResNet-18 width 0.25 at 32 px, batch 64, LARS,
temperature 0.2, lr 1.0; flags change each) is pretrained from ONE shared seeded starting
encoder on the given case-bag records (`micle-data --source=ph2`) with
`micle_tf.training.pretrain.run_pretraining(PretrainConfig(..., color_jitter_strength=s,
crop_area_min=c))`, then its encoder is measured on the VALIDATION split only (the test split
stays untouched, so the defaults chosen from this table can still be tested honestly):

* `final_contrastive_accuracy`: the last epoch's mean contrastive (NT-Xent top-1) accuracy on
  the training batches, from the pretraining summary;
* `val_same_case_top1` / `val_same_case_map`: held-out same-lesion retrieval, how often a val
  patch's nearest other val patch (cosine, encoder features) comes from the same lesion, and
  the mean average precision of that ranking, with case-bootstrap 95% CIs and chance levels
  (`micle_tf.evaluation.retrieval.same_case_retrieval_report`);
* `val_knn_accuracy`: k-NN (k=20, majority vote) label accuracy of val images against the
  labelled train images (`knn.knn_accuracy`).

The shared starting encoder is measured the same way (row `start`). Each configuration prints
one JSON line (`bench`, `machine`, `versions`, `config` with the resolved recipe from
`augment.preset_settings`, `figures`), appends it to OUT_DIR/TAG/results.jsonl and keeps its
run directory under OUT_DIR/TAG/ (TAG names the shared settings); a configuration whose
result exists is reused, and an interrupted run resumes from its last checkpoint, so
re-running the command continues the sweep. A markdown table (best val retrieval first, per
method) ends the run and is written to OUT_DIR/TAG/table.md.

  micle-data --source=ph2 --output_dir=/tmp/sweep_records --overwrite
  python -m bench.augment_sweep --data_dir=/tmp/sweep_records --out_dir=/tmp/augment_sweep
  python -m bench.augment_sweep --data_dir=/tmp/sweep_records --out_dir=/tmp/aug_quick --quick
  python -m bench.augment_sweep ... --strengths=0.5 --crop_floors=0.2,0.5 --methods=micle
"""
import hashlib
import json
import os
import sys
import time

from absl import app, flags

from bench import common

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Case-bag records (micle-data --source=ph2 output).")
flags.DEFINE_string("out_dir", None, "Where run directories, results.jsonl and table.md go.")
flags.DEFINE_list("strengths", ["0", "0.25", "0.5", "1.0"], "Colour jitter strengths.")
flags.DEFINE_list("crop_floors", ["0.08", "0.2", "0.5"], "Crop area floors (crop_area_min).")
flags.DEFINE_list("methods", ["simclr", "micle"], "Pretraining methods.")
flags.DEFINE_string("augment", "derm", "Augmentation preset whose strength/floor are swept.")
flags.DEFINE_integer("steps", 300, "Pretraining steps per configuration.")
flags.DEFINE_integer("steps_per_epoch", 50, "Steps per Keras epoch (checkpoint interval, so "
                     "the resume granularity).")
flags.DEFINE_integer("warmup_steps", 25, "Linear warmup steps (the demo's 1 epoch of 25).")
flags.DEFINE_integer("batch_size", 64, "Pretraining batch (pairs).")
flags.DEFINE_float("learning_rate", 1.0, "Base learning rate (x batch / 256, linear scaling).")
flags.DEFINE_float("temperature", 0.2, "NT-Xent temperature.")
flags.DEFINE_string("optimizer", "lars", "lars, sgd or adam.")
flags.DEFINE_string("backbone", "resnet18", "ResNet backbone.")
flags.DEFINE_float("width_multiplier", 0.25, "ResNet width multiplier.")
flags.DEFINE_integer("image_size", 32, "Image size.")
flags.DEFINE_integer("seed", 0, "Seed of the data order and augmentation (every config); the "
                     "shared starting encoder uses seed + 1000, as micle-demo does.")
flags.DEFINE_integer("k", 20, "k of the val-vs-train kNN accuracy.")
flags.DEFINE_string("train_split", "train", "Split pretrained on (and the kNN bank).")
flags.DEFINE_string("eval_split", "val", "Split measured (never the test split by default).")
flags.DEFINE_bool("cache_decoded", True, "Keep the decoded training images in RAM.")
flags.DEFINE_integer("verbose", 2, "Keras verbosity of each pretraining run.")
flags.DEFINE_bool("quick", False, "Check the script: 2 configs (simclr s=0.5 c=0.2, micle s=1.0 "
                  "c=0.08), 5 steps each.")
flags.DEFINE_string("jsonl", None, "Also append the JSON lines to this file.")
flags.DEFINE_float("small_image_gray_p", None, "Sweep-only knob: replace the grayscale "
                   "probability of the preset's small-image table (augment.SMALL_IMAGE_DEFAULTS) "
                   "in this process, to measure it beside the swept strength and floor.")

QUICK_CONFIGS = [("simclr", 0.5, 0.2), ("micle", 1.0, 0.08)]


def shared_settings():
    spe = min(FLAGS.steps_per_epoch, FLAGS.steps)
    return {"data_dir": os.path.abspath(FLAGS.data_dir), "augment": FLAGS.augment,
            "steps": FLAGS.steps, "steps_per_epoch": spe, "warmup_steps": FLAGS.warmup_steps,
            "batch_size": FLAGS.batch_size, "learning_rate": FLAGS.learning_rate,
            "temperature": FLAGS.temperature, "optimizer": FLAGS.optimizer,
            "backbone": FLAGS.backbone, "width_multiplier": FLAGS.width_multiplier,
            "image_size": FLAGS.image_size, "seed": FLAGS.seed, "k": FLAGS.k,
            "train_split": FLAGS.train_split, "eval_split": FLAGS.eval_split,
            "cache_decoded": FLAGS.cache_decoded,
            **({"small_image_gray_p": FLAGS.small_image_gray_p}
               if FLAGS.small_image_gray_p is not None else {})}


def settings_tag(shared):
    digest = hashlib.sha1(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:8]
    return (f"{shared['backbone']}w{shared['width_multiplier']:g}_{shared['image_size']}px_"
            f"{shared['steps']}steps_b{shared['batch_size']}_{digest}")


def model_config(shared):
    from micle_tf import config as config_lib
    wm = shared["width_multiplier"]
    return config_lib.ModelConfig(backbone=shared["backbone"], image_size=shared["image_size"],
                                  width_multiplier=int(wm) if float(wm).is_integer() else wm)


def build_start(workdir, shared):
    """One seeded starting encoder shared by every configuration (as micle-demo builds it)."""
    from micle_tf import demo
    s = demo.DemoSettings(backbone=shared["backbone"],
                          width_multiplier=shared["width_multiplier"],
                          image_size=shared["image_size"], seed=shared["seed"])
    return demo.build_start_encoder(workdir, s)


def measure_encoder(encoder_path, shared, info):
    """Val-split figures of an encoder (a model_dir or the start encoder's directory)."""
    import keras
    import numpy as np

    from data_pipelines import reader
    from micle_tf import config as config_lib
    from micle_tf.evaluation import knn, retrieval
    from micle_tf.inference import embed
    from micle_tf.rundir import load_encoder_weights
    from micle_tf.training.pretrain import build_pretraining_model
    keras.utils.clear_session()
    model = build_pretraining_model(config_lib.PretrainConfig(model=model_config(shared)))
    load_encoder_weights(model.encoder, encoder_path)

    def embeddings(split):
        ds = reader.make_dataset(shared["data_dir"], split, "supervised", 200,
                                 shared["image_size"], training=False, info=info)
        return embed(model.encoder, ds)
    q_emb, q_labels, q_cases = embeddings(shared["eval_split"])
    r = retrieval.same_case_retrieval_report(q_emb, q_cases, n_boot=1000, seed=0)
    out = {"val_same_case_top1": r["top1"], "val_same_case_top1_ci95": r["ci95"]["top1"],
           "val_same_case_map": r["map"], "val_same_case_map_ci95": r["ci95"]["map"],
           "val_same_case_chance": r["chance_top1"], "val_same_case_chance_map": r["chance_map"],
           "num_val_images": int(len(q_emb)),
           "num_val_cases": int(len(np.unique(q_cases))), "val_knn_accuracy": None}
    if info["task"] == "multiclass" and info["label_names"]:
        t_emb, t_labels, _ = embeddings(shared["train_split"])
        keep_t, keep_q = t_labels >= 0, q_labels >= 0
        if keep_t.any() and keep_q.any():
            out["val_knn_accuracy"] = knn.knn_accuracy(
                t_emb[keep_t], t_labels[keep_t], q_emb[keep_q], q_labels[keep_q],
                k=min(shared["k"], int(keep_t.sum())))
            out["num_train_images"] = int(keep_t.sum())
    return out


def record(config, figures, run_dir, reused):
    return {"bench": "augment_sweep", "machine": common.machine_info(),
            "versions": common.versions(), "config": config, "figures": figures,
            "run_dir": run_dir, "reused": reused}


def run_config(workdir, shared, start, info, method, strength, floor, jsonl):
    """Pretrains (or reuses) one configuration and returns its JSON record."""
    import keras

    from micle_tf import augment, config as config_lib
    from micle_tf.training.pretrain import run_pretraining
    name = f"{method}_s{strength:g}_c{floor:g}"
    run_dir = os.path.join(workdir, name)
    result_path = os.path.join(run_dir, "sweep_result.json")
    config = {"name": name, "method": method, "color_jitter_strength": strength,
              "crop_area_min": floor,
              "recipe": augment.preset_settings(shared["augment"], shared["image_size"],
                                                strength, floor),
              **shared}
    config = json.loads(json.dumps(config))  # tuples -> lists, as read back from disk
    if os.path.exists(result_path):
        with open(result_path) as f:
            previous = json.load(f)
        if previous.get("config") == config:
            rec = record(config, previous["figures"], run_dir, reused=True)
            common.emit(rec, jsonl)
            return rec
    keras.utils.clear_session()
    spe = shared["steps_per_epoch"]
    cfg = config_lib.PretrainConfig(
        method=method, data_dir=shared["data_dir"], model_dir=run_dir,
        model=model_config(shared), batch_size=shared["batch_size"],
        train_steps=shared["steps"], steps_per_epoch=spe,
        learning_rate=shared["learning_rate"], warmup_epochs=shared["warmup_steps"] / spe,
        optimizer=shared["optimizer"], temperature=shared["temperature"],
        augment=shared["augment"], color_jitter_strength=strength, crop_area_min=floor,
        init_checkpoint=start, seed=shared["seed"], verbose=FLAGS.verbose, knn_monitor=False,
        cache_decoded=shared["cache_decoded"], train_split=shared["train_split"],
        eval_split=shared["eval_split"])
    t0 = time.time()
    summary = run_pretraining(cfg)
    figures = {"final_contrastive_accuracy": summary["final_contrastive_accuracy"],
               "final_loss": summary["final_loss"], "final_step": summary["final_step"],
               "pretrain_wall_seconds": summary["wall_seconds"],
               "images_per_second": summary["images_per_second"]}
    figures.update(measure_encoder(run_dir, shared, info))
    figures["wall_seconds"] = time.time() - t0
    figures["load_avg"] = common.load_average()
    from data_pipelines.writer import write_json_atomic
    write_json_atomic(result_path, {"config": config, "figures": figures})
    rec = record(config, figures, run_dir, reused=False)
    common.emit(rec, jsonl)
    return rec


def measure_start(workdir, shared, start, info):
    path = os.path.join(workdir, "start_eval.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    figures = measure_encoder(start, shared, info)
    with open(path, "w") as f:
        json.dump(figures, f)
    return figures


def _fmt(value, spec="{:.3f}"):
    return "-" if value is None else spec.format(value)


def markdown_table(records, start_figures, shared):
    """Per method, best val same-lesion retrieval first (then kNN accuracy)."""
    def key(r):
        f = r["figures"]
        return (r["config"]["method"] != "micle", -(f["val_same_case_top1"] or 0.0),
                -(f["val_knn_accuracy"] or 0.0))
    lines = [f"Augmentation sweep: {shared['augment']} at {shared['image_size']} px, "
             f"{shared['backbone']} width {shared['width_multiplier']:g}, {shared['steps']} "
             f"steps, batch {shared['batch_size']}, lr {shared['learning_rate']:g}, "
             f"T {shared['temperature']:g}, seed {shared['seed']}; {shared['eval_split']} "
             f"split: {start_figures['num_val_images']} images of "
             f"{start_figures['num_val_cases']} lesions, same-lesion chance "
             f"{start_figures['val_same_case_chance']:.3f} (top-1), "
             f"{start_figures['val_same_case_chance_map']:.3f} (mAP); contrastive accuracy "
             f"chance 1/{2 * shared['batch_size'] - 1} = {1 / (2 * shared['batch_size'] - 1):.4f}.",
             "",
             "| method | jitter s | crop floor | contrastive acc | val same-lesion top-1 [95% CI] "
             f"| val mAP | val kNN acc (k={shared['k']}) | final loss | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ci(f, key):
        lo, hi = f.get(key) or (None, None)
        return "" if lo is None else f" [{lo:.3f}, {hi:.3f}]"
    lines.append(f"| start (untrained) | - | - | - | "
                 f"{_fmt(start_figures['val_same_case_top1'])}"
                 f"{ci(start_figures, 'val_same_case_top1_ci95')} | "
                 f"{_fmt(start_figures.get('val_same_case_map'))} | "
                 f"{_fmt(start_figures['val_knn_accuracy'])} | - | - |")
    for r in sorted(records, key=key):
        c, f = r["config"], r["figures"]
        lines.append(f"| {c['method']} | {c['color_jitter_strength']:g} | "
                     f"{c['crop_area_min']:g} | {_fmt(f['final_contrastive_accuracy'])} | "
                     f"{_fmt(f['val_same_case_top1'])}{ci(f, 'val_same_case_top1_ci95')} | "
                     f"{_fmt(f.get('val_same_case_map'))} | {_fmt(f['val_knn_accuracy'])} | "
                     f"{_fmt(f['final_loss'])} | {_fmt(f['wall_seconds'], '{:.0f}')} |")
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS.data_dir or not FLAGS.out_dir:
        raise app.UsageError("--data_dir and --out_dir are required")
    if FLAGS.quick:
        FLAGS.steps, FLAGS.steps_per_epoch, FLAGS.warmup_steps = 5, 5, 1
        configs = QUICK_CONFIGS
    else:
        configs = [(m, float(s), float(c)) for m in FLAGS.methods for s in FLAGS.strengths
                   for c in FLAGS.crop_floors]
    from data_pipelines.writer import read_info
    info = read_info(FLAGS.data_dir)
    for split in (FLAGS.train_split, FLAGS.eval_split):
        if split not in info["splits"]:
            raise app.UsageError(f"{FLAGS.data_dir} has no {split!r} split "
                                 f"({sorted(info['splits'])})")
    if FLAGS.small_image_gray_p is not None:
        from micle_tf import augment
        augment.SMALL_IMAGE_DEFAULTS[FLAGS.augment]["gray_p"] = FLAGS.small_image_gray_p
    shared = shared_settings()
    workdir = os.path.join(FLAGS.out_dir, settings_tag(shared))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep_settings.json"), "w") as f:
        json.dump(shared, f, indent=2)
    jsonl = os.path.join(workdir, "results.jsonl")
    print(f"# augment sweep: {len(configs)} configs in {workdir}", file=sys.stderr, flush=True)
    start = build_start(workdir, shared)
    start_figures = measure_start(workdir, shared, start, info)
    records = []
    for method, strength, floor in configs:
        rec = run_config(workdir, shared, start, info, method, strength, floor, jsonl)
        if FLAGS.jsonl:
            with open(FLAGS.jsonl, "a") as f:
                f.write(json.dumps(rec, default=str) + "\n")
        records.append(rec)
    table = markdown_table(records, start_figures, shared)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    app.run(main)

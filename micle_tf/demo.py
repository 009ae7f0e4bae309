"""The main job: the paper's whole pipeline on the embedded PH² data, in one work directory.

Stages (each reused when its output already exists, so a second run only redoes what is
missing):
  1. records     micle-data --source=ph2 (199 lesion bags x 10 distinct patches, split by lesion)
  2. init        one starting encoder shared by SimCLR and MICLe (an ImageNet SimCLR checkpoint
                 when given, else one seeded random initialisation: no ImageNet weights exist
                 offline)
  3. pretrain    SimCLR and MICLe from that encoder, same steps, same seed
  4. sweep       fine-tune scratch / SimCLR / MICLe at each label fraction (and seed),
                 evaluate case-level on the test split with bootstrap CIs
  5. compare     paired bootstrap differences of test AUC between inits on the same cases
                 (per seed, and averaged over seeds when there are several), and
                 same-lesion retrieval on held-out lesions (label-free)
  6. export      the best model by *validation* AUC: temperature scaling fitted on the
                 validation lesions, test evaluation with calibration before/after, a
                 SavedModel serving the scaled probabilities with its model card, checked in a
                 fresh process
  7. report.md   tables, plots and plain statements of what the CIs support
"""
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import logging

from data_pipelines.writer import INFO_FILE, load_or_create_salt, read_info, write_dataset
from micle_tf import config as config_lib, inference, rundir
from micle_tf.models.contrastive import METHODS


@dataclasses.dataclass
class DemoSettings:
    backbone: str = "resnet18"
    width_multiplier: float = 0.25
    image_size: int = 32
    pretrain_batch_size: int = 64
    # 300 steps: what the augmentation sweep measured (docs/augmentation_sweep.md); with the
    # 32-px recipe (crop + flip) SimCLR then reaches contrastive accuracy ~0.9, MICLe ~0.24
    pretrain_steps: int = 300
    pretrain_steps_per_epoch: int = 50  # checkpoint + kNN monitor interval
    pretrain_warmup_epochs: float = 0.5  # 25 steps, as in the sweep
    pretrain_learning_rate: float = 1.0
    temperature: float = 0.2
    augment: str = "derm"
    color_jitter_strength: float = None  # None: the preset's default for the image size
    crop_area_min: float = None
    finetune_batch_size: int = 32
    finetune_steps: int = 200
    finetune_learning_rate: float = 0.1
    fractions: tuple = (0.25, 1.0)
    seeds: tuple = (0,)
    n_boot: int = 1000
    seed: int = 0
    init_checkpoint: str = None  # e.g. imagenet_simclr:/path/to/r50_1x_sk0 (stage 1 weights)


# The longer reproduction run (`micle-demo --reproduce`): the demo's pretraining, and the
# label-efficiency sweep over four fractions and three fine-tuning seeds.
REPRODUCE = DemoSettings(fractions=(0.1, 0.25, 0.5, 1.0), seeds=(0, 1, 2))

COMPARISONS_FORMAT = 3  # comparisons.json layout (2: retrieval with CIs and paired differences;
# 3: + seed-averaged AUC and differences with several seeds)

QUICK = DemoSettings(width_multiplier=0.125, pretrain_batch_size=32, pretrain_steps=8,
                     pretrain_steps_per_epoch=4, finetune_steps=8, finetune_batch_size=32,
                     n_boot=200)


def _stage(name):
    logging.info("micle-demo: === %s ===", name)
    return time.time()


def _model_cfg(s):
    wm = s.width_multiplier
    return config_lib.ModelConfig(backbone=s.backbone,
                                  width_multiplier=int(wm) if float(wm).is_integer() else wm,
                                  image_size=s.image_size)


def build_records(workdir, seed=0):
    out = os.path.join(workdir, "records")
    if os.path.exists(os.path.join(out, INFO_FILE)):
        logging.info("micle-demo: records exist in %s (reused)", out)
        return out
    from data_pipelines.sources import ph2
    salt = load_or_create_salt(os.path.join(workdir, "records.salt"))
    write_dataset(ph2.build(), out, salt, seed=seed, overwrite=True)
    return out


def build_start_encoder(workdir, s):
    """A pretraining-layout checkpoint both methods start from (stage 1 of the recipe)."""
    import keras
    import tensorflow as tf

    from micle_tf.training.pretrain import build_pretraining_model
    out = os.path.join(workdir, "start_encoder")
    if tf.train.latest_checkpoint(os.path.join(out, rundir.CHECKPOINT_SUBDIR)):
        return out
    keras.utils.clear_session()
    keras.utils.set_random_seed(s.seed + 1000)
    cfg = config_lib.PretrainConfig(model=_model_cfg(s))
    model = build_pretraining_model(cfg)
    if s.init_checkpoint:
        rundir.load_encoder_weights(model.encoder, s.init_checkpoint, model.projection_head)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model),
                                         os.path.join(out, rundir.CHECKPOINT_SUBDIR),
                                         max_to_keep=1)
    manager.save(checkpoint_number=0)
    rundir.write_json(os.path.join(out, rundir.START_ENCODER_FILE), {
        "source": s.init_checkpoint or f"random initialisation, seed {s.seed + 1000}",
        "model": dataclasses.asdict(cfg.model)})
    return out


def pretrain(workdir, records, start, method, s):
    import keras

    from micle_tf.training.pretrain import run_pretraining
    model_dir = os.path.join(workdir, f"pretrain_{method}")
    summary = rundir.read_json(os.path.join(model_dir, rundir.PRETRAIN_SUMMARY_FILE))
    if summary is not None and summary.get("final_step") == s.pretrain_steps:
        logging.info("micle-demo: %s pretraining finished earlier (reused)", method)
        return model_dir, summary
    keras.utils.clear_session()
    cfg = config_lib.PretrainConfig(
        method=method, data_dir=records, model_dir=model_dir, model=_model_cfg(s),
        batch_size=s.pretrain_batch_size, train_steps=s.pretrain_steps,
        steps_per_epoch=s.pretrain_steps_per_epoch, learning_rate=s.pretrain_learning_rate,
        warmup_epochs=s.pretrain_warmup_epochs, temperature=s.temperature, augment=s.augment,
        color_jitter_strength=s.color_jitter_strength, crop_area_min=s.crop_area_min,
        init_checkpoint=start, seed=s.seed, verbose=2, knn_monitor=True, cache_decoded=True)
    return model_dir, run_pretraining(cfg)


def retrieval(workdir, records, encoder_dirs, s):
    """Same-lesion retrieval among held-out (test) lesions' patches: top-1 and mAP with
    case-bootstrap CIs per encoder, and paired differences (each method minus the start
    encoder, MICLe minus SimCLR) on the same patches. Writes retrieval_test.json/.md."""
    from micle_tf.evaluation.encoder_retrieval import evaluate_retrieval
    return evaluate_retrieval(encoder_dirs, records, "test", out_dir=workdir, n_boot=s.n_boot,
                              seed=s.seed, pairs=[("simclr", "start"), ("micle", "start"),
                                                  ("micle", "simclr")],
                              title="Same-lesion retrieval on held-out (test) lesions")


PAIRS = (("micle", "none"), ("simclr", "none"), ("micle", "simclr"))


def sweep_test_predictions(records, sweep):
    """{(init, fraction, seed): (case ids, case probabilities, case labels)} of every sweep
    run on the test split (best checkpoint, case level), all in the first run's case order."""
    import keras

    from micle_tf.evaluation import metrics
    out, order = {}, None
    for row in sweep["rows"]:
        keras.utils.clear_session()
        model, cfg, _ = rundir.load_classifier(row["model_dir"], "best")
        case_ids, labels, p = inference.predict_split(model, records, "test",
                                                      cfg.model.image_size)
        ids, cp, cl = metrics.aggregate_by_case(case_ids, p, labels)
        if order is None:
            order = list(ids)
        where = {c: i for i, c in enumerate(ids)}
        if set(where) != set(order):
            raise ValueError(f"{row['model_dir']} was evaluated on other test cases")
        take = [where[c] for c in order]
        out[(row["init"], float(row["label_fraction"]), row["seed"])] = (
            np.asarray(order), cp[take], cl[take])
    return out


def paired_comparisons(records, sweep, s, pairs=PAIRS, predictions=None):
    """Paired bootstrap over test cases of AUC(A) - AUC(B) for runs at the same fraction/seed."""
    from micle_tf.evaluation import metrics
    info = read_info(records)
    if predictions is None:
        predictions = sweep_test_predictions(records, sweep)
    out = []
    for a, b in pairs:
        for fraction in s.fractions:
            for seed in s.seeds:
                ka, kb = (a, float(fraction), seed), (b, float(fraction), seed)
                if ka not in predictions or kb not in predictions:
                    continue
                ids, pa, labels = predictions[ka]
                d = metrics.paired_bootstrap_difference(
                    labels, pa, predictions[kb][1], ids, info["task"], info["label_names"],
                    metric="auc_macro", n_boot=s.n_boot, seed=s.seed)
                out.append({"a": a, "b": b, "label_fraction": float(fraction), "seed": seed,
                            **d})
    return out


def seed_averaged(predictions, task, label_names, s, pairs=PAIRS):
    """Test AUC averaged over the seeds of each init and fraction, and the seed-averaged
    paired differences A - B (seed s of A with seed s of B), each with a case-bootstrap CI
    (`metrics.seed_averaged_bootstrap`: one resample of test cases applied to every run).
    Only seeds that every compared run has are used."""
    from micle_tf.evaluation import metrics
    inits = sorted({k[0] for k in predictions})
    auc, differences = [], []
    for fraction in s.fractions:
        fraction = float(fraction)
        for init in inits:
            seeds = [x for x in s.seeds if (init, fraction, x) in predictions]
            if not seeds:
                continue
            runs = [predictions[(init, fraction, x)] for x in seeds]
            r = metrics.seed_averaged_bootstrap(
                runs[0][2], [p for _, p, _ in runs], runs[0][0], task, label_names,
                n_boot=s.n_boot, seed=s.seed)
            auc.append({"init": init, "label_fraction": fraction, "seeds": seeds, **r})
        for a, b in pairs:
            seeds = [x for x in s.seeds
                     if (a, fraction, x) in predictions and (b, fraction, x) in predictions]
            if not seeds:
                continue
            ra = [predictions[(a, fraction, x)] for x in seeds]
            rb = [predictions[(b, fraction, x)] for x in seeds]
            r = metrics.seed_averaged_bootstrap(
                ra[0][2], [p for _, p, _ in ra], ra[0][0], task, label_names,
                probs_by_seed_b=[p for _, p, _ in rb], n_boot=s.n_boot, seed=s.seed)
            differences.append({"a": a, "b": b, "label_fraction": fraction, "seeds": seeds,
                                **r})
    return {"auc": auc, "differences": differences}


def pick_best(sweep):
    """The run to export: best *validation* AUC (test stays untouched by the choice)."""
    best, best_auc = None, -1.0
    for row in sweep["rows"]:
        summary = rundir.read_json(os.path.join(row["model_dir"],
                                                rundir.FINETUNE_SUMMARY_FILE))
        auc = ((summary.get("best") or {}).get("val_metrics") or {}).get("auc_macro")
        if auc is not None and auc > best_auc:
            best, best_auc = row, auc
    return best or sweep["rows"][-1], best_auc


def calibrate_and_evaluate(model_dir, records, s):
    """Temperature scaling of the exported run, fitted on the validation lesions, then its
    test evaluation again (same resamples as the sweep's), so metrics_test.json and the model
    card hold calibration before and after."""
    from micle_tf.evaluation.evaluate import evaluate_model_dir
    from micle_tf.evaluation.temperature_scaling import fit_model_dir
    fit_model_dir(model_dir, records)
    return evaluate_model_dir(model_dir, records, "test", level="case", n_boot=s.n_boot,
                              seed=s.seed)


def check_export_in_fresh_process(export_dir, records):
    """Loads the SavedModel in a new Python process that imports only TensorFlow and classifies
    one test patch's PNG bytes and reads the model card from `get_model_card`; returns what it
    printed (probabilities, label names, the card's title and temperature)."""
    import tensorflow as tf

    from data_pipelines import schema
    from data_pipelines.reader import list_shards
    first = next(iter(tf.data.TFRecordDataset(list_shards(records, "test")).take(1)))
    ex = tf.train.Example.FromString(first.numpy())
    png = ex.features.feature[schema.IMAGE_ENCODED].bytes_list.value[0]
    png_path = os.path.join(export_dir + "_check.png")
    with open(png_path, "wb") as f:
        f.write(png)
    code = ("import json, sys, tensorflow as tf\n"
            "m = tf.saved_model.load(sys.argv[1])\n"
            "b = open(sys.argv[2], 'rb').read()\n"
            "out = m.signatures['serving_default'](image_bytes=tf.constant([b]))\n"
            "p = out['probabilities'].numpy()[0].tolist()\n"
            "names = [n.decode() for n in "
            "m.signatures['get_label_names']()['label_names'].numpy().tolist()]\n"
            "card = json.loads(m.signatures['get_model_card']()['model_card'].numpy())\n"
            "print(json.dumps({'probabilities': p, 'sum': sum(p), 'label_names': names,\n"
            "                  'model_card_title': card['title'],\n"
            "                  'temperature': card['calibration'].get('temperature')}))\n")
    proc = subprocess.run([sys.executable, "-c", code, export_dir, png_path],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    os.remove(png_path)
    if proc.returncode != 0:
        raise RuntimeError(f"exported model failed in a fresh process: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_demo(workdir, s):
    """Runs (or resumes) every stage; returns the path of report.md."""
    import keras

    from micle_tf.export.serving import export_saved_model
    from micle_tf.training.sweep import run_sweep
    os.makedirs(workdir, exist_ok=True)
    timings = {}
    t = _stage("1/7 records")
    records = build_records(workdir, s.seed)
    timings["records"] = time.time() - t

    t = _stage("2/7 starting encoder")
    start = build_start_encoder(workdir, s)
    timings["start_encoder"] = time.time() - t

    pretrained = {}
    for method in METHODS:
        t = _stage(f"3/7 {method} pretraining ({s.pretrain_steps} steps)")
        pretrained[method] = pretrain(workdir, records, start, method, s)
        timings[f"pretrain_{method}"] = time.time() - t

    t = _stage("4/7 fine-tuning sweep")
    base = config_lib.FinetuneConfig(
        model=_model_cfg(s), batch_size=s.finetune_batch_size, train_steps=s.finetune_steps,
        learning_rate=s.finetune_learning_rate, warmup_epochs=0, weight_decay=0.0,
        optimizer="lars", verbose=0, cache_decoded=True)
    inits = {"none": "none", "simclr": pretrained["simclr"][0],
             "micle": pretrained["micle"][0]}
    sweep = run_sweep(records, inits, s.fractions, s.seeds, base, os.path.join(workdir, "sweep"),
                      split="test", level="case", n_boot=s.n_boot, eval_seed=s.seed)
    timings["sweep"] = time.time() - t

    t = _stage("5/7 comparisons")
    fresh = sweep["counts"]["trained"] > 0 or sweep["counts"]["evaluated"] > 0
    cached = None if fresh else rundir.read_json(os.path.join(workdir, "comparisons.json"))
    if cached is None or cached.get("format") != COMPARISONS_FORMAT:
        predictions = sweep_test_predictions(records, sweep)
        info = read_info(records)
        cached = {"format": COMPARISONS_FORMAT,
                  "comparisons": paired_comparisons(records, sweep, s, predictions=predictions),
                  "seed_averaged": (seed_averaged(predictions, info["task"],
                                                  info["label_names"], s)
                                    if len(s.seeds) > 1 else None),
                  "retrieval": retrieval(workdir, records,
                                         {"start": start, "simclr": pretrained["simclr"][0],
                                          "micle": pretrained["micle"][0]}, s)}
        rundir.write_json(os.path.join(workdir, "comparisons.json"), cached)
    else:
        logging.info("micle-demo: comparisons computed earlier (reused)")
    comparisons, retrieval_scores = cached["comparisons"], cached["retrieval"]
    averaged = cached.get("seed_averaged")
    timings["compare"] = time.time() - t

    t = _stage("6/7 export")
    best, best_val_auc = pick_best(sweep)
    export_dir = os.path.join(workdir, "export")
    previous = rundir.read_json(os.path.join(workdir, "export_check.json"))
    if (previous and previous.get("model_dir") == best["model_dir"] and not fresh
            and os.path.exists(os.path.join(export_dir, "saved_model.pb"))
            and os.path.exists(os.path.join(export_dir, "assets", "model_card.md"))):
        logging.info("micle-demo: export exists for the chosen model (reused)")
        exported, check = previous["exported"], previous["check"]
    else:
        keras.utils.clear_session()
        calibrate_and_evaluate(best["model_dir"], records, s)
        keras.utils.clear_session()
        exported = export_saved_model(best["model_dir"], export_dir, which="best",
                                      overwrite=True)
        check = check_export_in_fresh_process(export_dir, records)
        rundir.write_json(os.path.join(workdir, "export_check.json"),
              {"model_dir": best["model_dir"], "exported": exported, "check": check})
    timings["export"] = time.time() - t

    t = _stage("7/7 report")
    from micle_tf.demo_report import write_demo_report
    path = write_demo_report(workdir, s, records, pretrained, sweep, comparisons,
                             retrieval_scores, best, best_val_auc, exported, check, timings,
                             seed_averaged=averaged)
    timings["report"] = time.time() - t
    logging.info("micle-demo: report at %s (%.0f s in all)", path, sum(timings.values()))
    return path

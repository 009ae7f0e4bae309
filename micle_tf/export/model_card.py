"""The model card that travels with every export (Mitchell et al., "Model Cards for Model
Reporting", FAT* 2019): `model_card.json` and `model_card.md` in the SavedModel's assets, and
the JSON from the `get_model_card` signature (`micle_tf.export.serving`).

`build_model_card` reads the run directory (`micle_tf.rundir`): the fine-tuning config and
summary, the pretraining run it was initialised from (method, data, steps), the training
data's `dataset_info.json` (source, counts per split, label names, duplicates policy and
counts, case attribute counts, citation), the newest evaluation (`metrics_test.json`, else the
newest `metrics_*.json`: metrics with CIs, calibration, subgroups) and `calibration.json`.

JSON sections: ``model_card_version``, ``title``, ``model`` (architecture, input, output,
``init``, ``fine_tuning``, ``checkpoint``), ``training_data``, ``evaluation`` (``available``;
``split``, ``level``, ``num_cases``, ``num_images``, ``metrics`` - the metric keys of the
metrics file, values as written there - ``calibration``, ``calibration_after``,
``calibrated_metrics``, ``subgroups``, ``subgroups_after`` when evaluated), ``calibration``
(what the served probabilities are: temperature scaling applied or not), ``intended_use``,
``out_of_scope_use``, ``limitations``, ``citation``, ``privacy``, ``versions``.

Privacy (no file paths or ids in an exported model): the card is built from a whitelist of
fields, never from a whole config or metrics dict; an initialisation is described by its kind
(pretraining method, "ImageNet SimCLR checkpoint", ...), never by its path; case attribute
counts of the training data below `min_group_size` are shown as "n < k" (and, when a table
would have exactly one such cell, its next smallest count too, so the hidden one cannot be
recovered from the split's total). `check_no_paths` refuses a card holding a known path (the
model, data, init and export directories) or anything that looks like an absolute path.
"""
import glob
import json
import os
import re

from absl import logging

from data_pipelines.writer import read_info
from micle_tf import __version__, rundir
from micle_tf.evaluation import subgroups

MODEL_CARD_VERSION = 1
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
DEFAULT_MIN_GROUP_SIZE = 10

PAPER = ("S. Azizi et al., \"Big Self-Supervised Models Advance Medical Image Classification\", "
         "ICCV 2021 (arXiv:2101.05224)")
SIMCLR = ("T. Chen et al., \"A Simple Framework for Contrastive Learning of Visual "
          "Representations\", ICML 2020; \"Big Self-Supervised Models are Strong Semi-Supervised "
          "Learners\", NeurIPS 2020")
TEMPERATURE_SCALING = ("C. Guo et al., \"On Calibration of Modern Neural Networks\", ICML 2017 "
                       "(temperature scaling)")
MODEL_CARDS = ("M. Mitchell et al., \"Model Cards for Model Reporting\", FAT* 2019 (this card's "
               "format)")

DEFAULT_INTENDED_USE = (
    "Research use only: a reference model for studying self-supervised pretraining (SimCLR, "
    "MICLe) for medical image classification and for testing a serving pipeline. It is not a "
    "medical device, has not been clinically validated or cleared by any regulator, and its "
    "outputs are not medical advice.")
DEFAULT_OUT_OF_SCOPE = (
    "Any clinical use: diagnosing, screening, triaging or treating patients, with or without a "
    "clinician in the loop.",
    "Images of another kind than the training data (another modality, body site, device, "
    "site or population) without a new evaluation on them.",
    "Images that show none of the classes: the model always answers with a distribution over "
    "its label names, also for an unrelated image.",
    "Reading the probabilities as patient risks outside the evaluated data.")
PRIVACY = ("No patient identifiers, case ids, dates or file paths are in this card or in the "
           "export. Case attributes are coarse tokens (sex, 10-year age band, view, ...); "
           "groups with fewer than the minimum group size are shown as \"n < k\".")

METRIC_KEYS = ("top1", "top3", "auc_macro", "auc_per_class", "support", "sensitivity",
               "specificity", "threshold", "ci95", "ci95_skipped")
EVALUATION_BLOCKS = ("calibration", "calibration_after", "calibrated_metrics", "subgroups",
                     "subgroups_after")
_ABS_PATH = re.compile(r"(?:^|[\s\"'(=\[,])(/[\w.~+-]+){2,}|\b[A-Za-z]:\\")


# ----------------------------------------------------------------------------- reading
def _read_json(path):
    try:
        return rundir.read_json(path)
    except (OSError, ValueError):
        return None


def _start_description(init_checkpoint):
    """What a pretraining run started from, without its path."""
    if not init_checkpoint:
        return "random initialisation"
    if init_checkpoint.startswith("imagenet_simclr:"):
        return "an ImageNet SimCLR checkpoint (google-research/simclr)"
    meta = _read_json(os.path.join(init_checkpoint, rundir.START_ENCODER_FILE))
    if meta is not None:
        source = str(meta.get("source") or "")
        if source.startswith("imagenet_simclr:"):
            return "an ImageNet SimCLR checkpoint (google-research/simclr)"
        if source and "/" not in source and "\\" not in source:
            return source  # e.g. "random initialisation, seed 1000"
        return "a micle-tf starting checkpoint"
    kind = rundir.run_kind(init_checkpoint)
    if kind == "pretrain":
        pcfg, _ = rundir.load_config(init_checkpoint, "pretrain")
        return f"a micle-tf {pcfg.method} pretraining run"
    return "a checkpoint (details not recorded)"


def describe_init(init_from):
    """``{"kind", "description", ...}`` of a fine-tuning run's `init_from`, never its path:
    for a micle-pretrain model_dir its method, data (source, cases, images), steps, batch size,
    image size, temperature and what pretraining started from."""
    init = init_from or "none"
    if init == "none":
        return {"kind": "none", "description": "random initialisation (supervised baseline, "
                "no pretraining)"}
    if init.startswith("imagenet_simclr:"):
        return {"kind": "imagenet_simclr", "description": "encoder from an ImageNet SimCLR "
                "checkpoint (google-research/simclr), no pretraining on medical images"}
    kind = rundir.run_kind(init) if os.path.isdir(init) else None
    if kind == "pretrain":
        pcfg, pfacts = rundir.load_config(init, "pretrain")
        summary = _read_json(os.path.join(init, rundir.PRETRAIN_SUMMARY_FILE)) or {}
        out = {"kind": pcfg.method,
               "description": (
                   "MICLe pretraining (micle-pretrain --method=micle: positive pairs are two "
                   "different images of one case)" if pcfg.method == "micle" else
                   f"{'SimCLR' if pcfg.method == 'simclr' else pcfg.method} pretraining "
                   f"(micle-pretrain --method={pcfg.method}: positive pairs are two views of "
                   "one image)"),
               "method": pcfg.method,
               "pretraining_data": (
                   {"tfds_name": pcfg.tfds_name} if pcfg.tfds_name else
                   {"source": pfacts.get("source"), "split": pcfg.train_split,
                    "num_cases": ((pfacts.get("splits") or {}).get(pcfg.train_split) or {})
                    .get("cases"),
                    "num_images": ((pfacts.get("splits") or {}).get(pcfg.train_split) or {})
                    .get("images")}),
               "steps": summary.get("final_step"),
               "batch_size": pcfg.batch_size,
               "image_size": pcfg.model.image_size,
               "temperature": pcfg.temperature,
               "augment": pcfg.augment,
               "started_from": _start_description(pcfg.init_checkpoint)}
        return out
    if kind == "finetune":
        return {"kind": "finetuned", "description": "the encoder of another micle-tf "
                "fine-tuned classifier"}
    if os.path.isdir(init) and _read_json(os.path.join(init, rundir.START_ENCODER_FILE)):
        return {"kind": "start_encoder", "description": _start_description(init)}
    return {"kind": "checkpoint", "description": "a checkpoint that is not a micle-tf run "
            "directory (details not available at export time)"}


def _training_info(facts):
    """dataset_info.json of the fine-tuning data when it can still be read, else None."""
    data_dir = facts.get("data_dir")
    if not data_dir:
        return None
    try:
        return read_info(data_dir)
    except (FileNotFoundError, OSError, ValueError) as e:
        logging.warning("model card: cannot read the training data's dataset_info.json (%s); "
                        "the card uses the facts recorded in the model_dir", e)
        return None


def suppress_counts(table, k):
    """{token: count} -> {token: count or "n < k"}: counts below k suppressed; when exactly
    one is, the next smallest too (complementary suppression, ``subgroups.hidden_sizes``: else
    total minus the others gives it away)."""
    hidden = subgroups.hidden_sizes(table, k)
    return {t: (subgroups.suppressed_label(k) if t in hidden else int(n))
            for t, n in sorted(table.items())}


def _splits(split_info):
    return {name: {"cases": s.get("cases"), "images": s.get("images")}
            for name, s in (split_info or {}).items()}


def training_data_section(facts, info, train_split, min_group_size):
    src = info or facts
    out = {"source": src.get("source"), "task": src.get("task"),
           "label_names": list(src.get("label_names") or []),
           "splits": _splits(src.get("splits")),
           "num_cases": src.get("num_cases"), "num_images": src.get("num_images"),
           "trained_on_split": train_split}
    if info is None:
        out["note"] = ("the data's dataset_info.json was not readable at export time: counts "
                       "are those recorded when the model was trained")
        return out
    out["image_size"] = info.get("image_size")
    out["num_rejected"] = info.get("num_rejected")
    dup = info.get("duplicates") or {}
    out["duplicates"] = {k: v for k, v in dup.items()
                         if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    attrs = info.get("case_attributes") or {}
    out["case_attributes"] = {split: {name: suppress_counts(table, min_group_size)
                                      for name, table in sorted(by_name.items())}
                              for split, by_name in sorted(attrs.items())}
    out["min_group_size"] = int(min_group_size)
    out["created_by"] = info.get("created_by")
    return out


def find_metrics(model_dir, metrics_file=None):
    """(metrics dict, its file name) of the evaluation the card reports: `metrics_file`, else
    model_dir/metrics_test.json, else the newest metrics_*.json there; (None, None) when there
    is none."""
    if metrics_file:
        m = _read_json(metrics_file)
        if m is None:
            raise FileNotFoundError(f"metrics file {metrics_file} not found (micle-evaluate "
                                    "writes metrics_{split}.json)")
        return m, os.path.basename(metrics_file)
    path = os.path.join(model_dir, rundir.metrics_file("test"))
    if not os.path.exists(path):
        found = sorted(glob.glob(os.path.join(model_dir, "metrics_*.json")),
                       key=os.path.getmtime)
        if not found:
            return None, None
        path = found[-1]
    return _read_json(path), os.path.basename(path)


def evaluation_section(metrics, name, exported_checkpoint, temperature_applied):
    if metrics is None:
        return {"available": False,
                "note": "no micle-evaluate results in the model directory at export time"}
    out = {"available": True, "split": metrics.get("split"), "level": metrics.get("level"),
           "data_source": metrics.get("source"), "num_cases": metrics.get("num_cases"),
           "num_images": metrics.get("num_images"), "n_boot": metrics.get("n_boot"),
           "seed": metrics.get("seed"), "metrics_file": name,
           "metrics": {k: metrics[k] for k in METRIC_KEYS if k in metrics}}
    for key in EVALUATION_BLOCKS:
        if metrics.get(key) is not None:
            out[key] = metrics[key]
    evaluated = metrics.get("checkpoint")
    if evaluated:
        out["evaluated_checkpoint"] = dict(zip(("which", "step"),
                                               rundir.checkpoint_origin(evaluated)))
        out["checkpoint_matches_export"] = out["evaluated_checkpoint"] == exported_checkpoint
    if metrics.get("temperature"):
        t = metrics["temperature"]
        out["temperature_evaluated"] = {"temperature": t.get("temperature"),
                                        "checkpoint": t.get("checkpoint")}
    out["served_probabilities"] = ("calibrated (calibration_after, calibrated_metrics)"
                                   if temperature_applied else
                                   "uncalibrated (metrics, calibration)")
    return out


def calibration_section(task, calibration):
    if calibration is None:
        return {"temperature_scaling": False,
                "served": ("softmax of the logits" if task == "multiclass"
                           else "per-label sigmoid of the logits") + " (no temperature scaling)"}
    fitted = calibration.get("fitted_on") or {}
    return {"temperature_scaling": True, "temperature": calibration.get("temperature"),
            "per_class": calibration.get("per_class"), "formula": calibration.get("formula"),
            "fitted_on": {k: fitted.get(k) for k in ("split", "level", "num_cases",
                                                     "num_images")},
            "validation_nll_before": calibration.get("nll_before"),
            "validation_nll_after": calibration.get("nll_after"),
            "validation_before": calibration.get("validation_before"),
            "validation_after": calibration.get("validation_after"),
            "at_bound": calibration.get("at_bound"),
            "checkpoint": calibration.get("checkpoint")}


# ------------------------------------------------------------------------- limitations
def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def default_limitations(card):
    """Data-aware limitations: what the run's own numbers say about it."""
    out = ["A research model: not a medical device and not clinically validated."]
    model, data, ev = card["model"], card["training_data"], card["evaluation"]
    cal = card["calibration"]
    size = model["input"]["image_size"]
    source = data.get("source") or ev.get("data_source")
    if source == "ph2":
        out.append("PH² patches are 32 x 32 px crops of a dermoscopy image, while the label "
                   "(the lesion's asymmetry grade) describes the whole lesion: it is only "
                   "weakly visible in one patch. Case-level figures average a lesion's patches.")
    elif size is not None and size <= 64:
        out.append(f"Inputs are resized to {size} x {size} px: fine image detail is lost.")
    if ev.get("available"):
        n = ev.get("num_cases")
        auc = ev["metrics"].get("auc_macro")
        lo, hi = (ev["metrics"].get("ci95") or {}).get("auc_macro") or (None, None)
        if n is not None and n < 200:
            text = f"The {ev.get('split')} set is small ({n} cases)"
            if lo is not None and hi is not None:
                text += (f": the 95% CI of the macro AUC ({_f(auc)}) spans {_f(lo)}-{_f(hi)}, "
                         f"{hi - lo:.2f} wide")
            out.append(text + ". Differences smaller than the CIs are not evidence.")
        if ev.get("checkpoint_matches_export") is False:
            out.append("The evaluation reported here is of another checkpoint than the "
                       "exported one: evaluate again before relying on it.")
        if cal["temperature_scaling"] and not ev.get("calibration_after"):
            out.append("The temperature was fitted after the evaluation: the test calibration "
                       "shown is of the uncalibrated probabilities (run micle-evaluate again).")
        elif cal["temperature_scaling"] and (ev.get("temperature_evaluated") or {}).get(
                "temperature") != cal["temperature"]:
            out.append("The evaluation's after-scaling figures are of another temperature than "
                       "the served one (run micle-evaluate again).")
        ece = (ev.get("calibration") or {}).get("ece")
        if not cal["temperature_scaling"] and ece is not None:
            out.append(f"Probabilities are not temperature-scaled (test ECE {_f(ece)}): treat "
                       "them as scores, not as calibrated risks.")
    else:
        out.append("No test evaluation was found at export time: the card has no performance "
                   "figures (run micle-evaluate, then export again).")
    if cal["temperature_scaling"]:
        n = (cal.get("fitted_on") or {}).get("num_cases")
        if n is not None and n < 100:
            out.append(f"The temperature was fitted on {n} validation cases: it is itself "
                       "uncertain.")
        at_bound = cal.get("at_bound")
        if at_bound is True or (isinstance(at_bound, list) and any(at_bound)):
            out.append("The fitted temperature lies at a bound of its search range: the "
                       "validation predictions gave it little to fit on (a model near chance "
                       "is best served nearly uniform probabilities).")
    ft = model.get("fine_tuning") or {}
    if ft.get("num_labelled_cases") is not None and ft["num_labelled_cases"] < 500:
        out.append(f"Fine-tuned on {ft['num_labelled_cases']} labelled cases "
                   f"(label fraction {ft.get('label_fraction'):g}).")
    attrs = data.get("case_attributes")
    if ev.get("subgroups"):
        sub = ev["subgroups"]
        for name, a in sub["attributes"].items():
            gap = (a.get("gap") or {}).get("auc_macro")
            worst = (a.get("worst") or {}).get("auc_macro")
            if gap is not None and worst is not None:
                out.append(f"Subgroups by {name}: macro AUC differs by up to {_f(gap)} between "
                           f"groups (lowest: {worst['group']}, {_f(worst['value'])}); "
                           f"{a.get('num_suppressed', 0)} group(s) under "
                           f"{sub['min_group_size']} cases not reported.")
    elif attrs is not None and not any(by_name for by_name in attrs.values()):
        out.append("The training records carry no patient attributes (sex, age band, view, "
                   "...): performance across patient subgroups was not assessed.")
    else:
        out.append("Subgroup performance was not evaluated (micle-evaluate --subgroups=...).")
    out.append(f"Trained and evaluated on one source ({source or 'not recorded'}): "
               "performance on other sites, devices and populations is unknown (micle-evaluate "
               "--shift_data_dir measures a shift).")
    if model.get("task") == "multilabel":
        out.append(f"Uncertain labels were handled by the policy "
                   f"'{ft.get('uncertainty_policy')}' during fine-tuning.")
    return out


# ------------------------------------------------------------------------------- card
def build_model_card(model_dir, cfg, facts, checkpoint, export_info, calibration=None,
                     intended_use=None, out_of_scope_use=None, limitations=None,
                     metrics_file=None, min_group_size=DEFAULT_MIN_GROUP_SIZE):
    """The card (a JSON-clean dict). `checkpoint`: {"which", "step"} of the exported weights;
    `export_info`: micle_export.json's dict; `calibration`: the applied calibration.json or
    None; `intended_use` (text), `out_of_scope_use` (list of texts) replace the defaults;
    `limitations` (list of texts) are added to the data-aware defaults."""
    task = facts["task"]
    label_names = list(facts["label_names"])
    info = _training_info(facts)
    summary = _read_json(os.path.join(model_dir, rundir.FINETUNE_SUMMARY_FILE)) or {}
    m = cfg.model
    init = describe_init(cfg.init_from)
    best = summary.get("best") or {}
    fine_tuning = {
        "label_fraction": cfg.label_fraction,
        "num_labelled_cases": summary.get("num_labelled_cases"),
        "num_labelled_images": summary.get("num_labelled_images"),
        "steps": summary.get("final_step"), "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer, "learning_rate": cfg.learning_rate,
        "learning_rate_scaling": cfg.learning_rate_scaling, "weight_decay": cfg.weight_decay,
        "augment": cfg.augment, "seed": cfg.seed,
        "linear_evaluation": cfg.fine_tune_after_block >= 4,
        "fine_tune_after_block": cfg.fine_tune_after_block,
        "ft_proj_selector": cfg.ft_proj_selector,
        "selection": {"metric": best.get("metric"), "value": best.get("value"),
                      "epoch": best.get("epoch"), "step": best.get("step")},
    }
    if task == "multilabel":
        fine_tuning["uncertainty_policy"] = cfg.uncertainty_policy
    depth = m.backbone.replace("resnet", "ResNet-")
    card = {
        "model_card_version": MODEL_CARD_VERSION,
        "title": f"micle-tf {task} classifier: {depth} x{m.width_multiplier:g}, "
                 f"{m.image_size} px, {init['description'].split(' (')[0]}",
        "model": {
            "task": task, "label_names": label_names, "num_classes": len(label_names),
            "architecture": {"backbone": m.backbone, "width_multiplier": m.width_multiplier,
                             "sk_ratio": m.sk_ratio, "proj_out_dim": m.proj_out_dim,
                             "num_proj_layers": m.num_proj_layers,
                             "embedding_dim": export_info.get("embedding_dim")},
            "input": {"image_size": m.image_size, "channels": 3,
                      "preprocessing": export_info.get("preprocessing")},
            "output": export_info.get("output"),
            "init": init,
            "fine_tuning": fine_tuning,
            "checkpoint": dict(checkpoint),
        },
        "training_data": training_data_section(facts, info, cfg.train_split, min_group_size),
    }
    metrics, name = find_metrics(model_dir, metrics_file)
    card["evaluation"] = evaluation_section(metrics, name, dict(checkpoint),
                                            calibration is not None)
    card["calibration"] = calibration_section(task, calibration)
    card["intended_use"] = intended_use.strip() if intended_use else DEFAULT_INTENDED_USE
    card["out_of_scope_use"] = list(out_of_scope_use or DEFAULT_OUT_OF_SCOPE)
    card["limitations"] = default_limitations(card) + [t for t in (limitations or []) if t]
    source = card["training_data"]["source"] or card["evaluation"].get("data_source")
    citation = {"method": [PAPER, SIMCLR], "data": (info or {}).get("citation") or
                (f"cite the data source ({source}) as its terms ask" if source else
                 "the data source was not recorded: cite it as its terms ask"),
                "model_card": MODEL_CARDS, "software": f"micle-tf {__version__}"}
    if calibration is not None:
        citation["method"].append(TEMPERATURE_SCALING)
    card["citation"] = citation
    card["privacy"] = PRIVACY
    card["versions"] = dict(export_info.get("versions") or rundir.versions())
    return rundir.clean(card)


def check_no_paths(card_text, paths=()):
    """ValueError when `card_text` holds one of `paths` (as given or absolute) or something
    that looks like an absolute file path: exported models carry no file paths."""
    for p in paths:
        if not p:
            continue
        p = str(p).rstrip("/\\") or str(p)
        forms = {os.path.abspath(p), os.path.realpath(p)}
        if "/" in p or "\\" in p:  # a bare name ("ph2") may well be a data source's name
            forms.add(p)
        for form in forms:
            if len(form) > 1 and form in card_text:
                raise ValueError(f"refusing to export: the model card would contain the path "
                                 f"{form!r} (exported models carry no file paths; edit the "
                                 "text you passed, or report a bug)")
    match = _ABS_PATH.search(card_text)
    if match:
        raise ValueError(f"refusing to export: the model card would contain what looks like a "
                         f"file path ({match.group(0).strip()!r}); exported models carry no "
                         "file paths")


# ---------------------------------------------------------------------------- Markdown
def _cell(x, digits=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(ci):
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _metric_rows(metrics, ci):
    rows = []
    for key, label in (("top1", "Top-1 accuracy"), ("top3", "Top-3 accuracy"),
                       ("auc_macro", "Macro AUC")):
        if metrics.get(key) is not None:
            rows.append(f"| {label} | {_cell(metrics[key])} | {_ci(ci.get(key))} |")
    for name, v in (metrics.get("auc_per_class") or {}).items():
        rows.append(f"| AUC {name} | {_cell(v)} | {_ci(ci.get(f'auc/{name}'))} |")
    return rows


def _calibration_rows(before, after=None):
    labels = {"ece": "ECE (equal-width bins)", "ece_equal_mass": "ECE (equal-mass bins)",
              "brier": "Brier score", "nll": "NLL"}
    rows = []
    for key, label in labels.items():
        row = f"| {label} | {_cell(before.get(key))} | {_ci(before['ci95'].get(key))} |"
        if after is not None:
            row += f" {_cell(after.get(key))} | {_ci(after['ci95'].get(key))} |"
        rows.append(row)
    return rows


def render_markdown(card):
    """model_card.md: the card's JSON as a document."""
    m, data, ev, cal = card["model"], card["training_data"], card["evaluation"], card["calibration"]
    arch, ft, init = m["architecture"], m["fine_tuning"], m["init"]
    lines = [f"# Model card: {card['title']}", "",
             "Machine-readable twin: `model_card.json` (also returned by the SavedModel's "
             "`get_model_card` signature).", "",
             "## Intended use", "", card["intended_use"], "", "## Out-of-scope use", ""]
    lines += [f"- {t}" for t in card["out_of_scope_use"]]
    lines += ["", "## Model", "",
              "| Item | Value |", "|---|---|",
              f"| Task | {m['task']} ({m['num_classes']} classes: "
              f"{', '.join(m['label_names'])}) |",
              f"| Backbone | {arch['backbone']} x{arch['width_multiplier']:g} "
              f"(selective kernels {arch['sk_ratio']:g}), embedding {arch['embedding_dim']} |",
              f"| Input | RGB, resized to {m['input']['image_size']} x "
              f"{m['input']['image_size']} px inside the model |",
              f"| Output | {m['output']} |",
              f"| Initialisation | {init['description']} |"]
    if init.get("method"):
        pd = init.get("pretraining_data") or {}
        lines.append(f"| Pretraining | {init['method']}, {_cell(init.get('steps'))} steps at "
                     f"batch {init.get('batch_size')}, {init.get('image_size')} px, "
                     f"temperature {init.get('temperature')}, on "
                     + (f"TFDS {pd['tfds_name']}" if pd.get("tfds_name") else
                        f"{pd.get('source')} ({pd.get('split')}: {_cell(pd.get('num_cases'))} "
                        f"cases, {_cell(pd.get('num_images'))} images)")
                     + f"; started from {init.get('started_from')} |")
    sel = ft["selection"]
    selected = ("" if sel.get("metric") is None else
                f"; selected by {sel['metric']} = {_cell(sel.get('value'))}")
    layers = "linear evaluation (frozen encoder)" if ft["linear_evaluation"] else "all layers"
    lines += [f"| Fine-tuning | {layers}, {_cell(ft['num_labelled_cases'])} labelled cases "
              f"(label fraction {ft['label_fraction']:g}), {_cell(ft['steps'])} steps at batch "
              f"{ft['batch_size']}, {ft['optimizer']} lr {ft['learning_rate']:g} |",
              f"| Checkpoint | {m['checkpoint'].get('which')} (step "
              f"{_cell(m['checkpoint'].get('step'))}){selected} |", ""]
    lines += ["## Training data", "",
              f"Source: {data.get('source') or 'not recorded'}; "
              f"{_cell(data.get('num_cases'))} cases, {_cell(data.get('num_images'))} images; "
              f"trained on split `{data.get('trained_on_split')}`."]
    if data["splits"]:
        lines += ["", "| Split | Cases | Images |", "|---|---|---|"]
        lines += [f"| {k} | {_cell(v['cases'])} | {_cell(v['images'])} |"
                  for k, v in data["splits"].items()]
    if data.get("duplicates"):
        d = data["duplicates"]
        lines += ["", f"Duplicates policy: `{d.get('policy')}`; "
                  + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in d.items()
                              if k != "policy")
                  + f". Rejected items: {_cell(data.get('num_rejected'))}."]
    if data.get("note"):
        lines += ["", data["note"]]
    attrs = {s: a for s, a in (data.get("case_attributes") or {}).items() if a}
    if attrs:
        lines += ["", f"Case attributes (cases per token; fewer than "
                  f"{data['min_group_size']} shown as \"n < {data['min_group_size']}\"):", ""]
        for split, by_name in attrs.items():
            for name, table in by_name.items():
                lines.append(f"- {split}, {name}: "
                             + ", ".join(f"{t} {n}" for t, n in table.items()))
    elif data.get("case_attributes") is not None:
        lines += ["", "The records carry no case attributes (sex, age band, view, ...)."]
    lines += ["", "## Evaluation", ""]
    if not ev.get("available"):
        lines += [ev["note"] + ".", ""]
    else:
        lines += [f"Split `{ev['split']}` ({ev['data_source']}), {ev['level']} level: "
                  f"{ev['num_cases']} cases, {ev['num_images']} images; 95% CIs from "
                  f"{ev['n_boot']} case-bootstrap resamples. Served probabilities: "
                  f"{ev['served_probabilities']}.", "",
                  "| Metric | Value | 95% CI |", "|---|---|---|"]
        lines += _metric_rows(ev["metrics"], ev["metrics"].get("ci95") or {})
        if ev.get("calibration"):
            after = ev.get("calibration_after")
            lines += ["", "### Calibration", "",
                      "| Metric | Uncalibrated | 95% CI |" + (" After temperature scaling | "
                                                              "95% CI |" if after else ""),
                      "|---|---|---|" + ("---|---|" if after else "")]
            lines += _calibration_rows(ev["calibration"], after)
            if ev.get("calibrated_metrics"):
                cm = ev["calibrated_metrics"]
                lines += ["", "Calibrated probabilities: "
                          + ", ".join(f"{k} {_cell(cm.get(k))} {_ci((cm.get('ci95') or {}).get(k))}"
                                      for k in ("top1", "auc_macro") if cm.get(k) is not None)
                          + f". {cm.get('note', '')}"]
        for key, heading in (("subgroups", "Subgroups"),
                             ("subgroups_after", "Subgroups after temperature scaling")):
            sub = ev.get(key)
            if not sub:
                continue
            mets = sub["metrics"]
            lines += ["", f"### {heading}", "",
                      f"Groups with fewer than {sub['min_group_size']} cases are suppressed "
                      f"(\"n < {sub['min_group_size']}\"); when one is, the next smallest "
                      f"group's size is withheld.", ""]
            for name, a in sub["attributes"].items():
                lines += [f"**{name}**", "", "| Group | Cases | " + " | ".join(mets) + " |",
                          "|---|---|" + "---|" * len(mets)]
                for value, g in a["groups"].items():
                    cells = (["—"] * len(mets) if g.get("suppressed") else
                             [f"{_cell(g.get(k))} {_ci((g.get('ci95') or {}).get(k))}"
                              for k in mets])
                    lines.append(f"| {value} | {g['n_cases']} | " + " | ".join(cells) + " |")
                lines.append("| worst group | | " + " | ".join(
                    "—" if a["worst"].get(k) is None else
                    f"{a['worst'][k]['group']} ({_cell(a['worst'][k]['value'])})"
                    for k in mets) + " |")
                lines.append("| largest gap | | " + " | ".join(_cell(a["gap"].get(k))
                                                              for k in mets) + " |")
                lines.append("")
    if lines[-1] != "":
        lines.append("")
    lines += ["## Calibration of the served probabilities", ""]
    if cal["temperature_scaling"]:
        t = cal["temperature"]
        shown = ", ".join(f"{v:.3f}" for v in t) if isinstance(t, list) else f"{t:.3f}"
        fit = cal["fitted_on"]
        lines += [f"Temperature scaling, {cal['formula']}, T = {shown}; fitted on the "
                  f"`{fit['split']}` split ({fit['num_cases']} cases, {fit['num_images']} "
                  f"images, {fit['level']} level): validation NLL "
                  f"{_cell(cal['validation_nll_before'], 4)} -> "
                  f"{_cell(cal['validation_nll_after'], 4)}.", ""]
    else:
        lines += [f"Not temperature-scaled: {cal['served']}.", ""]
    lines += ["## Limitations", ""] + [f"- {t}" for t in card["limitations"]]
    c = card["citation"]
    lines += ["", "## Citation", ""] + [f"- {t}" for t in c["method"]]
    lines += [f"- Data: {c['data']}", f"- {c['model_card']}", f"- Software: {c['software']}",
              "", "## Privacy", "", card["privacy"], "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()), ""]
    return "\n".join(lines)


def write_card_files(card, folder):
    """model_card.json and model_card.md in `folder`; returns (json path, md path, json text)."""
    text = json.dumps(card, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    jpath, mpath = os.path.join(folder, CARD_JSON), os.path.join(folder, CARD_MD)
    with open(jpath, "w", encoding="utf-8") as f:
        f.write(text)
    with open(mpath, "w", encoding="utf-8") as f:
        f.write(render_markdown(card))
    return jpath, mpath, text

"""report.md of micle-demo: what was run, what was measured, and what the CIs support."""
import json
import os
import platform

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data_pipelines.writer import read_info
from micle_tf import augment, rundir
from micle_tf.evaluation import encoder_retrieval

matplotlib.rcParams.setdefault("font.size", 9)


def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(ci):
    if not ci or ci[0] is None:
        return "n/a"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _recipe(s):
    r = augment.preset_settings(s.augment, s.image_size, s.color_jitter_strength,
                                s.crop_area_min)
    parts = [f"crop area {r['crop_area_range'][0]:g}–{r['crop_area_range'][1]:g}", "flip"]
    if r["jitter_p"]:
        parts.append(f"colour jitter strength {r['color_jitter_strength']:g} "
                     f"(p {r['jitter_p']:g})")
    if r["gray_p"]:
        parts.append(f"grayscale p {r['gray_p']:g}")
    if r["blur_p"]:
        parts.append(f"blur p {r['blur_p']:g}, sigma {r['blur_sigma_range'][0]:.2g}–"
                     f"{r['blur_sigma_range'][1]:.2g}, kernel {r['blur_kernel_size']}")
    return ", ".join(parts)


def _retrieval_claims(result):
    """One sentence per paired difference, saying only what its CI supports."""
    out = []
    for p in result["paired"]:
        d, (lo, hi) = p["top1"]["difference"], p["top1"]["ci95"]
        if lo > 0:
            out.append(f"{p['a']} retrieves a same-lesion patch more often than {p['b']} "
                       f"(top-1 {d:+.3f}, 95% CI [{lo:.3f}, {hi:.3f}] above 0).")
        elif hi < 0:
            out.append(f"{p['b']} retrieves a same-lesion patch more often than {p['a']} "
                       f"(top-1 {p['a']} − {p['b']} {d:+.3f}, 95% CI [{lo:.3f}, {hi:.3f}] "
                       "below 0).")
        else:
            out.append(f"{p['a']} and {p['b']} are not distinguishable on top-1 retrieval "
                       f"({d:+.3f}, 95% CI [{lo:.3f}, {hi:.3f}] contains 0).")
    return " ".join(out) + (" One seed, one split: these CIs cover the choice of test "
                            "lesions, not run-to-run variation of pretraining.")


def plot_pretraining_curves(pretrained, path):
    fig = Figure(figsize=(7, 2.6))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for method, (_, summary) in pretrained.items():
        hist = summary.get("history", {})
        if hist.get("contrastive_loss"):
            ax1.plot(range(1, len(hist["contrastive_loss"]) + 1), hist["contrastive_loss"],
                     marker="o", label=method)
        knn = summary.get("knn_monitor") or []
        if knn:
            ax2.plot([k["epoch"] for k in knn], [k.get("same_case_top1") for k in knn],
                     marker="o", label=method)
    ax1.set(xlabel="epoch", ylabel="NT-Xent loss (train)", title="pretraining loss")
    ax2.set(xlabel="epoch", ylabel="top-1 same-lesion retrieval (val)",
            title="label-free monitor")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _calibration_lines(workdir, best):
    """Temperature scaling of the exported run and its test calibration before/after, with a
    link to its reliability diagram."""
    metrics = rundir.read_json(os.path.join(best["model_dir"], "metrics_test.json"))
    if not metrics or not metrics.get("calibration"):
        return []
    before, after = metrics["calibration"], metrics.get("calibration_after")
    rel = os.path.relpath(os.path.join(best["model_dir"],
                                       (metrics.get("plots") or {}).get(
                                           "Reliability diagram", "reliability_test.png")),
                          workdir).replace(os.sep, "/")
    out = []
    if after and metrics.get("temperature"):
        t = metrics["temperature"]
        out.append(f"- Calibration: temperature scaling fitted on the {t['fitted_on']['split']} "
                   f"lesions' patches, T = {t['temperature']:.3f} (validation NLL "
                   f"{t['nll_before']:.3f} → {t['nll_after']:.3f}); on the test lesions ECE "
                   f"{before['ece']:.3f} {_ci(before['ci95'].get('ece'))} → {after['ece']:.3f} "
                   f"{_ci(after['ci95'].get('ece'))}, Brier {before['brier']:.3f} → "
                   f"{after['brier']:.3f}. The export serves the scaled probabilities.")
    else:
        out.append(f"- Calibration (test lesions): ECE {before['ece']:.3f} "
                   f"{_ci(before['ci95'].get('ece'))}, Brier {before['brier']:.3f}.")
    out += [f"- Reliability diagram of the exported run ([{rel}]({rel})):", "",
            f"![reliability]({rel})"]
    return out


def _verdict(significant, diff):
    return ("**A better**" if significant and diff > 0 else
            "**B better**" if significant else "not distinguishable")


def _chance_note(n):
    return (f"The CIs are not corrected for multiple comparisons: with {n} comparisons about "
            f"{0.05 * n:.1f} would exclude 0 by chance alone.")


def _seed_averaged_lines(averaged, s):
    """Mean test AUC over seeds per init and fraction, and the seed-averaged paired
    differences, each with its case-bootstrap CI and the per-seed values."""
    names = {"none": "scratch"}
    inits = sorted({r["init"] for r in averaged["auc"]}, key=lambda i: (i != "none", i))
    by = {(r["init"], r["label_fraction"]): r for r in averaged["auc"]}
    seeds = ", ".join(map(str, s.seeds))
    lines = [f"### Averaged over seeds {seeds}", "",
             "Test AUC of each init averaged over its seeds; the 95% CI resamples test lesions "
             "(one resample applied to every seed's run), so it covers the choice of test "
             "lesions for the seed average. The seeds themselves are not resampled: the "
             "per-seed range shows how far one seed moves the value.", "",
             "| label fraction | " + " | ".join(names.get(i, i) for i in inits) + " |",
             "|---|" + "---|" * len(inits)]
    for fraction in sorted({r["label_fraction"] for r in averaged["auc"]}):
        cells = []
        for init in inits:
            r = by.get((init, fraction))
            vals = [v for v in (r or {}).get("per_seed", []) if v is not None]
            cells.append("—" if r is None else
                         f"{_f(r['value'])} {_ci(r['ci95'])} (seeds {_f(min(vals))}–"
                         f"{_f(max(vals))})" if vals else f"{_f(r['value'])}")
        lines.append(f"| {fraction:g} | " + " | ".join(cells) + " |")
    lines += ["", "| fraction | A − B | mean difference over seeds [95% CI] | per seed | "
              "verdict |", "|---|---|---|---|---|"]
    for d in averaged["differences"]:
        per_seed = ", ".join(_f(v) for v in d["per_seed"])
        lines.append(f"| {d['label_fraction']:g} | {names.get(d['a'], d['a'])} − "
                     f"{names.get(d['b'], d['b'])} | {_f(d['value'])} {_ci(d['ci95'])} | "
                     f"{per_seed} | {_verdict(d['significant'], d['value'] or 0.0)} |")
    n_sig = sum(1 for d in averaged["differences"] if d["significant"])
    n = len(averaged["differences"])
    lines += ["", f"{n_sig} of {n} seed-averaged differences have a CI that excludes 0. "
              + _chance_note(n), ""]
    return lines


def _per_seed_comparison_lines(comparisons, num_seeds):
    lines = ["### Each seed", "",
             "Paired bootstrap over the same test lesions (AUC of A minus AUC of B)"
             + (", one run of A and one of B with the same seed." if num_seeds > 1 else "."),
             "", "| fraction | seed | A − B | difference [95% CI] | verdict |",
             "|---|---|---|---|---|"]
    if num_seeds <= 1:
        lines = lines[2:]
    for c in comparisons:
        lines.append(f"| {c['label_fraction']:g} | {c.get('seed', '')} | {c['a']} − {c['b']} | "
                     f"{_f(c['diff'])} {_ci(c['ci95'])} | "
                     f"{_verdict(c['significant'], c['diff'] or 0.0)} |")
    n_sig = sum(1 for c in comparisons if c["significant"])
    lines += ["", f"{n_sig} of {len(comparisons)} comparisons have a CI that excludes 0"
              + ("; the rest are within noise on this data." if n_sig < len(comparisons)
                 else ".") + " " + _chance_note(len(comparisons))
              + (" One seed per setting says nothing about run-to-run variation (add seeds "
                 "with --seeds, or run micle-demo --reproduce)." if num_seeds <= 1 else ""),
              ""]
    return lines


def write_demo_report(workdir, s, records, pretrained, sweep, comparisons, retrieval, best,
                      best_val_auc, exported, check, timings, seed_averaged=None):
    info = read_info(records)
    plot_pretraining_curves(pretrained, os.path.join(workdir, "pretraining.png"))
    lines = ["# micle-demo report", ""]
    lines += [
        "SimCLR vs MICLe vs supervised-from-scratch on the embedded PH² dermoscopy patches "
        f"({info['num_cases']} lesions, {info['num_images']} patches of 32 px; label = "
        "asymmetry grade, 3 classes). Splits are by lesion "
        + ", ".join(f"{k}: {v['cases']} lesions" for k, v in info["splits"].items()) + ".",
        "",
        "**Read this first.** PH² is small and its asymmetry grade is a property of the whole "
        "lesion, hard to see in a 32 px patch. Test metrics below are over "
        f"{info['splits']['test']['cases']} test lesions: confidence intervals are wide, and "
        "only differences whose paired 95% CI excludes 0 are called differences.",
        "",
        "## Settings", "",
        f"- backbone {s.backbone}, width x{s.width_multiplier}, {s.image_size} px; pretraining "
        f"{s.pretrain_steps} steps at batch {s.pretrain_batch_size} (LARS, lr "
        f"{s.pretrain_learning_rate}·B/256, temperature {s.temperature}); fine-tuning "
        f"{s.finetune_steps} steps at batch {s.finetune_batch_size}; label fractions "
        f"{', '.join(str(f) for f in s.fractions)}; seeds {', '.join(map(str, s.seeds))}; "
        f"{s.n_boot} bootstrap resamples of test lesions.",
        "- Both SimCLR and MICLe start from the same encoder: "
        + (s.init_checkpoint or "one seeded random initialisation (no ImageNet SimCLR "
           "checkpoint is available offline; pass one with --init_checkpoint)") + ".",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}; wall time per stage: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".",
        f"- Pretraining augmentation ({s.augment} preset resolved for {s.image_size} px): "
        + _recipe(s) + ".",
        "",
        "## Pretraining: is the contrastive task learned?", "",
        "Contrastive accuracy is the NT-Xent top-1 over the 2B − 1 candidates of a batch of B "
        "pairs (chance 1/(2B − 1)); the loss sums both directions, so all-equal logits give "
        "2·ln(2B − 1). Alignment (lower: the two views of a pair closer) and uniformity "
        "(lower: projections spread over the sphere) are Wang & Isola's (2020). Final epoch.",
        "",
        "| method | steps | contrastive acc. | chance | × chance | NT-Xent loss | uniform-logit "
        "loss | alignment | uniformity | learning? | images/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, (_, summary) in pretrained.items():
        h = summary.get("learning_health") or {}
        lines.append(
            f"| {method} | {summary.get('final_step')} | "
            f"{_f(h.get('final_contrastive_accuracy'))} | {_f(h.get('chance_contrastive_accuracy'), 4)}"
            f" | {_f(h.get('accuracy_over_chance'), 1)} | {_f(h.get('final_loss'))} | "
            f"{_f(h.get('uniform_loss'))} | {_f(h.get('final_alignment'))} | "
            f"{_f(h.get('final_uniformity'))} | "
            f"{ {True: 'yes', False: '**no**', None: 'n/a'}[h.get('learning')]} | "
            f"{_f(summary.get('images_per_second'), 1)} |")
    warnings = [(m, (summ.get("learning_health") or {}).get("warning"))
                for m, (_, summ) in pretrained.items()]
    lines += [f"- **{m}: {w}**" for m, w in warnings if w]
    lines += ["", "![pretraining](pretraining.png)", "",
              "## Same-lesion retrieval on held-out lesions (label-free)", "",
              "For each test patch, is its nearest other test patch (cosine, encoder features) "
              "from the same lesion (top-1), and how high are its lesion's other patches ranked "
              "(mAP)? Test lesions were never seen in pretraining or fine-tuning, and no two "
              "test patches have the same pixels (checked). 95% CIs resample lesions; the "
              "differences are paired (same patches, same resamples).", ""]
    lines += encoder_retrieval.markdown_tables(retrieval)
    lines += ["", _retrieval_claims(retrieval), ""]
    lines += ["", "## Fine-tuning: test AUC (macro, one-vs-rest) and top-1, case level", "",
              "| label fraction | init | seed | labelled lesions | AUC [95% CI] | top-1 [95% CI] |",
              "|---|---|---|---|---|---|"]
    for row in sorted(sweep["rows"], key=lambda r: (r["label_fraction"], r["init"], r["seed"])):
        ci = row.get("ci95") or {}
        lines.append(f"| {row['label_fraction']:g} | {row['init']} | {row['seed']} | "
                     f"{row.get('num_labelled_cases')} | {_f(row.get('auc_macro'))} "
                     f"{_ci(ci.get('auc_macro'))} | {_f(row.get('top1'))} {_ci(ci.get('top1'))} |")
    lines += ["", f"![label efficiency](sweep/{sweep.get('plot', 'label_efficiency.png')})", "",
              "## Are the differences larger than their confidence intervals?", ""]
    if seed_averaged:
        lines += _seed_averaged_lines(seed_averaged, s)
    lines += _per_seed_comparison_lines(comparisons, len(s.seeds))
    lines += ["## Exported model", "",
              f"- Chosen by validation AUC ({_f(best_val_auc)}): `{best['init']}` at label "
              f"fraction {best['label_fraction']:g}, seed {best['seed']}.",
              f"- SavedModel: `export/` (signatures `serving_default` on PNG/JPEG bytes, "
              f"`serve_pixels` on float pixels, `get_model_card`).",
              "- Model card: [export/assets/model_card.md](export/assets/model_card.md) (model, "
              "initialisation, data, test metrics with CIs, calibration, intended use, "
              "limitations; the same as JSON from the `get_model_card` signature).",
              f"- Checked in a fresh process importing only TensorFlow on a test patch's PNG "
              f"bytes: probabilities {[round(p, 4) for p in check['probabilities']]} "
              f"(sum {check['sum']:.4f}), label names {check.get('label_names')}"
              + (f"; model card \"{check['model_card_title']}\"" if check.get("model_card_title")
                 else "") + "."]
    lines += _calibration_lines(workdir, best) + [""]
    lines += ["## Files", "",
              "`records/` (TFRecords + dataset_info.json), `start_encoder/`, `pretrain_simclr/`, "
              "`pretrain_micle/`, `sweep/` (one fine-tuning run per init/fraction/seed with "
              "metrics_test.json, report_test.md and plots; sweep.json, sweep.md), `export/`, "
              "`demo_results.json`.", ""]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    results = {"settings": {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in vars(s).items()},
               "pretraining": {m: {k: v for k, v in summ.items() if k != "history"}
                               for m, (_, summ) in pretrained.items()},
               "retrieval": retrieval, "sweep_rows": sweep["rows"],
               "comparisons": comparisons, "seed_averaged": seed_averaged,
               "exported": {"init": best["init"], "label_fraction": best["label_fraction"],
                            "val_auc": best_val_auc},
               "fresh_process_check": check, "timings": timings}
    with open(os.path.join(workdir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    return path

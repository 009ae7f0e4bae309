"""Label-free evaluation of pretrained encoders: same-case retrieval among held-out cases.

`evaluate_retrieval({name: encoder_dir}, data_dir, split)` embeds every image of `split` with
each encoder (inference BN, the deterministic evaluation resize, no augmentation), scores
same-case retrieval (`retrieval.same_case_retrieval_report`: top-1 and mAP, chance levels,
case-bootstrap 95% CIs) and the paired differences between encoders on the same images
(`retrieval.paired_retrieval_difference`), and writes `retrieval_{split}.json` and
`retrieval_{split}.md`.

What it refuses, before embedding anything:
- a split holding two images with the same decoded pixels (`image/pixel_sha256`): a copy is its
  own nearest neighbour for any encoder, so the score would measure the copies, not the
  encoder (see `retrieval`);
- a split sharing a case, or an image's pixels, with the split an encoder was pretrained on:
  retrieval must be among cases the encoder never saw.

An encoder directory is a `micle-pretrain` model_dir (its `pretrain_config.json` gives the
architecture), a micle-finetune model_dir, micle-demo's starting encoder, or any checkpoint
directory/prefix with an explicit `model_cfg` (see `micle_tf.rundir.load_encoder`).
"""
import json
import os

import keras
import numpy as np
from absl import logging

from data_pipelines import reader, splits
from data_pipelines.writer import read_info, write_json_atomic
from micle_tf import inference, rundir
from micle_tf.evaluation import retrieval


def encoder_config(path):
    """(ModelConfig, its run's config or None) of an encoder directory (`rundir.architecture`:
    a pretraining or fine-tuning model_dir, or micle-demo's starting encoder)."""
    found = rundir.architecture(path)
    if found is None:
        raise FileNotFoundError(f"{os.path.join(path, rundir.PRETRAIN_CONFIG_FILE)} not found: "
                                f"is {path} a micle-pretrain model_dir?")
    return found


def embed_split(path, data_dir, split, model_cfg=None, batch_size=256, info=None):
    """Encoder features of every image of `split`: (embeddings [N, D], case ids [N])."""
    model_cfg = model_cfg or encoder_config(path)[0]
    keras.utils.clear_session()
    encoder = rundir.load_encoder(path, model_cfg)
    return inference.embed_split(encoder, data_dir, split, model_cfg.image_size, batch_size,
                                 info=info)


def check_split_for_retrieval(data_dir, split, encoders, info=None):
    """Raises ValueError when `split` holds duplicate pixels, or shares a case or an image with
    an encoder's pretraining split (see the module docstring)."""
    info = info or read_info(data_dir)
    hashes = reader.read_pixel_hashes(data_dir, split, info=info)
    if None in hashes:
        logging.warning("split %r of %s has images without pixel hashes (older records): "
                        "exact duplicates cannot be ruled out; rewrite it with micle-data",
                        split, data_dir)
    repeated = {h: n for h, n in hashes.items() if h is not None and n > 1}
    if repeated:
        raise ValueError(f"refusing to score retrieval: split {split!r} of {data_dir} holds "
                         f"{sum(repeated.values())} images with {len(repeated)} repeated pixel "
                         "contents; a copy is its own nearest neighbour for any encoder. "
                         "Rewrite the records with micle-data --duplicates=reject")
    eval_ids = [c for c, _, _ in reader.read_case_index(data_dir, split, info=info)]
    for name, path in encoders.items():
        _, pre = encoder_config(path)
        if pre is None or not pre.data_dir:
            continue
        pre_dir, pre_split = pre.data_dir, pre.train_split
        try:
            trained = [c for c, _, _ in reader.read_case_index(pre_dir, pre_split)]
            trained_hashes = reader.read_pixel_hashes(pre_dir, pre_split)
        except (FileNotFoundError, ValueError) as e:
            logging.warning("cannot read the pretraining split of %s (%s): its leakage check "
                            "is skipped", name, e)
            continue
        try:
            splits.check_disjoint({f"evaluated split {split!r}": eval_ids,
                                   f"the pretraining split of {name}": trained})
        except ValueError as e:
            raise ValueError(f"refusing to score retrieval (case leakage): {e}") from None
        shared = [h for h in hashes if h is not None and h in trained_hashes]
        if shared:
            raise ValueError(f"refusing to score retrieval (image leakage): {len(shared)} "
                             f"images of split {split!r} have the same pixels as images "
                             f"{name} was pretrained on")
    return eval_ids


def evaluate_retrieval(encoders, data_dir, split, out_dir=None, n_boot=1000, seed=0,
                       pairs=None, batch_size=256, title=None):
    """Scores same-case retrieval of every encoder on `split` and the paired differences.

    encoders: {name: encoder dir} (ordered: the first is the default reference).
    pairs: [(a, b)] differences metric(a) - metric(b) to report; default every later encoder
      against the first. Writes `retrieval_{split}.json` / `.md` into `out_dir` (when given)
      and returns the dict."""
    if not encoders:
        raise ValueError("no encoder to evaluate")
    info = read_info(data_dir)
    check_split_for_retrieval(data_dir, split, encoders, info)
    names = list(encoders)
    pairs = list(pairs) if pairs is not None else [(n, names[0]) for n in names[1:]]
    embedded, reports = {}, {}
    for name, path in encoders.items():
        emb, cases = embed_split(path, data_dir, split, batch_size=batch_size, info=info)
        embedded[name] = (emb, cases)
        reports[name] = retrieval.same_case_retrieval_report(emb, cases, n_boot=n_boot,
                                                             seed=seed)
        logging.info("retrieval on %s/%s, %s: top-1 %.3f %s, mAP %.3f (chance %.3f / %.3f)",
                     data_dir, split, name, reports[name]["top1"], reports[name]["ci95"]["top1"],
                     reports[name]["map"], reports[name]["chance_top1"],
                     reports[name]["chance_map"])
    paired = []
    for a, b in pairs:
        (ea, ca), (eb, cb) = embedded[a], embedded[b]
        d = retrieval.paired_retrieval_difference(ea, eb, case_ids=ca, case_ids_b=cb,
                                                  n_boot=n_boot, seed=seed)
        paired.append({"a": a, "b": b, **d})
    result = {"data_dir": os.path.abspath(data_dir), "split": split, "n_boot": n_boot,
              "seed": seed, "encoders": {n: os.path.abspath(p) for n, p in encoders.items()},
              "reports": reports, "paired": paired}
    result = json.loads(json.dumps(result, default=_json_default))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(os.path.join(out_dir, f"retrieval_{split}.json"), result)
        with open(os.path.join(out_dir, f"retrieval_{split}.md"), "w", encoding="utf-8") as f:
            f.write(markdown(result, title=title))
    return result


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x)}")


def _f(x):
    return "n/a" if x is None else f"{x:.3f}"


def _ci(ci):
    return "n/a" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown_tables(result):
    """The two tables (per encoder; paired differences) as markdown lines."""
    lines = ["| encoder | top-1 same-case [95% CI] | mAP [95% CI] | chance top-1 / mAP | "
             "queries (cases) |", "|---|---|---|---|---|"]
    for name, r in result["reports"].items():
        lines.append(f"| {name} | {_f(r['top1'])} {_ci(r['ci95']['top1'])} | {_f(r['map'])} "
                     f"{_ci(r['ci95']['map'])} | {_f(r['chance_top1'])} / {_f(r['chance_map'])}"
                     f" | {r['num_queries']} ({r['num_cases']}) |")
    if result["paired"]:
        lines += ["", "| A − B | top-1 difference [95% CI] | mAP difference [95% CI] | "
                  "verdict (top-1) |", "|---|---|---|---|"]
        for p in result["paired"]:
            lo, hi = p["top1"]["ci95"]
            verdict = ("A higher" if lo > 0 else "B higher" if hi < 0 else
                       "not distinguishable")
            lines.append(f"| {p['a']} − {p['b']} | {p['top1']['difference']:+.3f} "
                         f"{_ci(p['top1']['ci95'])} | {p['map']['difference']:+.3f} "
                         f"{_ci(p['map']['ci95'])} | {verdict} |")
    return lines


def markdown(result, title=None):
    lines = [f"# {title or 'Same-case retrieval'}", "",
             f"Split `{result['split']}` of `{result['data_dir']}`: for every image, is its "
             "nearest other image (cosine similarity of encoder features) from the same case? "
             "mAP ranks all other images. Cases are never ones the encoders were pretrained on, "
             "and the split holds no two images with the same pixels (checked). 95% CIs: "
             f"{result['n_boot']} bootstrap resamples of cases; differences are paired (same "
             "images, same resamples).", ""]
    return "\n".join(lines + markdown_tables(result) + [""])

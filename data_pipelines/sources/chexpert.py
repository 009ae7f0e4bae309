"""CheXpert (Irvin et al., AAAI 2019): chest radiographs with 14 report-derived observations.

`--input` is `train.csv` or `valid.csv` with the columns `Path, Sex, Age, Frontal/Lateral,
AP/PA` followed by the 14 observations, each 1.0 (positive), 0.0 (negative), -1.0 (uncertain)
or empty (not mentioned). They become the multilabel codes 1 / 0 / -1 / -2 (schema.POSITIVE,
NEGATIVE, UNCERTAIN, MISSING), kept distinct so fine-tuning can choose an uncertainty policy
(U-Ones, U-Zeros, ignore) later. `--task` is ignored: the task is always multilabel.

Paths. `Path` reads `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`, relative
to the folder that *holds* `CheXpert-v1.0-small/`, while the CSV itself lives inside it, so the
upstream base is the CSV folder's parent. The base is chosen once, from the first row whose file
exists, among: (1) the CSV folder's parent, (2) the CSV folder, (3) the CSV folder with the
first component of `Path` dropped (the dataset folder was renamed). If no row's file exists the
upstream base (1) is used and every row is rejected as "missing file".

Cases. `chexpert_case="patient"` (default) groups by `patientNNNNN`; `"study"` by
`patientNNNNN/studyM`. All images of a study share its labels (one report per study); rows of one
study that disagree are all rejected. A patient's studies can carry different labels (the
findings change over time): a patient case takes the labels of its FIRST study in CSV order
(the first study that kept at least one valid row) — a documented, deterministic rule rather
than a merge that would invent a label no report gave. Group by study for study-level labels.

Labels: `chexpert_labels="all"` (default) keeps the 14 observations in upstream column order;
`"competition"` keeps the paper's 5 (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural
Effusion); `--label_names` may instead name any subset of the 14 columns.
`frontal_only=True` rejects lateral rows (counted, by CSV line). View tag: `frontal_PA`,
`frontal_AP`, `frontal_LL`, `frontal_RL` or `lateral` from `Frontal/Lateral` + `AP/PA`
(a fixed vocabulary; anything else gives an empty tag).

Case attributes (`data_pipelines.attributes`): `Sex` -> `case/attr/sex`, `Age` ->
`case/attr/age_band` (10-year band; CheXpert records ages over 89 as 90 -> "90+"), both from the
case's first kept row, and `case/attr/view` from the view tags of the images written (pa, ap,
frontal, lateral, or "mixed" for a case with both frontal and lateral images - most patient
cases). Tokens only; nothing is copied as text.
"""
import collections
import os
import re

from absl import logging

from data_pipelines import attributes, schema
from data_pipelines.sources.folder import group_cases, read_csv_rows
from data_pipelines.sources.ham10000 import check_label_names
from data_pipelines.writer import SourceData

OBSERVATIONS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
REQUIRED_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA")
CODES = {"1.0": schema.POSITIVE, "1": schema.POSITIVE, "0.0": schema.NEGATIVE,
         "0": schema.NEGATIVE, "-1.0": schema.UNCERTAIN, "-1": schema.UNCERTAIN,
         "": schema.MISSING}
PROJECTIONS = ("AP", "PA", "LL", "RL")
_PATH_RE = re.compile(r"(?:^|/)(patient\d+)/(study\d+)/[^/]+$")
CITATION = ("J. Irvin et al., 'CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels "
            "and Expert Comparison', AAAI 2019. Stanford University CheXpert Dataset Research "
            "Use Agreement.")


class RowRejected:
    """A row-level problem found before grouping; `group_cases` reports it by CSV line."""

    def __init__(self, reason):
        self.reason = reason


def take_prepared_label(value, index, task):
    """`group_cases(parse_label=...)` hook for labels parsed (or rejected) before grouping."""
    del index, task
    if isinstance(value, RowRejected):
        raise ValueError(value.reason)
    return value


def view_tag(frontal_lateral, projection):
    fl = frontal_lateral.strip().lower()
    if fl == "lateral":
        return "lateral"
    if fl == "frontal":
        projection = projection.strip().upper()
        return f"frontal_{projection}" if projection in PROJECTIONS else "frontal"
    return ""


LABEL_SETS = ("all", "competition")  # --chexpert_labels
CASE_KEYS = ("patient", "study")  # --chexpert_case


def _label_names(chexpert_labels, label_names):
    if label_names:
        return check_label_names(label_names, OBSERVATIONS, "chexpert")
    if chexpert_labels in (None, "", "all"):
        return list(OBSERVATIONS)
    if chexpert_labels == "competition":
        return list(COMPETITION)
    raise ValueError(f"chexpert_labels must be one of {LABEL_SETS}, got {chexpert_labels!r}")


def _parse_codes(row, names):
    codes = []
    for name in names:
        cell = row.get(name, "")
        if cell not in CODES:
            try:  # tolerate "1" / "-1.00" spellings, reject anything else
                cell = {1.0: "1", 0.0: "0", -1.0: "-1"}[float(cell)]
            except (KeyError, ValueError):
                return RowRejected(f"invalid value {cell!r} in column {name!r} "
                                 "(expected 1.0, 0.0, -1.0 or empty)")
        codes.append(CODES[cell])
    return codes


def _choose_base(csv_dir, paths):
    """The base folder for the `Path` column (see the module docstring)."""
    parent = os.path.dirname(csv_dir)
    candidates = [lambda p: os.path.join(parent, p), lambda p: os.path.join(csv_dir, p),
                  lambda p: os.path.join(csv_dir, p.split("/", 1)[1] if "/" in p else p)]
    for p in paths:
        if not p:
            continue
        for resolve in candidates:
            if os.path.isfile(resolve(p)):
                return resolve
    return candidates[0]


def build(input_path=None, label_names=None, task="multilabel", chexpert_labels="all",
          chexpert_case="patient", frontal_only=False, **_):
    del task  # always multilabel
    if not input_path:
        raise ValueError("the chexpert source needs --input=path/to/CheXpert-v1.0-small/train.csv")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input CSV not found: {input_path}")
    if chexpert_case not in CASE_KEYS:
        raise ValueError(f"chexpert_case must be one of {CASE_KEYS}, got {chexpert_case!r}")
    names = _label_names(chexpert_labels, label_names)
    csv_dir = os.path.dirname(os.path.abspath(input_path))
    csv_name = os.path.basename(input_path)
    rows = list(read_csv_rows(input_path, required=REQUIRED_COLUMNS + tuple(names)))

    # Pass 1: per-row codes (or the reason the row is rejected) and its patient/study.
    parsed = []  # (line, patient, study, path, label-or-RowRejected, view, attributes)
    for line, r in rows:
        path = r["Path"].replace("\\", "/")
        m = _PATH_RE.search(path)
        # an unparseable Path gets a placeholder key so the row is rejected with its reason
        patient, study = ((m.group(1), f"{m.group(1)}/{m.group(2)}") if m
                          else (f"?{line}", f"?{line}"))
        view = view_tag(r["Frontal/Lateral"], r["AP/PA"])
        if path and not m:
            label = RowRejected("cannot find patientNNNNN/studyN/ in Path")
        elif frontal_only and view == "lateral":
            label = RowRejected("lateral view excluded (frontal_only)")
        else:
            label = _parse_codes(r, names)
        attrs = {"view": attributes.view(view)}
        if "Sex" in r:
            attrs["sex"] = attributes.sex(r["Sex"])
        if "Age" in r:
            attrs["age_band"] = attributes.age_band(r["Age"])
        parsed.append([line, patient, study, path, label, view, attrs])

    # Pass 2: one label per study; rows of a study that disagree are all rejected.
    study_labels, study_lines = {}, collections.defaultdict(list)
    for line, _, study, path, label, _, _ in parsed:
        if path and not isinstance(label, RowRejected):
            study_labels.setdefault(study, set()).add(tuple(label))
            study_lines[study].append(line)
    conflicting = {s for s, labels in study_labels.items() if len(labels) > 1}
    for entry in parsed:
        if entry[2] in conflicting and not isinstance(entry[4], RowRejected):
            lines = study_lines[entry[2]]
            entry[4] = RowRejected(f"conflicting labels within one study "
                                 f"({csv_name}:{lines[0]}-{lines[-1]})")

    # Pass 3 (patient cases): every row takes the label of its patient's first study.
    if chexpert_case == "patient":
        first_study, differing = {}, set()
        for _, patient, study, path, label, _, _ in parsed:
            if isinstance(label, RowRejected) or not path:
                continue
            first = first_study.setdefault(patient, study)
            if study != first and next(iter(study_labels[study])) != \
                    next(iter(study_labels[first])):
                differing.add(patient)
        for entry in parsed:
            if not isinstance(entry[4], RowRejected) and entry[3]:
                entry[4] = list(next(iter(study_labels[first_study[entry[1]]])))
        if differing:
            logging.info("chexpert: %d of %d patients have studies with different labels; "
                         "each patient case takes its first study's labels",
                         len(differing), len(first_study))

    key_of = 1 if chexpert_case == "patient" else 2
    rejected = []
    resolve = _choose_base(csv_dir, (e[3] for e in parsed))
    cases, items_read = group_cases(
        ((e[0], e[key_of], e[3], e[4], e[5], e[6]) for e in parsed), csv_name, names,
        "multilabel",
        rejected, resolve, parse_label=take_prepared_label)
    return SourceData(name="chexpert", task="multilabel", label_names=names, cases=cases,
                      rejected=rejected, items_read=items_read, citation=CITATION)

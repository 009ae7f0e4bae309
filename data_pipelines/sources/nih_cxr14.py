"""NIH ChestX-ray14 (Wang et al., CVPR 2017): 112,120 frontal chest X-rays of 30,805 patients.

`--input` is `Data_Entry_2017.csv` (`Image Index, Finding Labels, Follow-up #, Patient ID,
Patient Age, Patient Gender, View Position, ...`). Images (`Image Index`, PNG) are looked up once
(one directory listing per folder) in the CSV's folder, `images/`, and every
`images_*/images/` and `images_*/` (the layout of the release's 12 archives once extracted).

Case = `Patient ID`: a patient's follow-up images form one bag. `Finding Labels` holds
`|`-separated findings over the 14 classes below; `No Finding` means all 14 negative; an unknown
finding (or `No Finding` mixed with findings) rejects the row by CSV line. Multilabel codes are
1/0 only (the release has no uncertain or missing labels). Labels differ across one patient's
follow-ups, so a case's label is the element-wise MAX over its rows with a valid `Finding
Labels` cell: a finding is positive for the case if any of its rows reports it (a row whose
image later proves unreadable still counts: the finding comes from its report, not its pixels).
With `--label_names` (a subset of the 14) only those findings are kept. `View Position` becomes
the view tag when it is one of PA, AP, LL, LAT. `--task` is ignored (always multilabel).

Case attributes (`data_pipelines.attributes`): `Patient Gender` (M/F) -> `case/attr/sex`,
`Patient Age` ("58" or the older "058Y") -> `case/attr/age_band` (10-year band; ages above 120,
data errors in the release, -> "unknown"), both from the patient's first kept row, and
`case/attr/view` from the written images' view tags ("mixed" when a patient has PA and AP
follow-ups). Tokens only; nothing is copied as text.
"""
import glob
import os

from data_pipelines import attributes, schema
from data_pipelines.sources.chexpert import RowRejected, take_prepared_label
from data_pipelines.sources.folder import group_cases, read_csv_rows
from data_pipelines.sources.ham10000 import check_label_names, index_files
from data_pipelines.writer import SourceData

FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
            "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
            "Pleural_Thickening", "Hernia"]
NO_FINDING = "No Finding"
VIEWS = ("PA", "AP", "LL", "LAT")
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
CITATION = ("X. Wang et al., 'ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on "
            "Weakly-Supervised Classification and Localization of Common Thorax Diseases', "
            "CVPR 2017. NIH Clinical Center.")


def image_folders(base):
    return ([base, os.path.join(base, "images")]
            + sorted(glob.glob(os.path.join(base, "images_*", "images")))
            + sorted(glob.glob(os.path.join(base, "images_*"))))


def parse_findings(text, names):
    index = {n: i for i, n in enumerate(names)}
    parts = [p.strip() for p in text.split("|") if p.strip()]
    if not parts:
        return RowRejected("empty Finding Labels")
    if NO_FINDING in parts:
        if len(parts) > 1:
            return RowRejected(f"'{NO_FINDING}' together with findings {parts}")
        return [schema.NEGATIVE] * len(names)
    unknown = [p for p in parts if p not in FINDINGS]
    if unknown:
        return RowRejected(f"unknown finding(s) {unknown} (known: {', '.join(FINDINGS)})")
    codes = [schema.NEGATIVE] * len(names)
    for p in parts:
        if p in index:  # findings outside a --label_names subset are simply not kept
            codes[index[p]] = schema.POSITIVE
    return codes


def build(input_path=None, label_names=None, task="multilabel", **_):
    del task  # always multilabel
    if not input_path:
        raise ValueError("the nih_cxr14 source needs --input=path/to/Data_Entry_2017.csv")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input CSV not found: {input_path}")
    names = check_label_names(label_names, FINDINGS, "nih_cxr14")
    base = os.path.dirname(os.path.abspath(input_path))
    csv_name = os.path.basename(input_path)
    index = index_files(image_folders(base), (".png",))

    parsed = []
    merged = {}  # patient -> element-wise max over its valid rows
    for line, r in read_csv_rows(input_path, required=REQUIRED_COLUMNS):
        label = parse_findings(r["Finding Labels"], names)
        patient = r["Patient ID"]
        if patient and r["Image Index"] and not isinstance(label, RowRejected):
            prev = merged.get(patient)
            merged[patient] = label if prev is None else [max(a, b) for a, b in zip(prev, label)]
        view = r.get("View Position", "").strip().upper()
        view = view if view in VIEWS else ""
        attrs = {"view": attributes.view(view)}
        if "Patient Gender" in r:
            attrs["sex"] = attributes.sex(r["Patient Gender"])
        if "Patient Age" in r:
            attrs["age_band"] = attributes.age_band(r["Patient Age"])
        parsed.append((line, patient, r["Image Index"], label, view, attrs))

    rows = ((line, patient, image,
             label if isinstance(label, RowRejected) else merged.get(patient, label), view,
             attrs)
            for line, patient, image, label, view, attrs in parsed)
    rejected = []
    cases, items_read = group_cases(
        rows, csv_name, names, "multilabel", rejected,
        resolve_path=lambda name: index.get(name) or os.path.join(base, name),
        parse_label=take_prepared_label)
    return SourceData(name="nih_cxr14", task="multilabel", label_names=names, cases=cases,
                      rejected=rejected, items_read=items_read, citation=CITATION)

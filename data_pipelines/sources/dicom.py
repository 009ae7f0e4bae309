"""A folder of DICOM files (searched recursively; any file name, with or without extension).

Needs pydicom >= 3 (`pip install 'micle-tf[dicom]'`, i.e. pydicom and pydicom-data); it is
imported only when this source is used. Every file under `--input` is an item: files that are
not DICOM Part-10 files are rejected as "not a DICOM file", DICOM objects without an image
(reports, DICOMDIR, ...) as "DICOM file without pixel data" — counted, never skipped silently.

Cases: `dicom_case="patient"` (default) groups by PatientID; `"study"` by PatientID +
StudyInstanceUID. A file without PatientID falls back to its StudyInstanceUID, and one without
either is its own case. The same SOPInstanceUID twice (a copied file) is rejected as a duplicate.

Pixels -> 8-bit PNG, encoded in memory when the writer asks (one file at a time; a multi-frame
object contributes its middle frame):
  greyscale: modality LUT (RescaleSlope/Intercept, or a Modality LUT Sequence) ->
    VOI window from the first WindowCenter/WindowWidth (DICOM PS3.3 C.11.2.1.2 LINEAR,
    LINEAR_EXACT or SIGMOID) when present, else min-max of the image -> MONOCHROME1 inverted
    (so air is dark, as in MONOCHROME2) -> round(255 * y).
  colour: YBR is converted to RGB by pydicom, PALETTE COLOR through its lookup table; samples
    deeper than 8 bits are scaled to 8 bits. No windowing.

Privacy: NO DICOM attribute is copied into the records as it is — only pixels (burned-in
annotations in the pixels themselves are not detected; de-identify such data first). The view
tag is ViewPosition only when it is one of AP, PA, LL, LAT (a fixed vocabulary, never free
text). Four attributes become case attributes, as fixed tokens only
(`data_pipelines.attributes`): PatientSex -> `case/attr/sex`, PatientAge ("045Y", "006M") ->
`case/attr/age_band` (a 10-year band; a file without PatientAge is "unknown": the age is never
computed from PatientBirthDate or any date, which are not even read), Modality ->
`case/attr/modality` (the code lower-cased, from a fixed list) and Manufacturer (free text) ->
`case/attr/manufacturer` (a major vendor's token such as "philips", else "other"). Sex and age
come from the case's first file; modality and manufacturer are per image ("mixed" when the
written images of a case differ). Items are named by their path relative to `--input` (use
non-identifying file names).

Labels (optional): `dicom_labels=labels.csv` with a `label` column and a `SOPInstanceUID` or
`file` column (`file` = the path relative to `--input`, or just the file name when that name is
unique). Multiclass by default (vocabulary = sorted labels of the CSV, or `--label_names`);
`task="multilabel"` reads `|`-separated names as the folder source does. Images without a label
row are unlabelled; label rows that match no image are listed in `rejected` (kind "label");
images of one case with different labels are all rejected, as in the folder source.
"""
import collections
import io
import os

import numpy as np

from data_pipelines import attributes
from data_pipelines.sources.folder import _parse_label, read_csv_rows
from data_pipelines.writer import SourceCase, SourceData, SourceImage

VIEWS = ("AP", "PA", "LL", "LAT")
HEADER_TAGS = ("PatientID", "StudyInstanceUID", "SOPInstanceUID", "ViewPosition", "Rows",
               "Columns", "NumberOfFrames", "PatientSex", "PatientAge", "Modality",
               "Manufacturer")
INSTALL = "pip install 'micle-tf[dicom]'  (or: pip install 'pydicom>=3' pydicom-data)"


class DicomReadError(OSError):
    """Pixel data that cannot be decoded; the writer reports it as a rejection of the file."""


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (the pydicom >= 3 pixel backend)
    except ImportError:
        raise ImportError(f"the dicom source needs pydicom >= 3: {INSTALL}") from None
    return pydicom


def pixels_to_uint8(arr, ds):
    """Decoded pixel array + its pixel-module attributes -> uint8 [H, W] or [H, W, 3]."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        return _scale_to_uint8(arr, 16 if arr.dtype == np.uint16 else 8)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return _scale_to_uint8(arr, int(ds.get("BitsStored", 8) or 8))
    if arr.ndim != 2:
        raise DicomReadError(f"unsupported pixel array shape {arr.shape}")
    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function == "SIGMOID":
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        elif function == "LINEAR_EXACT":
            y = (x - center) / width + 0.5
        elif width <= 1:  # LINEAR with width 1: a threshold
            y = (x > center - 0.5).astype(np.float64)
        else:
            y = (x - (center - 0.5)) / (width - 1) + 0.5
    else:
        lo, hi = float(x.min()), float(x.max())
        y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    y = np.clip(y, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        y = 1.0 - y
    return np.rint(y * 255.0).astype(np.uint8)


def _first(value):
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _scale_to_uint8(arr, bits):
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    top = float(2 ** max(1, min(bits, 16)) - 1)
    return np.rint(np.clip(arr.astype(np.float64) / top, 0.0, 1.0) * 255.0).astype(np.uint8)


def encode_png(pixels):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def _loader(path, frames):
    def load():
        from pydicom.dataset import Dataset
        from pydicom.pixels import pixel_array
        meta = Dataset()
        try:
            arr = pixel_array(path, ds_out=meta, index=frames // 2 if frames > 1 else None)
            pixels = pixels_to_uint8(arr, meta)
        except (FileNotFoundError, DicomReadError):
            raise
        except Exception as e:  # noqa: BLE001 — any decoder failure is a counted rejection
            raise DicomReadError(f"cannot decode DICOM pixel data ({type(e).__name__}: "
                                 f"{str(e)[:160]})") from None
        return encode_png(pixels)
    return load


def _walk(root):
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            yield path, os.path.relpath(path, root).replace(os.sep, "/")


def _read_labels(csv_path, label_names, task):
    """(rows, names): rows = [(line, uid, file, label_text)]."""
    csv_name = os.path.basename(csv_path)
    rows = list(read_csv_rows(csv_path, required=("label",)))
    if rows and "SOPInstanceUID" not in rows[0][1] and "file" not in rows[0][1]:
        raise ValueError(f"{csv_name}: needs a 'SOPInstanceUID' or a 'file' column beside "
                         f"'label'; found {sorted(rows[0][1])}")
    if label_names:
        names = list(label_names)
        if len(set(names)) != len(names):
            raise ValueError(f"--label_names has duplicates: {names}")
    else:
        found = set()
        for _, r in rows:
            parts = r["label"].split("|") if task == "multilabel" else [r["label"]]
            found.update(p.strip() for p in parts if p.strip())
        names = sorted(found)
    return [(line, r.get("SOPInstanceUID", ""), _norm_file(r.get("file", "")), r["label"])
            for line, r in rows], names


def _norm_file(name):
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


CASE_KEYS = ("patient", "study")  # --dicom_case


def build(input_path=None, label_names=None, task="multiclass", dicom_case="patient",
          dicom_labels=None, **_):
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    if not input_path:
        raise ValueError("the dicom source needs --input=path/to/dicom_folder")
    if not os.path.isdir(input_path):
        raise NotADirectoryError(f"--input must be a folder of DICOM files: {input_path}")
    if dicom_case not in CASE_KEYS:
        raise ValueError(f"dicom_case must be one of {CASE_KEYS}, got {dicom_case!r}")
    if task not in ("multiclass", "multilabel"):
        raise ValueError(f"unknown task {task!r}")
    root = os.path.abspath(input_path)
    rejected, images, read = [], [], 0  # [rel, path, case_key, uid, view, frames, attrs]
    seen_uid = {}
    for path, rel in _walk(root):
        read += 1
        if not os.path.isfile(path):  # a FIFO would block dcmread forever
            rejected.append({"item": rel, "kind": "image",
                             "reason": "not a regular file (a FIFO, device or socket)"})
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
        except InvalidDicomError:
            rejected.append({"item": rel, "kind": "image", "reason": "not a DICOM file"})
            continue
        except Exception as e:  # noqa: BLE001 — a corrupt header is a counted rejection
            rejected.append({"item": rel, "kind": "image",
                             "reason": f"cannot parse DICOM header ({type(e).__name__})"})
            continue
        if "Rows" not in ds or "Columns" not in ds:
            rejected.append({"item": rel, "kind": "image",
                             "reason": "DICOM file without pixel data"})
            continue
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if uid and uid in seen_uid:
            rejected.append({"item": rel, "kind": "image", "reason":
                             f"duplicate image (same SOPInstanceUID as {seen_uid[uid]})"})
            continue
        if uid:
            seen_uid[uid] = rel
        patient = str(ds.get("PatientID", "") or "").strip()
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        if dicom_case == "study" and study:
            key = ("study", patient, study)
        elif patient and dicom_case == "patient":
            key = ("patient", patient)
        elif study:
            key = ("study", patient, study)
        else:
            key = ("file", rel)
        view = str(ds.get("ViewPosition", "") or "").strip().upper()
        try:
            frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            frames = 1
        attrs = {"sex": attributes.sex(ds.get("PatientSex", "")),
                 "age_band": attributes.age_band(ds.get("PatientAge", "")),
                 "modality": attributes.modality(ds.get("Modality", "")),
                 "manufacturer": attributes.manufacturer(ds.get("Manufacturer", ""))}
        images.append([rel, path, "\x1f".join(key), uid, view if view in VIEWS else "", frames,
                       attrs])

    labels, names = {}, list(label_names or [])
    if dicom_labels:
        label_rows, names = _read_labels(dicom_labels, label_names, task)
        labels = _match_labels(label_rows, images, os.path.basename(dicom_labels), names, task,
                               rejected)

    by_case = collections.OrderedDict()
    for rel, path, key, _, view, frames, attrs in images:
        if isinstance(labels.get(rel), str):  # a label problem: reject the image
            rejected.append({"item": rel, "kind": "image", "reason": labels[rel]})
            continue
        by_case.setdefault(key, []).append((rel, path, view, frames, labels.get(rel), attrs))
    cases = []
    for key, members in by_case.items():
        distinct = {repr(l): l for *_, l, _ in members if l is not None}
        if len(distinct) > 1:
            for rel, *_ in members:
                rejected.append({"item": rel, "kind": "image", "reason":
                                 f"conflicting labels within one case (with {members[0][0]}): "
                                 f"{sorted(distinct)}"})
            rejected.append({"item": f"case of {members[0][0]}", "kind": "case",
                             "reason": "conflicting labels; every image of the case rejected"})
            continue
        first = members[0][5]
        cases.append(SourceCase(
            key=key, images=[SourceImage(item=rel, load=_loader(path, frames), view=view)
                             for rel, path, view, frames, _, _ in members],
            label=next(iter(distinct.values())) if distinct else None,
            item=f"case of {members[0][0]}",
            attributes={"sex": first["sex"], "age_band": first["age_band"],
                        "modality": [m[5]["modality"] for m in members],
                        "manufacturer": [m[5]["manufacturer"] for m in members]}))
    return SourceData(name="dicom", task=task, label_names=names, cases=cases,
                      rejected=rejected, items_read=read)


def _match_labels(label_rows, images, csv_name, names, task, rejected):
    """{image rel path: parsed label, or a str reason to reject the image}."""
    index = {n: i for i, n in enumerate(names)}
    by_uid = {uid: rel for rel, _, _, uid, *_ in images if uid}
    by_rel = {rel: rel for rel, *_ in images}
    by_base = collections.defaultdict(list)
    for rel, *_ in images:
        by_base[rel.rsplit("/", 1)[-1]].append(rel)
    found = collections.defaultdict(list)  # rel -> [(line, text)]
    for line, uid, file, text in label_rows:
        item = f"{csv_name}:{line}"
        if uid and uid in by_uid:
            targets = [by_uid[uid]]
        elif file and file in by_rel:
            targets = [file]
        elif file and len(by_base.get(file, ())) == 1:
            targets = by_base[file]
        elif file and len(by_base.get(file, ())) > 1:
            rejected.append({"item": item, "kind": "label", "reason":
                             f"file name matches {len(by_base[file])} DICOM files; give the "
                             "path relative to --input"})
            continue
        else:
            rejected.append({"item": item, "kind": "label",
                             "reason": "label row matches no DICOM image"})
            continue
        for rel in targets:
            found[rel].append((line, text))
    out = {}
    for rel, entries in found.items():
        texts = {t for _, t in entries}
        lines = ", ".join(f"{csv_name}:{l}" for l, _ in entries)
        if len(texts) > 1:
            out[rel] = f"conflicting label rows ({lines})"
            continue
        try:
            out[rel] = _parse_label(entries[0][1], index, task)
        except ValueError as e:
            out[rel] = f"{lines}: {e}"
    return out

"""MedMNIST v2 2D sets (Yang et al., Sci. Data 2023): `{name}.npz` files.

`--input` is e.g. `dermamnist.npz` (or a MedMNIST+ `dermamnist_224.npz`) holding
`train_images, train_labels, val_images, val_labels, test_images, test_labels`; images are uint8
`[N, H, W]` (greyscale) or `[N, H, W, 3]` (RGB), labels `[N, 1]` (multiclass) or `[N, C]` with
0/1 values (multilabel, e.g. chestmnist). The task is inferred from the label array (`--task` is
ignored); 3D sets (`*mnist3d`) are not supported.

MedMNIST keeps no patient ids, so each image is its own case (key `{split}/{index}`): there is no
patient grouping to recover and MICLe falls back to two views of one image. The dataset's own
split is kept (`SourceCase.split`; `--split_fractions` does not apply). Items are named
`{name}.npz:{split}[{index}]`. Each image is encoded to PNG in memory when the writer asks for it.

Streaming: image arrays are never loaded whole. A member stored uncompressed (`np.savez`) is
memory-mapped inside the .npz; a compressed one (`np.savez_compressed`, the official files) is
first unpacked once to a temporary .npy that is memory-mapped (and deleted with the source).

Label names come from the table below for the known 2D sets (comma-free spellings of MedMNIST's
INFO labels; dermamnist uses the HAM10000 codes, chestmnist the NIH ChestX-ray14 finding names,
in the same class order), else `--label_names`, else `class_0 .. class_{C-1}`.
"""
import io
import os
import re
import shutil
import struct
import tempfile
import zipfile

import numpy as np

from data_pipelines.sources.ham10000 import LABEL_NAMES as HAM_NAMES
from data_pipelines.sources.nih_cxr14 import FINDINGS as NIH_FINDINGS
from data_pipelines.writer import SourceCase, SourceData, SourceImage

_ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
           "liver", "lung-left", "lung-right", "pancreas", "spleen"]
KNOWN_LABELS = {
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium"],
    "chestmnist": list(NIH_FINDINGS),
    "dermamnist": list(HAM_NAMES),
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal or benign"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"],
    "tissuemnist": ["collecting duct or connecting tubule", "distal convoluted tubule",
                    "glomerular endothelial cells", "interstitial endothelial cells",
                    "leukocytes", "podocytes", "proximal tubule segments",
                    "thick ascending limb"],
    "organamnist": list(_ORGANS),
    "organcmnist": list(_ORGANS),
    "organsmnist": list(_ORGANS),
}
SPLITS = ("train", "val", "test")
CITATION = ("J. Yang et al., 'MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D "
            "biomedical image classification', Scientific Data 10, 41 (2023). CC BY 4.0 "
            "(source datasets keep their own licences).")


def dataset_name(path):
    """`dermamnist_224.npz` -> `dermamnist` (the MedMNIST+ size suffix dropped)."""
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    return re.sub(r"_(28|64|128|224)$", "", stem)


class _NpyMember:
    """One `.npy` member of an .npz, opened lazily as a read-only memory map."""

    def __init__(self, npz_path, member):
        self.npz_path, self.member = npz_path, member
        with zipfile.ZipFile(npz_path) as zf:
            self.info = zf.getinfo(member)
            with zf.open(self.info) as f:
                self.shape, fortran, self.dtype = _read_header(f)
        self.order = "F" if fortran else "C"
        self._array = None
        self._tmp = None  # TemporaryDirectory; removed when this object is collected

    @property
    def array(self):
        if self._array is None:
            if self.info.compress_type == zipfile.ZIP_STORED:
                with open(self.npz_path, "rb") as f:
                    f.seek(self.info.header_offset)
                    local = f.read(30)
                    if local[:4] != b"PK\x03\x04":
                        raise OSError(f"corrupt zip entry {self.member}")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    f.seek(self.info.header_offset + 30 + name_len + extra_len)
                    _read_header(f)
                    offset = f.tell()
                self._array = np.memmap(self.npz_path, dtype=self.dtype, mode="r",
                                        offset=offset, shape=self.shape, order=self.order)
            else:
                self._tmp = tempfile.TemporaryDirectory(prefix="micle-medmnist-")
                target = os.path.join(self._tmp.name, self.member)
                with zipfile.ZipFile(self.npz_path) as zf, zf.open(self.info) as src, \
                        open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                self._array = np.load(target, mmap_mode="r", allow_pickle=False)
        return self._array


def _read_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _png_loader(member, index):
    def load():
        from PIL import Image
        a = np.asarray(member.array[index])
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
        return buf.getvalue()
    return load


def _check_images(member, npz_name):
    shape, dtype = member.shape, member.dtype
    gray = len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1)
    rgb = len(shape) == 4 and shape[-1] == 3
    if not (gray or rgb):
        raise ValueError(f"{npz_name}: {member.member} has shape {shape}; expected [N, H, W] or "
                         "[N, H, W, 3] (3D MedMNIST volumes are not supported)")
    if not (dtype == np.uint8 or (gray and dtype == np.uint16)):
        raise ValueError(f"{npz_name}: {member.member} has dtype {dtype}; expected uint8")


def build(input_path=None, label_names=None, task=None, **_):
    del task  # inferred from the label array
    if not input_path:
        raise ValueError("the medmnist source needs --input=path/to/{name}.npz")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input .npz not found: {input_path}")
    npz_name = os.path.basename(input_path)
    name = dataset_name(input_path)
    if not zipfile.is_zipfile(input_path):
        raise ValueError(f"{npz_name} is not an .npz archive")
    with zipfile.ZipFile(input_path) as zf:
        members = {os.path.splitext(n)[0] for n in zf.namelist() if n.endswith(".npy")}
    present = [s for s in SPLITS if f"{s}_images" in members]
    if not present:
        raise ValueError(f"{npz_name} holds none of {[s + '_images' for s in SPLITS]}; "
                         f"found {sorted(members)}")
    images, labels = {}, {}
    with np.load(input_path, allow_pickle=False) as npz:
        for s in present:
            images[s] = _NpyMember(input_path, f"{s}_images.npy")
            _check_images(images[s], npz_name)
            if f"{s}_labels" in members:
                lab = np.asarray(npz[f"{s}_labels"])
                lab = lab.reshape(-1, 1) if lab.ndim == 1 else lab
                if lab.ndim != 2 or lab.shape[0] != images[s].shape[0]:
                    raise ValueError(f"{npz_name}: {s}_labels has shape {lab.shape}, expected "
                                     f"[{images[s].shape[0]}, C]")
                labels[s] = lab
    if labels and len(labels) != len(present):
        raise ValueError(f"{npz_name}: labels for splits {sorted(labels)} but images for "
                         f"{present}")
    widths = {lab.shape[1] for lab in labels.values()}
    if len(widths) > 1:
        raise ValueError(f"{npz_name}: label arrays of different widths {sorted(widths)}")
    width = widths.pop() if widths else 0
    multilabel = width > 1
    if multilabel:
        values = set(np.unique(np.concatenate([lab.ravel() for lab in labels.values()])).tolist())
        if not values <= {0, 1}:
            raise ValueError(f"{npz_name}: [N, {width}] labels hold values {sorted(values)}; "
                             "a multilabel set must hold 0/1 only")
        num_classes = width
    elif labels:
        top = max((int(lab.max()) for lab in labels.values() if lab.size), default=-1)
        num_classes = len(label_names or KNOWN_LABELS.get(name, ())) or top + 1
        if label_names and top >= num_classes:
            raise ValueError(f"{npz_name}: labels go up to {top}, i.e. {top + 1} classes, but "
                             f"--label_names gives {num_classes}: {list(label_names)}")
    else:
        num_classes = len(label_names or KNOWN_LABELS.get(name, ()))
    if label_names:
        names = list(label_names)
    elif name in KNOWN_LABELS and len(KNOWN_LABELS[name]) == num_classes:
        names = list(KNOWN_LABELS[name])
    else:
        names = [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes or len(set(names)) != len(names):
        raise ValueError(f"{npz_name}: {num_classes} classes but label names {names}")

    cases, rejected, read = [], [], 0
    for s in present:
        member = images[s]
        lab = labels.get(s)
        for i in range(member.shape[0]):
            read += 1
            item = f"{npz_name}:{s}[{i}]"
            label = None
            if lab is not None:
                if multilabel:
                    label = [int(v) for v in lab[i]]
                else:
                    label = int(lab[i, 0])
                    if not 0 <= label < num_classes:
                        rejected.append({"item": item, "kind": "image",
                                         "reason": f"label {label} outside [0, {num_classes})"})
                        continue
            cases.append(SourceCase(key=f"{s}/{i}", images=[SourceImage(
                item=item, load=_png_loader(member, i))], label=label, split=s, item=item))
    return SourceData(name="medmnist", task="multilabel" if multilabel else "multiclass",
                      label_names=names, cases=cases, rejected=rejected, items_read=read,
                      citation=CITATION)

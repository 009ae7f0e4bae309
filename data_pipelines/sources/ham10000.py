"""HAM10000 (Tschandl et al., Sci. Data 2018): dermatoscopic images, several per lesion.

`--input` is `HAM10000_metadata.csv` (columns `lesion_id,image_id,dx,dx_type,age,sex,
localization`). Images are `{image_id}.jpg`, looked up (one directory listing each, never a glob
per row) in the CSV's folder and its subfolders `HAM10000_images_part_1/`,
`HAM10000_images_part_2/` and `images/`; the first folder in that order wins if a name repeats.

Case = `lesion_id` (the dataset's own grouping: the images of one lesion are a real
multi-instance bag). Label = `dx`, multiclass over the fixed upstream vocabulary
`akiec, bcc, bkl, df, mel, nv, vasc` (the dataset's alphabetical order, also DermaMNIST's class
order). `--label_names` may pick a subset or reorder it (rows with other dx are rejected). A row
with an unknown dx, an image that is not on disk, or rows of one lesion that disagree on dx are
rejected by CSV line (`HAM10000_metadata.csv:17`); `--task` is ignored (always multiclass).
Case attributes (for subgroup analysis; `data_pipelines.attributes`): `sex` ->
`case/attr/sex`, `age` -> `case/attr/age_band` (10-year band, "90+"), `localization` ->
`case/attr/site` and `dx_type` -> `case/attr/dx_type`, each mapped to a fixed token (never
copied as text), from the lesion's first row; a column the CSV lacks is simply not written.
Nothing else but pixels and the label reaches the records.
"""
import os

from data_pipelines import attributes
from data_pipelines.sources.folder import group_cases, read_csv_rows
from data_pipelines.writer import SourceData

LABEL_NAMES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
LABEL_DESCRIPTIONS = {
    "akiec": "actinic keratoses and intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesions",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesions",
}
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
IMAGE_FOLDERS = ("", "HAM10000_images_part_1", "HAM10000_images_part_2", "images")
ATTRIBUTE_COLUMNS = {"sex": ("sex", attributes.sex), "age": ("age_band", attributes.age_band),
                     "localization": ("site", attributes.site),
                     "dx_type": ("dx_type", attributes.dx_type)}
CITATION = ("P. Tschandl, C. Rosendahl, H. Kittler, 'The HAM10000 dataset, a large collection of "
            "multi-source dermatoscopic images of common pigmented skin lesions', Sci. Data 5, "
            "180161 (2018). CC BY-NC 4.0.")


def index_files(folders, extensions):
    """{file name: full path} over the plain files of `folders` (non-recursive, one scandir each;
    the first folder listing a name wins). Missing folders are skipped."""
    found = {}
    extensions = tuple(e.lower() for e in extensions)
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.lower().endswith(extensions) and entry.is_file():
                    found.setdefault(entry.name, entry.path)
    return found


def check_label_names(label_names, vocabulary, source):
    """`label_names` (optional) must be distinct members of the source's fixed vocabulary."""
    if not label_names:
        return list(vocabulary)
    names = list(label_names)
    unknown = [n for n in names if n not in vocabulary]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"--label_names for the {source} source must be distinct names from "
                         f"{list(vocabulary)}; got {names}")
    return names


def build(input_path=None, label_names=None, task="multiclass", **_):
    if not input_path:
        raise ValueError("the ham10000 source needs --input=path/to/HAM10000_metadata.csv")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input CSV not found: {input_path}")
    base = os.path.dirname(os.path.abspath(input_path))
    csv_name = os.path.basename(input_path)
    names = check_label_names(label_names, LABEL_NAMES, "ham10000")
    index = index_files([os.path.join(base, f) for f in IMAGE_FOLDERS], (".jpg", ".jpeg"))

    def resolve(file_name):
        # an image not on disk resolves to a path that does not exist -> "missing file"
        return index.get(file_name) or os.path.join(base, file_name)

    columns = []
    rows = ((line, r["lesion_id"], f"{r['image_id']}.jpg" if r["image_id"] else "", r["dx"], "",
             {name: fn(r.get(col, "")) for col, (name, fn) in ATTRIBUTE_COLUMNS.items()
              if col in columns})
            for line, r in read_csv_rows(input_path, required=REQUIRED_COLUMNS,
                                         columns_out=columns))
    rejected = []
    cases, items_read = group_cases(rows, csv_name, names, "multiclass", rejected, resolve)
    return SourceData(name="ham10000", task="multiclass", label_names=names, cases=cases,
                      rejected=rejected, items_read=items_read, citation=CITATION)

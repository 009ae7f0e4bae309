"""Generic layout: a CSV with one row per image.

Columns: `case_id` (patient/case), `image_path` (relative to the CSV's folder, or absolute),
optional `label` and optional `view`, and optional case attributes for subgroup analysis:
`sex`, `age` (years, or a DICOM-style "045Y"; stored as a 10-year band) and `site` (HAM10000's
localization names) - mapped to fixed tokens by `data_pipelines.attributes` (`case/attr/sex`,
`case/attr/age_band`, `case/attr/site`; with a `view` column also `case/attr/view`), never
copied as text. Sex, age and site come from the case's first row; view is per image.

With `task="multilabel"` the label cell holds the positive label names separated by `|`
(empty = all negative). `label_names` fixes the vocabulary and its
order; otherwise it is inferred from the CSV and sorted. A CSV without a `label` column is an
unlabelled set (fine for pretraining), unless `label_names` is given or a column is spelt
`Label`/`LABEL`: then it is an error, not a silently unlabelled set. The CSV must be UTF-8 (a
BOM is fine). Rows are named in rejections by CSV line number (`file.csv:17`), never by their
path or case id.
"""
import collections
import csv
import os

from data_pipelines import attributes as attrs_
from data_pipelines import schema
from data_pipelines.writer import SourceCase, SourceData, SourceImage, file_loader

REQUIRED_COLUMNS = ("case_id", "image_path")


def read_csv_rows(path, required=REQUIRED_COLUMNS, columns_out=None):
    """Yields (line_number, row dict); raises ValueError naming missing columns, or naming the
    first line that is not UTF-8 (a UTF-8 BOM is fine). `columns_out`, a list, receives the
    header's (stripped) column names once the header is read."""
    name = os.path.basename(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if columns_out is not None:
                columns_out[:] = columns
            missing = [c for c in required if c not in columns]
            if missing:
                raise ValueError(f"{name}: missing required column(s) {missing}; "
                                 f"found {columns}")
            reader.fieldnames = columns
            for i, row in enumerate(reader, start=2):
                yield i, {k: (v or "").strip() for k, v in row.items() if k is not None}
    except UnicodeDecodeError as e:
        raise ValueError(_not_utf8_message(path, name, e)) from None


def _not_utf8_message(path, name, error):
    """Names the first line of `path` that does not decode as UTF-8 (a newline byte is never
    part of a multi-byte UTF-8 sequence, so lines can be checked one by one)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"{name}: line {number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                        f"at column {e.start + 1}; the file looks like Latin-1/Windows-1252 "
                        f"or another legacy encoding); re-save the CSV as UTF-8 (e.g. "
                        f"\"CSV UTF-8\" in Excel, or iconv -f latin1 -t utf-8)")
    return f"{name}: not valid UTF-8 ({error.reason}); re-save the CSV as UTF-8"


def group_cases(rows, csv_name, label_names, task, rejected, resolve_path,
                parse_label=None):
    """Shared by CSV-driven sources: groups (line, case_key, path, label_text, view[, attrs])
    rows into SourceCases, rejecting unknown labels, conflicting labels within a case, empty
    paths and duplicate images, and reporting cases left with no image. Returns (cases,
    items_read).

    `attrs`, optional, is the row's {attribute: token} (already mapped by
    `data_pipelines.attributes`). A case takes its first kept row's tokens, except for the
    image-level attributes (schema.IMAGE_LEVEL_ATTRIBUTES, e.g. view), which become a list with
    one token per image for the writer to combine over the images it writes."""
    index = {name: i for i, name in enumerate(label_names)}
    by_case = collections.OrderedDict()
    items_read = 0
    for row in rows:
        line, key, path, label_text, view = row[:5]
        row_attrs = row[5] if len(row) > 5 else None
        items_read += 1
        item = f"{csv_name}:{line}"
        if not key:
            rejected.append({"item": item, "kind": "image", "reason": "empty case_id"})
            continue
        entry = by_case.setdefault(key, {"rows": [], "lines": []})
        entry["lines"].append(line)
        if not path:
            rejected.append({"item": item, "kind": "image", "reason": "empty image_path"})
            continue
        try:
            label = (parse_label or _parse_label)(label_text, index, task)
        except ValueError as e:
            rejected.append({"item": item, "kind": "image", "reason": str(e)})
            continue
        entry["rows"].append((item, path, label, view, row_attrs or {}))
    cases = []
    for key, entry in by_case.items():
        lines = entry["lines"]
        span = f"{csv_name}:{lines[0]}" + (f"-{lines[-1]}" if len(lines) > 1 else "")
        labels = {repr(l): l for _, _, l, _, _ in entry["rows"] if l is not None}
        if len(labels) > 1:
            for item, _, _, _, _ in entry["rows"]:
                rejected.append({"item": item, "kind": "image", "reason":
                                 f"conflicting labels within one case ({span}): "
                                 f"{sorted(labels)}"})
            rejected.append({"item": f"case at {span}", "kind": "case",
                             "reason": "conflicting labels; every row of the case rejected"})
            continue
        images, seen, kept_attrs = [], {}, []
        for item, path, _, view, row_attrs in entry["rows"]:
            full = resolve_path(path)
            # "a.png", "./a.png" and "sub/../a.png" name one file
            same = os.path.normcase(os.path.normpath(os.path.abspath(full)))
            if same in seen:
                rejected.append({"item": item, "kind": "image",
                                 "reason": f"duplicate image within the case (same file as "
                                           f"{seen[same]})"})
                continue
            seen[same] = item
            images.append(SourceImage(item=item, load=file_loader(full), view=view))
            kept_attrs.append(row_attrs)
        if not images:
            rejected.append({"item": f"case at {span}", "kind": "case",
                             "reason": "empty case: every row was rejected"})
            continue
        label = next(iter(labels.values())) if labels else None
        cases.append(SourceCase(key=key, images=images, label=label, item=f"case at {span}",
                                attributes=_case_attributes(kept_attrs)))
    return cases, items_read


def _case_attributes(rows):
    """The case's attributes from its kept rows' {name: token} (see `group_cases`)."""
    out = {}
    for name, value in rows[0].items():
        if name in schema.IMAGE_LEVEL_ATTRIBUTES:
            out[name] = [r.get(name, schema.UNKNOWN) for r in rows]
        else:
            out[name] = value
    return out


ATTRIBUTE_COLUMNS = {"sex": ("sex", attrs_.sex), "age": ("age_band", attrs_.age_band),
                     "site": ("site", attrs_.site), "view": ("view", attrs_.view)}


def row_attributes(row, columns):
    """{attribute: token} of a folder-CSV row for the optional attribute columns present."""
    return {name: fn(row.get(col, "")) for col, (name, fn) in ATTRIBUTE_COLUMNS.items()
            if col in columns}


def _parse_label(text, index, task):
    if task == "multiclass":
        if text == "":
            return None
        if text not in index:
            raise ValueError(f"unknown label {text!r} (known: {', '.join(index)})")
        return index[text]
    names = [t.strip() for t in text.split("|") if t.strip()]
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown} (known: {', '.join(index)})")
    codes = [0] * len(index)
    for n in names:
        codes[index[n]] = 1
    return codes


def _check_label_column(csv_name, columns, label_names):
    """A CSV without a `label` column is an unlabelled set, unless the user clearly meant one:
    `label_names` given, or a column spelt "Label"/"LABEL"."""
    near = [c for c in columns if c.lower() == "label"]
    if near:
        raise ValueError(f"{csv_name}: the label column must be called 'label' (lower case), "
                         f"found {near[0]!r}; columns found: {columns}")
    if label_names:
        raise ValueError(f"{csv_name}: --label_names was given but the CSV has no 'label' "
                         f"column (columns found: {columns}); the label column must be "
                         f"called 'label' (rename it, or drop --label_names for an "
                         f"unlabelled set)")


def build(input_path=None, label_names=None, task="multiclass", **_):
    if not input_path:
        raise ValueError("the folder source needs --input=path/to/images.csv")
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"--input CSV not found: {input_path}")
    if task not in ("multiclass", "multilabel"):
        raise ValueError(f"unknown task {task!r}")
    base = os.path.dirname(os.path.abspath(input_path))
    csv_name = os.path.basename(input_path)
    columns = []
    rows = list(read_csv_rows(input_path, columns_out=columns))
    has_label = "label" in columns
    if not has_label:
        _check_label_column(csv_name, columns, label_names)
    if label_names:
        names = list(label_names)
        if len(set(names)) != len(names):
            raise ValueError(f"--label_names has duplicates: {names}")
    elif has_label:
        found = set()
        for _, r in rows:
            parts = r["label"].split("|") if task == "multilabel" else [r["label"]]
            found.update(p.strip() for p in parts if p.strip())
        names = sorted(found)
    else:
        names = []
    if task == "multiclass" and has_label and not names:
        raise ValueError(f"{csv_name}: the label column is empty in every row")
    rejected = []
    cases, items_read = group_cases(
        ((line, r["case_id"], r["image_path"], r.get("label", ""), r.get("view", ""),
          row_attributes(r, columns)) for line, r in rows),
        csv_name, names, task, rejected,
        resolve_path=lambda p: p if os.path.isabs(p) else os.path.join(base, p))
    return SourceData(name="folder", task=task, label_names=names, cases=cases,
                      rejected=rejected, items_read=items_read)

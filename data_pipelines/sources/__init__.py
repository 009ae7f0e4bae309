"""Dataset sources: one converter per upstream layout, each returning a `writer.SourceData`.

A source only reads metadata and describes cases (raw id, image loaders, label); the writer
loads, validates, hashes and writes. Rows a source cannot use (unknown label, conflicting labels,
empty path) go into `SourceData.rejected` with the row that caused them.
"""
SOURCES = ("ph2", "folder", "ham10000", "chexpert", "nih_cxr14", "medmnist", "dicom")


def get_source(name):
    """Returns the module implementing `build(...)` for a source name (one module per name in
    SOURCES, imported on first use: a source's optional dependencies load only when used)."""
    import importlib
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; expected one of {SOURCES}")
    return importlib.import_module(f"data_pipelines.sources.{name}")

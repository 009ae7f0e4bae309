"""Dataset sources: one converter per upstream layout, each returning a `writer.SourceData`.

A source only reads metadata and describes cases (raw id, image loaders, label); the writer
loads, validates, hashes and writes. Rows a source cannot use (unknown label, conflicting labels,
empty path) go into `SourceData.rejected` with the row that caused them.
"""
SOURCES = ("ph2", "folder", "ham10000", "chexpert", "nih_cxr14", "medmnist", "dicom")


def get_source(name):
    """Returns the module implementing `build(...)` for a source name."""
    if name == "ph2":
        from data_pipelines.sources import ph2 as module
    elif name == "folder":
        from data_pipelines.sources import folder as module
    else:
        import importlib
        if name not in SOURCES:
            raise ValueError(f"unknown source {name!r}; expected one of {SOURCES}")
        try:
            module = importlib.import_module(f"data_pipelines.sources.{name}")
        except ModuleNotFoundError:
            raise NotImplementedError(f"source {name!r} is not implemented yet") from None
    return module

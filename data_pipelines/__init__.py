"""Case-bag TFRecords: schema, writer, streaming reader, splits and dataset sources."""
__version__ = "0.1.0"

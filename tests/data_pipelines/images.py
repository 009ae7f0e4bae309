"""Builds small encoded test images with PIL (independent of the code under test)."""
import io

import numpy as np
from PIL import Image


def encode(array, fmt, mode=None):
    """Encodes a numpy array as PNG/JPEG/BMP/TIFF bytes."""
    im = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def coded_rgb(value, size=8):
    """A flat RGB image whose red channel carries `value` (0..255): lets tests identify which
    image of which case came out of the pipeline."""
    a = np.zeros((size, size, 3), np.uint8)
    a[..., 0] = value
    a[..., 1] = 255 - value
    return a

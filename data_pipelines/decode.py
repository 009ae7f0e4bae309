"""Image bytes in, float32 RGB in [0, 1] out — in the pipeline (TF) and at write time (PIL).

`decode_image` runs inside tf.data and in the exported serving graph, so training, evaluation
and serving decode identically. `resize_image` is the one deterministic resize used for
evaluation and serving. `validate_and_normalize` runs once per image when records are written:
it rejects what cannot be decoded (with a reason) and transcodes formats other than PNG/JPEG
(BMP, TIFF, 16-bit greyscale, ...) to lossless PNG, so records only hold PNG or JPEG.
"""
import io

import numpy as np
import tensorflow as tf


def decode_image(encoded):
    """PNG (8/16-bit), JPEG, BMP or GIF bytes -> float32 [H, W, 3] in [0, 1].

    Greyscale is tiled to RGB; an alpha channel is dropped. 16-bit PNGs keep their precision
    (tf.io.decode_image decodes PNG as uint16 whenever the requested dtype is not uint8)."""
    image = tf.io.decode_image(encoded, channels=0, dtype=tf.float32, expand_animations=False)
    return tf.clip_by_value(_to_rgb(image), 0.0, 1.0)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _to_rgb(image):
    """[H, W, C] with C in 1..4 -> [H, W, 3]: grey tiled, alpha dropped."""
    channels = tf.shape(image)[-1]
    grey = lambda: tf.concat([image[..., :1]] * 3, axis=-1)  # noqa: E731 (no uint16 Tile)
    image = tf.cond(channels < 3, grey, lambda: image[..., :3])
    image.set_shape([None, None, 3])
    return image


def decode_to_pixels(encoded):
    """Image bytes -> (pixels, shape, is_16bit): the image's own integer samples as a flat
    uint8 vector (16-bit PNGs as their uint16 samples bitcast to byte pairs), [H, W, 3], and
    whether it is 16-bit. The compact in-memory form of `reader`'s decoded-case cache;
    `pixels_to_float` inverts it to what `decode_image` returns."""
    is_16bit = tf.logical_and(tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_SIGNATURE),
                              tf.equal(tf.strings.substr(encoded, 24, 1), b"\x10"))

    def sixteen():
        image = _to_rgb(tf.io.decode_png(encoded, channels=0, dtype=tf.uint16))
        return tf.reshape(tf.bitcast(image, tf.uint8), [-1]), tf.shape(image)

    def eight():
        image = _to_rgb(tf.io.decode_image(encoded, channels=0, dtype=tf.uint8,
                                           expand_animations=False))
        return tf.reshape(image, [-1]), tf.shape(image)

    pixels, shape = tf.cond(is_16bit, sixteen, eight)
    return pixels, shape, is_16bit


def pixels_to_float(pixels, shape, is_16bit):
    """Inverse of `decode_to_pixels`: float32 [H, W, 3] in [0, 1], as `decode_image`."""
    return tf.cond(
        is_16bit,
        lambda: tf.image.convert_image_dtype(
            tf.bitcast(tf.reshape(pixels, tf.concat([shape, [2]], 0)), tf.uint16), tf.float32),
        lambda: tf.image.convert_image_dtype(tf.reshape(pixels, shape), tf.float32))


def resize_image(image, size):
    """Deterministic evaluation/serving resize to size x size (bilinear, antialiased)."""
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    image.set_shape([size, size, 3])
    return tf.clip_by_value(image, 0.0, 1.0)


class ImageRejected(ValueError):
    """An image that cannot become part of a record; the message is the reason."""


def validate_and_normalize(data, resize_to=None):
    """Checks one encoded image at write time. Returns (bytes, format, (height, width)).

    Raises ImageRejected with a short reason for zero-byte, truncated, corrupt or unsupported
    data. PNG and JPEG are kept byte-for-byte unless `resize_to` asks for a smaller copy (the
    shorter side becomes `resize_to`); anything else is re-encoded as PNG."""
    from PIL import Image, UnidentifiedImageError  # write-time only dependency

    if data is None or len(data) == 0:
        raise ImageRejected("zero-byte image file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").upper()
            im.load()  # forces a full decode: catches truncation and corrupt scan data
            size = im.size
            mode = im.mode
            pixels = im.copy() if (resize_to or fmt not in ("PNG", "JPEG")) else None
    except UnidentifiedImageError:
        raise ImageRejected("not a recognised image format (corrupt bytes?)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected(f"cannot decode image: {e}") from None
    if size[0] == 0 or size[1] == 0:
        raise ImageRejected("image has zero width or height")
    if pixels is None:
        return data, ("png" if fmt == "PNG" else "jpeg"), (size[1], size[0])
    pixels = _to_png_mode(pixels, mode)
    if resize_to and min(pixels.size) > resize_to:
        w, h = pixels.size
        scale = resize_to / min(w, h)
        pixels = pixels.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                               Image.BILINEAR if pixels.mode.startswith("I") else Image.LANCZOS)
    buf = io.BytesIO()
    pixels.save(buf, format="PNG")
    return buf.getvalue(), "png", (pixels.size[1], pixels.size[0])


def _to_png_mode(im, mode):
    """Maps PIL modes onto ones PNG stores losslessly (L, LA, RGB, RGBA, I;16)."""
    from PIL import Image

    if mode in ("L", "LA", "RGB", "RGBA", "I;16"):
        return im
    if mode in ("I;16B", "I;16L", "I;16N"):
        return Image.fromarray(np.asarray(im).astype(np.uint16))
    if mode in ("I", "F"):  # 32-bit int/float greyscale: rescale to the 16-bit range
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 65535.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.round().astype(np.uint16))
    if mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGBA" if "A" in mode or "transparency" in im.info else "RGB")
    return im.convert("RGB")

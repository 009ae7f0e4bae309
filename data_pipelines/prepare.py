"""What happens to one image before it may enter a record (write time, once per image).

  bytes --size check--> (PNG/JPEG: kept; other formats or --image_size: PIL -> lossless PNG)
        --metadata stripped losslessly (`metadata.strip_metadata`)-->
        --decoded by the reader's own TensorFlow decode (`decode.decode_to_pixels`)-->
        --SHA-256 of the decoded pixels--> PreparedImage

Why the TensorFlow decode: PIL and TensorFlow do not accept the same files (PIL decodes a PNG
whose IDAT CRC is wrong; TensorFlow does not), and an image that passed a PIL check but fails
in the reader kills training with an error naming no case. Decoding with the reader's own op at
write time turns that into a rejection naming the item.

The pixel hash (`pixel_sha256`) is of what the model sees: the decoded samples after the
reader's channel fix-up (grey tiled to RGB, alpha dropped), with their shape and bit depth, so
two files holding the same picture (a re-saved PNG, a copy with other metadata, an RGBA twin)
get the same hash. It identifies content, not a person, and carries no patient information.
"""
import contextlib
import dataclasses
import hashlib
import io
from typing import List, Tuple

import numpy as np
import tensorflow as tf

from data_pipelines import metadata
from data_pipelines.decode import ImageRejected, decode_to_pixels, validate_and_normalize

DEFAULT_MAX_PIXELS = 100_000_000  # 100 Mpx: far above any radiograph or dermoscopy image


@dataclasses.dataclass
class PreparedImage:
    data: bytes  # what is stored: PNG or JPEG, metadata removed
    format: str  # "png" | "jpeg"
    shape: Tuple[int, int, int]  # decoded [H, W, 3]
    bits: int  # 8 or 16
    pixel_sha256: str  # hex
    removed: List[str]  # metadata chunks/segments removed (names only)


_decode = tf.function(decode_to_pixels, input_signature=[tf.TensorSpec([], tf.string)])


def pixel_digest(pixels, shape, bits):
    """SHA-256 hex of decoded samples (flat uint8; 16-bit samples as little-endian byte
    pairs, as `decode_to_pixels` returns them) with their shape and bit depth."""
    h = hashlib.sha256(f"micle-tf pixels v1 {shape[0]}x{shape[1]}x{shape[2]} {bits}-bit "
                       .encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def tf_decode(data):
    """(pixels, shape, bits) by the reader's decode op; ImageRejected if TensorFlow cannot
    decode the bytes."""
    try:
        pixels, shape, is_16bit = _decode(tf.constant(data))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        msg = e.message.split("\n")[0].strip()
        raise ImageRejected(f"cannot decode image with TensorFlow, so the reader could not "
                            f"either ({msg})") from None
    shape = tuple(int(v) for v in shape.numpy())
    if shape[0] == 0 or shape[1] == 0:
        raise ImageRejected("image has zero width or height")
    return pixels.numpy(), shape, 16 if bool(is_16bit.numpy()) else 8


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels):
    """PIL's own decompression-bomb guard replaced by ours for the duration of a call."""
    from PIL import Image
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_declared_size(data, max_pixels):
    size = metadata.declared_size(data)
    if size is None:  # not PNG/JPEG: ask PIL for the header (no pixel data decoded)
        from PIL import Image, UnidentifiedImageError
        try:
            with _pil_pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as im:
                size = im.size
        except UnidentifiedImageError:
            raise ImageRejected("not a recognised image format (corrupt bytes?)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageRejected(f"cannot decode image: {e}") from None
    width, height = size
    if max_pixels and width * height > max_pixels:
        raise ImageRejected(f"declared size {width}x{height} = {width * height / 1e6:.1f} Mpx "
                            f"exceeds the pixel limit of {max_pixels / 1e6:g} Mpx "
                            "(--max_image_pixels)")


def _kind(data):
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"\xff\xd8":
        return "jpeg"
    return None


def prepare_image(data, resize_to=None, max_pixels=DEFAULT_MAX_PIXELS):
    """Checks, cleans, decodes and hashes one encoded image. Returns a PreparedImage or raises
    ImageRejected with a short reason (zero bytes, over the pixel limit, not decodable by PIL
    for transcoding, not decodable by TensorFlow, malformed chunk structure)."""
    if data is None or len(data) == 0:
        raise ImageRejected("zero-byte image file")
    _check_declared_size(data, max_pixels)
    kind = _kind(data)
    if kind is None or resize_to:  # transcode (PIL decodes fully: catches truncation)
        with _pil_pixel_limit(max_pixels):
            data, kind, _ = validate_and_normalize(data, resize_to=resize_to)
    try:
        clean, removed = metadata.strip_metadata(data)
    except metadata.MetadataError as e:
        raise ImageRejected(f"cannot decode image: malformed {kind.upper()} structure "
                            f"({e})") from None
    pixels, shape, bits = tf_decode(clean)
    if removed:  # the stripper must never change pixels: prove it on this very file
        try:
            before = tf_decode(data)
        except ImageRejected:
            before = None  # only the cleaned bytes decode: they are what is stored
        if before is not None and (before[1:] != (shape, bits)
                                   or not np.array_equal(before[0], pixels)):
            raise ImageRejected(f"removing metadata ({', '.join(removed)}) would change the "
                                "decoded pixels; not stored (please report this file type)")
    return PreparedImage(data=clean, format=kind, shape=shape, bits=bits,
                         pixel_sha256=pixel_digest(pixels, shape, bits), removed=removed)

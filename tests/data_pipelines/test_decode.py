import numpy as np
import pytest
import tensorflow as tf

from data_pipelines.decode import (ImageRejected, decode_image, decode_to_pixels, pixels_to_float,
                                   resize_image, validate_and_normalize)
from tests.data_pipelines.images import encode

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
RGBA = np.concatenate([RGB, RNG.integers(0, 256, (6, 5, 1), dtype=np.uint8)], axis=-1)


def _decode(data):
    return decode_image(tf.constant(data)).numpy()


@pytest.mark.parametrize("fmt", ["PNG", "BMP"])
def test_lossless_rgb_gray_rgba(fmt):
    np.testing.assert_allclose(_decode(encode(RGB, fmt)), RGB / 255.0, atol=1e-6)
    out = _decode(encode(GRAY, fmt))
    assert out.shape == (6, 5, 3)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], GRAY / 255.0, atol=1e-6)
    if fmt == "PNG":  # alpha is dropped, colour kept
        np.testing.assert_allclose(_decode(encode(RGBA, fmt)), RGB / 255.0, atol=1e-6)


def test_png_gray_alpha():
    la = np.stack([GRAY, np.full_like(GRAY, 7)], axis=-1)
    out = _decode(encode(la, "PNG", mode="LA"))
    np.testing.assert_allclose(out[..., 1], GRAY / 255.0, atol=1e-6)


def test_png_16_bit_keeps_precision():
    a = np.array([[0, 1, 1000], [40000, 65534, 65535]], dtype=np.uint16)
    out = _decode(encode(a, "PNG"))
    np.testing.assert_allclose(out[..., 0], a / 65535.0, atol=1e-7)
    assert out[0, 1, 0] > 0  # a 1/65535 step survives (an 8-bit path would round it to 0)


_YY, _XX = np.mgrid[0:24, 0:20]
SMOOTH_GRAY = (_YY * 8 + _XX * 3).astype(np.uint8)
SMOOTH_RGB = np.stack([SMOOTH_GRAY, 255 - SMOOTH_GRAY, (_XX * 12).astype(np.uint8)], -1)


@pytest.mark.parametrize("big", [SMOOTH_RGB, SMOOTH_GRAY])
def test_jpeg(big):
    out = _decode(encode(big, "JPEG"))
    ref = big / 255.0 if big.ndim == 3 else np.repeat(big[..., None] / 255.0, 3, -1)
    assert out.shape == ref.shape
    assert np.abs(out - ref).mean() < 0.02  # lossy, but close on smooth content


def test_resize_is_deterministic_and_in_range():
    img = tf.constant(RGB / 255.0, tf.float32)
    a, b = resize_image(img, 16), resize_image(img, 16)
    assert a.shape == (16, 16, 3)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert 0.0 <= a.numpy().min() and a.numpy().max() <= 1.0


def test_validate_keeps_png_and_jpeg_bytes():
    png, jpg = encode(RGB, "PNG"), encode(RGB, "JPEG")
    assert validate_and_normalize(png) == (png, "png", (6, 5))
    assert validate_and_normalize(jpg)[:2] == (jpg, "jpeg")


def test_validate_transcodes_bmp_and_tiff_losslessly():
    for fmt in ("BMP", "TIFF"):
        data, f, shape = validate_and_normalize(encode(RGB, fmt))
        assert f == "png" and shape == (6, 5)
        np.testing.assert_allclose(_decode(data), RGB / 255.0, atol=1e-6)
    a16 = np.array([[0, 300], [50000, 65535]], dtype=np.uint16)
    data, f, _ = validate_and_normalize(encode(a16, "TIFF"))
    np.testing.assert_allclose(_decode(data)[..., 0], a16 / 65535.0, atol=1e-7)


def test_validate_resizes_shorter_side():
    big = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    data, f, shape = validate_and_normalize(encode(big, "PNG"), resize_to=20)
    assert f == "png" and shape == (20, 30)


@pytest.mark.parametrize("data,reason", [
    (b"", "zero-byte"),
    (b"this is not an image at all", "not a recognised image"),
])
def test_validate_rejects_garbage(data, reason):
    with pytest.raises(ImageRejected, match=reason):
        validate_and_normalize(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_validate_rejects_truncated(fmt):
    big = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(big, fmt)
    with pytest.raises(ImageRejected, match="cannot decode"):
        validate_and_normalize(data[: len(data) // 2])


def test_decode_garbage_raises_in_tf():
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_image(tf.constant(b"garbage bytes"))


@pytest.mark.parametrize("kind", ["png_rgb", "png_gray", "png_rgba", "png_la", "png_16", "jpeg",
                                  "bmp"])
def test_pixels_round_trip_equals_decode_image(kind):
    """The decoded-case cache stores an image's own samples (8- or 16-bit) and gives back
    exactly what decode_image gives."""
    a16 = np.array([[0, 1, 1000], [40000, 65534, 65535]], dtype=np.uint16)
    data = {"png_rgb": encode(RGB, "PNG"), "png_gray": encode(GRAY, "PNG"),
            "png_rgba": encode(RGBA, "PNG"), "png_16": encode(a16, "PNG"),
            "png_la": encode(np.stack([GRAY, GRAY // 2], -1), "PNG", mode="LA"),
            "jpeg": encode(SMOOTH_RGB, "JPEG"), "bmp": encode(RGB, "BMP")}[kind]
    pixels, shape, is_16bit = decode_to_pixels(tf.constant(data))
    h, w = (6, 5) if kind not in ("png_16", "jpeg") else ((2, 3) if kind == "png_16" else (24, 20))
    assert list(shape.numpy()) == [h, w, 3] and bool(is_16bit) == (kind == "png_16")
    assert pixels.dtype == tf.uint8 and pixels.shape == (h * w * 3 * (2 if kind == "png_16" else 1),)
    np.testing.assert_allclose(pixels_to_float(pixels, shape, is_16bit).numpy(), _decode(data),
                               atol=1e-7, rtol=0)

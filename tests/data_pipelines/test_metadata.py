"""data_pipelines.metadata: identifying metadata removed from PNG/JPEG bytes, pixels unchanged.

Fixtures are built with PIL where it can write the metadata and by hand (struct + zlib.crc32)
where it cannot. Every dirty fixture plants the same string; after stripping it must be gone
(raw and zlib-compressed) and the decoded pixels must be identical, with PIL and with
TensorFlow. Where a stripped file can be predicted exactly (the same image saved without
metadata), the expectation is that exact byte string.
"""
import io
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageCms, PngImagePlugin

from data_pipelines.metadata import MetadataError, declared_size, strip_metadata

PLANTED = b"PATIENT=Jane Doe 1234"
W, H = 37, 23
SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# --- independent helpers -------------------------------------------------------------------

def png_chunk(ctype, body):
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def png_chunks(data):
    """[(type, raw chunk bytes)] and the bytes after IEND."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while True:
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        out.append((ctype, data[pos:pos + 12 + length]))
        pos += 12 + length
        if ctype == b"IEND":
            return out, data[pos:]


def insert_before_idat(png, *chunks):
    i = png.index(b"IDAT") - 4
    return png[:i] + b"".join(chunks) + png[i:]


def jpeg_segment(marker, body):
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def first_segment(jpeg, marker):
    """(start, end) of the first segment with this marker before the first scan."""
    pos = 2
    while True:
        assert jpeg[pos] == 0xFF
        m = jpeg[pos + 1]
        (length,) = struct.unpack(">H", jpeg[pos + 2:pos + 4])
        if m == marker:
            return pos, pos + 2 + length
        assert m != 0xDA, "not found before the first scan"
        pos += 2 + length


def save(im, fmt, **kwargs):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def pil_pixels(data):
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def tf_pixels(data, dtype=tf.uint8):
    return tf.io.decode_image(data, channels=0, dtype=dtype, expand_animations=False).numpy()


def assert_planted_gone(original, stripped):
    assert PLANTED in original  # the fixture really carries it (sanity)
    for form in (PLANTED, zlib.compress(PLANTED), PLANTED.decode().encode("utf-16-be")):
        assert form not in stripped


def exif_bytes():
    exif = Image.Exif()
    exif[0x010E] = PLANTED.decode()  # ImageDescription
    exif[0x013B] = PLANTED.decode()  # Artist
    exif[0x0112] = 6  # Orientation: rotate 90 -- ignored by TF's decoder and np.asarray
    return exif.tobytes()


rng = np.random.default_rng(1234)


def png_image(kind):
    if kind == "RGB":
        return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)), {}
    if kind == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (H, W, 4), dtype=np.uint8)), {}
    if kind == "L":
        return Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)), {}
    if kind == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (H, W), dtype=np.uint16))
        assert im.mode == "I;16"
        return im, {}
    assert kind == "P"
    im = Image.frombytes("P", (W, H), rng.integers(0, 16, (H, W), dtype=np.uint8).tobytes())
    im.putpalette(bytes(rng.integers(0, 256, 48, dtype=np.uint8)))
    return im, {"transparency": bytes(range(0, 256, 16))}  # a 16-entry tRNS


# Chunks the stripped PNG keeps (when their length is valid for the image).
PNG_KEPT = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT",
            b"pHYs"}


# --- PNG -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["RGB", "RGBA", "P", "L", "I;16"])
def test_png_text_chunks_removed_pixels_identical(kind):
    im, kwargs = png_image(kind)
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", PLANTED.decode())                      # tEXt
    info.add_text("Comment", PLANTED.decode(), zip=True)            # zTXt
    info.add_itxt("Name", PLANTED.decode(), lang="en", tkey="Name")  # iTXt
    info.add_itxt("Note", PLANTED.decode(), zip=True)               # compressed iTXt
    pil_png = save(im, "PNG", pnginfo=info, exif=exif_bytes(), dpi=(300, 300), **kwargs)
    dirty = insert_before_idat(
        pil_png,
        png_chunk(b"tIME", struct.pack(">HBBBBB", 2024, 5, 17, 10, 30, 0)),
        png_chunk(b"iCCP", PLANTED + b"\x00\x00" + zlib.compress(SRGB_PROFILE)),
        png_chunk(b"gAMA", struct.pack(">I", 45455)),
        png_chunk(b"prVt", b"private " + PLANTED),
        png_chunk(b"bKGD", b"\x00\x00" if kind in ("L", "I;16") else
                  b"\x00" if kind == "P" else b"\x00\x00" * 3),
    ) + PLANTED + b" after IEND"
    chunks, _ = png_chunks(dirty)
    types = [t for t, _ in chunks]
    assert {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME", b"iCCP", b"prVt", b"pHYs"} <= set(types)
    assert zlib.compress(PLANTED) in dirty

    stripped, removed = strip_metadata(dirty)

    # Exactly the whitelisted chunks, copied byte for byte (CRCs included), in their order.
    assert stripped == b"\x89PNG\r\n\x1a\n" + b"".join(raw for t, raw in chunks if t in PNG_KEPT)
    expected_removed = list(dict.fromkeys(t.decode() for t in types if t not in PNG_KEPT))
    assert removed == expected_removed + ["trailing bytes"]
    assert (b"tRNS" in stripped) == (kind == "P")
    assert_planted_gone(dirty, stripped)

    np.testing.assert_array_equal(pil_pixels(stripped), pil_pixels(dirty))
    dtype = tf.uint16 if kind == "I;16" else tf.uint8
    before, after = tf_pixels(dirty, dtype), tf_pixels(stripped, dtype)
    assert before.dtype == after.dtype == dtype.as_numpy_dtype
    assert before.shape == (H, W, {"RGB": 3, "RGBA": 4, "P": 4, "L": 1, "I;16": 1}[kind])
    np.testing.assert_array_equal(after, before)
    if kind == "I;16":  # the 16-bit samples survive, not a rescaled 8-bit copy
        np.testing.assert_array_equal(after[..., 0], np.asarray(im))
    # and the same pixels as the image saved without any metadata
    np.testing.assert_array_equal(tf_pixels(save(im, "PNG", **kwargs), dtype), after)


def test_png_display_chunks_kept_only_with_valid_length():
    im, _ = png_image("RGB")
    clean = save(im, "PNG")
    kept = [png_chunk(b"sRGB", b"\x00"), png_chunk(b"sBIT", b"\x08\x08\x08"),
            png_chunk(b"cHRM", bytes(range(32))), png_chunk(b"pHYs", bytes(9)),
            png_chunk(b"gAMA", struct.pack(">I", 45455))]
    dirty = insert_before_idat(
        clean, *kept,
        png_chunk(b"gAMA", PLANTED),                 # wrong length: could hide any bytes
        png_chunk(b"sBIT", PLANTED),
        png_chunk(b"tRNS", PLANTED),                 # RGB tRNS is 6 bytes
        png_chunk(b"PLTE", PLANTED[:18]),            # a "suggested palette": never used
        png_chunk(b"sPLT", b"pal\x00\x08" + PLANTED),
        png_chunk(b"hIST", PLANTED[:20]))
    stripped, removed = strip_metadata(dirty)
    assert stripped == insert_before_idat(clean, *kept)
    assert removed == ["gAMA", "sBIT", "tRNS", "PLTE", "sPLT", "hIST"]
    assert PLANTED[:18] not in stripped
    np.testing.assert_array_equal(tf_pixels(stripped), tf_pixels(dirty))


def test_png_iend_with_data_rewritten_empty():
    clean = save(png_image("L")[0], "PNG")
    dirty = clean[:-12] + png_chunk(b"IEND", PLANTED)
    stripped, removed = strip_metadata(dirty)
    assert stripped == clean
    assert removed == ["IEND data"]


def test_apng_animation_chunks_removed_first_frame_identical():
    frames = [png_image("RGB")[0] for _ in range(3)]
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", PLANTED.decode())
    dirty = save(frames[0], "PNG", save_all=True, append_images=frames[1:], pnginfo=info)
    types = {t for t, _ in png_chunks(dirty)[0]}
    assert {b"acTL", b"fcTL", b"fdAT"} <= types
    stripped, removed = strip_metadata(dirty)
    assert set(removed) == {"tEXt", "acTL", "fcTL", "fdAT"}
    assert {t for t, _ in png_chunks(stripped)[0]} == {b"IHDR", b"IDAT", b"IEND"}
    assert_planted_gone(dirty, stripped)
    np.testing.assert_array_equal(tf_pixels(stripped), tf_pixels(dirty))
    np.testing.assert_array_equal(pil_pixels(stripped), np.asarray(frames[0]))
    np.testing.assert_array_equal(pil_pixels(dirty), np.asarray(frames[0]))


def test_png_bad_idat_crc_kept_and_still_rejected_by_tf():
    im, _ = png_image("RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text("Patient", PLANTED.decode())
    good = save(im, "PNG", pnginfo=info)
    chunks, _ = png_chunks(good)
    idat = next(raw for t, raw in chunks if t == b"IDAT")
    bad_idat = idat[:-4] + bytes(b ^ 0xFF for b in idat[-4:])
    bad = good.replace(idat, bad_idat)
    stripped, removed = strip_metadata(bad)
    assert removed == ["tEXt"]
    assert bad_idat in stripped and idat not in stripped  # not "repaired"
    for data in (bad, stripped):
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.decode_png(data)


def test_png_unknown_critical_chunk_rejected():
    clean = save(png_image("RGB")[0], "PNG")
    with pytest.raises(MetadataError, match="critical"):
        strip_metadata(insert_before_idat(clean, png_chunk(b"ABCD", PLANTED)))


# --- JPEG ----------------------------------------------------------------------------------

def jpeg_image(mode):
    shape = {"RGB": (H, W, 3), "L": (H, W), "CMYK": (H, W, 4)}[mode]
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


XMP = jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><dc:creator>" + PLANTED
                   + b"</dc:creator></x:xmpmeta>")
IPTC = jpeg_segment(0xED, b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00"
                    + struct.pack(">I", 5 + len(PLANTED)) + b"\x1c\x02\x50"
                    + struct.pack(">H", len(PLANTED)) + PLANTED + b"\x00")
JFXX = jpeg_segment(0xE0, b"JFXX\x00\x13" + PLANTED)  # a JFIF extension (thumbnail) segment
APP3 = jpeg_segment(0xE3, b"META\x00" + PLANTED)
APP15 = jpeg_segment(0xEF, PLANTED)
COM = jpeg_segment(0xFE, PLANTED + b" between scans")


def has_jfif(jpeg):
    return jpeg[2:4] == b"\xff\xe0" and jpeg[6:11] == b"JFIF\x00"


def dirty_jpeg(mode, **options):
    """(dirty JPEG, the same image saved without metadata -- the expected strip result)."""
    im = jpeg_image(mode)
    clean = save(im, "JPEG", quality=90, **options)
    pil = save(im, "JPEG", quality=90, exif=exif_bytes(), comment=PLANTED,
               icc_profile=SRGB_PROFILE + PLANTED, **options)
    # PIL writes the metadata segments in front and leaves the rest of the file as it was
    dqt = first_segment(pil, 0xDB)[0]
    assert pil[dqt:] == clean[first_segment(clean, 0xDB)[0]:]
    head, tail = pil[:dqt], pil[dqt:]
    if has_jfif(clean):  # PIL writes JFIF, or Adobe APP14 for CMYK and keep_rgb=True
        start, end = first_segment(head, 0xE0)
        jfif = head[start + 4:end]
        assert jfif[:5] == b"JFIF\x00" and jfif[12:14] == b"\x00\x00" and len(jfif) == 14
        thumb = jpeg_segment(0xE0, jfif[:12] + b"\x04\x02" + PLANTED.ljust(24))  # 4x2 RGB
        head = head[:start] + thumb + head[end:]
    head += XMP + IPTC + JFXX + b"\xff\xff" + APP3 + b"garbage " + PLANTED + APP15
    tail = b"\xff\xff\xff" + tail  # fill bytes before DQT: kept, harmless
    sos = tail.index(b"\xff\xda")
    second_sos = tail.find(b"\xff\xda", sos + 2)
    if second_sos > 0:  # progressive: a comment between two scans
        tail = tail[:second_sos] + COM + tail[second_sos:]
    assert tail.endswith(b"\xff\xd9")
    tail = tail[:-2] + APP15 + b"\xff\xd9" + PLANTED + b"\xff\xd8\xff\xe1 MPF image"
    expected = clean[:first_segment(clean, 0xDB)[0]] + b"\xff\xff\xff" \
        + clean[first_segment(clean, 0xDB)[0]:]
    return head + tail, expected, im


@pytest.mark.parametrize("mode,options", [
    ("RGB", {}),
    ("RGB", {"progressive": True}),
    ("RGB", {"restart_marker_blocks": 2}),  # DRI + RSTn inside the scan data
    ("RGB", {"keep_rgb": True}),            # RGB components flagged by Adobe APP14
    ("L", {}),
    ("L", {"progressive": True}),
    ("CMYK", {}),
])
def test_jpeg_metadata_removed_pixels_identical(mode, options):
    dirty, expected, _ = dirty_jpeg(mode, **options)
    stripped, removed = strip_metadata(dirty)

    assert stripped == expected
    assert_planted_gone(dirty, stripped)
    want = ["APP1", "COM", "APP2", "APP13", "APP0", "APP3", "extraneous bytes", "APP15",
            "trailing bytes"]
    if has_jfif(expected):
        want.insert(0, "JFIF thumbnail")
    assert sorted(removed) == sorted(want) and len(removed) == len(set(removed))
    assert has_jfif(expected) == (mode != "CMYK" and not options.get("keep_rgb"))
    if not has_jfif(expected):
        assert stripped.startswith(b"\xff\xd8\xff\xee\x00\x0eAdobe")  # APP14 kept
    else:
        assert stripped.startswith(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")  # thumbnail-free

    np.testing.assert_array_equal(pil_pixels(stripped), pil_pixels(dirty))
    # TF decodes every variant, CMYK included: libjpeg-turbo outputs CMYK and TF converts it
    # to 3-channel RGB (tf.io.decode_jpeg returns [H, W, 3] for a CMYK JPEG).
    before = tf.io.decode_jpeg(dirty, channels=0).numpy()
    after = tf.io.decode_jpeg(stripped, channels=0).numpy()
    assert before.shape == (H, W, 1 if mode == "L" else 3)
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(tf_pixels(stripped), before)  # decode_image agrees


def test_cmyk_needs_the_adobe_segment():
    """Why APP14 "Adobe" is kept: without it TF decodes the same CMYK JPEG to other colours
    (the segment says the samples are stored inverted). PIL gives the same pixels either way."""
    clean = save(jpeg_image("CMYK"), "JPEG", quality=90)
    start, end = first_segment(clean, 0xEE)
    assert clean[start + 4:start + 9] == b"Adobe"
    without = clean[:start] + clean[end:]
    assert strip_metadata(clean) == (clean, [])
    assert not np.array_equal(tf.io.decode_jpeg(without).numpy(),
                              tf.io.decode_jpeg(clean).numpy())


def test_jpeg_segment_extras_trimmed():
    clean = save(jpeg_image("CMYK"), "JPEG", quality=90)
    start, end = first_segment(clean, 0xEE)
    padded = clean[:start] + jpeg_segment(0xEE, clean[start + 4:end] + PLANTED) + clean[end:]
    assert strip_metadata(padded) == (clean, ["Adobe extra bytes"])
    clean = save(jpeg_image("RGB"), "JPEG", quality=90)
    start, end = first_segment(clean, 0xE0)
    padded = clean[:start] + jpeg_segment(0xE0, clean[start + 4:end] + PLANTED) + clean[end:]
    assert strip_metadata(padded) == (clean, ["JFIF extra bytes"])
    # a non-Adobe APP14 is just another APPn
    other = clean[:2] + jpeg_segment(0xEE, b"Ducky" + PLANTED) + clean[2:]
    assert strip_metadata(other) == (clean, ["APP14"])


def test_jpeg_unsupported_marker_rejected():
    clean = save(jpeg_image("RGB"), "JPEG")
    with pytest.raises(MetadataError, match="FFC8"):
        strip_metadata(clean[:2] + jpeg_segment(0xC8, PLANTED) + clean[2:])


# --- clean files, idempotence, input types -------------------------------------------------

def clean_files():
    palette, trns = png_image("P")
    return {
        "png_rgb": save(png_image("RGB")[0], "PNG"),
        "png_palette_trns": save(palette, "PNG", **trns),
        "png_16bit": save(png_image("I;16")[0], "PNG"),
        "jpeg_baseline": save(jpeg_image("RGB"), "JPEG"),
        "jpeg_progressive": save(jpeg_image("RGB"), "JPEG", progressive=True),
        "jpeg_cmyk": save(jpeg_image("CMYK"), "JPEG"),
        "jpeg_restarts": save(jpeg_image("L"), "JPEG", restart_marker_rows=1),
    }


@pytest.mark.parametrize("name", sorted(clean_files()))
def test_clean_file_returned_unchanged(name):
    data = clean_files()[name]
    out, removed = strip_metadata(data)
    assert removed == []
    assert out is data


def test_strip_is_idempotent():
    png = insert_before_idat(save(png_image("RGBA")[0], "PNG"),
                             png_chunk(b"tEXt", b"Patient\x00" + PLANTED)) + PLANTED
    jpeg = dirty_jpeg("RGB", progressive=True)[0]
    for dirty in (png, jpeg):
        once, removed = strip_metadata(dirty)
        assert removed
        twice, removed_again = strip_metadata(once)
        assert twice is once and removed_again == []


def test_bytes_like_inputs():
    dirty = dirty_jpeg("L")[0]
    want = strip_metadata(dirty)
    assert strip_metadata(bytearray(dirty)) == want
    assert strip_metadata(memoryview(dirty)) == want
    assert declared_size(bytearray(dirty)) == (W, H)


# --- malformed input -----------------------------------------------------------------------

def _bad_inputs():
    png = save(png_image("RGB")[0], "PNG")
    idat = png.index(b"IDAT")
    jpeg = save(jpeg_image("RGB"), "JPEG")
    dqt = first_segment(jpeg, 0xDB)[0]
    return {
        "empty": (b"", "not a PNG or JPEG"),
        "gif": (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "not a PNG or JPEG"),
        "bmp": (save(png_image("RGB")[0], "BMP"), "not a PNG or JPEG"),
        "png_signature_only": (png[:8], "IHDR"),
        "png_cut_in_idat": (png[:idat + 20], "truncated"),
        "png_cut_in_length": (png[:idat - 2], "truncated"),
        "png_no_iend": (png[:-12], "IEND"),
        "png_text_before_ihdr": (png[:8] + png_chunk(b"tEXt", b"a\x00b") + png[8:], "IHDR"),
        "png_bad_chunk_type": (insert_before_idat(png, png_chunk(b"ab1d", b"")), "type"),
        "jpeg_soi_only": (b"\xff\xd8", "EOI"),
        "jpeg_cut_in_scan": (jpeg[:len(jpeg) // 2 + 300], "EOI"),
        "jpeg_no_eoi": (jpeg[:-2], "EOI"),
        "jpeg_cut_in_segment": (jpeg[:dqt + 30], "truncated"),
        "jpeg_length_past_end": (jpeg[:2] + b"\xff\xe1\xff\xf0" + PLANTED, "truncated"),
        "jpeg_length_1": (jpeg[:2] + b"\xff\xfe\x00\x01" + jpeg[2:], "length"),
        "jpeg_duplicate_soi": (jpeg[:2] + jpeg, "SOI"),
    }


@pytest.mark.parametrize("name", sorted(_bad_inputs()))
def test_malformed_input_raises_metadata_error(name):
    data, reason = _bad_inputs()[name]
    with pytest.raises(MetadataError, match=reason) as info:
        strip_metadata(data)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert 0 < len(message) <= 60 and "\n" not in message


# --- declared_size -------------------------------------------------------------------------

def test_declared_size_of_real_files():
    assert declared_size(save(png_image("RGB")[0], "PNG")) == (W, H)
    assert declared_size(save(png_image("I;16")[0], "PNG")) == (W, H)
    assert declared_size(save(jpeg_image("RGB"), "JPEG")) == (W, H)
    assert declared_size(save(jpeg_image("L"), "JPEG", progressive=True)) == (W, H)
    # metadata (EXIF, XMP, thumbnails...) before the frame header is walked over
    assert declared_size(dirty_jpeg("RGB")[0]) == (W, H)
    assert declared_size(save(Image.new("RGB", (1, 5000)), "JPEG")) == (1, 5000)


def test_declared_size_of_a_bomb_header_without_pixels():
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    png_header = b"\x89PNG\r\n\x1a\n" + ihdr
    assert declared_size(png_header) == (20000, 20000)
    with pytest.raises(MetadataError):  # nothing to strip from: no IEND
        strip_metadata(png_header)
    sof0 = jpeg_segment(0xC0, struct.pack(">BHHB", 8, 20000, 30000, 3)
                        + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01")
    assert declared_size(b"\xff\xd8" + jpeg_segment(0xE1, b"Exif\x00\x00") + sof0) \
        == (30000, 20000)


@pytest.mark.parametrize("data", [
    b"", b"GIF89a\x01\x00\x01\x00", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"\xff\xd8\xff\xe1\x00",
    b"\xff\xd8" + jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\xff\xd9",  # scan, no SOF
    b"\xff\xd8" + jpeg_segment(0xC0, b"\x08\x00"),  # SOF cut short
])
def test_declared_size_none_when_not_found(data):
    assert declared_size(data) is None

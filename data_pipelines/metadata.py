"""Removes identifying metadata from PNG and JPEG bytes without re-encoding.

Medical images often carry text inside the file: PNG tEXt/zTXt/iTXt chunks (``PATIENT=...``),
EXIF, XMP, IPTC and comments in JPEGs, thumbnails, data appended after the end of the image.
`strip_metadata` walks the file's chunks (PNG) or segments (JPEG) and copies byte for byte
only what decoding needs, so the decoded pixels are identical before and after; nothing is
decoded or re-encoded, and CRCs are neither checked nor recomputed (a corrupt file stays
corrupt and is rejected by the decoder later).

Kept -- a whitelist:

* PNG: IHDR, IDAT, IEND (the image), PLTE for palette images and tRNS (transparency is pixel
  data), and the small fixed-size numeric display chunks gAMA, cHRM, sRGB, sBIT, pHYs, which
  hold no text. A whitelisted ancillary chunk whose length is wrong for its type (the decoder
  ignores it, and it could hide arbitrary bytes) is removed, as is the "suggested palette" PLTE
  of a non-palette image (decoders never use it); IEND is rewritten empty if it carries data.
* JPEG: SOI, DQT, DHT, DAC, DRI, every SOFn, each SOS with the entropy-coded data after it
  (restart markers and 0xFF00 stuffing included; progressive files have many scans), DNL, EOI,
  plus two fixed-layout numeric segments that change how the decoder interprets the samples:
  APP0 "JFIF" (marks the components as YCbCr), cut to its 14 fixed bytes -- the embedded
  thumbnail is dropped and Xthumb/Ythumb set to 0 -- and APP14 "Adobe" (the colour transform
  flag needed for RGB, CMYK and YCCK JPEGs), cut to its 12 fixed bytes.

Removed: PNG tEXt, zTXt, iTXt, eXIf, tIME, iCCP (its profile carries a free-text description),
bKGD, hIST, sPLT, the APNG chunks acTL/fcTL/fdAT (decoders that do not animate show the IDAT
image), every private or unknown ancillary chunk and any bytes after IEND. JPEG APP0 "JFXX"
and other APP0, APP1 (EXIF, XMP), APP2 (ICC profile, FlashPix, MPF), APP3-APP13 (incl. IPTC
"Photoshop 3.0"), APP15, non-Adobe APP14, COM, bytes between segments that are not a marker
(libjpeg skips them with an "extraneous bytes" warning) and any bytes after EOI (e.g. the MPF
secondary images that cameras append).

TensorFlow's decoders (tf.io.decode_png / decode_jpeg / decode_image) ignore the EXIF
orientation and ICC profiles (as does PIL's np.asarray), so removing them does not change the
decoded pixels. Files this module cannot vouch for -- unknown critical PNG chunks, JPEG
markers outside the baseline/progressive/lossless/arithmetic set (JPG, DHP, EXP, JPGn,
reserved), truncated structure -- raise `MetadataError` instead.

`declared_size` reads (width, height) from the PNG IHDR or the first JPEG SOFn header
without decoding, so a writer can refuse decompression bombs before any decode.

Pure Python: no PIL, no TensorFlow.
"""
import struct
from typing import Iterator, List, Optional, Tuple

__all__ = ["MetadataError", "declared_size", "strip_metadata"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the one valid IEND chunk (empty, with CRC)
_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
# Kept ancillary chunks and their valid data lengths (tRNS and sBIT depend on the colour type).
_PNG_FIXED_LENGTH = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}
_PNG_SBIT_LENGTH = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_TRNS_LENGTH = {0: 2, 2: 6}

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 DHT, C8 JPG, CC DAC
_JPEG_KEEP = _JPEG_SOF | {0xC4, 0xCC, 0xDB, 0xDD, 0xDC, 0xDA}  # + DHT DAC DQT DRI DNL SOS
_JPEG_SOS, _JPEG_APP0, _JPEG_APP14, _JPEG_COM = 0xDA, 0xE0, 0xEE, 0xFE
_JFIF_LEN, _ADOBE_LEN = 14, 12  # the fixed parts of the JFIF and Adobe segments (data bytes)


class MetadataError(ValueError):
    """The bytes are not a PNG/JPEG whose structure can be walked; the message is the reason."""


def strip_metadata(data: bytes) -> Tuple[bytes, List[str]]:
    """PNG or JPEG bytes -> (bytes without metadata, names of what was removed).

    Names are chunk types ("tEXt", "iCCP", ...), JPEG segment names ("APP1", "COM", ...),
    "JFIF thumbnail" and "trailing bytes", each listed once in the order first met. When
    nothing is removed the list is empty and `data` itself is returned. Raises MetadataError
    for other formats and for files whose structure is truncated or unknown."""
    buf = data if isinstance(data, bytes) else bytes(data)
    if buf.startswith(_PNG_SIGNATURE):
        parts, removed = _strip_png(buf)
    elif buf.startswith(b"\xff\xd8"):
        parts, removed = _strip_jpeg(buf)
    else:
        raise MetadataError("not a PNG or JPEG")
    if not removed:
        return buf, []
    return b"".join(parts), list(dict.fromkeys(removed))


def declared_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) as the PNG IHDR or the first JPEG SOFn header declares it, without
    decoding any pixels; None for other formats or when no such header is found. (A JPEG may
    declare height 0 and give it later in a DNL segment; that 0 is returned as is.)"""
    buf = data if isinstance(data, bytes) else bytes(data)
    if buf.startswith(_PNG_SIGNATURE):
        if len(buf) >= 24 and buf[12:16] == b"IHDR":
            width, height = struct.unpack(">II", buf[16:24])
            return width, height
        return None
    if buf.startswith(b"\xff\xd8"):
        try:
            for kind, marker, _, end, body in _jpeg_parts(buf):
                if kind == "segment" and marker in _JPEG_SOF:
                    if end - body < 6:  # P, Y (2), X (2), Nf
                        return None
                    height, width = struct.unpack(">HH", buf[body + 1:body + 5])
                    return width, height
                if kind == "segment" and marker == _JPEG_SOS:
                    return None  # a scan before any frame header
        except MetadataError:
            return None
    return None


# --- PNG -----------------------------------------------------------------------------------

def _strip_png(buf):
    n = len(buf)
    pos = 8
    parts = [buf[:8]]
    removed = []
    color_type = None
    palette_entries = 0
    while True:
        if pos >= n:
            raise MetadataError("no IEND chunk" if color_type is not None else "no IHDR chunk")
        if pos + 12 > n:
            raise MetadataError("truncated PNG chunk")
        length, ctype = struct.unpack(">I4s", buf[pos:pos + 8])
        if not ctype.isalpha():
            raise MetadataError(f"invalid PNG chunk type {ctype!r}")
        name = ctype.decode("ascii")
        if length > 0x7FFFFFFF:
            raise MetadataError(f"invalid {name} chunk length")
        end = pos + 12 + length
        if end > n:
            raise MetadataError(f"truncated {name} chunk")
        body = buf[pos + 8:pos + 8 + length]

        if color_type is None and ctype != b"IHDR":
            raise MetadataError("IHDR is not the first chunk")
        if ctype == b"IHDR":
            if color_type is not None:
                raise MetadataError("duplicate IHDR chunk")
            if length != 13:
                raise MetadataError("invalid IHDR chunk length")
            color_type = body[9]
            keep = True
        elif ctype == b"IEND":
            if length:
                parts.append(_PNG_IEND)
                removed.append("IEND data")
            else:
                parts.append(buf[pos:end])
            if end < n:
                removed.append("trailing bytes")
            return parts, removed
        elif ctype == b"PLTE":
            if color_type == 3:
                if length == 0 or length % 3 or length > 768:
                    raise MetadataError("invalid PLTE chunk length")
                palette_entries = length // 3
                keep = True
            else:
                keep = False  # a suggested palette (RGB) or an invalid one (grey): never used
        elif ctype == b"IDAT":
            keep = True
        elif ctype[0] < 0x61:  # uppercase first letter: critical, and unknown to us
            raise MetadataError(f"unknown critical PNG chunk {name}")
        elif ctype == b"tRNS":
            if color_type == 3:
                keep = 0 < length <= palette_entries
            else:
                keep = length == _PNG_TRNS_LENGTH.get(color_type)
        elif ctype == b"sBIT":
            keep = length == _PNG_SBIT_LENGTH.get(color_type)
        elif ctype in _PNG_FIXED_LENGTH:
            keep = length == _PNG_FIXED_LENGTH[ctype]
        else:
            keep = False
        if keep:
            parts.append(buf[pos:end])
        else:
            removed.append(name)
        pos = end


# --- JPEG ----------------------------------------------------------------------------------

def _next_marker(buf, i, in_scan):
    """Index of the 0xFF (first of any fill bytes) that starts the next marker at or after i,
    and the marker byte's index. Outside a scan (like libjpeg's next_marker) 0xFF00 is not a
    marker; inside one neither is a restart marker RST0-7, which belongs to the scan data."""
    n = len(buf)
    j = i
    while True:
        j = buf.find(b"\xff", j)
        if j < 0:
            raise MetadataError("no EOI marker (truncated JPEG)")
        k = j + 1
        while k < n and buf[k] == 0xFF:
            k += 1
        if k >= n:
            raise MetadataError("no EOI marker (truncated JPEG)")
        m = buf[k]
        if m == 0 or (in_scan and 0xD0 <= m <= 0xD7):
            j = k + 1
            continue
        return j, k


def _jpeg_parts(buf) -> Iterator[Tuple[str, Optional[int], int, int, int]]:
    """Walks a JPEG from SOI, yielding (kind, marker, start, end, body): kind is "marker"
    (standalone: SOI, RSTn, TEM), "segment" (body = where its data begins, after the length),
    "scan" (entropy-coded data), "extraneous" (bytes that are not a marker), "eoi" and
    "trailing" (bytes after EOI, last). start includes any fill bytes before the marker."""
    n = len(buf)
    yield "marker", 0xD8, 0, 2, 2
    i = 2
    while True:
        j, k = _next_marker(buf, i, in_scan=False)
        if j > i:
            yield "extraneous", None, i, j, i
        m = buf[k]
        if m == 0xD9:
            yield "eoi", m, j, k + 1, k + 1
            if k + 1 < n:
                yield "trailing", None, k + 1, n, k + 1
            return
        if m == 0xD8:
            raise MetadataError("duplicate SOI marker")
        if 0xD0 <= m <= 0xD7 or m == 0x01:
            yield "marker", m, j, k + 1, k + 1
            i = k + 1
            continue
        if k + 3 > n:
            raise MetadataError(f"truncated JPEG segment 0xFF{m:02X}")
        length = (buf[k + 1] << 8) | buf[k + 2]
        if length < 2:
            raise MetadataError(f"invalid length of JPEG segment 0xFF{m:02X}")
        end = k + 1 + length
        if end > n:
            raise MetadataError(f"truncated JPEG segment 0xFF{m:02X}")
        yield "segment", m, j, end, k + 3
        i = end
        if m == _JPEG_SOS:
            j, _ = _next_marker(buf, i, in_scan=True)
            if j > i:
                yield "scan", None, i, j, i
            i = j


def _strip_jpeg(buf):
    parts = []
    removed = []
    for kind, m, start, end, body in _jpeg_parts(buf):
        if kind == "extraneous":
            removed.append("extraneous bytes")
        elif kind == "trailing":
            removed.append("trailing bytes")
        elif kind != "segment" or m in _JPEG_KEEP:
            parts.append(buf[start:end])
        elif m == _JPEG_APP0 and buf.startswith(b"JFIF\x00", body) and end - body >= _JFIF_LEN:
            fixed = buf[body:body + _JFIF_LEN]
            if fixed[12:14] != b"\x00\x00" or end - body > _JFIF_LEN:
                removed.append("JFIF thumbnail" if fixed[12:14] != b"\x00\x00"
                               else "JFIF extra bytes")
                parts.append(b"\xff\xe0" + struct.pack(">H", 2 + _JFIF_LEN) + fixed[:12]
                             + b"\x00\x00")
            else:
                parts.append(buf[start:end])
        elif m == _JPEG_APP14 and buf.startswith(b"Adobe", body) and end - body >= _ADOBE_LEN:
            if end - body > _ADOBE_LEN:
                removed.append("Adobe extra bytes")
                parts.append(b"\xff\xee" + struct.pack(">H", 2 + _ADOBE_LEN)
                             + buf[body:body + _ADOBE_LEN])
            else:
                parts.append(buf[start:end])
        elif 0xE0 <= m <= 0xEF:
            removed.append(f"APP{m - 0xE0}")
        elif m == _JPEG_COM:
            removed.append("COM")
        else:  # JPG, DHP, EXP, JPGn, reserved: not decodable by libjpeg, and unknown to us
            raise MetadataError(f"unsupported JPEG marker 0xFF{m:02X}")
    return parts, removed

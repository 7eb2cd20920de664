"""Image header checks: identify an encoded image from its header, without decoding pixels.

The LAION converter must reject not-images, truncated images and decompression bombs at the speed of
inflating the input. A full pixel decode costs several times that, and even PIL's lazy ``Image.open``
(plugin probing, parsing every JPEG segment into Python objects) costs more than the few field reads needed
here. So the three formats LAION shards carry (JPEG, PNG, WebP) are read by hand: format, width and height from
the header, and completeness from the format's end marker (JPEG EOI after the scan, PNG IEND, WebP RIFF length).
``tests/test_converter.py`` checks every field against PIL on real encoded photos.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sd_ds.convert.reasons import Rejected

__all__ = ["ImageInfo", "ImageRejected", "probe_image", "EXTENSIONS", "PIL_MAX_IMAGE_PIXELS"]

PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS, without importing PIL at start-up

# Format → tar member extension, the names img2dataset writes and open_clip's pipeline selects.
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}

# Start-of-frame markers carry the image size: baseline, extended, progressive, lossless; Huffman or
# arithmetic coded. C4 (DHT), C8 (JPG extension) and CC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
# Markers with no length field (TEM, RST0-7); SOI cannot repeat inside a valid header.
_JPEG_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + its fixed CRC
# Recognised but not carried into shards: open_clip-style loaders select jpg/png/webp members only.
_OTHER_MAGIC = (b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x01\x00")


class ImageRejected(Rejected):
    """An image the converter skips."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "jpeg" | "png" | "webp"
    width: int
    height: int

    @property
    def ext(self) -> str:
        return EXTENSIONS[self.format]


def probe_image(data: bytes, max_pixels: int | None = None) -> ImageInfo:
    """Format and size of an encoded image; raises ImageRejected(reason) for what cannot go into a shard.

    Reasons: ``not_an_image`` (no known signature, or a header that does not parse), ``unsupported_format``
    (GIF, BMP, TIFF, ICO), ``truncated_image`` (the data ends before the format's end marker) and
    ``image_too_large`` (width × height above ``max_pixels``, PIL's ``MAX_IMAGE_PIXELS`` measure of a
    decompression bomb; None or 0 disables the check).
    """
    if data[:3] == b"\xff\xd8\xff":
        info = _probe_jpeg(data)
    elif data[:8] == _PNG_SIGNATURE:
        info = _probe_png(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        info = _probe_webp(data)
    elif data.startswith(_OTHER_MAGIC):
        raise ImageRejected("unsupported_format", repr(data[:6]))
    else:
        raise ImageRejected("not_an_image", repr(data[:8]))
    if info.width <= 0 or info.height <= 0:
        raise ImageRejected("not_an_image", f"{info.format} header gives size {info.width}x{info.height}")
    if max_pixels and info.width * info.height > max_pixels:
        raise ImageRejected("image_too_large", f"{info.width}x{info.height} > {max_pixels} pixels")
    return info


def _probe_jpeg(data: bytes) -> ImageInfo:
    data_length = len(data)
    pos = 2
    size = None
    while True:
        if pos + 4 > data_length:
            raise ImageRejected("truncated_image", "JPEG ends inside its header")
        if data[pos] != 0xFF:
            raise ImageRejected("not_an_image", f"JPEG: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):
            raise ImageRejected("not_an_image", "JPEG: SOI/EOI before the first scan")
        seg_len = (data[pos + 2] << 8) | data[pos + 3]
        if seg_len < 2:
            raise ImageRejected("not_an_image", "JPEG: segment length < 2")
        if marker in _JPEG_SOF and size is None:
            if pos + 9 > data_length:
                raise ImageRejected("truncated_image", "JPEG ends inside its frame header")
            height, width = struct.unpack_from(">HH", data, pos + 5)
            size = (width, height)
        pos += 2 + seg_len
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
    if size is None:
        raise ImageRejected("not_an_image", "JPEG: no frame header before the scan")
    # Inside entropy-coded data 0xFF is always followed by 0x00 or RSTn, so FF D9 after the first scan is
    # the real end of image (thumbnails in APP1 come before the scan and are not searched).
    if data.rfind(b"\xff\xd9", pos) < 0:
        raise ImageRejected("truncated_image", "JPEG: no end-of-image marker")
    return ImageInfo("jpeg", *size)


def _probe_png(data: bytes) -> ImageInfo:
    if len(data) < 33:
        raise ImageRejected("truncated_image", "PNG ends inside its header")
    if data[12:16] != b"IHDR":
        raise ImageRejected("not_an_image", "PNG: first chunk is not IHDR")
    width, height = struct.unpack_from(">II", data, 16)
    if data.rfind(_PNG_IEND, 33) < 0:
        raise ImageRejected("truncated_image", "PNG: no IEND chunk")
    return ImageInfo("png", width, height)


def _probe_webp(data: bytes) -> ImageInfo:
    if len(data) < 30:
        raise ImageRejected("truncated_image", "WebP ends inside its header")
    (riff_size,) = struct.unpack_from("<I", data, 4)
    if len(data) < riff_size + 8:
        raise ImageRejected("truncated_image", f"WebP: RIFF says {riff_size + 8} bytes, has {len(data)}")
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: canvas size, 24-bit little-endian minus one
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8 ":  # lossy: key frame start code, then 14-bit sizes (top 2 bits are scaling)
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageRejected("not_an_image", "WebP VP8: no key frame start code")
        width, height = struct.unpack_from("<HH", data, 26)
        width &= 0x3FFF
        height &= 0x3FFF
    elif chunk == b"VP8L":  # lossless: signature 0x2F, then 14-bit width-1 and height-1
        if data[20] != 0x2F:
            raise ImageRejected("not_an_image", "WebP VP8L: bad signature")
        (bits,) = struct.unpack_from("<I", data, 21)
        width = 1 + (bits & 0x3FFF)
        height = 1 + ((bits >> 14) & 0x3FFF)
    else:
        raise ImageRejected("not_an_image", f"WebP: unknown chunk {chunk!r}")
    return ImageInfo("webp", width, height)

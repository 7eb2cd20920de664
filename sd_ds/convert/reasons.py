"""What the converter skips and why: the ``Rejected`` exception its line and image checks raise, and the
catalogue of reasons that shard stats and ``stats.json`` count skipped lines by (also printed by ``--help``).

Bad input is counted, never fatal: a line is skipped under exactly one of these reasons.
"""

from __future__ import annotations

__all__ = ["Rejected", "FAILURE_REASONS"]

FAILURE_REASONS = {
    "too_few_columns": "line has fewer tab-separated columns than the layout needs",
    "undecodable_text": "caption is neither UTF-8 nor GB18030",
    "invalid_caption_json": "laion_aes caption column is not a JSON object with a string caption",
    "invalid_base64": "image column is not valid base64",
    "not_an_image": "decoded bytes are not a JPEG/PNG/WebP (or its header does not parse)",
    "unsupported_format": "GIF/BMP/TIFF/ICO image (shards carry jpg/png/webp only)",
    "truncated_image": "image data ends before the format's end marker",
    "image_too_large": "width x height above --max_pixels (decompression bomb)",
    "too_small": "shorter side below --min_size (--min_image_size)",
    "aspect_ratio_too_large": "longer side / shorter side above --max_aspect_ratio",
    "aesthetic_too_low": "laion_aes metadata: aesthetic score below --min_aesthetic",
    "punsafe_too_high": "laion_aes metadata: punsafe above --max_punsafe",
    "pwatermark_too_high": "laion_aes metadata: pwatermark above --max_pwatermark",
    "decode_error": "pixel decode failed while re-encoding (--max_side/--resize_shorter_to)",
    "truncated_gzip": "gzip stream ends early (lines before it are kept)",
    "gzip_error": "gzip stream corrupt (CRC or format error; lines before it are kept)",
    "unreadable_part": "part file could not be opened",
}


class Rejected(ValueError):
    """Input the converter skips; ``reason`` (a key of FAILURE_REASONS) is the stats key it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason

"""Any decoded image → the 8-bit RGB picture a viewer shows: one rule for the converter and the trainer.

The converter keeps JPEG, PNG and WebP bytes as they are (or re-encodes them as JPEG when asked to downscale) and
the trainer decodes them, so both must turn every mode those formats carry into the same RGB:

- 16-bit samples (PNG ``I;16``/``I;16B``/``I``, which Pillow would clip to 255: an all-white image) are scaled to
  8 bits, v * 255 / 65535 rounded; Pillow already reduces 16-bit RGB(A) PNGs to 8 bits;
- transparency (an alpha channel: RGBA, LA, PA; or a PNG ``tRNS`` chunk on P, L, RGB or 16-bit grey) is composited
  over white, as a web page shows it; transparent pixels' own colour values (often black) never show;
- everything else (L, 1, P, CMYK, YCbCr, RGB) is Pillow's own conversion to RGB.

Imports only Pillow and numpy: the converter's workers use it.
"""

from __future__ import annotations

from typing import Any

BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Any) -> Any:
    """An RGB ``PIL.Image`` of ``img`` as a viewer shows it (see the module docstring); ``img`` if it is RGB."""
    from PIL import Image

    if img.mode in SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_8(img)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _sixteen_bit_to_8(img: Any) -> Any:
    """Grey (or grey + alpha, from a tRNS grey level) 8-bit image of a 16-bit one, scaled, not clipped."""
    import numpy as np
    from PIL import Image

    values = np.asarray(img).astype(np.int64)  # I;16 (little or big endian) or I (int32) -> plain integers
    grey = Image.fromarray(((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, int):  # a tRNS grey level: those pixels are transparent
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (grey, alpha))
    return grey

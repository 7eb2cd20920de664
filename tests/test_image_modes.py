"""Every image mode the converter keeps decodes to what a viewer shows, whether the converter kept the bytes or
re-encoded them: 16-bit PNGs scaled to 8 bits (not clipped to white), transparency composited over white (not the
hidden colour values, often black), grey, palette, 1-bit, CMYK, WebP with alpha. Each image is one flat colour,
so the expectation is a number: colour x alpha + white x (1 - alpha), computed here from the pixel values written.
Through the real entry points: tools/convert_laion_to_wds.py (bytes kept, and --max_side re-encoding) and the
trainer's loader (build_train_loader) on its output."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from laion_parts import encode
from sd_ds.config import DataConfig
from sd_ds.convert.parts import write_part
from sd_ds.conditioning import CaptionTokenizer
from sd_ds.data import build_train_loader
from test_converter import run_tool

SIDE = 24  # px; --max_side 16 makes the converter re-encode every image


def png16(pixels: np.ndarray, color_type: int, trns: bytes | None = None) -> bytes:
    """A 16-bit PNG (Pillow writes 16-bit grey only): pixels [H, W] or [H, W, C] of uint16."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + (chunk(b"tRNS", trns) if trns else b"")
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def flat(mode: str, value) -> Image.Image:
    return Image.new(mode, (SIDE, SIDE), value)


def over_white(rgb: tuple[int, int, int], alpha: int) -> tuple[float, ...]:
    return tuple(c * alpha / 255 + 255 * (1 - alpha / 255) for c in rgb)


def palette_image(transparency) -> Image.Image:
    img = Image.new("P", (SIDE, SIDE), 0)
    img.putpalette([30, 60, 200] + [0, 0, 0] * 255)
    if transparency is not None:
        img.info["transparency"] = transparency
    return img


def cases() -> dict[str, tuple[bytes, tuple[float, ...]]]:
    """name → (encoded image, the RGB a viewer shows)."""
    colour = (200, 120, 40)
    grey16 = np.full((SIDE, SIDE), 40000, np.uint16)
    rgb16 = np.dstack([np.full((SIDE, SIDE), v, np.uint16) for v in (65535, 32896, 0)])
    alpha16 = np.full((SIDE, SIDE), 32896, np.uint16)  # 32896 / 257 = 128
    cmyk = flat("CMYK", (20, 80, 160, 30))
    return {
        "png_rgb": (encode(flat("RGB", colour), "PNG"), colour),
        "png_grey": (encode(flat("L", 90), "PNG"), (90,) * 3),
        "png_1bit": (encode(flat("1", 0), "PNG"), (0,) * 3),
        "png_palette": (encode(palette_image(None), "PNG"), (30, 60, 200)),
        "png_palette_trns_index": (encode(palette_image(0), "PNG", transparency=0), (255,) * 3),
        "png_palette_alpha_table": (encode(palette_image(bytes([96]) + b"\xff" * 255), "PNG"),
                                    over_white((30, 60, 200), 96)),
        "png_grey_alpha": (encode(flat("LA", (90, 96)), "PNG"), over_white((90,) * 3, 96)),
        "png_rgba": (encode(flat("RGBA", colour + (96,)), "PNG"), over_white(colour, 96)),
        "png_rgba_transparent_black": (encode(flat("RGBA", (0, 0, 0, 0)), "PNG"), (255,) * 3),
        "png_rgb_trns_colour_key": (encode(flat("RGB", colour), "PNG", transparency=colour), (255,) * 3),
        "png_grey_trns": (encode(flat("L", 90), "PNG", transparency=90), (255,) * 3),
        "png_grey_16bit": (png16(grey16, 0), (40000 / 257,) * 3),
        "png_grey_16bit_trns": (png16(grey16, 0, trns=struct.pack(">H", 40000)), (255,) * 3),
        "png_rgb_16bit": (png16(rgb16, 2), (255, 128, 0)),
        "png_rgba_16bit": (png16(np.dstack([rgb16, alpha16]), 6), over_white((255, 128, 0), 128)),
        "png_grey_alpha_16bit": (png16(np.dstack([grey16, alpha16]), 4), over_white((round(40000 / 257),) * 3, 128)),
        "jpeg_rgb": (encode(flat("RGB", colour), "JPEG", quality=95), colour),
        "jpeg_grey": (encode(flat("L", 90), "JPEG", quality=95), (90,) * 3),
        # CMYK: no colour management, Pillow's conversion (what a viewer without the ICC profile shows)
        "jpeg_cmyk": (encode(cmyk, "JPEG", quality=95), cmyk.convert("RGB").getpixel((0, 0))),
        "webp_rgb": (encode(flat("RGB", colour), "WEBP", lossless=True), colour),
        "webp_rgba": (encode(flat("RGBA", colour + (96,)), "WEBP", lossless=True), over_white(colour, 96)),
        "webp_rgba_transparent_black": (encode(flat("RGBA", (0, 0, 0, 0)), "WEBP", lossless=True), (255,) * 3),
    }


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from sd_ds.models import CLIP_TOKENIZER_DIR

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)


def decoded(shards, tokenizer, n: int) -> dict[str, np.ndarray]:
    """caption → the trainer's pixels (uint8 [3, 16, 16]) of every sample of ``shards``."""
    data = build_train_loader(DataConfig(train_shards=[str(shards)], resolution=16, center_crop=True,
                                         random_flip=False, caption_dropout_prob=0.0, dataloader_num_workers=0,
                                         shuffle_block=1), tokenize=CaptionTokenizer((tokenizer,), 77),
                              micro_batch_size=1, seed=0)
    it = iter(data)
    try:
        batches = [next(it) for _ in range(n)]
    finally:
        it.close()
    assert not data.stats(), data.stats()  # none skipped
    return {b["captions"][0]: b["pixel_values"][0].numpy() for b in batches}


def test_every_mode_decodes_to_what_a_viewer_shows_kept_or_reencoded(tmp_path, tokenizer):
    images = cases()
    for name, (data, _) in images.items():  # the inputs are what they say they are
        mode = Image.open(io.BytesIO(data)).mode
        assert name not in ("png_grey_16bit", "png_grey_16bit_trns") or mode.startswith("I"), (name, mode)
    part = tmp_path / "part-0.gz"
    write_part(part, [(name, data) for name, (data, _) in images.items()])
    run_tool(part, "--output_dir", tmp_path / "kept", "--samples_per_shard", 100)
    run_tool(part, "--output_dir", tmp_path / "reencoded", "--samples_per_shard", 100, "--max_side", 16)
    kept = decoded(tmp_path / "kept", tokenizer, len(images))
    reencoded = decoded(tmp_path / "reencoded", tokenizer, len(images))
    assert set(kept) == set(reencoded) == set(images)
    wrong = []
    for name, (_, expected) in images.items():
        want = np.array(expected, dtype=np.float64).reshape(3, 1, 1)
        for how, pixels, tolerance in (("kept", kept[name], 1.5), ("re-encoded", reencoded[name], 3.5)):
            error = np.abs(pixels.astype(np.float64) - want).max()
            if error > tolerance:
                wrong.append(f"{name} ({how}): {pixels.reshape(3, -1).mean(1).round(1).tolist()} != "
                             f"{np.round(expected, 1).tolist()}")
        if np.abs(kept[name].astype(int) - reencoded[name].astype(int)).max() > 4:
            wrong.append(f"{name}: kept and re-encoded differ")
    assert not wrong, "\n".join(wrong)

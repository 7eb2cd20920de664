"""Captioned drawn shapes ("a red circle on a blue background"): the demo's and the tests' synthetic data, and
the prompt-following score that reads a picture's colours and shape back.

Drawing and reading live together: the scorer relies on how shapes are drawn (the image centre lies inside every
shape, the border ring is background). ``sd_ds.demo`` builds its data and its score from here; ``sd_ds.testing``
writes the tests' shards with it.
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "white": (245, 245, 245), "black": (15, 15, 15), "purple": (140, 40, 170), "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
Combination = tuple[str, str, str]  # (shape colour, shape, background colour)
BACKGROUNDS = ("red", "green", "blue", "yellow", "white", "black")
# Never drawn for training: the final grid shows whether the model composes colour, shape and background.
HELD_OUT = (
    ("green", "circle", "yellow"), ("red", "triangle", "white"), ("blue", "square", "yellow"),
    ("yellow", "circle", "black"), ("white", "triangle", "blue"), ("orange", "square", "green"),
)


def caption_of(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def draw_shape(color: str, shape: str, background: str, rng: random.Random, size: int = 40) -> Image.Image:
    return draw_rgb_shape(COLORS[color], shape, COLORS[background], rng, size)


def draw_rgb_shape(fill: tuple[int, int, int], shape: str, background: tuple[int, int, int], rng: random.Random,
                   size: int = 40) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.32) * size
    # Keep the shape inside the centre crop the trainer takes (shorter side → res/0.9, then crop res).
    cx = size / 2 + rng.uniform(-0.1, 0.1) * size
    cy = size / 2 + rng.uniform(-0.1, 0.1) * size
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        # Centred on its centroid (not on its bounding box): the image centre is then inside every drawn
        # triangle, which the prompt-following score relies on (it reads the shape's colour there).
        cy -= 0.27 * r
        d.polygon([(cx, cy - r), (cx - r * 1.1, cy + r * 0.9), (cx + r * 1.1, cy + r * 0.9)], fill=fill)
    return img


def random_color_shapes(n: int, seed: int = 0) -> list[Image.Image]:
    """Shapes in uniformly random RGB colours on random RGB backgrounds, without captions: extra images for the
    VAE only, so that it reproduces any colour pair rather than only the pairs of the training captions (the
    held-out pairs included, without their captions ever being seen)."""
    rng = random.Random(seed)

    def rgb() -> tuple[int, int, int]:
        return rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)

    return [draw_rgb_shape(rgb(), rng.choice(SHAPES), rgb(), rng) for _ in range(n)]


def training_combinations() -> list[Combination]:
    return [(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS if c != b and (c, s, b) not in HELD_OUT]


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    """The image as PNG or JPEG (quality 92) bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


# --- reading a picture back: are the prompt's colours and shape in it? -------------------------

def trained_combinations_scored(n: int = 12) -> list[Combination]:
    """A fixed set of combinations seen in training: every colour as a shape colour, every shape, and the
    backgrounds in turn."""
    trained = set(training_combinations())
    colors, out = list(COLORS), []
    for i in range(n):
        color, shape = colors[i % len(colors)], SHAPES[i % len(SHAPES)]
        # The first background (in turn from i) that makes a trained combination.
        for k in range(len(BACKGROUNDS)):
            combo = (color, shape, BACKGROUNDS[(i + k) % len(BACKGROUNDS)])
            if combo in trained and combo not in out:
                out.append(combo)
                break
    return out


def nearest_color(rgb: np.ndarray) -> str:
    """The demo palette's colour nearest to an RGB triple (Euclidean in RGB)."""
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float64)
    return names[int(((palette - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1).argmin())]


def read_image(img: Image.Image) -> tuple[str, str, str]:
    """(shape colour, shape, background colour) of a picture, as the scorer reads it.

    Colours: the per-channel median of the centre patch (side 1/8 of the image; every drawn shape covers it)
    and of the border ring (1/16 of the side wide; the shape covers little of it), each snapped to the nearest
    palette colour. Shape: the connected region around the centre whose pixels are nearer the centre's colour
    than the ring's, by how much of its bounding box it fills (drawn at 32 px: squares 0.9-1.0, circles
    0.72-0.81, triangles 0.49-0.58), or "none" when the centre pixel is not in that region.
    """
    from scipy import ndimage  # lazy: only the scorer needs scipy, and sd_ds.testing imports this module

    arr = np.asarray(img.convert("RGB"), dtype=np.float64)
    h, w = arr.shape[:2]
    ph, pw = max(1, h // 16), max(1, w // 16)  # half the patch side; also the ring's width
    centre = np.median(arr[h // 2 - ph:h // 2 + ph, w // 2 - pw:w // 2 + pw].reshape(-1, 3), axis=0)
    ring_mask = np.ones((h, w), dtype=bool)
    ring_mask[ph:h - ph, pw:w - pw] = False
    ring = np.median(arr[ring_mask], axis=0)
    near_centre = ((arr - centre) ** 2).sum(-1) < ((arr - ring) ** 2).sum(-1)
    regions, _ = ndimage.label(near_centre)
    shape = "none"
    if near_centre[h // 2, w // 2]:
        region = regions == regions[h // 2, w // 2]
        # The bounding box spans the rows and columns with at least 2 of the region's pixels: a lone pixel of
        # resampling ringing at a corner must not stretch it.
        rows, cols = np.nonzero(region.sum(axis=1) >= 2)[0], np.nonzero(region.sum(axis=0) >= 2)[0]
        if len(rows) and len(cols):
            box = region[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            fill = box.sum() / box.size
            shape = "square" if fill >= 0.85 else "circle" if fill >= 0.65 else "triangle"
    return nearest_color(centre), shape, nearest_color(ring)


def score_images(images: list[Image.Image], combos: list[Combination]) -> dict:
    """Fractions (in %) of images whose shape colour, background colour, both colours, shape are the prompt's."""
    right = {"shape_color": 0, "background_color": 0, "both_colors": 0, "shape": 0}
    for img, (color, shape, background) in zip(images, combos, strict=True):
        got_color, got_shape, got_background = read_image(img)
        right["shape_color"] += got_color == color
        right["background_color"] += got_background == background
        right["both_colors"] += got_color == color and got_background == background
        right["shape"] += got_shape == shape
    return {**{f"{k}_pct": 100.0 * v / len(images) for k, v in right.items()}, "images": len(images)}

"""Aspect-ratio buckets: the list of (width, height) training sizes and which bucket a sample goes to.

``--aspect_ratio_buckets`` is ``off`` (square crops at --resolution, the seed's transform), ``auto`` or a FILE:

- **auto**: every (width, height) whose sides are multiples of the model's divisor (``model_divisor``: the VAE's
  downsampling x the UNet's, 64 px for SD v1/v2, 32 for SDXL, 16 for the tiny presets), whose aspect ratio is within 1:4 to
  4:1, and whose area is within (0.9 R², R²] for R = --resolution. At R = 1024 and 64 px that is 41 buckets like SDXL's
  published list (512x2048 ... 1024x1024 ... 2048x512); at R = 64 and 16 px: 32x128, 48x80, 64x64, 80x48, 128x32.
- **FILE**: one ``WxH`` per line (blank lines and ``#`` comments ignored); every side a positive multiple of the
  divisor, at least one bucket, no duplicates.

A sample goes to the bucket nearest its aspect ratio in log ratio, |log(w/h) - log(W/H)| (ties: the narrower
bucket). A sample whose aspect ratio is beyond the list's (wider than the widest bucket, or taller than the
tallest) goes to the extreme bucket and is counted as ``aspect_clamped``. The sample's size comes from metadata
(``sd_ds.data.image_sizes``), never from decoding it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

OFF, AUTO = "off", "auto"
MAX_ASPECT = 4.0  # auto lists span 1:4 .. 4:1, as SDXL's
MIN_AREA_FRACTION = 0.9  # auto buckets hold (0.9 R², R²] pixels: SDXL's list at 1024 px is exactly this band
MAX_BUCKETS = 254  # a sample's bucket travels as one byte (bucket + 1 when shared over ranks)
_TIE = 1e-12


class BucketError(ValueError):
    """A bucket list that cannot be used (bad file, side not a multiple of the divisor); one line."""


@dataclass(frozen=True)
class BucketList:
    """Training sizes (width, height), sorted by aspect ratio (tallest first)."""

    sizes: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.sizes:
            raise BucketError("an aspect-ratio bucket list needs at least one WxH")
        if len(self.sizes) > MAX_BUCKETS:
            raise BucketError(f"an aspect-ratio bucket list holds at most {MAX_BUCKETS} buckets "
                              f"(got {len(self.sizes)})")
        ordered = tuple(sorted(self.sizes, key=lambda s: (s[0] / s[1], s[0])))
        object.__setattr__(self, "sizes", ordered)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def log_aspects(self) -> np.ndarray:
        return np.log(np.asarray([w / h for w, h in self.sizes], dtype=np.float64))

    def assign(self, widths: Any, heights: Any) -> tuple[np.ndarray, np.ndarray]:
        """Bucket index (int64) of each sample by its size, and whether its aspect was clamped (beyond the list).
        Sizes <= 0 (unknown) go to the bucket nearest 1:1."""
        w = np.asarray(widths, dtype=np.float64).reshape(-1)
        h = np.asarray(heights, dtype=np.float64).reshape(-1)
        known = (w > 0) & (h > 0)
        log_aspect = np.where(known, np.log(np.where(known, w, 1.0) / np.where(known, h, 1.0)), 0.0)
        buckets = self.log_aspects
        distance = np.abs(log_aspect[:, None] - buckets[None, :])
        # argmin takes the first of equal distances: the taller (narrower) bucket, the same on every machine.
        index = np.argmin(distance + np.arange(len(buckets))[None, :] * _TIE, axis=1).astype(np.int64)
        clamped = known & ((log_aspect < buckets[0] - 1e-9) | (log_aspect > buckets[-1] + 1e-9))
        return index, clamped

    def key(self) -> str:
        """``WxH,WxH,...``: what a saved data position and a latent manifest record of the list."""
        return ",".join(f"{w}x{h}" for w, h in self.sizes)

    def digest(self) -> str:
        return hashlib.sha1(self.key().encode()).hexdigest()[:12]

    def to_json(self) -> list[list[int]]:
        return [[w, h] for w, h in self.sizes]

    @classmethod
    def from_json(cls, sizes: Sequence[Sequence[int]]) -> "BucketList":
        return cls(tuple((int(w), int(h)) for w, h in sizes))


def auto_buckets(resolution: int, divisor: int) -> BucketList:
    """SDXL's recipe at any resolution: sides multiples of ``divisor``, aspect 1:4 .. 4:1, area (0.9 R², R²]."""
    if resolution <= 0 or divisor <= 0 or resolution % divisor:
        raise BucketError(f"--aspect_ratio_buckets auto needs --resolution a multiple of the model's divisor "
                          f"{divisor} px (VAE x UNet downsampling); got {resolution}")
    area = resolution * resolution
    sizes = []
    for h in range(divisor, int(resolution * math.sqrt(MAX_ASPECT)) + divisor, divisor):
        for w in range(divisor, int(resolution * math.sqrt(MAX_ASPECT)) + divisor, divisor):
            if MIN_AREA_FRACTION * area < w * h <= area and 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
                sizes.append((w, h))
    return BucketList(tuple(sizes))


def read_bucket_file(path: str | Path, divisor: Optional[int] = None) -> BucketList:
    """A FILE of ``WxH`` lines; BucketError naming the file and line for anything else (and, with ``divisor``,
    for a side that is not a multiple of it)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BucketError(f"--aspect_ratio_buckets {path}: cannot read it ({e.strerror or e}); give auto, off or a "
                          f"file of WxH lines") from None
    sizes = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise BucketError(f"--aspect_ratio_buckets {path}:{number}: {line!r} is not WxH (two positive integers, "
                              f"e.g. 512x768)")
        w, h = int(parts[0]), int(parts[1])
        if divisor is not None and (w % divisor or h % divisor):
            raise BucketError(f"--aspect_ratio_buckets {path}:{number}: {w}x{h} has a side that is not a multiple of "
                              f"{divisor} px, the model's divisor (VAE x UNet downsampling)")
        if (w, h) in sizes:
            raise BucketError(f"--aspect_ratio_buckets {path}:{number}: {w}x{h} is listed twice")
        sizes.append((w, h))
    if not sizes:
        raise BucketError(f"--aspect_ratio_buckets {path}: the file lists no WxH bucket")
    return BucketList(tuple(sizes))


def resolve_buckets(spec: str, resolution: int, divisor: int) -> Optional[BucketList]:
    """``--aspect_ratio_buckets`` → the bucket list, or None for off."""
    if spec == OFF:
        return None
    if spec == AUTO:
        return auto_buckets(resolution, divisor)
    return read_bucket_file(spec, divisor)


def training_buckets(spec: str, resolution: int, divisor: int) -> Optional[BucketList]:
    """The run's buckets (None: square crops) after checking that ``resolution`` fits the model: a side that is
    not a multiple of its divisor gives latents the UNet cannot halve evenly (BucketError: one line)."""
    if resolution % divisor:
        raise BucketError(f"--resolution {resolution} is not a multiple of {divisor} px, the model's latent divisor "
                          f"(VAE x UNet downsampling): use {resolution // divisor * divisor or divisor} or "
                          f"{(resolution // divisor + 1) * divisor}")
    return resolve_buckets(spec, resolution, divisor)


def model_divisor(vae_config: Any, unet_config: Any) -> int:
    """Pixels per UNet bottleneck cell: the VAE's downsampling (2 per down block after the first) times the
    UNet's (2 per down block after the first). 8 x 8 = 64 for SD v1/v2, 8 x 4 = 32 for SDXL (3 levels; its published
    buckets are multiples of 64, hence of 32), 4 x 4 = 16 for the tiny presets. Image sides (the square
    --resolution, every bucket) must be multiples of it."""
    vae_factor = 2 ** (len(_get(vae_config, "block_out_channels")) - 1)
    unet_factor = 2 ** (len(_get(unet_config, "down_block_types")) - 1)
    return vae_factor * unet_factor


def _get(config: Any, name: str) -> Any:
    return config[name] if isinstance(config, dict) else getattr(config, name)

"""Samples → training tensors: decode, resize, crop, flip (image shards) or pick the stored moments (latent
shards), and the per-worker accounting of skipped samples."""

from __future__ import annotations

import collections
import io
import logging
import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from sd_ds.data.manifest import LATENT_DTYPES, MOMENTS, MOMENTS_FLIPPED
from sd_ds.image_modes import to_rgb

logger = logging.getLogger("sd_ds.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# --- skipped-sample accounting (one per worker) -------------------------------------------------------

class SkipLog:
    """Counts skipped samples by reason and warns about the first few of each, then only at the 10th, 100th,
    1000th, ... one: a dataset with many corrupt samples must not flood the log (the counts reach the
    training metrics through ``TrainLoader.stats``)."""

    FIRST = 3

    def __init__(self, where: str) -> None:
        self.where = where
        self.counts: collections.Counter[str] = collections.Counter()

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n <= self.FIRST or 10 ** round(math.log10(n)) == n:
            more = "" if n < self.FIRST else " (further ones are only counted, in the data/ metrics)"
            logger.warning("%s: skipped sample #%d for %s: %s%s", self.where, n, reason, detail, more)

    def storage_retry(self, what: str, exn: BaseException) -> None:
        """A read that a transient storage error made start again (``sd_ds.retries``): counted (the
        ``data/storage_retries`` metric) and warned about as skips are; no sample is lost to it."""
        from sd_ds.retries import describe

        self.counts["storage_retries"] += 1
        n = self.counts["storage_retries"]
        if n <= self.FIRST or 10 ** round(math.log10(n)) == n:
            logger.warning("%s: storage retry #%d: %s: %s; reading it again", self.where, n, what, describe(exn))

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler: warn, count and continue with the next member or shard."""
        self.skip("tar_errors", f"{type(exn).__name__}: {exn}")
        return True


# --- decode and transform ----------------------------------------------------------------------------

class SkipSample(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _caption(sample: dict) -> str:
    caption = sample.get("txt")
    if caption is None:
        raise SkipSample("missing_caption", "no .txt member")
    return caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else str(caption)


@dataclass(frozen=True)
class ImageTransform:
    """The seed's (ppdiffusers' laion400m pretraining) image transform: shorter side to int(resolution / 0.9)
    with LANCZOS (smaller images are upscaled, as there), random (or center) crop to resolution, optional
    horizontal flip. ``min_size`` skips images whose shorter side is below it instead (None: no minimum)."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    min_size: Optional[int] = None
    jpeg_draft: bool = True

    @property
    def resize_to(self) -> int:
        return int(self.resolution / 0.9)

    def decode(self, sample: dict) -> tuple[Image.Image, str]:
        """(RGB image, caption) or SkipSample. The header is read first, so too-small images cost no decode."""
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise SkipSample("missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
        caption = _caption(sample)
        try:
            img = Image.open(io.BytesIO(sample[ext]))
            if self.min_size is not None and min(img.size) < self.min_size:
                raise SkipSample("too_small", f"{img.size[0]}x{img.size[1]} (--min_size {self.min_size})")
            if self.jpeg_draft and img.format == "JPEG":
                # libjpeg scales by 1/2, 1/4 or 1/8 while decoding, only as far as the shorter side stays
                # >= the resize target: several times faster for large photos, and LANCZOS still only shrinks.
                img.draft("RGB", (self.resize_to, self.resize_to))
            img.load()  # decodes fully: truncated or corrupt data raise here
            img = to_rgb(img)  # 16-bit scaled, transparency over white: what a viewer shows (as the converter)
        except SkipSample:
            raise
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the sample is unusable
            raise SkipSample("undecodable", f"{type(e).__name__}: {e}") from None
        return img, caption

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """uint8 [3, resolution, resolution]."""
        r, target = self.resolution, self.resize_to
        w, h = img.size
        # Resized size as torchvision/paddle's Resize(int) computes it (the longer side truncated).
        rw, rh = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
        if self.center_crop:
            left, top = int(round((rw - r) / 2.0)), int(round((rh - r) / 2.0))
        else:
            top, left = rng.randint(0, rh - r), rng.randint(0, rw - r)  # RandomCrop's order: i (top), then j
        # Resize only the crop window (Pillow's `box`): the same LANCZOS taps as resizing the whole image and
        # then cropping, for about 2/3 of the time (BENCHMARKS.md). Pillow may run its two 1-D passes in the
        # other order for the window, so a few percent of the pixels round differently between the passes
        # (a few 8-bit levels, more at clipped edge ringing); tests check it is one of the two orders.
        sx, sy = w / rw, h / rh
        img = img.resize((r, r), Image.Resampling.LANCZOS,
                         box=(left * sx, top * sy, (left + r) * sx, (top + r) * sy))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class ImageSamples:
    """Image shards: decode, resize + crop (+ flip) with ImageTransform → uint8 pixels."""

    batch_key = "pixel_values"

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def prepare(self, sample: dict, rng: random.Random) -> tuple[torch.Tensor, str]:
        img, caption = self.transform.decode(sample)
        return self.transform(img, rng), caption

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        # uint8 [B,3,R,R]: a quarter of fp32's bytes through the worker queue and host→device copy; the trainer
        # normalises on the device (x / 127.5 - 1, sd_ds.latents.encode_moments).
        return torch.stack(items)


class LatentSamples:
    """Latent shards: a sample's stored moments (the flipped image's with --random_flip, half of the time)."""

    batch_key = "latent_moments"

    def __init__(self, manifest: dict, random_flip: bool) -> None:
        self.shape = tuple(manifest["shape"])
        self.dtype = LATENT_DTYPES[manifest["dtype"]]
        self.nbytes = math.prod(self.shape) * torch.finfo(self.dtype).bits // 8
        self.random_flip = random_flip

    def prepare(self, sample: dict, rng: random.Random) -> tuple[torch.Tensor, str]:
        member = MOMENTS_FLIPPED if self.random_flip and rng.random() < 0.5 else MOMENTS
        data = sample.get(member)
        if data is None:
            raise SkipSample("missing_latent", f"no .{member} member")
        caption = _caption(sample)
        if len(data) != self.nbytes:
            raise SkipSample("corrupt_latent", f".{member} has {len(data)} bytes, {self.nbytes} expected")
        moments = torch.frombuffer(bytearray(data), dtype=self.dtype).view(self.shape)  # [2C, R/f, R/f]
        if not torch.isfinite(moments).all():
            raise SkipSample("corrupt_latent", f".{member} holds non-finite values")
        return moments, caption

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(items)  # [B, 2C, R/f, R/f], stored dtype

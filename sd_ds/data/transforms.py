"""Samples → training tensors: decode, resize, crop, flip (image shards) or pick the stored moments (latent
shards), each with its micro-conditioning geometry; and the per-worker accounting of skipped samples.

Geometry (SDXL's micro-conditioning; diffusers' ``StableDiffusionXLPipeline._get_add_time_ids`` order and
(height, width) convention), per sample:

- ``original_size`` (height, width): the source image before any resize: the sample JSON's
  ``original_height``/``original_width`` (the converter and img2dataset write them when they resized), else its
  ``height``/``width``, else the stored image's header;
- ``crop_top_left`` (top, left): the crop's corner in the resized image (resized to cover the target: the seed's
  shorter side to int(R / 0.9) for squares, the bucket's cover size for buckets); with a horizontal flip the left
  is mirrored, ``resized_width - left - crop_width``, where the crop sits in the flipped image (diffusers'
  train_text_to_image_sdxl.py computes ``crop_width - left`` there, which is no position in the image);
- ``target_size`` (height, width): the crop's size, resolution x resolution or the bucket.
"""

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

from sd_ds.data.image_sizes import json_sizes, parse_json_member, sample_sizes
from sd_ds.data.manifest import LATENT_DTYPES, MICROCOND, MICROCOND_FLIPPED, MOMENTS, MOMENTS_FLIPPED
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

Geometry = tuple[int, int, int, int, int, int]
"""original (height, width), crop (top, left), target (height, width): six ints (see the module docstring)."""


def geometry_bytes(geometry: Geometry) -> bytes:
    """A latent sample's ``microcond`` member: the six ints, little-endian int32."""
    return np.asarray(geometry, dtype="<i4").tobytes()


def mirrored(geometry: Geometry, resized_width: int) -> Geometry:
    """The geometry of the horizontally flipped crop: its left edge in the flipped resized image."""
    oh, ow, top, left, th, tw = geometry
    return (oh, ow, top, resized_width - left - tw, th, tw)


def geometry_from_bytes(data: bytes) -> Geometry:
    values = np.frombuffer(data, dtype="<i4")
    if values.shape != (6,):
        raise ValueError(f"{len(data)} bytes, 24 expected")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _caption(sample: dict) -> str:
    caption = sample.get("txt")
    if caption is None:
        raise SkipSample("missing_caption", "no .txt member")
    return decode_caption(caption)


def decode_caption(caption: "bytes | str") -> str:
    """A ``.txt`` member as the caption the trainer tokenises."""
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

    def decode(self, sample: dict, draft: Optional[tuple[int, int]] = None) -> tuple[Image.Image, str]:
        """(RGB image, caption) or SkipSample. The header is read first, so too-small images cost no decode.
        ``draft``: the smallest (width, height) a JPEG may be decoded at (default: the square resize target)."""
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
                img.draft("RGB", draft or (self.resize_to, self.resize_to))
            img.load()  # decodes fully: truncated or corrupt data raise here
            img = to_rgb(img)  # 16-bit scaled, transparency over white: what a viewer shows (as the converter)
        except SkipSample:
            raise
        except Exception as e:  # noqa: BLE001 - whatever PIL raises, the sample is unusable
            raise SkipSample("undecodable", f"{type(e).__name__}: {e}") from None
        return img, caption

    def cover_size(self, width: int, height: int, target: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """The resized (width, height) the crop is cut from: for squares the seed's shorter side to
        int(resolution / 0.9) (torchvision/paddle's Resize(int): the longer side truncated); for a bucket (``target``
        = (width, height)) the smallest size that covers it, aspect kept (mosaic's and kohya's resize)."""
        w, h = width, height
        if target is None:
            size = self.resize_to
            return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        tw, th = target
        scale = max(tw / w, th / h)
        return max(tw, round(w * scale)), max(th, round(h * scale))

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """uint8 [3, resolution, resolution]."""
        return self.apply(img, rng)[0]

    def apply(self, img: Image.Image, rng: random.Random, target: Optional[tuple[int, int]] = None,
              original: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, Geometry, int]:
        """uint8 [3, H, W] (resolution x resolution, or the bucket ``target`` = (width, height)), its geometry
        (``original`` = (height, width) before any resize, default the image's own size) and the resized width
        (what ``mirrored`` needs for a flipped copy)."""
        w, h = img.size
        tw, th = target or (self.resolution, self.resolution)
        rw, rh = self.cover_size(w, h, target)
        if self.center_crop:
            left, top = int(round((rw - tw) / 2.0)), int(round((rh - th) / 2.0))
        else:
            top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)  # RandomCrop's order: i (top), then j
        # Resize only the crop window (Pillow's `box`): the same LANCZOS taps as resizing the whole image and
        # then cropping, for about 2/3 of the time (BENCHMARKS.md). Pillow may run its two 1-D passes in the
        # other order for the window, so a few percent of the pixels round differently between the passes
        # (a few 8-bit levels, more at clipped edge ringing); tests check it is one of the two orders.
        sx, sy = w / rw, h / rh
        img = img.resize((tw, th), Image.Resampling.LANCZOS,
                         box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = rw - left - tw  # where the crop sits in the flipped resized image
        oh, ow = original or (h, w)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return pixels, (oh, ow, top, left, th, tw), rw


class ImageSamples:
    """Image shards: decode, resize + crop (+ flip) with ImageTransform → uint8 pixels and their geometry."""

    batch_key = "pixel_values"

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform

    def prepare(self, sample: dict, rng: random.Random, target: Optional[tuple[int, int]] = None
                ) -> tuple[torch.Tensor, str, Geometry]:
        """``target``: the bucket (width, height); None for resolution x resolution squares."""
        pixels, caption, geometry, _ = self.prepare_with_width(sample, rng, target)
        return pixels, caption, geometry

    def prepare_with_width(self, sample: dict, rng: random.Random, target: Optional[tuple[int, int]] = None
                           ) -> tuple[torch.Tensor, str, Geometry, int]:
        """``prepare`` and the resized width (for ``mirrored``)."""
        w, h, ow, oh = sample_sizes(sample)  # metadata: the JSON, else the image's header
        draft = None if target is None else self.transform.cover_size(w, h, target) if w > 0 and h > 0 else target
        img, caption = self.transform.decode(sample) if draft is None else self.transform.decode(sample, draft)
        original = (oh, ow) if ow > 0 and oh > 0 else (img.size[1], img.size[0])
        pixels, geometry, resized_width = self.transform.apply(img, rng, target, original)
        return pixels, caption, geometry, resized_width

    def without_caption(self, data: torch.Tensor) -> torch.Tensor:
        return data  # a dropped caption is the batch's "" (the trainer encodes it)

    def collate(self, items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        # uint8 [B,3,R,R]: a quarter of fp32's bytes through the worker queue and host→device copy; the trainer
        # normalises on the device (x / 127.5 - 1, sd_ds.latents.encode_moments).
        return {self.batch_key: torch.stack(items)}


class LatentSamples:
    """Latent shards: a sample's stored moments (the flipped image's with --random_flip, half of the time) and
    the geometry stored with that variant (``microcond`` members; shards encoded before they existed: the
    original size from the sample's JSON, else the target size, and crop (0, 0)). Shards encoded with
    --text_embeddings also give the sample's stored text conditioning (``prompt_embeds`` [L, D], SDXL's
    ``pooled_prompt_embeds`` [P]), the stored empty prompt's for a dropped caption (``without_caption``)."""

    batch_key = "latent_moments"

    def __init__(self, manifest: dict, random_flip: bool,
                 empty_prompt: Optional[dict[str, torch.Tensor]] = None) -> None:
        self.shape = tuple(manifest["shape"])  # [2C, R/f, R/f]
        self.factor = manifest["resolution"] // self.shape[1]
        self.dtype = LATENT_DTYPES[manifest["dtype"]]
        self.random_flip = random_flip
        text = manifest.get("text_embeddings")
        self.text_shapes = {k: tuple(v) for k, v in text["shapes"].items()} if text else {}
        if self.text_shapes and empty_prompt is None:
            raise ValueError("latent shards with text embeddings need the stored empty prompt (read_empty_prompt)")
        self.empty_prompt = empty_prompt

    def prepare(self, sample: dict, rng: random.Random, target: Optional[tuple[int, int]] = None
                ) -> tuple[torch.Tensor, str, Geometry]:
        """``target``: the bucket (width, height) the batch is in; None for squares."""
        flipped = self.random_flip and rng.random() < 0.5
        member = MOMENTS_FLIPPED if flipped else MOMENTS
        data = sample.get(member)
        if data is None:
            raise SkipSample("missing_latent", f"no .{member} member")
        caption = _caption(sample)
        tw, th = target or (self.shape[2] * self.factor, self.shape[1] * self.factor)
        shape = (self.shape[0], th // self.factor, tw // self.factor)
        nbytes = math.prod(shape) * torch.finfo(self.dtype).bits // 8
        if len(data) != nbytes:
            raise SkipSample("corrupt_latent", f".{member} has {len(data)} bytes, {nbytes} expected "
                                               f"({'x'.join(map(str, shape))})")
        moments = torch.frombuffer(bytearray(data), dtype=self.dtype).view(shape)  # [2C, H/f, W/f]
        if not torch.isfinite(moments).all():
            raise SkipSample("corrupt_latent", f".{member} holds non-finite values")
        geometry = self._geometry(sample, MICROCOND_FLIPPED if flipped else MICROCOND, (th, tw))
        if not self.text_shapes:
            return moments, caption, geometry
        return ({self.batch_key: moments, **{k: self._stored(sample, k, s) for k, s in self.text_shapes.items()}},
                caption, geometry)

    def _stored(self, sample: dict, member: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A stored text-conditioning member (the flipped image's caption is the same: one per sample)."""
        data = sample.get(member)
        if data is None:
            raise SkipSample("missing_latent", f"no .{member} member")
        nbytes = math.prod(shape) * torch.finfo(self.dtype).bits // 8
        if len(data) != nbytes:
            raise SkipSample("corrupt_latent", f".{member} has {len(data)} bytes, {nbytes} expected "
                                               f"({'x'.join(map(str, shape))})")
        value = torch.frombuffer(bytearray(data), dtype=self.dtype).view(shape)
        if not torch.isfinite(value).all():
            raise SkipSample("corrupt_latent", f".{member} holds non-finite values")
        return value

    def without_caption(self, data: "torch.Tensor | dict[str, torch.Tensor]") -> "torch.Tensor | dict[str, torch.Tensor]":
        """A dropped caption: the stored empty prompt's conditioning in place of the sample's (SDXL: zeros)."""
        if not self.text_shapes:
            return data
        return {**data, **self.empty_prompt}  # type: ignore[dict-item]

    @staticmethod
    def _geometry(sample: dict, member: str, target: tuple[int, int]) -> Geometry:
        data = sample.get(member)
        if data is not None:
            try:
                geometry = geometry_from_bytes(data)
            except ValueError as e:
                raise SkipSample("corrupt_latent", f".{member}: {e}") from None
            if geometry[4:] != target:
                raise SkipSample("corrupt_latent", f".{member}: target {geometry[4]}x{geometry[5]} (h x w), the "
                                                   f"batch's is {target[0]}x{target[1]}")
            return geometry
        sizes = json_sizes(parse_json_member(sample))
        oh, ow = (sizes[3], sizes[2]) if sizes is not None else target
        return (oh, ow, 0, 0, *target)

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        if not self.text_shapes:
            return {self.batch_key: torch.stack(items)}  # [B, 2C, R/f, R/f], stored dtype
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}  # + [B, L, D], [B, P]

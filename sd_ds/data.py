"""The training data pipeline: webdataset shards → rank- and worker-local, seeded, exactly resumable batches.

Built like open_clip's ``get_wds_dataset``, as a list of webdataset stages. In each data-loader worker of
each rank, per epoch:

    for every source (a set of shards with a mixture weight), endlessly, pass after pass:
        shard list ─ seeded epoch-aware shuffle (same order on every rank) ─ split by rank ─ split by worker
          ─ tar → samples (warn, count and continue) ─ seeded shuffle buffer
    mix the sources by weight (seeded) ─ number the raw samples ─ [resume: skip k raw samples, undecoded]
      ─ prepare (skip and count corrupt / too small): decode, resize, crop, flip (latent shards: pick the
        stored moments, flipped or not) ─ caption dropout ─ batch + tokenise
    ─ with_epoch(batches per worker)

Image shards give uint8 ``pixel_values`` [B,3,R,R]; latent shards (``python -m sd_ds.encode_latents``, recognised
by the ``latents.json`` manifest in their directory) give ``latent_moments`` [B,2C,R/f,R/f] as stored (mean, then
log-variance channels), from which the trainer draws a fresh latent each step.

Every rank and worker yields exactly ``batches_per_worker`` batches per epoch: a worker whose shards run dry
starts another pass over them, so no rank ever waits for another. Randomness comes from (seed, epoch, rank,
worker) for the streams and from (seed, epoch, sample key) for a sample's crop, flip and caption dropout
(plus how often the worker read that shard before in the epoch, so a repeat is augmented anew), never from
a global RNG. Each batch carries which worker made it and how many raw samples that worker had consumed;
``TrainLoader`` records that as it hands batches to the training loop, so its ``state_dict`` is exactly what
the loop took. A resumed loader replays each worker's seeded stream, skipping that many raw tar samples
without decoding them, and continues with the very same batches. (The skipped samples are still read from
the tars: a resume late in a long epoch costs reading that worker's share so far, at I/O speed.)
"""

from __future__ import annotations

import atexit
import bisect
import collections
import glob as globlib
import io
import itertools
import json
import logging
import math
import multiprocessing.util
import os
import random
import tarfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image

if TYPE_CHECKING:
    from sd_ds.config import DataConfig

logger = logging.getLogger("sd_ds.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_INITIAL = 100  # samples in a shuffle buffer before it starts yielding (webdataset's default)


# --- shard sources ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardSource:
    """A set of shards drawn from with one mixture weight (one ``--train_shards`` entry, or one source of a
    converter's ``sources.json`` / a latent manifest)."""

    name: str  # also seeds the source's shuffles: a latent source keeps its image source's name, hence its order
    weight: float
    shards: tuple[str, ...]
    samples: Optional[int]  # from sources.json / sizes.json / the latent manifest; None until counted


class UnreadableShardError(ValueError):
    """A shard that is not a readable tar (zero bytes, not a tar, unreadable file)."""


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _expand(url: str) -> list[str]:
    import braceexpand

    out: list[str] = []
    for u in braceexpand.braceexpand(url):
        out.extend(sorted(globlib.glob(u)) if _is_local(u) and any(ch in u for ch in "*?[") else [u])
    return out


def _split_weight(entry: str) -> tuple[str, float]:
    """``URL::weight`` → (URL, weight); a plain URL has weight 1."""
    url, weight = entry, 1.0
    if "::" in entry:
        url, w = entry.rsplit("::", 1)
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--train_shards {entry!r}: the weight after '::' must be a number") from None
    if not weight > 0:
        raise ValueError(f"--train_shards {entry!r}: mixture weights must be > 0")
    return url, weight


def sizes_json_count(shards: Iterable[str]) -> Optional[int]:
    """Samples in the shards according to the sizes.json beside them; None if any shard is not listed."""
    total, tables = 0, {}
    for shard in shards:
        if not _is_local(shard):
            return None
        d = Path(shard).parent
        if d not in tables:
            f = d / "sizes.json"
            tables[d] = json.loads(f.read_text()) if f.is_file() else {}
        n = tables[d].get(Path(shard).name)
        if n is None:
            return None
        total += int(n)
    return total


def count_samples(shard: str) -> int:
    """Samples (distinct keys) in a local tar shard, read from its headers only. UnreadableShardError (naming
    the shard) when it is no tar at all; a tar cut short counts the samples before the cut."""
    keys = set()
    try:
        with tarfile.open(shard) as tf:
            try:
                for member in tf:
                    if member.isfile():
                        keys.add(wds.tariterators.base_plus_ext(member.name)[0])
            except (tarfile.TarError, OSError) as e:  # cut short: the reader counts it as a tar error too
                logger.warning("shard %s: %s: %s (counted the %d samples before it)", shard, type(e).__name__, e,
                               len(keys))
    except (tarfile.TarError, OSError) as e:
        size = os.path.getsize(shard) if os.path.isfile(shard) else None
        raise UnreadableShardError(f"{shard}: not a readable tar ({'zero bytes' if size == 0 else e})") from None
    keys.discard(None)
    return len(keys)


def parse_sources(train_shards: list[str]) -> list[ShardSource]:
    """``--train_shards`` entries → sources. An entry is a webdataset URL (brace patterns), a glob, or a
    directory (all its ``*.tar``; a converter output's ``sources.json`` or a latent directory's manifest makes
    each of its sources a weighted source), optionally suffixed with ``::weight``."""
    sources: list[ShardSource] = []
    for entry in train_shards:
        url, weight = _split_weight(entry)
        path = Path(url)
        manifest = load_latent_manifest(path) if path.is_dir() else None
        if manifest is not None:
            # Each source under the name the encoder gave it (its image source's), so that the latent run
            # shuffles and mixes as the image run with the same flags and seed does.
            sources.extend(ShardSource(s["name"], float(s["weight"]) * weight, tuple(str(path / n) for n in s["shards"]),
                                       int(s["samples"])) for s in manifest["sources"] if s["shards"])
            continue
        if path.is_dir() and (path / "sources.json").is_file():
            for s in json.loads((path / "sources.json").read_text())["sources"]:
                shards = tuple(str(path / n) for n in s["shards"])
                if shards and float(s.get("weight", 1.0)) > 0:
                    samples = s.get("samples")
                    sources.append(ShardSource(f"{url}:{s.get('name', len(sources))}",
                                               float(s.get("weight", 1.0)) * weight, shards,
                                               int(samples) if samples is not None else sizes_json_count(shards)))
            continue
        shards = tuple(sorted(str(p) for p in path.glob("*.tar"))) if path.is_dir() else tuple(_expand(url))
        missing = [s for s in shards if _is_local(s) and not os.path.isfile(s)]
        if not shards or missing:
            raise FileNotFoundError(f"--train_shards {entry!r}: no shards found"
                                    + (f" (missing: {', '.join(missing[:3])})" if missing else ""))
        sources.append(ShardSource(url, weight, shards, sizes_json_count(shards)))
    if not sources:
        raise ValueError("--train_shards: no sources (empty list, or sources.json lists no shards)")
    return sources


def _counted(sources: list[ShardSource]) -> tuple[list[ShardSource], dict[str, str]]:
    """Sources with their sample counts read from the tar headers where no sizes.json gave them, leaving out
    shards that are no readable tar or hold no sample (→ (sources, {unreadable shard: why})). A source left
    with no shard is an error naming its shards."""
    counted, unreadable = [], {}
    for s in sources:
        if s.samples is not None:
            counted.append(s)
            continue
        counts = {}
        for shard in s.shards:
            try:
                counts[shard] = count_samples(shard)
            except UnreadableShardError as e:
                unreadable[shard] = str(e)
        kept = tuple(shard for shard in s.shards if counts.get(shard))
        if not kept:
            raise ValueError(f"source {s.name!r}: no shard with a readable sample: "
                             + "; ".join(unreadable.get(shard, f"{shard}: no samples") for shard in s.shards[:5])
                             + (f"; ... ({len(s.shards)} shards)" if len(s.shards) > 5 else ""))
        if len(kept) < len(s.shards):
            logger.warning("source %r: skipping %d of %d shards: %s", s.name, len(s.shards) - len(kept),
                           len(s.shards), "; ".join(unreadable.get(shard, f"{shard}: no samples")
                                                    for shard in s.shards if shard not in kept))
        counted.append(ShardSource(s.name, s.weight, kept, sum(counts[shard] for shard in kept)))
    return counted, unreadable


def raise_if_raw_parts(path: str) -> None:
    """The seed's ``--file_list`` (a list of filelists of raw base64 LAION parts) is not read by the trainer:
    say how to convert it. A directory of tar shards passed by mistake is left for the caller to report."""
    p = Path(path)
    if p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
        return
    raise SystemExit(
        f"--file_list {path}: the trainer reads webdataset shards, not raw LAION parts. Convert them once "
        f"(resumable, uses all cores):\n"
        f"    python tools/convert_laion_to_wds.py --file_list {path} --output_dir SHARDS\n"
        f"then train with\n"
        f"    --train_shards SHARDS\n"
        f"(the filelist weights are kept in SHARDS/sources.json and used to mix the sources).")


# --- latent shards (written by python -m sd_ds.encode_latents) ----------------------------------------

LATENT_MANIFEST = "latents.json"  # in the output directory, written when every shard is encoded
LATENT_WORK_DIR = ".encode"       # the encoder's plan and per-shard records while it runs
MOMENTS, MOMENTS_FLIPPED = "moments", "moments_flip"  # sample members: raw little-endian [2C, R/f, R/f]
LATENT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# What a cache fixes and every latent directory of one run must share.
LATENT_COMPATIBLE = ("resolution", "crop", "dtype", "shape", "flip_variants", "vae")


def load_latent_manifest(directory: Path) -> Optional[dict]:
    """The manifest of a latent-shard directory; None for a directory that is not one; an error for one
    whose encoding has not finished."""
    directory = Path(directory)
    if (directory / LATENT_MANIFEST).is_file():
        return json.loads((directory / LATENT_MANIFEST).read_text())
    if (directory / LATENT_WORK_DIR / "plan.json").is_file():
        done = len(list((directory / LATENT_WORK_DIR).glob("*.tar.json")))
        raise ValueError(f"{directory}: latent encoding has not finished ({done} shard(s) done, no "
                         f"{LATENT_MANIFEST}); run the same `python -m sd_ds.encode_latents` command again to finish it")
    return None


def _latent_directory(url: str) -> Optional[Path]:
    """The latent directory an entry reads from: itself, or the directory of the shards it names."""
    path = Path(url)
    if path.is_dir():
        return path if load_latent_manifest(path) is not None else None
    if not _is_local(url):
        return None
    parents = {Path(s).parent for s in _expand(url)}
    latent = [p for p in parents if load_latent_manifest(p) is not None]
    if latent and len(latent) < len(parents):
        raise ValueError(f"--train_shards {url!r} names latent shards ({latent[0]}) and image shards together")
    return latent[0] if latent else None


def read_latent_manifest(train_shards: list[str]) -> Optional[dict]:
    """The latent manifest ``--train_shards`` trains on (that of the first latent directory; all of them must
    agree on everything in LATENT_COMPATIBLE), or None for image shards. Mixing latent and image sources, or
    latent directories made differently, is an error."""
    manifests: dict[str, Optional[dict]] = {}
    for entry in train_shards:
        url, _ = _split_weight(entry)
        directory = _latent_directory(url)
        manifests[entry] = load_latent_manifest(directory) if directory is not None else None
    latent = [e for e, m in manifests.items() if m is not None]
    images = [e for e, m in manifests.items() if m is None]
    if not latent:
        return None
    if images:
        raise ValueError(
            f"--train_shards mixes latent shards ({', '.join(latent)}) with image shards ({', '.join(images)}): a run "
            f"trains on one or the other. Encode the image shards too (python -m sd_ds.encode_latents --train_shards "
            f"... --output_dir ..., with the same VAE and resolution) or train on the image shards only.")
    first = manifests[latent[0]]
    for entry in latent[1:]:
        other = manifests[entry]
        differ = [k for k in LATENT_COMPATIBLE if other.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"--train_shards: the latent shards of {latent[0]!r} and {entry!r} were encoded "
                             f"differently ({', '.join(differ)}); encode every source with the same settings")
    return first


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
            if img.mode != "RGB":
                img = img.convert("RGB")
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
        # normalises on the device (x / 127.5 - 1, sd_ds.encode_latents.encode_moments).
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


# --- pipeline stages ---------------------------------------------------------------------------------

def _seed(*parts: Any) -> str:
    # A str seed is hashed with SHA-512 by `random`: stable across processes and runs, unlike hash().
    return "/".join(str(p) for p in parts)


def _rng(*parts: Any) -> random.Random:
    return random.Random(_seed(*parts))


def _split(index: int, count: int) -> Callable[[Iterable], Iterator]:
    """Every count-th item from index: split by node (rank) or by worker."""
    return lambda src: itertools.islice(src, index, None, count)


def _resampled(shards: tuple[str, ...], rng: random.Random) -> Callable[[], Iterator[dict]]:
    """Shards drawn with replacement, endlessly (open_clip's ResampledShards with an explicit seed)."""
    def draw() -> Iterator[dict]:
        while True:
            yield {"url": rng.choice(shards)}
    return draw


def _tar_to_samples(opened: collections.Counter, handler: Callable[[Exception], bool],
                    max_empty_in_a_row: int) -> Callable:
    """webdataset's tar reader, one shard at a time so each sample knows how often this worker opened its
    shard before in this epoch (a repeat gets fresh random choices)."""
    def stage(shards: Iterable[dict]) -> Iterator[dict]:
        empty_in_a_row = 0
        for shard in shards:
            url = shard["url"]
            repeat = opened[url]
            opened[url] += 1
            empty_in_a_row += 1
            for sample in wds.tarfile_samples([{"url": url}], handler=handler):
                empty_in_a_row = 0
                sample["__repeat__"] = repeat
                yield sample
            if empty_in_a_row > max_empty_in_a_row:  # endless resampling of unreadable shards must not hang
                raise RuntimeError(f"{empty_in_a_row} shards in a row had no readable sample (last: {url})")
    return stage


def _mixed(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """wds.RandomMix, but seeded."""
    if len(streams) == 1:
        yield from streams[0]
        return
    cum = list(itertools.accumulate(weights))
    while True:
        i = min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(streams) - 1)
        yield next(streams[i])


def _numbered(src: Iterable[dict]) -> Iterator[dict]:
    for index, sample in enumerate(src):
        sample["__index__"] = index  # position in this worker's raw stream; resume skips up to here
        yield sample


def _batched(batch_size: int, collate: Callable[[list], dict]) -> Callable:
    """Batch as soon as it is full (webdataset's `batched` waits for the next sample, which would decode
    one sample beyond the batch and let its skip counts leak into this batch's statistics)."""
    def stage(src: Iterable) -> Iterator[dict]:
        batch = []
        for sample in src:
            batch.append(sample)
            if len(batch) == batch_size:
                yield collate(batch)
                batch = []
    return stage


# --- the dataset (runs in each worker) ---------------------------------------------------------------

class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of one rank's batches; each data-loader worker iterates its own part."""

    def __init__(self, sources: list[ShardSource], *, tokenizer: Any, samples: "ImageSamples | LatentSamples",
                 micro_batch_size: int, model_max_length: int, caption_dropout_prob: float, shuffle_buffer: int,
                 seed: int, rank: int, world_size: int, num_workers: int, resample: bool, batches_per_worker: int,
                 max_skips_in_a_row: int) -> None:
        self.sources, self.tokenizer, self.samples = sources, tokenizer, samples
        self.micro_batch_size, self.model_max_length = micro_batch_size, model_max_length
        self.caption_dropout_prob, self.shuffle_buffer = caption_dropout_prob, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.resample, self.batches_per_worker = max(1, num_workers), resample, batches_per_worker
        self.max_skips_in_a_row = max_skips_in_a_row
        self.epoch = 0
        self.resume: dict[int, tuple[int, int]] = {}  # worker -> (batches taken, raw samples consumed)

    def _source_samples(self, source: ShardSource, worker: int, log: SkipLog) -> Iterator[dict]:
        """Endless raw samples of one source for this (rank, worker, epoch)."""
        total_weight = sum(s.weight for s in self.sources)
        # The buffers of all sources together hold about shuffle_buffer samples, as in a single-source run.
        bufsize = max(1, round(self.shuffle_buffer * source.weight / total_weight))
        opened: collections.Counter = collections.Counter()
        for epoch_pass in itertools.count():
            # A worker whose shards run dry before the epoch's batches are done starts another pass over
            # them; the shuffle buffer flushes at the end of each pass, so a pass yields each sample once.
            if self.resample:
                shards = [_resampled(source.shards, _rng(self.seed, self.epoch, self.rank, worker, source.name))]
            else:
                shards = [
                    # seeded epoch-aware shuffle: the same order on every rank, so the splits are disjoint
                    wds.SimpleShardList(list(source.shards), seed=_seed(self.seed, self.epoch, source.name, "shards")),
                    _split(self.rank, self.world_size),        # split by node
                    _split(worker, self.num_workers),          # split by worker
                ]
            pipeline = wds.DataPipeline(
                *shards,
                _tar_to_samples(opened, handler=log.tar_error, max_empty_in_a_row=10 * len(source.shards) + 10),
                wds.shuffle(bufsize, min(bufsize, SHUFFLE_INITIAL),
                            rng=_rng(self.seed, self.epoch, self.rank, worker, source.name, epoch_pass, "samples")),
            )
            read = 0
            for sample in pipeline:
                read += 1
                yield sample
            if read == 0:
                tried = sorted(opened)
                raise RuntimeError(f"rank {self.rank} worker {worker}: no readable sample in the shards of source "
                                   f"{source.name!r} it was given ({log.counts['tar_errors']} tar errors): "
                                   f"{', '.join(tried[:5])}{' ...' if len(tried) > 5 else ''}")

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        batches_done, raw_done = self.resume.get(worker, (0, 0))
        if batches_done >= self.batches_per_worker:
            return  # this worker's share of the epoch was taken before the checkpoint
        log = SkipLog(f"data rank {self.rank} worker {worker} epoch {self.epoch}")
        streams = [self._source_samples(s, worker, log) for s in self.sources]
        skips_in_a_row = 0

        def prepare(sample: dict) -> Optional[dict]:
            nonlocal skips_in_a_row
            # The sample's own RNG: its random choices do not depend on which samples came before it.
            rng = _rng(self.seed, self.epoch, os.path.basename(sample["__url__"]), sample["__key__"],
                       sample["__repeat__"])
            try:
                data, caption = self.samples.prepare(sample, rng)
            except SkipSample as skip:
                log.skip(skip.reason, f"{sample.get('__url__')}:{sample['__key__']}: {skip}")
                skips_in_a_row += 1
                if skips_in_a_row > self.max_skips_in_a_row:  # a stream with nothing usable must not spin forever
                    raise RuntimeError(f"rank {self.rank} worker {worker}: {skips_in_a_row} samples in a row were "
                                       f"unusable ({dict(log.counts)}); check the shards and --min_size/--resolution")
                return None
            skips_in_a_row = 0
            caption = "" if rng.random() < self.caption_dropout_prob else caption  # for CFG
            return {"data": data, "caption": caption, "key": sample["__key__"], "index": sample["__index__"]}

        batch_numbers = itertools.count(batches_done + 1)

        def collate(samples: list[dict]) -> dict:
            from sd_ds.models import tokenize

            captions = [s["caption"] for s in samples]
            return {
                self.samples.batch_key: self.samples.collate([s["data"] for s in samples]),
                "input_ids": tokenize(self.tokenizer, captions, self.model_max_length),  # [B, model_max_length]
                "captions": captions,
                "keys": [s["key"] for s in samples],
                # (epoch, worker, batches made, raw samples consumed) for TrainLoader's exact state
                "__position__": torch.tensor([self.epoch, worker, next(batch_numbers), samples[-1]["index"] + 1]),
                "__stats__": dict(log.counts),
            }

        yield from wds.DataPipeline(
            lambda: _mixed(streams, [s.weight for s in self.sources],
                           _rng(self.seed, self.epoch, self.rank, worker, "mix")),
            _numbered,
            lambda src: itertools.islice(src, raw_done, None),  # resume: skip raw samples, undecoded
            wds.map(prepare),
            _batched(self.micro_batch_size, collate),
        ).with_epoch(self.batches_per_worker - batches_done)


def _ignore_stop_signals(worker_id: int) -> None:
    # SIGTERM to the whole job (SLURM, k8s) must reach only the trainer, which checkpoints and then ends its
    # workers; a worker dying first would fail the batches the checkpoint step still needs.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- the loader the training loop iterates -----------------------------------------------------------

_LIVE_LOADERS: "weakref.WeakSet[TrainLoader]" = weakref.WeakSet()


def _stop_workers_at_exit() -> None:
    # The workers ignore SIGTERM, so multiprocessing's exit handler (terminate, then join every child) would
    # wait forever for the workers of a loader still being iterated when the interpreter exits. atexit runs
    # handlers last registered first: this one runs before multiprocessing's and ends them properly.
    for loader in list(_LIVE_LOADERS):
        loader.close()


assert multiprocessing.util  # imported first, so that its exit handler runs after ours
atexit.register(_stop_workers_at_exit)


class TrainLoader:
    """Endless iterator of micro batches for this rank; rolls over epochs; exact state for resume."""

    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool, fingerprint: dict,
                 shard_stats: Optional[dict[str, int]] = None) -> None:
        self.dataset = dataset
        self.shard_stats = dict(shard_stats or {})  # shards left out when the loader was built (unreadable_shards)
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.batches_per_epoch = dataset.batches_per_worker * max(1, num_workers)
        self.fingerprint = fingerprint  # what must match for a saved position to mean the same samples
        self.epoch = 0
        self._taken: dict[int, tuple[int, int]] = {}  # worker -> (batches, raw samples) handed to the consumer
        self._stats_before: collections.Counter[str] = collections.Counter()  # earlier epochs and runs
        self._stats_epoch: dict[int, dict] = {}  # worker -> its counts this epoch, as of the last batch taken
        self._workers: Optional[Iterator] = None  # the running DataLoader iterator
        _LIVE_LOADERS.add(self)

    def _loader(self) -> torch.utils.data.DataLoader:
        self.dataset.epoch = self.epoch
        self.dataset.resume = dict(self._taken)
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=2 if self.num_workers > 0 else None, persistent_workers=False,
            worker_init_fn=_ignore_stop_signals)

    def __iter__(self) -> Iterator[dict]:
        workers = max(1, self.num_workers)
        while True:
            # Hand batches over in the uninterrupted interleaving (worker w's b-th batch is number
            # (b-1)*workers + w), also after a resume, where the DataLoader's round robin restarts at worker 0
            # although the workers stopped at different points.
            next_number = sum(b for b, _ in self._taken.values())
            pending: dict[int, tuple[int, int, int, dict]] = {}
            self._workers = iter(self._loader())
            try:
                for batch in self._workers:
                    _, worker, batches, raw = batch.pop("__position__").tolist()
                    pending[(batches - 1) * workers + worker] = (worker, batches, raw, batch)
                    while next_number in pending:
                        worker, batches, raw, ready = pending.pop(next_number)
                        self._taken[worker] = (batches, raw)
                        self._stats_epoch[worker] = ready.pop("__stats__")
                        next_number += 1
                        yield ready
            finally:
                self.close()
            if pending or next_number != self.batches_per_epoch:
                raise RuntimeError(f"data epoch {self.epoch} ended after {next_number} of {self.batches_per_epoch} "
                                   f"batches ({len(pending)} out of order)")
            self._end_epoch()

    def close(self) -> None:
        """End the data-loader workers now (they also end when the iterator is garbage collected)."""
        workers, self._workers = self._workers, None
        shutdown = getattr(workers, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()

    def _end_epoch(self) -> None:
        self._stats_before = self._stats_total()
        self._stats_epoch = {}
        self._taken = {}
        self.epoch += 1

    def _stats_total(self) -> collections.Counter[str]:
        total = collections.Counter(self._stats_before)
        for counts in self._stats_epoch.values():
            total.update(counts)
        return total

    def stats(self) -> dict[str, int]:
        """Skipped samples by reason (too_small, undecodable, missing_image, missing_caption, tar_errors; on
        latent shards missing_latent, corrupt_latent), over the batches taken so far, from all workers (and the
        run this one resumed), plus the shards left out as unreadable when the loader was built."""
        return {**self._stats_total(), **self.shard_stats}

    def state_dict(self) -> dict:
        taken = sum(b for b, _ in self._taken.values())
        epoch, workers = (self.epoch + 1, []) if taken == self.batches_per_epoch else (
            self.epoch, [[w, b, r] for w, (b, r) in sorted(self._taken.items())])
        return {"epoch": epoch, "workers": workers, "world_size": self.dataset.world_size,
                "num_workers": self.num_workers, "fingerprint": self.fingerprint, "stats": self.stats()}

    def load_state_dict(self, state: dict) -> None:
        """Call before iterating. Resumes exactly where the saved loader's consumer stopped, or restarts the
        saved epoch (with a warning) if the saved position means different samples now."""
        self._stats_before = collections.Counter({k: v for k, v in state.get("stats", {}).items()
                                                  if k not in self.shard_stats})  # those are counted anew
        self._stats_epoch = {}
        self.epoch = int(state["epoch"])
        self._taken = {}
        changed = [f"{name}={saved!r} (now {now!r})" for name, saved, now in (
            ("world_size", state.get("world_size"), self.dataset.world_size),
            ("num_workers", state.get("num_workers"), self.num_workers),
            *((k, state.get("fingerprint", {}).get(k), v) for k, v in self.fingerprint.items()))
            if saved != now]
        if changed:
            logger.warning("data state was saved with %s: each rank and worker reads different samples now, so "
                           "data epoch %d restarts from its beginning", ", ".join(changed), self.epoch)
            return
        self._taken = {int(w): (int(b), int(r)) for w, b, r in state["workers"]}


def build_train_loader(data: "DataConfig", *, tokenizer: Any, model_max_length: int, micro_batch_size: int,
                       seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> TrainLoader:
    """This rank's loader for the ``--train_shards`` in ``data``: image shards, or latent shards when their
    directory holds an encoder manifest (``read_latent_manifest``)."""
    manifest = read_latent_manifest(list(data.train_shards))
    sources = parse_sources(list(data.train_shards))
    shard_stats: dict[str, int] = {}
    if data.samples_per_epoch is None:
        # sizes.json (or sources.json, the latent manifest), else read the tar headers once.
        sources, unreadable = _counted(sources)
        if unreadable:
            shard_stats["unreadable_shards"] = len(unreadable)
        total = sum(s.samples for s in sources)
    else:
        total = data.samples_per_epoch
    workers = max(1, data.dataloader_num_workers)
    if not data.resample_shards:
        for s in sources:
            if len(s.shards) < world_size * workers:
                raise ValueError(
                    f"source {s.name!r} has {len(s.shards)} shard(s) for {world_size} rank(s) x {workers} data "
                    f"worker(s) = {world_size * workers} readers, and every reader needs at least one shard. Write "
                    f"more, smaller shards (convert_laion_to_wds.py --samples_per_shard), use fewer workers "
                    f"(--dataloader_num_workers), or sample shards with replacement (resample_shards=True, "
                    f"--resample_shards).")
    batches_per_worker = max(1, total // (world_size * workers * micro_batch_size))
    if manifest is None:
        samples: ImageSamples | LatentSamples = ImageSamples(
            ImageTransform(data.resolution, data.center_crop, data.random_flip, data.min_size))
    else:
        if data.random_flip and not manifest["flip_variants"]:
            raise ValueError("--random_flip on latent shards needs the flipped images' moments, and these were "
                             "encoded without them: encode again with --flip_variants, or drop --random_flip")
        if not data.center_crop:
            logger.warning("latent shards hold centre crops at %d px, made when they were encoded: --center_crop "
                           "False (a random crop per step) does not apply to them", manifest["resolution"])
        samples = LatentSamples(manifest, data.random_flip)
    dataset = ShardStream(
        sources, tokenizer=tokenizer, samples=samples, micro_batch_size=micro_batch_size,
        model_max_length=model_max_length, caption_dropout_prob=data.caption_dropout_prob,
        shuffle_buffer=data.shuffle_buffer, seed=seed, rank=rank, world_size=world_size,
        num_workers=data.dataloader_num_workers, resample=data.resample_shards, batches_per_worker=batches_per_worker,
        # About two passes over a worker's share with nothing usable: broken data, not bad luck.
        max_skips_in_a_row=2 * math.ceil(total / (world_size * workers)) + 1000)
    if data.dataloader_num_workers > 0:
        # Tokenising happens in the workers; a Rust tokenizer's own thread pool there only oversubscribes.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fingerprint = {"sources": [[s.name, s.weight, len(s.shards)] for s in sources], "seed": seed,
                   "micro_batch_size": micro_batch_size, "shuffle_buffer": data.shuffle_buffer,
                   "resample_shards": data.resample_shards, "batches_per_worker": batches_per_worker}
    if manifest is not None:
        # Latent shards lack the samples the encoder skipped: a position in an image run's stream means
        # other samples there, although the source names (hence the shuffles) are the same.
        fingerprint["latents"] = True
    loader = TrainLoader(dataset, num_workers=data.dataloader_num_workers, pin_memory=pin_memory,
                         fingerprint=fingerprint, shard_stats=shard_stats)
    logger.info("data: %d %s source(s), %d samples/epoch, %d batches/epoch on each rank (%d worker(s) x %d)",
                len(sources), "image" if manifest is None else "latent", total, loader.batches_per_epoch, workers,
                batches_per_worker)
    return loader

"""The training data pipeline: webdataset shards → rank- and worker-local, seeded, exactly resumable batches.

Per epoch, on each rank and each data-loader worker, the stages are (as in open_clip's ``get_wds_dataset``):

    shards of a source ─ seeded epoch-aware shuffle ─ split by rank ─ split by worker   (or resampled)
      └ tar → samples (warn and continue) ─ mix sources by weight ─ seeded shuffle buffer
          └ [resume: skip k raw samples, undecoded] ─ decode + transform (per-sample RNG) ─ batch ─ tokenise

Every rank and worker yields exactly ``batches_per_worker`` batches per epoch (cycling its shards if they
run dry), so no rank ever waits for another. All randomness comes from (seed, epoch, rank, worker) or from
(seed, epoch, sample key), never from a global RNG; each batch records how many raw samples its worker had
consumed, and ``TrainLoader.state_dict`` stores that for the batches the training loop actually took. A
resumed loader fast-forwards each worker through that many raw tar members without decoding them and
continues with the very same samples in the same order.
"""

from __future__ import annotations

import glob as globlib
import io
import itertools
import json
import logging
import math
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("sd_ds.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
RAW_PART_SUFFIXES = (".gz", ".list", ".filelist", ".txt")


# --- shard sources ------------------------------------------------------------------------------------

@dataclass
class Source:
    name: str
    weight: float
    shards: list[str]
    samples: int  # total samples in the shards (sizes.json, else counted)


def _expand(url: str) -> list[str]:
    import braceexpand

    out: list[str] = []
    for u in braceexpand.braceexpand(url):
        if any(ch in u for ch in "*?["):
            out.extend(sorted(globlib.glob(u)))
        else:
            out.append(u)
    return out


def _count_samples(shard: str) -> int:
    keys = set()
    with tarfile.open(shard) as tf:
        for m in tf:
            if m.isfile():
                keys.add(m.name.split(".", 1)[0])
    return len(keys)


def _sizes_for(shards: list[str]) -> int:
    total = 0
    cache: dict[Path, dict] = {}
    for s in shards:
        d = Path(s).parent
        if d not in cache:
            f = d / "sizes.json"
            cache[d] = json.loads(f.read_text()) if f.is_file() else {}
        n = cache[d].get(Path(s).name)
        total += int(n) if n is not None else _count_samples(s)
    return total


def parse_sources(train_shards: list[str]) -> list[Source]:
    """Entries: URL (brace pattern), glob, directory (its *.tar; a converter output's sources.json becomes
    weighted sources), each optionally suffixed with ``::weight``."""
    sources: list[Source] = []
    for entry in train_shards:
        url, weight = entry, None
        if "::" in entry:
            url, w = entry.rsplit("::", 1)
            weight = float(w)
        path = Path(url)
        if path.is_dir():
            meta = path / "sources.json"
            if meta.is_file():
                for s in json.loads(meta.read_text())["sources"]:
                    shards = [str(path / n) for n in s["shards"]]
                    if shards:
                        w = float(s.get("weight", 1.0)) * (weight if weight is not None else 1.0)
                        sources.append(Source(s.get("name", str(path)), w, shards, int(s.get("samples") or _sizes_for(shards))))
                continue
            shards = sorted(str(p) for p in path.glob("*.tar"))
        else:
            shards = _expand(url)
        missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not os.path.exists(s)]
        if not shards or missing:
            raise FileNotFoundError(f"--train_shards {entry!r}: no shards found" + (f" (missing: {missing[:3]})" if missing else ""))
        sources.append(Source(url, weight if weight is not None else 1.0, shards, _sizes_for(shards)))
    if not sources:
        raise ValueError("--train_shards is empty")
    return sources


def raise_if_raw_parts(path: str) -> None:
    """A seed-style --file_list points at raw LAION parts, which the trainer does not read directly."""
    raise SystemExit(
        f"--file_list {path}: the trainer reads webdataset shards, not raw LAION parts. Convert once (resumable, "
        f"uses all cores):\n    python tools/convert_laion_to_wds.py --file_list {path} --output_dir SHARDS_DIR\n"
        f"then train with --train_shards SHARDS_DIR (filelist weights are kept and used for mixing).")


# --- per-worker sample streams -----------------------------------------------------------------------

def _rng(*parts: Any) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`: stable across processes, unlike hash().
    return random.Random("/".join(str(p) for p in parts))


def _tar_samples(shard: str, warn: "RateLimitedWarning", stats: dict) -> Iterator[dict]:
    """Group tar members by key into samples {'__key__', ext: bytes}; a broken tar ends early with a warning."""
    from webdataset.gopen import gopen  # local paths, pipe:, http(s):, s3 via pipe: ...

    current: Optional[dict] = None
    try:
        with gopen(shard, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(m.name), key)
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard}
                current[ext.lower()] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        stats["tar_errors"] = stats.get("tar_errors", 0) + 1
        warn(f"shard {shard}: {type(e).__name__}: {e} (rest of the shard skipped)")
    if current is not None:
        yield current


def _source_stream(source: Source, *, seed: int, epoch: int, rank: int, world_size: int, worker: int,
                   num_workers: int, resample: bool, warn: "RateLimitedWarning", stats: dict) -> Iterator[dict]:
    """Endless raw samples of one source for one (rank, worker) in one epoch."""
    if resample:
        rng = _rng(seed, epoch, rank, worker, source.name, "resample")
        while True:
            yield from _tar_samples(rng.choice(source.shards), warn, stats)
    shards = list(source.shards)
    _rng(seed, epoch, source.name, "shards").shuffle(shards)  # same order on every rank: then split
    mine = shards[rank::world_size][worker::num_workers]
    for cycle in itertools.count():
        # A worker whose shards ran dry before the epoch's batch count starts over on them.
        for shard in mine:
            for sample in _tar_samples(shard, warn, stats):
                sample["__cycle__"] = cycle
                yield sample


def _mixed(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    if len(streams) == 1:
        yield from streams[0]
        return
    total = sum(weights)
    cum = list(itertools.accumulate(w / total for w in weights))
    while True:
        r = rng.random()
        yield next(streams[next(i for i, c in enumerate(cum) if r <= c or i == len(cum) - 1)])


def _shuffled(stream: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    if bufsize <= 1:
        yield from stream
        return
    buf: list[dict] = []
    for sample in stream:
        buf.append(sample)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()


class RateLimitedWarning:
    """The first few warnings, then one in a thousand: corrupt samples must not flood the log."""

    def __init__(self, first: int = 5, every: int = 1000) -> None:
        self.count, self.first, self.every = 0, first, every

    def __call__(self, msg: str) -> None:
        self.count += 1
        if self.count <= self.first or self.count % self.every == 0:
            logger.warning("%s [warning %d]", msg, self.count)


# --- decode and transform ----------------------------------------------------------------------------

@dataclass
class Transform:
    resolution: int
    center_crop: bool
    random_flip: bool
    min_size: int
    caption_dropout_prob: float

    def __call__(self, sample: dict, rng: random.Random, stats: dict, warn: RateLimitedWarning) -> Optional[tuple]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        caption = sample.get("txt")
        if ext is None or caption is None:
            stats["missing_fields"] = stats.get("missing_fields", 0) + 1
            warn(f"sample {sample['__key__']} in {sample.get('__shard__')}: no image or caption")
            return None
        try:
            img = Image.open(io.BytesIO(sample[ext]))
            if min(img.size) < self.min_size:
                stats["too_small"] = stats.get("too_small", 0) + 1
                return None
            target = int(self.resolution / 0.9)  # the seed's resize: shorter side to resolution / 0.9
            if img.format == "JPEG":
                img.draft("RGB", (target, target))  # DCT-domain downscale: decode only what the resize needs
            img = img.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any undecodable image is skipped and counted
            stats["undecodable"] = stats.get("undecodable", 0) + 1
            warn(f"sample {sample['__key__']} in {sample.get('__shard__')}: {type(e).__name__}: {e}")
            return None
        w, h = img.size
        scale = target / min(w, h)
        img = img.resize((max(target, round(w * scale)), max(target, round(h * scale))), Image.LANCZOS)
        w, h = img.size
        r = self.resolution
        if self.center_crop:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        img = img.crop((left, top, left + r, top + r))
        if self.random_flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        text = caption.decode("utf-8", errors="replace") if isinstance(caption, bytes) else str(caption)
        if rng.random() < self.caption_dropout_prob:
            text = ""  # classifier-free guidance needs the unconditional case
        return pixels, text, sample["__key__"]


# --- the dataset (runs in each worker) ---------------------------------------------------------------

class ShardStream(torch.utils.data.IterableDataset):
    def __init__(self, sources: list[Source], *, tokenizer: Any, transform: Transform, micro_batch_size: int,
                 model_max_length: int, shuffle_buffer: int, seed: int, rank: int, world_size: int,
                 num_workers: int, resample: bool, batches_per_worker: int) -> None:
        self.sources, self.tokenizer, self.transform = sources, tokenizer, transform
        self.micro_batch_size, self.model_max_length, self.shuffle_buffer = micro_batch_size, model_max_length, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.resample, self.batches_per_worker = max(1, num_workers), resample, batches_per_worker
        self.epoch = 0
        self.resume: dict[int, tuple[int, int]] = {}  # worker -> (batches done, raw samples consumed)

    def __iter__(self) -> Iterator[dict]:
        from sd_ds.models import tokenize

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        batches_done, raw_done = self.resume.get(worker, (0, 0))
        stats: dict[str, int] = {}
        warn = RateLimitedWarning()
        streams = [_source_stream(s, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                                  worker=worker, num_workers=self.num_workers, resample=self.resample, warn=warn,
                                  stats=stats) for s in self.sources]
        raw = _mixed(streams, [s.weight for s in self.sources], _rng(self.seed, self.epoch, self.rank, worker, "mix"))
        raw = _shuffled(raw, self.shuffle_buffer, _rng(self.seed, self.epoch, self.rank, worker, "buffer"))
        for _ in range(raw_done):  # fast-forward: undecoded tar members only
            next(raw)
        consumed = raw_done
        # A stream with nothing usable would otherwise spin forever looking for the next valid sample.
        max_invalid_run = 2 * sum(s.samples for s in self.sources) + 1000
        invalid_run = 0
        for batch_index in range(batches_done, self.batches_per_worker):
            pixels, texts, keys = [], [], []
            while len(keys) < self.micro_batch_size:
                sample = next(raw)
                consumed += 1
                out = self.transform(sample, _rng(self.seed, self.epoch, sample["__key__"], sample.get("__cycle__", 0)),
                                     stats, warn)
                if out is None:
                    invalid_run += 1
                    if invalid_run > max_invalid_run:
                        raise RuntimeError(f"rank {self.rank} worker {worker}: {invalid_run} samples in a row were "
                                           f"unusable ({stats}); check the shards and --min_size/--resolution")
                    continue
                invalid_run = 0
                pixels.append(out[0]), texts.append(out[1]), keys.append(out[2])
            yield {
                "pixel_values": torch.stack(pixels).float().div_(127.5).sub_(1.0),  # [B,3,R,R] in [-1, 1]
                "input_ids": tokenize(self.tokenizer, texts, self.model_max_length),  # [B, max_length]
                "captions": texts, "keys": keys,
                "__position__": torch.tensor([self.epoch, worker, batch_index + 1, consumed]),
                "__stats__": dict(stats),
            }


class TrainLoader:
    """Endless iterator of micro batches for this rank; rolls over epochs; exact state for resume."""

    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.batches_per_epoch = dataset.batches_per_worker * max(1, num_workers)
        self.epoch = 0
        self._progress: dict[int, tuple[int, int]] = {}  # worker -> (batches, raw) handed to the consumer
        self._stats: dict[int, dict] = {}

    def _epoch_iter(self) -> Iterator[dict]:
        self.dataset.epoch = self.epoch
        self.dataset.resume = dict(self._progress)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers > 0 else None, persistent_workers=False)
        return iter(loader)

    def __iter__(self) -> Iterator[dict]:
        workers = max(1, self.num_workers)
        while True:
            # Hand batches over in the uninterrupted interleaving (worker w's b-th batch is number
            # b*workers + w), also after a resume where the DataLoader restarts its round robin at worker 0.
            next_index = sum(b for b, _ in self._progress.values())
            pending: dict[int, tuple] = {}
            for batch in self._epoch_iter():
                _, worker, batches, raw = batch.pop("__position__").tolist()
                pending[(batches - 1) * workers + worker] = (worker, batches, raw, batch)
                while next_index in pending:
                    worker, batches, raw, ready = pending.pop(next_index)
                    self._progress[worker] = (batches, raw)
                    self._stats[worker] = ready.pop("__stats__")
                    next_index += 1
                    yield ready
            self.epoch += 1
            self._progress = {}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "workers": {int(k): list(v) for k, v in self._progress.items()},
                "world_size": self.dataset.world_size, "num_workers": self.num_workers,
                "batches_per_worker": self.dataset.batches_per_worker}

    def load_state_dict(self, state: dict) -> None:
        same = (state.get("world_size") == self.dataset.world_size and state.get("num_workers") == self.num_workers
                and state.get("batches_per_worker") == self.dataset.batches_per_worker)
        if not same:
            logger.warning("data state was saved with world_size=%s num_workers=%s (now %s, %s): epoch %s restarts",
                           state.get("world_size"), state.get("num_workers"), self.dataset.world_size,
                           self.num_workers, state.get("epoch"))
            self.epoch, self._progress = int(state.get("epoch", 0)), {}
            return
        self.epoch = int(state["epoch"])
        self._progress = {int(k): (int(v[0]), int(v[1])) for k, v in state["workers"].items()}

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for s in self._stats.values():
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        return total


def build_train_loader(train_shards: list[str], *, tokenizer: Any, micro_batch_size: int, resolution: int,
                       center_crop: bool = False, random_flip: bool = False, min_size: Optional[int] = None,
                       caption_dropout_prob: float = 0.1, model_max_length: int = 77, num_workers: int = 2,
                       shuffle_buffer: int = 1000, seed: int = 0, rank: int = 0, world_size: int = 1,
                       resample_shards: bool = False, samples_per_epoch: Optional[int] = None,
                       pin_memory: bool = False) -> TrainLoader:
    sources = parse_sources(list(train_shards))
    workers = max(1, num_workers)
    if not resample_shards:
        for s in sources:
            if len(s.shards) < world_size * workers:
                raise ValueError(
                    f"source {s.name}: {len(s.shards)} shards for {world_size} ranks x {workers} data workers; every "
                    f"worker needs at least one shard. Write more, smaller shards (--samples_per_shard), use fewer "
                    f"workers (--dataloader_num_workers), or sample shards with replacement (--resample_shards).")
    total = samples_per_epoch or sum(s.samples for s in sources)
    batches_per_worker = max(1, total // (world_size * workers * micro_batch_size))
    transform = Transform(resolution, center_crop, random_flip, resolution if min_size is None else min_size,
                          caption_dropout_prob)
    dataset = ShardStream(sources, tokenizer=tokenizer, transform=transform, micro_batch_size=micro_batch_size,
                          model_max_length=model_max_length, shuffle_buffer=shuffle_buffer, seed=seed, rank=rank,
                          world_size=world_size, num_workers=num_workers, resample=resample_shards,
                          batches_per_worker=batches_per_worker)
    loader = TrainLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)
    logger.info("data: %d source(s), %d samples, %d batches/epoch on each rank (%d workers x %d)",
                len(sources), total, loader.batches_per_epoch, workers, batches_per_worker)
    return loader

"""The loader the training loop iterates: each rank's data-loader workers read their spans of the epoch order.

Per epoch, in each data-loader worker (one *reader*: rank x workers + worker) of each rank:

    the epoch's positions still to serve (sd_ds.data.order) ─ this reader's contiguous span ─ [resume: start at
      the raw position reached, O(1)] ─ position → (source, sample) → (shard, member) ─ read from the shard
      (sd_ds.data.reading; continuing the open stream) ─ prepare (skip and count corrupt / too small): decode,
      resize, crop, flip (latent shards: pick the stored moments) ─ caption dropout ─ batch + tokenise
    ─ exactly batches_per_worker batches

A batch (a dict):

- ``pixel_values`` uint8 [B,3,H,W] (image shards) or ``latent_moments`` [B,2C,H/f,W/f] in the stored dtype
  (latent shards): H = W = --resolution, or one aspect-ratio bucket's size per batch (--aspect_ratio_buckets);
- latent shards encoded with --text_embeddings: ``prompt_embeds`` [B, L, D] (and SDXL's ``pooled_prompt_embeds``
  [B, P]) in the stored dtype, each sample's stored text conditioning, the stored empty prompt's where caption
  dropout dropped its caption;
- ``input_ids`` int64 [B, model_max_length] (SDXL also ``input_ids_2``, its second tokenizer's), ``empty_caption``
  bool [B] (the caption is "": dropped, or empty in the data), ``captions`` (after caption dropout), ``keys``;
- SDXL's micro-conditioning, int64 [B,2] each (``sd_ds.data.transforms``): ``original_size`` (height, width) of the
  source image before any resize, ``crop_top_left`` (top, left) of the crop in the resized image (mirrored with a
  flip), ``target_size`` (height, width) of the crop.

With --aspect_ratio_buckets every micro batch holds one bucket (ranks may be in different buckets at one step): the
readers serve micro batches formed over the whole epoch's order (``sd_ds.data.bucket_order``) instead of
positions, and a reader's position is the number of batches it served.
Randomness: the order from (seed, epoch, sources' metadata); a sample's crop, flip and caption dropout from
(seed, epoch, shard name, sample key, repeat). Each batch carries which worker made it and how many raw
positions of its span that worker had consumed; ``TrainLoader`` records that as it hands batches to the training
loop, so its ``state_dict`` is exactly what the loop took. A resumed loader starts each reader at its position
(reading at most one shard's samples before it); a resume on another number of ranks or workers continues the
epoch with what the saved readers had not consumed (``load_state_dict``).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import math
import multiprocessing.util
import os
import random
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from sd_ds.config import DataConfig
from sd_ds.data import order as order_lib
from sd_ds.data.bucket_order import BucketedEpoch, plan_summary
from sd_ds.data.buckets import BucketList
from sd_ds.data.image_sizes import BucketMeta, build_bucket_meta
from sd_ds.data.reading import SourceCursor, basename
from sd_ds.data.manifest import read_empty_prompt
from sd_ds.data.sources import (ShardSource, count_here, count_missing, latent_directory_of_shards,
                                latent_manifest_of_shards, parse_sources, shared_counter)
from sd_ds.data.transforms import ImageSamples, ImageTransform, LatentSamples, SkipLog, SkipSample
from sd_ds.retries import Backoff, RetryPolicy, StorageUnavailable, default_policy

logger = logging.getLogger("sd_ds.data")

DEBUG_KEYS_ENV = "SD_DS_DATA_KEYS"
"""Debug/test hook: a directory; each rank appends the keys of every batch the training loop takes to
``keys.rank{r}.txt`` there (epoch, then the keys), and the batch tensor's height and width to
``shapes.rank{r}.txt`` (epoch, then HxW of ``pixel_values`` or ``latent_moments``), so a test can check which
samples were served and at which size."""


def _rng(*parts: Any) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`: stable across processes and runs, unlike hash().
    return random.Random("/".join(str(p) for p in parts))


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
    """One epoch of one rank's batches; each data-loader worker iterates its own span."""

    def __init__(self, sources: list[ShardSource], *, tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
                 samples: "ImageSamples | LatentSamples", micro_batch_size: int, caption_dropout_prob: float,
                 shuffle_block: int,
                 seed: int, rank: int, world_size: int, num_workers: int, resample: bool, epoch_length: int,
                 max_skips_in_a_row: int, retry_policy: Optional[RetryPolicy] = None,
                 bucket_meta: Optional[BucketMeta] = None) -> None:
        self.sources, self.tokenize, self.samples = sources, tokenize, samples
        # Bucketed: the units the readers' spans cut are micro batches (one bucket each), not positions.
        self.bucket_meta = bucket_meta
        self.unit = 1 if bucket_meta is not None else micro_batch_size
        self.unit_name = "batches" if bucket_meta is not None else "samples"
        self._units: dict[int, int] = {}
        self.metas = [order_lib.SourceMeta(s.seed_key(i), s.weight, tuple(s.sizes or ()))
                      for i, s in enumerate(sources)]
        self.micro_batch_size = micro_batch_size
        self.caption_dropout_prob, self.shuffle_block = caption_dropout_prob, shuffle_block
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.resample = max(1, num_workers), resample
        self.readers = world_size * self.num_workers
        self.epoch_length, self.max_skips_in_a_row = epoch_length, max_skips_in_a_row
        self.retry_policy = retry_policy or default_policy()  # travels with the dataset into the workers
        self.epoch = 0
        self.resume: dict[int, tuple[int, int]] = {}  # worker -> (batches taken, raw positions consumed)
        self.set_segment([(0, self.epoch_units(0))])

    def set_segment(self, intervals: order_lib.Intervals) -> None:
        """The units (positions, or bucketed batches) this epoch still serves (all, or what a resumed run left),
        cut into this run's spans."""
        self.intervals = [(int(a), int(b)) for a, b in intervals]
        self.span = order_lib.span_length(order_lib.total(self.intervals), self.readers, self.unit)
        self.batches_per_worker = self.span // self.unit

    def epoch_units(self, epoch: int) -> int:
        """The units an epoch serves: its positions, or (bucketed) the micro batches its buckets fill."""
        if self.bucket_meta is None:
            return self.epoch_length
        if epoch not in self._units:
            units = self.bucketed(epoch).total_batches()
            if units < 1:
                raise ValueError(f"aspect-ratio buckets: no bucket fills a micro batch of {self.micro_batch_size} in "
                                 f"an epoch of {self.epoch_length} samples: use a smaller micro batch, fewer "
                                 f"buckets or more data")
            self._units[epoch] = units
        return self._units[epoch]

    def order(self, epoch: Optional[int] = None) -> order_lib.EpochOrder:
        return order_lib.EpochOrder(self.metas, seed=self.seed, epoch=self.epoch if epoch is None else epoch,
                                    length=self.epoch_length, block=self.shuffle_block, resample=self.resample)

    def bucketed(self, epoch: Optional[int] = None) -> BucketedEpoch:
        assert self.bucket_meta is not None
        return BucketedEpoch(self.order(epoch), self.bucket_meta, self.micro_batch_size)

    def _raw_samples(self, worker: int, start: int, log: SkipLog) -> Iterator[dict]:
        """This reader's raw samples from raw position ``start`` on (endless: the span repeats if skipped
        samples left the batches short), each numbered by ``__index__``; positions whose sample is missing from
        its shard (a tar error) are passed over."""
        epoch_order = self.order()
        span = order_lib.reader_span(self.intervals, self.rank * self.num_workers + worker, self.readers, self.span)
        span_len = order_lib.total(span)
        # A transient storage error reopens the shard at the sample it was reading (counted: storage_retries).
        cursors = [SourceCursor(s.shards, log.tar_error, Backoff(self.retry_policy, log.storage_retry))
                   for s in self.sources]
        missing_in_a_row = 0
        stream = order_lib.positions(span, start)
        pending = next(stream)
        try:
            while True:
                # One block's positions at a time: its samples are read source by source, in shard order.
                j = pending[1] // epoch_order.block
                chunk = [pending]
                for pending in stream:
                    if pending[1] // epoch_order.block != j or len(chunk) >= epoch_order.block:
                        break
                    chunk.append(pending)
                items = [(raw, *epoch_order.item(p)) for raw, p in chunk]
                fetched: dict[tuple[int, int], tuple[Optional[dict], int]] = {}
                for s, k in sorted({(s, k) for _, s, k in items}):
                    shard, member, epoch_pass = epoch_order.locate(s, k)
                    fetched[(s, k)] = (cursors[s].get(shard, member), epoch_pass)
                for raw, s, k in items:
                    sample, epoch_pass = fetched[(s, k)]
                    if sample is None:
                        missing_in_a_row += 1
                        if missing_in_a_row > span_len:  # a whole span without one readable sample
                            shards = sorted({self.sources[s].shards[epoch_order.locate(s, k)[0]] for _, s, k in items})
                            raise RuntimeError(
                                f"rank {self.rank} worker {worker}: no readable sample in the shards it was given "
                                f"({log.counts['tar_errors']} tar errors), e.g. {', '.join(shards[:5])}")
                        continue
                    missing_in_a_row = 0
                    repeat = raw // span_len
                    yield {**sample, "__index__": raw,
                           "__repeat__": epoch_pass if not repeat else f"{epoch_pass}r{repeat}"}
        finally:
            for cursor in cursors:
                cursor.close()

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        batches_done, raw_done = self.resume.get(worker, (0, 0))
        if batches_done >= self.batches_per_worker:
            return  # this worker's share of the epoch was taken before the checkpoint
        log = SkipLog(f"data rank {self.rank} worker {worker} epoch {self.epoch}")
        maker = _BatchMaker(self, worker, log, batches_done)
        if self.bucket_meta is not None:
            yield from self._bucketed_batches(worker, raw_done, log, maker)
            return
        yield from wds.DataPipeline(
            lambda: self._raw_samples(worker, raw_done, log),
            wds.map(maker.prepare),
            _batched(self.micro_batch_size, maker.collate),
        ).with_epoch(self.batches_per_worker - batches_done)

    def _bucketed_batches(self, worker: int, raw_done: int, log: SkipLog, maker: "_BatchMaker") -> Iterator[dict]:
        """This reader's bucketed batches from raw index ``raw_done`` (batches of its span served) on: each batch
        ordinal of its span gives one batch. A skipped sample's place is taken by a repeat of a good sample of its
        batch; a batch with none is replaced by the reader's previous batch (or, at its start, its next one)."""
        epoch = self.bucketed()
        base = epoch.base
        span = order_lib.reader_span(self.intervals, self.rank * self.num_workers + worker, self.readers, self.span)
        span_len = order_lib.total(span)
        cursors = [SourceCursor(s.shards, log.tar_error, Backoff(self.retry_policy, log.storage_retry))
                   for s in self.sources]
        sizes = self.bucket_meta.buckets.sizes  # type: ignore[union-attr]
        raw = raw_done
        previous: Optional[list[dict]] = None
        owed: list[int] = []  # raw indices of batches with no usable sample, before any usable one
        try:
            for a, b in order_lib.cut(span, raw_done, span_len - raw_done):
                held: dict[int, tuple[Optional[dict], int]] = {}
                for plan in epoch.walk(a, b):
                    items = sorted((base.item(p), p) for p in plan.read)
                    for (s, k), p in items:  # source by source, in shard order: each shard streamed once
                        shard, member, epoch_pass = base.locate(s, k)
                        held[p] = (cursors[s].get(shard, member), epoch_pass)
                    for _, bucket, members in plan.batches:
                        raw += 1
                        target = sizes[bucket]
                        good = []
                        for p in members:
                            sample, epoch_pass = held.pop(p)
                            prepared = maker.prepare({**sample, "__index__": raw - 1, "__repeat__": epoch_pass},
                                                     target) if sample is not None else maker.missing()
                            if prepared is not None:
                                good.append(prepared)
                        if not good:
                            if previous is None:
                                owed.append(raw)
                                continue
                            good = previous
                        batch = [good[i % len(good)] for i in range(self.micro_batch_size)]
                        for owed_raw in owed:  # the first usable batch stands in for the empty ones before it
                            yield maker.collate(batch, raw=owed_raw)
                        owed = []
                        previous = good
                        yield maker.collate(batch, raw=raw)
        finally:
            for cursor in cursors:
                cursor.close()


class _BatchMaker:
    """One reader's preparation of samples (decode/transform or stored moments, caption dropout, skip accounting)
    and batches (tensors, tokens, geometry, its position for TrainLoader)."""

    def __init__(self, stream: ShardStream, worker: int, log: SkipLog, batches_done: int) -> None:
        self.stream, self.worker, self.log = stream, worker, log
        self.skips_in_a_row = 0
        self.batch_numbers = itertools.count(batches_done + 1)

    def prepare(self, sample: dict, target: Optional[tuple[int, int]] = None) -> Optional[dict]:
        st = self.stream
        # The sample's own RNG: its random choices do not depend on which samples came before it.
        rng = _rng(st.seed, st.epoch, basename(sample["__url__"]), sample["__key__"], sample["__repeat__"])
        try:
            data, caption, geometry = st.samples.prepare(sample, rng, target)
        except SkipSample as skip:
            self.log.skip(skip.reason, f"{sample.get('__url__')}:{sample['__key__']}: {skip}")
            return self.missing()
        self.skips_in_a_row = 0
        if rng.random() < st.caption_dropout_prob:  # for CFG
            caption, data = "", st.samples.without_caption(data)  # stored text: the empty prompt's
        return {"data": data, "caption": caption, "key": sample["__key__"], "index": sample["__index__"],
                "geometry": geometry}

    def missing(self) -> None:
        """A sample that could not be used (skipped, or missing from its shard)."""
        self.skips_in_a_row += 1
        if self.skips_in_a_row > self.stream.max_skips_in_a_row:  # a stream with nothing usable must not spin
            raise RuntimeError(f"rank {self.stream.rank} worker {self.worker}: {self.skips_in_a_row} samples in a "
                               f"row were unusable ({dict(self.log.counts)}); check the shards and "
                               f"--min_size/--resolution")
        return None

    def collate(self, samples: list[dict], raw: Optional[int] = None) -> dict:
        st = self.stream
        captions = [s["caption"] for s in samples]
        geometry = torch.tensor([s["geometry"] for s in samples], dtype=torch.int64)  # [B, 6]
        return {
            # pixel_values or latent_moments (with stored text: prompt_embeds[, pooled_prompt_embeds])
            **st.samples.collate([s["data"] for s in samples]),
            **st.tokenize(captions),  # input_ids[, input_ids_2] [B, model_max_length], empty_caption [B]
            "captions": captions,
            "keys": [s["key"] for s in samples],
            "original_size": geometry[:, 0:2].contiguous(),  # [B, 2] (height, width)
            "crop_top_left": geometry[:, 2:4].contiguous(),  # [B, 2] (top, left)
            "target_size": geometry[:, 4:6].contiguous(),  # [B, 2] (height, width)
            # (epoch, worker, batches made, raw positions consumed) for TrainLoader's exact state
            "__position__": torch.tensor([st.epoch, self.worker, next(self.batch_numbers),
                                          samples[-1]["index"] + 1 if raw is None else raw]),
            "__stats__": dict(self.log.counts),
        }


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
    """Endless iterator of micro batches for this rank; rolls over epochs; exact and elastic state for resume."""

    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool, fingerprint: dict,
                 shard_stats: Optional[dict[str, int]] = None) -> None:
        self.dataset = dataset
        self.shard_stats = dict(shard_stats or {})  # shards left out when the loader was built (unreadable_shards)
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.fingerprint = fingerprint  # what must match for a saved position to mean the same samples
        self.epoch = 0
        self._taken: dict[int, tuple[int, int]] = {}  # worker -> (batches, raw positions) handed to the consumer
        self._stats_before: collections.Counter[str] = collections.Counter()  # earlier epochs and runs
        self._stats_epoch: dict[int, dict] = {}  # worker -> its counts this epoch, as of the last batch taken
        self._workers: Optional[Iterator] = None  # the running DataLoader iterator
        self._keys_file, self._shapes_file = self._open_debug_log("keys"), self._open_debug_log("shapes")
        _LIVE_LOADERS.add(self)

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in the current epoch (of its remaining segment, after a resume on other
        readers)."""
        return self.dataset.batches_per_worker * max(1, self.num_workers)

    def _open_debug_log(self, what: str) -> Any:
        directory = os.environ.get(DEBUG_KEYS_ENV)
        if not directory:
            return None
        os.makedirs(directory, exist_ok=True)
        return open(os.path.join(directory, f"{what}.rank{self.dataset.rank}.txt"), "a", buffering=1)

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
                        if self._keys_file is not None:
                            self._keys_file.write(f"{self.epoch} {' '.join(ready['keys'])}\n")
                            height, width = ready[self.dataset.samples.batch_key].shape[-2:]
                            self._shapes_file.write(f"{self.epoch} {height}x{width}\n")
                        yield ready
            except StorageUnavailable as e:  # from a worker: its message, not the worker's traceback
                raise StorageUnavailable(e.one_line()) from None
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
        self.dataset.set_segment([(0, self.dataset.epoch_units(self.epoch))])

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
        """This rank's position: the epoch, the positions the epoch serves in this run (intervals), how they are
        cut (readers, span) and each of this rank's workers' (batches, raw positions) taken."""
        d = self.dataset
        taken = sum(b for b, _ in self._taken.values())
        done = taken == self.batches_per_epoch
        return {"epoch": self.epoch + 1 if done else self.epoch,
                "intervals": [[0, d.epoch_units(self.epoch + 1)]] if done else [list(i) for i in d.intervals],
                "readers": d.readers, "span": d.span, "rank": d.rank,
                "workers": [] if done else [[w, b, r] for w, (b, r) in sorted(self._taken.items())],
                "world_size": d.world_size, "num_workers": self.num_workers, "fingerprint": self.fingerprint,
                "stats": self.stats()}

    def load_state_dict(self, state: dict, every_rank: Optional[Callable[[], list[dict]]] = None) -> None:
        """Call before iterating. Same ranks and workers: resumes exactly where the saved loader's consumer
        stopped. Other ranks or workers (elastic): ``every_rank()`` gives the saved states of all the saved
        run's ranks, and this epoch continues with the positions none of their readers consumed, cut anew.
        Restarts the saved epoch (with a warning) if the saved position means other samples now (other data,
        seed or order settings)."""
        self._stats_before = collections.Counter({k: v for k, v in state.get("stats", {}).items()
                                                  if k not in self.shard_stats})  # those are counted anew
        self._stats_epoch = {}
        self.epoch = int(state["epoch"])
        self._taken = {}
        self.dataset.set_segment([(0, self.dataset.epoch_units(self.epoch))])
        saved_fingerprint = state.get("fingerprint", {})
        # Both ways: a key only the saved run had (e.g. its bucket list, resumed without buckets) is a change too.
        changed = [f"{name}={saved!r} (now {now!r})" for name, saved, now in (
            (k, saved_fingerprint.get(k), self.fingerprint.get(k))
            for k in [*self.fingerprint, *(k for k in saved_fingerprint if k not in self.fingerprint)]) if saved != now]
        if changed or "intervals" not in state:
            logger.warning("data state was saved with %s: the saved position means other samples now, so data "
                           "epoch %d restarts from its beginning", ", ".join(changed) or "an older format", self.epoch)
            return
        intervals = [(int(a), int(b)) for a, b in state["intervals"]]
        self.dataset.set_segment(intervals)
        if (state["readers"], state["span"], state["num_workers"], state["world_size"]) == (
                self.dataset.readers, self.dataset.span, self.num_workers, self.dataset.world_size):
            self._taken = {int(w): (int(b), int(r)) for w, b, r in state["workers"]}
            return
        # Elastic: what every saved reader consumed, from every saved rank's state.
        states = every_rank() if every_rank is not None else [state] if state["world_size"] == 1 else None
        if states is None:
            logger.warning("data state was saved by %d ranks and their states are not available: data epoch %d "
                           "restarts from its beginning", state["world_size"], self.epoch)
            self.dataset.set_segment([(0, self.dataset.epoch_units(self.epoch))])
            return
        consumed = {}
        for s in states:
            for w, _, raw in s["workers"]:
                consumed[int(s.get("rank", 0)) * max(1, int(s["num_workers"])) + int(w)] = int(raw)
        # (Nothing consumed yet, e.g. saved at an epoch's end: the whole segment, its tail included, is left.)
        left = (order_lib.remaining(intervals, int(state["readers"]), int(state["span"]), consumed)
                if any(consumed.values()) else intervals)
        served = order_lib.total(intervals) - order_lib.total(left)
        if not left:
            self.epoch += 1
            self.dataset.set_segment([(0, self.dataset.epoch_units(self.epoch))])
            logger.info("elastic data resume: data epoch %d was finished by the saved run; epoch %d starts",
                        self.epoch - 1, self.epoch)
            return
        self.dataset.set_segment(left)
        logger.info(
            "elastic data resume: saved by %d rank(s) x %d worker(s), now %d x %d: data epoch %d continues with the "
            "%d %s its readers had not consumed (%d served before), cut into %d spans of %d; no sample of "
            "the epoch is served twice or skipped (but for the last %d that do not fill a batch on every reader)",
            state["world_size"], max(1, state["num_workers"]), self.dataset.world_size, max(1, self.num_workers),
            self.epoch, order_lib.total(left), self.dataset.unit_name, served, self.dataset.readers,
            self.dataset.span, order_lib.total(left) - self.dataset.readers * self.dataset.span)


def build_train_loader(data: "DataConfig", *, tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
                       micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                       all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                       buckets: Optional[BucketList] = None) -> TrainLoader:
    """This rank's loader for the ``--train_shards`` in ``data``: image shards, or latent shards when their
    directory holds an encoder manifest (``latent_manifest_of_shards``). ``all_reduce`` (a sum over the ranks on
    CPU tensors, the trainer's control group) shares the counting of shards that no sizes.json lists, and the
    reading of image sizes for ``buckets``: each shard is read by one rank. ``buckets``: aspect-ratio buckets
    (``sd_ds.data.buckets.resolve_buckets``), None for squares."""
    manifest = latent_manifest_of_shards(list(data.train_shards))
    if manifest is not None:
        check_latent_buckets(manifest, buckets)
    sources = parse_sources(list(data.train_shards))
    counter = shared_counter(rank, world_size, all_reduce) if all_reduce is not None and world_size > 1 else count_here
    sources, unreadable = count_missing(sources, counter)
    shard_stats = {"unreadable_shards": sum(1 for why in unreadable.values() if "not a readable tar" in why)}
    shard_stats = {k: v for k, v in shard_stats.items() if v}
    total = data.samples_per_epoch or sum(s.samples for s in sources)
    workers = max(1, data.dataloader_num_workers)
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
        directory = latent_directory_of_shards(list(data.train_shards))
        samples = LatentSamples(manifest, data.random_flip, read_empty_prompt(directory, manifest)
                                if manifest.get("text_embeddings") else None)
    dataset = ShardStream(
        sources, tokenize=tokenize, samples=samples, micro_batch_size=micro_batch_size,
        caption_dropout_prob=data.caption_dropout_prob,
        shuffle_block=data.shuffle_block, seed=seed, rank=rank, world_size=world_size,
        num_workers=data.dataloader_num_workers, resample=data.resample_shards, epoch_length=total,
        # About two passes over a worker's share with nothing usable: broken data, not bad luck.
        max_skips_in_a_row=2 * math.ceil(total / (world_size * workers)) + 1000,
        bucket_meta=build_bucket_meta(sources, buckets, rank=rank, world_size=world_size, all_reduce=all_reduce)
        if buckets is not None else None)
    if data.dataloader_num_workers > 0:
        # Tokenising happens in the workers; a Rust tokenizer's own thread pool there only oversubscribes.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fingerprint = {"sources": [[m.key, s.weight, len(s.shards), s.samples] for m, s in zip(dataset.metas, sources)],
                   "seed": seed, "shuffle_block": data.shuffle_block, "resample_shards": data.resample_shards,
                   "epoch_length": total}
    if manifest is not None:
        # Latent shards lack the samples the encoder skipped: a position in an image run's stream means
        # other samples there, although the source names (hence the shuffles) are the same.
        fingerprint["latents"] = True
    if dataset.bucket_meta is not None:
        # A bucketed position is a batch ordinal: it means the same samples only with the same buckets, the same
        # samples in them and the same micro batch.
        fingerprint.update(buckets=buckets.key(), bucket_histograms=dataset.bucket_meta.digest(),
                           micro_batch_size=micro_batch_size)
        if dataset.bucket_meta.clamped:
            shard_stats["aspect_clamped"] = dataset.bucket_meta.clamped
    loader = TrainLoader(dataset, num_workers=data.dataloader_num_workers, pin_memory=pin_memory,
                         fingerprint=fingerprint, shard_stats=shard_stats)
    logger.info("data: %d %s source(s), %d samples/epoch, %d batches/epoch on each rank (%d worker(s) x %d); "
                "%d readers serve every sample once per epoch (elastic: a resume on other ranks/workers continues "
                "the epoch)", len(sources), "image" if manifest is None else "latent", total, loader.batches_per_epoch,
                workers, dataset.batches_per_worker, dataset.readers)
    if dataset.bucket_meta is not None:
        summary = plan_summary(dataset.bucketed(0))
        logger.info("data: aspect-ratio buckets, one per micro batch: epoch 0 has %d batches of %d (samples per "
                    "bucket %s); %d samples do not fill their bucket's last batch", summary["batches"],
                    micro_batch_size, ", ".join(f"{k} {v}" for k, v in summary["per_bucket"].items() if v),
                    summary["bucket_remainder"])
    return loader


def check_latent_buckets(manifest: dict, buckets: Optional[BucketList]) -> None:
    """Latent shards hold the crops of the bucket list they were encoded with (or squares): training with another
    list (or none) is an error saying so."""
    saved = manifest.get("buckets")
    now = buckets.to_json() if buckets is not None else None
    if saved == now:
        return
    def name(sizes: Optional[list]) -> str:
        return "squares (--aspect_ratio_buckets off)" if sizes is None else \
            f"aspect-ratio buckets {BucketList.from_json(sizes).key()}"
    raise ValueError(f"latent shards ({manifest.get('output_dir', 'the --train_shards directory')}) were encoded "
                     f"with {name(saved)}, this run trains with {name(now)}: train with the list they were encoded "
                     f"with, or encode again with this run's --aspect_ratio_buckets")

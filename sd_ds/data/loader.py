"""The loader the training loop iterates: each rank's data-loader workers read their spans of the epoch order.

Per epoch, in each data-loader worker (one *reader*: rank x workers + worker) of each rank:

    the epoch's positions still to serve (sd_ds.data.order) ─ this reader's contiguous span ─ [resume: start at
      the raw position reached, O(1)] ─ position → (source, sample) → (shard, member) ─ read from the shard
      (sd_ds.data.reading; continuing the open stream) ─ prepare (skip and count corrupt / too small): decode,
      resize, crop, flip (latent shards: pick the stored moments) ─ caption dropout ─ batch + tokenise
    ─ exactly batches_per_worker batches

Image shards give uint8 ``pixel_values`` [B,3,R,R]; latent shards give ``latent_moments`` [B,2C,R/f,R/f].
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
from sd_ds.data.reading import SourceCursor, basename
from sd_ds.data.sources import (ShardSource, count_here, count_missing, latent_manifest_of_shards, parse_sources,
                                shared_counter)
from sd_ds.data.transforms import ImageSamples, ImageTransform, LatentSamples, SkipLog, SkipSample
from sd_ds.models import tokenize
from sd_ds.retries import Backoff, RetryPolicy, StorageUnavailable, default_policy

logger = logging.getLogger("sd_ds.data")

DEBUG_KEYS_ENV = "SD_DS_DATA_KEYS"
"""Debug/test hook: a directory; each rank appends the keys of every batch the training loop takes to
``keys.rank{r}.txt`` there (epoch, then the keys), so a test can check which samples were served."""


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

    def __init__(self, sources: list[ShardSource], *, tokenizer: Any, samples: "ImageSamples | LatentSamples",
                 micro_batch_size: int, model_max_length: int, caption_dropout_prob: float, shuffle_block: int,
                 seed: int, rank: int, world_size: int, num_workers: int, resample: bool, epoch_length: int,
                 max_skips_in_a_row: int, retry_policy: Optional[RetryPolicy] = None) -> None:
        self.sources, self.tokenizer, self.samples = sources, tokenizer, samples
        self.metas = [order_lib.SourceMeta(s.seed_key(i), s.weight, tuple(s.sizes or ()))
                      for i, s in enumerate(sources)]
        self.micro_batch_size, self.model_max_length = micro_batch_size, model_max_length
        self.caption_dropout_prob, self.shuffle_block = caption_dropout_prob, shuffle_block
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.resample = max(1, num_workers), resample
        self.readers = world_size * self.num_workers
        self.epoch_length, self.max_skips_in_a_row = epoch_length, max_skips_in_a_row
        self.retry_policy = retry_policy or default_policy()  # travels with the dataset into the workers
        self.epoch = 0
        self.resume: dict[int, tuple[int, int]] = {}  # worker -> (batches taken, raw positions consumed)
        self.set_segment([(0, epoch_length)])

    def set_segment(self, intervals: order_lib.Intervals) -> None:
        """The positions this epoch still serves (all, or what a resumed run left), cut into this run's spans."""
        self.intervals = [(int(a), int(b)) for a, b in intervals]
        self.span = order_lib.span_length(order_lib.total(self.intervals), self.readers, self.micro_batch_size)
        self.batches_per_worker = self.span // self.micro_batch_size

    def order(self) -> order_lib.EpochOrder:
        return order_lib.EpochOrder(self.metas, seed=self.seed, epoch=self.epoch, length=self.epoch_length,
                                    block=self.shuffle_block, resample=self.resample)

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
        skips_in_a_row = 0

        def prepare(sample: dict) -> Optional[dict]:
            nonlocal skips_in_a_row
            # The sample's own RNG: its random choices do not depend on which samples came before it.
            rng = _rng(self.seed, self.epoch, basename(sample["__url__"]), sample["__key__"], sample["__repeat__"])
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
            captions = [s["caption"] for s in samples]
            return {
                self.samples.batch_key: self.samples.collate([s["data"] for s in samples]),
                "input_ids": tokenize(self.tokenizer, captions, self.model_max_length),  # [B, model_max_length]
                "captions": captions,
                "keys": [s["key"] for s in samples],
                # (epoch, worker, batches made, raw positions consumed) for TrainLoader's exact state
                "__position__": torch.tensor([self.epoch, worker, next(batch_numbers), samples[-1]["index"] + 1]),
                "__stats__": dict(log.counts),
            }

        yield from wds.DataPipeline(
            lambda: self._raw_samples(worker, raw_done, log),
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
        self._keys_file = self._open_keys_log()
        _LIVE_LOADERS.add(self)

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in the current epoch (of its remaining segment, after a resume on other
        readers)."""
        return self.dataset.batches_per_worker * max(1, self.num_workers)

    def _open_keys_log(self) -> Any:
        directory = os.environ.get(DEBUG_KEYS_ENV)
        if not directory:
            return None
        os.makedirs(directory, exist_ok=True)
        return open(os.path.join(directory, f"keys.rank{self.dataset.rank}.txt"), "a", buffering=1)

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
        self.dataset.set_segment([(0, self.dataset.epoch_length)])

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
                "intervals": [[0, d.epoch_length]] if done else [list(i) for i in d.intervals],
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
        self.dataset.set_segment([(0, self.dataset.epoch_length)])
        changed = [f"{name}={saved!r} (now {now!r})" for name, saved, now in (
            (k, state.get("fingerprint", {}).get(k), v) for k, v in self.fingerprint.items()) if saved != now]
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
            self.dataset.set_segment([(0, self.dataset.epoch_length)])
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
            self.dataset.set_segment([(0, self.dataset.epoch_length)])
            logger.info("elastic data resume: data epoch %d was finished by the saved run; epoch %d starts",
                        self.epoch - 1, self.epoch)
            return
        self.dataset.set_segment(left)
        logger.info(
            "elastic data resume: saved by %d rank(s) x %d worker(s), now %d x %d: data epoch %d continues with the "
            "%d samples its readers had not consumed (%d served before), cut into %d spans of %d; no sample of "
            "the epoch is served twice or skipped (but for the last %d that do not fill a batch on every reader)",
            state["world_size"], max(1, state["num_workers"]), self.dataset.world_size, max(1, self.num_workers),
            self.epoch, order_lib.total(left), served, self.dataset.readers, self.dataset.span,
            order_lib.total(left) - self.dataset.readers * self.dataset.span)


def build_train_loader(data: "DataConfig", *, tokenizer: Any, model_max_length: int, micro_batch_size: int,
                       seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                       all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> TrainLoader:
    """This rank's loader for the ``--train_shards`` in ``data``: image shards, or latent shards when their
    directory holds an encoder manifest (``latent_manifest_of_shards``). ``all_reduce`` (a sum over the ranks on
    CPU tensors, the trainer's control group) shares the counting of shards that no sizes.json lists: each is
    read by one rank."""
    manifest = latent_manifest_of_shards(list(data.train_shards))
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
        samples = LatentSamples(manifest, data.random_flip)
    dataset = ShardStream(
        sources, tokenizer=tokenizer, samples=samples, micro_batch_size=micro_batch_size,
        model_max_length=model_max_length, caption_dropout_prob=data.caption_dropout_prob,
        shuffle_block=data.shuffle_block, seed=seed, rank=rank, world_size=world_size,
        num_workers=data.dataloader_num_workers, resample=data.resample_shards, epoch_length=total,
        # About two passes over a worker's share with nothing usable: broken data, not bad luck.
        max_skips_in_a_row=2 * math.ceil(total / (world_size * workers)) + 1000)
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
    loader = TrainLoader(dataset, num_workers=data.dataloader_num_workers, pin_memory=pin_memory,
                         fingerprint=fingerprint, shard_stats=shard_stats)
    logger.info("data: %d %s source(s), %d samples/epoch, %d batches/epoch on each rank (%d worker(s) x %d); "
                "%d readers serve every sample once per epoch (elastic: a resume on other ranks/workers continues "
                "the epoch)", len(sources), "image" if manifest is None else "latent", total, loader.batches_per_epoch,
                workers, dataset.batches_per_worker, dataset.readers)
    return loader

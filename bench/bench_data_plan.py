#!/usr/bin/env python
"""The epoch split at cluster scale, from metadata alone (no data): duplicates and misses per epoch, time and
memory per reader, for today's whole-shard split and sd_ds.data.order's exact spans.

    python bench/bench_data_plan.py                                   # 40,000 shards, 512 ranks x 8 workers
    python bench/bench_data_plan.py --shards 400 --ranks 8 --no_write # quick

Shard sizes: LAION-400M-like, ~10,000 samples a shard (uniform 9,000..10,000, the converter's last shards of a
part being short), plus a small weighted source of 100 shards (1 M samples, weight 5 %) that the whole-shard split
refused (fewer shards than readers).

Whole-shard split (before): the shards, shuffled, go round robin to rank then worker; every reader yields
total // (readers x micro batch) batches, so a reader with fewer samples repeats some (duplicates) and one with
more never reaches its last ones (misses). Exact spans (after): sd_ds.data.order cuts the epoch's global order into
equal contiguous spans; the only samples not served are the remainder smaller than readers x micro batch.
Per reader: the time and peak Python memory (tracemalloc) to build the epoch order, find its span and map its
first block of positions to (shard, member); the same for a resume position deep in the epoch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from benchmarks_md import publish  # noqa: E402

from sd_ds.data import order as order_lib  # noqa: E402

SECTION = "## 12. Data: exact epoch splits and resume cost at scale"


def shard_sizes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(9_000, 10_001, size=n)


def whole_shard_split(sizes: np.ndarray, ranks: int, workers: int, micro_batch: int, seed: int = 0) -> dict:
    """Today's split (before this change): per-reader sample counts from shards dealt round robin."""
    readers = ranks * workers
    shuffled = sizes[np.random.default_rng(seed).permutation(len(sizes))]
    per_rank = [shuffled[r::ranks] for r in range(ranks)]
    per_reader = np.array([int(rank[w::workers].sum()) for rank in per_rank for w in range(workers)])
    need = int(sizes.sum()) // (readers * micro_batch) * micro_batch
    dup = int(np.maximum(0, need - per_reader).sum())
    miss = int(np.maximum(0, per_reader - need).sum())
    shards_per_reader = np.array([len(rank[w::workers]) for rank in per_rank for w in range(workers)])
    return {"samples": int(sizes.sum()), "duplicates": dup, "misses": miss,
            "shards_min": int(shards_per_reader.min()), "shards_max": int(shards_per_reader.max())}


def exact_split(sources: list[order_lib.SourceMeta], ranks: int, workers: int, micro_batch: int, block: int,
                seed: int = 0, probe_readers: int = 8) -> dict:
    readers = ranks * workers
    length = sum(s.samples for s in sources)
    intervals = [(0, length)]
    span = order_lib.span_length(length, readers, micro_batch)
    # Exactness of the cut: spans are disjoint and contiguous, so the positions served are [0, readers x span).
    ends = [order_lib.reader_span(intervals, x, readers, span) for x in (0, readers - 1)]
    assert ends[0][0][0] == 0 and ends[1][-1][1] == readers * span
    served = readers * span
    times, peaks, resume_times = [], [], []
    for x in np.linspace(0, readers - 1, probe_readers).astype(int):
        for label, offset in (("start", 0), ("resume", span - micro_batch)):
            tracemalloc.start()
            t0 = time.perf_counter()
            epoch_order = order_lib.EpochOrder(sources, seed=seed, epoch=0, length=length, block=block)
            s = order_lib.reader_span(intervals, int(x), readers, span)
            stream = order_lib.positions(s, offset)
            first = [next(stream)[1] for _ in range(min(block, span - offset))]
            for p in first:
                src, k = epoch_order.item(p)
                epoch_order.locate(src, k)
            elapsed = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            (times if label == "start" else resume_times).append(elapsed)
            peaks.append(peak)
    # Weights: the served share of each source over the first blocks (expected: its weight).
    epoch_order = order_lib.EpochOrder(sources, seed=seed, epoch=0, length=length, block=block)
    counts = epoch_order.taken_before(length // epoch_order.block)
    return {"samples": length, "served": served, "duplicates": 0, "misses": length - served, "span": span,
            "time_ms": 1000 * max(times), "resume_time_ms": 1000 * max(resume_times), "peak_mib": max(peaks) / 2**20,
            "source_counts": counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=40_000)
    p.add_argument("--ranks", type=int, default=512)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--block", type=int, default=1000, help="shuffle block (--shuffle_block)")
    p.add_argument("--small_source_shards", type=int, default=100)
    p.add_argument("--small_source_weight", type=float, default=0.05)
    p.add_argument("--no_write", action="store_true", help="print the section, leave BENCHMARKS.md")
    args = p.parse_args()

    sizes = shard_sizes(args.shards)
    before = whole_shard_split(sizes, args.ranks, args.workers, args.micro_batch_size)
    one = [order_lib.SourceMeta("0:laion", 1.0, tuple(int(n) for n in sizes))]
    after = exact_split(one, args.ranks, args.workers, args.micro_batch_size, args.block)
    small = shard_sizes(args.small_source_shards, seed=1)
    big_weight = 1.0 - args.small_source_weight
    two = [one[0].__class__("0:laion", big_weight, one[0].sizes),
           order_lib.SourceMeta("1:small", args.small_source_weight, tuple(int(n) for n in small))]
    weighted = exact_split(two, args.ranks, args.workers, args.micro_batch_size, args.block)
    readers = args.ranks * args.workers
    pct = lambda n, total: f"{100 * n / total:.2f} %"  # noqa: E731

    cmd = " ".join(sys.argv[1:])
    lines = [
        SECTION, "",
        f"{datetime.date.today().isoformat()} · {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared) · Python {platform.python_version()} · `{' '.join(['python bench/bench_data_plan.py', cmd]).strip()}`",
        "",
        f"Metadata only: {args.shards:,} shards of 9,000-10,000 samples ({before['samples']:,} samples), "
        f"{args.ranks} ranks x {args.workers} workers = {readers:,} readers, micro batch {args.micro_batch_size}.", "",
        "| split | duplicates / epoch | misses / epoch | notes |", "|---|---:|---:|---|",
        f"| whole shards, round robin (before) | {before['duplicates']:,} ({pct(before['duplicates'], before['samples'])}) "
        f"| {before['misses']:,} ({pct(before['misses'], before['samples'])}) | readers get {before['shards_min']} to "
        f"{before['shards_max']} shards; a source with fewer shards than readers is refused |",
        f"| exact spans of the global order (after) | 0 | {after['misses']:,} ({pct(after['misses'], after['samples'])}: "
        f"the remainder < readers x micro batch) | spans of {after['span']:,} positions |",
        f"| after, plus a {args.small_source_shards}-shard source at weight {args.small_source_weight} | 0 within each "
        f"pass of a source | {weighted['misses']:,} | served per epoch: {weighted['source_counts'][0]:,} + "
        f"{weighted['source_counts'][1]:,} ({weighted['source_counts'][1] / sum(weighted['source_counts']):.4f} of "
        f"the samples; {weighted['source_counts'][1] / int(small.sum()):.1f} passes of the small source) |", "",
        f"Per reader (worst of 8 probed, one CPU core): building the epoch order, finding the span and mapping the "
        f"first block of {args.block} positions to (shard, member) takes {after['time_ms']:.0f} ms "
        f"({weighted['time_ms']:.0f} ms with two sources), and {after['resume_time_ms']:.0f} ms at a resume position "
        f"at the end of the span; peak Python memory {after['peak_mib']:.1f} MiB "
        f"({weighted['peak_mib']:.1f} MiB with two sources): the shard permutation of one pass and its cumulative "
        f"sizes (2 x 8 bytes a shard) and one block. Nothing grows with the step or the readers.",
    ]
    publish("\n".join(lines) + "\n", write=not args.no_write)


if __name__ == "__main__":
    main()

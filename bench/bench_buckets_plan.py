#!/usr/bin/env python
"""Aspect-ratio buckets at cluster scale, from metadata alone (no images): samples not served per epoch, planning
time and memory per reader, for sd_ds.data.bucket_order's global bucketing and for per-reader bucketing.

    python bench/bench_buckets_plan.py                                  # 40,000 shards, 512 ranks x 8 workers
    python bench/bench_buckets_plan.py --shards 400 --ranks 8 --no_write  # quick

Data: LAION-400M-like, 40,000 shards of 9,000-10,000 samples; image aspects drawn from a LAION-like mix (1:1
30 %, 4:3 20 %, 3:2 15 %, 16:9 10 %, 3:4 8 %, 2:3 8 %, 9:16 3 %, and 6 % log-uniform between 1:6 and 6:1, some
beyond the list), assigned to SDXL's 41 buckets (``--aspect_ratio_buckets auto`` at 1024 px, 64 px divisor). Each
shard's bucket histogram is a multinomial draw; its members' buckets (what a reader reads from the shard's
``.sizes`` index) are a seeded permutation of that histogram, made when a reader asks for them.

Global bucketing (this change): a bucket's micro batches are its occurrences in the epoch's global order, B at a
time; not served: each bucket's last partial batch (< B) and the span cut's remainder (< one batch per reader).
Per-reader bucketing (the alternative): each reader buckets its own span of the global order; not served: every
reader's partial batch of every bucket, simulated with one multinomial draw per reader.
Per reader (worst of 8 probed, one CPU core): building the epoch's batch count, then finding its span's first batch
(binary search over block boundaries, the members of batches open there) and its first block; the same at a
resume position at the end of its span; peak Python memory (tracemalloc) of that, and the histograms it holds.
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
from sd_ds.data.bucket_order import BucketedEpoch  # noqa: E402
from sd_ds.data.buckets import auto_buckets  # noqa: E402
from sd_ds.data.image_sizes import BucketMeta  # noqa: E402

SECTION = "## 19. Data: aspect-ratio buckets at scale"
MIX = [((1, 1), 0.30), ((4, 3), 0.20), ((3, 2), 0.15), ((16, 9), 0.10), ((3, 4), 0.08), ((2, 3), 0.08),
       ((9, 16), 0.03)]
TAIL = 0.06  # log-uniform aspect in [1/6, 6]


def bucket_probabilities(buckets, draws: int = 2_000_000, seed: int = 0) -> tuple[np.ndarray, float]:
    """Each bucket's share of LAION-like images, and the share clamped (aspect beyond the list)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(MIX) + 1, size=draws, p=[p for _, p in MIX] + [TAIL])
    aspect = np.ones(draws)
    for i, ((w, h), _) in enumerate(MIX):
        aspect[kinds == i] = w / h
    tail = kinds == len(MIX)
    aspect[tail] = np.exp(rng.uniform(np.log(1 / 6), np.log(6), size=int(tail.sum())))
    index, clamped = buckets.assign(aspect * 1000, np.full(draws, 1000.0))
    return np.bincount(index, minlength=len(buckets)) / draws, float(clamped.mean())


class SimulatedMeta(BucketMeta):
    """Members' buckets made on demand from the histogram, as a reader would read them from a shard's index."""

    def _load(self, source: int, shard: int, url: str) -> np.ndarray:
        hist = self.histograms[source][shard].astype(np.int64)
        members = np.repeat(np.arange(len(hist)), hist)
        return np.random.default_rng([source, shard]).permutation(members).astype(np.uint8)


def per_reader_unserved(per_bucket: np.ndarray, readers: int, micro_batch: int, seed: int = 1) -> int:
    """Samples left in partial batches when every reader buckets its own equal share of the epoch."""
    rng = np.random.default_rng(seed)
    share = int(per_bucket.sum()) // readers
    counts = rng.multinomial(share, per_bucket / per_bucket.sum(), size=readers)
    return int((counts % micro_batch).sum()) + int(per_bucket.sum()) - share * readers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=40_000)
    p.add_argument("--ranks", type=int, default=512)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--block", type=int, default=1000, help="shuffle block (--shuffle_block)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--divisor", type=int, default=64)
    p.add_argument("--probe_readers", type=int, default=8)
    p.add_argument("--no_write", action="store_true", help="print the section, leave BENCHMARKS.md")
    args = p.parse_args()

    buckets = auto_buckets(args.resolution, args.divisor)
    K, B, readers = len(buckets), args.micro_batch_size, args.ranks * args.workers
    probabilities, clamped_share = bucket_probabilities(buckets)
    rng = np.random.default_rng(0)
    sizes = rng.integers(9_000, 10_001, size=args.shards)
    t0 = time.perf_counter()
    histograms = np.stack([rng.multinomial(n, probabilities) for n in sizes])  # [shards, K]
    make_s = time.perf_counter() - t0
    source = order_lib.SourceMeta("0:laion", 1.0, tuple(int(n) for n in sizes))
    meta = SimulatedMeta(buckets, [histograms], [tuple(f"{i:05d}.tar" for i in range(args.shards))])
    hist_mib = meta.histograms[0].nbytes / 2**20
    N = int(sizes.sum())

    def epoch() -> BucketedEpoch:
        return BucketedEpoch(order_lib.EpochOrder([source], seed=0, epoch=0, length=N, block=args.block), meta, B)

    t0 = time.perf_counter()
    G = epoch().total_batches()
    count_s = time.perf_counter() - t0
    per_bucket = epoch().samples_per_bucket()
    bucket_rest = int((per_bucket % B).sum())
    span = order_lib.span_length(G, readers, 1)
    served = readers * span * B
    unserved = N - served
    cut_rest = (G - readers * span) * B
    per_reader = per_reader_unserved(per_bucket, readers, B)

    starts, resumes, peaks = [], [], []
    for x in np.linspace(0, readers - 1, args.probe_readers).astype(int):
        for label, offset in (("start", 0), ("resume", span - 1)):
            meta._cache = None  # a fresh reader: nothing cached
            tracemalloc.start()
            t0 = time.perf_counter()
            e = epoch()
            e.total_batches()
            (a, b), = order_lib.cut(order_lib.reader_span([(0, G)], int(x), readers, span), offset, 1)
            plan = next(iter(e.walk(a, b)))
            assert plan.batches or plan.read
            elapsed = time.perf_counter() - t0
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            (starts if label == "start" else resumes).append(elapsed)
    pct = lambda n: f"{100 * n / N:.4f} %"  # noqa: E731
    bound = K * (B - 1) + readers * B

    cmd = " ".join(sys.argv[1:])
    lines = [
        SECTION, "",
        f"{datetime.date.today().isoformat()} · {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared) · Python {platform.python_version()} · `{' '.join(['python bench/bench_buckets_plan.py', cmd]).strip()}`",
        "",
        f"Metadata only: {args.shards:,} shards of 9,000-10,000 samples ({N:,} samples), {K} buckets (auto at "
        f"{args.resolution} px, {args.divisor} px divisor: SDXL's list), LAION-like aspects ({100 * clamped_share:.1f} % "
        f"beyond 1:4..4:1, clamped), {args.ranks} ranks x {args.workers} workers = {readers:,} readers, micro batch {B}.",
        "",
        "| bucketing | not served / epoch | of which | bound |", "|---|---:|---|---|",
        f"| per reader (each reader buckets its own span) | {per_reader:,} ({pct(per_reader)}) | every reader's partial "
        f"batch of every bucket | ~ readers x buckets x (B - 1) / 2 |",
        f"| global (sd_ds.data.bucket_order) | {unserved:,} ({pct(unserved)}) | {bucket_rest:,} in the buckets' last "
        f"partial batches, {cut_rest:,} in the span cut | < K (B - 1) + readers x B = {bound:,} ({pct(bound)}) |",
        "",
        f"An epoch: {G:,} batches of one bucket each, {span:,} per reader; the smallest bucket holds "
        f"{int(per_bucket.min()):,} samples, the largest {int(per_bucket.max()):,}.",
        "",
        f"Per reader (worst of {args.probe_readers} probed, one CPU core): the epoch's batch count and its span's first "
        f"batch take {1000 * max(starts):.0f} ms (binary search over {-(-N // args.block):,} block boundaries from the "
        f"histograms, the members of the {K} buckets' open batches found by binary search too, one block walked), "
        f"{1000 * max(resumes):.0f} ms at a resume position at the end of its span; peak Python memory "
        f"{max(peaks) / 2**20:.1f} MiB on top of the histograms it holds ({hist_mib:.1f} MiB: {args.shards:,} x {K} "
        f"uint16), with at most 64 shards' member buckets cached (a byte a sample, {64 * int(sizes.max()) / 2**20:.1f} MiB). The main process's batch count alone: "
        f"{1000 * count_s:.0f} ms. Nothing grows with the step or the readers; no reader holds every sample's bucket "
        f"(that would be {N / 2**20:,.0f} MiB at a byte each).",
        "",
        f"Reading: a reader walks the global order forward and reads each sample its batches need once, in shard "
        f"order; at the start of its span (and of each resume) it also reads the members of the batches open there, "
        f"at most K (B - 1) = {K * (B - 1)} samples from earlier in the epoch. Once per run, before training, the "
        f"histograms come from the shards' .sizes indexes, each read by one rank ({-(-args.shards // args.ranks)} "
        f"files of ~{16 * int(sizes.mean()) // 1000} kB a rank here) and summed over the ranks (one "
        f"{args.shards * (K + 2) * 8 / 2**20:.0f} MB all-reduce on the gloo group).",
    ]
    publish("\n".join(lines) + "\n", write=not args.no_write)
    print(f"(histograms drawn in {make_s:.1f} s)")


if __name__ == "__main__":
    main()

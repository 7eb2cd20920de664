"""The bucketed epoch: micro batches of one aspect-ratio bucket each, formed over the whole epoch's order, exact
and elastic as the square path's.

The base order is ``sd_ds.data.order.EpochOrder``, unchanged: global positions 0..N-1 → (source, k) → (shard,
member), a function of (seed, epoch, sizes, weights). Each position has its sample's bucket (from metadata, see
``BucketMeta``). Bucket b's micro batches are its occurrences in the base order taken B at a time (batch i of
bucket b = b's occurrences iB .. iB+B-1), and the epoch's batches are ordered by where they complete (the
position of their last member): batch ordinal g is the g-th to complete. That is what one reader streaming the
base order with one open batch per bucket would produce, computed from metadata alone:

    C_b(p) = occurrences of bucket b before position p
           = sum over sources s of (bucket-b samples among s's first T_s(p) samples of the epoch)
    G(p)   = sum over b of floor(C_b(p) / B) = batches completed before p

At a block boundary p = jM the mixing gives T_s(jM), and a source's first k samples are whole passes (the
source's bucket histogram), whole shards of the current pass (per-shard histograms summed over the pass's shard
permutation) and a prefix of one shard (its per-member buckets, read on demand). So the order stays a function of
(seed, epoch, sizes, weights, the samples' buckets, B).

Readers cut the epoch's batch ordinals [0, G) into spans as the square path cuts positions (micro batch 1 in
``order.span_length``): a reader's state is one number (batches consumed), and an elastic resume cuts the ordinals
no reader consumed anew. A reader serving ordinals [a, b) finds the block where batch a completes (binary search
on G over block boundaries), the members of the batches open there (the last C_b mod B occurrences of each
bucket before it, each by binary search on C_b), then walks the base order forward a block at a time; each block
it reads the samples its batches need, once, in shard order, and holds those of batches still open.

Per epoch, not served: each bucket's last partial batch, sum_b (E_b mod B) < K (B - 1) samples (E_b: bucket b's
samples in the epoch, K buckets), and the span cut's remainder, fewer than ``readers`` batches: in all fewer than
K (B - 1) + readers x B samples (LAION-400M, 41 buckets, 4,096 readers x 8: < 33,055 of 380 M, 0.0087 %;
bench/bench_buckets_plan.py).
Ranks serve different buckets at one step. ``--resample_shards`` is not supported with buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from sd_ds.data.image_sizes import BucketMeta
from sd_ds.data.order import EpochOrder, _Cache

COARSE = 256  # shards per stored partial sum of a pass's histogram (memory: K int64 per 256 shards)


@dataclass
class BlockPlan:
    """One step of a reader's walk: the positions whose samples to read now (in this block, or before it at the
    start) and the batches completed in this block that the reader serves: (ordinal, bucket, positions)."""

    read: list[int]
    batches: list[tuple[int, int, list[int]]]


class BucketedEpoch:
    """One epoch's bucketed batches over a base ``EpochOrder``."""

    def __init__(self, base: EpochOrder, meta: BucketMeta, micro_batch_size: int) -> None:
        if base.resample:
            raise ValueError("--aspect_ratio_buckets does not support --resample_shards (a pass's bucket counts would "
                             "need every earlier pass's draw)")
        self.base, self.meta, self.B = base, meta, int(micro_batch_size)
        self.K, self.M, self.N = meta.num_buckets, base.block, base.length
        self._source_totals = [h.sum(axis=0, dtype=np.int64) for h in meta.histograms]
        self._coarse = _Cache(2 * len(base.sources) + 2)  # (source, pass) -> partial sums of the pass's histogram
        self._counts = _Cache(4096)  # block j -> C(jM)
        self._blocks = _Cache(8)  # block j -> buckets of its positions

    # --- counts from metadata ---------------------------------------------------------------------------

    def _pass_prefix(self, s: int, epoch_pass: int, shards: np.ndarray, i: int) -> np.ndarray:
        """Bucket counts of the first i shards of source s's pass."""
        hist = self.meta.histograms[s]

        def coarse() -> np.ndarray:
            # Chunk by chunk: the pass's permuted histogram is never materialised (13 MB at 40,000 x 41 int64).
            sums = np.zeros((len(shards) // COARSE + 1, self.K), np.int64)
            for c in range(1, len(sums)):
                sums[c] = sums[c - 1] + hist[shards[(c - 1) * COARSE:c * COARSE]].sum(axis=0, dtype=np.int64)
            return sums

        sums = self._coarse.get_or((s, epoch_pass), coarse)
        c = i // COARSE
        return sums[c] + hist[shards[c * COARSE:i]].sum(axis=0, dtype=np.int64)

    def source_counts(self, s: int, k: int) -> np.ndarray:
        """Bucket counts among source s's first k samples of the epoch (int64 [K])."""
        n = self.base.sources[s].samples
        epoch_pass, r = divmod(int(k), n)
        counts = epoch_pass * self._source_totals[s]
        if r:
            shards, cum = self.base.pass_order(s, epoch_pass)
            i = int(np.searchsorted(cum, r, side="right"))
            counts = counts + self._pass_prefix(s, epoch_pass, shards, i)
            member = r - (int(cum[i - 1]) if i else 0)
            if member:
                counts = counts + np.bincount(self.meta.shard_buckets(s, int(shards[i]))[:member],
                                              minlength=self.K)
        return counts

    def counts_at_block(self, j: int) -> np.ndarray:
        """C(jM): occurrences of each bucket before block j."""
        def make() -> np.ndarray:
            taken = self.base.taken_before(j)
            return sum((self.source_counts(s, k) for s, k in enumerate(taken)), np.zeros(self.K, np.int64))
        return self._counts.get_or(j, make)

    def block_buckets(self, j: int) -> np.ndarray:
        """Bucket of each position of block j that the epoch serves (int64, <= M long)."""
        return self._blocks.get_or(j, lambda: self._block_buckets(j))

    def _block_buckets(self, j: int) -> np.ndarray:
        src, ks = self.base.block_items(j)
        n = min(self.M, self.N - j * self.M)
        src, ks = src[:n], ks[:n]
        out = np.empty(n, dtype=np.int64)
        for s in np.unique(src):
            where = np.nonzero(src == s)[0]
            size = self.base.sources[s].samples
            passes, r = np.divmod(ks[where], size)
            for epoch_pass in np.unique(passes):
                sel = where[passes == epoch_pass]
                rr = r[passes == epoch_pass]
                shards, cum = self.base.pass_order(int(s), int(epoch_pass))
                i = np.searchsorted(cum, rr, side="right")
                member = rr - np.where(i > 0, cum[np.maximum(i - 1, 0)], 0)
                shard_of = shards[i]
                for shard in np.unique(shard_of):
                    hit = shard_of == shard
                    out[sel[hit]] = self.meta.shard_buckets(int(s), int(shard))[member[hit]]
        return out

    def counts_at(self, p: int) -> np.ndarray:
        j, o = divmod(int(p), self.M)
        counts = self.counts_at_block(j)
        if o:
            counts = counts + np.bincount(self.block_buckets(j)[:o], minlength=self.K)
        return counts

    def batches_before(self, p: int) -> int:
        """G(p): batches completed before position p."""
        return int((self.counts_at(p) // self.B).sum())

    @property
    def num_blocks(self) -> int:
        return -(-self.N // self.M)

    def total_batches(self) -> int:
        return self.batches_before(self.N)

    def samples_per_bucket(self) -> np.ndarray:
        return self.counts_at(self.N)

    # --- finding positions -------------------------------------------------------------------------------

    def _last_block(self, below: Callable[[int], bool]) -> int:
        """The largest block j with below(j) (below(0) must hold and below be monotone: True then False)."""
        lo, hi = 0, self.num_blocks  # below(lo) holds
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if below(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def occurrence(self, b: int, q: int) -> int:
        """Position of bucket b's q-th occurrence (0-based) in the base order."""
        j = self._last_block(lambda jj: self.counts_at_block(jj)[b] <= q)
        hits = np.nonzero(self.block_buckets(j) == b)[0]
        return j * self.M + int(hits[q - int(self.counts_at_block(j)[b])])

    # --- a reader's walk ---------------------------------------------------------------------------------

    def walk(self, first: int, last: int) -> Iterator[BlockPlan]:
        """The batches with ordinals [first, last), block by block, with the positions to read for them."""
        if first >= last:
            return
        j = self._last_block(lambda jj: int((self.counts_at_block(jj) // self.B).sum()) <= first)
        counts = self.counts_at_block(j)
        ordinal = int((counts // self.B).sum())
        # Batches open at block j: their first members are the last (C_b mod B) occurrences of b before it.
        groups: list[list[int]] = [[self.occurrence(b, int(counts[b]) - r + i) for i in range(r)]
                                   for b, r in enumerate((counts % self.B).tolist())]
        held: set[int] = set()  # positions read and kept for a batch not yet served
        while j < self.num_blocks:
            completed = []
            base = j * self.M
            for o, b in enumerate(self.block_buckets(j).tolist()):
                group = groups[b]
                group.append(base + o)
                if len(group) == self.B:
                    if ordinal >= first:
                        completed.append((ordinal, b, group))
                    groups[b] = []
                    ordinal += 1
                    if ordinal == last:
                        break
            done = ordinal >= last
            # Read what this block's batches need and, unless done, the members of batches still open.
            needed = [p for _, _, members in completed for p in members]
            if not done:
                needed += [p for group in groups for p in group]
            read = sorted(p for p in needed if p not in held)
            held.update(read)
            for _, _, members in completed:
                held.difference_update(members)
            yield BlockPlan(read, completed)
            if done:
                return
            j += 1
        raise RuntimeError(f"bucketed epoch: batches {first}..{last} run past the epoch ({ordinal} complete)")


def plan_summary(epoch: BucketedEpoch) -> dict:
    """Per-epoch figures for the log and the scale bench: samples and batches per bucket, not served."""
    per_bucket = epoch.samples_per_bucket()
    batches = per_bucket // epoch.B
    return {"samples": int(per_bucket.sum()), "batches": int(batches.sum()),
            "bucket_remainder": int((per_bucket % epoch.B).sum()),
            "per_bucket": {f"{w}x{h}": int(n) for (w, h), n in zip(epoch.meta.buckets.sizes, per_bucket.tolist())}}


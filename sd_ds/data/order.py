"""The sample order of an epoch and the readers' shares of it: exact, elastic, defined by metadata alone.

An epoch is a sequence of N global positions (N = the samples of all sources, or --samples_per_epoch). The order
is a pure function of (seed, epoch, the sources' shard sizes and weights), never of how many ranks or data-loader
workers read it (mosaicml/streaming's idea: the order does not depend on the readers):

- **mixing**: positions come in blocks of M. Block j holds c_s(j) samples of source s, where the running total
  T_s(jM) = floor(jM * w_s) (w normalised; the heaviest source takes what the others leave), so every source
  gets its weight to within one sample per block, at any weight, whatever its shard count;
- **per source**: source s's k-th sample is in pass k // n_s (n_s = its samples) over its shards, in a seeded
  shuffle of the shards for that pass, at the member that the shard sizes give. A small source with a large
  weight simply has several passes in an epoch, each serving each of its samples once;
- **shuffle**: within block j the c_s(j) samples of every source are put in a seeded random order, so
  consecutive positions come from across the block (this replaces the shuffle buffer, and it is exactly
  reproducible at any position without replaying the stream).

Readers: the positions still to serve in an epoch (all of them, or what an earlier run left: a list of
intervals) are concatenated and cut into R = ranks x workers contiguous spans of L positions, L a multiple of the
micro batch, so each reader yields L / micro batch batches: every sample of the epoch is served exactly once, but
for the remainder of fewer than R x micro batch positions. A reader's position is one number (raw positions
consumed in its span); a resume on the same readers continues each span there, and a resume on other readers
takes every span's unconsumed rest as the new epoch remainder (``remaining``) and cuts that anew: no sample
twice, none missed.
"""

from __future__ import annotations

import collections
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

Intervals = list[tuple[int, int]]  # [start, end) global positions, in serving order
T = TypeVar("T")


class _Cache(collections.OrderedDict):
    """A small LRU cache of one EpochOrder's blocks or passes (per instance: an epoch's order dies with it)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key: object, make: Callable[[], T]) -> T:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


def hashed_rng(*parts: object) -> np.random.Generator:
    """A numpy generator seeded by a hash of the parts (stable across processes, runs and machines)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


@dataclass(frozen=True)
class SourceMeta:
    """What the order needs of a source: a key that seeds its shuffles (the same wherever the shards are stored),
    its weight, and its shards' sample counts (in the order of its shard list)."""

    key: str
    weight: float
    sizes: tuple[int, ...]

    @property
    def samples(self) -> int:
        return sum(self.sizes)


class EpochOrder:
    """Global position → (source, k) → (shard index, member, pass) for one epoch."""

    def __init__(self, sources: Sequence[SourceMeta], *, seed: int, epoch: int, length: int, block: int,
                 resample: bool = False) -> None:
        if not sources or any(s.samples <= 0 for s in sources):
            raise ValueError("every source needs at least one sample")
        self.sources, self.seed, self.epoch, self.length, self.resample = list(sources), seed, epoch, length, resample
        total = sum(s.weight for s in sources)
        self.weights = [s.weight / total for s in sources]
        self.heaviest = max(range(len(sources)), key=lambda i: self.weights[i])
        # Block size: at least S(S-1)+1 so that the heaviest source's share of a block is never negative.
        self.block = max(int(block), len(sources) * (len(sources) - 1) + 1, 1)
        self._sizes = [np.asarray(s.sizes, dtype=np.int64) for s in sources]
        self._blocks = _Cache(4)                     # a reader works through one block at a time
        self._passes = _Cache(2 * len(sources) + 2)  # each source's current pass (and the next)

    # --- mixing -----------------------------------------------------------------------------------------

    def taken_before(self, j: int) -> list[int]:
        """T_s(jM): samples of each source in blocks 0..j-1."""
        p = j * self.block
        counts = [math.floor(p * w) for w in self.weights]
        counts[self.heaviest] = p - (sum(counts) - counts[self.heaviest])
        return counts

    def block_items(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, k) of the M positions of block j, in their seeded order: two int64 arrays."""
        return self._blocks.get_or(j, lambda: self._block_items(j))

    def _block_items(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.taken_before(j), self.taken_before(j + 1)
        rng = hashed_rng(self.seed, self.epoch, "block", j)
        r = self.length - j * self.block
        if r >= self.block:
            src = np.concatenate([np.full(h - l, s, dtype=np.int64) for s, (l, h) in enumerate(zip(lo, hi))])
            ks = np.concatenate([np.arange(l, h, dtype=np.int64) for l, h in zip(lo, hi)])
            perm = rng.permutation(len(src))
            return src[perm], ks[perm]
        # The epoch's last, partial block: its first r positions take each source's first samples of the block
        # in proportion (so one source, or sources weighted by their sizes, are served exactly once), in a
        # seeded order; the block's other samples sit at positions past the epoch's end, never served.
        counts = [h - l for l, h in zip(lo, hi)]
        quota = [r * c // self.block for c in counts]
        by_remainder = sorted(range(len(counts)), key=lambda s: (-(r * counts[s] % self.block), s))
        for s in by_remainder[:r - sum(quota)]:
            quota[s] += 1
        first = [(s, k) for s, (l, q) in enumerate(zip(lo, quota)) for k in range(l, l + q)]
        rest = [(s, k) for s, (l, h, q) in enumerate(zip(lo, hi, quota)) for k in range(l + q, h)]
        first = [first[i] for i in rng.permutation(len(first))]
        both = np.asarray(first + rest, dtype=np.int64).reshape(-1, 2)
        return both[:, 0].copy(), both[:, 1].copy()

    def item(self, position: int) -> tuple[int, int]:
        src, ks = self.block_items(position // self.block)
        o = position % self.block
        return int(src[o]), int(ks[o])

    # --- within a source --------------------------------------------------------------------------------

    def pass_order(self, s: int, epoch_pass: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices, cumulative sample counts) of source s's pass in this epoch."""
        return self._passes.get_or((s, epoch_pass), lambda: self._pass_order(s, epoch_pass))

    def _pass_order(self, s: int, epoch_pass: int) -> tuple[np.ndarray, np.ndarray]:
        sizes = self._sizes[s]
        rng = hashed_rng(self.seed, self.epoch, self.sources[s].key, "shards", epoch_pass)
        if self.resample:
            # With replacement, until the pass holds at least the source's sample count.
            need, order = int(sizes.sum()), []
            while sum(int(sizes[i]) for i in order) < need:
                order.extend(rng.integers(0, len(sizes), size=max(1, len(sizes))).tolist())
            shards = np.asarray(order, dtype=np.int64)
        else:
            shards = rng.permutation(len(sizes))
        return shards, np.cumsum(sizes[shards])

    def locate(self, s: int, k: int) -> tuple[int, int, int]:
        """Source s's k-th sample of the epoch → (shard index in the source, member index in the shard, pass)."""
        n = int(self._sizes[s].sum())
        epoch_pass, r = divmod(k, n)
        shards, cum = self.pass_order(s, epoch_pass)
        i = int(np.searchsorted(cum, r, side="right"))
        return int(shards[i]), int(r - (cum[i - 1] if i else 0)), epoch_pass


# --- readers' spans and positions -------------------------------------------------------------------------

def total(intervals: Intervals) -> int:
    return sum(b - a for a, b in intervals)


def span_length(remaining: int, readers: int, micro_batch_size: int) -> int:
    """Positions per reader: equal for all, a multiple of the micro batch (>= one batch; with fewer positions
    than readers x micro batch, readers share positions rather than hang)."""
    return max(1, remaining // (readers * micro_batch_size)) * micro_batch_size


def cut(intervals: Intervals, start: int, length: int) -> Intervals:
    """Positions [start, start + length) of the concatenation of ``intervals``, as intervals."""
    out: Intervals = []
    offset = 0
    for a, b in intervals:
        n = b - a
        lo, hi = max(start, offset), min(start + length, offset + n)
        if lo < hi:
            out.append((a + lo - offset, a + hi - offset))
        offset += n
        if offset >= start + length:
            break
    return out


def reader_span(intervals: Intervals, reader: int, readers: int, span: int) -> Intervals:
    """Reader ``reader``'s span. When the epoch has fewer positions than readers x span (tiny data), the spans
    wrap around it: some positions are then served twice, never missed."""
    n = total(intervals)
    start = (reader * span) % n
    out = cut(intervals, start, span)
    while total(out) < span:  # wrap (tiny epochs only)
        out += cut(intervals, 0, span - total(out))
    return out


def positions(span: Intervals, start: int) -> Iterator[tuple[int, int]]:
    """(raw index in the reader's stream, global position) from raw index ``start`` on, endlessly: after the span
    the reader serves it again (a repeat; only when skipped samples left its batches short)."""
    n = total(span)
    raw = start
    while True:
        offset = raw % n
        for a, b in span:
            if offset >= b - a:
                offset -= b - a
                continue
            for p in range(a + offset, b):
                yield raw, p
                raw += 1
            offset = 0


def remaining(intervals: Intervals, readers: int, span: int, consumed: dict[int, int]) -> Intervals:
    """What is left of an epoch after each reader consumed ``consumed[reader]`` raw positions of its span
    (positions past the last span, fewer than readers x micro batch, are dropped as in an uninterrupted epoch)."""
    out: Intervals = []
    for reader in range(readers):
        s = reader_span(intervals, reader, readers, span)
        used = min(consumed.get(reader, 0), total(s))
        out += cut(s, used, total(s) - used)
    merged: Intervals = []
    for a, b in out:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        elif a < b:
            merged.append((a, b))
    return merged


def batches_per_reader(intervals: Intervals, readers: int, micro_batch_size: int) -> int:
    return span_length(total(intervals), readers, micro_batch_size) // micro_batch_size

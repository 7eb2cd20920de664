"""The epoch order and the readers' spans, on metadata alone: every sample once per epoch, for any number of
readers, with weights; elastic remainders; and the split simulation at target scale (bench/bench_data_plan.py)."""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np

from sd_ds.data import order as order_lib
from tests.helpers import REPO_ROOT, subprocess_env


def served(sources, readers: int, micro_batch: int, *, block: int = 16, length=None, seed: int = 0):
    """(source, k) of every position served in an epoch, reader by reader."""
    length = length or sum(s.samples for s in sources)
    epoch_order = order_lib.EpochOrder(sources, seed=seed, epoch=0, length=length, block=block)
    intervals = [(0, length)]
    span = order_lib.span_length(length, readers, micro_batch)
    out = []
    for x in range(readers):
        for a, b in order_lib.reader_span(intervals, x, readers, span):
            out += [epoch_order.item(p) for p in range(a, b)]
    return out, epoch_order, span


def test_every_sample_once_for_any_reader_count():
    rng = np.random.default_rng(0)
    sizes = tuple(int(n) for n in rng.integers(3, 30, size=37))
    source = [order_lib.SourceMeta("0:x", 1.0, sizes)]
    n = sum(sizes)
    for readers in (1, 3, 8, 37, 64, 100):  # more readers than shards too
        items, epoch_order, span = served(source, readers, 2)
        assert len(items) == len(set(items)) == readers * span > n - readers * 2  # once; < a global batch left
        assert all(s == 0 and 0 <= k < n for s, k in items)
        located = {epoch_order.locate(0, k)[:2] for _, k in items}
        assert len(located) == len(items)  # distinct (shard, member)
        assert all(member < sizes[shard] for shard, member in located)


def test_weights_passes_and_exactness_of_each_pass():
    big = order_lib.SourceMeta("0:big", 0.8, (50, 40, 60))
    small = order_lib.SourceMeta("1:small", 0.2, (5, 4))  # 9 samples, weighted up: several passes
    items, epoch_order, _ = served([big, small], 4, 2, length=1000)
    per_source = collections.Counter(s for s, _ in items)
    assert abs(per_source[1] / len(items) - 0.2) < 0.01
    passes = collections.defaultdict(list)
    for s, k in items:
        if s == 1:
            shard, member, epoch_pass = epoch_order.locate(1, k)
            passes[epoch_pass].append((shard, member))
    full = sorted((shard, m) for shard, size in enumerate(small.sizes) for m in range(size))
    complete = [p for p, got in passes.items() if len(got) == 9]
    assert len(complete) >= 20 and all(sorted(passes[p]) == full for p in complete)  # each pass: each sample once


def test_the_order_depends_on_seed_and_epoch_not_on_readers():
    source = [order_lib.SourceMeta("0:x", 1.0, (20, 20, 20))]
    a = order_lib.EpochOrder(source, seed=1, epoch=0, length=60, block=16)
    b = order_lib.EpochOrder(source, seed=1, epoch=1, length=60, block=16)
    c = order_lib.EpochOrder(source, seed=2, epoch=0, length=60, block=16)
    orders = [[o.item(p) for p in range(60)] for o in (a, b, c)]
    assert orders[0] != orders[1] and orders[0] != orders[2]
    assert sorted(orders[0]) == sorted(orders[1]) == [(0, k) for k in range(60)]


def test_elastic_remainder_then_new_cut_serves_the_rest_once():
    source = [order_lib.SourceMeta("0:x", 1.0, tuple([10] * 13))]  # 130
    epoch_order = order_lib.EpochOrder(source, seed=0, epoch=0, length=130, block=8)
    intervals = [(0, 130)]
    span = order_lib.span_length(130, 4, 4)  # 4 readers: 32 each, 2 left over
    consumed = {0: 12, 1: 8, 2: 32, 3: 0}
    first = [p for x in range(4) for p in
             [q for a, b in order_lib.cut(order_lib.reader_span(intervals, x, 4, span), 0, consumed[x])
              for q in range(a, b)]]
    left = order_lib.remaining(intervals, 4, span, consumed)
    span2 = order_lib.span_length(order_lib.total(left), 3, 4)
    second = [q for x in range(3) for a, b in order_lib.reader_span(left, x, 3, span2) for q in range(a, b)]
    both = first + second
    assert len(both) == len(set(both))
    assert set(both) <= set(range(128)) and 128 - len(both) < 3 * 4  # < one global micro batch dropped
    assert len({epoch_order.item(p) for p in both}) == len(both)


def test_split_simulation_at_target_scale_runs():
    """bench/bench_data_plan.py on a reduced scale (the full 40,000 x 4,096 run is in BENCHMARKS.md)."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_data_plan.py"), "--shards", "2000",
                           "--ranks", "64", "--no_write"], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| exact spans of the global order (after) | 0 |" in proc.stdout

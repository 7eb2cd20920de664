"""Sharded EMA on real multi-rank DeepSpeed ZeRO-2 (bf16, CPU ranks, gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, free_port, subprocess_env

pytestmark = pytest.mark.slow
WORKER = REPO_ROOT / "tests" / "ema_worker.py"


def launch(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(WORKER), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for world in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"ema{world}")
        launch(world, "--mode", "train", "--out", str(out), "--steps", "6", "--skip_step", "3")
        results[world] = (out, json.loads((out / f"result_train_{world}.json").read_text()))
    return results


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_ema_equals_full_reference_exactly(runs, world):
    _, r = runs[world]
    assert r["max_abs_err_gathered"] == 0.0
    assert r["max_abs_err_offline"] == 0.0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_skipped_overflow_step_does_not_update_ema(runs, world):
    _, r = runs[world]
    assert r["skipped_steps"] == 1
    assert r["skipped_step_left_ema_unchanged"] is True
    assert r["num_updates"] == 5


def test_ema_memory_is_divided_by_ranks(runs):
    one, two, three = (runs[w][1]["ema_bytes_per_rank"] for w in (1, 2, 3))
    full = runs[1][1]["full_bytes"]
    pad = 4 * 2 * 3  # at most one alignment unit of fp32 padding per rank
    assert abs(one - full) <= pad
    assert abs(two - full / 2) <= pad
    assert abs(three - full / 3) <= pad


def test_reshard_three_ranks_to_two(runs):
    out, _ = runs[3]
    launch(2, "--mode", "reshard", "--out", str(out))
    r = json.loads((out / "result_reshard_2.json").read_text())
    assert r["max_abs_err_gathered"] == 0.0
    assert r["num_updates"] == 5
    assert len(set(r["partition_numels"])) == 1


def test_warmup_and_start_step():
    from types import SimpleNamespace

    from sd_ds.ema import ShardedEMA

    ema = ShardedEMA.__new__(ShardedEMA)
    ema.decay, ema.warmup, ema.start_step, ema.num_updates = 0.9999, True, 10, 0
    assert ema.current_decay(5) == 0.0  # before start_step the EMA follows the weights
    assert ema.current_decay(10) == pytest.approx(1 / 10)
    ema.num_updates = 90
    assert ema.current_decay(100) == pytest.approx(91 / 100)
    ema.num_updates = 10**7
    assert ema.current_decay(10**7) == 0.9999
    ema.warmup = False
    ema.num_updates = 0
    assert ema.current_decay(10) == 0.9999
    del SimpleNamespace

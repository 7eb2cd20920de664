"""Sharded EMA on real multi-rank DeepSpeed ZeRO-2 (bf16, AdamW, CPU ranks over gloo).

One launch per world size (tests/ema_worker.py), each checking several things against a full fp32 reference
EMA computed in the same run from DeepSpeed's gathered master weights:
  1 rank:  decay warm-up and start_step;
  2 ranks: plain decay;
  3 ranks: zero_optimization.parameter_alignment on (padding between parameters too), shards saved;
  3 -> 2:  the 3-rank shards re-sharded onto 2 ranks (no parameter alignment), training continues.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_ds.ema import ShardedEMA, check_supported, ema_decay
from sd_ds.testing import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "ema_worker.py"
FLAGS = {1: ["--warmup", "--start_step", "3"], 2: [], 3: ["--param_alignment"]}


def launch(nproc: int, out: Path, mode: str, *flags: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(WORKER), "--mode", mode, "--out", str(out), *flags]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return json.loads((out / f"result_{mode}_{nproc}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    results = {}
    for world, flags in FLAGS.items():
        out = tmp_path_factory.mktemp(f"ema{world}")
        results[world] = (out, launch(world, out, "train", *flags))
    return results


@pytest.fixture(scope="module")
def resumed(runs):
    out, _ = runs[3]
    return launch(2, out, "resume")


# --- multi-rank --------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_ema_equals_full_fp32_reference_exactly(runs, world):
    _, r = runs[world]
    assert r["ema_moved_from_start"] and r["ema_differs_from_weights"]  # the comparison is not vacuous
    assert r["max_abs_err_gathered"] == 0.0
    assert r["module_params_are_ema"] and r["module_keys_match"] and r["module_buffer_kept"]
    assert all(rk["non_zero_ranks_get_none"] for rk in r["ranks"][1:])


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_skipped_overflow_step_does_not_update_ema(runs, world):
    _, r = runs[world]
    assert r["skipped_steps"] == 1
    assert all(rk["skipped_step_left_ema_unchanged"] for rk in r["ranks"])
    assert r["num_updates"] == r["num_updates_ref"]


@pytest.mark.slow
def test_warmup_and_start_step_in_a_real_run(runs):
    _, r = runs[1]
    # steps 1-2 copy the weights, step 3 is skipped, steps 4-6 average with decays 1/10, 2/11, 3/12
    assert r["num_updates"] == 3
    assert r["max_abs_err_gathered"] == 0.0


@pytest.mark.slow
def test_ema_bytes_per_rank_are_the_master_partition_and_halve(runs):
    one, two = runs[1][1], runs[2][1]
    full = one["full_fp32_bytes"]
    assert all(rk["ema_bytes"] == rk["master_partition_bytes"] for w in (1, 2, 3) for rk in runs[w][1]["ranks"])
    groups, fp32 = 2, 4
    # DeepSpeed pads each group's end to a multiple of 2 * world_size values
    assert full <= one["ema_bytes"] <= full + groups * 2 * 1 * fp32
    assert len({rk["ema_bytes"] for rk in two["ranks"]}) == 1
    assert abs(two["ema_bytes"] - one["ema_bytes"] / 2) <= groups * 2 * 2 * fp32


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_save_then_consolidate_offline_and_reload(runs, world):
    _, r = runs[world]
    assert r["max_abs_err_offline"] == 0.0
    assert all(rk["reload_same_world_exact"] for rk in r["ranks"])


@pytest.mark.slow
def test_swapped_into_puts_ema_in_the_module_and_restores(runs, resumed):
    for r in [runs[w][1] for w in (1, 2, 3)] + [resumed]:
        for rk in r["ranks"]:
            assert rk["swap_params_are_bf16_ema"] and rk["swap_changes_output"]
            assert rk["swap_restored_params"] and rk["swap_left_masters_alone"]
            assert rk["swap_submodule_group_only"] and rk["swap_submodule_restored"]
            assert rk["swap_refuses_a_shared_group"]


@pytest.mark.slow
def test_reshard_three_ranks_to_two_and_continue(runs, resumed):
    out, _ = runs[3]
    r = resumed
    assert r["num_updates_loaded"] == runs[3][1]["num_updates"]
    assert all(rk["partition_shapes_match_masters"] and rk["tail_padding_zero"] for rk in r["ranks"])
    assert r["max_abs_err_after_reshard"] == 0.0
    assert r["max_abs_err_gathered"] == 0.0  # after 6 more steps on 2 ranks
    assert r["num_updates"] == r["num_updates_ref"] == runs[3][1]["num_updates"] + 6
    assert sorted(p.name for p in (out / "ckpt").glob("ema_rank_*.pt")) == [f"ema_rank_0000{i}.pt" for i in range(3)]


# --- no distributed ----------------------------------------------------------------------------------------

def test_decay_schedule():
    d = dict(decay=0.9999, warmup=True, start_step=10)
    assert ema_decay(5, 0, **d) == 0.0  # before start_step the EMA follows the weights
    assert ema_decay(10, 0, **d) == pytest.approx(1 / 10)
    assert ema_decay(100, 90, **d) == pytest.approx(91 / 100)
    assert ema_decay(10**7, 10**6, **d) == 0.9999
    assert ema_decay(10, 0, decay=0.9999, warmup=False, start_step=10) == 0.9999
    assert ema_decay(0, 0, decay=0.9, warmup=False, start_step=0) == 0.9


def test_unsupported_optimizer_raises_with_the_supported_range():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match=r"deepspeed==0\.19\.8"):
        check_supported(torch.optim.AdamW(model.parameters()))
    with pytest.raises(RuntimeError, match="single_partition_of_fp32_groups"):
        ShardedEMA(torch.optim.AdamW(model.parameters()))

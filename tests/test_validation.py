"""The validation loss: a function of the weights alone (same bits on 1 and 2 ranks, twice in a row), and its
place in the training loop (logged at step 0 and every --validation_steps, EMA too, a resume keeps the
schedule) through the real launcher."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sd_ds.validation import validation_timesteps
from tests.helpers import REPO_ROOT, free_port, subprocess_env

WORKER = REPO_ROOT / "tests" / "validation_worker.py"


def test_timesteps_are_eight_evenly_spaced_bin_centres():
    assert validation_timesteps(1000) == [62, 187, 312, 437, 562, 687, 812, 937]


def _losses_on(nproc: int, assets, out) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           str(WORKER), str(out), str(assets["shards"]), str(assets["model"])]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
def test_same_weights_same_validation_loss_on_one_and_two_ranks_and_twice(assets, tmp_path):
    one, two = _losses_on(1, assets, tmp_path / "one.pt"), _losses_on(2, assets, tmp_path / "two.pt")
    assert one["keys"] == two["keys"] and len(one["keys"]) == 10
    a, b = one["tables"]
    assert a.shape == (10, 8) and (a > 0).all()
    assert torch.equal(a, b), "two evaluations of the same weights"
    assert torch.equal(a, two["tables"][0]) and torch.equal(a, two["tables"][1]), "1 rank vs 2 ranks"
    # The timesteps matter: the loss is not one number repeated.
    assert a.mean(dim=0).unique().numel() == 8

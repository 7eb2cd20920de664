"""End to end through the real entry point: run.sh → deepspeed launcher → sd_ds.train, CPU ranks, ZeRO-2 bf16.

The runs are shared by several tests (module-scoped fixtures) because each launch costs tens of seconds here.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO_ROOT, fp32_weights, free_port, run_sh, scalars, subprocess_env, train_flags

pytestmark = pytest.mark.slow

STEPS = 24


@pytest.fixture(scope="module")
def two_rank_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("run2")
    proc = run_sh(train_flags(out, assets["shards"], assets["model"], max_steps=STEPS, save_steps=8,
                              save_total_limit=2), nproc=2)
    return out, proc


def test_two_rank_run_trains_logs_and_rotates(two_rank_run):
    out, proc = two_rank_run
    loss = [v for _, v in scalars(out / "runs", "train/loss")]
    assert len(loss) == STEPS
    # Zero-initialised output projections start at loss ≈ E[noise²] = 1; an overfit set must go well below.
    assert sum(loss[-6:]) / 6 < 0.85 * sum(loss[:3]) / 3, loss
    for tag in ("train/images_per_s", "train/samples_seen", "train/skipped_steps", "train/data_wait_fraction",
                "train/other_fraction", "train/grad_norm", "lr/unet"):
        assert scalars(out / "runs", tag), tag
    (times,) = [json.loads(line) for line in (out / "time_breakdown.json").read_text().splitlines()]
    assert times["steps"] == STEPS
    assert times["compute_s"] > 0 and times["data_wait_s"] > 0 and times["other_s"] > 0
    assert times["compute_s"] + times["data_wait_s"] < times["wall_s"]  # measured separately, never overlapping
    samples_seen = scalars(out / "runs", "train/samples_seen")
    assert samples_seen[-1] == (STEPS, float(STEPS * 2 * 4))
    # save_steps 8 over 24 steps, limit 2: 8 rotated away; `latest` names the newest.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24"]
    assert (out / "latest").read_text().strip() == "checkpoint-24"
    state = json.loads((out / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["global_batch_size"] == 8
    assert state["config"]["optim"]["per_device_train_batch_size"] == 4


def test_zero_to_fp32_consolidates_our_checkpoint(two_rank_run, tmp_path):
    out, _ = two_rank_run
    ckpt = out / "checkpoint-24"
    script = out / "zero_to_fp32.py"
    assert script.is_file(), "DeepSpeed copies its consolidation script next to the checkpoints"
    target = tmp_path / "consolidated"
    subprocess.run([sys.executable, str(script), str(out), str(target), "--tag", "checkpoint-24"], check=True,
                   env=subprocess_env(), cwd=tmp_path, capture_output=True)
    from safetensors.torch import load_file

    files = list(target.glob("*.safetensors")) or list(target.glob("*.bin"))
    assert files
    consolidated = {}
    for f in files:
        consolidated.update(load_file(f) if f.suffix == ".safetensors" else torch.load(f))
    reference = fp32_weights(ckpt)
    assert set(consolidated) == set(reference)
    assert any(k.startswith("unet.conv_out") for k in consolidated)
    for k, v in reference.items():
        assert torch.equal(consolidated[k].float(), v), k


def test_one_rank_vs_two_ranks_same_global_batch(assets, two_rank_run, tmp_path):
    """Same global batch (1 × 8 vs 2 × 4). Ranks read different shards and draw their own noise, so the
    trajectories match statistically, not step by step: compare smoothed losses."""
    out2, _ = two_rank_run
    out1 = tmp_path / "run1"
    run_sh(train_flags(out1, assets["shards"], assets["model"], max_steps=STEPS, save_steps=STEPS,
                       per_device_train_batch_size=8), nproc=1)
    l1 = [v for _, v in scalars(out1 / "runs", "train/loss")]
    l2 = [v for _, v in scalars(out2 / "runs", "train/loss")]
    assert len(l1) == len(l2) == STEPS
    for a, b in ((0, 8), (8, 16), (16, 24)):
        m1, m2 = sum(l1[a:b]) / 8, sum(l2[a:b]) / 8
        assert abs(m1 - m2) < 0.12 + 0.2 * max(m1, m2), (a, l1, l2)
    assert scalars(out1 / "runs", "train/samples_seen")[-1][1] == scalars(out2 / "runs", "train/samples_seen")[-1][1]


def _wait_for(path_glob: Path, pattern: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.returncode}")
        if list(path_glob.glob(pattern)):
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {pattern}")


def test_sigterm_checkpoint_and_exact_resume(assets, two_rank_run, tmp_path):
    """Uninterrupted 24 steps == (SIGTERM somewhere in the middle → checkpoint, exit 0) + resume to 24."""
    ref_out, _ = two_rank_run
    out = tmp_path / "interrupted"
    flags = train_flags(out, assets["shards"], assets["model"], max_steps=STEPS, save_steps=8, save_total_limit=2)
    env = subprocess_env({"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())})
    proc = subprocess.Popen(["bash", str(REPO_ROOT / "run.sh"), *flags], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The first scheduled checkpoint is at step 8; interrupt after it, before the end.
        _wait_for(out, "checkpoint-8/trainer_state.json", 300, proc)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    stopped_at = steps[-1]
    assert 8 < stopped_at < STEPS, (steps, log[-3000:])
    assert "stop requested" in log

    # Resume from optimizer files pickled as CPython 3.11.2 writes them (ZeroStageEnum by name, issue 21).
    from tests.test_checkpoint_loading import resave_enums_by_name

    for rank in (0, 1):
        resave_enums_by_name(out / f"checkpoint-{stopped_at}" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    run_sh(flags, nproc=2)
    resumed = fp32_weights(out / f"checkpoint-{STEPS}")
    reference = fp32_weights(ref_out / f"checkpoint-{STEPS}")
    assert set(resumed) == set(reference)
    worst = max((resumed[k] - reference[k]).abs().max().item() for k in reference)
    assert worst == 0.0, f"resumed run diverged from the uninterrupted one (max abs diff {worst})"
    # Also the bookkeeping: samples seen continue, not restart.
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["samples_seen"] == STEPS * 8


def test_two_node_launch_over_hostfile_on_loopback(assets, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "two_nodes"
    port = str(free_port())
    flags = train_flags(out, assets["shards"], assets["model"], max_steps=3, save_steps=3)
    procs = []
    for node_rank in (0, 1):
        env = subprocess_env({"HOSTFILE": str(hostfile), "NO_SSH": "1", "NODE_RANK": str(node_rank),
                        "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen(["bash", str(REPO_ROOT / "run.sh"), *flags], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3


def test_raw_file_list_gets_the_converter_command(tmp_path):
    lst = tmp_path / "train.filelist.list"
    lst.write_text(f"{tmp_path / 'a.filelist'} 1.0\n")
    proc = subprocess.run([sys.executable, "-m", "sd_ds.train", "--file_list", str(lst), "--output_dir",
                           str(tmp_path / "o")], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "convert_laion_to_wds.py" in proc.stdout + proc.stderr

"""Every control-plane collective of sd-ds (stop agreement, metric reductions, barriers around checkpoints and
image logging, the resume broadcast) goes through the gloo control group, never the default group: on GPUs the
default group is NCCL, which refuses the CPU tensors these carry. Recorded on a real 2-rank CPU run."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, free_port, make_tiny_model, subprocess_env, train_flags, write_tiny_shards

pytestmark = pytest.mark.slow


def test_sd_ds_collectives_use_the_gloo_control_group(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", num_shards=4, samples_per_shard=8)
    model = make_tiny_model(tmp_path / "model")
    out = tmp_path / "records"
    out.mkdir()
    flags = train_flags(tmp_path / "run", shards, model, max_steps=2, save_steps=1, logging_steps=1,
                        image_logging_steps=2, num_inference_steps=2, use_ema=True, dataloader_num_workers=0)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.collective_recorder", *flags], cwd=REPO_ROOT,
                              env=subprocess_env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                                  "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": str(port), "SD_DS_COLLECTIVES_OUT": str(out),
                                                  "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    for rank in range(2):
        records = json.loads((out / f"rank{rank}.json").read_text())
        by_place = collections.Counter((r["op"], r["where"].split(":")[0], r["group"]) for r in records)
        # The run issued the control-plane collectives we route: the stop agreement and metric reductions every
        # step, barriers around checkpoints and image logging, the resume-point broadcast.
        ops = {op for op, _, _ in by_place}
        assert {"all_reduce", "barrier", "broadcast_object_list"} <= ops, by_place
        # Two checkpoints (3 barriers each) and one image-logging step (1) at least.
        assert sum(n for (op, _, _), n in by_place.items() if op == "barrier") >= 7, by_place
        for (op, where, group), n in by_place.items():
            if where == "ema.py":
                # The EMA's gathers are data plane: device tensors on DeepSpeed's data-parallel group (NCCL on
                # GPUs), which must be named explicitly, never the default group.
                assert group == "other", (op, where, group)
            else:
                assert group == "control", f"{n} x {op} from sd_ds/{where} on the {group} group"
        assert any(where == "ema.py" for _, where, _ in by_place), "the EMA gather for image logging was recorded"
    # DeepSpeed's shared-memory inference all-reduce op is not compiled for training ranks (~28 s of g++ at the
    # first launch of every install; sd_ds.distributed.skip_shm_inference_op).
    built = [p.name for p in (tmp_path / "torch_extensions").rglob("*shm*")]
    assert not built, built


STOP_AGREEMENT = """
import os, random, sys, time
import torch.distributed as dist
import torch
from sd_ds.distributed import DistInfo, StopSignal

rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
stop = StopSignal(DistInfo(rank, 2, rank, torch.device("cpu"), dist.new_group(backend="gloo")))
random.seed(rank)
for step in range(1, 20):
    time.sleep(random.random() * 0.05)  # the ranks run out of step with each other
    if rank == 1 and step == int(os.environ["SIGNAL_AT"]):
        stop.requested = True  # what SIGTERM's handler does, on one rank only
    if stop.agreed():
        break
stop.close()
print("STOPPED_AT", step, flush=True)
# As the trainer's ranks leave: gloo's threads can abort a finalizing interpreter (sd_ds.lifecycle.end_process).
dist.destroy_process_group()
from sd_ds.lifecycle import end_process
end_process()
"""


@pytest.mark.parametrize("signal_at", [1, 5])
def test_stop_agreement_stops_every_rank_at_the_same_step(signal_at):
    """The stop agreement is read one step after it is started (its gloo round trip overlaps a step): a signal
    on one rank at step k stops every rank at step k+1, the same step everywhere."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", STOP_AGREEMENT], cwd=REPO_ROOT,
                              env=subprocess_env({"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                  "MASTER_PORT": str(port), "SIGNAL_AT": str(signal_at)}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    stopped = [int(log.split("STOPPED_AT ")[1].split()[0]) for log in logs]
    assert stopped == [signal_at + 1, signal_at + 1], logs

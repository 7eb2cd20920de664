"""Ranks, devices, the control-plane process group, the ranks' agreement to stop, and per-rank RNG.

Two kinds of collectives run in a training job:
- the data plane (gradients, ZeRO partitions, EMA gathers): device tensors on DeepSpeed's process groups
  (NCCL on GPUs), issued by DeepSpeed and by ``sd_ds.ema``;
- the control plane (the stop agreement, ``StopSignal``; logged metric reductions, barriers around checkpoints
  and image logging, the resume-checkpoint broadcast): a few CPU scalars. NCCL refuses CPU tensors ("No backend type
  associated with device type cpu"), so every control-plane collective of sd-ds goes through one gloo group
  created at start-up (``DistInfo.control_group``), never the default group.
"""

from __future__ import annotations

import atexit
import datetime
import os
import random
import signal
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from sd_ds.lifecycle import note_process_group

# The control plane (gloo): rank 0 may spend minutes generating sample images or writing an export while the
# others wait at a barrier there.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
# The data plane (NCCL default group: gradients, ZeRO all-gathers, EMA gathers, DeepSpeed's checkpoint barrier):
# every rank is busy in lockstep, so a wait this long means a wedged rank or network; the job should fail (and
# be restarted from its last checkpoint) within minutes, not sit for two hours holding every GPU. A rank that
# works alone (image logging, export) waits on the control group above, never here.
DATA_PLANE_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("SD_DS_NCCL_TIMEOUT_MIN", "30")))


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Any = None  # gloo group for CPU-tensor collectives; None when not distributed

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.control_group is not None:
            dist.barrier(group=self.control_group)

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) over ranks of a small CPU tensor; returns a new tensor."""
        values = values.detach().cpu().clone()
        if self.control_group is not None and self.world_size > 1:
            dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op],
                            group=self.control_group)
        return values

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (pickled in memory between our own processes only)."""
        if self.control_group is None or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.control_group)
        return box[0]


class StopSignal:
    """SIGTERM/SIGINT ask for a checkpoint at the end of the current step, then a clean exit (status 0)."""

    def __init__(self, dist_info: DistInfo) -> None:
        self.dist = dist_info
        self.requested = False
        self._pending: Optional[tuple[Any, torch.Tensor]] = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank at the same call once any rank was signalled (one call after the signal is seen).

        All ranks must stop at the same step, or the checkpoint's collectives would hang. The agreement is a
        max-all-reduce of a CPU flag on the gloo control group (no device sync), started without waiting at
        one step and read at the next: the cross-node round trip overlaps a whole training step instead of
        stalling the host every step. Every rank reads the same completed reduction at the same call, so all
        stop at the same step, one step after the signal."""
        import torch.distributed as dist

        if self.dist.control_group is None or self.dist.world_size == 1:
            return self.requested
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()  # issued a step ago on every rank: complete, or nearly, by now
            stop = bool(flag[0])
        flag = torch.tensor([int(self.requested)])
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.dist.control_group,
                                         async_op=True), flag)
        return stop

    def close(self) -> None:
        """Complete the last agreement (every rank issued it) before the process group goes away."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def init_distributed() -> DistInfo:
    """Join the process group the deepspeed launcher set up (or a group of one when run directly)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    backend = "gloo" if on_cpu else accelerator.communication_backend_name()  # ccl needs oneCCL; gloo is always there
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_cpu:
        device = torch.device("cpu")
    else:
        # Before the process group: NCCL binds each rank's communicator to the current device.
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    if on_cpu:
        skip_shm_inference_op()
    # On CPU the default group is gloo and also carries DeepSpeed's collectives: one (long) timeout for both.
    deepspeed.init_distributed(dist_backend=backend, timeout=COLLECTIVE_TIMEOUT if on_cpu else DATA_PLANE_TIMEOUT)
    # Collective: every rank creates it, in the same order. On CPU the default group is gloo already, but a
    # separate group keeps our barriers from interleaving with DeepSpeed's own collectives.
    control_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    # Closed at exit however main() ends; the commands then leave without finalizing the interpreter, where gloo's
    # threads can abort a finished rank (lifecycle.end_process says how).
    atexit.register(close_distributed)
    note_process_group()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, control_group)


def skip_shm_inference_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op as the group starts.

    That op serves only ``inference_all_reduce`` (tensor-parallel inference); ZeRO training's collectives go
    through torch.distributed (gloo here). Building it costs ~28 s of g++ on 2 cores at the first launch after
    every new install (the build is keyed by the sources' absolute paths, so each fresh clone's venv rebuilds it):
    a third of the demo's training-stage start-up. Without the op DeepSpeed falls back to torch.distributed.
    """
    import importlib

    # Not `import deepspeed.comm.torch as m`: that binds deepspeed.comm's attribute `torch`, which is torch itself.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if callable(getattr(ds_torch_comm, "build_shm_op", None)):  # absent in another DeepSpeed: nothing to skip
        ds_torch_comm.build_shm_op = lambda: None


def default_loader_workers(device: torch.device) -> int:
    """Data-loader workers per rank when --dataloader_num_workers is not given: enough to feed a GPU from JPEGs
    (each worker ~150 images/s) without oversubscribing the node's cores, one left for the rank itself."""
    if device.type == "cpu":
        return 2
    # LOCAL_SIZE: the deepspeed launcher's ranks on this node (torchrun: LOCAL_WORLD_SIZE)
    ranks_here = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1")
    return max(1, min(8, (os.cpu_count() or 2) // ranks_here - 1))


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's seed: different across ranks, reproducible for the same (seed, rank)."""
    return seed * 1000003 + rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain JSON values (no pickle: checkpoints load with weights_only)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "mt": list(mt), "gauss": gauss},
        "numpy": {"name": np_name, "keys": np_keys.tolist(), "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def device_memory_stats(device: torch.device) -> Optional[dict[str, float]]:
    if device.type != "cuda":
        return None
    return {
        "memory/allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
        "memory/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        "memory/reserved_gb": torch.cuda.memory_reserved(device) / 2**30,
    }

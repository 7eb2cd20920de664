"""EMA of the fp32 master weights, kept only for this rank's ZeRO-1/2 partition.

DeepSpeed's ``DeepSpeedZeroOptimizer`` holds each rank's slice of the flattened fp32 master weights in
``single_partition_of_fp32_groups`` (one flat tensor per parameter group). The EMA shadows exactly those
tensors: 4·P/N bytes per rank instead of 4·P (3.4 GB for the SD v1 UNet on every GPU in diffusers' and
mosaic's trainers), one fused ``lerp`` per step, no communication. A full copy is only assembled when someone
needs it (sample images: a gather to rank 0; export: offline from the saved shards).

Layout facts used here (checked against DeepSpeed 0.16-0.19; see ``check_supported``): each group is the
concatenation of its parameters in ``bit16_groups`` order, padded at the end to a multiple of the world size
(times an alignment factor), split into equal partitions, rank r holding slice r. This is also what
DeepSpeed's own ``zero_to_fp32.py`` assumes when it merges the optimizer shards.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("sd_ds.ema")

SUPPORTED_DEEPSPEED = ">=0.16,<0.20"
SHARD_FILE = "ema_rank_{rank}.pt"


def check_supported(optimizer: Any) -> None:
    missing = [a for a in ("single_partition_of_fp32_groups", "bit16_groups", "partition_size")
               if not hasattr(optimizer, a)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"sharded EMA needs DeepSpeed's ZeRO-1/2 optimizer internals {missing}, not found on "
            f"{type(optimizer).__name__} (deepspeed {deepspeed.__version__}); supported: deepspeed{SUPPORTED_DEEPSPEED} "
            "with zero_optimization.stage 1 or 2 and no CPU offload of the master weights' layout changes")


def param_shapes(engine: Any) -> list["OrderedDict[str, torch.Size]"]:
    """Per optimizer group, parameter name → shape in flattening order (names as module.named_parameters)."""
    names = {p: n for n, p in engine.module.named_parameters()}
    groups = getattr(engine.optimizer, "round_robin_bit16_groups", engine.optimizer.bit16_groups)
    return [OrderedDict((names[p], p.shape) for p in group) for group in groups]


class ShardedEMA:
    def __init__(self, engine: Any, *, decay: float = 0.9999, warmup: bool = False, start_step: int = 0) -> None:
        check_supported(engine.optimizer)
        self.engine = engine
        self.optimizer = engine.optimizer
        self.decay, self.warmup, self.start_step = decay, warmup, start_step
        self.num_updates = 0
        self.shapes = param_shapes(engine)
        # The rank's partitions, copied now: the EMA starts at the initial weights.
        self.shadow = [t.detach().clone() for t in self.masters]

    @property
    def masters(self) -> list[torch.Tensor]:
        return list(self.optimizer.single_partition_of_fp32_groups)

    def current_decay(self, step: int) -> float:
        if step < self.start_step:
            return 0.0  # not averaging yet: follow the weights
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after an optimizer step that was applied (not after a skipped overflow step)."""
        decay = self.current_decay(step)
        torch._foreach_lerp_(self.shadow, self.masters, 1.0 - decay)
        if step >= self.start_step:
            self.num_updates += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shadow)

    def state_dict(self) -> dict:
        return {"shadow": [t.cpu() for t in self.shadow], "num_updates": self.num_updates, "decay": self.decay,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "param_shapes": self.shapes}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("EMA partitions do not match this run's ZeRO layout (use load_ema_shards to re-shard)")
        for dst, src in zip(self.shadow, state["shadow"]):
            dst.copy_(src)
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """Collective: the full fp32 EMA weights (names as module.named_parameters) on rank 0, None elsewhere."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        flats = []
        for part in self.shadow:
            if world == 1:
                flats.append(part)
                continue
            gathered = [torch.empty_like(part) for _ in range(world)] if rank == 0 else None
            dist.gather(part, gathered, dst=0)
            if rank == 0:
                flats.append(torch.cat(gathered))
        return unflatten(flats, self.shapes) if rank == 0 else None


def unflatten(flat_groups: list[torch.Tensor], shapes: list["OrderedDict[str, torch.Size]"]) -> dict[str, torch.Tensor]:
    """Full flat group vectors (padding at the end) → {name: tensor}."""
    out: dict[str, torch.Tensor] = {}
    for flat, group in zip(flat_groups, shapes):
        offset = 0
        for name, shape in group.items():
            n = torch.Size(shape).numel()
            out[name] = flat.narrow(0, offset, n).view(shape).clone()
            offset += n
        if offset > flat.numel():
            raise ValueError(f"EMA group holds {flat.numel()} values, its parameters need {offset}")
    return out


def save_ema_shard(ema: ShardedEMA, ckpt_dir: str | Path, rank: int) -> Path:
    path = Path(ckpt_dir) / SHARD_FILE.format(rank=rank)
    torch.save(ema.state_dict(), path)
    return path


def _read_all(ckpt_dir: Path) -> list[dict]:
    files = sorted(ckpt_dir.glob("ema_rank_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no EMA shards (ema_rank_*.pt)")
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    if len(states) != states[0]["world_size"]:
        raise ValueError(f"{ckpt_dir}: {len(states)} EMA shards for a world size of {states[0]['world_size']}")
    return states


def _full_groups(states: list[dict]) -> list[torch.Tensor]:
    return [torch.cat([s["shadow"][g] for s in states]) for g in range(len(states[0]["shadow"]))]


def consolidate_ema(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Offline, no torch.distributed: the full fp32 EMA from a checkpoint's per-rank shards."""
    states = _read_all(Path(ckpt_dir))
    return unflatten(_full_groups(states), states[0]["param_shapes"])


def load_ema_shards(ckpt_dir: str | Path, ema: ShardedEMA, rank: int, world_size: int) -> dict:
    """This rank's EMA state for the current layout; re-shards when the checkpoint had another world size."""
    ckpt_dir = Path(ckpt_dir)
    own = ckpt_dir / SHARD_FILE.format(rank=rank)
    if own.is_file():
        state = torch.load(own, map_location="cpu", weights_only=False)
        if state["world_size"] == world_size:
            return state
    states = _read_all(ckpt_dir)
    saved_shapes = states[0]["param_shapes"]
    if [list(g.items()) for g in saved_shapes] != [list(g.items()) for g in ema.shapes]:
        raise ValueError("the checkpoint's EMA was taken over different parameters than this model has")
    shadow = []
    for g, (full, part) in enumerate(zip(_full_groups(states), ema.shadow)):
        used = sum(torch.Size(s).numel() for s in saved_shapes[g].values())
        padded = torch.zeros(part.numel() * world_size, dtype=full.dtype)
        padded[:used] = full[:used]  # drop the old padding, add the new layout's
        shadow.append(padded[rank * part.numel():(rank + 1) * part.numel()].clone())
    logger.info("EMA re-sharded from %d to %d ranks", states[0]["world_size"], world_size)
    return {"shadow": shadow, "num_updates": states[0]["num_updates"]}

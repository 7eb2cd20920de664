"""EMA of the fp32 master weights, kept only for this rank's ZeRO-1/2 partition.

DeepSpeed's ``DeepSpeedZeroOptimizer`` (the optimizer of ZeRO stage 1/2, bf16 or fp16 or fp32) holds each rank's
slice of every parameter group's flattened fp32 master weights in ``single_partition_of_fp32_groups``. The EMA
shadows exactly those tensors: 4·P/N bytes per rank instead of 4·P on every rank (3.4 GB per GPU for the SD v1
UNet in diffusers' trainer), one fused ``lerp`` per step, no communication. A full copy is only assembled when
someone needs one: a gather to rank 0 (``full_state_dict``), an all-gather straight into the module's bf16
weights (``swapped_into``), or offline from the saved shards (``consolidate_ema``).

Layout, as DeepSpeed builds it (``DeepSpeedZeroOptimizer.__init__``): group g is the concatenation of its
parameters in ``round_robin_bit16_groups[g]`` order, each followed by ``round_robin_bit16_padding[g][k]`` zeros
(``zero_optimization.parameter_alignment``), padded at the end to ``partition_size[g] * dp_world_size``, and
rank r holds ``[r * partition_size[g], (r + 1) * partition_size[g])``. Each shard file carries that layout
(names, shapes, per-parameter paddings, partition size): the same metadata DeepSpeed's ``zero_to_fp32.py`` uses
(``param_shapes``, ``param_alignment_paddings``), so shards can be merged or re-cut without the live optimizer.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from sd_ds.fileio import save_atomic

logger = logging.getLogger("sd_ds.ema")

# Checked against deepspeed 0.19.8 (round_robin_bit16_padding/offsets appeared with parameter_alignment);
# other versions are accepted when they expose the same attributes, with a warning.
SUPPORTED_DEEPSPEED = "==0.19.8"  # requirements.txt pins what is tested
REQUIRED_ATTRIBUTES = ("single_partition_of_fp32_groups", "round_robin_bit16_groups", "partition_size",
                       "param_names", "real_dp_process_group", "bit16_groups_flat")
SHARD_FORMAT = "sd_ds.sharded_ema.v1"
GATHER_CHUNK_BYTES = 256 * 2**20
SHARD_FILE = "ema_rank_{rank:05d}.pt"
_SHARD_RE = re.compile(r"^ema_rank_(\d+)\.pt$")


# --- the decay schedule ----------------------------------------------------------------------------------

def ema_decay(step: int, num_updates: int, *, decay: float, warmup: bool, start_step: int) -> float:
    """Decay for the update after optimizer step ``step``, ``num_updates`` averaging updates having been made.

    Before ``start_step`` the EMA copies the weights (decay 0); with ``warmup`` the decay ramps as
    min(decay, (1 + n) / (10 + n)), n counted from the first averaging update.
    """
    if step < start_step:
        return 0.0
    if warmup:
        return min(decay, (1 + num_updates) / (10 + num_updates))
    return decay


# --- DeepSpeed's layout -----------------------------------------------------------------------------------

def check_supported(optimizer: Any) -> None:
    """Raise when ``optimizer`` is not a DeepSpeed ZeRO-1/2 optimizer exposing the internals the EMA needs."""
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(optimizer, a)]
    try:
        import deepspeed

        version = deepspeed.__version__
    except ImportError:
        version = "not installed"
    if missing:
        raise RuntimeError(
            f"the sharded EMA needs DeepSpeedZeroOptimizer internals {missing}, not found on "
            f"{type(optimizer).__name__} (deepspeed {version}). Supported: deepspeed{SUPPORTED_DEEPSPEED} with "
            "zero_optimization.stage 1 or 2 (pass engine.optimizer); ZeRO-3 and the stage-0 BF16_Optimizer "
            "keep their master weights elsewhere.")
    if version[:1].isdigit() and version.split("+")[0] != SUPPORTED_DEEPSPEED.lstrip("="):
        logger.warning("sharded EMA verified on deepspeed%s, running on %s", SUPPORTED_DEEPSPEED, version)


def _resolve_optimizer(obj: Any) -> Any:
    """Accept the ZeRO optimizer itself, a DeepSpeed engine, or a ShardedEMA."""
    if isinstance(obj, ShardedEMA):
        return obj.optimizer
    if not hasattr(obj, "single_partition_of_fp32_groups") and hasattr(getattr(obj, "optimizer", None),
                                                                       "single_partition_of_fp32_groups"):
        return obj.optimizer  # a DeepSpeedEngine
    return obj


def _dp_group(optimizer: Any, group_index: int) -> Any:
    return optimizer.real_dp_process_group[group_index]


def _dp_rank_and_size(optimizer: Any, group_index: int = 0) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    group = _dp_group(optimizer, group_index)
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _offsets(group: dict) -> list[int]:
    out, offset = [], 0
    for shape, padding in zip(group["shapes"], group["paddings"]):
        out.append(offset)
        offset += _numel(shape) + padding
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def live_layout(optimizer: Any) -> list[dict]:
    """Per parameter group: ordered names, shapes, per-parameter paddings and the partition size, read from the
    live optimizer (the order is DeepSpeed's flattening order, names those of engine.module)."""
    check_supported(optimizer)
    layout = []
    for g, params in enumerate(optimizer.round_robin_bit16_groups):
        try:
            names = [optimizer.param_names[p] for p in params]
        except KeyError as e:
            raise RuntimeError("a parameter held by the optimizer has no name in optimizer.param_names") from e
        # Shapes from DeepSpeed's meta copies where it keeps them (param.data may be swapped out by offload).
        metas = optimizer.round_robin_bit16_meta[g] if hasattr(optimizer, "round_robin_bit16_meta") else params
        paddings = getattr(optimizer, "round_robin_bit16_padding", None)
        group = {"names": names, "shapes": [list(m.shape) for m in metas],
                 "paddings": [int(x) for x in paddings[g]] if paddings is not None else [0] * len(params),
                 "partition_numel": int(optimizer.partition_size[g])}
        _, world = _dp_rank_and_size(optimizer, g)
        offsets = _offsets(group)
        ds_offsets = getattr(optimizer, "round_robin_bit16_offsets", None)
        end = offsets[-1] + _numel(group["shapes"][-1]) if offsets else 0
        if (ds_offsets is not None and [int(o) for o in ds_offsets[g]] != offsets) \
                or optimizer.single_partition_of_fp32_groups[g].numel() != group["partition_numel"] \
                or end > group["partition_numel"] * world:
            raise RuntimeError(f"DeepSpeed's ZeRO flat layout of group {g} is not the one the sharded EMA expects; "
                               f"supported: deepspeed{SUPPORTED_DEEPSPEED}")
        layout.append(group)
    return layout


def _same_params(a: list[dict], b: list[dict]) -> bool:
    return [(g["names"], g["shapes"]) for g in a] == [(g["names"], g["shapes"]) for g in b]


# --- the EMA -------------------------------------------------------------------------------------------------

class ShardedEMA:
    """EMA of this rank's partitions of the fp32 master weights.

    ``optimizer`` is ``engine.optimizer`` (a DeepSpeed engine is accepted too). The EMA starts equal to the
    current master weights and lives on their device.
    """

    def __init__(self, optimizer: Any, *, decay: float = 0.9999, warmup: bool = False, start_step: int = 0) -> None:
        self.optimizer = _resolve_optimizer(optimizer)
        self.layout = live_layout(self.optimizer)
        self.decay, self.warmup, self.start_step = float(decay), bool(warmup), int(start_step)
        self.num_updates = 0
        with torch.no_grad():
            self.partitions = [t.detach().clone() for t in self.optimizer.single_partition_of_fp32_groups]
        self.dp_rank, self.dp_world_size = _dp_rank_and_size(self.optimizer)

    @property
    def masters(self) -> list[torch.Tensor]:
        return list(self.optimizer.single_partition_of_fp32_groups)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.partitions)

    def current_decay(self, step: int) -> float:
        return ema_decay(step, self.num_updates, decay=self.decay, warmup=self.warmup, start_step=self.start_step)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the master weights after optimizer step ``step``. Call it when the step was applied; an
        overflow-skipped step (``optimizer.overflow``) is ignored here as well, so it never counts as an update."""
        if getattr(self.optimizer, "overflow", False):
            logger.debug("step %d was skipped (overflow): EMA not updated", step)
            return
        decay = self.current_decay(step)
        if decay == 0.0:
            torch._foreach_copy_(self.partitions, self.masters)
        else:
            torch._foreach_lerp_(self.partitions, self.masters, 1.0 - decay)
        if step >= self.start_step:
            self.num_updates += 1

    # --- persistence ---

    def state_dict(self) -> dict:
        """This rank's partitions (on CPU) plus the layout needed to merge or re-cut them without DeepSpeed."""
        return {"format": SHARD_FORMAT, "partitions": [t.detach().cpu().clone() for t in self.partitions],
                "num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup,
                "start_step": self.start_step, "dp_rank": self.dp_rank, "dp_world_size": self.dp_world_size,
                "layout": self.layout, "deepspeed_version": _deepspeed_version()}

    def load_state_dict(self, state: dict) -> None:
        """Load partitions made for this very layout (same world size; see ``load_ema_shards`` to re-shard).
        decay / warmup / start_step stay as constructed: they are run settings, not state."""
        if state.get("format") != SHARD_FORMAT:
            raise ValueError(f"not a sharded EMA state (format {state.get('format')!r})")
        if state["dp_world_size"] != self.dp_world_size or state["dp_rank"] != self.dp_rank \
                or state["layout"] != self.layout:
            raise ValueError(f"EMA state of rank {state['dp_rank']}/{state['dp_world_size']} does not match this "
                             f"rank's ZeRO layout ({self.dp_rank}/{self.dp_world_size}); use load_ema_shards")
        with torch.no_grad():
            for dst, src in zip(self.partitions, state["partitions"]):
                dst.copy_(src)
        self.num_updates = int(state["num_updates"])

    # --- full copies ---

    @torch.no_grad()
    def full_state_dict(self, module: Optional[torch.nn.Module] = None) -> Optional[dict[str, torch.Tensor]]:
        """Collective (every rank calls it): the full fp32 EMA on DP rank 0, None elsewhere.

        Without ``module`` the keys are the engine module's parameter names (those the optimizer holds). With
        ``module`` (the engine's module or one of its submodules) the result is keyed like
        ``module.state_dict()`` and complete: EMA weights for the parameters the optimizer trains, the module's own
        values (as fp32 when floating) for frozen parameters and buffers.
        """
        flats = [self._gather_to_rank0(part, g) for g, part in enumerate(self.partitions)]
        if self.dp_rank != 0:
            return None
        by_name = _unflatten(flats, self.layout)
        if module is None:
            return by_name
        names = self.optimizer.param_names
        ema_of = {id(p): by_name[names[p]] for p in module.parameters() if p in names}
        params = dict(module.named_parameters(remove_duplicate=False))
        out = {}
        for key, value in module.state_dict(keep_vars=True).items():
            p = params.get(key)
            if p is not None and id(p) in ema_of:
                out[key] = ema_of[id(p)]
            else:
                value = value.detach()
                out[key] = value.float().cpu() if value.is_floating_point() else value.cpu()
        return out

    @contextmanager
    def swapped_into(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Collective: inside the block every parameter the optimizer trains in ``module`` holds the EMA weights
        (in its own dtype) on every rank; the training weights come back on exit, exactly.

        The module's trained parameters are views into DeepSpeed's flat low-precision buffers, so the EMA is
        all-gathered straight into them: no full fp32 copy, and only this rank's slice is backed up. Whole
        parameter groups are swapped: those holding ``module``'s parameters (the engine's module: all of them;
        its UNet: the UNet's group, while a trained text encoder keeps its training weights)."""
        mine = {id(p) for p in module.parameters()}
        groups = [g for g, params in enumerate(self.optimizer.round_robin_bit16_groups)
                  if any(id(p) in mine for p in params)]
        if not groups:
            raise ValueError("swapped_into needs the engine's module (or a submodule): none of its parameters are "
                             "held by this optimizer")
        shared = [g for g in groups if not all(id(p) in mine for p in self.optimizer.round_robin_bit16_groups[g])]
        if shared:
            raise ValueError(f"swapped_into swaps whole parameter groups, and group(s) {shared} also hold parameters "
                             "outside this module: pass the module that holds them all")
        flats = self.optimizer.bit16_groups_flat
        backups = {g: self._own_slice(flats[g], g).clone() for g in groups}
        try:
            with torch.no_grad():
                for g in groups:
                    self._all_gather_into(flats[g], self.partitions[g], g)
            yield module
        finally:
            with torch.no_grad():
                for g, backup in backups.items():
                    self._all_gather_into(flats[g], backup, g)

    def _gather_to_rank0(self, part: torch.Tensor, g: int) -> Optional[torch.Tensor]:
        """Group g's full flat EMA on CPU of DP rank 0. Sent through the device of DeepSpeed's flat weights (the
        EMA may sit on CPU with optimizer offload, NCCL needs device tensors), in chunks so rank 0 never holds
        more than GATHER_CHUNK_BYTES of it on the device."""
        rank, world = _dp_rank_and_size(self.optimizer, g)
        if world == 1:
            return part.detach().cpu().clone()
        group = _dp_group(self.optimizer, g)
        device = self.optimizer.bit16_groups_flat[g].device
        n = part.numel()
        out = torch.empty(world, n, dtype=part.dtype) if rank == 0 else None
        chunk = max(1, GATHER_CHUNK_BYTES // (world * part.element_size()))
        for start in range(0, n, chunk):
            piece = part[start:start + chunk].to(device)
            gathered = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
            dist.gather(piece, gathered, dst=dist.get_global_rank(group, 0), group=group)
            if rank == 0:
                for r, t in enumerate(gathered):
                    out[r, start:start + t.numel()] = t.cpu()
        return out.view(-1) if rank == 0 else None

    def _own_slice(self, flat: torch.Tensor, g: int) -> torch.Tensor:
        rank, _ = _dp_rank_and_size(self.optimizer, g)
        n = self.layout[g]["partition_numel"]
        return flat.narrow(0, rank * n, n)

    def _all_gather_into(self, flat: torch.Tensor, part: torch.Tensor, g: int) -> None:
        rank, world = _dp_rank_and_size(self.optimizer, g)
        n = self.layout[g]["partition_numel"]
        src = part.to(device=flat.device, dtype=flat.dtype)
        if world == 1:
            flat.narrow(0, 0, n).copy_(src)
            return
        dist.all_gather([flat.narrow(0, r * n, n) for r in range(world)], src, group=_dp_group(self.optimizer, g))


def _deepspeed_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except ImportError:
        return "unknown"


def _unflatten(flat_groups: list[torch.Tensor], layout: list[dict]) -> dict[str, torch.Tensor]:
    """Full flat group vectors → {name: tensor}, each with its own storage (safe to save or load_state_dict)."""
    out: dict[str, torch.Tensor] = {}
    for flat, group in zip(flat_groups, layout):
        for name, shape, offset in zip(group["names"], group["shapes"], _offsets(group)):
            n = _numel(shape)
            if offset + n > flat.numel():
                raise ValueError(f"EMA group holds {flat.numel()} values, {name} needs [{offset}, {offset + n})")
            out[name] = flat.narrow(0, offset, n).view(shape).clone()
    return out


# --- shards on disk ------------------------------------------------------------------------------------------

def shard_path(path_dir: str | Path, rank: int) -> Path:
    return Path(path_dir) / SHARD_FILE.format(rank=rank)


def save_ema_shard(ema: ShardedEMA, path_dir: str | Path, rank: int) -> Path:
    """Write this rank's EMA shard (atomically and durably: a crash or power loss never leaves a truncated shard
    under the final name)."""
    state = ema.state_dict()
    return save_atomic(shard_path(path_dir, rank), lambda tmp: torch.save(state, tmp))


def _load(path: Path) -> dict:
    # mmap: re-sharding reads only the slices it needs from each file.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _read_all(path_dir: Path) -> list[dict]:
    files = {int(m.group(1)): p for p in path_dir.iterdir() if (m := _SHARD_RE.match(p.name))}
    if not files:
        raise FileNotFoundError(f"{path_dir}: no EMA shards (ema_rank_*.pt)")
    states = [_load(files[r]) for r in sorted(files)]
    world = states[0]["dp_world_size"]
    if sorted(files) != list(range(world)) or any(s["dp_rank"] != r for r, s in enumerate(states)):
        raise ValueError(f"{path_dir}: EMA shards for ranks {sorted(files)}, expected 0..{world - 1}")
    if any(s["layout"] != states[0]["layout"] or s["num_updates"] != states[0]["num_updates"] for s in states):
        raise ValueError(f"{path_dir}: EMA shards disagree on layout or update count")
    return states


def consolidate_ema(path_dir: str | Path) -> dict[str, torch.Tensor]:
    """Offline, no torch.distributed: the full fp32 EMA from a checkpoint's per-rank shards, keyed by the engine
    module's parameter names (those the optimizer trained)."""
    states = _read_all(Path(path_dir))
    flats = [torch.cat([s["partitions"][g] for s in states]) for g in range(len(states[0]["layout"]))]
    return _unflatten(flats, states[0]["layout"])


def _read_range(partitions: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) of the concatenation of equal-sized partitions, without building it."""
    size = partitions[0].numel()
    pieces = []
    while length > 0:
        r, off = divmod(start, size)
        n = min(length, size - off)
        pieces.append(partitions[r].narrow(0, off, n))
        start, length = start + n, length - n
    return torch.cat(pieces) if len(pieces) != 1 else pieces[0]


def load_ema_shards(path_dir: str | Path, optimizer: Any, rank: int, world_size: int) -> dict:
    """This rank's EMA state for the current run's layout, ready for ``ShardedEMA.load_state_dict``.

    Shards written with the same world size and layout are loaded as they are. Otherwise (another world size, or
    another ``parameter_alignment``) each parameter is copied from its place in the saved flat groups to its
    place in this run's, the saved padding dropped and the new one zero-filled, and this rank's slice is cut.
    ``optimizer`` is engine.optimizer (an engine or the ShardedEMA itself are accepted); ``rank`` and
    ``world_size`` are the data-parallel ones.
    """
    optimizer = _resolve_optimizer(optimizer)
    path_dir = Path(path_dir)
    layout = live_layout(optimizer)
    own = shard_path(path_dir, rank)
    if own.is_file():
        state = _load(own)
        if state["dp_world_size"] == world_size and state["layout"] == layout:
            state["partitions"] = [t.clone() for t in state["partitions"]]  # detach from the mmap'd file
            return state
    states = _read_all(path_dir)
    saved = states[0]["layout"]
    if not _same_params(saved, layout):
        raise ValueError(f"{path_dir}: the EMA was taken over other parameters (names, shapes or grouping) than "
                         "this model's")
    partitions = []
    for g, (old, new) in enumerate(zip(saved, layout)):
        old_parts = [s["partitions"][g] for s in states]
        n = new["partition_numel"]
        lo, hi = rank * n, (rank + 1) * n
        part = torch.zeros(n, dtype=old_parts[0].dtype)
        for shape, old_off, new_off in zip(new["shapes"], _offsets(old), _offsets(new)):
            a, b = max(lo, new_off), min(hi, new_off + _numel(shape))
            if a < b:
                part[a - lo:b - lo] = _read_range(old_parts, old_off + (a - new_off), b - a)
        partitions.append(part)
    logger.info("EMA re-sharded from %d to %d ranks", states[0]["dp_world_size"], world_size)
    return {**{k: v for k, v in states[0].items() if k != "partitions"}, "partitions": partitions,
            "dp_rank": rank, "dp_world_size": world_size, "layout": layout}

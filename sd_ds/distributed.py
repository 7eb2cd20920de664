"""Everything that knows about ranks, devices and the DeepSpeed engine's configuration.

The JSON files in ``ds_configs/`` carry engine settings only (ZeRO stage, offload, loss-scale policy).
Batch sizes, accumulation, clipping, precision and the optimizer are written here from the trainer's flags,
so each is stated once; a user JSON that sets one of them to a different value is an error.
"""

from __future__ import annotations

import datetime
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from sd_ds.config import TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
# Rank 0 may spend minutes generating sample images while the others wait at a barrier.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


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
    backend = accelerator.communication_backend_name()
    if accelerator.device_name() == "cpu":
        backend = "gloo"  # the ccl backend needs oneCCL; gloo is always there
    deepspeed.init_distributed(dist_backend=backend, timeout=COLLECTIVE_TIMEOUT)
    local_rank = int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small float tensor (for logging)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's seed: different across ranks, reproducible for the same (seed, rank)."""
    return seed * 1000003 + rank


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- DeepSpeed configuration -------------------------------------------------------------------

def default_ds_config_path(cfg: TrainConfig) -> Path:
    name = {"bf16": "zero2_bf16.json", "fp16": "zero2_fp16.json", "fp32": "zero2_fp32.json"}[cfg.precision]
    return DS_CONFIG_DIR / name


def resolve_ds_config_path(cfg: TrainConfig) -> Path:
    path = cfg.optim.deepspeed or os.environ.get("DS_CONFIG") or default_ds_config_path(cfg)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (from --deepspeed or DS_CONFIG)")
    return path


def _check_no_conflict(user: dict, key_path: tuple[str, ...], value: Any, source: Path) -> None:
    node: Any = user
    for k in key_path:
        if not isinstance(node, dict) or k not in node:
            return
        node = node[k]
    if node == "auto" or node == value:
        return
    raise ValueError(
        f"{source}: '{'.'.join(key_path)}' is {node!r} but the trainer's flags give {value!r}. Batch sizes, "
        "accumulation, clipping, precision and the optimizer are set by flags (--per_device_train_batch_size, "
        "--gradient_accumulation_steps, --max_grad_norm, --bf16/--fp16, --learning_rate, ...); remove the key "
        "from the JSON or make it agree.")


def build_deepspeed_config(cfg: TrainConfig, world_size: int, *, load_universal: bool = False,
                           device_type: str = "cuda") -> dict:
    """The engine config: the user's JSON (engine settings) plus everything derived from the flags."""
    source = resolve_ds_config_path(cfg)
    user = json.loads(source.read_text())
    o = cfg.optim
    clip = o.max_grad_norm if o.max_grad_norm > 0 else 0.0
    derived_scalars = {
        ("train_micro_batch_size_per_gpu",): cfg.micro_batch_size,
        ("gradient_accumulation_steps",): o.gradient_accumulation_steps,
        ("train_batch_size",): cfg.global_batch_size(world_size),
        ("gradient_clipping",): clip,
        ("bf16", "enabled"): cfg.precision == "bf16",
        ("fp16", "enabled"): cfg.precision == "fp16",
    }
    for key_path, value in derived_scalars.items():
        _check_no_conflict(user, key_path, value, source)
    for owned in ("optimizer", "scheduler"):
        if owned in user:
            raise ValueError(
                f"{source}: remove the '{owned}' section; the optimizer (fused AdamW) and the learning-rate schedule "
                "come from the trainer's flags (--learning_rate, --adam_*, --weight_decay, --lr_scheduler_type, ...)")

    ds = dict(user)
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = o.gradient_accumulation_steps
    ds["train_batch_size"] = cfg.global_batch_size(world_size)
    ds["gradient_clipping"] = clip
    ds["bf16"] = {**user.get("bf16", {}), "enabled": cfg.precision == "bf16"}
    if cfg.precision == "bf16":
        # A step whose gradients hold inf/nan is skipped (and counted) instead of poisoning the weights.
        ds["bf16"].setdefault("check_grad_overflow", True)
    ds["fp16"] = {**user.get("fp16", {}), "enabled": cfg.precision == "fp16"}
    if cfg.precision != "fp32":
        # Accumulate micro-batch gradients in fp32: bf16 sums lose low bits after a few additions.
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    ds["optimizer"] = {
        # DeepSpeed's FusedAdam with adam_w_mode (fused multi-tensor kernel on GPU, a JIT-built op on CPU).
        "type": "AdamW",
        "params": {
            "lr": o.unet_learning_rate or o.learning_rate,
            "betas": [o.adam_beta1, o.adam_beta2],
            "eps": o.adam_epsilon,
            "weight_decay": o.weight_decay,
        },
    }
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if device_type == "cpu" and not offload:
        # CPU ranks: torch's fused AdamW. DeepSpeed's CPU Adam op keeps beta^step as a running float product that
        # a resume recomputes with pow(), so a resumed run drifts from the uninterrupted one by rounding; torch
        # derives the bias correction from the step count every step (as DeepSpeed's CUDA FusedAdam does), and
        # needs no JIT-built op.
        ds["optimizer"]["params"].update({"torch_adam": True, "fused": True})
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs for itself
    ds.setdefault("wall_clock_breakdown", False)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2):
        raise ValueError(f"{source}: zero_optimization.stage must be 1 or 2 (sd-ds keeps its EMA on ZeRO-1/2 partitions)")
    return ds


def initialize_engine(module: torch.nn.Module, param_groups: list[dict], ds_config: dict,
                      lr_scheduler_fn: Any) -> Any:
    """deepspeed.initialize with our optimizer param groups and a callable LR scheduler."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups, config=ds_config, lr_scheduler=lr_scheduler_fn)
    return engine


def device_memory_stats(device: torch.device) -> Optional[dict[str, float]]:
    if device.type != "cuda":
        return None
    return {
        "memory/allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
        "memory/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        "memory/reserved_gb": torch.cuda.memory_reserved(device) / 2**30,
    }

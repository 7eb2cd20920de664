"""The DeepSpeed engine and what it trains: the objective module, parameter groups, LR schedule, the
engine config derived from flags, the sharded EMA on its partitions, and the frozen encoders' step.

The JSON files in ``ds_configs/`` carry engine settings only (ZeRO stage, offload, loss-scale policy).
Batch sizes, accumulation, clipping, precision and the optimizer are written here from the trainer's flags
(``derived_settings``: one table both checks a user JSON against and fills in), so each is stated once.
Model and loss code (``sd_ds.models``, ``sd_ds.diffusion``) never import DeepSpeed; this module does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from sd_ds.config import TrainConfig
from sd_ds.diffusion import training_loss

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from diffusers import DDPMScheduler

    from sd_ds.distributed import DistInfo
    from sd_ds.ema import ShardedEMA
    from sd_ds.models import Components

# The default engine settings, package data (an installed package has no checkout): copies of the user-facing
# examples in ds_configs/, kept equal by tests/test_packaging.py.
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"
# ZeRO-2 gradient buckets, in elements. DeepSpeed's default (5e8) allocates 1 GB bf16 buffers per bucket (two
# with overlap_comm), sized for LLMs; the SD v1 UNet (860 M parameters) reduces in ~5 buckets of 2e8, few
# enough collectives to stay bandwidth-bound, and the buffers stay at 400 MB.
BUCKET_ELEMENTS = 200_000_000


def weight_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


class DiffusionModule(torch.nn.Module):
    """What the DeepSpeed engine owns: the UNet, plus the text encoder when it is trained too.

    Its forward is the whole training objective, so the engine's bf16 casting, activation checkpointing and
    gradient partitioning cover exactly the trained weights; the frozen VAE/text encoder stay outside.
    """

    def __init__(self, unet: torch.nn.Module, text_encoder: Optional[torch.nn.Module],
                 noise_scheduler: "DDPMScheduler", cfg: TrainConfig) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        self.prediction_type = cfg.model.prediction_type or noise_scheduler.config.prediction_type
        self.diffusion = cfg.diffusion
        # ZeRO re-points every weight at a view of its flat (NCHW-contiguous) buffer, so channels-last can only be
        # the activations' layout: cuDNN then runs NHWC kernels, converting the weights as it reads them.
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

    def forward(self, latents: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
                input_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.text_encoder is not None:
            encoder_hidden_states = self.text_encoder(input_ids)[0]
        latents = latents.contiguous(memory_format=self.memory_format)
        return training_loss(
            self.unet, latents, encoder_hidden_states, self.noise_scheduler,
            prediction_type=self.prediction_type, noise_offset=self.diffusion.noise_offset,
            input_perturbation=self.diffusion.input_perturbation, snr_gamma=self.diffusion.snr_gamma,
            generator=generator)


@torch.no_grad()
def encode_batch(batch: dict, components: "Components", *, train_text_encoder: bool, device: torch.device,
                 dtype: torch.dtype, generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The frozen encoders' part of a step → (scaled latents [B,4,h,w], CLIP hidden states [B,L,D] or None when
    the text encoder is trained, token ids [B,L] on the device).

    Pixels travel host→device as uint8 (a quarter of fp32's bytes) and are normalised on the device; latent
    shards carry the VAE posterior's moments instead. Either way a fresh latent is drawn from the moments with
    the run's generator (``sample_latents``: one code path for both)."""
    from sd_ds.encode_latents import encode_moments, sample_latents

    input_ids = batch["input_ids"].to(device, non_blocking=True)
    vae = components.vae
    if "latent_moments" in batch:
        moments = batch["latent_moments"].to(device, non_blocking=True)
    else:
        moments = encode_moments(vae, batch["pixel_values"].to(device, non_blocking=True))
    latents = sample_latents(moments, generator, vae.config.scaling_factor).to(dtype)
    hidden = None if train_text_encoder else components.text_encoder(input_ids)[0]
    return latents, hidden, input_ids


def param_groups(cfg: TrainConfig, module: DiffusionModule) -> list[dict]:
    optim = cfg.optim
    groups = [{"params": [p for p in module.unet.parameters() if p.requires_grad], "name": "unet",
               "lr": optim.unet_learning_rate or optim.learning_rate}]
    if module.text_encoder is not None:
        groups.append({"params": [p for p in module.text_encoder.parameters() if p.requires_grad],
                       "name": "text_encoder", "lr": optim.text_encoder_learning_rate or optim.learning_rate})
    return groups


def lr_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.optim.lr_scheduler_type, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                         num_training_steps=cfg.max_steps)


# --- DeepSpeed configuration ---------------------------------------------------------------------------

def default_ds_config_path(cfg: TrainConfig) -> Path:
    name = {"bf16": "zero2_bf16.json", "fp16": "zero2_fp16.json", "fp32": "zero2_fp32.json"}[cfg.precision]
    return DS_CONFIG_DIR / name


def resolve_ds_config_path(cfg: TrainConfig) -> Path:
    path = Path(cfg.optim.deepspeed or os.environ.get("DS_CONFIG") or default_ds_config_path(cfg))
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (from --deepspeed or DS_CONFIG)")
    return path


def derived_settings(cfg: TrainConfig, world_size: int) -> dict[tuple[str, ...], Any]:
    """Every engine value that a flag decides, by its key path in the DeepSpeed config."""
    optim = cfg.optim
    return {
        ("train_micro_batch_size_per_gpu",): cfg.micro_batch_size,
        ("gradient_accumulation_steps",): optim.gradient_accumulation_steps,
        ("train_batch_size",): cfg.global_batch_size(world_size),
        ("gradient_clipping",): optim.max_grad_norm if optim.max_grad_norm > 0 else 0.0,
        ("bf16", "enabled"): cfg.precision == "bf16",
        ("fp16", "enabled"): cfg.precision == "fp16",
    }


def _get(tree: dict, key_path: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in key_path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(tree: dict, key_path: tuple[str, ...], value: Any) -> None:
    for key in key_path[:-1]:
        tree = tree.setdefault(key, {})
    tree[key_path[-1]] = value


def build_deepspeed_config(cfg: TrainConfig, world_size: int, *, load_universal: bool = False,
                           device_type: str = "cuda") -> dict:
    """The engine config: the user's JSON (engine settings) plus everything derived from the flags."""
    source = resolve_ds_config_path(cfg)
    user = json.loads(source.read_text())
    for owned in ("optimizer", "scheduler"):
        if owned in user:
            raise ValueError(
                f"{source}: remove the '{owned}' section; the optimizer (fused AdamW) and the learning-rate schedule "
                "come from the trainer's flags (--learning_rate, --adam_*, --weight_decay, --lr_scheduler_type, ...)")
    zero = user.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2):
        raise ValueError(f"{source}: zero_optimization.stage must be 1 or 2 (sd-ds keeps its EMA on ZeRO-1/2 partitions)")

    ds = json.loads(json.dumps(user))  # a deep copy: the table below writes into nested sections
    for key_path, value in derived_settings(cfg, world_size).items():
        given = _get(user, key_path)
        if given is not None and given != "auto" and given != value:
            raise ValueError(
                f"{source}: '{'.'.join(key_path)}' is {given!r} but the trainer's flags give {value!r}. Batch "
                "sizes, accumulation, clipping, precision and the optimizer are set by flags "
                "(--per_device_train_batch_size, --gradient_accumulation_steps, --max_grad_norm, --bf16/--fp16, "
                "--learning_rate, ...); remove the key from the JSON or make it agree.")
        _set(ds, key_path, value)

    optim = cfg.optim
    if cfg.precision == "bf16":
        # A step whose gradients hold inf/nan is skipped (and counted) instead of poisoning the weights.
        ds["bf16"].setdefault("check_grad_overflow", True)
    if cfg.precision != "fp32" and optim.gradient_accumulation_steps > 1:
        # Accumulate micro-batch gradients in fp32: bf16 sums lose low bits after a few additions. With one
        # micro batch per step there is nothing to accumulate, and the fp32 buffer would cost 4 bytes/parameter.
        ds.setdefault("data_types", {})["grad_accum_dtype"] = "fp32"
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": optim.unet_learning_rate or optim.learning_rate,
        "betas": [optim.adam_beta1, optim.adam_beta2],
        "eps": optim.adam_epsilon,
        "weight_decay": optim.weight_decay,
    }}
    zero_out = ds.setdefault("zero_optimization", {})
    offload = zero_out.get("offload_optimizer", {}).get("device", "none") != "none"
    if not offload:
        # torch's fused AdamW (one multi-tensor kernel per group) on every device. DeepSpeed's FusedAdam builds a
        # CUDA op with nvcc at start-up, which fails without a CUDA toolkit matching torch (most pip installs)
        # and costs minutes where it works; its CPU Adam op keeps beta^step as a running float product that a
        # resume recomputes with pow(), so a resumed run drifts. torch derives the bias correction from the step
        # count, so a resume is exact. (Offload keeps DeepSpeedCPUAdam: the update runs on the CPU partitions.)
        ds["optimizer"]["params"].update({"torch_adam": True, "fused": True})
    if world_size == 1:
        # Nothing to overlap with one rank: the second gradient buffer and the side stream are pure cost.
        zero_out["overlap_comm"] = False
    zero_out.setdefault("reduce_bucket_size", BUCKET_ELEMENTS)
    zero_out.setdefault("allgather_bucket_size", BUCKET_ELEMENTS)
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs for itself
    ds.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer is on by default and brackets every step with accelerator.synchronize() (in
    # forward and in step): two host stalls per step on CUDA that only feed its own steps_per_print log line,
    # which the trainer does not use (it times steps itself from host clocks over logging windows).
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    del device_type  # the same optimizer on every device now; kept for callers that pass it
    return ds


def build_engine(cfg: TrainConfig, components: "Components", dist_info: "DistInfo", *,
                 load_universal: bool = False) -> "DeepSpeedEngine":
    """deepspeed.initialize on the trained module, with our param groups, LR schedule and derived config."""
    import deepspeed

    # The noise schedule on the device once: sd_ds.diffusion indexes it by the timesteps' device, which would
    # otherwise copy it host→device several times a step.
    scheduler = components.noise_scheduler
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(dist_info.device)
    trained_text_encoder = components.text_encoder if cfg.model.train_text_encoder else None
    module = DiffusionModule(components.unet, trained_text_encoder, components.noise_scheduler, cfg)
    ds_config = build_deepspeed_config(cfg, dist_info.world_size, load_universal=load_universal,
                                       device_type=dist_info.device.type)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups(cfg, module),
                                           config=ds_config, lr_scheduler=lambda opt: lr_schedule(cfg, opt))
    streamline_zero_optimizer(engine.optimizer)
    return engine


# What streamline_zero_optimizer replaces or reads on DeepSpeed's ZeRO-1/2 optimizer (requirements.txt pins it).
TESTED_DEEPSPEED = "0.19.8"
STREAMLINED_METHODS = ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct", "unscale_and_clip_grads",
                       "_update_model_bit16_weights", "step", "allreduce_and_copy_with_multiple_ranks",
                       "allreduce_bucket", "_add_to_grad_partition_buffer")
STREAMLINED_ATTRIBUTES = ("averaged_gradients", "dp_process_group", "clip_grad", "loss_scale", "device",
                          "overlap_comm", "unflatten")


def streamline_zero_optimizer(optimizer: Any) -> bool:
    """Replace three per-tensor loops of DeepSpeed's ZeRO-1/2 optimizer with multi-tensor (foreach) ops.

    DeepSpeed checks each gradient tensor for inf/nan (6 ops each), takes each one's norm (7 ops each) and then
    tests the clip norm's validity with a host read: ~15,000 kernel launches per step for the SD v1 UNet's 686
    tensors, 50-100 ms of launch overhead on a GPU (BENCHMARKS.md section 6). Here each becomes one
    ``torch._foreach_norm`` over the partition's gradients: a tensor's norm is non-finite exactly when it holds
    an inf or nan, so the same norms answer both questions. Behaviour is unchanged: a step with non-finite
    gradients is still detected, skipped and counted, clipping uses the same global L2 norm (per-tensor norms
    in fp32 instead of fp64, summed in fp64), and the clip factor is computed on the device without a host read.
    Returns False (and changes nothing) for an optimizer this does not recognise, e.g. with CPU offload; raises
    when DeepSpeed's ZeRO optimizer lacks a method or attribute this relies on (another DeepSpeed version)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload or optimizer.has_moe_layers:
        return False
    # Each replacement relies on DeepSpeed's step() calling these by name with these meanings (checked against
    # 0.19.8, the pinned version). A DeepSpeed that renamed one would silently keep its slow path (or skip the
    # replaced clipping): refuse to train instead.
    missing = [name for name in STREAMLINED_METHODS if not callable(getattr(type(optimizer), name, None))]
    missing += [name for name in STREAMLINED_ATTRIBUTES if not hasattr(optimizer, name)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"sd_ds.engine.streamline_zero_optimizer: DeepSpeedZeroOptimizer has no {missing} in deepspeed "
            f"{deepspeed.__version__}; sd-ds's ZeRO step is written against deepspeed=={TESTED_DEEPSPEED} "
            f"(`pip install deepspeed=={TESTED_DEEPSPEED}`, as requirements.txt pins)")

    def grad_norms(gradients: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        present = [g for g in gradients if g is not None]
        if not present:
            return None
        return torch.stack(torch._foreach_norm(present, 2, dtype=torch.float32))

    def has_overflow_partitioned_grads_serial() -> torch.Tensor:
        flags = [torch.zeros(1, dtype=torch.bool, device=optimizer.device)]
        for gradients in optimizer.averaged_gradients.values():
            norms = grad_norms(gradients)
            if norms is not None:
                flags.append(~torch.isfinite(norms).all().reshape(1))
        return torch.stack(flags).any().reshape(1)

    def get_grad_norm_direct(gradients: list[torch.Tensor], params: list[torch.Tensor], norm_type: float = 2) -> torch.Tensor:
        assert float(norm_type) == 2.0, "sd-ds clips by the global L2 norm"
        norms = grad_norms(gradients)  # zero paddings add nothing to an L2 norm
        total = (norms.double().pow(2).sum().float() if norms is not None
                 else torch.zeros((), dtype=torch.float32, device=optimizer.device))
        from deepspeed import comm as ds_dist

        ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        total = total.sqrt()
        # DeepSpeed's -1 sentinel for an invalid norm, with a Python scalar: its mask_nan_or_inf_with_val_inplace
        # fills from a device tensor, which on CUDA is a host-to-device copy plus a read back (2 syncs a step,
        # seen in the H200 trace, BENCHMARKS section 5).
        return total.masked_fill_(~torch.isfinite(total), -1.0)

    def unscale_and_clip_grads(grad_groups_flat: list[Any], total_norm: torch.Tensor) -> None:
        if optimizer.clip_grad == 0.0 and optimizer.loss_scale == 1.0:
            return
        combined_scale: Any = optimizer.loss_scale
        if optimizer.clip_grad > 0.0:
            # DeepSpeed's rule (an invalid norm clips nothing), as a device-side select instead of a host read.
            valid = torch.isfinite(total_norm) & (total_norm >= 0)
            clip_norm = torch.where(valid, total_norm, torch.full_like(total_norm, float("inf")))
            clip = torch.clamp(((clip_norm / optimizer.loss_scale) + 1e-6) / optimizer.clip_grad, min=1.0)
            combined_scale = clip * optimizer.loss_scale
        for grad in grad_groups_flat:
            for g in grad if isinstance(grad, list) else [grad]:
                g.data.mul_(1.0 / combined_scale)

    # step() ends by re-pointing every parameter at its view of the flat bf16 buffer ("TODO: we probably don't
    # need this? just to be safe" in DeepSpeed): 3 ops a tensor. The parameters are those views since init and
    # the all-gather writes into the buffer in place, so inside step() it is skipped; the checkpoint-load paths,
    # which do need it, still run it.
    original_step, original_update = optimizer.step, optimizer._update_model_bit16_weights
    in_step = [False]

    def update_model_bit16_weights(group_index: int) -> None:
        if not in_step[0]:
            original_update(group_index)

    def step(*args: Any, **kwargs: Any) -> Any:
        in_step[0] = True
        try:
            return original_step(*args, **kwargs)
        finally:
            in_step[0] = False

    # Gradient reduction. With reduce_scatter on, DeepSpeed slices each backward bucket by the rank that owns each
    # piece (ZeRO-2 partitions) and then, by default (use_multi_rank_bucket_allreduce), all-reduces the whole
    # bucket so that every rank receives every slice and keeps its own: 2(n-1)/n x the gradient bytes on the wire
    # per rank, where a reduce-scatter needs (n-1)/n x (BENCHMARKS.md section 13). Its alternative path (one
    # reduce per owner) synchronises the whole device before each reduce when overlap_comm is on. Here each
    # bucket's slices are grouped by owner and reduced to it: one flat `reduce` per owner (a bucket spans 1-3 of
    # the contiguous partitions), each queued on the current (reduction) stream without a host sync; only the
    # owner copies the result back, exactly where DeepSpeed's all-reduce path copied it.
    original_multi_rank = optimizer.allreduce_and_copy_with_multiple_ranks

    def reduce_to_owners(small_bucket: list[torch.Tensor], communication_data_type: torch.dtype, log: Any = None,
                         divide: bool = True, process_group: Any = None, bucket_ranks: Optional[list] = None,
                         output_bucket: Optional[list] = None) -> None:
        owners = [next(iter(r)) if isinstance(r, frozenset) and len(r) == 1 else r for r in bucket_ranks or []]
        if len(owners) != len(small_bucket) or not all(isinstance(o, int) for o in owners):
            # a slice several ranks consume (DeepSpeed's Muon split matrices): its all-reduce path
            return original_multi_rank(small_bucket, communication_data_type, log=log, divide=divide,
                                       process_group=process_group, bucket_ranks=bucket_ranks,
                                       output_bucket=output_bucket)
        from deepspeed import comm as ds_dist
        from deepspeed.accelerator import get_accelerator

        process_group = optimizer.dp_process_group if process_group is None else process_group
        local_rank = ds_dist.get_rank(group=process_group)
        outputs = output_bucket if output_bucket is not None else [None] * len(small_bucket)
        by_owner: dict[int, list[int]] = {}
        for index, owner in enumerate(owners):
            by_owner.setdefault(owner, []).append(index)
        record = optimizer.overlap_comm and not get_accelerator().resolves_data_dependency()
        for owner, indices in by_owner.items():
            grads = [small_bucket[i] for i in indices]
            # flatten → (dtype cast) → divide → dist.reduce to the owner; the owner gets the cast-back sum
            reduced = optimizer.allreduce_bucket(grads, communication_data_type, rank=owner, divide=divide,
                                                 process_group=process_group)
            if record:
                reduced.record_stream(optimizer.reduction_stream)
            if owner != local_rank:
                continue
            for i, synced in zip(indices, optimizer.unflatten(reduced, grads)):
                optimizer._add_to_grad_partition_buffer(outputs[i], synced)
                small_bucket[i].copy_(synced)
                if record:
                    small_bucket[i].record_stream(optimizer.reduction_stream)

    optimizer.allreduce_and_copy_with_multiple_ranks = reduce_to_owners
    optimizer.has_overflow_partitioned_grads_serial = has_overflow_partitioned_grads_serial
    optimizer.get_grad_norm_direct = get_grad_norm_direct
    optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    optimizer._update_model_bit16_weights = update_model_bit16_weights
    optimizer.step = step
    return True


def build_ema(cfg: TrainConfig, engine: "DeepSpeedEngine") -> Optional["ShardedEMA"]:
    if not cfg.ema.use_ema:
        return None
    from sd_ds.ema import ShardedEMA

    return ShardedEMA(engine, decay=cfg.ema.ema_decay, warmup=cfg.ema.ema_warmup, start_step=cfg.ema.ema_start_step)


def group_lrs(engine: "DeepSpeedEngine") -> dict[str, float]:
    return {group.get("name", str(i)): group["lr"] for i, group in enumerate(engine.optimizer.param_groups)}


def grad_norm(engine: "DeepSpeedEngine") -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)

"""The DeepSpeed engine and what it trains: the objective module, parameter groups, LR schedule, the
engine config derived from flags, the sharded EMA on its partitions, the frozen encoders' step, and the weights
the periodic tasks evaluate with (``evaluation_unet``, ``conditioning_text_encoders``).

The JSON files in ``ds_configs/`` carry engine settings only (ZeRO stage, offload, loss-scale policy).
Batch sizes, accumulation, clipping, precision and the optimizer are written here from the trainer's flags
(``derived_settings``: one table both checks a user JSON against and fills in), so each is stated once.
Model and loss code (``sd_ds.models``, ``sd_ds.diffusion``) never import DeepSpeed; this module does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from sd_ds.conditioning import (EMPTY_CAPTION_KEY, GEOMETRY_KEYS, STORED_KEYS, TOKEN_KEYS, Conditioning,
                                PromptEncoder, dump_conditioning)
from sd_ds.config import TrainConfig
from sd_ds.deepspeed_config import DeepSpeedConfigError, check_with_deepspeed, read_deepspeed_json
from sd_ds.diffusion import training_loss
from sd_ds.distributed import DistInfo
from sd_ds.ema import ShardedEMA
from sd_ds.latents import encode_moments, sample_latents
from sd_ds.models import Components
from sd_ds.zero_step import streamline_zero_optimizer

if TYPE_CHECKING:  # deepspeed and diffusers are imported where used: seconds that `--help` does not need
    from deepspeed import DeepSpeedEngine
    from diffusers import DDPMScheduler


# The default engine settings, package data (an installed package has no checkout): copies of the user-facing
# examples in ds_configs/, kept equal by tests/test_packaging.py.
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"
# ZeRO-2 gradient buckets, in elements. DeepSpeed's default (5e8) allocates 1 GB bf16 buffers per bucket (two
# with overlap_comm), sized for LLMs; the SD v1 UNet (860 M parameters) reduces in ~5 buckets of 2e8, few
# enough collectives to stay bandwidth-bound, and the buffers stay at 400 MB.
BUCKET_ELEMENTS = 200_000_000


def weight_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def vae_dtype(vae: Any, dtype: torch.dtype) -> torch.dtype:
    """The frozen VAE's dtype in a run of ``dtype``: float32 in an fp16 run when its config says fp16 overflows it
    (``force_upcast``: SDXL's VAE gives NaNs in fp16, as diffusers' pipelines know), else the run's. bf16 has fp32's
    range: never upcast."""
    return torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype


@dataclasses.dataclass
class TextInputs:
    """What trained text encoders read inside the engine's forward (--train_text_encoder): the batch's token ids
    (and empty-caption flags) and, for SDXL, its micro-conditioning geometry."""

    tokens: dict[str, torch.Tensor]
    geometry: dict[str, torch.Tensor]


class DiffusionModule(torch.nn.Module):
    """What the DeepSpeed engine owns: the UNet, plus the text encoder(s) when they are trained too
    (``text_encoder``, and SDXL's ``text_encoder_2``: parameter names as in the diffusers folder).

    Its forward is the whole training objective, so the engine's bf16 casting, activation checkpointing and
    gradient partitioning cover exactly the trained weights; the frozen VAE/text encoders stay outside.
    """

    def __init__(self, unet: torch.nn.Module, trained_text_encoders: list[torch.nn.Module],
                 prompt_encoder: PromptEncoder, noise_scheduler: "DDPMScheduler", cfg: TrainConfig) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = trained_text_encoders[0] if trained_text_encoders else None
        self.text_encoder_2 = trained_text_encoders[1] if len(trained_text_encoders) > 1 else None
        self.prompt_encoder = prompt_encoder  # a plain object: its frozen encoders are not the engine's parameters
        self.noise_scheduler = noise_scheduler
        self.prediction_type = cfg.model.prediction_type or noise_scheduler.config.prediction_type
        self.diffusion = cfg.diffusion
        # ZeRO re-points every weight at a view of its flat (NCHW-contiguous) buffer, so channels-last can only be
        # the activations' layout: cuDNN then runs NHWC kernels, converting the weights as it reads them. It holds
        # inside --torch_compile's regions only (eager GroupNorm on CUDA is NCHW: sd_ds.memory_format).
        self.memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format

    @property
    def trained_text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def forward(self, latents: torch.Tensor, conditioning: "Conditioning | TextInputs",
                generator: torch.Generator) -> torch.Tensor:
        if isinstance(conditioning, TextInputs):
            conditioning = self.prompt_encoder.encode(conditioning.tokens, conditioning.geometry,
                                                      text_encoders=self.trained_text_encoders)
        latents = latents.contiguous(memory_format=self.memory_format)
        return training_loss(
            self.unet, latents, conditioning.encoder_hidden_states, self.noise_scheduler,
            prediction_type=self.prediction_type, noise_offset=self.diffusion.noise_offset,
            input_perturbation=self.diffusion.input_perturbation, snr_gamma=self.diffusion.snr_gamma,
            generator=generator, added_cond_kwargs=conditioning.added_cond_kwargs)


@torch.no_grad()
def encode_batch(batch: dict, components: "Components", prompt_encoder: PromptEncoder, *, train_text_encoder: bool,
                 device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator) -> tuple[torch.Tensor, "Conditioning | TextInputs"]:
    """The frozen encoders' part of a step → (scaled latents [B,4,h,w], the UNet's conditioning, or the text inputs
    the engine's trained text encoders read).

    Pixels travel host→device as uint8 (a quarter of fp32's bytes) and are normalised on the device; latent
    shards carry the VAE posterior's moments instead. Either way a fresh latent is drawn from the moments with
    the run's generator (``sample_latents``: one code path for both). Latent shards encoded with --text_embeddings
    carry the text conditioning too (``PromptEncoder.stored``): the text encoders do not run."""
    tokens = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in TOKEN_KEYS or k == EMPTY_CAPTION_KEY}
    geometry = {k: batch[k].to(device, non_blocking=True) for k in GEOMETRY_KEYS if k in batch}
    vae = components.vae
    if "latent_moments" in batch:
        moments = batch["latent_moments"].to(device, non_blocking=True)
    else:
        moments = encode_moments(vae, batch["pixel_values"].to(device, non_blocking=True))
    latents = sample_latents(moments, generator, vae.config.scaling_factor).to(dtype)
    if STORED_KEYS[0] in batch:  # the trainer refuses --train_text_encoder on these shards
        stored = {k: batch[k].to(device, non_blocking=True) for k in STORED_KEYS if k in batch}
        return latents, prompt_encoder.stored(stored, geometry).to(dtype)
    if train_text_encoder:
        return latents, TextInputs(tokens, geometry)
    conditioning = prompt_encoder.encode(tokens, geometry)
    dump_conditioning(batch, conditioning, latents)  # a test hook (SD_DS_CONDITIONING_DUMP); off by default
    return latents, conditioning


def param_groups(cfg: TrainConfig, module: DiffusionModule) -> list[dict]:
    optim = cfg.optim
    groups = [{"params": [p for p in module.unet.parameters() if p.requires_grad], "name": "unet",
               "lr": optim.unet_learning_rate or optim.learning_rate}]
    if module.text_encoder is not None:
        groups.append({"params": [p for p in module.text_encoder.parameters() if p.requires_grad],
                       "name": "text_encoder", "lr": optim.text_encoder_learning_rate or optim.learning_rate})
    if module.text_encoder_2 is not None:  # SDXL's OpenCLIP-bigG: a learning rate of its own
        groups.append({"params": [p for p in module.text_encoder_2.parameters() if p.requires_grad],
                       "name": "text_encoder_2", "lr": (optim.text_encoder_2_learning_rate
                                                        or optim.text_encoder_learning_rate or optim.learning_rate)})
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
    user = read_deepspeed_json(source)
    for owned in ("optimizer", "scheduler"):
        if owned in user:
            raise DeepSpeedConfigError(
                f"{source}: remove the '{owned}' section; the optimizer (fused AdamW) and the learning-rate schedule "
                "come from the trainer's flags (--learning_rate, --adam_*, --weight_decay, --lr_scheduler_type, ...)")
    zero = user.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2):
        raise DeepSpeedConfigError(f"{source}: zero_optimization.stage must be 1 or 2 (sd-ds keeps its EMA on ZeRO-1/2 partitions)")

    ds = json.loads(json.dumps(user))  # a deep copy: the table below writes into nested sections
    for key_path, value in derived_settings(cfg, world_size).items():
        given = _get(user, key_path)
        if given is not None and given != "auto" and given != value:
            raise DeepSpeedConfigError(
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


def check_deepspeed_config(cfg: TrainConfig, world_size: int) -> list[str]:
    """The engine config of this run, built and validated by DeepSpeed's own parser before any model loads.
    Raises ``DeepSpeedConfigError`` (one line naming the file) for a file that is missing, not JSON, or refused;
    returns warnings for top-level keys DeepSpeed does not read (``sd_ds.deepspeed_config``)."""
    try:
        source = resolve_ds_config_path(cfg)
    except FileNotFoundError as e:
        raise DeepSpeedConfigError(str(e)) from None
    ds = build_deepspeed_config(cfg, world_size)
    # The global batch was checked against the flags above; DeepSpeed's parser derives it from the process
    # group it finds (none before init_distributed: world size 1), so it is left for it to derive.
    del ds["train_batch_size"]
    return check_with_deepspeed(ds, source, user_keys=set(read_deepspeed_json(source)))


def build_engine(cfg: TrainConfig, components: "Components", dist_info: "DistInfo", *,
                 load_universal: bool = False) -> "DeepSpeedEngine":
    """deepspeed.initialize on the trained module, with our param groups, LR schedule and derived config."""
    import deepspeed

    # The noise schedule on the device once: sd_ds.diffusion indexes it by the timesteps' device, which would
    # otherwise copy it host→device several times a step.
    scheduler = components.noise_scheduler
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(dist_info.device)
    trained = components.text_encoders if cfg.model.train_text_encoder else []
    prompt_encoder = PromptEncoder.for_components(components, cfg.model.model_max_length)
    module = DiffusionModule(components.unet, trained, prompt_encoder, components.noise_scheduler, cfg)
    ds_config = build_deepspeed_config(cfg, dist_info.world_size, load_universal=load_universal,
                                       device_type=dist_info.device.type)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups(cfg, module),
                                           config=ds_config, lr_scheduler=lambda opt: lr_schedule(cfg, opt))
    streamline_zero_optimizer(engine.optimizer)  # sd_ds.zero_step: the multi-tensor, sync-free ZeRO step
    return engine


def build_ema(cfg: TrainConfig, engine: "DeepSpeedEngine") -> Optional["ShardedEMA"]:
    if not cfg.ema.use_ema:
        return None
    return ShardedEMA(engine, decay=cfg.ema.ema_decay, warmup=cfg.ema.ema_warmup, start_step=cfg.ema.ema_start_step)


def conditioning_text_encoders(engine: "DeepSpeedEngine", components: Components) -> list[torch.nn.Module]:
    """The text encoder(s) whose outputs condition the UNet: the engine's when they are trained
    (--train_text_encoder), else the frozen ones."""
    return engine.module.trained_text_encoders or components.text_encoders


@contextlib.contextmanager
def evaluation_unet(engine: "DeepSpeedEngine", ema: Optional[ShardedEMA]) -> Iterator[torch.nn.Module]:
    """The engine's UNet in eval mode for a block: with ``ema``, holding the EMA weights on every rank (collective:
    ``ShardedEMA.swapped_into`` all-gathers them into the training weights' own buffers, no copy of the UNet, and
    gives the training weights back exactly on exit); without, the training weights. Every periodic task that
    evaluates or draws goes through here."""
    unet = engine.module.unet
    with ema.swapped_into(unet) if ema is not None else contextlib.nullcontext(unet):
        was_training = unet.training
        unet.eval()
        try:
            yield unet
        finally:
            unet.train(was_training)


def group_lrs(engine: "DeepSpeedEngine") -> dict[str, float]:
    return {group.get("name", str(i)): group["lr"] for i, group in enumerate(engine.optimizer.param_groups)}


def grad_norm(engine: "DeepSpeedEngine") -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)

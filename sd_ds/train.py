"""The training loop: the only module that wires config, data, models, diffusion, EMA, checkpoints and logging.

Launch with ``./run.sh [flags]`` (the deepspeed launcher) or ``python -m sd_ds.train [flags]`` for one rank.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from sd_ds import checkpoint as ckpt_lib
from sd_ds.config import TrainConfig, parse_config
from sd_ds.data import build_train_loader, raise_if_raw_parts
from sd_ds.diffusion import training_loss
from sd_ds.export import save_base_components
from sd_ds.distributed import (DistInfo, all_reduce_sum, build_deepspeed_config, init_distributed,
                               initialize_engine, rank_seed, rng_state, seed_everything, set_rng_state)
from sd_ds.logging import StepMetrics, setup_console_logging
from sd_ds.models import configure_unet, freeze, load_components

logger = logging.getLogger("sd_ds.train")


class DiffusionModule(torch.nn.Module):
    """What the DeepSpeed engine owns: the UNet, plus the text encoder when it is trained too.

    Its forward is the whole training objective, so the engine's bf16 casting, activation checkpointing and
    gradient partitioning cover exactly the trained weights; the frozen VAE/text encoder stay outside.
    """

    def __init__(self, unet: torch.nn.Module, text_encoder: Optional[torch.nn.Module], noise_scheduler: Any,
                 cfg: TrainConfig) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        self.prediction_type = cfg.model.prediction_type or noise_scheduler.config.prediction_type
        self.diffusion = cfg.diffusion

    def forward(self, latents: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
                input_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.text_encoder is not None:
            encoder_hidden_states = self.text_encoder(input_ids)[0]
        return training_loss(
            self.unet, latents, encoder_hidden_states, self.noise_scheduler,
            prediction_type=self.prediction_type, noise_offset=self.diffusion.noise_offset,
            input_perturbation=self.diffusion.input_perturbation, snr_gamma=self.diffusion.snr_gamma,
            generator=generator)


@dataclass
class TrainState:
    step: int = 0              # optimizer steps taken (skipped overflow steps included)
    samples_seen: int = 0      # over all ranks
    skipped_steps: int = 0


class StopSignal:
    """SIGTERM/SIGINT ask for a checkpoint at the end of the current step, then a clean exit (status 0)."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        # All ranks must stop at the same step, or the checkpoint's collectives would hang.
        return bool(all_reduce_sum(torch.tensor([float(self.requested)])).item() > 0)


def weight_dtype_of(cfg: TrainConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_config(argv)
    dist_info = init_distributed()
    setup_console_logging(dist_info.is_main_process)
    try:
        train(cfg, dist_info)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def train(cfg: TrainConfig, di: DistInfo) -> TrainState:
    if not cfg.data.train_shards:
        if cfg.data.file_list:
            raise_if_raw_parts(cfg.data.file_list)
        raise SystemExit("--train_shards is required (webdataset shards from tools/convert_laion_to_wds.py)")
    seed_everything(rank_seed(cfg.seed, di.rank))
    m = cfg.model
    # Same seed on every rank: all ranks build the same random UNet (DeepSpeed also broadcasts rank 0's).
    comp = load_components(m.pretrained_model_name_or_path, unet_name_or_path=m.unet_name_or_path,
                           vae_name_or_path=m.vae_name_or_path, text_encoder_name_or_path=m.text_encoder_name_or_path,
                           tokenizer_name=m.tokenizer_name, prediction_type=m.prediction_type,
                           model_max_length=m.model_max_length, seed=cfg.seed)
    configure_unet(comp.unet, recompute=m.recompute, xformers=m.enable_xformers_memory_efficient_attention)
    freeze(comp.vae)
    if not m.train_text_encoder:
        freeze(comp.text_encoder)
    if di.is_main_process:
        save_base_components(comp, cfg.output_dir)  # so export never depends on the original model path

    resume = ckpt_lib.find_resume_checkpoint(cfg.output_dir, cfg.checkpoint.resume_from_checkpoint)
    universal = None
    if resume is not None and ckpt_lib.read_trainer_state(resume)["world_size"] != di.world_size:
        universal = ckpt_lib.make_universal(resume, is_main_process=di.is_main_process)
    ds_config = build_deepspeed_config(cfg, di.world_size, load_universal=universal is not None,
                                       device_type=di.device.type)

    module = DiffusionModule(comp.unet, comp.text_encoder if m.train_text_encoder else None, comp.noise_scheduler, cfg)
    engine = initialize_engine(module, param_groups(cfg, module), ds_config, lambda opt: lr_schedule(cfg, opt))
    dtype = weight_dtype_of(cfg)
    comp.vae.to(di.device, dtype=dtype)
    if not m.train_text_encoder:
        comp.text_encoder.to(di.device, dtype=dtype)
    ema = build_ema(cfg, engine)
    loader = build_train_loader(
        cfg.data.train_shards, tokenizer=comp.tokenizer, micro_batch_size=cfg.micro_batch_size,
        resolution=cfg.data.resolution, center_crop=cfg.data.center_crop, random_flip=cfg.data.random_flip,
        min_size=cfg.data.min_size, caption_dropout_prob=cfg.data.caption_dropout_prob,
        model_max_length=m.model_max_length, num_workers=cfg.data.dataloader_num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, rank=di.rank, world_size=di.world_size,
        resample_shards=cfg.data.resample_shards, samples_per_epoch=cfg.data.samples_per_epoch,
        pin_memory=di.device.type == "cuda")
    # The generator behind every random draw of the objective (VAE sample, noise, timesteps); per rank.
    generator = torch.Generator(device=di.device).manual_seed(rank_seed(cfg.seed, di.rank))

    state = TrainState()
    if resume is not None:
        saved, rank_state = ckpt_lib.load_checkpoint(engine, resume, rank=di.rank, world_size=di.world_size,
                                                     ema=ema, universal_dir=universal)
        state = TrainState(saved["step"], saved["samples_seen"], saved["skipped_steps"])
        if rank_state is not None:
            loader.load_state_dict(rank_state["data"])
            set_rng_state(rank_state["rng"])
            generator.set_state(rank_state["generator"])
        else:
            logger.warning("checkpoint %s was written by %d ranks, this run has %d: the data epoch restarts",
                           resume, saved["world_size"], di.world_size)
        logger.info("resumed from %s at step %d", resume, state.step)

    metrics = StepMetrics(cfg.output_dir, is_main_process=di.is_main_process, device=di.device,
                          max_steps=cfg.max_steps, initial_step=state.step, disable_tqdm=cfg.logging.disable_tqdm)
    stop = StopSignal()
    global_batch_size = cfg.global_batch_size(di.world_size)
    logger.info("training %d steps: global batch %d = micro batch %d x accumulation %d x %d ranks, %s",
                cfg.max_steps, global_batch_size, cfg.micro_batch_size, cfg.optim.gradient_accumulation_steps,
                di.world_size, cfg.precision)
    batches = iter(loader)
    try:
        while state.step < cfg.max_steps:
            for _ in range(cfg.optim.gradient_accumulation_steps):
                t0 = time.perf_counter()
                batch = next(batches)
                data_wait = time.perf_counter() - t0
                latents, hidden = encode_batch(batch, comp, cfg, di.device, dtype, generator)
                loss = engine(latents, hidden, batch["input_ids"].to(di.device), generator)
                engine.backward(loss)
                engine.step()
                loss_value = loss.item()
                metrics.add_micro_batch(loss_value, latents.shape[0], data_wait, time.perf_counter() - t0 - data_wait)
            state.step += 1
            state.samples_seen += global_batch_size
            state.skipped_steps = engine.skipped_steps
            if ema is not None and engine.was_step_applied():
                ema.update(state.step)
            metrics.step_done()

            if state.step % cfg.logging.logging_steps == 0:
                metrics.log(state.step, lrs=group_lrs(engine), grad_norm=grad_norm(engine),
                            samples_seen=state.samples_seen, skipped_steps=state.skipped_steps,
                            extra={f"data/{k}": float(v) for k, v in loader.stats().items()})
            if cfg.logging.image_logging_steps and state.step % cfg.logging.image_logging_steps == 0:
                log_images(cfg, engine, comp, ema, batch, metrics, state.step, di)
            stopping = stop.agreed()
            if stopping or state.step % cfg.checkpoint.save_steps == 0 or state.step == cfg.max_steps:
                save(cfg, engine, state, loader, generator, ema, comp, di)
            if stopping:
                logger.info("stop requested: checkpoint saved at step %d, exiting", state.step)
                break
    finally:
        metrics.close()
    return state


def encode_batch(batch: dict, comp: Any, cfg: TrainConfig, device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Frozen encoders: images → scaled latents [B,4,h,w]; token ids → CLIP hidden states [B,77,D]."""
    with torch.no_grad():
        pixels = batch["pixel_values"].to(device, dtype=dtype, non_blocking=True)
        latents = comp.vae.encode(pixels).latent_dist.sample(generator) * comp.vae.config.scaling_factor
        hidden = None
        if not cfg.model.train_text_encoder:
            hidden = comp.text_encoder(batch["input_ids"].to(device))[0]
    return latents, hidden


def param_groups(cfg: TrainConfig, module: DiffusionModule) -> list[dict]:
    o = cfg.optim
    groups = [{"params": [p for p in module.unet.parameters() if p.requires_grad], "name": "unet",
               "lr": o.unet_learning_rate or o.learning_rate}]
    if module.text_encoder is not None:
        groups.append({"params": [p for p in module.text_encoder.parameters() if p.requires_grad],
                       "name": "text_encoder", "lr": o.text_encoder_learning_rate or o.learning_rate})
    return groups


def lr_schedule(cfg: TrainConfig, optimizer: Any) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.optim.lr_scheduler_type, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                         num_training_steps=cfg.max_steps)


def group_lrs(engine: Any) -> dict[str, float]:
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}


def grad_norm(engine: Any) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def build_ema(cfg: TrainConfig, engine: Any) -> Any:
    if not cfg.ema.use_ema:
        return None
    from sd_ds.ema import ShardedEMA

    return ShardedEMA(engine, decay=cfg.ema.ema_decay, warmup=cfg.ema.ema_warmup,
                      start_step=cfg.ema.ema_start_step)


def save(cfg: TrainConfig, engine: Any, state: TrainState, loader: Any, generator: torch.Generator, ema: Any,
         comp: Any, di: DistInfo) -> None:
    trainer_state = {"step": state.step, "samples_seen": state.samples_seen, "skipped_steps": state.skipped_steps,
                     "world_size": di.world_size, "global_batch_size": cfg.global_batch_size(di.world_size),
                     "config": cfg.to_dict()}
    rank_state = {"data": loader.state_dict(), "rng": rng_state(), "generator": generator.get_state()}
    export = None
    if cfg.checkpoint.only_save_updated_model:
        from functools import partial

        from sd_ds.export import save_trained_models

        export = partial(save_trained_models, engine, comp, is_main_process=di.is_main_process)
    ckpt_lib.save_checkpoint(engine, cfg.output_dir, state.step, rank=di.rank, is_main_process=di.is_main_process,
                             trainer_state=trainer_state, rank_state=rank_state, ema=ema,
                             save_total_limit=cfg.checkpoint.save_total_limit, export_models=export)
    logger.info("saved checkpoint-%d", state.step)


def log_images(cfg: TrainConfig, engine: Any, comp: Any, ema: Any, batch: dict, metrics: StepMetrics, step: int,
               di: DistInfo) -> None:
    """Never kills training: a failure is logged and the run goes on."""
    from sd_ds.sample import log_training_images

    try:
        log_training_images(cfg, engine, comp, ema, batch, metrics, step, is_main_process=di.is_main_process,
                            device=di.device)
    except Exception:  # noqa: BLE001 - image logging is best effort by design
        logger.exception("image logging failed at step %d; training continues", step)


if __name__ == "__main__":
    sys.exit(main())

"""The training loop: the only module that wires config, data, models, engine, EMA, checkpoints and logging.

Launch with ``./run.sh [flags]`` (the deepspeed launcher) or ``python -m sd_ds.train [flags]`` for one rank.
"""

from __future__ import annotations

import logging
import sys
import time
from functools import partial
from typing import Any, Optional

import torch

from sd_ds.checkpoint import Checkpointer, CheckpointWriteError, NonFiniteWeightsError, TrainState, plan_resume
from sd_ds.compile import prepare_compile
from sd_ds.config import TrainConfig, parse_config
from sd_ds.data import (MetadataError, build_train_loader, check_shard_metadata,
                        latent_manifest_of_shards, raise_if_raw_parts)
from sd_ds.data.buckets import BucketError, model_divisor, training_buckets
from sd_ds.data.manifest import check_latent_cache
from sd_ds.data.sources import latent_directory_of_shards
from sd_ds.deepspeed_config import DeepSpeedConfigError
from sd_ds.diffusers_export import save_base_components, save_trained_models
from sd_ds.distributed import (DistInfo, StopSignal, close_distributed, default_loader_workers, init_distributed,
                               rank_seed, seed_everything)
from sd_ds.engine import (build_ema, build_engine, check_deepspeed_config, encode_batch, grad_norm, group_lrs,
                          vae_dtype, weight_dtype)
from sd_ds.families import FamilyMismatchError
from sd_ds.faults import fault_point
from sd_ds.lifecycle import SkipGuard, TrainingDiverged, hold_output_dir, run_to_exit, start_parent_watchdog
from sd_ds.metrics import StepMetrics, setup_console_logging
from sd_ds.models import ModelNotFoundError, build_components
from sd_ds.periodic import build_periodic_tasks
from sd_ds.precision import PrecisionUnsupported, resolve_precision
from sd_ds.redaction import guard_console, redact_url
from sd_ds.retries import RetryPolicy, StorageUnavailable, set_default_policy

logger = logging.getLogger("sd_ds.train")


def main(argv: Optional[list[str]] = None) -> int:
    guard_console()  # no credential of a shard URL reaches the console, whoever prints it
    cfg = parse_config(argv)
    set_default_policy(RetryPolicy(timeout_s=cfg.data.storage_retry_timeout))  # every storage read of the run
    start_parent_watchdog()  # a rank whose launcher died must not train on as an orphan
    dist_info = init_distributed()
    setup_console_logging(dist_info.is_main_process)
    try:
        if cfg.data.train_shards:
            check_shard_metadata(cfg.data.train_shards)  # a wrong sizes.json/sources.json/latents.json: stop now
        for warning in check_deepspeed_config(cfg, dist_info.world_size):  # before any model loads
            logger.warning("%s", warning)
        with hold_output_dir(cfg.output_dir, dist_info):  # one run per output_dir
            train(cfg, dist_info)
    except (CheckpointWriteError, TrainingDiverged, NonFiniteWeightsError, StorageUnavailable) as e:
        # An expected failure with its own message: that message, not a chained C++ stream error, is what the
        # user reads first (exit status 1).
        logger.error("%s", e)
        raise SystemExit(f"sd_ds.train: {e}") from None
    except (MetadataError, DeepSpeedConfigError, ModelNotFoundError, FamilyMismatchError, BucketError,
            PrecisionUnsupported) as e:
        # Bad input (beside the shards, a flag or DS_CONFIG naming something unusable, a model folder mixing
        # families): a usage error, one line (every rank has it; the first says it) and exit 2 like any bad flag.
        if dist_info.is_main_process:
            print(f"sd_ds.train: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        close_distributed()
    return 0


def train(cfg: TrainConfig, dist_info: DistInfo) -> TrainState:
    if not cfg.data.train_shards:
        if cfg.data.file_list:
            raise_if_raw_parts(cfg.data.file_list)
        raise SystemExit("--train_shards is required (webdataset shards from tools/convert_laion_to_wds.py)")
    # bf16 only where the device runs it natively (CPU ranks without AVX-512-BF16/AMX train in fp32, ~20x faster)
    precision = resolve_precision(cfg, dist_info.device, is_main_process=dist_info.is_main_process)
    device, dtype = dist_info.device, weight_dtype(precision)
    seed_everything(rank_seed(cfg.seed, dist_info.rank))
    # Same seed on every rank: all ranks build the same random UNet (DeepSpeed also broadcasts rank 0's).
    components = build_components(cfg.model, seed=cfg.seed)
    # --resolution and --aspect_ratio_buckets against the model's divisor (BucketError: one line, exit 2)
    buckets = training_buckets(cfg.data.aspect_ratio_buckets, cfg.data.resolution,
                               model_divisor(components.vae.config, components.unet.config))
    if buckets is not None:
        logger.info("aspect-ratio buckets (width x height): %s", buckets.key())
    latent_manifest = latent_manifest_of_shards(cfg.data.train_shards)
    if latent_manifest is not None:  # before anything is written, with the VAE and text encoders as loaded (fp32)
        check_latent_cache(latent_manifest, components, resolution=cfg.data.resolution,
                           max_length=cfg.model.model_max_length, train_text_encoder=cfg.model.train_text_encoder,
                           where=f"latent shards ({redact_url(latent_directory_of_shards(cfg.data.train_shards))})")
    if dist_info.is_main_process:
        save_base_components(components, cfg.output_dir)  # so export never depends on the original model path
    if latent_manifest is not None:
        components.vae.encoder = None  # latent shards: only the decoder runs (image logging)
    resume = plan_resume(cfg, dist_info)
    engine = build_engine(cfg, components, dist_info, load_universal=resume is not None and resume.universal_dir is not None)
    components.vae.to(device, dtype=vae_dtype(components.vae, dtype))  # fp32 in an fp16 run when fp16 overflows it
    if not cfg.model.train_text_encoder:
        for encoder in components.text_encoders:
            encoder.to(device, dtype=dtype)
    prompt_encoder = engine.module.prompt_encoder  # the family's encode_prompt, as its pipeline computes it
    ema = build_ema(cfg, engine)
    if cfg.data.dataloader_num_workers is None:
        cfg.data.dataloader_num_workers = default_loader_workers(device)
    loader = build_train_loader(cfg.data, tokenize=prompt_encoder.tokenize, micro_batch_size=cfg.micro_batch_size,
                                seed=cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                                pin_memory=device.type == "cuda",
                                all_reduce=dist_info.all_reduce,  # shards without sizes.json: one rank counts each
                                buckets=buckets)
    # The generator behind every random draw of the objective (VAE sample, noise, timesteps); per rank.
    generator = torch.Generator(device=device).manual_seed(rank_seed(cfg.seed, dist_info.rank))
    export = (partial(save_trained_models, engine, components, ema, is_main_process=dist_info.is_main_process)
              if cfg.checkpoint.only_save_updated_model else None)
    checkpointer = Checkpointer(cfg, dist_info, engine=engine, loader=loader, generator=generator, ema=ema,
                                export_models=export, fault_point=fault_point)
    state = checkpointer.load(resume)
    # image logging, validation loss, FID / CLIP score: one call a step
    periodic = build_periodic_tasks(cfg, dist_info, components, initial_step=state.step)
    compile_cache = prepare_compile(cfg, components, dist_info)  # --torch_compile: saved kernels, compiled regions
    skip_guard = SkipGuard(cfg.optim.max_consecutive_skipped_steps, skipped_total_at_start=engine.skipped_steps)

    metrics = StepMetrics(cfg.output_dir, dist_info, max_steps=cfg.max_steps, initial_step=state.step,
                          disable_tqdm=cfg.logging.disable_tqdm)
    stop = StopSignal(dist_info)
    global_batch_size = cfg.global_batch_size(dist_info.world_size)
    logger.info("training %d steps of %s (%s): global batch %d = micro batch %d x accumulation %d x %d ranks, %s",
                cfg.max_steps, components.family.name, engine.module.prediction_type, global_batch_size,
                cfg.micro_batch_size, cfg.optim.gradient_accumulation_steps, dist_info.world_size, cfg.precision)
    batches = iter(loader)
    try:
        periodic.maybe_run(state.step, engine, ema, metrics)  # the starting point of a fresh run
        while state.step < cfg.max_steps:
            for _ in range(cfg.optim.gradient_accumulation_steps):
                t0 = time.perf_counter()
                batch = next(batches)
                data_wait = time.perf_counter() - t0
                latents, conditioning = encode_batch(
                    batch, components, prompt_encoder, train_text_encoder=cfg.model.train_text_encoder, device=device,
                    dtype=dtype, generator=generator)
                loss = engine(latents, conditioning, generator)
                engine.backward(loss)
                engine.step()
                metrics.add_micro_batch(loss, latents.shape[0], data_wait, time.perf_counter() - t0 - data_wait)
            state.step += 1
            state.samples_seen += global_batch_size
            state.skipped_steps = engine.skipped_steps
            skip_guard.update(state.skipped_steps)  # raises after too many non-finite steps in a row
            if ema is not None and engine.was_step_applied():
                ema.update(state.step)
            if compile_cache is not None:
                compile_cache.after_step()  # saves the kernels compiled for new shapes (once per shape set)
            metrics.step_done()

            if state.step % cfg.logging.logging_steps == 0:
                metrics.log(state.step, lrs=group_lrs(engine), grad_norm=grad_norm(engine),
                            samples_seen=state.samples_seen, skipped_steps=state.skipped_steps,
                            extra={f"data/{k}": float(v) for k, v in loader.stats().items()})
            periodic.maybe_run(state.step, engine, ema, metrics, batch)
            stopping = stop.agreed()
            if stopping or state.step % cfg.checkpoint.save_steps == 0 or state.step == cfg.max_steps:
                checkpointer.save(state)
            if stopping:
                logger.info("stop requested: checkpoint saved at step %d, exiting", state.step)
                break
        stop.close()
    finally:
        metrics.close()
    skipped = loader.stats()
    if any(skipped.values()):
        logger.info("data: samples skipped by reason over the run: %s", skipped)
    return state


if __name__ == "__main__":
    sys.exit(run_to_exit(main))  # gloo ranks leave without finalizing (lifecycle.end_process)

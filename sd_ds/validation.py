"""Validation loss: the diffusion loss on fixed held-out samples, at fixed timesteps, with fixed noise.

The training loss is noisy and biased by which timesteps a step happens to draw. Here every held-out sample is
noised at the same 8 evenly spaced timesteps (MLPerf's FLUX.1 benchmark does the same) with noise drawn once from
a seed, and its latent is drawn once from its VAE posterior with a seed: the value depends only on the weights.

Spread over ranks without changing the value: the samples are cut into batches of ``--validation_batch_size``
(fixed, whatever the number of ranks), batch b runs on rank b % world_size, each rank fills its batches' rows
of a [samples, 8] table of per-sample losses and the table is summed over ranks on the gloo control group
(every row is non-zero on one rank only, so the sum is exact), then averaged in the same order on every rank.
The same weights give the same bits on 1 rank and on 64.

With ``--use_ema`` the EMA weights are evaluated too (``validation/loss_ema``), swapped into the UNet's own
buffers on every rank (``sd_ds.engine.evaluation_unet``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from sd_ds.config import TrainConfig
from sd_ds.data import build_train_loader
from sd_ds.diffusion import add_noise, diffusion_loss, prediction_target
from sd_ds.distributed import DistInfo
from sd_ds.ema import ShardedEMA
from sd_ds.conditioning import EMPTY_CAPTION_KEY, GEOMETRY_KEYS, TOKEN_KEYS, CaptionTokenizer, PromptEncoder
from sd_ds.engine import conditioning_text_encoders, evaluation_unet
from sd_ds.latents import encode_moments, sample_latents
from sd_ds.metrics import StepMetrics
from sd_ds.models import Components

logger = logging.getLogger("sd_ds.validation")

NUM_TIMESTEPS = 8


def validation_timesteps(num_train_timesteps: int, count: int = NUM_TIMESTEPS) -> list[int]:
    """``count`` evenly spaced timesteps, the centres of ``count`` equal bins of [0, T): 62, 187, ..., 937 for
    T = 1000 (neither the all-signal end t=0 nor the all-noise end, whose losses say little)."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


@dataclasses.dataclass
class HeldOutSet:
    """The fixed inputs, on the CPU: scaled latents [N,C,h,w] (one posterior draw each), token ids [N,L] per
    tokenizer, the micro-conditioning geometry [N,2] per key (SDXL), noise [N,8,C,h,w]."""

    latents: torch.Tensor
    tokens: dict[str, torch.Tensor]
    geometry: dict[str, torch.Tensor]
    noise: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


def _sample_generator(seed: int, index: int, what: int) -> torch.Generator:
    # One CPU generator per (sample, draw): a sample's latent and noise do not depend on the batch it is in.
    return torch.Generator().manual_seed(seed * 1_000_003 + index * 2 + what)


@torch.no_grad()
def load_held_out(cfg: TrainConfig, components: Components, device: torch.device) -> HeldOutSet:
    """The first ``--validation_samples`` samples of ``--validation_shards`` in the (seeded, fixed) order the data
    loader reads them, centre-cropped, captions never dropped. Every rank reads the same samples (a few hundred:
    one pass over a few shards at start-up) and later evaluates only its own batches."""
    ev = cfg.evaluation
    n = ev.validation_samples
    data = dataclasses.replace(cfg.data, train_shards=list(ev.validation_shards), center_crop=True, random_flip=False,
                               caption_dropout_prob=0.0, shuffle_block=1, samples_per_epoch=n, resample_shards=False,
                               dataloader_num_workers=0)
    # One sample per batch: an epoch is then exactly n samples (when the shards hold that many).
    loader = build_train_loader(data, tokenize=CaptionTokenizer(tuple(components.tokenizers), cfg.model.model_max_length),
                                micro_batch_size=1, seed=ev.validation_seed, rank=0, world_size=1)
    vae = components.vae
    moments: list[torch.Tensor] = []
    text: dict[str, list[torch.Tensor]] = {}  # token ids per tokenizer, and the geometry keys
    keys: list[str] = []
    try:
        for b in loader:
            if loader.epoch > 0 or len(keys) == n:
                break  # fewer samples than asked for: a second pass would only repeat them
            if b["keys"][0] in keys:
                continue
            keys.append(b["keys"][0])
            for name in (*TOKEN_KEYS, EMPTY_CAPTION_KEY, *GEOMETRY_KEYS):
                if name in b:
                    text.setdefault(name, []).append(b[name][0])
            if "latent_moments" in b:
                moments.append(b["latent_moments"][0].float())
            elif vae.encoder is None:
                raise ValueError("--validation_shards are image shards but training reads latent shards (the VAE "
                                 "encoder is not loaded): encode them too (python -m sd_ds.encode_latents)")
            else:
                moments.append(encode_moments(vae, b["pixel_values"].to(device))[0].float().cpu())
    finally:
        loader.close()
    if not keys:
        raise ValueError(f"--validation_shards {ev.validation_shards}: no usable sample")
    if len(keys) < n:
        logger.warning("validation: %d samples in --validation_shards, fewer than --validation_samples %d",
                       len(keys), n)
    scaling = vae.config.scaling_factor
    latents = torch.cat([sample_latents(m[None], _sample_generator(ev.validation_seed, i, 0), scaling)
                         for i, m in enumerate(moments)])  # [N,C,h,w]
    noise = torch.stack([torch.randn((NUM_TIMESTEPS, *latents.shape[1:]),
                                     generator=_sample_generator(ev.validation_seed, i, 1))
                         for i in range(len(keys))])  # [N,8,C,h,w]
    stacked = {name: torch.stack(rows) for name, rows in text.items()}
    return HeldOutSet(latents=latents, tokens={k: v for k, v in stacked.items() if k not in GEOMETRY_KEYS},
                      geometry={k: v for k, v in stacked.items() if k in GEOMETRY_KEYS}, noise=noise, keys=keys)


@torch.no_grad()
def per_sample_losses(unet: torch.nn.Module, prompt_encoder: PromptEncoder, text_encoders: list[torch.nn.Module],
                      noise_scheduler: Any, held_out: HeldOutSet, *, prediction_type: str, batch_size: int, rank: int,
                      world_size: int, device: torch.device) -> torch.Tensor:
    """[N, 8] float64 on the CPU: this rank's batches' losses (one MSE per sample and timestep), zeros elsewhere."""
    timesteps = validation_timesteps(noise_scheduler.config.num_train_timesteps)
    dtype = next(unet.parameters()).dtype
    table = torch.zeros(len(held_out), len(timesteps), dtype=torch.float64, device=device)
    for start in range(rank * batch_size, len(held_out), world_size * batch_size):
        rows = slice(start, min(start + batch_size, len(held_out)))
        latents = held_out.latents[rows].to(device)
        conditioning = prompt_encoder.encode({k: v[rows].to(device) for k, v in held_out.tokens.items()},
                                             {k: v[rows].to(device) for k, v in held_out.geometry.items()},
                                             text_encoders=text_encoders).to(dtype)
        for k, t in enumerate(timesteps):
            t_batch = torch.full((latents.shape[0],), t, dtype=torch.long, device=device)
            noise = held_out.noise[rows, k].to(device)
            noisy = add_noise(noise_scheduler, latents, noise, t_batch)
            target = prediction_target(noise_scheduler, latents, noise, t_batch, prediction_type)
            pred = unet(noisy.to(dtype), t_batch, **conditioning.unet_kwargs()).sample
            table[rows, k] = torch.stack([diffusion_loss(p[None], y[None]) for p, y in zip(pred, target)]).double()
    return table.cpu()  # one device → host copy per evaluation


class Validator:
    """The validation loss as a periodic task: every ``--validation_steps`` steps (and at step 0 of a fresh run),
    of the training weights and, with ``--use_ema``, of the EMA weights; logged as validation/loss[_ema]."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, components: Components,
                 held_out: Optional[HeldOutSet], *, initial_step: int) -> None:
        self.cfg, self.dist, self.components, self.held_out = cfg, dist_info, components, held_out
        self.every = cfg.evaluation.validation_steps
        self.initial_step = initial_step

    def due(self, step: int) -> bool:
        if self.held_out is None:
            return False  # no --validation_shards
        # At the step a resumed run starts from, the run that saved it has already logged the value.
        return step % self.every == 0 and (step != self.initial_step or step == 0)

    def losses(self, unet: torch.nn.Module, prompt_encoder: PromptEncoder, text_encoders: list[torch.nn.Module],
               prediction_type: str) -> torch.Tensor:
        """Collective. [N, 8] float64 per-sample losses of ``unet`` (in eval mode: ``evaluation_unet``), the same on
        every rank."""
        table = per_sample_losses(unet, prompt_encoder, text_encoders, self.components.noise_scheduler, self.held_out,
                                  prediction_type=prediction_type,
                                  batch_size=self.cfg.evaluation.validation_batch_size, rank=self.dist.rank,
                                  world_size=self.dist.world_size, device=self.dist.device)
        return self.dist.all_reduce(table)  # CPU table on the gloo control group; each row from one rank

    def run(self, step: int, engine: Any, ema: Optional[ShardedEMA], metrics: StepMetrics) -> dict[str, float]:
        """Collective: every rank calls it at the same steps. Returns (and logs) the scalars."""
        text = (engine.module.prompt_encoder, conditioning_text_encoders(engine, self.components))
        prediction_type = engine.module.prediction_type
        with evaluation_unet(engine, None) as unet:
            values = self._scalars("validation/loss", self.losses(unet, *text, prediction_type))
        if ema is not None:
            with evaluation_unet(engine, ema) as unet:
                values.update(self._scalars("validation/loss_ema", self.losses(unet, *text, prediction_type)))
        metrics.log_scalars(values, step)
        metrics.write_line(
            f"step {step} validation loss {values['validation/loss']:.5f}" + (
                f" (EMA {values['validation/loss_ema']:.5f})" if "validation/loss_ema" in values else "")
            + f" on {len(self.held_out)} held-out samples x {NUM_TIMESTEPS} timesteps", console=logger)
        return values

    def maybe_run(self, step: int, engine: Any, ema: Optional[ShardedEMA], metrics: StepMetrics,
                  batch: Optional[dict] = None) -> Optional[dict[str, float]]:
        """The periodic-task call (``sd_ds.periodic``); ``batch`` is not used."""
        return self.run(step, engine, ema, metrics) if self.due(step) else None

    def _scalars(self, tag: str, table: torch.Tensor) -> dict[str, float]:
        timesteps = validation_timesteps(self.components.noise_scheduler.config.num_train_timesteps)
        out = {tag: float(table.mean())}
        out.update({f"{tag}/t{t:04d}": float(v) for t, v in zip(timesteps, table.mean(dim=0).tolist())})
        return out


def build_validator(cfg: TrainConfig, dist_info: DistInfo, components: Components, *,
                    initial_step: int) -> Validator:
    """Reads the held-out samples (call after the VAE is on its device); without ``--validation_shards`` a
    validator that never runs."""
    if not cfg.evaluation.validation_shards:
        return Validator(cfg, dist_info, components, None, initial_step=initial_step)
    held_out = load_held_out(cfg, components, dist_info.device)
    timesteps = validation_timesteps(components.noise_scheduler.config.num_train_timesteps)
    logger.info("validation: %d held-out samples x %d timesteps %s every %d steps, in batches of %d over %d rank(s); "
                "square centre crops at %d px%s", len(held_out), NUM_TIMESTEPS, timesteps,
                cfg.evaluation.validation_steps, cfg.evaluation.validation_batch_size, dist_info.world_size,
                cfg.data.resolution, "" if cfg.data.aspect_ratio_buckets == "off" else
                " (training uses aspect-ratio buckets; validation keeps squares, comparable across runs)")
    return Validator(cfg, dist_info, components, held_out, initial_step=initial_step)


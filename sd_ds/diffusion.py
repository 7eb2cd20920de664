"""The diffusion training objective as pure functions of tensors, a noise scheduler and a generator.

Matches diffusers' ``train_text_to_image.py`` option for option (noise offset, input perturbation,
epsilon / v-prediction targets, min-SNR-γ weighting computed per sample), with the MSE in fp32.
No DeepSpeed here: the loop hands these the engine's module.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


def sample_timesteps(batch_size: int, num_train_timesteps: int, generator: Optional[torch.Generator] = None,
                     device: Optional[torch.device] = None) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device).long()


def _gathered(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values.to(timesteps.device)[timesteps].float()
    return out.reshape(out.shape + (1,) * (ndim - 1))


def compute_snr(noise_scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar), per sample (diffusers.training_utils.compute_snr)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)
    alpha = alphas_cumprod[timesteps].float() ** 0.5
    sigma = (1.0 - alphas_cumprod[timesteps].float()) ** 0.5
    return (alpha / sigma) ** 2


def add_noise(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) noise (DDPMScheduler.add_noise), in fp32 so a
    bf16 run does not round the schedule coefficients; the caller casts to the UNet's dtype."""
    a = _gathered(noise_scheduler.alphas_cumprod, timesteps, latents.ndim)
    return a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()


def make_noisy_latents(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any, *,
                       noise_offset: float = 0.0, input_perturbation: float = 0.0,
                       generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy latents x_t, the noise the target is built from), as diffusers' train_text_to_image.py makes them.

    ``noise`` is plain N(0, 1) shaped like the latents. Offset noise adds one draw per (sample, channel);
    input perturbation (arXiv:2301.11706) perturbs only the noise that goes into x_t: the target keeps the
    unperturbed noise.
    """
    noise = noise.float()
    if noise_offset:
        # https://www.crosslabs.org/blog/diffusion-with-offset-noise
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator,
                                                   device=latents.device)
    noise_in = noise
    if input_perturbation:
        noise_in = noise + input_perturbation * torch.randn(noise.shape, generator=generator, device=noise.device)
    return add_noise(noise_scheduler, latents, noise_in, timesteps), noise


def prediction_target(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """What the UNet learns to predict: the (unperturbed) noise, or the velocity for v-prediction."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        # v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x_0 (DDPMScheduler.get_velocity)
        a = _gathered(noise_scheduler.alphas_cumprod, timesteps, latents.ndim)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon | v_prediction)")


def snr_loss_weights(snr: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ (arXiv:2303.09556): min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR+1) for v-prediction.
    One weight per sample (the seed applied sample 0's weight to the whole batch)."""
    clipped = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, *, timesteps: Optional[torch.Tensor] = None,
                   noise_scheduler: Any = None, snr_gamma: Optional[float] = None,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """MSE in fp32 (a bf16 UNet's prediction is upcast). With ``snr_gamma``, each sample's mean squared error
    is scaled by its own min-SNR-γ weight (needs ``timesteps`` and ``noise_scheduler``), then averaged."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    if timesteps is None or noise_scheduler is None:
        raise ValueError("snr_gamma needs the timesteps and the noise scheduler")
    weights = snr_loss_weights(compute_snr(noise_scheduler, timesteps), snr_gamma, prediction_type)
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * weights).mean()


def training_loss(unet: Any, latents: torch.Tensor, encoder_hidden_states: torch.Tensor, noise_scheduler: Any, *,
                  prediction_type: str = "epsilon", noise_offset: float = 0.0, input_perturbation: float = 0.0,
                  snr_gamma: Optional[float] = None, generator: Optional[torch.Generator] = None,
                  added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """The objective of one micro batch: noise, uniform timesteps, noised input, UNet forward, (weighted) MSE.

    latents [B,4,h,w] (already scaled by the VAE's scaling factor), encoder_hidden_states [B,77,D]; SDXL also
    ``added_cond_kwargs`` (text_embeds [B,P] and time_ids [B,6], sd_ds.conditioning). Every random draw comes from
    ``generator`` (on the latents' device), in this order: noise, timesteps, offset, perturbation. The UNet runs in
    its own dtype (time_ids stay float32: the UNet embeds them in float32); the loss is fp32.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
    timesteps = sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, generator=generator,
                                 device=latents.device)
    noisy, noise = make_noisy_latents(latents, noise, timesteps, noise_scheduler, noise_offset=noise_offset,
                                      input_perturbation=input_perturbation, generator=generator)
    target = prediction_target(noise_scheduler, latents, noise, timesteps, prediction_type)
    dtype = next(unet.parameters()).dtype
    extra = {}
    if added_cond_kwargs is not None:
        extra["added_cond_kwargs"] = {k: v if k == "time_ids" else v.to(dtype) for k, v in added_cond_kwargs.items()}
    model_pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states.to(dtype), **extra).sample
    return diffusion_loss(model_pred, target, timesteps=timesteps, noise_scheduler=noise_scheduler,
                          snr_gamma=snr_gamma, prediction_type=prediction_type)

"""The diffusion training objective as pure functions of tensors, a noise scheduler and a generator.

Matches diffusers' ``train_text_to_image.py`` option for option (noise offset, input perturbation,
epsilon / v-prediction targets, min-SNR-γ weighting computed per sample), with the MSE in fp32.
No DeepSpeed here: the loop hands these the engine's module.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


def sample_timesteps(batch_size: int, num_train_timesteps: int, *, generator: Optional[torch.Generator] = None,
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


def make_noise(latents: torch.Tensor, *, noise_offset: float = 0.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian noise (fp32) shaped like the latents, plus the per-channel offset of offset noise."""
    shape, dev = latents.shape, latents.device
    noise = torch.randn(shape, generator=generator, device=dev, dtype=torch.float32)
    if noise_offset:
        # https://www.crosslabs.org/blog/diffusion-with-offset-noise
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=dev)
    return noise


def add_noise(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) noise, computed in fp32."""
    ac = noise_scheduler.alphas_cumprod
    a = _gathered(ac, timesteps, latents.ndim)
    return a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()


def prediction_target(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
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


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, *, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE in fp32; with per-sample weights, the mean over each sample's elements is weighted, then averaged."""
    if weights is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    return (per_sample * weights).mean()


def training_loss(unet: Any, latents: torch.Tensor, encoder_hidden_states: torch.Tensor, noise_scheduler: Any, *,
                  prediction_type: str = "epsilon", noise_offset: float = 0.0, input_perturbation: float = 0.0,
                  snr_gamma: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One training objective evaluation: noise, timesteps, noised input, UNet forward, (weighted) MSE.

    latents [B,4,h,w] (already scaled), encoder_hidden_states [B,77,D]. The UNet runs in its own dtype.
    """
    bsz = latents.shape[0]
    noise = make_noise(latents, noise_offset=noise_offset, generator=generator)
    timesteps = sample_timesteps(bsz, noise_scheduler.config.num_train_timesteps, generator=generator,
                                 device=latents.device)
    noise_in = noise
    if input_perturbation:
        # arXiv:2301.11706: perturb only the noise that goes into x_t; the target keeps the original noise.
        noise_in = noise + input_perturbation * torch.randn(noise.shape, generator=generator, device=noise.device)
    noisy = add_noise(noise_scheduler, latents, noise_in, timesteps)
    target = prediction_target(noise_scheduler, latents, noise, timesteps, prediction_type)
    dtype = next(unet.parameters()).dtype
    model_pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states.to(dtype)).sample
    weights = None
    if snr_gamma is not None:
        weights = snr_loss_weights(compute_snr(noise_scheduler, timesteps), snr_gamma, prediction_type)
    return diffusion_loss(model_pred, target, weights=weights)

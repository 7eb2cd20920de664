"""The VAE side of latent diffusion, shared by the trainer, the validation loss and the latent encoder.

``encode_moments`` is the one pixels → posterior-moments path (online training and ``python -m
sd_ds.encode_latents`` both go through it), ``sample_latents`` the one moments → scaled-latents draw (as diffusers
samples them), and ``latent_shape`` the stored moments' shape. No DeepSpeed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from sd_ds.memory_format import memory_format_of

if TYPE_CHECKING:  # diffusers takes seconds to import; sample_latents imports the one class it needs when called
    from diffusers import AutoencoderKL


@torch.no_grad()
def encode_moments(vae: "AutoencoderKL", pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [B,3,R,R] (on the VAE's device) → the posterior's moments [B, 2C, R/f, R/f] in the VAE's
    dtype: mean channels, then log-variance channels (DiagonalGaussianDistribution's ``parameters``)."""
    # [-1, 1], as the trainer normalises; in the VAE's layout (channels-last with --channels_last: NHWC end to end)
    x = pixels.to(vae.dtype, memory_format=memory_format_of(vae.encoder.conv_in.weight)).div_(127.5).sub_(1.0)
    return vae.encode(x).latent_dist.parameters


def sample_latents(moments: torch.Tensor, generator: Optional[torch.Generator],
                   scaling_factor: float) -> torch.Tensor:
    """A latent drawn from stored (or freshly encoded) moments, scaled as diffusers' training scripts do:
    ``DiagonalGaussianDistribution(moments).sample(generator) * scaling_factor``, in float32 so that the noise
    drawn does not depend on the dtype the moments travel in. [B, C, R/f, R/f]"""
    # Lazy: importing diffusers costs seconds, and `python -m sd_ds.encode_latents --help` needs none of it.
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(moments.float()).sample(generator) * scaling_factor


def latent_shape(vae: "AutoencoderKL", resolution: int) -> list[int]:
    """[2C, R/f, R/f]: f = 2 per down block after the first (8 for SD's VAE, 4 for the tiny preset's)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return [2 * vae.config.latent_channels, resolution // factor, resolution // factor]

"""The objective equals diffusers' train_text_to_image.py math for every option."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr as diffusers_compute_snr

from sd_ds import diffusion as D


@pytest.fixture
def sched():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class RecordingUNet(torch.nn.Module):
    """A real (tiny) module whose prediction is a fixed linear map of its input; records what it was given."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=dtype))

    def forward(self, x, t, h):
        self.seen = (x.detach().clone(), t.clone(), h.detach().clone())
        return SimpleNamespace(sample=x * self.w)


def test_compute_snr_equals_diffusers(sched):
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    assert torch.allclose(D.compute_snr(sched, t), diffusers_compute_snr(sched, t), rtol=1e-6)


def test_snr_follows_the_sd_v1_schedule_computed_independently(sched):
    # SD v1: scaled_linear betas 0.00085..0.012 over 1000 steps, alpha_bar = prod(1 - beta)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    expected = (alpha_bar[t] / (1 - alpha_bar[t])).float()
    assert torch.allclose(D.compute_snr(sched, t), expected, rtol=1e-4)


def test_add_noise_and_velocity_equal_scheduler(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 3, 400, 800, 999])
    assert torch.allclose(D.add_noise(sched, x0, noise, t), sched.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(D.prediction_target(sched, x0, noise, t, "v_prediction"), sched.get_velocity(x0, noise, t),
                          atol=1e-6)
    assert torch.equal(D.prediction_target(sched, x0, noise, t, "epsilon"), noise)
    with pytest.raises(ValueError):
        D.prediction_target(sched, x0, noise, t, "sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_per_sample_and_equal_diffusers(sched, prediction_type):
    gamma = 5.0
    t = torch.tensor([5, 50, 300, 700, 990])
    snr = diffusers_compute_snr(sched, t)
    # diffusers train_text_to_image.py, verbatim math
    ref = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    ref = ref / snr if prediction_type == "epsilon" else ref / (snr + 1)
    ours = D.snr_loss_weights(D.compute_snr(sched, t), gamma, prediction_type)
    assert torch.allclose(ours, ref, rtol=1e-6)
    # The seed gave every sample the weight of sample 0; ours differ across the batch.
    assert not torch.allclose(ours, ours[0].expand_as(ours))
    assert len(set(round(w, 6) for w in ours.tolist())) >= 3

    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    loss = F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3]) * ref
    ours_loss = D.diffusion_loss(pred, target, timesteps=t, noise_scheduler=sched, snr_gamma=gamma,
                                 prediction_type=prediction_type)
    assert torch.allclose(ours_loss, loss.mean(), rtol=1e-6)
    seed_style = F.mse_loss(pred, target) * ref[0]
    assert not torch.allclose(ours_loss, seed_style)
    with pytest.raises(ValueError):
        D.diffusion_loss(pred, target, snr_gamma=gamma)


def _replay(seed, latents, *, noise_offset=0.0, input_perturbation=0.0, num_train_timesteps=1000):
    """Draw the same random numbers training_loss draws, in the same order, from a fresh generator."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g)
    new_noise = noise + input_perturbation * torch.randn(noise.shape, generator=g) if input_perturbation else noise
    return noise, t, new_noise


@pytest.mark.parametrize("noise_offset,input_perturbation,prediction_type,snr_gamma", [
    (0.0, 0.0, "epsilon", None),
    (0.1, 0.0, "epsilon", None),
    (0.0, 0.1, "epsilon", None),
    (0.05, 0.1, "v_prediction", 5.0),
    (0.0, 0.0, "epsilon", 5.0),
])
def test_training_loss_matches_diffusers_recipe(sched, noise_offset, input_perturbation, prediction_type, snr_gamma):
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    hidden = torch.randn(4, 77, 16)
    unet = RecordingUNet()
    loss = D.training_loss(unet, latents, hidden, sched, prediction_type=prediction_type, noise_offset=noise_offset,
                           input_perturbation=input_perturbation, snr_gamma=snr_gamma,
                           generator=torch.Generator().manual_seed(42))
    noise, t, new_noise = _replay(42, latents, noise_offset=noise_offset, input_perturbation=input_perturbation)
    # diffusers: noisy_latents = add_noise(latents, new_noise if input_perturbation else noise, t)
    noisy = sched.add_noise(latents, new_noise, t)
    seen_x, seen_t, _ = unet.seen
    assert torch.equal(seen_t, t)
    assert torch.allclose(seen_x, noisy, atol=1e-6)
    # ... while the target is built from the ORIGINAL noise
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    pred = noisy * 0.5
    if snr_gamma is None:
        ref = F.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        snr = diffusers_compute_snr(sched, t)
        w = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
        ref = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3]) * w).mean()
    assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
    if input_perturbation:
        # Perturbation really changes the input but not the target.
        assert not torch.allclose(seen_x, sched.add_noise(latents, noise, t), atol=1e-4)


def test_mse_is_fp32_with_a_bf16_unet(sched):
    unet = RecordingUNet(dtype=torch.bfloat16)
    latents = torch.randn(2, 4, 8, 8)
    loss = D.training_loss(unet, latents, torch.randn(2, 77, 16), sched, generator=torch.Generator().manual_seed(0))
    assert unet.seen[0].dtype == torch.bfloat16  # the UNet ran in its own dtype
    assert loss.dtype == torch.float32
    loss.backward()
    assert unet.w.grad is not None


def test_timesteps_are_uniform():
    t = D.sample_timesteps(100_000, 1000, generator=torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 999
    counts = torch.bincount(t, minlength=1000).float()
    assert counts.std() / counts.mean() < 0.15

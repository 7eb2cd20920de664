"""Memory layout of every convolution's and normalisation's input (sd_ds.memory_format.LayoutRecorder), counted
per training step on CPU: the default step never switches layout; --channels_last makes the frozen VAE NHWC end to
end and the UNet NHWC until diffusers' first NCHW-contiguous copy; a compiled region keeps the layout it is fed."""

from __future__ import annotations

import pytest
import torch

from sd_ds.config import parse_config
from sd_ds.diffusion import training_loss
from sd_ds.latents import encode_moments, sample_latents
from sd_ds.memory_format import CHANNELS_LAST, CONTIGUOUS, LayoutRecorder, layout_of
from sd_ds.models import build_components
from sd_ds.presets import init_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    init_model(out, preset="tiny", seed=0)
    return out


def components(tiny_dir, *flags: str):
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_dir), "--train_shards", "unused", *flags])
    parts = build_components(cfg.model, seed=0)
    parts.unet.train()
    return parts, cfg


def step(parts, memory_format: torch.memory_format) -> LayoutRecorder:
    """The objective of one micro batch (what DiffusionModule runs, without the engine) under the recorder: the
    frozen VAE encodes pixels, the UNet predicts the noise of the latents in ``memory_format``, backward."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    context = torch.randn(4, 77, 64, generator=g)
    with LayoutRecorder({"vae": parts.vae, "unet": parts.unet}) as recorder:
        latents = sample_latents(encode_moments(parts.vae, pixels), g, parts.vae.config.scaling_factor)
        loss = training_loss(parts.unet, latents.contiguous(memory_format=memory_format), context,
                             parts.noise_scheduler, generator=g)
        loss.backward()
    return recorder


def test_the_default_step_never_switches_layout(tiny_dir):
    parts, _ = components(tiny_dir)
    recorder = step(parts, torch.contiguous_format)
    unet, vae = recorder.summary("unet"), recorder.summary("vae")
    assert len(unet.records) == 80 and unet.switches == 0 and unet.by_layout == {CONTIGUOUS: 80}
    # The VAE's mid-block attention hands back a channels-last view (its output reshape): one switch, no copy
    # (oneDNN converts the NCHW weights of the 3 convolutions after it as it reads them).
    assert vae.switches == 1 and vae.converted_conv_weights == 3, vae.switch_sites()


def test_channels_last_holds_in_the_vae_and_until_diffusers_copies_in_the_unet(tiny_dir):
    parts, cfg = components(tiny_dir, "--channels_last", "True")
    assert cfg.model.channels_last
    assert all(layout_of(p) in (CHANNELS_LAST, "either") for p in parts.vae.parameters() if p.dim() == 4)
    recorder = step(parts, torch.channels_last)
    vae = recorder.summary("vae")
    assert vae.by_layout == {CHANNELS_LAST: len(vae.records)} and vae.switches == 0  # NHWC end to end
    unet = recorder.summary("unet")
    # The UNet's weights are ZeRO's (NCHW): its convolutions convert them. Its activations stay NHWC until the
    # first ResNet with a shortcut convolution: diffusers makes the shortcut's input NCHW-contiguous in training
    # (diffusers#12975), and the rest of the step follows NCHW. (CUDA's GroupNorm would switch at the first norm.)
    assert unet.switches == 1 and "conv_shortcut" in unet.switch_sites()[0], unet.switch_sites()
    assert unet.records[0].layout == CHANNELS_LAST and unet.converted_conv_weights > 0


@pytest.mark.slow
def test_a_compiled_region_keeps_the_layout_it_is_fed():
    """Inductor (CPU: channels-last convolutions inside every graph) hands back its outputs in the strides eager
    would: fed NHWC, a region returns NHWC, so NHWC regions meet without a transpose at their boundaries."""
    from diffusers import UNet2DConditionModel

    from sd_ds.compile import compile_regions, unet_regions
    from sd_ds.presets import TINY_UNET

    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).train()
    compile_regions(unet)
    block = dict(unet_regions(unet))["down_blocks.0"]  # DownBlock2D: ResNet + downsampler
    temb = torch.randn(2, 128)
    for memory_format, layout in ((torch.channels_last, CHANNELS_LAST), (torch.contiguous_format, CONTIGUOUS)):
        x = torch.randn(2, 32, 8, 8).contiguous(memory_format=memory_format).requires_grad_()
        out, skips = block(x, temb)
        assert layout_of(out) == layout and all(layout_of(s) == layout for s in skips)
        out.sum().backward()
        assert layout_of(x.grad) == layout
    torch._dynamo.reset()

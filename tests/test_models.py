"""Component loading: tiny model from `sd_ds.init`, random init of config-only UNets, overrides, clear errors."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sd_ds.presets import TINY_UNET, init_model
from sd_ds.models import (
    CLIP_TOKENIZER_DIR,
    ModelNotFoundError,
    build_unet,
    configure_unet,
    freeze,
    load_components,
    load_unet,
    tokenize,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    init_model(out, preset="tiny", seed=0)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_components(str(tiny_dir))


def zeroed_params(unet: torch.nn.Module) -> list[str]:
    """Names of what latent diffusion zero-initialises: ResNet conv2, transformer proj_out, final conv_out."""
    return [n for n, _ in unet.named_parameters()
            if n.startswith("conv_out.") or ".conv2." in n or (".proj_out." in n and ".attentions." in n)]


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def config_only_unet_dir(tiny_dir: Path, dest: Path, name: str = "config.json") -> Path:
    (dest / "unet").mkdir(parents=True)
    shutil.copy(tiny_dir / "unet" / "config.json", dest / "unet" / name)
    return dest


def test_tiny_components_shapes(tiny):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(tiny.unet, UNet2DConditionModel) and isinstance(tiny.vae, AutoencoderKL)
    assert isinstance(tiny.text_encoder, CLIPTextModel) and isinstance(tiny.tokenizer, CLIPTokenizer)
    assert isinstance(tiny.noise_scheduler, DDPMScheduler)
    assert len(tiny.tokenizer) == 49408 and tiny.tokenizer.model_max_length == 77
    sc = tiny.noise_scheduler.config
    assert (sc.num_train_timesteps, sc.beta_schedule, sc.beta_start, sc.beta_end, sc.prediction_type) == (
        1000, "scaled_linear", 0.00085, 0.012, "epsilon")

    with torch.no_grad():
        input_ids = tokenize(tiny.tokenizer, ["a red circle on a blue background", ""], 77)  # [2, 77]
        assert input_ids.shape == (2, 77)
        hidden = tiny.text_encoder(input_ids).last_hidden_state  # [2, 77, 64]
        assert hidden.shape == (2, 77, tiny.unet.config.cross_attention_dim)
        images = torch.rand(2, 3, 32, 32) * 2 - 1
        latents = tiny.vae.encode(images).latent_dist.sample()  # [2, 4, 8, 8]: 4x downsampling
        assert latents.shape == (2, 4, 8, 8)
        assert tiny.vae.decode(latents).sample.shape == (2, 3, 32, 32)
        pred = tiny.unet(latents, torch.tensor([10, 900]), hidden).sample
    assert pred.shape == latents.shape
    assert 2e6 <= sum(p.numel() for p in tiny.unet.parameters()) <= 4.5e6


def test_unet_output_projections_are_zero(tiny):
    unet = tiny.unet
    params = dict(unet.named_parameters())
    zeroed = zeroed_params(unet)
    assert len([n for n in zeroed if n.endswith("conv2.weight")]) >= 5
    assert len([n for n in zeroed if n.endswith("proj_out.weight")]) >= 3
    assert all(torch.count_nonzero(params[n]) == 0 for n in zeroed)
    # Everything else is random, not zero.
    assert torch.count_nonzero(unet.conv_in.weight) > 0
    assert all(torch.count_nonzero(params[n]) > 0 for n in params if n.endswith("conv1.weight"))
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 64)).sample
    assert torch.count_nonzero(out) == 0  # the first prediction of a fresh UNet is exactly 0


def test_freeze_stops_gradients(tiny_dir):
    comp = load_components(str(tiny_dir))
    freeze(comp.vae)
    freeze(comp.text_encoder)
    assert not comp.vae.training and not comp.text_encoder.training
    input_ids = tokenize(comp.tokenizer, ["a blue square"], 77)
    latents = comp.vae.encode(torch.rand(1, 3, 32, 32)).latent_dist.sample()
    hidden = comp.text_encoder(input_ids).last_hidden_state
    comp.unet(latents, torch.tensor([100]), hidden).sample.sub(latents).pow(2).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in comp.vae.parameters())
    assert all(p.grad is None and not p.requires_grad for p in comp.text_encoder.parameters())
    assert comp.unet.conv_out.weight.grad is not None and comp.unet.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["config.json", "unet_config.json"])
def test_config_only_unet_is_seeded_random_init(tiny_dir, tmp_path, name):
    base = config_only_unet_dir(tiny_dir, tmp_path, name)
    torch.manual_seed(1234)  # a state no seeded init below can end in
    rng_before = torch.get_rng_state()
    a = load_unet(str(base), "unet", seed=3)
    # The trainer's per-rank RNG stream must come back untouched.
    assert torch.equal(torch.get_rng_state(), rng_before)
    b = load_unet(str(base), "unet", seed=3)
    c = load_unet(str(base), "unet", seed=4)
    assert state_equal(a, b)
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    params = dict(a.named_parameters())
    assert all(torch.count_nonzero(params[n]) == 0 for n in zeroed_params(a))
    assert list(a.config.block_out_channels) == TINY_UNET["block_out_channels"]


def test_unet_from_json_file_path(tiny_dir):
    a = load_unet(str(tiny_dir / "unet" / "config.json"), seed=5)
    assert state_equal(a, build_unet(json.loads((tiny_dir / "unet" / "config.json").read_text()), seed=5))


def test_trainer_init_equals_init_tool(tiny_dir, tiny, tmp_path):
    """A config-only UNet loaded with seed S is the UNet `sd_ds.init --seed S` writes."""
    base = config_only_unet_dir(tiny_dir, tmp_path)
    comp = load_components(str(tiny_dir), unet_name_or_path=str(base / "unet"), seed=0)
    assert state_equal(comp.unet, tiny.unet)


def test_folder_with_variant_weights_is_not_random_init(tiny_dir, tmp_path):
    (tmp_path / "unet").mkdir()
    shutil.copy(tiny_dir / "unet" / "config.json", tmp_path / "unet" / "config.json")
    shutil.copy(tiny_dir / "unet" / "diffusion_pytorch_model.safetensors",
                tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ModelNotFoundError, match="UNet"):
        load_unet(str(tmp_path), "unet", seed=0)


def test_prediction_type_and_max_length_overrides(tiny_dir):
    comp = load_components(str(tiny_dir), prediction_type="v_prediction", model_max_length=32)
    assert comp.noise_scheduler.config.prediction_type == "v_prediction"
    assert comp.tokenizer.model_max_length == 32
    assert tokenize(comp.tokenizer, ["word " * 100], 32).shape == (1, 32)


def test_each_component_overridable(tiny_dir, tiny, tmp_path):
    # The base folder has only unet/ and scheduler/: the rest must come from the overrides.
    shutil.copytree(tiny_dir / "unet", tmp_path / "unet")
    shutil.copytree(tiny_dir / "scheduler", tmp_path / "scheduler")
    comp = load_components(str(tmp_path), vae_name_or_path=str(tiny_dir / "vae"),
                           text_encoder_name_or_path=str(tiny_dir / "text_encoder"),
                           tokenizer_name=str(CLIP_TOKENIZER_DIR))
    assert state_equal(comp.vae, tiny.vae) and state_equal(comp.text_encoder, tiny.text_encoder)
    assert comp.tokenizer("a cat").input_ids == tiny.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]


@pytest.mark.parametrize("where", ["CompVis/stable-diffusion-v1-4", "/nonexistent/sd-model"])
def test_missing_model_fails_with_init_hint(where):
    with pytest.raises(ModelNotFoundError) as e:
        load_components(where)
    assert where in str(e.value) and "python -m sd_ds.init" in str(e.value)


@pytest.mark.parametrize("missing", ["vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_named(tiny_dir, tmp_path, missing):
    shutil.copytree(tiny_dir, tmp_path / "model", ignore=shutil.ignore_patterns(missing))
    with pytest.raises(ModelNotFoundError) as e:
        load_components(str(tmp_path / "model"))
    assert f"{tmp_path / 'model'}/{missing}" in str(e.value) and "python -m sd_ds.init" in str(e.value)


def test_no_model_given():
    with pytest.raises(ModelNotFoundError, match="--pretrained_model_name_or_path"):
        load_components(None)


def test_configure_unet_sdpa_and_recompute(tiny_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    config = json.loads((tiny_dir / "unet" / "config.json").read_text())
    plain, recomputed = build_unet(config, seed=0), build_unet(config, seed=0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p, q in zip(plain.parameters(), recomputed.parameters()):  # non-zero everywhere: real gradients
            p.normal_(0, 0.05)
            q.copy_(p)
    configure_unet(plain, recompute=False, xformers=False)
    configure_unet(recomputed, recompute=True, xformers=False)
    assert all(isinstance(p, AttnProcessor2_0) for p in plain.attn_processors.values())
    assert recomputed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 77, 64)
    for unet in (plain, recomputed):
        unet.train()
        unet(x, t, c).sample.pow(2).mean().backward()
    for (n, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=n)


def test_xformers_missing_is_a_clear_error(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import xformers -> ImportError
    with pytest.raises(RuntimeError, match="pip install xformers"):
        configure_unet(tiny.unet, recompute=False, xformers=True)

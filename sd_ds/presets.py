"""Model presets: the UNet configs by name, and writing a from-scratch model directory (diffusers layout) to
start pretraining from. ``python -m sd_ds.init`` is the command over it.

sd-v1: the SD v1.x UNet config, randomly initialised; VAE, text encoder, tokenizer and noise-scheduler config
copied from a source (a hub id or a local diffusers folder). tiny: every component built offline (a ~4 M
parameter UNet for 8×8 latents, a VAE that downsamples 4× so 32 px images give 8×8 latents, a small CLIP text
encoder) with the real CLIP tokenizer shipped in the package and SD v1's noise schedule.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from sd_ds.models import CLIP_TOKENIZER_DIR, build_unet, from_pretrained, load_tokenizer, save_tokenizer, seeded

SD_V1_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD_V1_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    steps_offset=1, prediction_type="epsilon")

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    # Self/cross-attention only at 4×4 and 2×2: attention at full latent resolution dominates CPU step time.
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[32, 64, 128], layers_per_block=1, norm_num_groups=32, cross_attention_dim=64,
    attention_head_dim=8)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
    block_out_channels=[32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=32, scaling_factor=0.18215)
TINY_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

PRESETS = ("sd-v1", "tiny")
DEFAULT_SOURCE = "CompVis/stable-diffusion-v1-4"


def write_model_index(out: Path) -> None:
    """StableDiffusionPipeline's index, without feature extractor and safety checker (none exist offline, and a
    from-scratch model has no use for them)."""
    import diffusers

    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))


def init_model(output_dir: str | Path, *, preset: str = "sd-v1", source: Optional[str] = None, seed: int = 0,
               unet_config_only: bool = False) -> list[str]:
    """Write the model directory; returns one line per component saying what was written."""
    # Lazy, as every diffusers/transformers import here: seconds that `python -m sd_ds.init --help` and importers
    # of the preset tables do not need.
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_config = TINY_UNET if preset == "tiny" else SD_V1_UNET
    if preset == "tiny" and source is None:
        with seeded(seed + 1):  # not the UNet's stream: the same seed gives the same UNet in every preset
            vae = AutoencoderKL(**TINY_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
        vae.save_pretrained(out / "vae", safe_serialization=True)
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        save_tokenizer(load_tokenizer(str(CLIP_TOKENIZER_DIR)), out / "tokenizer")
        DDPMScheduler(**SD_V1_SCHEDULER).save_pretrained(out / "scheduler")
        written = [f"vae: tiny AutoencoderKL, random init, {_params(vae)} (32 px -> 4x8x8 latents)",
                   f"text_encoder: tiny CLIPTextModel, random init, {_params(text_encoder)}",
                   f"tokenizer: OpenAI CLIP BPE (SD v1) from {CLIP_TOKENIZER_DIR}",
                   "scheduler: DDPMScheduler, SD v1 schedule (scaled_linear 0.00085-0.012, 1000 steps, epsilon)"]
    else:
        source = source or DEFAULT_SOURCE
        written = _copy_components(source, out)
    hidden = json.loads((out / "text_encoder" / "config.json").read_text()).get("hidden_size")
    if hidden != unet_config["cross_attention_dim"]:
        written.append(f"WARNING: the text encoder's hidden_size {hidden} != the UNet's cross_attention_dim "
                       f"{unet_config['cross_attention_dim']}: the UNet cannot take its embeddings")
    shutil.rmtree(out / "unet", ignore_errors=True)
    if unet_config_only:
        (out / "unet").mkdir()
        (out / "unet" / "config.json").write_text(
            json.dumps({"_class_name": "UNet2DConditionModel", **unet_config}, indent=2))
        written.insert(0, f"unet: {preset} config only (the trainer initialises it with its --seed)")
    else:
        unet = build_unet(unet_config, seed=seed)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        written.insert(0, f"unet: {preset} UNet2DConditionModel, random init (seed {seed}), {_params(unet)}, "
                       "output projections zeroed")
    write_model_index(out)
    written.append("model_index.json: StableDiffusionPipeline (no safety checker, no feature extractor)")
    return written


def _params(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M params"


def _copy_components(source: str, out: Path) -> list[str]:
    """VAE, text encoder, tokenizer and noise-schedule config from `source`, re-saved in place."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel

    written = []
    for sub, cls in (("vae", AutoencoderKL), ("text_encoder", CLIPTextModel), ("scheduler", DDPMScheduler)):
        # DDPMScheduler reads any diffusers scheduler config (SD v1 ships PNDM): training needs only the noise
        # schedule, and sampling picks its own scheduler.
        obj = from_pretrained(cls, sub, source, sub)
        if sub == "scheduler":
            obj.save_pretrained(out / sub)
            c = obj.config
            written.append(f"scheduler: DDPMScheduler from {source} ({c.beta_schedule} {c.beta_start}-{c.beta_end}, "
                           f"{c.num_train_timesteps} steps, {c.prediction_type})")
        else:
            obj.save_pretrained(out / sub, safe_serialization=True)
            written.append(f"{sub}: {type(obj).__name__} from {source}, {_params(obj)}")
    save_tokenizer(load_tokenizer(source, subfolder="tokenizer"), out / "tokenizer")
    written.insert(2, f"tokenizer: from {source}")
    return written

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sd_ds.families import (SD_V1, SDXL, Family, FamilyMismatchError, check_components, check_pipeline_index,
                            family_of_unet)
from sd_ds.models import (CLIP_TOKENIZER_DIR, ModelNotFoundError, build_unet, from_pretrained, load_tokenizer,
                          model_not_found, save_tokenizer, seeded_torch_rng)

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

# SD 2.x (stabilityai/stable-diffusion-2-base's UNet, MLPerf Training's model): SD v1's layout with linear
# projections in the transformers, 64-channel heads (attention_head_dim is diffusers' legacy name for the number of
# heads per level) and OpenCLIP-H's 1024-wide text embeddings. 865,910,724 parameters.
SD_V2_UNET = dict(SD_V1_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
# MLPerf trains SD 2.x with v-prediction; sd-v2 writes its scheduler so (export and sampling read it from there).
SD_V2_SCHEDULER = dict(SD_V1_SCHEDULER, prediction_type="v_prediction")
# SDXL base (stabilityai/stable-diffusion-xl-base-1.0's UNet): 3 levels, transformer depth [1, 2, 10], 2048-wide
# cross-attention (CLIP-L 768 + OpenCLIP-bigG 1280), the "text_time" added embedding (bigG's 1280-wide pooled
# projection + 6 micro-conditioning numbers x 256). 2,567,463,684 parameters.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_SCHEDULER = dict(SD_V1_SCHEDULER)  # the same scaled-linear schedule, epsilon

# Tiny kinds of SD 2.x and SDXL for tests and the demo: the same architecture kinds (linear projections, per-level
# head counts, two text encoders with a pooled projection and the text_time embedding) at the tiny sizes.
TINY_SD2_UNET = dict(TINY_UNET, attention_head_dim=[2, 4, 8], use_linear_projection=True)
TINY_SD2_TEXT_ENCODER = dict(TINY_TEXT_ENCODER, hidden_act="gelu", pad_token_id=0)  # OpenCLIP: gelu, pads with "!"
TINY_SDXL_UNET = dict(
    TINY_UNET, attention_head_dim=[2, 4, 8], use_linear_projection=True, transformer_layers_per_block=[1, 1, 2],
    cross_attention_dim=96, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8)
TINY_SDXL_TEXT_ENCODER = dict(TINY_TEXT_ENCODER, hidden_size=32, intermediate_size=128, num_attention_heads=2)
TINY_SDXL_TEXT_ENCODER_2 = dict(TINY_TEXT_ENCODER, hidden_act="gelu", pad_token_id=0, projection_dim=64)
TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)


@dataclass(frozen=True)
class TinyParts:
    """What a tiny preset builds offline besides the UNet."""

    vae: dict
    text_encoders: tuple[tuple[str, str, dict], ...]  # (subfolder, transformers class, config)
    tokenizer_pads: tuple[str, ...]                    # each tokenizer's pad token (CLIP BPE vocabulary)
    scheduler: dict


@dataclass(frozen=True)
class Preset:
    name: str
    unet: dict
    default_source: Optional[str]  # hub id the frozen parts come from; None: built offline (TinyParts)
    tiny: Optional[TinyParts] = None
    prediction_type: Optional[str] = None  # written into the copied scheduler config (sd-v2: v-prediction)
    unet_weights: bool = True  # write random UNet weights by default (sd-v2/sdxl: config only, see init_model)

    @property
    def family(self) -> Family:
        return family_of_unet(self.unet)


_PAD_EOT, _PAD_BANG = "<|endoftext|>", "!"
PRESET_TABLE = {p.name: p for p in (
    Preset("sd-v1", SD_V1_UNET, "CompVis/stable-diffusion-v1-4"),
    Preset("sd-v2", SD_V2_UNET, "stabilityai/stable-diffusion-2-base", prediction_type="v_prediction",
           unet_weights=False),
    Preset("sdxl", SDXL_UNET, "stabilityai/stable-diffusion-xl-base-1.0", unet_weights=False),
    Preset("tiny", TINY_UNET, None, TinyParts(TINY_VAE, (("text_encoder", "CLIPTextModel", TINY_TEXT_ENCODER),),
                                              (_PAD_EOT,), SD_V1_SCHEDULER)),
    Preset("tiny-sd2", TINY_SD2_UNET, None, TinyParts(
        TINY_VAE, (("text_encoder", "CLIPTextModel", TINY_SD2_TEXT_ENCODER),), (_PAD_BANG,), SD_V2_SCHEDULER)),
    Preset("tiny-sdxl", TINY_SDXL_UNET, None, TinyParts(
        TINY_SDXL_VAE, (("text_encoder", "CLIPTextModel", TINY_SDXL_TEXT_ENCODER),
                        ("text_encoder_2", "CLIPTextModelWithProjection", TINY_SDXL_TEXT_ENCODER_2)),
        (_PAD_EOT, _PAD_BANG), SDXL_SCHEDULER)),
)}
PRESETS = tuple(PRESET_TABLE)
DEFAULT_SOURCE = PRESET_TABLE["sd-v1"].default_source
TEXT_ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


def write_model_index(out: Path, family: Family = SD_V1) -> None:
    """The family's pipeline index, without feature extractor, image encoder and safety checker (none exist
    offline, and a from-scratch model has no use for them)."""
    import diffusers

    index: dict = {"_class_name": family.pipeline_class, "_diffusers_version": diffusers.__version__,
                   "feature_extractor": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for sub in family.text_encoders:
        index[sub] = ["transformers", TEXT_ENCODER_CLASSES[sub]]
    for sub in family.tokenizers:
        index[sub] = ["transformers", "CLIPTokenizer"]
    if family.is_sdxl:
        index.update({"image_encoder": [None, None], "force_zeros_for_empty_prompt": True})
    else:
        index.update({"safety_checker": [None, None], "requires_safety_checker": False})
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2))


def init_model(output_dir: str | Path, *, preset: str = "sd-v1", source: Optional[str] = None, seed: int = 0,
               unet_config_only: Optional[bool] = None, unet_config: Optional[dict] = None) -> list[str]:
    """Write the model directory; returns one line per component saying what was written.

    ``unet_config``: any diffusers UNet2DConditionModel config instead of the preset's (its family decides which
    frozen parts ``source`` must have). ``unet_config_only`` None: the preset's default (sd-v2 and sdxl write the
    config only: 3.5 / 10 GB of random weights that the trainer makes from its --seed at start anyway)."""
    if preset not in PRESET_TABLE:
        raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}")
    spec = PRESET_TABLE[preset]
    if unet_config is not None:
        spec = Preset("custom", {k: v for k, v in unet_config.items() if not k.startswith("_")},
                      spec.default_source if family_of_unet(unet_config) == spec.family else None,
                      unet_weights=False)
        if source is None and spec.default_source is None:
            raise ValueError("--unet_config needs --source: the diffusers folder or hub id whose VAE, text "
                             f"encoder(s), tokenizer(s) and scheduler fit a {spec.family.name} UNet")
    family = spec.family
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.tiny is not None and source is None:
        written = _build_tiny_parts(spec.tiny, out, seed)
    else:
        source = source or spec.default_source
        # sd-v1 keeps its warning for a text encoder of another width (its tests and users rely on it); every
        # other preset refuses a source that cannot make one model with its UNet, before copying gigabytes.
        written = _copy_components(source, out, family, spec, strict=spec.name != "sd-v1")
    if family != SDXL:
        hidden = json.loads((out / "text_encoder" / "config.json").read_text()).get("hidden_size")
        if hidden != spec.unet["cross_attention_dim"]:
            written.append(f"WARNING: the text encoder's hidden_size {hidden} != the UNet's cross_attention_dim "
                           f"{spec.unet['cross_attention_dim']}: the UNet cannot take its embeddings")
    shutil.rmtree(out / "unet", ignore_errors=True)
    if unet_config_only if unet_config_only is not None else not spec.unet_weights:
        (out / "unet").mkdir()
        (out / "unet" / "config.json").write_text(
            json.dumps({"_class_name": "UNet2DConditionModel", **spec.unet}, indent=2))
        written.insert(0, f"unet: {spec.name} ({family.name}) config only, {unet_parameters(spec.unet):,} parameters "
                       "(the trainer initialises it with its --seed)")
    else:
        unet = build_unet(spec.unet, seed=seed)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        written.insert(0, f"unet: {spec.name} UNet2DConditionModel, random init (seed {seed}), {_params(unet)}, "
                       "output projections zeroed")
    write_model_index(out, family)
    extra = "force_zeros_for_empty_prompt" if family.is_sdxl else "no safety checker, no feature extractor"
    written.append(f"model_index.json: {family.pipeline_class} ({extra})")
    return written


def unet_parameters(config: dict) -> int:
    """The parameter count of a UNet config, on the meta device (no memory allocated)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return sum(p.numel() for p in unet.parameters())


def _params(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M params"


def _build_tiny_parts(tiny: TinyParts, out: Path, seed: int) -> list[str]:
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig

    written = []
    # Not the UNet's stream: the same seed gives the same UNet in every preset.
    with seeded_torch_rng(seed + 1):
        vae = AutoencoderKL(**tiny.vae)
        encoders = [(sub, getattr(transformers, cls)(CLIPTextConfig(**config))) for sub, cls, config in tiny.text_encoders]
    vae.save_pretrained(out / "vae", safe_serialization=True)
    written.append(f"vae: tiny AutoencoderKL, random init, {_params(vae)} (32 px -> 4x8x8 latents, scaling_factor "
                   f"{tiny.vae['scaling_factor']})")
    for sub, encoder in encoders:
        encoder.save_pretrained(out / sub, safe_serialization=True)
        written.append(f"{sub}: tiny {type(encoder).__name__}, random init, {_params(encoder)}")
    for sub, pad in zip(("tokenizer", "tokenizer_2"), tiny.tokenizer_pads):
        tokenizer = load_tokenizer(str(CLIP_TOKENIZER_DIR))
        tokenizer.pad_token = pad
        save_tokenizer(tokenizer, out / sub)
        written.append(f"{sub}: CLIP BPE from {CLIP_TOKENIZER_DIR}, padded with {pad!r}")
    scheduler = DDPMScheduler(**tiny.scheduler)
    scheduler.save_pretrained(out / "scheduler")
    written.append(f"scheduler: DDPMScheduler, SD schedule (scaled_linear 0.00085-0.012, 1000 steps, "
                   f"{scheduler.config.prediction_type})")
    return written


def _copy_components(source: str, out: Path, family: Family, spec: Preset, *, strict: bool) -> list[str]:
    """VAE, text encoder(s), tokenizer(s) and noise-schedule config from ``source``, re-saved in place; with
    ``strict``, first checked (configs only) to make one model of ``family`` with the preset's UNet."""
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig

    if strict:
        where, index = f"--source {source}", _model_index(source)
        check_pipeline_index(family, index, where=where)
        configs = []
        for i, sub in enumerate(family.text_encoders):
            try:
                configs.append(_source_config(CLIPTextConfig, source, sub))
            except ModelNotFoundError:
                if i == 0:
                    raise
                raise FamilyMismatchError(f"{where}: {family.name} takes {len(family.text_encoders)} text encoders "
                                          f"({', '.join(family.text_encoders)}); there is no {sub} there") from None
        check_components(family, spec.unet, configs, where=where, model_index=index)
    written = []
    vae = from_pretrained(AutoencoderKL, "vae", source, "vae")
    vae.save_pretrained(out / "vae", safe_serialization=True)
    written.append(f"vae: AutoencoderKL from {source}, {_params(vae)}, scaling_factor {vae.config.scaling_factor}")
    del vae
    for sub in family.text_encoders:
        encoder = from_pretrained(getattr(transformers, TEXT_ENCODER_CLASSES[sub]), sub, source, sub)
        encoder.save_pretrained(out / sub, safe_serialization=True)
        written.append(f"{sub}: {type(encoder).__name__} from {source}, {_params(encoder)}")
        del encoder
    for sub in family.tokenizers:
        save_tokenizer(load_tokenizer(source, subfolder=sub), out / sub)
        written.append(f"{sub}: from {source}")
    # DDPMScheduler reads any diffusers scheduler config (SD ships PNDM, SDXL Euler): training needs only the
    # noise schedule, and sampling picks its own scheduler.
    scheduler = from_pretrained(DDPMScheduler, "scheduler", source, "scheduler",
                                **({"prediction_type": spec.prediction_type} if spec.prediction_type else {}))
    scheduler.save_pretrained(out / "scheduler")
    c = scheduler.config
    written.append(f"scheduler: DDPMScheduler from {source} ({c.beta_schedule} {c.beta_start}-{c.beta_end}, "
                   f"{c.num_train_timesteps} steps, {c.prediction_type})")
    return written


def _source_config(cls: Any, source: str, subfolder: str) -> dict:
    if Path(source).is_dir() and not (Path(source) / subfolder / "config.json").is_file():
        # (transformers 5 answers a missing local subfolder with a default config instead of an error)
        raise model_not_found(subfolder, f"{source}/{subfolder}", FileNotFoundError("no config.json there"))
    try:
        return cls.from_pretrained(source, subfolder=subfolder).to_dict()
    except (OSError, ValueError) as e:
        raise model_not_found(subfolder, f"{source}/{subfolder}", e) from e


def _model_index(source: str) -> Optional[dict]:
    local = Path(source) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(source).exists():
        return None
    try:  # a hub id: its model_index.json (from the local cache when offline)
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())
    except Exception:  # noqa: BLE001 - no index is no evidence either way; the components are checked
        return None

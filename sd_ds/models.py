"""Loading the Stable Diffusion components (no DeepSpeed here).

Every component loads with ``from_pretrained`` from a hub id or a local directory: from the subfolders of
``pretrained_model_name_or_path`` (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``), each
overridable on its own. A UNet location holding only a config is built from it and randomly initialised —
pretraining from scratch — with the output projections zeroed as latent diffusion does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger("sd_ds.models")

CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")


@dataclass
class Components:
    unet: Any            # diffusers.UNet2DConditionModel
    vae: Any             # diffusers.AutoencoderKL
    text_encoder: Any    # transformers.CLIPTextModel
    tokenizer: Any       # transformers.CLIPTokenizer
    noise_scheduler: Any  # diffusers.DDPMScheduler


class ModelNotFoundError(FileNotFoundError):
    pass


def _not_found(what: str, where: str, err: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load the {what} from {where!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        "Pass a local directory or a hub id that is reachable; to create a from-scratch model directory run "
        "`python -m sd_ds.init --output_dir DIR --preset sd-v1 --source CompVis/stable-diffusion-v1-4` "
        "(or `--preset tiny`, offline).")


def _location(override: Optional[str], base: Optional[str], subfolder: str, what: str) -> tuple[str, Optional[str]]:
    if override:
        return override, None
    if base:
        return base, subfolder
    raise ModelNotFoundError(f"no {what}: pass --pretrained_model_name_or_path (or --{subfolder}_name_or_path)")


def clean_caption(text: str) -> str:
    """OpenAI CLIP's caption clean-up (``basic_clean`` + ``whitespace_clean`` of its SimpleTokenizer): ftfy's
    text repair (which also straightens curly quotes), HTML entities unescaped, whitespace collapsed. The
    transformers tokenizer skips these steps; applying them first makes our ids identical to CLIP's own."""
    import html
    import re

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is in requirements.txt; without it only mojibake/quote repair is lost
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer: Any, captions: list[str], max_length: int) -> torch.Tensor:
    """Token ids [B, max_length]: cleaned as CLIP does, padded with <|endoftext|> as SD v1, truncated."""
    return tokenizer([clean_caption(c) for c in captions], padding="max_length", max_length=max_length,
                     truncation=True, return_tensors="pt").input_ids


def zero_output_projections(unet: torch.nn.Module) -> int:
    """Zero what latent diffusion's ``zero_module`` zeroes (and the seed's ``init_weights`` does): the final
    ``conv_out``, each ResNet block's ``conv2`` and each transformer block's ``proj_out``. Every residual branch
    then starts as the identity and the first prediction is exactly 0, which keeps early training stable."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    zeroed = []
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            zeroed.append(module.conv2)
        elif isinstance(module, Transformer2DModel):
            zeroed.append(module.proj_out)
    zeroed.append(unet.conv_out)
    with torch.no_grad():
        for m in zeroed:
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()
    return len(zeroed)


def _config_only_path(path: Path) -> Optional[Path]:
    """The config to build from when `path` holds a UNet config but no weights, else None."""
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir() and not any((path / w).exists() for w in WEIGHT_FILES):
        for name in ("config.json", "unet_config.json"):
            if (path / name).is_file():
                return path / name
    return None


def load_unet(path_or_id: str, subfolder: Optional[str] = None, seed: Optional[int] = None) -> Any:
    from diffusers import UNet2DConditionModel

    local = Path(path_or_id) / (subfolder or "")
    config_path = _config_only_path(local) if local.exists() else None
    if config_path is not None:
        if seed is not None:
            torch.manual_seed(seed)  # every rank builds the same random UNet
        unet = UNet2DConditionModel.from_config(json.loads(config_path.read_text()))
        n = zero_output_projections(unet)
        logger.info("UNet randomly initialised from %s (%d output projections zeroed)", config_path, n)
        return unet
    try:
        return UNet2DConditionModel.from_pretrained(path_or_id, subfolder=subfolder)
    except (OSError, ValueError) as e:
        raise _not_found("UNet", f"{path_or_id}{'/' + subfolder if subfolder else ''}", e) from e


def load_components(pretrained_model_name_or_path: Optional[str], *, unet_name_or_path: Optional[str] = None,
                    vae_name_or_path: Optional[str] = None, text_encoder_name_or_path: Optional[str] = None,
                    tokenizer_name: Optional[str] = None, prediction_type: Optional[str] = None,
                    model_max_length: int = 77, seed: Optional[int] = None) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    base = pretrained_model_name_or_path
    unet = load_unet(*_location(unet_name_or_path, base, "unet", "UNet"), seed=seed)

    def load(cls: Any, what: str, override: Optional[str], sub: str, **kw: Any) -> Any:
        where, subfolder = _location(override, base, sub, what)
        try:
            return cls.from_pretrained(where, **({"subfolder": subfolder} if subfolder else {}), **kw)
        except (OSError, ValueError) as e:
            raise _not_found(what, f"{where}{'/' + subfolder if subfolder else ''}", e) from e

    vae = load(AutoencoderKL, "VAE", vae_name_or_path, "vae")
    text_encoder = load(CLIPTextModel, "text encoder", text_encoder_name_or_path, "text_encoder")
    tokenizer = load(CLIPTokenizer, "tokenizer", tokenizer_name, "tokenizer", model_max_length=model_max_length)
    noise_scheduler = load(DDPMScheduler, "noise scheduler", None, "scheduler",
                           **({"prediction_type": prediction_type} if prediction_type else {}))
    return Components(unet, vae, text_encoder, tokenizer, noise_scheduler)


def configure_unet(unet: Any, *, recompute: bool, xformers: bool) -> None:
    """Attention backend and activation checkpointing."""
    if xformers:
        try:
            import xformers  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "--enable_xformers_memory_efficient_attention (or FLAG_XFORMERS=1) needs xformers: "
                "`pip install xformers` matching your torch build, or drop the flag to use PyTorch SDPA") from e
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())  # PyTorch scaled_dot_product_attention
    if recompute:
        unet.enable_gradient_checkpointing()


def freeze(module: torch.nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()

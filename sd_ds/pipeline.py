"""One home for drawing images: build a StableDiffusionPipeline (from in-memory components or an exported folder),
generate seeded images, and tile them. Image logging, ``sd_ds.sample``, ``sd_ds.evaluate``, the demo and the
bench scripts all draw through here, so a prompt with a seed gives the same image everywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from PIL import Image

if TYPE_CHECKING:
    from sd_ds.families import Family

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
MAX_GRID_COLUMNS = 8


def make_scheduler(name: str, config: Any) -> Any:
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def assemble_pipeline(family: "Family", *, vae: Any, unet: Any, text_encoders: Sequence[Any], tokenizers: Sequence[Any],
                      scheduler: Any) -> Any:
    """The family's diffusers pipeline on these modules: StableDiffusionPipeline (no safety checker) for SD v1/2.x,
    StableDiffusionXLPipeline (zeros for the empty prompt, as SDXL trains; no watermarker) for SDXL."""
    import diffusers

    parts = dict(vae=vae, unet=unet, scheduler=scheduler)
    for sub, module in zip(family.text_encoders, text_encoders):
        parts[sub] = module
    for sub, tokenizer in zip(family.tokenizers, tokenizers):
        parts[sub] = tokenizer
    if family.is_sdxl:
        return diffusers.StableDiffusionXLPipeline(
            **parts, force_zeros_for_empty_prompt=family.force_zeros_for_empty_prompt, add_watermarker=False)
    return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)


@torch.no_grad()
def pipeline_from_components(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, noise_scheduler: Any) -> Any:
    """A StableDiffusionPipeline on in-memory modules (no safety checker), sampling with DDIM from the training
    scheduler's config, progress bar off: what image logging, training-time evaluation and benchmarks draw with."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler("ddim", noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(model: str | Path, *, scheduler: str = "ddim", device: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None) -> Any:
    """An exported model (diffusers folder, ``python -m sd_ds.export``) or hub id, in the pipeline its
    model_index.json names (StableDiffusionPipeline, StableDiffusionXLPipeline); fp16 on CUDA, fp32 elsewhere
    (SDXL's VAE overflows in fp16: its ``force_upcast`` config decodes in fp32, or use the fp16-fix VAE)."""
    from diffusers import DiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    index = DiffusionPipeline.load_config(str(model))
    extra = {} if index.get("_class_name", "").startswith("StableDiffusionXL") else {
        "safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype, **extra)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def training_resolution(model: str | Path) -> Optional[int]:
    """The resolution an sd-ds export was trained at, or None (another diffusers folder, or a hub id)."""
    info = Path(model) / "sd_ds_export.json"
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("resolution")


@torch.no_grad()
def generate(pipe: Any, prompts: Sequence[str], *, steps: int, guidance_scale: float, seed: int = 0,
             seeds: Optional[Sequence[int]] = None, batch_size: int = 1, width: Optional[int] = None,
             height: Optional[int] = None, eta: float = 0.0) -> list[Image.Image]:
    """One image per prompt. Prompt i uses a generator seeded with ``seeds[i]`` (default ``seed + i``), so its
    starting noise does not depend on the batch it is drawn in. ``batch_size`` prompts go through the UNet
    together (faster on a GPU); callers that need bit-identical images on any number of ranks keep the batches
    themselves fixed (sd_ds.evaluate cuts the prompt list into batches before dealing them to ranks)."""
    seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    gen_device = "cpu" if pipe.unet.device.type == "mps" else pipe.unet.device
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator(device=gen_device).manual_seed(s) for s in seeds[start:start + batch_size]]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                   width=width, height=height, eta=eta)
        images.extend(out.images)
    return images


def image_grid(images: Sequence[Image.Image], cols: Optional[int] = None) -> Image.Image:
    """Tile equally sized images row-major (diffusers' make_image_grid), the last row padded with black."""
    from diffusers.utils import make_image_grid

    if not images:
        raise ValueError("no images to tile")
    cols = cols or min(len(images), MAX_GRID_COLUMNS)
    rows = math.ceil(len(images) / cols)
    blank = Image.new("RGB", images[0].size)
    padded = [img.convert("RGB") for img in images] + [blank] * (rows * cols - len(images))
    return make_image_grid(padded, rows=rows, cols=cols)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] uint8, or float in [-1,1] → PIL images."""
    if pixels.dtype != torch.uint8:
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]

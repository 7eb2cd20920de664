"""Generate images from an exported model (a diffusers folder): the sample CLI and ``generate``.

    python -m sd_ds.sample --model exported_model --prompt "a red circle on a blue background" --output out.png

Images are drawn at the resolution the model was trained at (recorded by ``sd_ds.export`` in
``sd_ds_export.json``) unless --height/--width say otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from sd_ds.image_logging import image_grid

logger = logging.getLogger("sd_ds.sample")

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


def make_scheduler(name: str, config: Any) -> Any:
    import diffusers

    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


@torch.no_grad()
def pipeline_from_components(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, noise_scheduler: Any) -> Any:
    """A StableDiffusionPipeline on in-memory modules (no safety checker), sampling with DDIM from the training
    scheduler's config, progress bar off: what image logging and benchmarks draw with."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler("ddim", noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, prompts: Sequence[str], *, steps: int, guidance_scale: float, seed: int,
             width: Optional[int] = None, height: Optional[int] = None, eta: float = 0.0) -> list[Image.Image]:
    """One image per prompt; prompt i uses the generator seeded with seed + i, so a prompt's image does not
    depend on the batch it was generated in."""
    device = pipe.unet.device
    gen_device = "cpu" if device.type == "mps" else device
    images = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator(device=gen_device).manual_seed(seed + i)
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=g,
                   width=width, height=height, eta=eta)
        images.append(out.images[0])
    return images


def load_pipeline(model: str | Path, *, scheduler: str = "ddim", device: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None) -> Any:
    from diffusers import StableDiffusionPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def training_resolution(model: str | Path) -> Optional[int]:
    """The resolution an sd-ds export was trained at, or None (another diffusers folder, or a hub id)."""
    info = Path(model) / "sd_ds_export.json"
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("resolution")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_ds.sample",
                                description="Text-to-image with an exported sd-ds model (a diffusers folder).")
    p.add_argument("--model", required=True, help="diffusers folder (python -m sd_ds.export) or hub id")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt; repeat the flag for several prompts")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same images")
    p.add_argument("--width", type=int, default=None,
                   help="image width (default: the training resolution recorded at export, else the UNet's size)")
    p.add_argument("--height", type=int, default=None,
                   help="image height (default: the training resolution recorded at export, else the UNet's size)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim", help="sampler")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--output", default="out.png", help="PNG path; several images are tiled into one grid")
    args = p.parse_args(argv)
    pipe = load_pipeline(args.model, scheduler=args.scheduler, device=args.device)
    trained_at = training_resolution(args.model)
    width, height = args.width or trained_at, args.height or trained_at
    prompts = [pr for pr in args.prompt for _ in range(args.num_images)]
    images = generate(pipe, prompts, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                      width=width, height=height)
    out = image_grid(images, cols=args.num_images if len(args.prompt) > 1 else None)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.output)
    print(f"wrote {args.output} ({len(images)} image(s), {out.size[0]}x{out.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

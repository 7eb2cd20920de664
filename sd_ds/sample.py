"""Generate images: the sample CLI, and the sample grids the trainer logs.

    python -m sd_ds.sample --model exported_model --prompt "a red circle on a blue background" --output out.png
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from sd_ds.logging import image_grid

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
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim", help="sampler")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--output", default="out.png", help="PNG path; several images are tiled into one grid")
    args = p.parse_args(argv)
    pipe = load_pipeline(args.model, scheduler=args.scheduler, device=args.device)
    prompts = [pr for pr in args.prompt for _ in range(args.num_images)]
    images = generate(pipe, prompts, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                      width=args.width, height=args.height)
    out = image_grid(images, cols=args.num_images if len(args.prompt) > 1 else None)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.output)
    print(f"wrote {args.output} ({len(images)} image(s), {out.size[0]}x{out.size[1]})")
    return 0


# --- the trainer's image logging -----------------------------------------------------------------

def _to_pil(batch: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] in [-1,1] → PIL images."""
    arr = ((batch.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def log_training_images(cfg: Any, engine: Any, comp: Any, ema: Any, batch: dict, metrics: Any, step: int, *,
                        is_main_process: bool, device: torch.device, max_images: int = 8) -> None:
    """VAE reconstructions of up to 8 training images, DDIM samples (eta 0) for their captions without and with
    guidance 7.5, and the fixed --validation_prompts; with the EMA weights when EMA is on. Written to
    TensorBoard and as PNGs under output_dir/samples/. Collective (EMA gather); generation on the main process,
    the other ranks wait at the barrier."""
    from sd_ds.distributed import barrier

    ema_state = ema.full_state_dict() if ema is not None else None
    try:
        if not is_main_process:
            return
        module = engine.module
        unet = module.unet
        if ema_state is not None:
            unet = copy.deepcopy(module.unet)
            unet.load_state_dict({k[len("unet."):]: v for k, v in ema_state.items() if k.startswith("unet.")})
        text_encoder = module.text_encoder if module.text_encoder is not None else comp.text_encoder
        was_training = unet.training
        unet.eval()
        try:
            grids, captions = _sample_grids(cfg, comp, unet, text_encoder, batch, step, device, max_images)
        finally:
            unet.train(was_training)
        out_dir = Path(cfg.output_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"step_{step:08d}_captions.txt").write_text("\n".join(captions) + "\n")
        for name, grid in grids.items():
            grid.save(out_dir / f"step_{step:08d}_{name}.png")
            metrics.log_images(f"images/{name}", grid, step)
    finally:
        barrier()


@torch.no_grad()
def _sample_grids(cfg: Any, comp: Any, unet: Any, text_encoder: Any, batch: dict, step: int, device: torch.device,
                  max_images: int) -> tuple[dict[str, Image.Image], list[str]]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=comp.vae, text_encoder=text_encoder, tokenizer=comp.tokenizer, unet=unet,
                                   scheduler=make_scheduler("ddim", comp.noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    n = min(max_images, batch["pixel_values"].shape[0])
    captions = list(batch["captions"][:n])
    steps = cfg.logging.num_inference_steps
    pixels = batch["pixel_values"][:n].to(device, dtype=comp.vae.dtype)
    recon = comp.vae.decode(comp.vae.encode(pixels).latent_dist.mode()).sample
    grids = {
        "reconstruction": image_grid(_to_pil(pixels) + _to_pil(recon), cols=n),
        # The seed logs both: unguided samples show what the model learned, guided ones what users will see.
        "samples_guidance_1": image_grid(generate(pipe, captions, steps=steps, guidance_scale=1.0, seed=step), cols=n),
        "samples_guidance_7.5": image_grid(generate(pipe, captions, steps=steps, guidance_scale=7.5, seed=step), cols=n),
    }
    if cfg.logging.validation_prompts:
        grids["validation_prompts"] = image_grid(
            generate(pipe, cfg.logging.validation_prompts, steps=steps, guidance_scale=7.5, seed=0))
    return grids, captions


if __name__ == "__main__":
    sys.exit(main())

"""The sample CLI: images from an exported model (a diffusers folder), drawn through ``sd_ds.pipeline``.

    python -m sd_ds.sample --model exported_model --prompt "a red circle on a blue background" --output out.png

Images are drawn at the resolution the model was trained at (recorded by ``sd_ds.export`` in
``sd_ds_export.json``) unless --height/--width say otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from sd_ds.pipeline import SCHEDULERS, generate, image_grid, load_pipeline, training_resolution

logger = logging.getLogger("sd_ds.sample")


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
    p.add_argument("--batch_size", type=int, default=4,
                   help="images drawn together (one UNet call per step for all of them): faster, more memory; "
                        "each image has its own seed, so the images do not depend on it")
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
                      batch_size=args.batch_size, width=width, height=height)
    out = image_grid(images, cols=args.num_images if len(args.prompt) > 1 else None)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.save(args.output)
    print(f"wrote {args.output} ({len(images)} image(s), {out.size[0]}x{out.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write a from-scratch model directory (diffusers layout) to start pretraining from.

    python -m sd_ds.init --output_dir ./sd-v1-init --preset sd-v1 --source CompVis/stable-diffusion-v1-4
    python -m sd_ds.init --output_dir ./tiny --preset tiny          # offline, for tests and the demo

sd-v1: the SD v1.x UNet config, randomly initialised; VAE, text encoder, tokenizer and noise-scheduler config
copied from ``--source`` (a hub id or a local diffusers folder). tiny: every component built offline (a ~4 M
parameter UNet for 8×8 latents, a VAE that downsamples 4× so 32 px images give 8×8 latents, a small CLIP text
encoder) with the real CLIP tokenizer shipped in the package and SD v1's noise schedule.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from sd_ds.presets import DEFAULT_SOURCE, PRESETS, init_model


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_ds.init", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="model directory to write")
    p.add_argument("--preset", choices=PRESETS, default="sd-v1", help="UNet size and where the rest comes from")
    p.add_argument("--source", default=None,
                   help="hub id or local diffusers folder to copy VAE/text encoder/tokenizer/scheduler from "
                   f"(sd-v1 default: {DEFAULT_SOURCE}; tiny default: built offline)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random UNet (and tiny components)")
    p.add_argument("--unet_config_only", action="store_true",
                   help="write only the UNet config; the trainer then initialises it at start (saves disk)")
    a = p.parse_args(argv)
    try:
        written = init_model(a.output_dir, preset=a.preset, source=a.source, seed=a.seed,
                             unet_config_only=a.unet_config_only)
    except FileNotFoundError as e:
        p.error(str(e))
    print(f"wrote the {a.preset} model to {a.output_dir}:")
    for line in written:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

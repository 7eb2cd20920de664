"""Write a from-scratch model directory (diffusers layout) to start pretraining from.

    python -m sd_ds.init --output_dir ./sd-v1-init --preset sd-v1 --source CompVis/stable-diffusion-v1-4
    python -m sd_ds.init --output_dir ./sd-v2-init --preset sd-v2 --source stabilityai/stable-diffusion-2-base
    python -m sd_ds.init --output_dir ./sdxl-init --preset sdxl --source stabilityai/stable-diffusion-xl-base-1.0
    python -m sd_ds.init --output_dir ./tiny --preset tiny          # offline, for tests and the demo (also tiny-sd2,
                                                                    # tiny-sdxl)
    python -m sd_ds.init --output_dir ./wide --unet_config wide_unet.json --source DIR_OR_HUB_ID

sd-v1, sd-v2, sdxl: the family's full-size UNet config (random init: sd-v1 writes the weights, sd-v2 and sdxl
the config only, which the trainer initialises from its --seed); VAE, text encoder(s), tokenizer(s) and
noise-scheduler config copied from ``--source`` (a hub id or a local diffusers folder of that family; sd-v2's
scheduler is set to v-prediction, as MLPerf trains it). A source whose text encoders do not fit the UNet, or of
another family, stops with one line. tiny, tiny-sd2, tiny-sdxl: every component built offline at tiny sizes with
the family's architecture kinds (a ~4-6 M parameter UNet for 8x8 latents, a VAE that downsamples 4x so 32 px
images give 8x8 latents, small CLIP text encoders) and the real CLIP tokenizer shipped in the package.
--unet_config: any diffusers UNet2DConditionModel config (a wider or deeper variant); its family (read from it)
decides which frozen parts --source must have.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import json
from pathlib import Path

from sd_ds.families import FamilyMismatchError
from sd_ds.presets import PRESET_TABLE, PRESETS, init_model


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_ds.init", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="model directory to write")
    p.add_argument("--preset", choices=PRESETS, default="sd-v1", help="UNet size and where the rest comes from")
    sources = "; ".join(f"{name}: {spec.default_source or 'built offline'}" for name, spec in PRESET_TABLE.items())
    p.add_argument("--source", default=None,
                   help=f"hub id or local diffusers folder to copy VAE/text encoder(s)/tokenizer(s)/scheduler from "
                   f"(defaults: {sources})")
    p.add_argument("--unet_config", default=None, metavar="FILE.json",
                   help="a diffusers UNet2DConditionModel config.json to use instead of the preset's UNet (needs "
                   "--source unless it is of the preset's family)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random UNet (and tiny components)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--unet_config_only", action="store_true", default=None,
                         help="write only the UNet config; the trainer then initialises it at start (saves disk; "
                         "the default of sd-v2, sdxl and --unet_config)")
    weights.add_argument("--unet_weights", dest="unet_config_only", action="store_false",
                         help="also write the randomly initialised UNet weights (the default of sd-v1 and tiny*)")
    a = p.parse_args(argv)
    try:
        unet_config = json.loads(Path(a.unet_config).read_text()) if a.unet_config else None
    except (OSError, ValueError) as e:
        p.error(f"--unet_config {a.unet_config}: {e}")
    try:
        written = init_model(a.output_dir, preset=a.preset, source=a.source, seed=a.seed,
                             unet_config_only=a.unet_config_only, unet_config=unet_config)
    except (FileNotFoundError, FamilyMismatchError, ValueError) as e:
        p.error(str(e))
    print(f"wrote the {'--unet_config' if unet_config else a.preset} model to {a.output_dir}:")
    for line in written:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

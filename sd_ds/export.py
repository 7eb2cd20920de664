"""Export a training checkpoint to a Hugging Face diffusers folder.

    python -m sd_ds.export output_dir/checkpoint-20000 exported_model [--ema]

The UNet weights are DeepSpeed's own fp32 consolidation of the ZeRO partitions (``zero_to_fp32``), or with
``--ema`` the consolidated EMA partitions; nothing here starts torch.distributed, so it runs on a laptop.
The frozen parts (VAE, text encoder, tokenizer, scheduler config, UNet config) come from the copy the
trainer keeps in ``output_dir/base_model/``, so the export does not depend on the original model path.
The work is done by ``sd_ds.diffusers_export``; this module is its command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from sd_ds.checkpoint import list_checkpoints
from sd_ds.diffusers_export import ExportTargetError, export_checkpoint
from sd_ds.fileio import is_disk_full


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sd_ds.export",
        description="Write a complete diffusers folder (model_index.json, unet, vae, text_encoder, tokenizer, "
        "scheduler; safetensors) from an sd-ds checkpoint. StableDiffusionPipeline.from_pretrained loads it. "
        "DeepSpeed's pickled checkpoint files are read with weights-only unpickling: a tampered checkpoint fails to "
        "load instead of running code.")
    parser.add_argument("checkpoint", help="output_dir/checkpoint-STEP (or output_dir: its newest checkpoint)")
    parser.add_argument("output_dir", help="where the diffusers folder is written")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with --use_ema)")
    parser.add_argument("--base_model", default=None,
                        help="model dir with vae/ text_encoder/ tokenizer/ scheduler/ unet config "
                        "(default: the run's output_dir/base_model)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output_dir even when it holds files that are not an earlier sd-ds export "
                        "(without it such a folder is refused; an earlier export is always replaced, whole). The "
                        "export is written beside output_dir and moved into place at the end: an interrupted or "
                        "failed export leaves output_dir as it was")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ckpt = Path(args.checkpoint)
    if not (ckpt / "trainer_state.json").is_file():
        found = list_checkpoints(ckpt)
        if not found:
            parser.error(f"{ckpt}: no complete checkpoint there")
        ckpt = found[-1][1]
    try:
        out = export_checkpoint(ckpt, args.output_dir, ema=args.ema, base_model=args.base_model,
                                overwrite=args.overwrite)
    except FileNotFoundError as e:
        parser.error(str(e))
    except ExportTargetError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except Exception as e:  # noqa: BLE001 - only a full disk is answered here; anything else is re-raised
        if not is_disk_full(e):
            raise
        kept = ("is as it was" if Path(args.output_dir).exists() else "was not created")
        parser.exit(1, f"{parser.prog}: error: no space left on device while exporting {ckpt} to {args.output_dir}; "
                       f"{args.output_dir} {kept} (the partial export was removed)\n")
    print(f"exported {ckpt}{' (EMA)' if args.ema else ''} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

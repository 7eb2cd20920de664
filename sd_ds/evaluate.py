"""FID and CLIP score on the MLPerf Training Stable Diffusion protocol: ``python -m sd_ds.evaluate``.

    # generate one image per caption (seeded) and score them against reference statistics
    python -m sd_ds.evaluate --model exported_model --prompts coco_captions.txt --num_images 30000 \\
        --reference val2014_512.npz --output metrics.json
    # the same on 8 GPUs (every rank generates and scores its share; rank 0 writes the JSON)
    deepspeed --num_gpus 8 --module sd_ds.evaluate --model ... (or torchrun --nproc_per_node 8 -m sd_ds.evaluate ...)
    # score a folder of existing images; write a reference set's statistics once
    python -m sd_ds.evaluate --images generated/ --prompts captions.txt --reference ref_images/
    python -m sd_ds.evaluate --reference ref_shards/ --save_reference_stats ref.npz

Defaults follow MLPerf Training's Stable Diffusion benchmark: DDIM, 50 steps, guidance 8.0; FID from pytorch-fid's
InceptionV3 (``pt_inception-2015-12-05``, 2048-d pool features; pytorch-fid's own code computes the statistics and
the distance), CLIP score = mean raw cosine similarity of image and caption embeddings of OpenCLIP ViT-H-14
``laion2b_s32b_b79k`` (open_clip's model and preprocessing). The library is ``sd_ds.fid_clip``; this module is its
command line.

Reproducible on any number of ranks: image i is drawn from seed ``--seed + i``; the image list is cut into
batches of ``--batch_size`` before the batches are dealt to ranks round robin, so each batch (and each image's
features) is the same whatever the number of ranks. Features and scores are gathered on rank 0 in image order
(CPU objects on the gloo control group).

Needs the ``eval`` extra (``pip install -e .[eval]`` / requirements-eval.txt: pytorch-fid, open-clip-torch and
torchvision); the trainer does not.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from sd_ds.diffusers_export import export_checkpoint
from sd_ds.distributed import DistInfo, close_distributed, init_distributed
from sd_ds.fid_clip import (CLIP_MODEL, CLIP_PRETRAINED, FID_WEIGHTS_FILE, MissingWeightsError, Scorers,
                            evaluate_folder, evaluate_generated, load_clip, load_fid_inception, parse_metrics,
                            read_prompts, read_statistics, reference_statistics, save_statistics)
from sd_ds.fileio import write_json_atomic
from sd_ds.lifecycle import run_to_exit
from sd_ds.pipeline import load_pipeline, training_resolution

# --- the CLI -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sd_ds.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("what is scored")
    src.add_argument("--model", help="exported model (diffusers folder, python -m sd_ds.export) or an sd-ds "
                     "checkpoint directory (checkpoint-N; exported on the fly, --ema for its EMA weights)")
    src.add_argument("--ema", action="store_true", help="with a checkpoint --model: its EMA weights")
    src.add_argument("--prompts", help="prompt file (one per line) or webdataset shards whose captions (.txt) are "
                     "the prompts; with --images, the caption of each image file (sorted) for the CLIP score")
    src.add_argument("--images", help="score this folder of existing images instead of generating")
    src.add_argument("--num_images", type=int, default=None,
                     help="images to generate (default: one per prompt; prompts repeat when fewer)")
    ref = p.add_argument_group("reference and metrics")
    ref.add_argument("--reference", help="FID reference: a pytorch-fid .npz (mu, sigma), an image folder, or "
                     "image shards (centre-cropped to --resolution)")
    ref.add_argument("--save_reference_stats", metavar="OUT.npz",
                     help="write the reference's statistics as a pytorch-fid .npz (alone: then exit)")
    ref.add_argument("--reference_limit", type=int, default=None, help="use only the first N reference images")
    ref.add_argument("--metrics", default="fid,clip", help="comma-separated: fid, clip")
    ref.add_argument("--fid_weights", default=None,
                     help=f"pytorch-fid Inception weights file (default: {FID_WEIGHTS_FILE} in the torch hub cache)")
    ref.add_argument("--clip_model", default=CLIP_MODEL, help="open_clip model name, or a model config .json")
    ref.add_argument("--clip_pretrained", default=CLIP_PRETRAINED, help="open_clip pretrained tag, or a weights file")
    gen = p.add_argument_group("generation")
    gen.add_argument("--steps", type=int, default=50, help="DDIM steps")
    gen.add_argument("--guidance_scale", type=float, nargs="+", default=[8.0],
                     help="classifier-free guidance; several values give one result each")
    gen.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i")
    gen.add_argument("--resolution", type=int, default=None,
                     help="generated (and shard reference) image size; default: the training resolution recorded at "
                     "export, else the model's default")
    gen.add_argument("--width", type=int, default=None, help="generated image width (default: --resolution's)")
    gen.add_argument("--height", type=int, default=None, help="generated image height (default: --resolution's)")
    gen.add_argument("--batch_size", type=int, default=16, help="images per generation/scoring batch")
    gen.add_argument("--save_images", default=None, help="also write the generated images here (NNNNNN.png)")
    gen.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    p.add_argument("--output", default=None, help="metrics JSON (written by rank 0)")
    return p


def _prepare_model(args: argparse.Namespace, dist_info: "DistInfo") -> Path:
    """An exported folder as it is; a checkpoint exported once, by rank 0, into CHECKPOINT/export[_ema] (on the
    file system every node reads the checkpoint from)."""
    model = Path(args.model)
    if not (model / "trainer_state.json").is_file():
        return model
    target = model / ("export_ema" if args.ema else "export")
    if dist_info.is_main_process and not (target / "model_index.json").is_file():
        export_checkpoint(model, target, ema=args.ema)
    dist_info.barrier()
    return target


def run(args: argparse.Namespace, dist_info: "DistInfo") -> Optional[dict[str, Any]]:
    metrics = parse_metrics(args.metrics)
    device = torch.device(args.device) if args.device else dist_info.device
    t0 = time.perf_counter()
    want_fid = "fid" in metrics or args.save_reference_stats
    inception = load_fid_inception(args.fid_weights, device) if want_fid else None
    reference = None
    model_dir = _prepare_model(args, dist_info) if args.model else None
    if model_dir is not None and not args.resolution:
        resolution = training_resolution(model_dir)
    else:
        resolution = args.resolution
    if want_fid:
        if not args.reference:
            raise ValueError("FID needs --reference (or --metrics clip)")
        reference = reference_statistics(args.reference, inception, dist_info, batch_size=args.batch_size,
                                         resolution=resolution, device=device, limit=args.reference_limit)
        if args.save_reference_stats and dist_info.is_main_process:
            written = save_statistics(args.save_reference_stats, reference)
            print(f"wrote reference statistics {written}", flush=True)
        if not args.model and not args.images:
            return None  # statistics only
    if not args.model and not args.images:
        raise ValueError("nothing to score: give --model (generate) or --images (a folder)")
    clip = load_clip(args.clip_model, args.clip_pretrained, device) if "clip" in metrics else None
    scorers = Scorers(inception if "fid" in metrics else None, reference, clip, device)
    settings: dict[str, Any] = {"metrics": sorted(metrics), "reference": args.reference, "seed": args.seed,
                                "fid_weights": args.fid_weights or FID_WEIGHTS_FILE,
                                "clip_model": args.clip_model if clip else None,
                                "clip_pretrained": args.clip_pretrained if clip else None,
                                "world_size": dist_info.world_size}
    if args.images:
        prompts = read_prompts(args.prompts) if args.prompts else None
        result = evaluate_folder(args.images, prompts, scorers, dist_info, batch_size=args.batch_size)
        results = None if result is None else [{**result, "images": args.images, **settings}]
    else:
        if not args.prompts:
            raise ValueError("generation needs --prompts (a prompt file or shards with captions)")
        prompts = read_prompts(args.prompts)
        n = args.num_images or len(prompts)
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        pipe = load_pipeline(model_dir, device=str(device))
        results = []
        for guidance in args.guidance_scale:
            save_dir = Path(args.save_images) / f"guidance_{guidance:g}" if args.save_images else None
            result = evaluate_generated(pipe, prompts, scorers, dist_info, seed=args.seed, steps=args.steps,
                                        guidance_scale=guidance, batch_size=args.batch_size, resolution=resolution,
                                        width=args.width, height=args.height,
                                        save_dir=save_dir)
            if result is not None:
                results.append({**result, "model": args.model, "ema": args.ema, "steps": args.steps,
                                "guidance_scale": guidance, "resolution": resolution, "scheduler": "ddim",
                                "width": args.width or resolution, "height": args.height or resolution,
                                **settings})
    if not dist_info.is_main_process or not results:
        return None
    out = {**results[0], "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    for r in results:
        figures = ", ".join(f"{k} {r[k]:.4f}" for k in ("fid", "clip_score") if k in r)
        where = f"guidance {r['guidance_scale']:g}" if "guidance_scale" in r else r.get("images")
        print(f"evaluate: {where}: {figures} over {r['num_images']} images", flush=True)
    if args.output:
        write_json_atomic(Path(args.output), out)
        print(f"wrote {args.output}", flush=True)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_metrics(args.metrics)
    except ValueError as e:
        parser.error(str(e))
    if args.reference and args.reference.endswith(".npz") and "fid" in parse_metrics(args.metrics):
        try:
            read_statistics(args.reference)  # before any model loads: one line naming the file
        except ValueError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dist_info = init_distributed()
    try:
        run(args, dist_info)
    except MissingWeightsError as e:
        raise SystemExit(f"sd_ds.evaluate: {e}") from None
    except ValueError as e:
        parser.error(str(e))
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(run_to_exit(main))  # gloo ranks leave without finalizing (lifecycle.end_process)

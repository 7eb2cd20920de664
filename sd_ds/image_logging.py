"""What the trainer shows of its model while it trains: VAE reconstructions of training images, sample grids
for their captions (guidance 1 and 7.5, at the batch's size: its aspect-ratio bucket when training on buckets)
and for fixed ``--validation_prompts`` (square), drawn at the training resolution with the EMA weights when EMA is
on; written to TensorBoard and as PNGs in ``output_dir/samples/``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from PIL import Image

from sd_ds.pipeline import generate, image_grid, pipeline_from_components, to_pil

if TYPE_CHECKING:
    from sd_ds.config import TrainConfig
    from sd_ds.distributed import DistInfo
    from sd_ds.ema import ShardedEMA
    from sd_ds.logging import StepMetrics
    from sd_ds.models import Components

logger = logging.getLogger("sd_ds.image_logging")

MAX_IMAGES = 8


def log_training_images(cfg: "TrainConfig", dist_info: "DistInfo", engine: Any, components: "Components",
                        ema: Optional["ShardedEMA"], batch: dict, metrics: "StepMetrics", step: int) -> None:
    """Collective (the EMA gather and a barrier); generation runs on the main process while the others wait.
    Never kills training: a failure is logged and the run goes on."""
    try:
        ema_state = ema.full_state_dict() if ema is not None else None
        if dist_info.is_main_process:
            _log_on_main(cfg, dist_info.device, engine.module, components, ema_state, batch, metrics, step)
    except Exception:  # noqa: BLE001 - image logging is best effort by design
        logger.exception("image logging failed at step %d; training continues", step)
    finally:
        dist_info.barrier()


def _log_on_main(cfg: "TrainConfig", device: torch.device, module: torch.nn.Module, components: "Components",
                 ema_state: Optional[dict], batch: dict, metrics: "StepMetrics", step: int) -> None:
    unet = module.unet
    if ema_state is not None:
        unet = copy.deepcopy(module.unet)
        unet.load_state_dict({k[len("unet."):]: v for k, v in ema_state.items() if k.startswith("unet.")})
    text_encoder = module.text_encoder if module.text_encoder is not None else components.text_encoder
    was_training = unet.training
    unet.eval()
    try:
        grids, captions = sample_grids(cfg, components, unet, text_encoder, batch, step, device)
    finally:
        unet.train(was_training)
    out_dir = Path(cfg.output_dir) / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"step_{step:08d}_captions.txt").write_text("\n".join(captions) + "\n")
    for name, grid in grids.items():
        grid.save(out_dir / f"step_{step:08d}_{name}.png")
        metrics.log_images(f"images/{name}", grid, step)


@torch.no_grad()
def sample_grids(cfg: "TrainConfig", components: "Components", unet: Any, text_encoder: Any, batch: dict, step: int,
                 device: torch.device) -> tuple[dict[str, Image.Image], list[str]]:
    vae = components.vae
    pipe = pipeline_from_components(vae, text_encoder, components.tokenizer, unet, components.noise_scheduler)
    n = min(MAX_IMAGES, len(batch["captions"]))
    captions = list(batch["captions"][:n])
    # The training resolution, not the UNet config's sample_size (512 px for SD v1 even when training at 256);
    # with aspect-ratio buckets the batch's bucket, so its captions are drawn at the shape they were trained at.
    height, width = batch["target_size"][0].tolist() if "target_size" in batch else (cfg.data.resolution,) * 2
    # All of a grid's images in one batch: one UNet call per denoising step instead of one per image (on 2 CPU
    # cores the demo's three grids took 9 s one by one); each image keeps its own seed, so batching does not
    # change which image a caption gets.
    draw = {"height": height, "width": width, "batch_size": MAX_IMAGES}
    square = {**draw, "height": cfg.data.resolution, "width": cfg.data.resolution}
    steps = cfg.logging.num_inference_steps
    grids = {}
    if "pixel_values" in batch:
        pixels = batch["pixel_values"][:n].to(device)
        pixels = pixels.to(vae.dtype).div(127.5).sub(1.0) if pixels.dtype == torch.uint8 else pixels.to(vae.dtype)
        recon = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        grids["reconstruction"] = image_grid(to_pil(pixels) + to_pil(recon), cols=n)
    elif "latent_moments" in batch:
        # Latent shards: decode the posterior mean, the image the cached moments stand for.
        mean = batch["latent_moments"][:n, : batch["latent_moments"].shape[1] // 2].to(device, dtype=vae.dtype)
        grids["reconstruction"] = image_grid(to_pil(vae.decode(mean).sample), cols=n)
    # The seed logs both: unguided samples show what the model learned, guided ones what users will see.
    for guidance in (1.0, 7.5):
        images = generate(pipe, captions, steps=steps, guidance_scale=guidance, seed=step, **draw)
        grids[f"samples_guidance_{guidance:g}"] = image_grid(images, cols=n)
    if cfg.logging.validation_prompts:
        grids["validation_prompts"] = image_grid(
            generate(pipe, cfg.logging.validation_prompts, steps=steps, guidance_scale=7.5, seed=0, **square))
    return grids, captions

"""What the trainer shows of its model while it trains: VAE reconstructions of training images, sample grids
for their captions (guidance 1 and 7.5, at the batch's size: its aspect-ratio bucket when training on buckets)
and for fixed ``--validation_prompts`` (square), drawn at the training resolution with the EMA weights when EMA is
on (swapped into the UNet's own buffers by ``sd_ds.engine.evaluation_unet``); written to TensorBoard and as PNGs in
``output_dir/samples/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from sd_ds.config import TrainConfig
from sd_ds.distributed import DistInfo
from sd_ds.ema import ShardedEMA
from sd_ds.engine import conditioning_text_encoders, evaluation_unet
from sd_ds.metrics import StepMetrics
from sd_ds.models import Components
from sd_ds.pipeline import generate, image_grid, pipeline_from_components, to_pil

logger = logging.getLogger("sd_ds.image_logging")

MAX_IMAGES = 8


class ImageLogging:
    """Sample grids as a periodic task: every ``--image_logging_steps`` optimizer steps (not at the step a run
    starts from), from the step's last micro batch. Collective (the EMA swap and a barrier); generation runs on the
    main process while the others wait. Never kills training: a failure is logged and the run goes on."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, components: Components, *, initial_step: int) -> None:
        self.cfg, self.dist, self.components = cfg, dist_info, components
        self.every = cfg.logging.image_logging_steps
        self.initial_step = initial_step

    def due(self, step: int, batch: Optional[dict]) -> bool:
        return bool(self.every) and step % self.every == 0 and step != self.initial_step and batch is not None

    def maybe_run(self, step: int, engine: Any, ema: Optional[ShardedEMA], metrics: StepMetrics,
                  batch: Optional[dict] = None) -> None:
        if self.due(step, batch):
            self.run(step, engine, ema, metrics, batch)

    def run(self, step: int, engine: Any, ema: Optional[ShardedEMA], metrics: StepMetrics, batch: dict) -> None:
        try:
            with evaluation_unet(engine, ema) as unet:
                try:
                    if self.dist.is_main_process:
                        self._draw_and_write(unet, conditioning_text_encoders(engine, self.components), batch,
                                             metrics, step)
                finally:
                    self.dist.barrier()  # the other ranks wait here while the main process draws
        except Exception:  # noqa: BLE001 - image logging is best effort by design
            logger.exception("image logging failed at step %d; training continues", step)

    def _draw_and_write(self, unet: torch.nn.Module, text_encoders: list[torch.nn.Module], batch: dict,
                        metrics: StepMetrics, step: int) -> None:
        grids, captions = sample_grids(self.cfg, self.components, unet, text_encoders, batch, step, self.dist.device)
        out_dir = Path(self.cfg.output_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"step_{step:08d}_captions.txt").write_text("\n".join(captions) + "\n")
        for name, grid in grids.items():
            grid.save(out_dir / f"step_{step:08d}_{name}.png")
            metrics.log_images(f"images/{name}", grid, step)


@torch.no_grad()
def sample_grids(cfg: TrainConfig, components: Components, unet: Any, text_encoders: list[Any], batch: dict,
                 step: int, device: torch.device) -> tuple[dict[str, Image.Image], list[str]]:
    vae = components.vae
    pipe = pipeline_from_components(components, unet, text_encoders)
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

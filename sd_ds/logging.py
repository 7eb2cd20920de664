"""Training metrics: TensorBoard scalars and images, a console line, and the progress bar.

Only the main process writes; every rank contributes to the reduced values (loss, throughput), so
``StepMetrics.log`` must be called on all ranks at the same steps.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from sd_ds.distributed import all_reduce_mean, all_reduce_sum, device_memory_stats

logger = logging.getLogger("sd_ds")


def setup_console_logging(is_main_process: bool) -> None:
    level = logging.INFO if is_main_process else logging.WARNING
    logging.basicConfig(stream=sys.stdout, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(level)


class StepMetrics:
    """Accumulates per-step values between logging steps and writes their means."""

    def __init__(self, output_dir: str | Path, *, is_main_process: bool, device: torch.device,
                 max_steps: int, initial_step: int, disable_tqdm: bool) -> None:
        self.output_dir = Path(output_dir)
        self.is_main_process = is_main_process
        # Run totals (this rank): wall time since the first step began, split into data wait, compute (encoders,
        # forward, backward, optimizer) and everything else (EMA, logging, image logging, checkpoints).
        self.totals = {"wall_s": 0.0, "data_wait_s": 0.0, "compute_s": 0.0, "steps": 0}
        self.run_start = time.perf_counter()
        self.device = device
        self.writer = None
        self.progress = None
        if is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))
            if not disable_tqdm:
                from tqdm.auto import tqdm

                self.progress = tqdm(total=max_steps, initial=initial_step, desc="train", unit="step",
                                     dynamic_ncols=True)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = 0.0
        self.micro_batches = 0
        self.samples = 0
        self.data_wait = 0.0
        self.compute = 0.0
        self.window_start = time.perf_counter()

    def add_micro_batch(self, loss: float, batch_size: int, data_wait_s: float, compute_s: float) -> None:
        """``compute_s`` ends after ``loss.item()``, which waits for the device, so it holds on GPUs too."""
        self.loss_sum += loss
        self.micro_batches += 1
        self.samples += batch_size
        self.data_wait += data_wait_s
        self.compute += compute_s
        self.totals["data_wait_s"] += data_wait_s
        self.totals["compute_s"] += compute_s

    def step_done(self) -> None:
        self.totals["steps"] += 1
        if self.progress is not None:
            self.progress.update(1)

    def log(self, step: int, *, lrs: dict[str, float], grad_norm: Optional[float], samples_seen: int,
            skipped_steps: int, extra: Optional[dict[str, float]] = None) -> None:
        """Collective: all ranks call it at the same step."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        local = torch.tensor([self.loss_sum / max(self.micro_batches, 1), self.data_wait / elapsed,
                              max(elapsed - self.data_wait - self.compute, 0.0) / elapsed], dtype=torch.float64)
        loss, data_wait_frac, other_frac = all_reduce_mean(local).tolist()
        images = all_reduce_sum(torch.tensor([float(self.samples)], dtype=torch.float64)).item()
        scalars = {
            "train/loss": loss,
            "train/images_per_s": images / elapsed,
            "train/samples_seen": float(samples_seen),
            "train/skipped_steps": float(skipped_steps),
            "train/data_wait_fraction": data_wait_frac,
            # Step time outside data wait and compute: EMA, logging, image logging, checkpoints.
            "train/other_fraction": other_frac,
        }
        if grad_norm is not None and np.isfinite(grad_norm):
            scalars["train/grad_norm"] = float(grad_norm)
        for name, lr in lrs.items():
            scalars[f"lr/{name}"] = lr
        scalars.update(device_memory_stats(self.device) or {})
        scalars.update(extra or {})
        if self.is_main_process:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
            msg = (f"step {step} loss {loss:.4f} lr {next(iter(lrs.values()), 0):.3e} "
                   f"grad_norm {scalars.get('train/grad_norm', float('nan')):.3f} "
                   f"img/s {scalars['train/images_per_s']:.1f} data_wait {100 * data_wait_frac:.1f}% "
                   f"skipped {skipped_steps}")
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
                self.progress.write(msg)
            else:
                logger.info(msg)
        self._reset()

    def log_images(self, tag: str, grid: Image.Image, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(grid.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()

    def time_breakdown(self) -> dict[str, float]:
        t = dict(self.totals, wall_s=time.perf_counter() - self.run_start)
        t["other_s"] = max(t["wall_s"] - t["data_wait_s"] - t["compute_s"], 0.0)
        return t

    def close(self) -> None:
        """Writes output_dir/time_breakdown.json (main process; appended to on resume, one line per run)."""
        if self.is_main_process and self.totals["steps"]:
            t = self.time_breakdown()
            with open(self.output_dir / "time_breakdown.json", "a") as f:
                f.write(json.dumps(t) + "\n")
            logger.info("time over %d steps: %.1f s; data wait %.1f%%, compute %.1f%%, other (EMA, logging, "
                        "checkpoints) %.1f%%", t["steps"], t["wall_s"], 100 * t["data_wait_s"] / t["wall_s"],
                        100 * t["compute_s"] / t["wall_s"], 100 * t["other_s"] / t["wall_s"])
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()


def image_grid(images: Sequence[Image.Image], cols: Optional[int] = None) -> Image.Image:
    """Tile equally sized PIL images row-major into one image."""
    if not images:
        raise ValueError("no images to tile")
    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid

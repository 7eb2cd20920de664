"""Training metrics: TensorBoard scalars and images, a console line, and the progress bar (``StepMetrics``).

Only the main process writes; every rank contributes to the reduced values (loss, throughput), so
``StepMetrics.log`` must be called on all ranks at the same steps. Between logging steps the loss is summed
on the device (no ``.item()`` per micro batch: each would stall the host until the GPU caught up); it is read
once per logging step, and the reductions go through the gloo control group (``DistInfo``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from sd_ds.distributed import DistInfo, device_memory_stats

logger = logging.getLogger("sd_ds")

DATA_WAIT_WARNING = 0.10  # fraction of step time spent waiting for batches that is worth a warning


def setup_console_logging(is_main_process: bool) -> None:
    level = logging.INFO if is_main_process else logging.WARNING
    logging.basicConfig(stream=sys.stdout, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(level)


class StepMetrics:
    """Accumulates per-step values between logging steps and writes their means."""

    def __init__(self, output_dir: str | Path, dist_info: "DistInfo", *, max_steps: int, initial_step: int,
                 disable_tqdm: bool) -> None:
        self.output_dir = Path(output_dir)
        self.dist = dist_info
        self.is_main_process = is_main_process = dist_info.is_main_process
        device = dist_info.device
        # Run totals (this rank): wall time since the first step began, split into data wait, compute (encoders,
        # forward, backward, optimizer) and everything else (EMA, logging, image logging, checkpoints).
        self.totals = {"wall_s": 0.0, "data_wait_s": 0.0, "compute_s": 0.0, "steps": 0}
        self.run_start = time.perf_counter()
        self.device = device
        self.writer = None
        self.progress = None
        self.warned_data_wait = False
        if is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "runs"))
            if not disable_tqdm:
                from tqdm.auto import tqdm

                self.progress = tqdm(total=max_steps, initial=initial_step, desc="train", unit="step",
                                     dynamic_ncols=True)
        self._reset()

    def _reset(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0  # a device tensor once a loss was added
        self.micro_batches = 0
        self.samples = 0
        self.data_wait = 0.0
        self.compute = 0.0
        self.window_start = time.perf_counter()

    def add_micro_batch(self, loss: torch.Tensor, batch_size: int, data_wait_s: float, compute_s: float) -> None:
        """``loss`` stays on the device. On a GPU ``compute_s`` is host time up to the optimizer step; DeepSpeed's
        overflow check waits for the device every step, so it still covers the step's kernels."""
        self.loss_sum = self.loss_sum + loss.detach().float()
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
        loss_sum = float(self.loss_sum)  # the one device → host read of the window
        local = torch.tensor([loss_sum / max(self.micro_batches, 1), self.data_wait / elapsed,
                              max(elapsed - self.data_wait - self.compute, 0.0) / elapsed, float(self.samples)],
                             dtype=torch.float64)
        summed = self.dist.all_reduce(local).tolist()
        loss, data_wait_frac, other_frac = (v / self.dist.world_size for v in summed[:3])
        images = summed[3]
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
        if self.is_main_process and data_wait_frac > DATA_WAIT_WARNING and not self.warned_data_wait:
            self.warned_data_wait = True
            logger.warning("the model waited for data %.0f%% of the time at step %d: raise --dataloader_num_workers "
                           "(each worker decodes ~150 images/s per core), or train on latent shards "
                           "(python -m sd_ds.encode_latents)", 100 * data_wait_frac, step)
        if self.is_main_process:
            self.log_scalars(scalars, step)
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.write_line(f"step {step} loss {loss:.4f} lr {next(iter(lrs.values()), 0):.3e} "
                            f"grad_norm {scalars.get('train/grad_norm', float('nan')):.3f} "
                            f"img/s {scalars['train/images_per_s']:.1f} data_wait {100 * data_wait_frac:.1f}% "
                            f"skipped {skipped_steps}")
        self._reset()

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """Each value to TensorBoard at ``step`` (main process; elsewhere nothing). The one way scalars are
        written: the loop's, the validation loss, the training-time FID / CLIP score."""
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def write_line(self, message: str, console: Optional[logging.Logger] = None) -> None:
        """A console line (main process; elsewhere nothing): through the progress bar when there is one (so it
        does not break the bar), else through ``console`` (default: the ``sd_ds`` logger)."""
        if not self.is_main_process:
            return
        if self.progress is not None:
            self.progress.write(message)
        else:
            (console or logger).info(message)

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
            try:
                with open(self.output_dir / "time_breakdown.json", "a") as f:
                    f.write(json.dumps(t) + "\n")
            except OSError as e:  # e.g. the full disk that stopped the run: must not bury the run's own error
                logger.warning("could not append to %s: %s", self.output_dir / "time_breakdown.json", e)
            logger.info("time over %d steps: %.1f s; data wait %.1f%%, compute %.1f%%, other (EMA, logging, "
                        "checkpoints) %.1f%%", t["steps"], t["wall_s"], 100 * t["data_wait_s"] / t["wall_s"],
                        100 * t["compute_s"] / t["wall_s"], 100 * t["other_s"] / t["wall_s"])
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()

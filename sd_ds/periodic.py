"""The trainer's periodic side tasks behind one interface: the loop calls ``PeriodicTasks.maybe_run`` once before
its first step and once after every optimizer step, on every rank; each task decides whether the step is its.

- image logging (``sd_ds.image_logging.ImageLogging``): sample grids every --image_logging_steps;
- the validation loss (``sd_ds.validation.Validator``) every --validation_steps, and at step 0;
- FID / CLIP score (``FidClipEvaluation`` below, over ``sd_ds.fid_clip``) of --eval_num_images images for
  --eval_prompts every --eval_steps, and at step 0.

They share the weights they evaluate with (``sd_ds.engine.evaluation_unet``: the EMA swapped into the UNet's own
buffers when EMA is on, eval mode), the text encoder (``sd_ds.engine.conditioning_text_encoders``) and the way
they log (``StepMetrics.log_scalars`` / ``write_line``). At the step a resumed run starts from, none runs again:
the run that saved that step already logged it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Protocol

from sd_ds.compile import eager_regions
from sd_ds.config import TrainConfig
from sd_ds.distributed import DistInfo
from sd_ds.ema import ShardedEMA
from sd_ds.engine import conditioning_text_encoders, evaluation_unet
from sd_ds.fid_clip import (Scorers, evaluate_generated, load_clip, load_fid_inception, parse_metrics, read_prompts,
                            reference_statistics)
from sd_ds.image_logging import ImageLogging
from sd_ds.metrics import StepMetrics
from sd_ds.models import Components
from sd_ds.pipeline import pipeline_from_components
from sd_ds.validation import build_validator

logger = logging.getLogger("sd_ds.periodic")


class PeriodicTask(Protocol):
    def maybe_run(self, step: int, engine: Any, ema: Optional[ShardedEMA], metrics: StepMetrics,
                  batch: Optional[dict] = None) -> Any:
        """Collective: every rank calls it at every step (``step``: optimizer steps done; ``batch``: the step's
        last micro batch, None before the first step). Runs the task when ``step`` is its step."""


class FidClipEvaluation:
    """FID / CLIP score during training: --eval_num_images images for --eval_prompts every --eval_steps (and at
    step 0), generated and scored on all ranks as ``python -m sd_ds.evaluate`` does; logged as eval/fid and
    eval/clip_score. Images come from the EMA weights when EMA is on (what gets exported)."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, components: Components, *, initial_step: int) -> None:
        self.cfg, self.dist, self.components = cfg, dist_info, components
        self.initial_step = initial_step
        ev = cfg.evaluation
        self.every = ev.eval_steps
        self.scorers: Optional[Scorers] = None
        self.prompts: list[str] = []
        if self.every:
            # Load the scorers (and the reference statistics, a collective) now: missing weights stop the run
            # before it trains, not hours later.
            metrics = parse_metrics(ev.eval_metrics)
            device = dist_info.device
            inception = (load_fid_inception(ev.fid_weights, device)
                         if "fid" in metrics and ev.eval_reference else None)
            if "fid" in metrics and not ev.eval_reference:
                logger.warning("training-time evaluation: no --eval_reference, so no FID (CLIP score only)")
            reference = (reference_statistics(ev.eval_reference, inception, dist_info, batch_size=ev.eval_batch_size,
                                              resolution=cfg.data.resolution, device=device)
                         if inception is not None else None)
            clip = load_clip(ev.clip_model, ev.clip_pretrained, device) if "clip" in metrics else None
            self.scorers = Scorers(inception, reference, clip, device)
            prompts = read_prompts(ev.eval_prompts, limit=ev.eval_num_images)
            self.prompts = [prompts[i % len(prompts)] for i in range(ev.eval_num_images)]

    def due(self, step: int) -> bool:
        return self.scorers is not None and step % self.every == 0 and (step != self.initial_step or step == 0)

    def maybe_run(self, step: int, engine: Any, ema: Optional[ShardedEMA], metrics: StepMetrics,
                  batch: Optional[dict] = None) -> Optional[dict]:
        return self.run(step, engine, ema, metrics) if self.due(step) else None

    def run(self, step: int, engine: Any, ema: Optional[ShardedEMA], metrics: StepMetrics) -> Optional[dict]:
        """Collective. The metrics on rank 0, None elsewhere."""
        assert self.scorers is not None
        ev, comp = self.cfg.evaluation, self.components
        t0 = time.perf_counter()
        with evaluation_unet(engine, ema) as unet:
            pipe = pipeline_from_components(comp, unet, conditioning_text_encoders(engine, comp))
            result = evaluate_generated(pipe, self.prompts, self.scorers, self.dist, seed=0,
                                        steps=ev.eval_num_inference_steps, guidance_scale=ev.eval_guidance_scale,
                                        batch_size=ev.eval_batch_size, resolution=self.cfg.data.resolution,
                                        strict=False)
        if result is not None:  # rank 0
            values = {f"eval/{k}": float(result[k]) for k in ("fid", "clip_score") if k in result}
            metrics.log_scalars(values, step)
            metrics.write_line(f"step {step} eval ({len(self.prompts)} images, guidance {ev.eval_guidance_scale:g}, "
                               f"{ev.eval_num_inference_steps} steps, {time.perf_counter() - t0:.0f} s): "
                               + ", ".join(f"{k[5:]} {v:.4f}" for k, v in values.items()), console=logger)
        return result


class PeriodicTasks:
    """The periodic tasks in the order they run at a step: image logging, validation loss, FID / CLIP score."""

    def __init__(self, tasks: list[PeriodicTask]) -> None:
        self.tasks = tasks

    def maybe_run(self, step: int, engine: Any, ema: Optional[ShardedEMA], metrics: StepMetrics,
                  batch: Optional[dict] = None) -> None:
        # Eager even with --torch_compile: these run every few thousand steps, with other shapes and no gradients;
        # compiling them would double the compiles and the saved kernels for no measurable gain (sd_ds.compile).
        with eager_regions():
            for task in self.tasks:
                task.maybe_run(step, engine, ema, metrics, batch)


def build_periodic_tasks(cfg: TrainConfig, dist_info: DistInfo, components: Components, *,
                         initial_step: int) -> PeriodicTasks:
    """Collective (the held-out samples, the FID reference statistics). Call after the frozen models are on their
    device; ``initial_step``: the step the run starts from (0, or the resumed checkpoint's)."""
    return PeriodicTasks([
        ImageLogging(cfg, dist_info, components, initial_step=initial_step),
        build_validator(cfg, dist_info, components, initial_step=initial_step),
        FidClipEvaluation(cfg, dist_info, components, initial_step=initial_step),
    ])

"""The trainer's periodic side tasks: what it measures besides its loss, called once a step by the loop.

- the validation loss (``sd_ds.validation``) every --validation_steps;
- FID / CLIP score (``sd_ds.fid_clip``) of --eval_num_images images for --eval_prompts every --eval_steps.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from sd_ds.config import TrainConfig
from sd_ds.distributed import DistInfo
from sd_ds.fid_clip import (Scorers, evaluate_generated, load_clip, load_fid_inception, parse_metrics, read_prompts,
                            reference_statistics)
from sd_ds.metrics import StepMetrics
from sd_ds.models import Components
from sd_ds.pipeline import pipeline_from_components
from sd_ds.validation import build_validator, ema_unet_on_every_rank

logger = logging.getLogger("sd_ds.periodic")


class TrainingEvaluation:
    """What the trainer measures besides its loss: the validation loss (``sd_ds.validation``) every
    --validation_steps and FID / CLIP score of --eval_num_images images for --eval_prompts every --eval_steps.
    ``maybe_run`` is the loop's one call; every rank calls it at every step."""

    def __init__(self, cfg: "TrainConfig", dist_info: "DistInfo", components: "Components", *,
                 initial_step: int) -> None:
        self.cfg, self.dist, self.components = cfg, dist_info, components
        self.initial_step = initial_step
        self.validator = build_validator(cfg, dist_info, components, initial_step=initial_step)
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

    def maybe_run(self, step: int, engine: Any, ema: Any, metrics: "StepMetrics") -> None:
        self.validator.maybe_run(step, engine, ema, metrics)
        if self.scorers is not None and step % self.every == 0 and (step != self.initial_step or step == 0):
            self.generate_and_score(step, engine, ema, metrics)

    def generate_and_score(self, step: int, engine: Any, ema: Any, metrics: "StepMetrics") -> Optional[dict]:
        """Collective. Images from the EMA weights when EMA is on (what gets exported), else the live ones."""
        assert self.scorers is not None
        ev, module, comp = self.cfg.evaluation, engine.module, self.components
        unet = ema_unet_on_every_rank(ema, module.unet, self.dist.device) if ema is not None else module.unet
        text_encoder = module.text_encoder if module.text_encoder is not None else comp.text_encoder
        was_training = unet.training
        unet.eval()
        t0 = time.perf_counter()
        try:
            pipe = pipeline_from_components(comp.vae, text_encoder, comp.tokenizer, unet, comp.noise_scheduler)
            result = evaluate_generated(pipe, self.prompts, self.scorers, self.dist, seed=0,
                                        steps=ev.eval_num_inference_steps, guidance_scale=ev.eval_guidance_scale,
                                        batch_size=ev.eval_batch_size, resolution=self.cfg.data.resolution,
                                        strict=False)
        finally:
            unet.train(was_training)
        if result is not None:  # rank 0
            values = {f"eval/{k}": float(result[k]) for k in ("fid", "clip_score") if k in result}
            if metrics.writer is not None:
                for tag, v in values.items():
                    metrics.writer.add_scalar(tag, v, step)
                metrics.writer.flush()
            msg = (f"step {step} eval ({len(self.prompts)} images, guidance {ev.eval_guidance_scale:g}, "
                   f"{ev.eval_num_inference_steps} steps, {time.perf_counter() - t0:.0f} s): "
                   + ", ".join(f"{k[5:]} {v:.4f}" for k, v in values.items()))
            (metrics.progress.write if metrics.progress is not None else logger.info)(msg)
        return result


def build_training_evaluation(cfg: "TrainConfig", dist_info: "DistInfo", components: "Components", *,
                              initial_step: int) -> TrainingEvaluation:
    """Collective (reference statistics). Call after the frozen models are on their device."""
    return TrainingEvaluation(cfg, dist_info, components, initial_step=initial_step)

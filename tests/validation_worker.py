"""Multi-rank worker for tests/test_validation.py, launched by torchrun on CPU ranks (gloo): the validation loss
of one tiny UNet (output projection randomised, so the prediction is not all zeros), evaluated twice, through
the same Validator the trainer uses. Rank 0 writes both [samples, 8] tables to OUT."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sd_ds.conditioning import PromptEncoder
from sd_ds.config import parse_config
from sd_ds.distributed import DistInfo
from sd_ds.lifecycle import end_process
from sd_ds.models import build_components
from sd_ds.validation import build_validator


def main(out: str, shards: str, model: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist.init_process_group("gloo")
    info = DistInfo(dist.get_rank(), world, dist.get_rank(), torch.device("cpu"), dist.new_group(backend="gloo"))
    cfg = parse_config(["--train_shards", shards, "--pretrained_model_name_or_path", model, "--resolution", "32",
                        "--center_crop", "True", "--min_size", "32", "--validation_shards", shards,
                        "--validation_samples", "10", "--validation_batch_size", "3", "--validation_steps", "1"])
    components = build_components(cfg.model, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in components.unet.conv_out.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    validator = build_validator(cfg, info, components, initial_step=0)
    prompt_encoder = PromptEncoder.for_components(components, cfg.model.model_max_length)
    tables = [validator.losses(components.unet, prompt_encoder, components.text_encoders, "epsilon") for _ in range(2)]
    if info.is_main_process:
        torch.save({"tables": tables, "keys": validator.held_out.keys}, out)
    dist.destroy_process_group()
    end_process()  # gloo threads can abort a finalizing interpreter (sd_ds.lifecycle.end_process)


if __name__ == "__main__":
    main(*sys.argv[1:])

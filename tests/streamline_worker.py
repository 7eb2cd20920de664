"""One-rank DeepSpeed engine built by sd_ds.engine.build_engine, trained for a few steps with DeepSpeed's own
ZeRO step or with the streamlined one (argv[1]: "deepspeed" | "streamlined"); a NaN loss is injected at step 3.
Prints JSON: per-step grad norms, skipped steps, and a digest of the final fp32 master weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch



def main() -> None:
    mode, model_dir, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    import sd_ds.engine as engine_lib
    from sd_ds.config import parse_config
    from sd_ds.distributed import init_distributed
    from sd_ds.models import build_components

    if mode == "deepspeed":
        engine_lib.streamline_zero_optimizer = lambda optimizer: False
    cfg = parse_config(["--pretrained_model_name_or_path", model_dir, "--per_device_train_batch_size", "2",
                        "--model_max_length", "16", "--output_dir", out_dir, "--train_shards", "unused",
                        "--max_grad_norm", "0.05", "--learning_rate", "1e-3",
                        *os.environ.get("SD_DS_WORKER_FLAGS", "").split()])
    dist_info = init_distributed()
    components = build_components(cfg.model, seed=0)
    engine = engine_lib.build_engine(cfg, components, dist_info)
    device = dist_info.device
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g).to(device, torch.bfloat16)
    hidden = torch.randn(2, 16, 64, generator=g).to(device, torch.bfloat16)
    ids = torch.zeros(2, 16, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(1)
    norms, skipped = [], []
    for step in range(5):
        loss = engine(latents, hidden, ids, generator)
        if step == 3:
            loss = loss * float("nan")  # non-finite gradients everywhere: the step must be skipped
        engine.backward(loss)
        engine.step()
        norm = engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
        skipped.append(int(engine.skipped_steps))
    masters = torch.cat([t.detach().float().flatten() for t in engine.optimizer.single_partition_of_fp32_groups])
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    print("RESULT " + json.dumps({"optimizer": f"{type(base).__module__}.{type(base).__name__}",
                                  "fused": bool(base.defaults.get("fused")), "device": str(device), "norms": norms, "skipped": skipped, "sum": masters.double().sum().item(),
                                  "abs_sum": masters.double().abs().sum().item(),
                                  "finite": bool(torch.isfinite(masters).all())}))


if __name__ == "__main__":
    main()

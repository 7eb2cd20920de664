"""One-rank DeepSpeed engine built by sd_ds.engine.build_engine, trained for a few steps with DeepSpeed's own
ZeRO step or with the streamlined one (argv[1]: "deepspeed" | "streamlined"); a NaN loss is injected at step 3.
Prints JSON: per-step grad norms, skipped steps, loss scales, a digest of the final fp32 master weights, and the
device syncs and host reads of steps 2 and 4 as a CUDA rank would issue them (see ``SyncCounter``).

SD_DS_WORKER_FP16_ON_CPU=1 lets DeepSpeed build an fp16 engine on a CPU without native fp16 (its CPU accelerator
refuses one there: ``is_fp16_supported``): torch's reference fp16 kernels are slow but exact enough to check the
recipe's logic (dynamic loss scaling, an overflow skipped and the scale halved) on CPU ranks."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from bench_step_ops import OpCounter, SyncCounter  # noqa: E402


def main() -> None:
    mode, model_dir, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    import sd_ds.engine as engine_lib
    from sd_ds.conditioning import Conditioning
    from sd_ds.config import parse_config
    from sd_ds.distributed import init_distributed
    from sd_ds.models import build_components

    if mode == "deepspeed":
        engine_lib.streamline_zero_optimizer = lambda optimizer: False  # the name build_engine calls
    if os.environ.get("SD_DS_WORKER_FP16_ON_CPU") == "1":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        CPU_Accelerator.is_fp16_supported = lambda self: True
    cfg = parse_config(["--pretrained_model_name_or_path", model_dir, "--per_device_train_batch_size", "2",
                        "--model_max_length", "16", "--output_dir", out_dir, "--train_shards", "unused",
                        "--max_grad_norm", "0.05", "--learning_rate", "1e-3",
                        *os.environ.get("SD_DS_WORKER_FLAGS", "").split()])
    dist_info = init_distributed()
    device_syncs = SyncCounter()
    host_reads = OpCounter()
    components = build_components(cfg.model, seed=0)
    engine = engine_lib.build_engine(cfg, components, dist_info)
    device = dist_info.device
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g).to(device, torch.bfloat16)
    hidden = torch.randn(2, 16, 64, generator=g).to(device, torch.bfloat16)
    ids = torch.zeros(2, 16, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(1)
    norms, skipped, scales = [], [], []
    for step in range(5):
        counted = step in (2, 4)  # DeepSpeed's throughput timer starts timing at its step 2; 3 is the NaN step
        device_syncs.counting = counted
        with host_reads if counted else contextlib.nullcontext():
            loss = engine(latents, Conditioning(hidden), generator)
            if step == 3:
                loss = loss * float("nan")  # non-finite gradients everywhere: the step must be skipped
            engine.backward(loss)
            engine.step()
        device_syncs.counting = False
        norm = engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
        skipped.append(int(engine.skipped_steps))
        scales.append(float(engine.optimizer.loss_scale))
    masters = torch.cat([t.detach().float().flatten() for t in engine.optimizer.single_partition_of_fp32_groups])
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    print("RESULT " + json.dumps({"optimizer": f"{type(base).__module__}.{type(base).__name__}",
                                  "fused": bool(base.defaults.get("fused")), "device": str(device), "norms": norms, "skipped": skipped, "scales": scales, "sum": masters.double().sum().item(),
                                  "abs_sum": masters.double().abs().sum().item(),
                                  "finite": bool(torch.isfinite(masters).all()),
                                  "device_syncs_per_step": device_syncs.calls / 2,
                                  "host_reads_per_step": sum(host_reads.syncs.values()) / 2,
                                  "host_reads": dict(host_reads.sync_names)}))


if __name__ == "__main__":
    from sd_ds.lifecycle import run_to_exit

    sys.exit(run_to_exit(main))  # gloo ranks leave without finalizing (sd_ds.lifecycle.end_process)

"""Multi-rank worker for tests/test_ema.py (launched with torch.distributed.run; real DeepSpeed ZeRO-2 bf16).

--mode train:   K optimizer steps with ShardedEMA and a full fp32 reference EMA updated from the gathered master
                weights; one step has non-finite gradients (skipped by DeepSpeed). Saves shards + reference.
--mode reshard: a fresh engine on another world size loads the saved shards (re-sharding) and gathers them.
Rank 0 writes its findings to OUT/result_{mode}_{world}.json.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sd_ds.ema import ShardedEMA, consolidate_ema, load_ema_shards, save_ema_shard  # noqa: E402


def build():
    torch.manual_seed(0)
    # Odd sizes: 189 parameters, so partitions are padded and parameters straddle ranks.
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 5),
                                torch.nn.Linear(5, 3, bias=False))
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
           "bf16": {"enabled": True, "check_grad_overflow": True}, "gradient_clipping": 0.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def full_masters(engine):
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["train", "reshard"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip_step", type=int, default=3)
    ap.add_argument("--warmup", action="store_true")
    ap.add_argument("--start_step", type=int, default=0)
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(a.out)
    engine = build()
    ema = ShardedEMA(engine, decay=0.8, warmup=a.warmup, start_step=a.start_step)
    result = {"world_size": world}

    if a.mode == "train":
        ref = full_masters(engine)
        result["ema_bytes_per_rank"] = ema.nbytes()
        result["full_bytes"] = sum(v.numel() * 4 for v in ref.values())
        skipped_unchanged = None
        for step in range(1, a.steps + 1):
            g = torch.Generator().manual_seed(step * 100 + rank)
            x = torch.randn(4, 7, generator=g).to(torch.bfloat16)
            loss = engine(x).float().pow(2).mean()
            if step == a.skip_step:
                loss = loss * float("inf")  # non-finite gradients: DeepSpeed must skip this step
            engine.backward(loss)
            engine.step()
            before = [t.clone() for t in ema.shadow]
            if engine.was_step_applied():
                decay = ema.current_decay(step)
                ema.update(step)
                masters = full_masters(engine)
                for k in ref:
                    ref[k].lerp_(masters[k], 1.0 - decay)
            else:
                full_masters(engine)  # keep the collectives in step on every rank
                skipped_unchanged = all(torch.equal(b, t) for b, t in zip(before, ema.shadow))
        result["skipped_steps"] = engine.skipped_steps
        result["skipped_step_left_ema_unchanged"] = skipped_unchanged
        result["num_updates"] = ema.num_updates
        full = ema.full_state_dict()
        ckpt = out / "ckpt"
        ckpt.mkdir(parents=True, exist_ok=True)
        save_ema_shard(ema, ckpt, rank)
        dist.barrier()
        if rank == 0:
            result["max_abs_err_gathered"] = max((full[k] - ref[k]).abs().max().item() for k in ref)
            offline = consolidate_ema(ckpt)
            result["max_abs_err_offline"] = max((offline[k] - ref[k]).abs().max().item() for k in ref)
            result["ema_differs_from_weights"] = any(
                not torch.equal(ref[k], v) for k, v in full_masters_cpu(engine).items())
            torch.save(ref, out / "reference.pt")
    else:
        ckpt = out / "ckpt"
        ema.load_state_dict(load_ema_shards(ckpt, ema, rank, world))
        result["num_updates"] = ema.num_updates
        full = ema.full_state_dict()
        if rank == 0:
            ref = torch.load(out / "reference.pt")
            result["max_abs_err_gathered"] = max((full[k] - ref[k]).abs().max().item() for k in ref)
            result["partition_numels"] = [t.numel() for t in ema.shadow]
    if rank == 0:
        (out / f"result_{a.mode}_{world}.json").write_text(json.dumps(result))
    dist.barrier()


def full_masters_cpu(engine):
    return {n: p.detach().float() for n, p in engine.module.named_parameters()}


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()

"""Multi-rank worker for tests/test_ema.py: real DeepSpeed ZeRO-2 with bf16 on CPU ranks (gloo).

--mode train:  STEPS optimizer steps (step SKIP_STEP gets non-finite gradients, which DeepSpeed skips) with a
               ShardedEMA and, next to it, a full fp32 reference EMA folded from the gathered master weights
               (deepspeed.utils.safe_get_full_fp32_param) with the decay schedule written out here. The EMA is told
               to update after every step, skipped one included. Checks the gather, swapped_into, the bytes per
               rank, saves the shards and consolidates them offline.
--mode resume: a fresh engine on another world size takes the saved master weights and re-shards the saved EMA,
               then trains STEPS more steps next to the saved reference.
Each rank's findings go to OUT/result_{mode}_{world}.json (merged by rank 0).
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sd_ds.ema  # noqa: E402
from sd_ds.ema import ShardedEMA, consolidate_ema, load_ema_shards, save_ema_shard  # noqa: E402
from sd_ds.distributed import skip_shm_inference_op  # noqa: E402
from sd_ds.lifecycle import end_process  # noqa: E402

# Gather in chunks of a few values (uneven last chunk included) so the chunked path runs on this tiny model.
sd_ds.ema.GATHER_CHUNK_BYTES = 36

DECAY = 0.8  # low, so a few steps move the EMA visibly away from both its start and the weights


class Tiny(torch.nn.Module):
    """Odd sizes (91 + 13 + 65 + 5 + 15 = 189 values): every world size pads, parameters straddle ranks."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(7, 13)
        self.b = torch.nn.Linear(13, 5)
        self.c = torch.nn.Linear(5, 3, bias=False)
        self.register_buffer("scale", torch.tensor(2.0))  # not trained: full_state_dict(module) keeps it as is

    def forward(self, x):
        return self.c(torch.nn.functional.gelu(self.b(torch.nn.functional.gelu(self.a(x))))) * self.scale


def build(param_alignment: bool):
    torch.manual_seed(0)
    model = Tiny()
    # Two parameter groups, as the trainer has (unet, text_encoder).
    groups = [{"params": list(model.a.parameters()) + list(model.b.parameters())},
              {"params": list(model.c.parameters()), "lr": 3e-2}]
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2, "parameter_alignment": param_alignment},
           "bf16": {"enabled": True, "check_grad_overflow": True}, "gradient_clipping": 0.0,
           # torch's AdamW, as the trainer's: DeepSpeed's own JIT-builds its CPU FusedAdam (~45 s of g++ per new venv)
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}},
           "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    return engine


def full_masters(engine):
    """Collective: the full fp32 master weights, via DeepSpeed's own accessor."""
    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}


def reference_decay(step, n, warmup, start_step):
    if step < start_step:
        return 0.0
    return min(DECAY, (1 + n) / (10 + n)) if warmup else DECAY


def max_err(a, b):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def train_steps(engine, ema, ref, first_step, steps, skip_step, warmup, start_step, n_ref, rank, result):
    for step in range(first_step, first_step + steps):
        g = torch.Generator().manual_seed(step * 100 + rank)
        x = torch.randn(4, 7, generator=g).to(torch.bfloat16)
        loss = engine(x).float().pow(2).mean()
        if step == skip_step:
            loss = loss * float("inf")  # non-finite gradients: DeepSpeed must skip this step
        engine.backward(loss)
        engine.step()
        before = [t.clone() for t in ema.partitions]
        ema.update(step)  # deliberately also on the skipped step: the EMA must notice by itself
        masters = full_masters(engine)
        if engine.was_step_applied():
            d = reference_decay(step, n_ref, warmup, start_step)
            for k in ref:
                ref[k].lerp_(masters[k], 1.0 - d)
            n_ref += step >= start_step
        else:
            result["skipped_step_left_ema_unchanged"] = all(torch.equal(b, t) for b, t in zip(before, ema.partitions))
    return n_ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["train", "resume"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip_step", type=int, default=3)
    ap.add_argument("--warmup", action="store_true")
    ap.add_argument("--start_step", type=int, default=0)
    ap.add_argument("--param_alignment", action="store_true")
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args()
    skip_shm_inference_op()  # as the trainer's ranks on CPU: no ~30 s build of an op ZeRO training never calls
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(a.out)
    ckpt = out / "ckpt"
    engine = build(a.param_alignment)
    result = {"world_size": world}

    if a.mode == "train":
        ema = ShardedEMA(engine.optimizer, decay=DECAY, warmup=a.warmup, start_step=a.start_step)
        ref = full_masters(engine)
        initial = {k: v.clone() for k, v in ref.items()}
        result["ema_bytes"] = ema.nbytes
        result["master_partition_bytes"] = sum(m.numel() * m.element_size() for m in ema.masters)
        result["full_fp32_bytes"] = sum(v.numel() * 4 for v in ref.values())
        n_ref = train_steps(engine, ema, ref, 1, a.steps, a.skip_step, a.warmup, a.start_step, 0, rank, result)
        result["skipped_steps"] = engine.skipped_steps
        result["num_updates"], result["num_updates_ref"] = ema.num_updates, n_ref
    else:
        saved = torch.load(out / "reference.pt")
        for n, p in engine.module.named_parameters():
            safe_set_full_fp32_param(p, saved["masters"][n])
        ema = ShardedEMA(engine, decay=DECAY, warmup=a.warmup, start_step=a.start_step)
        ema.load_state_dict(load_ema_shards(ckpt, engine.optimizer, rank, world))
        ref, n_ref = saved["ema"], saved["num_updates"]
        result["num_updates_loaded"] = ema.num_updates
        result["partition_shapes_match_masters"] = all(
            e.shape == m.shape for e, m in zip(ema.partitions, ema.masters))
        # The new layout's tail padding (on the last rank) must be zero, as DeepSpeed's own padding is.
        layout = ema.layout
        tail_zero = True
        for g, part in enumerate(ema.partitions):
            used = sum(torch.Size(s).numel() + p for s, p in zip(layout[g]["shapes"], layout[g]["paddings"]))
            lo = rank * part.numel()
            if used < lo + part.numel():
                tail_zero &= bool((part[max(0, used - lo):] == 0).all())
        result["tail_padding_zero"] = tail_zero
        loaded = ema.full_state_dict()
        if rank == 0:
            result["max_abs_err_after_reshard"] = max_err(loaded, ref)
        n_ref = train_steps(engine, ema, ref, saved["step"] + 1, a.steps, -1, a.warmup, a.start_step, n_ref, rank,
                            result)
        result["num_updates"], result["num_updates_ref"] = ema.num_updates, n_ref

    full = ema.full_state_dict()
    by_module = ema.full_state_dict(engine.module)
    if rank == 0:
        result["max_abs_err_gathered"] = max_err(full, ref)
        result["module_keys_match"] = list(by_module) == list(engine.module.state_dict())
        result["module_buffer_kept"] = by_module["scale"].item() == 2.0
        result["module_params_are_ema"] = all(torch.equal(by_module[k], ref[k]) for k in ref)
        result["ema_differs_from_weights"] = max_err(ref, full_masters_local(engine)) > 0
    else:
        result["non_zero_ranks_get_none"] = full is None and by_module is None

    # swapped_into: EMA in the bf16 module on every rank, training weights restored exactly afterwards.
    params_before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    masters_before = [m.clone() for m in ema.masters]
    x = torch.randn(2, 7, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    with torch.no_grad(), ema.swapped_into(engine.module) as m:
        result["swap_params_are_bf16_ema"] = all(torch.equal(p, ref[n].to(p.dtype)) for n, p in m.named_parameters())
        y_ema = m(x)
    with torch.no_grad():
        y_train = engine.module(x)
    result["swap_changes_output"] = not torch.equal(y_ema, y_train)
    result["swap_restored_params"] = all(torch.equal(p, params_before[n]) for n, p in engine.module.named_parameters())
    result["swap_left_masters_alone"] = all(torch.equal(a_, b_) for a_, b_ in zip(masters_before, ema.masters))
    # A submodule swaps its own parameter group only (as the trainer's UNet beside a trained text encoder): c
    # (group 1) holds the EMA, a and b (group 0) keep their training weights; b alone shares group 0 with a.
    with torch.no_grad(), ema.swapped_into(engine.module.c):
        result["swap_submodule_group_only"] = torch.equal(engine.module.c.weight, ref["c.weight"].to(torch.bfloat16)) \
            and all(torch.equal(p, params_before[n]) for n, p in engine.module.named_parameters() if n[0] != "c")
    result["swap_submodule_restored"] = all(torch.equal(p, params_before[n])
                                            for n, p in engine.module.named_parameters())
    try:
        with ema.swapped_into(engine.module.b):
            result["swap_refuses_a_shared_group"] = False
    except ValueError:
        result["swap_refuses_a_shared_group"] = True

    ckpt.mkdir(parents=True, exist_ok=True)
    save_ema_shard(ema, ckpt, rank)
    masters = full_masters(engine)
    dist.barrier()
    if a.mode == "train":
        # same world size: the own shard loads as is, bit for bit
        state = load_ema_shards(ckpt, engine.optimizer, rank, world)
        result["reload_same_world_exact"] = all(torch.equal(a_, b_) for a_, b_ in zip(state["partitions"],
                                                                                      ema.partitions))
        if rank == 0:
            result["max_abs_err_offline"] = max_err(consolidate_ema(ckpt), ref)
            result["ema_moved_from_start"] = max_err(ref, initial) > 0
            torch.save({"ema": ref, "masters": masters, "num_updates": n_ref, "step": a.steps},
                       out / "reference.pt")
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        merged = {"ranks": results, **results[0]}
        (out / f"result_{a.mode}_{world}.json").write_text(json.dumps(merged, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    end_process()  # gloo threads can abort a finalizing interpreter (sd_ds.lifecycle.end_process)


def full_masters_local(engine):
    """The bf16 training weights as fp32 (no communication): what the EMA must differ from."""
    return {n: p.detach().float() for n, p in engine.module.named_parameters()}


if __name__ == "__main__":
    main()

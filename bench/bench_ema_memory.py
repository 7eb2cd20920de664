"""ZeRO-2 memory per rank: fp32 master partition, AdamW state and the EMA, at 1 and 2 ranks.

Runs real DeepSpeed (ZeRO stage 2, bf16, AdamW from the DeepSpeed config) on a small UNet2DConditionModel
built inline, one optimizer step, then counts the bytes of the tensors each rank holds. The sharded EMA
(sd_ds.ema.ShardedEMA) is compared with what a replicated fp32 EMA (diffusers' EMAModel, one full copy per
rank) would hold. Also prints the same accounting for the SD v1 UNet, computed from its parameter count (the
model is built on the meta device: no weights).

    DS_ACCELERATOR=cpu python bench/bench_ema_memory.py            # CPU ranks over gloo
    python bench/bench_ema_memory.py --ranks 1 2 8 --no-write      # on a GPU node, without touching BENCHMARKS.md

Results are printed and written as section "## 4. ZeRO-2 memory" of BENCHMARKS.md (that section only).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks_md import publish

from sd_ds.lifecycle import end_process
from sd_ds.testing import REPO_ROOT, free_port

SECTION = "## 4. ZeRO-2 memory"

SMALL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=[64, 128, 128], down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                                       "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64,
                  attention_head_dim=8, norm_num_groups=32)


def worker(out: Path) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel

    from sd_ds.ema import ShardedEMA

    deepspeed.init_distributed(dist_backend="gloo" if os.environ.get("DS_ACCELERATOR") == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SMALL_UNET)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=unet.parameters(), config=cfg)
    ema = ShardedEMA(engine.optimizer, decay=0.9999)
    dev, dtype = engine.device, torch.bfloat16
    x = torch.randn(1, 4, 16, 16, device=dev, dtype=dtype)
    h = torch.randn(1, 8, 64, device=dev, dtype=dtype)
    loss = engine(x, torch.tensor([10], device=dev), h).sample.float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    ema.update(1)

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    opt = engine.optimizer
    adam_state = [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    num_params = sum(p.numel() for p in unet.parameters())
    row = {"rank": rank, "world_size": world, "num_params": num_params,
           "bf16_weights": nbytes(unet.parameters()),
           "fp32_master_partition": nbytes(opt.single_partition_of_fp32_groups),
           "adamw_state": nbytes(adam_state),
           "sharded_ema": ema.nbytes,
           "replicated_fp32_ema": 4 * num_params}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        (out / f"rows_{world}.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    end_process()  # gloo threads can abort a finalizing interpreter (sd_ds.lifecycle.end_process)


def launch(world: int, out: Path) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}",
           str(Path(__file__).resolve()), "--worker", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{world}-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads((out / f"rows_{world}.json").read_text())


def sd_v1_params() -> int:
    import torch
    from diffusers import UNet2DConditionModel

    from sd_ds.presets import SD_V1_UNET

    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**SD_V1_UNET).parameters())


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def report(measured: dict[int, list[dict]], sd_params: int, command: str) -> str:
    first = next(iter(measured.values()))[0]
    lines = [SECTION, "",
             f"{dt.date.today().isoformat()} · {platform.node()} · {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU cores, DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', '(auto)')} · "
             f"`{command}`", "",
             f"Measured: DeepSpeed ZeRO-2, bf16, AdamW (config optimizer), small `UNet2DConditionModel` "
             f"({first['num_params']:,} parameters, built inline in the script), one optimizer step; bytes of the "
             "tensors each rank holds (MiB). `sharded EMA` is sd_ds.ema.ShardedEMA; `replicated EMA` is what a "
             "full fp32 EMA copy on every rank (diffusers' EMAModel) would hold.", "",
             "| ranks | rank | bf16 weights | fp32 master partition | AdamW state | sharded EMA | replicated EMA "
             "| total, sharded EMA | total, replicated EMA |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for world, rows in measured.items():
        for r in rows:
            base = r["bf16_weights"] + r["fp32_master_partition"] + r["adamw_state"]
            lines.append(f"| {world} | {r['rank']} | {mib(r['bf16_weights'])} | {mib(r['fp32_master_partition'])} | "
                         f"{mib(r['adamw_state'])} | {mib(r['sharded_ema'])} | {mib(r['replicated_fp32_ema'])} | "
                         f"{mib(base + r['sharded_ema'])} | {mib(base + r['replicated_fp32_ema'])} |")
    lines += ["", "Totals: bf16 weights + fp32 master partition + AdamW state + EMA (gradients, activations not counted)."]
    worlds = sorted(measured)
    if len(worlds) >= 2:
        lo, hi = worlds[0], worlds[-1]
        a, b = measured[lo][0]["sharded_ema"], measured[hi][0]["sharded_ema"]
        lines += ["", f"Sharded EMA per rank: {lo} rank(s) {a:,} B → {hi} ranks {b:,} B, ratio {a / b:.4f} "
                      f"(exact division would be {hi / lo:.4f}; any difference is DeepSpeed's alignment padding)."]
    lines += ["", f"Computed, not measured: the SD v1 UNet ({sd_params:,} parameters) under the same scheme, "
                  "GiB per rank (padding ignored):", "",
              "| ranks | fp32 master partition | AdamW state | sharded EMA | replicated EMA |",
              "|---:|---:|---:|---:|---:|"]
    for n in (1, 2, 8, 64):
        lines.append(f"| {n} | {gib(4 * sd_params / n)} | {gib(8 * sd_params / n)} | {gib(4 * sd_params / n)} | "
                     f"{gib(4 * sd_params)} |")
    return "\n".join(lines) + "\n"




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(Path(a.out))
        return
    command = "python bench/bench_ema_memory.py " + " ".join(sys.argv[1:])
    if os.environ.get("DS_ACCELERATOR"):
        command = f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} " + command
    with tempfile.TemporaryDirectory() as tmp:
        measured = {w: launch(w, Path(tmp)) for w in a.ranks}
    section = report(measured, sd_v1_params(), command.strip())
    publish(section, write=not a.no_write)


if __name__ == "__main__":
    main()

"""The fp16 recipe (MLPerf's: fp16 weights and gradients, fp32 master weights, dynamic loss scaling) beside bf16 and
fp32, on one CPU rank: losses, skipped steps and the loss scale over a short training.

    python bench/bench_fp16.py [--steps 200] [--no-write]

Each precision in its own process: the engine ``sd_ds.engine.build_engine`` builds (ZeRO-2 with sd-ds's streamlined
step; ds_configs/zero2_fp16.json for fp16, zero2_bf16.json, zero2_fp32.json), the tiny preset's UNet trained for
``--steps`` steps (micro batch 8, lr 1e-3, clipping 1.0) on 64 drawn-shape images (the demo's kind), encoded once by
the tiny VAE in fp32, captions encoded once by the tiny text encoder; the same batches, noise and timesteps in
every run. Reported: mean loss over windows of the run, skipped steps, the final loss scale, ms per step.

DeepSpeed refuses an fp16 engine on a CPU without native fp16 (AVX-512-FP16 / AMX-FP16: ``is_fp16_supported``), and
so does the trainer (one line, exit 2). Here the child lets DeepSpeed through so that torch's reference fp16
kernels run the recipe: the numerics are fp16's, the speed is not (no fp16 hardware path on such a CPU). The
GPU comparison (tensor cores run fp16 and bf16 at the same rate on A100/H100/H200) is the prepared command in
section "## 23." of BENCHMARKS.md, where the results of this script go.
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
import time
from pathlib import Path

from benchmarks_md import git_commit, publish

SECTION = "## 23. Precision: the fp16 recipe beside bf16 and fp32 (CPU rank)"
FLAGS = {"bf16": ["--bf16", "True"], "fp16": ["--fp16", "True"], "fp32": ["--bf16", "False"]}


def child(precision: str, steps: int, out: Path) -> None:
    import random

    import numpy as np
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from sd_ds.conditioning import Conditioning, PromptEncoder
    from sd_ds.config import parse_config
    from sd_ds.distributed import init_distributed
    from sd_ds.engine import build_engine
    from sd_ds.latents import encode_moments, sample_latents
    from sd_ds.models import build_components
    from sd_ds.shapes import COLORS, SHAPES, caption_of, draw_shape
    from sd_ds.testing import make_tiny_model, scratch_dir

    CPU_Accelerator.is_fp16_supported = lambda self: True  # see the module docstring

    work = scratch_dir("bench_fp16_")
    model = make_tiny_model(work / "model")
    cfg = parse_config(["--pretrained_model_name_or_path", str(model), "--per_device_train_batch_size", "8",
                        "--output_dir", str(work / "out"), "--train_shards", "unused", "--learning_rate", "1e-3",
                        "--max_grad_norm", "1.0", "--max_steps", str(steps), *FLAGS[precision]])
    dist_info = init_distributed()
    components = build_components(cfg.model, seed=0)
    rng = random.Random(0)
    images, captions = [], []
    for _ in range(64):
        c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
        b = rng.choice([x for x in ("red", "blue", "white", "black") if x != c])
        images.append(torch.from_numpy(np.asarray(draw_shape(c, s, b, rng, size=32))))
        captions.append(caption_of(c, s, b))
    pixels = torch.stack(images).permute(0, 3, 1, 2).contiguous()  # uint8 [64, 3, 32, 32]
    prompt_encoder = PromptEncoder.for_components(components, cfg.model.model_max_length)
    with torch.no_grad():
        moments = encode_moments(components.vae, pixels)  # fp32 VAE, once
        hidden = prompt_encoder.encode(prompt_encoder.tokenize(captions)).encoder_hidden_states
    engine = build_engine(cfg, components, dist_info)
    generator = torch.Generator().manual_seed(1)
    order = torch.Generator().manual_seed(2)
    losses, skipped, scales = [], [], []
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randperm(64, generator=order)[:8]
        latents = sample_latents(moments[index], generator, components.vae.config.scaling_factor)
        loss = engine(latents, Conditioning(hidden[index]), generator)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        skipped.append(int(engine.skipped_steps))
        scales.append(float(engine.optimizer.loss_scale))
    seconds = time.perf_counter() - start
    out.write_text(json.dumps({"losses": losses, "skipped": skipped, "scales": scales,
                               "ms_per_step": 1000 * seconds / steps}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--no-write", action="store_true", help="print the section only")
    p.add_argument("--child", nargs=2, metavar=("PRECISION", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.steps, Path(a.child[1]))
        return 0
    from sd_ds.precision import cpu_capability, cpu_has_native_fp16
    from sd_ds.testing import free_port, subprocess_env

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in FLAGS:
            out = Path(tmp) / f"{precision}.json"
            env = subprocess_env({"MASTER_PORT": str(free_port()), "MASTER_ADDR": "127.0.0.1", "RANK": "0",
                                  "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
            subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--child", precision, str(out)],
                           check=True, env=env)
            results[precision] = json.loads(out.read_text())
            print(precision, {k: v for k, v in results[precision].items() if k != "losses"}, flush=True)
    windows = [(0, 10), (a.steps // 2 - 25, a.steps // 2), (a.steps - 50, a.steps)]
    lines = [SECTION, "",
             f"{dt.date.today()} · {platform.machine()}, {os.cpu_count()} cores (shared) · {cpu_capability()}; "
             f"native fp16: {cpu_has_native_fp16()} · commit {git_commit()} · `python bench/bench_fp16.py --steps "
             f"{a.steps}`", "",
             "One CPU rank, sd-ds's engine (ZeRO-2, streamlined step), the tiny UNet, micro batch 8, lr 1e-3, "
             "clipping 1.0, the same 64 drawn-shape images, noise and timesteps in every run. fp16 runs on torch's "
             "reference fp16 kernels with DeepSpeed's CPU check let through: its numerics, not its speed.", "",
             "| precision | " + " | ".join(f"mean loss, steps {s + 1}-{e}" for s, e in windows)
             + " | skipped steps | final loss scale | ms/step |", "|---|" + "---:|" * (len(windows) + 3)]
    for precision, r in results.items():
        means = [sum(r["losses"][s:e]) / (e - s) for s, e in windows]
        lines.append(f"| {precision} | " + " | ".join(f"{m:.4f}" for m in means)
                     + f" | {r['skipped'][-1]} | {r['scales'][-1]:g} | {r['ms_per_step']:.0f} |")
    publish("\n".join(lines) + "\n", write=not a.no_write)
    return 0


if __name__ == "__main__":
    from sd_ds.lifecycle import run_to_exit

    sys.exit(run_to_exit(main))  # gloo ranks leave without finalizing (sd_ds.lifecycle.end_process)

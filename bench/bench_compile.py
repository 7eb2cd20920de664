"""--torch_compile through the real launcher: a cold start, a restart that loads the run's saved kernels, and eager.

    python bench/bench_compile.py [--nproc 2] [--steps 4] [--control] [--no-write]          # CPU ranks, tiny preset
    python bench/bench_compile.py --device cuda --nproc 1 --model DIR --resolution 256 --micro_batch 32   # a GPU

Every run is ``run.sh`` (deepspeed launcher → sd_ds.train) on tiny shards written here, each with its own empty
inductor cache (TORCHINDUCTOR_CACHE_DIR: a fresh node), timed from launch to exit:
- eager: ``--steps`` steps, then a restart from its checkpoint for ``--steps`` more (the launch-and-resume floor);
- compiled, cold: ``--torch_compile``, ``--steps`` steps; it compiles, and saves OUTPUT_DIR/compile_cache/;
- compiled, restart: the same output dir, a new empty inductor cache, ``--steps`` more steps: it loads the saved
  kernels at launch and compiles nothing (the log's "torch.compile: ..." line: cache hits only, no kernel built);
- with ``--control``: the same restart with compile_cache/ removed first (what a restart cost before).
Also the losses of the compiled runs against eager's, step by step, and each run's time per step (the trainer's
compute time over its steps). On a GPU pass ``--model`` (a model folder, e.g. from ``python -m sd_ds.init``);
``--sd_v1_random DIR`` writes an SD v1-sized folder with random frozen parts offline (no download). Results go to
section "## 24." of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks_md import git_commit, publish

SECTION = "## 24. torch.compile: cold start, restart from the run's saved kernels, eager"
REGIONS_SECTION = "## 21. torch.compile regions and ZeRO-2's gradient buckets"


def write_sd_v1_random(out: Path) -> Path:
    """An SD v1-sized model folder with random frozen parts (VAE, CLIP-L text encoder), built offline."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_ds.models import CLIP_TOKENIZER_DIR, load_tokenizer, save_tokenizer
    from sd_ds.presets import SD_V1_SCHEDULER, SD_V1_UNET, write_model_index

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
                  scaling_factor=0.18215).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
                  ).save_pretrained(out / "text_encoder")
    save_tokenizer(load_tokenizer(str(CLIP_TOKENIZER_DIR)), out / "tokenizer")
    DDPMScheduler(**SD_V1_SCHEDULER).save_pretrained(out / "scheduler")
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SD_V1_UNET}))
    write_model_index(out)
    return out


def regions_section() -> str:
    """Section 21: each model's compiled regions and their parameters against ZeRO-2's reduce bucket (meta device:
    nothing allocated), and the compile bounds."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from sd_ds.compile import MAX_REGION_PARAMETERS, unet_regions
    from sd_ds.engine import BUCKET_ELEMENTS
    from sd_ds.presets import SD_V1_UNET, SD_V2_UNET, SDXL_UNET

    lines = [REGIONS_SECTION, "",
             f"{dt.date.today()} · computed on the meta device · commit {git_commit()} · "
             "`python bench/bench_compile.py --regions_only`", "",
             f"ZeRO-2 reduces gradients in buckets of {BUCKET_ELEMENTS:.0e} elements (sd_ds.engine), started by a hook "
             "when a parameter's gradient is accumulated; a compiled region's gradients are accumulated when its "
             "backward ends. Regions (sd_ds.compile.unet_regions): each block, or its ResNets / transformers / "
             f"samplers when it holds more than {MAX_REGION_PARAMETERS:.0e} parameters (two buckets). Backward order "
             "is the reverse of the table's; the last region's gradients (and the eager glue's) are the ones whose "
             "reduction cannot overlap any backward.", "",
             "| model | parameters | regions | largest region | in buckets | last region in the backward + eager "
             "glue |", "|---|---:|---:|---|---:|---:|"]
    for name, config in (("SD v1", SD_V1_UNET), ("SD 2.x", SD_V2_UNET), ("SDXL", SDXL_UNET)):
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(config)
        total = sum(p.numel() for p in unet.parameters())
        regions = [(n, sum(p.numel() for p in m.parameters())) for n, m in unet_regions(unet)]
        largest = max(regions, key=lambda r: r[1])
        glue = total - sum(c for _, c in regions)
        lines.append(f"| {name} | {total / 1e6:,.0f} M | {len(regions)} | {largest[0]}: {largest[1] / 1e6:,.0f} M | "
                     f"{largest[1] / BUCKET_ELEMENTS:.1f} | {(regions[0][1] + glue) / 1e6:,.1f} M |")
    lines += ["", "Compiles per run: one per region (blocks of one class with the same shapes share theirs); "
              "with --aspect_ratio_buckets height and width are dynamic: still one per region for every bucket, plus "
              "one for a region that meets a side of 1 (a bucket side equal to the model's divisor). Static shapes "
              "would compile once per region and bucket: 41 buckets for SDXL at 1024 px. Proven on CPU by "
              "tests/test_compile.py (torch._dynamo.explain: one graph, no break, per region of tiny, tiny-sd2, "
              "tiny-sdxl, with --recompute and split per child; no recompile after the first step; buckets; the "
              "recompile limit raising) and tests/test_engine.py (each region's backward node owns exactly its "
              "parameters)."]
    return "\n".join(lines) + "\n"


def run(name: str, flags: list[str], *, nproc: int, device: str, timeout: float) -> dict[str, Any]:
    """One launch of run.sh with a fresh, empty inductor cache; wall time from launch to exit and the log."""
    from sd_ds.testing import run_sh

    with tempfile.TemporaryDirectory(prefix="inductor_") as inductor:
        env = {"TORCHINDUCTOR_CACHE_DIR": inductor}
        if device != "cpu":
            env["DS_ACCELERATOR"] = device
        start = time.perf_counter()
        proc = run_sh(flags, nproc=nproc, timeout=timeout, extra_env=env)
        wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    compile_lines = re.findall(r"torch\.compile: .*", log)
    print(f"{name}: {wall:.0f} s; {compile_lines[-1] if compile_lines else 'no compile'}", flush=True)
    return {"name": name, "wall_s": wall, "compile": compile_lines[-1] if compile_lines else None, "log": log}


def steady_step_ms(output_dir: Path, first_step: int, global_batch: int) -> float:
    """Median time per step of a run's steps after its first (which compiles), from the trainer's images/s of each
    step (logging every step)."""
    import statistics

    from sd_ds.testing import scalars

    rates = [v for step, v in scalars(output_dir / "runs", "train/images_per_s") if step > first_step + 1]
    return 1000 * global_batch / statistics.median(rates) if rates else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="ranks (NPROC_PER_NODE)")
    p.add_argument("--steps", type=int, default=4, help="steps per run (a restart runs as many more)")
    p.add_argument("--device", default="cpu", help="cpu (DS_ACCELERATOR=cpu) or cuda")
    p.add_argument("--model", default=None, help="model folder (default: the tiny preset, built here)")
    p.add_argument("--sd_v1_random", default=None, help="write an SD v1-sized random model folder here and use it")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--extra", default="", help="more trainer flags for every run, e.g. '--channels_last True'")
    p.add_argument("--control", action="store_true", help="also a restart without the saved kernels")
    p.add_argument("--timeout", type=float, default=3000, help="seconds per run")
    p.add_argument("--work_dir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    p.add_argument("--regions_only", action="store_true", help="only section 21: the regions per model (no runs)")
    a = p.parse_args()
    if a.regions_only:
        publish(regions_section(), write=not a.no_write)
        return 0

    from sd_ds.testing import make_tiny_model, scalars, scratch_dir, train_flags, write_tiny_shards

    work = Path(a.work_dir) if a.work_dir else scratch_dir("bench_compile_")
    work.mkdir(parents=True, exist_ok=True)
    # Enough samples that every rank's epoch holds a few micro batches.
    num_shards = max(4, -(-4 * a.micro_batch * a.nproc // 16))
    shards = write_tiny_shards(work / "shards", num_shards=num_shards, samples_per_shard=16, size=a.resolution)
    if a.sd_v1_random:
        model = write_sd_v1_random(Path(a.sd_v1_random))
    else:
        model = Path(a.model) if a.model else make_tiny_model(work / "model")
    precision = {"bf16": {"bf16": "True"}, "fp16": {"bf16": None, "fp16": "True"}, "fp32": {"bf16": "False"}}
    steps = a.steps

    def flags(out: Path, max_steps: int, compiled: bool) -> list[str]:
        compiling = {"torch_compile": "True"} if compiled else {}
        return train_flags(out, shards, model, max_steps=max_steps, save_steps=steps, resolution=a.resolution,
                           min_size=None, per_device_train_batch_size=a.micro_batch, logging_steps=1,
                           **precision[a.precision], **compiling) + a.extra.split()

    rows = []
    kw = {"nproc": a.nproc, "device": a.device, "timeout": a.timeout}
    eager, compiled, control = work / "eager", work / "compiled", work / "control"
    global_batch = a.micro_batch * a.nproc

    def launch(name: str, out: Path, first_step: int, compile_: bool) -> None:
        row = run(name, flags(out, first_step + steps, compile_), **kw)
        row.update(out=out, steps=steps, step_ms=steady_step_ms(out, first_step, global_batch))
        rows.append(row)

    launch("eager", eager, 0, False)
    launch("eager, restart", eager, steps, False)
    launch("compiled, cold", compiled, 0, True)
    saved = sorted((compiled / "compile_cache").glob("*.tar"))
    saved_mb = sum(f.stat().st_size for f in saved) / 1e6
    if a.control:
        shutil.copytree(compiled, control, ignore=shutil.ignore_patterns("compile_cache"))
    launch("compiled, restart from the saved kernels", compiled, steps, True)
    if a.control:
        launch("compiled, restart without them (control)", control, steps, True)
    losses = {name: [v for _, v in scalars(out / "runs", "train/loss")] for name, out in
              (("eager", eager), ("compiled", compiled))}
    diffs = [abs(x - y) for x, y in zip(losses["eager"], losses["compiled"])]
    cold = next(r for r in rows if r["name"] == "compiled, cold")
    warm = next(r for r in rows if r["name"].startswith("compiled, restart from"))
    result = {"date": str(dt.date.today()), "device": a.device, "nproc": a.nproc, "steps": steps,
              "rows": [{k: v for k, v in r.items() if k not in ("log", "out")} for r in rows],
              "saved_files": [f.name for f in saved], "saved_mb": saved_mb, "losses": losses,
              "max_loss_diff": max(diffs) if diffs else None, "warm_over_cold": warm["wall_s"] / cold["wall_s"]}
    if a.output:
        Path(a.output).write_text(json.dumps(result, indent=2))

    import torch

    lines = [SECTION, "",
             f"{dt.date.today()} · {platform.machine()}, {os.cpu_count()} cores (shared) · {a.device} · torch "
             f"{torch.__version__} · commit {git_commit()} · `python bench/bench_compile.py --nproc {a.nproc} --steps "
             f"{steps}{' --control' if a.control else ''}{' --device ' + a.device if a.device != 'cpu' else ''}`", "",
             f"run.sh with {a.nproc} rank(s), {model.name if a.model or a.sd_v1_random else 'tiny preset'}, "
             f"{a.resolution} px, micro batch {a.micro_batch}, {a.precision}; every launch with an empty inductor "
             "cache (a fresh node). Launch to exit, in seconds; ms/step: the median over a run's steps after its "
             "first (which compiles), from the trainer's images/s.", "",
             "| run | launch to exit (s) | steps | ms/step | what torch.compile did (rank 0's log) |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        what = (r["compile"] or "-").replace("torch.compile: ", "").replace("|", "/")
        lines.append(f"| {r['name']} | {r['wall_s']:.0f} | {r['steps']} | {r['step_ms']:.0f} | {what} |")
    lines += ["", f"Restart from the saved kernels / cold start: **{result['warm_over_cold']:.2f}** of the "
              f"launch-to-exit time. Saved: {', '.join(result['saved_files'])} ({saved_mb:.1f} MB). Losses, "
              "compiled vs eager, "
              f"largest difference over {len(diffs)} steps: {result['max_loss_diff']:.2g} "
              f"(eager {', '.join(f'{v:.4f}' for v in losses['eager'])}; compiled "
              f"{', '.join(f'{v:.4f}' for v in losses['compiled'])})."]
    publish("\n".join(lines) + "\n", write=not a.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

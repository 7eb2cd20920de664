"""Channels-last or NCHW on this CPU: layout switches per step (``sd_ds.memory_format``) and time per step.

    python bench/bench_memory_format.py [--steps 5] [--threads 1] [--compiled] [--no-write]

What is measured, each in NCHW and in channels-last, bf16 (native on CPUs with AVX-512-BF16/AMX, fp32 elsewhere):
- the tiny preset's UNet (the demo's: 8x8 latents, micro batch 64), forward + backward in train mode, the input
  latents in the layout (its weights stay NCHW, as ZeRO keeps them);
- SD v1's first down block (320 channels, CrossAttnDownBlock2D) at 32x32 latents (256 px), micro batch 4, the
  same way: the real channel widths, where a layout's cost shows;
- the tiny preset's frozen VAE encoder (32 px, micro batch 64, no gradients), weights and input in the layout;
- with ``--compiled``, the tiny UNet and the VAE encoder as ``--torch_compile`` compiles them (``sd_ds.compile``:
  inductor; minutes of compile on a CPU), in both input layouts.

The switch count is per forward pass, over every Conv2d / GroupNorm input (4-D), in call order: how many times the
layout changes. Inside a compiled region the layout is inductor's (hooks do not see it); the compiled rows give time
only. Results go to section "## 22." of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from typing import Callable

from benchmarks_md import git_commit, publish

SECTION = "## 22. channels_last vs NCHW on CPU: layout switches and step time"


def timed(step: Callable[[], None], steps: int) -> float:
    step()  # warm-up: oneDNN picks its kernels (and a compiled region compiles)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - start) / steps


def measure(args: argparse.Namespace) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

    from sd_ds.compile import compile_regions
    from sd_ds.memory_format import LayoutRecorder, to_channels_last
    from sd_ds.models import build_unet
    from sd_ds.precision import cpu_has_native_bf16
    from sd_ds.presets import TINY_UNET, TINY_VAE

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    formats = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
    rows = []
    g = torch.Generator().manual_seed(0)

    def unet_case(compiled: bool, fmt: str) -> dict:
        unet = build_unet(TINY_UNET, seed=0).to(dtype).train()
        if compiled:
            compile_regions(unet)
        b = args.micro_batch
        x = torch.randn(b, 4, 8, 8, generator=g).to(dtype).contiguous(memory_format=formats[fmt])
        t = torch.randint(0, 1000, (b,), generator=g)
        ctx = torch.randn(b, 16, TINY_UNET["cross_attention_dim"], generator=g).to(dtype)

        def step() -> None:
            unet(x, t, ctx).sample.float().square().mean().backward()
        ms = timed(step, args.steps)
        row = {"model": f"tiny UNet, micro batch {b}, fwd+bwd", "compiled": compiled, "layout": fmt, "ms": ms}
        if not compiled:
            with LayoutRecorder({"unet": unet}) as rec:
                unet(x, t, ctx)
            row.update(rec.summary().as_dict(), sites=rec.summary().switch_sites())
        return row

    def block_case(fmt: str) -> dict:
        torch.manual_seed(0)
        block = CrossAttnDownBlock2D(in_channels=320, out_channels=320, temb_channels=1280, num_layers=2,
                                     cross_attention_dim=768, num_attention_heads=8).to(dtype).train()
        b = 4
        x = torch.randn(b, 320, 32, 32, generator=g).to(dtype).contiguous(memory_format=formats[fmt])
        temb = torch.randn(b, 1280, generator=g).to(dtype)
        ctx = torch.randn(b, 77, 768, generator=g).to(dtype)

        def step() -> None:
            out, _ = block(x, temb, encoder_hidden_states=ctx)
            out.float().square().mean().backward()
        ms = timed(step, max(1, args.steps // 2))
        with LayoutRecorder({"block": block}) as rec:
            block(x, temb, encoder_hidden_states=ctx)
        return {"model": "SD v1 down_blocks.0 (320 ch, 32x32), micro batch 4, fwd+bwd", "compiled": False,
                "layout": fmt, "ms": ms, **rec.summary().as_dict(), "sites": rec.summary().switch_sites()}

    def vae_case(compiled: bool, fmt: str) -> dict:
        torch.manual_seed(0)
        vae = AutoencoderKL(**TINY_VAE).to(dtype).eval().requires_grad_(False)
        if fmt == "channels_last":
            to_channels_last([vae])
        if compiled:
            vae.encoder.compile(dynamic=False, fullgraph=True)
        b = args.micro_batch
        pixels = torch.randn(b, 3, 32, 32, generator=g).to(dtype).contiguous(memory_format=formats[fmt])

        @torch.no_grad()
        def step() -> None:
            vae.encode(pixels)
        ms = timed(step, args.steps)
        row = {"model": f"tiny VAE encoder, micro batch {b}, no grad", "compiled": compiled, "layout": fmt, "ms": ms}
        if not compiled:
            with LayoutRecorder({"vae": vae}) as rec, torch.no_grad():
                vae.encode(pixels)
            row.update(rec.summary().as_dict(), sites=rec.summary().switch_sites())
        return row

    for compiled in ([False, True] if args.compiled else [False]):
        for fmt in formats:
            rows.append(unet_case(compiled, fmt))
            print(rows[-1], flush=True)
    for fmt in formats:
        rows.append(block_case(fmt))
        print(rows[-1], flush=True)
    for compiled in ([False, True] if args.compiled else [False]):
        for fmt in formats:
            rows.append(vae_case(compiled, fmt))
            print(rows[-1], flush=True)
    for row in rows:
        row["dtype"] = str(dtype).replace("torch.", "")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (after one warm-up step)")
    p.add_argument("--micro_batch", type=int, default=64, help="tiny UNet / VAE micro batch (the demo's: 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's CPU ranks: 1 each)")
    p.add_argument("--compiled", action="store_true", help="also the compiled rows (minutes of compile)")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    args = p.parse_args()
    from sd_ds.precision import cpu_capability

    rows = measure(args)
    lines = [SECTION, "",
             f"{dt.date.today()} · {platform.machine()}, {os.cpu_count()} cores (shared) · {cpu_capability()} · "
             f"commit {git_commit()} · `python bench/bench_memory_format.py --steps {args.steps} --threads {args.threads}"
             f"{' --compiled' if args.compiled else ''}`", "",
             "Switches: how many times the layout of consecutive Conv2d / GroupNorm inputs changes in one forward "
             "(`sd_ds.memory_format.LayoutRecorder`); converted weights: convolutions whose weight layout differs from "
             "their input's. Compiled rows: inside a region the layout is inductor's (no hooks there).", "",
             "| model | compiled | input layout | ms/step | conv/norm inputs by layout | switches | converted conv "
             "weights |", "|---|---|---|---:|---|---:|---:|"]
    for r in rows:
        by = ", ".join(f"{k} {v}" for k, v in sorted(r.get("by_layout", {}).items())) or "-"
        lines.append(f"| {r['model']} ({r['dtype']}) | {'yes' if r['compiled'] else 'no'} | {r['layout']} | "
                     f"{r['ms']:.0f} | {by} | {r.get('switches', '-')} | {r.get('converted_conv_weights', '-')} |")
    sites = {f"{r['model']}, {r['layout']}": r["sites"] for r in rows if r.get("sites")}
    if sites:
        lines += ["", "Where the layout switched (first module in the new layout):", ""]
        lines += [f"- {k}: {'; '.join(v[:6])}{' ...' if len(v) > 6 else ''}" for k, v in sites.items()]
    publish("\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

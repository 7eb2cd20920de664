"""The training step by precision on this CPU: fp32 vs bf16, with the CPU's bf16 capability line.

    python bench/bench_precision.py [--steps 5] [--micro_batch 64] [--threads 1] [--emulate avx2] [--no-write]

What a CPU rank of the demo does each step, without DeepSpeed around it: the tiny preset's UNet (``sd_ds.init
--preset tiny``: 8x8 latents, the demo's 16-token text context) forward, backward and a torch AdamW step, at micro
batch 64 on one thread (the demo's 2 ranks on 2 cores), timed over ``--steps`` steps after one warm-up step, in
fp32 and in bf16 (weights, activations and gradients; the loss in fp32, as the trainer). ``sd_ds.precision``
decides from oneDNN's check which one a run uses when --bf16 is not given; this measures what that decision is
worth, so that the next surprise of this kind is a number.

``--emulate avx2`` also runs the same measurement in a child process with ``ONEDNN_MAX_CPU_ISA=AVX2`` and
``ATEN_CPU_CAPABILITY=avx2`` (oneDNN's and ATen's kernels capped at AVX2): an AVX2-only CPU reproduced on a
newer one. Results go to section "## 17." of BENCHMARKS.md.
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

SECTION = "## 17. Training step by precision on CPU (fp32 vs bf16)"
EMULATIONS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def measure(steps: int, micro_batch: int, threads: int) -> dict:
    """ms per optimizer step in fp32 and bf16 for the tiny UNet on this process's CPU settings."""
    import torch

    from sd_ds.presets import TINY_UNET
    from sd_ds.models import build_unet
    from sd_ds.precision import cpu_capability, cpu_has_native_bf16

    torch.set_num_threads(threads)
    results = {"capability": cpu_capability(), "native_bf16": cpu_has_native_bf16(), "ms_per_step": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        unet = build_unet(TINY_UNET, seed=0).to(dtype)
        unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(micro_batch, 4, 8, 8, generator=g).to(dtype)
        context = torch.randn(micro_batch, 16, TINY_UNET["cross_attention_dim"], generator=g).to(dtype)
        timesteps = torch.randint(0, 1000, (micro_batch,), generator=g)
        target = torch.randn(micro_batch, 4, 8, 8, generator=g)

        def step() -> None:
            pred = unet(latents, timesteps, context).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: oneDNN picks its kernels, AdamW allocates its state
        start = time.perf_counter()
        for _ in range(steps):
            step()
        results["ms_per_step"][name] = 1000 * (time.perf_counter() - start) / steps
    return results


def run_child(env_extra: dict, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", str(out), "--steps", str(args.steps), "--micro_batch",
               str(args.micro_batch), "--threads", str(args.threads)]
        subprocess.run(cmd, check=True, env={**os.environ, **env_extra})
        return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per precision (after one warm-up step)")
    p.add_argument("--micro_batch", type=int, default=64, help="samples per step (the demo's: 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's CPU ranks: 1 each)")
    p.add_argument("--emulate", choices=sorted(EMULATIONS), action="append", default=[],
                   help="also measure with oneDNN/ATen capped at this ISA (a child process)")
    p.add_argument("--no-write", action="store_true", help="print the section only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.child).write_text(json.dumps(measure(args.steps, args.micro_batch, args.threads)))
        return 0
    rows = [("this CPU", run_child({}, args))]
    rows += [(f"same CPU, {', '.join(f'{k}={v}' for k, v in EMULATIONS[e].items())}", run_child(EMULATIONS[e], args))
             for e in args.emulate]
    lines = [SECTION, "",
             f"{dt.date.today()} · {platform.machine()}, {os.cpu_count()} cores · commit {git_commit()} · "
             f"`python bench/bench_precision.py --steps {args.steps} --micro_batch {args.micro_batch} --threads "
             f"{args.threads}{''.join(' --emulate ' + e for e in args.emulate)}`", "",
             f"The tiny preset's UNet (the demo's), micro batch {args.micro_batch}, {args.threads} thread(s): forward, "
             "backward and a torch AdamW step per optimizer step, timed after a warm-up step. The default precision "
             "(no --bf16 given) is what `sd_ds.precision` picks on that CPU.", "",
             "| CPU | capability | fp32 ms/step | bf16 ms/step | bf16 / fp32 | default without --bf16 |",
             "|---|---|---:|---:|---:|---|"]
    for label, r in rows:
        ms = r["ms_per_step"]
        lines.append(f"| {label} | {r['capability']} | {ms['fp32']:.0f} | {ms['bf16']:.0f} | "
                     f"{ms['bf16'] / ms['fp32']:.1f}x | {'bf16' if r['native_bf16'] else 'fp32'} |")
    publish("\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which precision a run trains in: bf16 where the hardware runs it natively, fp32 on CPUs that cannot.

On GPUs bf16 is the default (unless ``--fp16``). On CPU ranks bf16 is fast only where oneDNN has bf16 kernels
(AVX-512-BF16 or AMX: Sapphire Rapids, Zen 4/5). Elsewhere (AVX2-only CPUs: Zen 2/3 servers, many cloud VMs and
laptops) every bf16 convolution falls back to ATen's scalar ``slow_conv2d`` and a step runs ~20x slower than in
fp32 (22.6x measured on a 2-core EPYC with the demo's UNet; ``bench/bench_precision.py`` measures any machine).
So on CPU ranks a run that did not ask for bf16 explicitly trains in fp32 there, and says so in one line; an
explicit ``--bf16 True`` is obeyed, with one warning giving the factor measured on this CPU.

The decision is oneDNN's own capability check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``), not a list of
CPU model names: it also honours ``ONEDNN_MAX_CPU_ISA`` (``ONEDNN_MAX_CPU_ISA=AVX2`` reproduces an AVX2-only
machine on a newer one).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sd_ds.config import TrainConfig

logger = logging.getLogger("sd_ds.precision")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions and matmuls with native instructions on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


class PrecisionUnsupported(ValueError):
    """The precision asked for cannot run on this device (a usage error: one line, exit status 2)."""


def cpu_has_native_fp16() -> bool:
    """True when oneDNN runs fp16 natively on this CPU (AVX-512-FP16 or AMX-FP16): what DeepSpeed's CPU accelerator
    asks before it accepts an fp16 engine (``is_fp16_supported``)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return bool(check()) if check is not None and torch.backends.mkldnn.is_available() else False


def cpu_capability() -> str:
    """One line describing this CPU's bf16 capability, for logs and benchmark tables."""
    flags: set[str] = set()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{model or 'unknown CPU'}; {os.cpu_count()} cores; flags: {' '.join(isa) or 'none of avx2/avx512/amx'}; "
            f"ATen {torch.backends.cpu.get_cpu_capability()}; oneDNN bf16 native: {cpu_has_native_bf16()}"
            + (f" (ONEDNN_MAX_CPU_ISA={capped})" if capped else ""))


def measure_bf16_slowdown(repeats: int = 3) -> float:
    """bf16 time / fp32 time of a small convolution stack's forward + backward on this CPU (about a second on an
    AVX2-only CPU, a fraction of one elsewhere). What a CPU rank's UNet step pays for bf16, roughly."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1))
    x = torch.randn(4, 64, 16, 16)
    seconds = {}
    with torch.random.fork_rng(devices=[]):
        for dtype in (torch.float32, torch.bfloat16):
            net, inp = block.to(dtype), x.to(dtype).requires_grad_()
            net(inp).float().sum().backward()  # warm-up: oneDNN picks and caches its kernels
            start = time.perf_counter()
            for _ in range(repeats):
                net(inp).float().sum().backward()
            seconds[dtype] = time.perf_counter() - start
    return seconds[torch.bfloat16] / max(seconds[torch.float32], 1e-9)


def resolve_precision(cfg: "TrainConfig", device: torch.device, *, is_main_process: bool) -> str:
    """Settle ``--bf16`` for this run's device (in ``cfg``) and return the precision: GPUs keep bf16 unless
    --fp16; CPU ranks without native bf16 train in fp32 unless bf16 was asked for explicitly."""
    optim = cfg.optim
    if device.type == "cpu" and optim.fp16 and not cpu_has_native_fp16():
        raise PrecisionUnsupported(
            "--fp16 on CPU ranks needs a CPU with native fp16 (oneDNN: AVX-512-FP16 or AMX-FP16), which this one has "
            "not: DeepSpeed's CPU accelerator refuses an fp16 engine here. Use --bf16 True (or --bf16 False for fp32)")
    if device.type != "cpu" or optim.fp16:
        if optim.bf16 is None:
            optim.bf16 = not optim.fp16
        return cfg.precision
    native = cpu_has_native_bf16()
    if optim.bf16 is None:
        optim.bf16 = native
        if not native and is_main_process:
            logger.info("precision: fp32 — this CPU has no native bf16 (oneDNN: no AVX-512-BF16/AMX), where bf16 "
                        "trains ~20x slower; --bf16 True forces bf16")
    elif optim.bf16 and not native and is_main_process:
        logger.warning("precision: --bf16 True on a CPU without native bf16 (oneDNN: no AVX-512-BF16/AMX): bf16 "
                       "convolutions run %.0fx slower than fp32 here (measured now); --bf16 False trains in fp32",
                       measure_bf16_slowdown())
    return cfg.precision

"""Figure 5: SD v1 UNet training throughput and MFU on one GPU — sd-ds vs a diffusers-style loop.

    python bench/bench_gpu_throughput.py --compile --output gpu.json --trace_dir .   # ~5-8 min on an H100/H200
    python bench/bench_gpu_throughput.py --device cpu --preset tiny --windows 1 --steps_per_window 2 --no-write
                                                              # (a smoke run of the same code on CPU)

Every contender trains the SD v1.x UNet (860 M parameters, random init: speed does not depend on the weights;
configs from ``sd_ds.init``, nothing downloaded) at the same micro batch and resolution on one GPU, each in its own
process (one process holding all of them needs ~75-85 GiB, and one contender's allocator state or compile caches
must not colour the next one's figures):
- ``diffusers loop``: what diffusers' ``train_text_to_image.py`` does under ``accelerate --mixed_precision bf16``:
  fp32 UNet weights under ``torch.autocast(bfloat16)``, ``torch.optim.AdamW`` (its default foreach path),
  ``clip_grad_norm_(1.0)``, the frozen VAE encoder and CLIP text encoder run in bf16 every step;
- ``diffusers loop --compile``: the same with ``torch.compile`` on the whole UNet (with ``--compile``);
- ``sd-ds``: the trainer's own engine (``sd_ds.engine.build_engine``: DeepSpeed ZeRO-2, bf16 weights and
  activations with fp32 master weights and fp32 Adam state, torch fused AdamW, the streamlined overflow check and
  clipping), with what the trainer's loop does every step besides: the sharded EMA update, the stop agreement
  (gloo), device-side metric sums, a logging read every 10 steps;
- ``sd-ds recompute``: the same with activation checkpointing (``--recompute``): ~1/3 more compute, less memory;
- ``sd-ds --compile``: the same with ``--torch_compile`` (per-block ``torch.compile``), with ``--compile``;
- ``sd-ds latents``: the sd-ds engine on precomputed VAE moments (``sd_ds.encode_latents``' path: no VAE encoder
  in the step, a latent sampled from the moments), with ``--latents`` (on by default).
Each contender runs ``--warmup`` untimed steps, then ``--windows`` × ``--steps_per_window`` timed steps; the
figure is the median window and the spread is min-max. Two MFUs: "UNet" = 3 × UNet forward FLOPs per step (the
trained model; recompute's extra forward is not counted, as usual for MFU) and "step" = that + the frozen
encoders' forwards the step runs (VAE encoder on the online rows, CLIP text encoder on all), both counted by
``torch.utils.flop_counter`` on meta-device copies (no memory, no device), / step time / the GPU's dense bf16
peak, looked up by the exact device name (H100 SXM, PCIe and NVL differ; an unknown name gives no MFU unless
``--peak_tflops`` is given). Peak memory: the process's peak allocated during its timed windows. With
``--trace_dir`` a ``torch.profiler`` trace of one step per traced contender is written there (gzipped Chrome
trace: GPU idle gaps show as holes in the stream rows) and the step's GPU-busy fraction is reported.
Results: JSON (``--output``) and section "## 5." of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks_md import publish

SECTION = "## 5. GPU: SD v1 UNet throughput and MFU, sd-ds vs a diffusers-style loop"
# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) from the vendors' data sheets, by the exact name
# torch.cuda.get_device_name reports: the same chip differs by form factor (H100 SXM 989, NVL 835, PCIe 756).
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 80GB HBM3e": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA H100 NVL": 835e12, "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12, "NVIDIA GH200 480GB": 989e12, "NVIDIA GH200 144G HBM3e": 989e12,
    "NVIDIA H800": 989e12, "NVIDIA H800 PCIe": 756e12, "NVIDIA H20": 148e12,
    "NVIDIA B200": 2250e12, "NVIDIA GB200": 2500e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12, "NVIDIA A800-SXM4-80GB": 312e12, "NVIDIA A800 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA A10G": 70e12, "NVIDIA A10": 125e12, "NVIDIA L4": 121e12,
    "NVIDIA GeForce RTX 4090": 165e12, "NVIDIA GeForce RTX 3090": 71e12, "Tesla V100-SXM2-32GB": 125e12,
    "Tesla V100-SXM2-16GB": 125e12, "Tesla V100-PCIE-32GB": 112e12, "Tesla V100-PCIE-16GB": 112e12,
}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD_V1_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
    scaling_factor=0.18215)
# name -> (loop, flags of the sd-ds trainer or of the diffusers loop, on precomputed latents?, precision recipe)
CONTENDERS: dict[str, tuple[str, tuple[str, ...], bool, str]] = {
    "diffusers loop": ("diffusers", (), False, "fp32 weights + fp32 AdamW, bf16 autocast"),
    "diffusers loop --compile": ("diffusers", ("compile",), False, "fp32 weights + fp32 AdamW, bf16 autocast"),
    "sd-ds": ("sd-ds", (), False, "bf16 weights/grads, fp32 master + AdamW (ZeRO-2)"),
    "sd-ds recompute": ("sd-ds", ("--recompute", "True"), False, "bf16 weights/grads, fp32 master + AdamW (ZeRO-2)"),
    "sd-ds --compile": ("sd-ds", ("--torch_compile", "True"), False, "bf16 weights/grads, fp32 master + AdamW (ZeRO-2)"),
    "sd-ds latents": ("sd-ds", (), True, "bf16 weights/grads, fp32 master + AdamW (ZeRO-2)"),
}


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> tuple[Optional[float], str]:
    if device.type != "cuda":
        return None, "cpu (no peak: MFU not computed)"
    name = torch.cuda.get_device_name(device)
    if override_tflops:
        return override_tflops * 1e12, f"{name} ({override_tflops:.0f} TFLOP/s bf16 dense, from --peak_tflops)"
    flops = PEAK_BF16_FLOPS.get(name.strip())
    if flops is None:
        return None, f"{name} (not in the peak table: MFU not computed; pass --peak_tflops)"
    return flops, f"{name} ({flops / 1e12:.0f} TFLOP/s bf16 dense)"


def model_configs(preset: str) -> tuple[dict, dict, dict]:
    from sd_ds import presets

    if preset == "sd-v1":
        return presets.SD_V1_UNET, SD_V1_VAE, CLIP_L
    return presets.TINY_UNET, presets.TINY_VAE, presets.TINY_TEXT_ENCODER


def build_components(preset: str, device: torch.device) -> Any:
    """The five components with SD v1 (or the tiny preset's) configs, random weights, built on the device (random
    init of 860 M parameters takes seconds on a CPU, milliseconds on a GPU); frozen parts in bf16, the UNet in fp32
    (each loop casts or wraps it as its recipe does)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_ds import presets
    from sd_ds.models import Components

    unet_cfg, vae_cfg, text_cfg = model_configs(preset)
    torch.manual_seed(0)
    with device:
        vae = AutoencoderKL(**vae_cfg).to(torch.bfloat16).requires_grad_(False).eval()
        text = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(torch.bfloat16).requires_grad_(False).eval()
        unet = UNet2DConditionModel(**unet_cfg)
    scheduler = DDPMScheduler(**presets.SD_V1_SCHEDULER)
    return Components(unet, vae, text, None, scheduler)


def model_flops(preset: str, batch_size: int, resolution: int, text_length: int) -> dict[str, float]:
    """FLOPs of one step's model work, counted on meta-device copies: the same figures as on the GPU (a FLOP
    count depends on shapes only) without allocating anything or touching a device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = model_configs(preset)
    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    pixels = torch.empty(batch_size, 3, resolution, resolution, device=meta)
    ids = torch.zeros(batch_size, text_length, dtype=torch.long, device=meta)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            moments = vae.encode(pixels).latent_dist.mean
        vae_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            hidden = text(ids)[0]
        text_flops = counter.get_total_flops()
        timesteps = torch.zeros(batch_size, dtype=torch.long, device=meta)
        with FlopCounterMode(display=False) as counter:
            unet(moments, timesteps, hidden)
        unet_forward = counter.get_total_flops()
    # Training = forward + backward (2 × forward: gradients of activations and of weights).
    return {"unet": 3 * unet_forward, "online": 3 * unet_forward + vae_flops + text_flops,
            "latents": 3 * unet_forward + text_flops, "vae_encoder": vae_flops, "text_encoder": text_flops}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    def __init__(self, name: str, step: Callable[[], None], device: torch.device) -> None:
        self.name, self.step, self.device = name, step, device
        self.window_s: list[float] = []
        self.peak_gb = 0.0

    def window(self, steps: int) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        self.window_s.append((time.perf_counter() - t0) / steps)
        if cuda:
            self.peak_gb = max(self.peak_gb, torch.cuda.max_memory_allocated(self.device) / 2**30)

    def trace(self, path: Path) -> Optional[float]:
        """One step under torch.profiler → gzipped Chrome trace at ``path``; returns the GPU-busy fraction of the
        step (kernel time / wall time; below 1 where the GPU waited for the host or for a sync)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        sync(self.device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            self.step()
            sync(self.device)
            wall_us = (time.perf_counter() - t0) * 1e6
        raw = path.with_suffix("")  # trace_x.json.gz -> trace_x.json
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
        if self.device.type != "cuda":
            return None
        return gpu_busy_us(path) / wall_us


def gpu_busy_us(trace: Any) -> float:
    """Time the GPU was busy in a Chrome trace: the union of its kernel/memcpy/memset intervals over all streams.
    (Summing key_averages()' self device times counts each kernel twice, under its launching op and as its own
    row: the first H200 run printed 202 % and 144 % for 97 % and 70 %.)"""
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                       if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy


def diffusers_loop(components: Any, pixels: torch.Tensor, ids: torch.Tensor, compile: bool) -> Callable[[], None]:
    """train_text_to_image.py's step under accelerate bf16 autocast (fp32 weights)."""
    unet = components.unet.to(pixels.device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    forward = torch.compile(unet) if compile else unet
    scheduler = components.noise_scheduler
    scaling = components.vae.config.scaling_factor

    def step() -> None:
        with torch.no_grad():
            latents = components.vae.encode(pixels).latent_dist.sample() * scaling
            hidden = components.text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(pixels.device.type, torch.bfloat16):
            pred = forward(noisy, timesteps, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sd_ds_loop(cfg: Any, dist_info: Any, components: Any, pixels: torch.Tensor, ids: torch.Tensor,
               moments: Optional[torch.Tensor]) -> Callable[[], None]:
    """The trainer's step: sd_ds.engine.encode_batch + engine forward/backward/step + EMA + stop agreement +
    device-side metrics (read every 10 steps, as with --logging_steps 10)."""
    from sd_ds.engine import build_ema, build_engine, encode_batch, grad_norm, group_lrs
    from sd_ds.metrics import StepMetrics
    from sd_ds.distributed import StopSignal

    engine = build_engine(cfg, components, dist_info)
    ema = build_ema(cfg, engine)
    metrics = StepMetrics(cfg.output_dir, dist_info, max_steps=10**9, initial_step=0, disable_tqdm=True)
    stop = StopSignal(dist_info)
    generator = torch.Generator(device=pixels.device).manual_seed(0)
    batch = {"input_ids": ids, **({"latent_moments": moments} if moments is not None else {"pixel_values": pixels})}
    step_count = [0]

    def step() -> None:
        latents, hidden, input_ids = encode_batch(batch, components, train_text_encoder=False, device=pixels.device,
                                                  dtype=torch.bfloat16, generator=generator)
        loss = engine(latents, hidden, input_ids, generator)
        engine.backward(loss)
        engine.step()
        metrics.add_micro_batch(loss, latents.shape[0], 0.0, 0.0)
        step_count[0] += 1
        if engine.was_step_applied():
            ema.update(step_count[0])
        metrics.step_done()
        if step_count[0] % 10 == 0:  # --logging_steps 10: the one device read of a window
            metrics.log(step_count[0], lrs=group_lrs(engine), grad_norm=grad_norm(engine),
                        samples_seen=step_count[0] * latents.shape[0], skipped_steps=engine.skipped_steps)
        stop.agreed()

    return step


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_contender(a: argparse.Namespace, name: str, device: torch.device) -> dict[str, Any]:
    """One contender in this process: build, warm up, time, optionally trace → its row."""
    loop, flags, latent, _ = CONTENDERS[name]
    B, R = a.micro_batch_size, a.resolution
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randint(0, 256, (B, 3, R, R), generator=g, dtype=torch.uint8).to(device)
    components = build_components(a.preset, device)
    ids = torch.randint(0, components.text_encoder.config.vocab_size - 2, (B, text_length(a.preset)),
                        generator=g).to(device)
    t_build = time.perf_counter()
    if loop == "diffusers":
        step = diffusers_loop(components, pixels.to(torch.bfloat16).div(127.5).sub(1.0), ids, "compile" in flags)
    else:
        from sd_ds.config import parse_config
        from sd_ds.distributed import init_distributed
        from sd_ds.models import configure_unet

        dist_info = init_distributed()
        cfg = parse_config(["--per_device_train_batch_size", str(B), "--bf16", "True", "--max_grad_norm", "1.0",
                            "--use_ema", "--output_dir", tempfile.mkdtemp(prefix="bench_gpu_"), "--train_shards",
                            "unused", "--resolution", str(R), *flags])
        configure_unet(components.unet, recompute=cfg.model.recompute, xformers=False, compile=cfg.model.torch_compile)
        moments = None
        if latent:
            from sd_ds.latents import encode_moments

            with torch.no_grad():
                moments = encode_moments(components.vae, pixels).to(torch.float16)  # as latent shards store them
        step = sd_ds_loop(cfg, dist_info, components, pixels, ids, moments)
    contender = Contender(name, step, device)
    t_warm = time.perf_counter()
    for _ in range(a.warmup):
        contender.step()
    sync(device)
    warmup_s = time.perf_counter() - t_warm
    for _ in range(a.windows):
        contender.window(a.steps_per_window)
    s = statistics.median(contender.window_s)
    row: dict[str, Any] = {
        "s_per_step": s, "images_per_s": B / s, "images_per_s_min": B / max(contender.window_s),
        "images_per_s_max": B / min(contender.window_s), "peak_memory_gb": contender.peak_gb,
        "precision": CONTENDERS[name][3], "build_s": t_warm - t_build, "warmup_s": warmup_s}
    if a.trace_dir and name in a.trace:
        path = Path(a.trace_dir) / f"trace_{R}_{slug(name)}.json.gz"
        row["gpu_busy"] = contender.trace(path)
        row["trace"] = str(path)
    return row


def text_length(preset: str) -> int:
    return 77 if preset == "sd-v1" else 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--micro_batch_size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--windows", type=int, default=3, help="timing windows per contender")
    p.add_argument("--steps_per_window", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per contender first")
    p.add_argument("--compile", action="store_true", help="add the compiled contenders (diffusers and sd-ds)")
    p.add_argument("--latents", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="add the sd-ds contender on precomputed latent moments (default True)")
    p.add_argument("--recompute", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="add the sd-ds contender with activation checkpointing (default True)")
    p.add_argument("--contenders", default=None,
                   help=f"comma-separated names to run instead of the flags' selection, from: {', '.join(CONTENDERS)}")
    p.add_argument("--contender", default=None, help=argparse.SUPPRESS)  # internal: run this one in this process
    p.add_argument("--timeout", type=float, default=600, help="seconds per contender's process before it is killed")
    p.add_argument("--preset", choices=("sd-v1", "tiny"), default="sd-v1", help="tiny: a CPU smoke run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak, for a GPU not in the table")
    p.add_argument("--trace_dir", default=None, help="write a torch.profiler trace of one step per traced contender")
    p.add_argument("--trace", default="diffusers loop,sd-ds", help="comma-separated contenders to trace")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher; ignored")
    a = p.parse_args()
    a.trace = [t.strip() for t in a.trace.split(",") if t.strip()]
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_throughput: no CUDA device; use --device cpu --preset tiny for a smoke run")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if a.contender:  # a child: one contender, its row as JSON
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        row = run_contender(a, a.contender, device)
        Path(a.output).write_text(json.dumps(row, indent=2))
        return

    t_start = time.perf_counter()
    B, R = a.micro_batch_size, a.resolution
    if a.contenders:
        names = [n.strip() for n in a.contenders.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONTENDERS]
        if unknown:
            raise SystemExit(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    else:
        names = [n for n in CONTENDERS if ("compile" not in n or a.compile) and (n != "sd-ds latents" or a.latents)
                 and (n != "sd-ds recompute" or a.recompute)]
    peak, gpu = peak_flops(device, a.peak_tflops)
    flops = model_flops(a.preset, B, R, text_length(a.preset))
    results: dict[str, Any] = {"date": str(dt.date.today()), "device": gpu, "micro_batch_size": B, "resolution": R,
                               "torch": torch.__version__, "windows": a.windows, "steps_per_window": a.steps_per_window,
                               "warmup": a.warmup, "flops_per_step": flops, "contenders": names}
    print(f"bench_gpu_throughput: {gpu}; {R} px, micro batch {B}; FLOPs per step: UNet {flops['unet'] / 1e12:.2f} T, "
          f"online step {flops['online'] / 1e12:.2f} T ({flops['unet'] / B / 1e9:.0f} / {flops['online'] / B / 1e9:.0f} "
          "GFLOP per image)", flush=True)
    if a.trace_dir:
        Path(a.trace_dir).mkdir(parents=True, exist_ok=True)
    rows, baseline_ips = [], None
    for name in names:
        # Each contender in a fresh process: its own allocator, compile caches and process group.
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            argv = [sys.executable, os.path.abspath(__file__), "--contender", name, "--output", str(out),
                    *without_options(sys.argv[1:], ("--output", "--contenders"))]
            env = {**os.environ, "MASTER_PORT": str(free_port())}
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(argv, env=env, timeout=a.timeout, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
                log = proc.stdout
                failure = None if proc.returncode == 0 and out.exists() else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired as e:
                log = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
                failure = f"timed out after {a.timeout:.0f} s"
            if failure:
                print(log[-3000:], flush=True)
            entry: dict[str, Any] = {"error": failure} if failure else json.loads(out.read_text())
        entry["process_s"] = time.perf_counter() - t0
        if not failure:
            ips = entry["images_per_s"]
            if name == "diffusers loop":
                baseline_ips = ips
            entry["x_diffusers_loop"] = ips / baseline_ips if baseline_ips else None
            step_flops = flops["latents" if CONTENDERS[name][2] else "online"]
            entry["mfu_unet"] = flops["unet"] / entry["s_per_step"] / peak if peak else None
            entry["mfu_step"] = step_flops / entry["s_per_step"] / peak if peak else None
            entry["mfu"] = entry["mfu_step"]
        results[name] = entry
        print(f"{name}: " + (f"FAILED {failure}" if failure else format_row(entry)), flush=True)
        rows.append(markdown_row(name, entry))
    results["wall_s"] = time.perf_counter() - t_start
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2))
    command = "python bench/bench_gpu_throughput.py" + (" --compile" if a.compile else "") + (
        f" --micro_batch_size {B}" if B != 64 else "") + (f" --resolution {R}" if R != 256 else "")
    section = f"""{SECTION}

{results['date']} · {gpu} · torch {torch.__version__} · `{command}` ({results['wall_s'] / 60:.1f} min)

SD v1 UNet (860 M parameters), {R} px, micro batch {B}, one GPU, each contender in its own process. images/s:
median of {a.windows} windows of {a.steps_per_window} steps (min-max), after {a.warmup} warm-up steps. MFU "UNet":
3 × UNet forward FLOPs ({flops['unet'] / B / 1e9:.0f} GFLOP per image); MFU "step": plus the frozen encoders the
step runs (VAE encoder on online rows, text encoder on all: {flops['online'] / B / 1e9:.0f} GFLOP per image online).
Recompute's extra forward is not counted. Peak memory: the process's peak allocated during its timed windows.

| contender | precision | images/s | × diffusers loop | MFU UNet | MFU step | peak memory (GB) |
|---|---|---:|---:|---:|---:|---:|
""" + "\n".join(rows) + "\n"
    results["markdown"] = section
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2))
    publish(section, write=not a.no_write and device.type == "cuda")


def without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without the parent-only ``options`` (each with its value)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not any(arg.startswith(option + "=") for option in options):
            kept.append(arg)
    return kept


def percent(value: Optional[float]) -> str:
    return f"{100 * value:.1f} %" if value is not None else "—"


def format_row(e: dict[str, Any]) -> str:
    busy = f", GPU busy {percent(e['gpu_busy'])} of a traced step" if e.get("gpu_busy") is not None else ""
    return (f"{e['images_per_s']:,.1f} images/s ({e['images_per_s_min']:,.1f}-{e['images_per_s_max']:,.1f}), "
            f"{e['s_per_step'] * 1e3:.1f} ms/step, MFU UNet {percent(e['mfu_unet'])} / step {percent(e['mfu_step'])}, "
            f"peak {e['peak_memory_gb']:.1f} GB, warm-up {e['warmup_s']:.0f} s, process {e['process_s']:.0f} s{busy}")


def markdown_row(name: str, e: dict[str, Any]) -> str:
    if "error" in e:
        return f"| {name} | {CONTENDERS[name][3]} | failed: {e['error']} | | | | |"
    ratio = f"{e['x_diffusers_loop']:.2f}" if e.get("x_diffusers_loop") else "—"
    return (f"| {name} | {e['precision']} | {e['images_per_s']:,.1f} ({e['images_per_s_min']:,.1f}-"
            f"{e['images_per_s_max']:,.1f}) | {ratio} | {percent(e['mfu_unet'])} | {percent(e['mfu_step'])} "
            f"| {e['peak_memory_gb']:.1f} |")


if __name__ == "__main__":
    main()

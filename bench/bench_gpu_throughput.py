"""Figure 5: SD v1 UNet training throughput and MFU on one GPU — sd-ds vs a diffusers-style loop.

    python bench/bench_gpu_throughput.py --compile            # one command, ~5-8 min on an H100/H200
    python bench/bench_gpu_throughput.py --device cpu --preset tiny --windows 1 --steps_per_window 2 --no-write
                                                              # (a smoke run of the same code on CPU)

Every contender trains the SD v1.x UNet (860 M parameters, random init: speed does not depend on the weights;
configs from ``sd_ds.init``, nothing downloaded) at the same micro batch and resolution, bf16, on one GPU:
- ``diffusers loop``: what diffusers' ``train_text_to_image.py`` does under ``accelerate --mixed_precision bf16``:
  fp32 UNet under ``torch.autocast(bfloat16)``, ``torch.optim.AdamW`` (its default foreach path),
  ``clip_grad_norm_(1.0)``, the frozen VAE encoder and CLIP text encoder run in bf16 every step;
- ``sd-ds``: the trainer's own engine (``sd_ds.engine.build_engine``: DeepSpeed ZeRO-2 bf16, torch fused AdamW,
  the streamlined overflow check and clipping), with what the trainer's loop does every step besides:
  the sharded EMA update, the stop agreement (gloo), device-side metric sums, a logging read every 10 steps;
- ``sd-ds --compile``: the same with ``--torch_compile`` (``nn.Module.compile`` on the UNet), with ``--compile``;
- ``sd-ds latents``: the sd-ds engine on precomputed VAE moments (``sd_ds.encode_latents``' path: no VAE encoder
  in the step, a latent sampled from the moments), with ``--latents`` (on by default).
The contenders run in interleaved windows (``--windows`` × ``--steps_per_window`` steps each, after
``--warmup`` steps) so that clock and thermal drift hits all alike; the figure is the median window and the
spread is min-max. MFU = model FLOPs per step (3 × UNet forward + VAE encoder forward when the step encodes +
text encoder forward, counted by ``torch.utils.flop_counter``) / step time / the GPU's dense bf16 peak (table
below, by device name). Peak memory is the peak allocated during the contender's windows above what was
allocated before them. Results: JSON (``--output``) and section "## 5." of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Optional

import torch

from benchmarks_md import publish

SECTION = "## 5. GPU: SD v1 UNet throughput and MFU, sd-ds vs a diffusers-style loop"
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; the first name found in the device name wins.
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A800": 312e12, "L40S": 362e12, "L40": 181e12, "A10G": 70e12, "A10": 125e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD_V1_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
    scaling_factor=0.18215)


def peak_flops(device: torch.device) -> tuple[Optional[float], str]:
    if device.type != "cuda":
        return None, "cpu (no peak: MFU not computed)"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops, f"{name} ({flops / 1e12:.0f} TFLOP/s bf16 dense, as {key})"
    return None, f"{name} (not in the peak table: MFU not computed)"


def build_components(preset: str, device: torch.device) -> Any:
    """The five components with SD v1 (or the tiny preset's) configs, random weights; frozen parts in bf16."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_ds import init as presets
    from sd_ds.models import Components

    if preset == "sd-v1":
        unet_cfg, vae_cfg, text_cfg = presets.SD_V1_UNET, SD_V1_VAE, CLIP_L
    else:
        unet_cfg, vae_cfg, text_cfg = presets.TINY_UNET, presets.TINY_VAE, presets.TINY_TEXT_ENCODER
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_cfg).to(device, torch.bfloat16).requires_grad_(False).eval()
    text = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(device, torch.bfloat16).requires_grad_(False).eval()
    scheduler = DDPMScheduler(**presets.SD_V1_SCHEDULER)
    return Components(UNet2DConditionModel(**unet_cfg), vae, text, None, scheduler)


def model_flops(components: Any, pixels: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    unet = components.unet
    with torch.no_grad(), torch.autocast(pixels.device.type, torch.bfloat16):
        with FlopCounterMode(display=False) as counter:
            latents = components.vae.encode(pixels).latent_dist.sample()
        vae = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            hidden = components.text_encoder(ids)[0]
        text = counter.get_total_flops()
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=pixels.device)
        with FlopCounterMode(display=False) as counter:
            unet(latents, timesteps, hidden)
        unet_forward = counter.get_total_flops()
    return {"online": 3 * unet_forward + vae + text, "latents": 3 * unet_forward + text}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contender:
    def __init__(self, name: str, step: Callable[[], None], flops: float, device: torch.device) -> None:
        self.name, self.step, self.flops, self.device = name, step, flops, device
        self.window_s: list[float] = []
        self.peak_gb = 0.0

    def window(self, steps: int) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        self.window_s.append((time.perf_counter() - t0) / steps)
        if cuda:
            self.peak_gb = max(self.peak_gb, (torch.cuda.max_memory_allocated(self.device) - before) / 2**30)


def diffusers_loop(components: Any, pixels: torch.Tensor, ids: torch.Tensor) -> Callable[[], None]:
    """train_text_to_image.py's step under accelerate bf16 autocast (fp32 weights)."""
    unet = components.unet.to(pixels.device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
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
            pred = unet(noisy, timesteps, hidden).sample
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
    from sd_ds.logging import StepMetrics
    from sd_ds.train import StopSignal

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--micro_batch_size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--windows", type=int, default=3, help="interleaved timing windows per contender")
    p.add_argument("--steps_per_window", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per contender first")
    p.add_argument("--compile", action="store_true", help="add the sd-ds --torch_compile contender")
    p.add_argument("--latents", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="add the sd-ds contender on precomputed latent moments (default True)")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing in the sd-ds contenders")
    p.add_argument("--preset", choices=("sd-v1", "tiny"), default="sd-v1", help="tiny: a CPU smoke run")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher; ignored")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu_throughput: no CUDA device; use --device cpu --preset tiny for a smoke run")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    from sd_ds.config import parse_config
    from sd_ds.distributed import init_distributed

    t_start = time.perf_counter()
    dist_info = init_distributed()
    B, R = a.micro_batch_size, a.resolution
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randint(0, 256, (B, 3, R, R), generator=g, dtype=torch.uint8).to(device)
    pixels_float = pixels.to(torch.bfloat16).div(127.5).sub(1.0)
    peak, gpu = peak_flops(device)
    results: dict[str, Any] = {"date": str(dt.date.today()), "device": gpu, "micro_batch_size": B, "resolution": R,
                               "torch": torch.__version__, "windows": a.windows, "steps_per_window": a.steps_per_window}

    components = build_components(a.preset, device)
    ids = torch.randint(0, components.text_encoder.config.vocab_size - 2, (B, 77 if a.preset == "sd-v1" else 16),
                        generator=g).to(device)
    flops = model_flops(components, pixels_float, ids)
    results["flops_per_step"] = flops
    contenders = [Contender("diffusers loop", diffusers_loop(components, pixels_float, ids), flops["online"], device)]
    out_dir = tempfile.mkdtemp(prefix="bench_gpu_")

    def trainer_cfg(*extra: str) -> Any:
        return parse_config(["--per_device_train_batch_size", str(B), "--bf16", "True", "--max_grad_norm", "1.0",
                             "--use_ema", "--output_dir", out_dir, "--train_shards", "unused", "--resolution", str(R),
                             "--recompute", str(a.recompute), *extra])

    import dataclasses

    from diffusers import UNet2DConditionModel

    from sd_ds.models import configure_unet

    for name, extra, latent in (("sd-ds", (), False), ("sd-ds --compile", ("--torch_compile", "True"), False),
                                ("sd-ds latents", (), True)):
        if (name == "sd-ds --compile" and not a.compile) or (latent and not a.latents):
            continue
        cfg = trainer_cfg(*extra)
        unet = UNet2DConditionModel.from_config(components.unet.config)
        configure_unet(unet, recompute=cfg.model.recompute, xformers=False, compile=cfg.model.torch_compile)
        own = dataclasses.replace(components, unet=unet)
        moments = None
        if latent:
            from sd_ds.encode_latents import encode_moments

            with torch.no_grad():
                moments = encode_moments(components.vae, pixels).to(torch.float16)  # as latent shards store them
        step = sd_ds_loop(cfg, dist_info, own, pixels, ids, moments)
        contenders.append(Contender(name, step, flops["latents" if latent else "online"], device))

    for contender in contenders:
        for _ in range(a.warmup):
            contender.step()
    sync(device)
    for _ in range(a.windows):
        for contender in contenders:
            contender.window(a.steps_per_window)

    rows = []
    baseline_ips = None
    for contender in contenders:
        s = statistics.median(contender.window_s)
        ips = B / s
        baseline_ips = baseline_ips or ips
        entry = {"s_per_step": s, "images_per_s": ips, "images_per_s_min": B / max(contender.window_s),
                 "images_per_s_max": B / min(contender.window_s), "x_diffusers_loop": ips / baseline_ips,
                 "mfu": contender.flops / s / peak if peak else None, "peak_memory_gb": contender.peak_gb}
        results[contender.name] = entry
        mfu = f"{100 * entry['mfu']:.1f} %" if entry["mfu"] is not None else "—"
        rows.append(f"| {contender.name} | {ips:,.1f} ({entry['images_per_s_min']:,.1f}-{entry['images_per_s_max']:,.1f}) "
                    f"| {entry['x_diffusers_loop']:.2f} | {mfu} | {contender.peak_gb:.1f} |")
    results["wall_s"] = time.perf_counter() - t_start
    print(json.dumps(results, indent=2))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(results, f, indent=2)
    command = "python bench/bench_gpu_throughput.py" + (" --compile" if a.compile else "") + (
        f" --micro_batch_size {B}" if B != 64 else "") + (f" --resolution {R}" if R != 256 else "")
    section = f"""{SECTION}

{results['date']} · {gpu} · torch {torch.__version__} · `{command}` ({results['wall_s'] / 60:.1f} min)

SD v1 UNet (860 M parameters), {R} px, bf16, micro batch {B}, one GPU. images/s: median of {a.windows} interleaved
windows of {a.steps_per_window} steps (min-max), after {a.warmup} warm-up steps each. MFU counts 3 × UNet forward +
VAE encoder (online rows) + text encoder FLOPs per step. Peak memory: above what was allocated before the window.

| contender | images/s | × diffusers loop | MFU | peak memory (GB) |
|---|---:|---:|---:|---:|
""" + "\n".join(rows) + "\n"
    publish(section, write=not a.no_write and device.type == "cuda")


if __name__ == "__main__":
    main()

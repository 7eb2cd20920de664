"""Figure 5 (and 25, 26): UNet training throughput and MFU on one GPU — sd-ds vs a diffusers-style loop, for SD v1
at 256 px, SD 2.x at 512 px (MLPerf Training's model) and SDXL at 1024 px.

    python bench/bench_gpu_throughput.py --compile --output gpu.json --trace_dir .   # SD v1 256 px, ~5-8 min on an H200
    python bench/bench_gpu_throughput.py --preset sd-v2 --resolution 512 --micro_batch_size 32,64 \\
        --contenders "sd-ds latents,sd-ds latents+text"                              # MLPerf's configuration
    python bench/bench_gpu_throughput.py --preset sdxl --resolution 1024 --micro_batch_size 8 \\
        --contenders "sd-ds latents+text" --trainer_flags "--recompute True"
    python bench/bench_gpu_throughput.py --device cpu --preset tiny --windows 1 --steps_per_window 2 --no-write
                                                              # (a smoke run of the same code on CPU; tiny-sd2, tiny-sdxl too)

Every contender trains the preset's UNet (``sd_ds.presets``: SD v1 860 M, SD 2.x 866 M, SDXL 2.57 B parameters, random
init: speed does not depend on the weights) with its frozen parts built at the family's widths (SD VAE; CLIP-L,
OpenCLIP-H, CLIP-L + OpenCLIP-bigG: random weights, nothing downloaded) at the same micro batch and resolution on
one GPU, each in its own process (one process holding all of them needs ~75-85 GiB, and one contender's allocator
state or compile caches must not colour the next one's figures):
- ``diffusers loop``: what diffusers' ``train_text_to_image.py`` does under ``accelerate --mixed_precision bf16``:
  fp32 UNet weights under ``torch.autocast(bfloat16)``, ``torch.optim.AdamW`` (its default foreach path),
  ``clip_grad_norm_(1.0)``, the frozen VAE encoder and text encoder(s) run in bf16 every step (the family's
  prompt encoding: ``sd_ds.conditioning.PromptEncoder``, SDXL's added embedding included);
- ``diffusers loop --compile``: the same with ``torch.compile`` on the whole UNet (with ``--compile``);
- ``sd-ds``: the trainer's own engine (``sd_ds.engine.build_engine``: DeepSpeed ZeRO-2, bf16 weights and
  activations with fp32 master weights and fp32 Adam state, torch fused AdamW, the streamlined overflow check and
  clipping), its components set up by the trainer's own ``sd_ds.models.prepare_components`` from the trainer's
  flags (attention, --recompute, --torch_compile, --cudnn_benchmark: ``--trainer_flags`` adds any of them to
  every sd-ds contender), with what the trainer's loop does every step besides: the sharded EMA update, the stop
  agreement (gloo), device-side metric sums, a logging read every 10 steps;
- ``sd-ds recompute``: the same with activation checkpointing (``--recompute``): ~1/3 more compute, less memory;
- ``sd-ds --compile``: the same with ``--torch_compile`` (per-block ``torch.compile``), with ``--compile``;
- ``sd-ds latents``: the sd-ds engine on precomputed VAE moments (``sd_ds.encode_latents``' path: no VAE encoder
  in the step, a latent sampled from the moments), with ``--latents`` (on by default);
- ``sd-ds latents+text``: on latent shards encoded with ``--text_embeddings`` too (MLPerf's set-up): the stored
  fp16 text conditioning, no text encoder in the step.
Each contender runs ``--warmup`` untimed steps, then ``--windows`` × ``--steps_per_window`` timed steps; the
figure is the median window and the spread is min-max. Two MFUs: "UNet" = 3 × UNet forward FLOPs per step (the
trained model, SDXL's added time/text embedding included; recompute's extra forward is not counted, as usual for
MFU) and "step" = that + the frozen encoders' forwards the step runs (VAE encoder on the online rows, the text
encoder(s) on all but latents+text), both counted by ``torch.utils.flop_counter`` on meta-device copies running
the trainer's own conditioning path (no memory, no device), / step time / the GPU's dense bf16 peak, looked up
by the exact device name (H100 SXM, PCIe and NVL differ; an unknown name gives no MFU unless ``--peak_tflops`` is
given). Peak memory: the process's peak allocated during its timed windows. With ``--trace_dir`` a
``torch.profiler`` trace of one step per traced contender is written there (gzipped Chrome trace: GPU idle gaps
show as holes in the stream rows) and the step's GPU-busy fraction is reported.
Results: JSON (``--output``) and section "## 5." (SD v1), "## 25." (SD 2.x) or "## 26." (SDXL) of BENCHMARKS.md.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks_md import publish

SECTION = "## 5. GPU: SD v1 UNet throughput and MFU, sd-ds vs a diffusers-style loop"
SECTIONS = {"sd-v1": SECTION,
            "sd-v2": "## 25. GPU: SD 2.x UNet at 512 px on latents, sd-ds vs MLPerf's per-GPU rate",
            "sdxl": "## 26. GPU: SDXL UNet at 1024 px on latents"}
# The rate to beat (issue 33): NVIDIA's MLPerf Training v4.1 SD 2.x result, 512 px, latents and OpenCLIP text
# embeddings precomputed, 8 x H200, micro batch 32: images/s per GPU.
MLPERF_SD2_IMAGES_PER_S = 139.5
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
# SD 2.x's text encoder: OpenCLIP ViT-H/14's text tower in diffusers' layout (23 of its 24 layers, final norm).
OPENCLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512, pad_token_id=1)
# SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower with its pooled projection.
OPENCLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280, pad_token_id=1)
SD_V1_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
    scaling_factor=0.18215)
SDXL_VAE = dict(SD_V1_VAE, scaling_factor=0.13025, force_upcast=True)  # the same architecture, another scale
# name -> (loop, flags of the sd-ds trainer or of the diffusers loop, what the step reads, precision recipe). What
# the step reads: "online" (pixels: VAE and text encoders run), "latents" (stored VAE moments: text encoders run),
# "latents+text" (moments and text conditioning stored: neither runs).
CONTENDERS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "diffusers loop": ("diffusers", (), "online", "fp32 weights + fp32 AdamW, bf16 autocast"),
    "diffusers loop --compile": ("diffusers", ("compile",), "online", "fp32 weights + fp32 AdamW, bf16 autocast"),
    "sd-ds": ("sd-ds", (), "online", "bf16 weights/grads, fp32 master + AdamW (ZeRO-2)"),
    "sd-ds recompute": ("sd-ds", ("--recompute", "True"), "online", "bf16 weights/grads, fp32 master + AdamW (ZeRO-2)"),
    "sd-ds --compile": ("sd-ds", ("--torch_compile", "True"), "online", "bf16 weights/grads, fp32 master + AdamW (ZeRO-2)"),
    "sd-ds latents": ("sd-ds", (), "latents", "bf16 weights/grads, fp32 master + AdamW (ZeRO-2)"),
    "sd-ds latents+text": ("sd-ds", (), "latents+text", "bf16 weights/grads, fp32 master + AdamW (ZeRO-2)"),
}


@dataclass(frozen=True)
class BenchModel:
    """What a preset trains: the UNet config, the frozen parts' configs at the family's widths, the schedule."""

    description: str
    unet: dict
    vae: dict
    text_encoders: tuple[tuple[str, dict], ...]  # (transformers class, config), in the family's order
    scheduler: dict
    text_length: int  # tokens per caption


def bench_model(preset: str) -> BenchModel:
    from sd_ds import presets

    full = {
        "sd-v1": BenchModel("SD v1 UNet", presets.SD_V1_UNET, SD_V1_VAE, (("CLIPTextModel", CLIP_L),),
                            presets.SD_V1_SCHEDULER, 77),
        "sd-v2": BenchModel("SD 2.x UNet", presets.SD_V2_UNET, SD_V1_VAE, (("CLIPTextModel", OPENCLIP_H),),
                            presets.SD_V2_SCHEDULER, 77),
        "sdxl": BenchModel("SDXL UNet", presets.SDXL_UNET, SDXL_VAE, (("CLIPTextModel", CLIP_L), (
            "CLIPTextModelWithProjection", OPENCLIP_BIGG)), presets.SDXL_SCHEDULER, 77),
    }
    if preset in full:
        return full[preset]
    tiny = presets.PRESET_TABLE[preset]  # tiny, tiny-sd2, tiny-sdxl: a CPU smoke run of the same code
    return BenchModel(f"{preset} UNet", tiny.unet, tiny.tiny.vae, tuple((cls, config) for _, cls, config in
                                                                        tiny.tiny.text_encoders),
                      tiny.tiny.scheduler, 16)


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


def build_components(preset: str, device: torch.device) -> Any:
    """The preset's components, random weights, built on the device (random init of 860 M parameters takes seconds
    on a CPU, milliseconds on a GPU); frozen parts in bf16, the UNet in fp32 (each loop casts or wraps it as its
    recipe does). The tokenizers are the CLIP BPE shipped with sd-ds: the loops feed token ids directly."""
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from sd_ds.families import family_of_unet
    from sd_ds.models import CLIP_TOKENIZER_DIR, Components, load_tokenizer

    spec = bench_model(preset)
    torch.manual_seed(0)
    with device:
        vae = AutoencoderKL(**spec.vae).to(torch.bfloat16).requires_grad_(False).eval()
        encoders = [getattr(transformers, cls)(CLIPTextConfig(**config)).to(torch.bfloat16).requires_grad_(False).eval()
                    for cls, config in spec.text_encoders]
        unet = UNet2DConditionModel(**spec.unet)
    tokenizer = load_tokenizer(str(CLIP_TOKENIZER_DIR))
    second = len(encoders) > 1
    return Components(unet, vae, encoders[0], tokenizer, DDPMScheduler(**spec.scheduler),
                      encoders[1] if second else None, tokenizer if second else None, family_of_unet(spec.unet))


def step_inputs(components: Any, batch_size: int, resolution: int, text_length: int, device: torch.device
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random token ids, one [B, L] per tokenizer of the family (input_ids[, input_ids_2]), and the geometry SDXL
    conditions on (the full image, uncropped: original and target size R x R, crop (0, 0))."""
    from sd_ds.conditioning import TOKEN_KEYS

    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = {key: torch.randint(0, encoder.config.vocab_size - 2, (batch_size, text_length), generator=g).to(device)
              for key, encoder in zip(TOKEN_KEYS, components.text_encoders)}
    size = torch.full((batch_size, 2), resolution, dtype=torch.int64, device=device)
    geometry = {"original_size": size, "crop_top_left": torch.zeros_like(size), "target_size": size.clone()}
    return tokens, geometry


def model_flops(preset: str, batch_size: int, resolution: int, device: torch.device = torch.device("meta")
                ) -> dict[str, float]:
    """FLOPs of one step's model work, counted on meta-device copies running the trainer's own paths (the VAE
    encoder, ``PromptEncoder.encode``, the UNet with the conditioning's kwargs: SDXL's added time/text embedding
    included): the same figures as on the GPU (a FLOP count depends on shapes only) without allocating anything
    or touching a device. (``device``: another, to check that; tests/test_bench_scripts.py does on the CPU.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from sd_ds.conditioning import PromptEncoder

    meta = device
    spec = bench_model(preset)
    components = build_components(preset, meta)
    prompt_encoder = PromptEncoder.for_components(components, spec.text_length)
    pixels = torch.zeros(batch_size, 3, resolution, resolution, device=meta)
    tokens, geometry = step_inputs(components, batch_size, resolution, spec.text_length, meta)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            moments = components.vae.float().encode(pixels).latent_dist.mean
        vae_flops = counter.get_total_flops()
        for encoder in components.text_encoders:
            encoder.float()
        with FlopCounterMode(display=False) as counter:
            conditioning = prompt_encoder.encode(tokens, geometry)
        text_flops = counter.get_total_flops()
        timesteps = torch.zeros(batch_size, dtype=torch.long, device=meta)
        with FlopCounterMode(display=False) as counter:
            components.unet(moments, timesteps, **conditioning.unet_kwargs())
        unet_forward = counter.get_total_flops()
        added = sum(n for module, ops in counter.get_flop_counts().items()
                    if module.endswith(".add_embedding") for n in ops.values())
    # Training = forward + backward (2 × forward: gradients of activations and of weights).
    return {"unet": 3 * unet_forward, "online": 3 * unet_forward + vae_flops + text_flops,
            "latents": 3 * unet_forward + text_flops, "latents+text": 3 * unet_forward, "vae_encoder": vae_flops,
            "text_encoder": text_flops, "unet_added_embedding": 3 * added,
            "unet_parameters": sum(p.numel() for p in components.unet.parameters())}


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


def diffusers_loop(components: Any, pixels: torch.Tensor, tokens: dict[str, torch.Tensor],
                   geometry: dict[str, torch.Tensor], text_length: int, compile: bool) -> Callable[[], None]:
    """train_text_to_image.py's step under accelerate bf16 autocast (fp32 weights); the family's prompt encoding
    (SDXL: both encoders, the pooled projection and time_ids, as train_text_to_image_sdxl.py computes them)."""
    from sd_ds.conditioning import PromptEncoder

    unet = components.unet.to(pixels.device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    forward = torch.compile(unet) if compile else unet
    scheduler = components.noise_scheduler
    scaling = components.vae.config.scaling_factor
    prompt_encoder = PromptEncoder.for_components(components, text_length)

    def step() -> None:
        with torch.no_grad():
            latents = components.vae.encode(pixels).latent_dist.sample() * scaling
            conditioning = prompt_encoder.encode(tokens, geometry)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = (noise if scheduler.config.prediction_type == "epsilon"
                  else scheduler.get_velocity(latents, noise, timesteps))
        with torch.autocast(pixels.device.type, torch.bfloat16):
            pred = forward(noisy, timesteps, **conditioning.unet_kwargs()).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sd_ds_loop(cfg: Any, dist_info: Any, components: Any, batch: dict[str, torch.Tensor],
               device: torch.device) -> Callable[[], None]:
    """The trainer's step: sd_ds.engine.encode_batch + engine forward/backward/step + EMA + stop agreement +
    device-side metrics (read every 10 steps, as with --logging_steps 10)."""
    from sd_ds.compile import prepare_compile
    from sd_ds.engine import build_ema, build_engine, encode_batch, grad_norm, group_lrs
    from sd_ds.metrics import StepMetrics
    from sd_ds.distributed import StopSignal

    engine = build_engine(cfg, components, dist_info)
    ema = build_ema(cfg, engine)
    # --torch_compile: the trainer's regions, compiled after the engine as in sd_ds.train (an empty cache: the
    # bench's warm-up steps include the cold compile).
    prepare_compile(cfg, components, dist_info)
    metrics = StepMetrics(cfg.output_dir, dist_info, max_steps=10**9, initial_step=0, disable_tqdm=True)
    stop = StopSignal(dist_info)
    generator = torch.Generator(device=device).manual_seed(0)
    step_count = [0]

    prompt_encoder = engine.module.prompt_encoder

    def step() -> None:
        latents, conditioning = encode_batch(batch, components, prompt_encoder, train_text_encoder=False,
                                             device=device, dtype=torch.bfloat16, generator=generator)
        loss = engine(latents, conditioning, generator)
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


def sd_ds_batch(components: Any, kind: str, pixels: torch.Tensor, tokens: dict[str, torch.Tensor],
                geometry: dict[str, torch.Tensor], text_length: int) -> dict[str, torch.Tensor]:
    """A data-loader batch as the trainer gets it: uint8 pixels (online), or the VAE moments in fp16 as latent
    shards store them, with the text conditioning stored as ``encode_latents --text_embeddings`` stores it
    (latents+text: fp16 PromptEncoder output), beside the token ids and geometry."""
    from sd_ds.conditioning import PromptEncoder
    from sd_ds.data.manifest import POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS
    from sd_ds.latents import encode_moments

    batch = {**tokens, **geometry}
    if kind == "online":
        return {**batch, "pixel_values": pixels}
    with torch.no_grad():
        batch["latent_moments"] = encode_moments(components.vae, pixels).to(torch.float16)
        if kind == "latents+text":
            conditioning = PromptEncoder.for_components(components, text_length).encode(tokens, geometry)
            batch[PROMPT_EMBEDS] = conditioning.encoder_hidden_states.to(torch.float16)
            if conditioning.added_cond_kwargs is not None:
                batch[POOLED_PROMPT_EMBEDS] = conditioning.added_cond_kwargs["text_embeds"].to(torch.float16)
    return batch


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_contender(a: argparse.Namespace, name: str, device: torch.device) -> dict[str, Any]:
    """One contender in this process: build, warm up, time, optionally trace → its row."""
    loop, flags, kind, _ = CONTENDERS[name]
    B, R = a.micro_batch_size[0], a.resolution
    spec = bench_model(a.preset)
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randint(0, 256, (B, 3, R, R), generator=g, dtype=torch.uint8).to(device)
    components = build_components(a.preset, device)
    tokens, geometry = step_inputs(components, B, R, spec.text_length, device)
    t_build = time.perf_counter()
    row: dict[str, Any] = {}
    if loop == "diffusers":
        step = diffusers_loop(components, pixels.to(torch.bfloat16).div(127.5).sub(1.0), tokens, geometry,
                              spec.text_length, "compile" in flags)
    else:
        from sd_ds.config import parse_config
        from sd_ds.distributed import init_distributed
        from sd_ds.models import prepare_components
        from sd_ds.testing import scratch_dir

        dist_info = init_distributed()
        trainer_flags = [*flags, *a.trainer_flags.split()]
        cfg = parse_config(["--per_device_train_batch_size", str(B), "--bf16", "True", "--max_grad_norm", "1.0",
                            "--use_ema", "--output_dir", str(scratch_dir("bench_gpu_")), "--train_shards",
                            "unused", "--resolution", str(R), *trainer_flags])
        # The trainer's own set-up from its flags: attention, recompute, cuDNN autotuning, frozen parts (compile: below).
        prepare_components(components, cfg.model)
        row.update(trainer_flags=" ".join(trainer_flags), cudnn_benchmark=torch.backends.cudnn.benchmark)
        step = sd_ds_loop(cfg, dist_info, components, sd_ds_batch(components, kind, pixels, tokens, geometry,
                                                                  spec.text_length), device)
    contender = Contender(name, step, device)
    t_warm = time.perf_counter()
    for _ in range(a.warmup):
        contender.step()
    sync(device)
    warmup_s = time.perf_counter() - t_warm
    for _ in range(a.windows):
        contender.window(a.steps_per_window)
    s = statistics.median(contender.window_s)
    row.update({
        "s_per_step": s, "images_per_s": B / s, "images_per_s_min": B / max(contender.window_s),
        "images_per_s_max": B / min(contender.window_s), "peak_memory_gb": contender.peak_gb,
        "precision": CONTENDERS[name][3], "build_s": t_warm - t_build, "warmup_s": warmup_s})
    if a.trace_dir and name in a.trace:
        path = Path(a.trace_dir) / f"trace_{R}_{slug(name)}.json.gz"
        row["gpu_busy"] = contender.trace(path)
        row["trace"] = str(path)
    return row


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--micro_batch_size", type=micro_batches, default=[64],
                   help="micro batch per GPU; several, comma-separated, run each contender at each (default: 64)")
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
    p.add_argument("--preset", choices=("sd-v1", "sd-v2", "sdxl", "tiny", "tiny-sd2", "tiny-sdxl"), default="sd-v1",
                   help="the model (sd_ds.presets' UNet, frozen parts at its family's widths); tiny*: CPU smoke runs")
    p.add_argument("--trainer_flags", default="",
                   help="trainer flags added to every sd-ds contender, e.g. --trainer_flags='--cudnn_benchmark True' "
                        "(set up by the trainer's own sd_ds.models.prepare_components)")
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
    R, sizes = a.resolution, a.micro_batch_size
    if a.contenders:
        names = [n.strip() for n in a.contenders.split(",") if n.strip()]
        unknown = [n for n in names if n not in CONTENDERS]
        if unknown:
            raise SystemExit(f"unknown contenders {unknown}; choose from {list(CONTENDERS)}")
    else:
        names = [n for n in CONTENDERS if ("compile" not in n or a.compile) and (n != "sd-ds latents" or a.latents)
                 and (n != "sd-ds recompute" or a.recompute) and n != "sd-ds latents+text"]
    peak, gpu = peak_flops(device, a.peak_tflops)
    spec = bench_model(a.preset)
    flops_by_size = {B: model_flops(a.preset, B, R) for B in sizes}
    flops = flops_by_size[sizes[0]]
    results: dict[str, Any] = {"date": str(dt.date.today()), "device": gpu, "preset": a.preset,
                               "micro_batch_size": sizes[0] if len(sizes) == 1 else sizes, "resolution": R,
                               "torch": torch.__version__, "windows": a.windows, "steps_per_window": a.steps_per_window,
                               "warmup": a.warmup, "flops_per_step": flops, "contenders": names,
                               "trainer_flags": a.trainer_flags}
    if len(sizes) > 1:
        results["flops_per_step_by_micro_batch"] = {str(B): f for B, f in flops_by_size.items()}
    per_image = {k: v / sizes[0] / 1e9 for k, v in flops.items() if k != "unet_parameters"}
    print(f"bench_gpu_throughput: {gpu}; {spec.description} ({flops['unet_parameters'] / 1e6:,.0f} M parameters), "
          f"{R} px, micro batch {', '.join(map(str, sizes))}; GFLOP per image: UNet {per_image['unet']:,.0f} (added "
          f"embedding {per_image['unet_added_embedding']:.3f}), online step {per_image['online']:,.0f}, on latents "
          f"{per_image['latents']:,.0f}", flush=True)
    if a.trace_dir:
        Path(a.trace_dir).mkdir(parents=True, exist_ok=True)
    rows, baseline_ips = [], {}
    for B in sizes:
        for name in names:
            label = name if len(sizes) == 1 else f"{name}, micro batch {B}"
            entry = run_in_own_process(a, name, B)
            if "error" not in entry:
                ips = entry["images_per_s"]
                if name == "diffusers loop":
                    baseline_ips[B] = ips
                entry["x_diffusers_loop"] = ips / baseline_ips[B] if B in baseline_ips else None
                step_flops = flops_by_size[B][CONTENDERS[name][2]]
                entry["mfu_unet"] = flops_by_size[B]["unet"] / entry["s_per_step"] / peak if peak else None
                entry["mfu_step"] = step_flops / entry["s_per_step"] / peak if peak else None
                entry["mfu"] = entry["mfu_step"]
            entry["micro_batch_size"] = B
            results[label] = entry
            print(f"{label}: " + (f"FAILED {entry['error']}" if "error" in entry else format_row(entry)), flush=True)
            rows.append(markdown_row(name, entry, mlperf=a.preset == "sd-v2"))
            if a.output:  # after every row: a run stopped from outside (gpu_check.sh's stage limit) keeps its rows
                results["markdown"] = section_text(a, spec, results | {"wall_s": time.perf_counter() - t_start},
                                                   flops, gpu, rows)
                Path(a.output).write_text(json.dumps(results, indent=2))
    results["wall_s"] = time.perf_counter() - t_start
    results["markdown"] = section_text(a, spec, results, flops, gpu, rows)
    if a.output:
        Path(a.output).write_text(json.dumps(results, indent=2))
    publish(results["markdown"], write=not a.no_write and device.type == "cuda")


def run_in_own_process(a: argparse.Namespace, name: str, batch_size: int) -> dict[str, Any]:
    """One contender at one micro batch in a fresh process (its own allocator, compile caches and process group):
    its row, or {"error": why}; ``process_s`` either way."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        argv = [sys.executable, os.path.abspath(__file__), "--contender", name, "--output", str(out),
                *without_options(sys.argv[1:], ("--output", "--contenders", "--micro_batch_size")),
                "--micro_batch_size", str(batch_size)]
        env = {**os.environ, "MASTER_PORT": str(free_port())}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(argv, env=env, timeout=a.timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
            log = proc.stdout
            failure = None if proc.returncode == 0 and out.exists() else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as e:
            log = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            failure = f"timed out after {a.timeout:.0f} s"
        if failure:
            print(log[-3000:], flush=True)
        entry: dict[str, Any] = {"error": failure} if failure else json.loads(out.read_text())
    entry["process_s"] = time.perf_counter() - t0
    return entry


def section_text(a: argparse.Namespace, spec: BenchModel, results: dict[str, Any], flops: dict[str, float], gpu: str,
                 rows: list[str]) -> str:
    R, sizes = a.resolution, a.micro_batch_size
    B = sizes[0]
    command = ("python bench/bench_gpu_throughput.py" + (f" --preset {a.preset}" if a.preset != "sd-v1" else "")
               + (" --compile" if a.compile else "") + (f" --resolution {R}" if R != 256 else "")
               + (f" --micro_batch_size {','.join(map(str, sizes))}" if sizes != [64] else "")
               + (f" --contenders '{a.contenders}'" if a.contenders else "")
               + (f" --trainer_flags='{a.trainer_flags}'" if a.trainer_flags else ""))
    mlperf = a.preset == "sd-v2"
    encoders = " + ".join(f"{c['hidden_size']}-wide x {c['num_hidden_layers']} layers" for _, c in spec.text_encoders)
    reference = (f"\nMLPerf Training v4.1 (NVIDIA, SD 2.x at 512 px on latents and OpenCLIP embeddings, 8 x H200, "
                 f"micro batch 32): {MLPERF_SD2_IMAGES_PER_S} images/s per GPU." if mlperf else "")
    head = (f"| contender | micro batch | precision | images/s | × diffusers loop |{' × MLPerf v4.1 |' if mlperf else ''}"
            f" MFU UNet | MFU step | peak memory (GB) |\n|---|---:|---|---:|---:|{'---:|' if mlperf else ''}---:|---:|---:|")
    return f"""{SECTIONS.get(family_name(a.preset), SECTION)}

{results['date']} · {gpu} · torch {torch.__version__} · `{command}` ({results['wall_s'] / 60:.1f} min)

{spec.description} ({flops['unet_parameters'] / 1e6:,.0f} M parameters), {R} px, micro batch {', '.join(map(str, sizes))},
one GPU, each contender in its own process; frozen parts at the family's widths (text encoder(s): {encoders}),
random weights. images/s: median of {a.windows} windows of {a.steps_per_window} steps (min-max), after {a.warmup}
warm-up steps. MFU "UNet": 3 × UNet forward FLOPs ({flops['unet'] / B / 1e9:,.0f} GFLOP per image, the added
embedding included); MFU "step": plus the frozen encoders the step runs (VAE encoder on online rows, text
encoder(s) on all but latents+text: {flops['online'] / B / 1e9:,.0f} GFLOP per image online). Recompute's extra
forward is not counted. Peak memory: the process's peak allocated during its timed windows.{reference}

{head}
""" + "\n".join(rows) + "\n"


def family_name(preset: str) -> str:
    from sd_ds.families import family_of_unet

    return family_of_unet(bench_model(preset).unet).name


def micro_batches(value: str) -> list[int]:
    sizes = [int(v) for v in value.split(",") if v.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: one or more positive whole numbers, comma-separated")
    return sizes


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


def markdown_row(name: str, e: dict[str, Any], *, mlperf: bool = False) -> str:
    B = e.get("micro_batch_size", "")
    if "error" in e:
        return f"| {name} | {B} | {CONTENDERS[name][3]} | failed: {e['error']} | |{' |' if mlperf else ''} | | |"
    ratio = f"{e['x_diffusers_loop']:.2f}" if e.get("x_diffusers_loop") else "—"
    versus = f" {e['images_per_s'] / MLPERF_SD2_IMAGES_PER_S:.2f} |" if mlperf else ""
    return (f"| {name} | {B} | {e['precision']} | {e['images_per_s']:,.1f} ({e['images_per_s_min']:,.1f}-"
            f"{e['images_per_s_max']:,.1f}) | {ratio} |{versus} {percent(e['mfu_unet'])} | {percent(e['mfu_step'])} "
            f"| {e['peak_memory_gb']:.1f} |")


if __name__ == "__main__":
    from sd_ds.lifecycle import run_to_exit

    sys.exit(run_to_exit(main))  # gloo ranks leave without finalizing (sd_ds.lifecycle.end_process)

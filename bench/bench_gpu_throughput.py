"""Figure 5: SD v1 UNet training throughput and MFU on one GPU — sd-ds vs a plain diffusers-style loop.

    python bench/bench_gpu_throughput.py [--micro_batch_size 64] [--resolution 256] [--steps 20]

Both contenders train the same SD v1.x UNet (860 M params, random init; speed does not depend on weights)
at the same batch and resolution on the same GPU, in one run:
- sd-ds: the DeepSpeed ZeRO-2 engine exactly as ``sd_ds.train`` builds it (bf16 weights, fused AdamW,
  SDPA attention, the frozen VAE/text encoder in bf16 outside the engine, ``sd_ds.diffusion.training_loss``);
- baseline: what diffusers' ``train_text_to_image.py`` does under ``accelerate --mixed_precision bf16``:
  fp32 UNet weights under ``torch.autocast(bfloat16)``, ``torch.optim.AdamW``, the same frozen encoders.
MFU counts the UNet forward+backward as 3× its forward FLOPs (``torch.utils.flop_counter``) plus the VAE
encoder and text encoder forward FLOPs, against 989 TFLOP/s (H100/H200 bf16 dense).
No model is downloaded: the SD v1 configs are written inline.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

PEAK_FLOPS = 989e12

SD_V1_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8)
SD_V1_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256,
    scaling_factor=0.18215)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def build(device):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**SD_V1_UNET)
    vae = AutoencoderKL(**SD_V1_VAE).to(device, torch.bfloat16).requires_grad_(False).eval()
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(device, torch.bfloat16).requires_grad_(False).eval()
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return unet, vae, text, sched


def count_flops(unet, vae, text, batch, device):
    from torch.utils.flop_counter import FlopCounterMode

    pixels, ids = batch
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        with FlopCounterMode(display=False) as fc:
            lat = vae.encode(pixels).latent_dist.sample()
        vae_f = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            hid = text(ids)[0]
        text_f = fc.get_total_flops()
        t = torch.randint(0, 1000, (lat.shape[0],), device=device)
        with FlopCounterMode(display=False) as fc:
            unet(lat, t, hid)
        unet_f = fc.get_total_flops()
    return 3 * unet_f + vae_f + text_f


def timed(step_fn, steps, warmup):
    for _ in range(warmup):
        step_fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micro_batch_size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--recompute", action="store_true", help="activation checkpointing for sd-ds")
    p.add_argument("--output", default=None, help="write results JSON here")
    a = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    device = torch.device("cuda")
    B, R = a.micro_batch_size, a.resolution
    pixels = torch.randn(B, 3, R, R, device=device, dtype=torch.bfloat16).clamp(-1, 1)
    ids = torch.randint(0, 49407, (B, 77), device=device)
    results = {"gpu": torch.cuda.get_device_name(), "micro_batch_size": B, "resolution": R,
               "torch": torch.__version__}

    # --- baseline: train_text_to_image.py under accelerate bf16 -----------------------------------
    unet, vae, text, sched = build(device)
    unet.to(device).train()
    flops = count_flops(unet, vae, text, (pixels, ids), device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)

    def baseline_step():
        with torch.no_grad():
            lat = vae.encode(pixels).latent_dist.sample() * 0.18215
            hid = text(ids)[0]
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (B,), device=device)
        noisy = sched.add_noise(lat, noise, t)
        with torch.autocast("cuda", torch.bfloat16):
            pred = unet(noisy, t, hid).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = timed(baseline_step, a.steps, a.warmup)
    results["baseline"] = {"s_per_step": s, "images_per_s": B / s, "mfu": flops / s / PEAK_FLOPS,
                           "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    opt = unet = None  # free the baseline before building the engine
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    # --- sd-ds: the trainer's engine ---------------------------------------------------------------
    os.environ.setdefault("RANK", "0"), os.environ.setdefault("WORLD_SIZE", "1"), os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1"), os.environ.setdefault("MASTER_PORT", "29533")
    from sd_ds.config import parse_config
    from sd_ds.distributed import build_deepspeed_config, init_distributed, initialize_engine
    from sd_ds.models import configure_unet
    from sd_ds.train import DiffusionModule, lr_schedule, param_groups

    cfg = parse_config(["--per_device_train_batch_size", str(B), "--bf16", "True", "--max_grad_norm", "1.0",
                        "--recompute", str(a.recompute)])
    init_distributed()
    unet, _, _, _ = build(device)
    configure_unet(unet, recompute=cfg.model.recompute, xformers=False)
    module = DiffusionModule(unet, None, sched, cfg)
    engine = initialize_engine(module, param_groups(cfg, module), build_deepspeed_config(cfg, 1),
                               lambda o: lr_schedule(cfg, o))
    gen = torch.Generator(device=device).manual_seed(0)

    def sdds_step():
        with torch.no_grad():
            lat = vae.encode(pixels).latent_dist.sample(gen) * 0.18215
            hid = text(ids)[0]
        loss = engine(lat, hid, ids, gen)
        engine.backward(loss)
        engine.step()

    s = timed(sdds_step, a.steps, a.warmup)
    results["sd_ds"] = {"s_per_step": s, "images_per_s": B / s, "mfu": flops / s / PEAK_FLOPS,
                        "max_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    results["flops_per_step"] = flops
    results["speedup"] = results["sd_ds"]["images_per_s"] / results["baseline"]["images_per_s"]
    print(json.dumps(results, indent=2))
    if a.output:
        with open(a.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

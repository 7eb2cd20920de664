"""Figure 10: the cost of evaluation (python -m sd_ds.evaluate): images generated and scored per second, and the
minutes MLPerf's protocol (30,000 prompts, DDIM 50 steps, guidance 8, FID Inception-v3 + CLIP ViT-H-14) takes.

    python bench/bench_eval.py --preset tiny                    # CPU: tiny generator at 32 px (CI-sized)
    python bench/bench_eval.py --preset sd-v1 --resolution 512  # GPU: SD v1 sizes, random weights, fp16
    python bench/bench_eval.py --flops-only                     # the FLOPs table for SD v1 at 256 and 512 (any CPU)

Measured through the code the CLI runs (``sd_ds.pipeline.generate``, ``sd_ds.fid_clip.inception_features`` and
``clip_scores``) with random weights of the real architectures (the cost does not depend on the values): the SD v1
UNet (``sd_ds.init``'s config), VAE and CLIP ViT-L/14 text encoder, pytorch-fid's InceptionV3 and open_clip's
ViT-H-14 (on CPU, ``--clip_model ViT-B-32``: ViT-H-14 takes seconds per image there). FLOPs come from
``torch.utils.flop_counter`` on the meta device (no weights allocated). Prints JSON; ``--write`` puts the section
"## 11." into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks_md import publish

SECTION = "## 11. Evaluation cost (FID and CLIP score, MLPerf protocol)"
PROMPTS, STEPS, GUIDANCE, GPUS = 30_000, 50, 8.0, 8
# SD v1's VAE (AutoencoderKL, 4 blocks of 128-512 channels) and text encoder (CLIP ViT-L/14's text tower).
SD_V1_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                 block_out_channels=[128, 256, 512, 512],
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD_V1_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                  projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
# Dense bf16/fp16 tensor-core peak of the GPU the computed rows assume (H100/H200 SXM data sheet).
PEAK_FLOPS, ASSUMED_MFU = 989e12, 0.4


def flops(fn: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def sd_v1_flops(resolution: int) -> dict[str, float]:
    """FLOPs per image of each part of generation and scoring, counted on the meta device."""
    import open_clip
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from pytorch_fid.inception import InceptionV3
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_ds.presets import SD_V1_UNET

    latent = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_V1_UNET)
        vae = AutoencoderKL(**SD_V1_VAE)
        text = CLIPTextModel(CLIPTextConfig(**SD_V1_TEXT))
        clip = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
        x, ids = torch.randn(1, 4, latent, latent), torch.zeros(1, 77, dtype=torch.long)
        hidden = torch.randn(1, 77, 768)
        unet_step = flops(lambda: unet(x, torch.tensor([500]), hidden))
        decode = flops(lambda: vae.decode(x))
        text_fwd = flops(lambda: text(ids))
        clip_img = flops(lambda: clip.encode_image(torch.randn(1, 3, 224, 224)))
        clip_txt = flops(lambda: clip.encode_text(ids))
    # pytorch-fid's InceptionV3 loads weights when built: count it on the CPU with random ones instead.
    with tempfile.TemporaryDirectory() as hub:
        inception = _random_inception(Path(hub))
        inc = flops(lambda: inception(torch.rand(1, 3, resolution, resolution)))
    per_image = {
        # classifier-free guidance: two UNet rows per image and step (conditional + unconditional)
        "unet": 2 * STEPS * unet_step, "vae_decode": decode, "text_encoder": 2 * text_fwd,
        "inception": inc, "clip": clip_img + clip_txt,
    }
    return {k: float(v) for k, v in per_image.items()}


def _random_inception(hub: Path) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 with random weights (FIDInception blocks have torchvision's parameters)."""
    from pytorch_fid import inception as fid_inception

    from sd_ds.fid_clip import FID_WEIGHTS_FILE, load_fid_inception

    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    weights = hub / "checkpoints" / FID_WEIGHTS_FILE
    torch.save(fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict(), weights)
    return load_fid_inception(weights, torch.device("cpu"))


def flops_rows() -> list[dict[str, Any]]:
    rows = []
    for resolution in (256, 512):
        parts = sd_v1_flops(resolution)
        gen = parts["unet"] + parts["vae_decode"] + parts["text_encoder"]
        score = parts["inception"] + parts["clip"]
        seconds = PROMPTS * (gen + score) / (GPUS * PEAK_FLOPS * ASSUMED_MFU)
        rows.append({"resolution": resolution, "tflop_per_image": {k: round(v / 1e12, 4) for k, v in parts.items()},
                     "generate_tflop_per_image": round(gen / 1e12, 3), "score_tflop_per_image": round(score / 1e12, 4),
                     "minutes_30k_on_8_gpus": round(seconds / 60, 1)})
    return rows


def measure(preset: str, resolution: int, images: int, batch_size: int, clip_model: str, device: str) -> dict:
    """images/s of generation, FID features and CLIP scores through sd_ds.pipeline / sd_ds.fid_clip."""
    import open_clip
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_ds.fid_clip import ClipModel, clip_scores, inception_features
    from sd_ds.presets import SD_V1_UNET, TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE
    from sd_ds.pipeline import generate, pipeline_from_components

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    sd = preset == "sd-v1"
    unet = UNet2DConditionModel(**(SD_V1_UNET if sd else TINY_UNET))
    vae = AutoencoderKL(**(SD_V1_VAE if sd else TINY_VAE))
    text = CLIPTextModel(CLIPTextConfig(**(SD_V1_TEXT if sd else TINY_TEXT_ENCODER)))
    tokenizer = CLIPTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "sd_ds" / "assets" /
                                                  "clip_tokenizer"))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = pipeline_from_components(vae, text, tokenizer, unet, scheduler).to(dev, dtype)
    prompts = [f"a photo of object number {i} on a table" for i in range(images)]

    def timed(fn: Any) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    steps = STEPS
    generate(pipe, prompts[:batch_size], steps=2, guidance_scale=GUIDANCE, batch_size=batch_size,
             width=resolution, height=resolution)  # warm-up
    out: list = []
    gen_s = timed(lambda: out.extend(generate(pipe, prompts, steps=steps, guidance_scale=GUIDANCE,
                                              batch_size=batch_size, width=resolution, height=resolution)))
    del pipe, unet, vae, text
    with tempfile.TemporaryDirectory() as hub:
        inception = _random_inception(Path(hub)).to(dev)
        inception_features(inception, out[:batch_size], dev)  # warm-up
        inc_s = timed(lambda: [inception_features(inception, out[i:i + batch_size], dev)
                               for i in range(0, len(out), batch_size)])
    model, _, preprocess = open_clip.create_model_and_transforms(clip_model, pretrained=None, device=dev)
    clip = ClipModel(model.eval(), preprocess, open_clip.get_tokenizer(clip_model), dev)
    clip_scores(clip, out[:batch_size], prompts[:batch_size])  # warm-up
    clip_s = timed(lambda: [clip_scores(clip, out[i:i + batch_size], prompts[i:i + batch_size])
                            for i in range(0, len(out), batch_size)])
    rate = {"generate": images / gen_s, "inception": images / inc_s, "clip": images / clip_s}
    total = 1.0 / sum(1.0 / r for r in rate.values())
    return {"preset": preset, "resolution": resolution, "device": _device_name(dev), "dtype": str(dtype),
            "images": images, "batch_size": batch_size, "ddim_steps": steps, "clip_model": clip_model,
            "images_per_s": {k: round(v, 3) for k, v in rate.items()}, "end_to_end_images_per_s": round(total, 3),
            "minutes_30k_on_8": round(PROMPTS / (GPUS * total) / 60, 1)}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    # A shared CPU's figures move with what else runs: the load average goes with them.
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.0f}"


def section(flop_rows: list[dict], measured: list[dict], command: str) -> str:
    lines = [SECTION, "",
             f"`{command}` ({dt.date.today().isoformat()}). MLPerf's protocol: {PROMPTS:,} prompts, DDIM {STEPS} "
             f"steps, guidance {GUIDANCE:g} (two UNet rows per step), FID from pytorch-fid's InceptionV3 (2048-d), "
             "CLIP score from open_clip ViT-H-14; random weights of the real architectures (cost does not depend on "
             "values).", ""]
    if measured:
        lines += ["Measured (through `sd_ds.pipeline.generate`, `sd_ds.fid_clip.inception_features`, "
                  "`clip_scores`):", "",
                  "| preset | px | device | images | generate img/s | Inception img/s | CLIP img/s | "
                  "end to end img/s | 30k prompts on 8 such devices |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m in measured:
            r = m["images_per_s"]
            lines.append(f"| {m['preset']} ({m['dtype'].replace('torch.', '')}, CLIP {m['clip_model']}) | "
                         f"{m['resolution']} | {m['device']} | {m['images']} (batch {m['batch_size']}) | "
                         f"{r['generate']:.2f} | {r['inception']:.1f} | {r['clip']:.1f} | "
                         f"{m['end_to_end_images_per_s']:.2f} | {m['minutes_30k_on_8']:.1f} min |")
        lines.append("")
    if flop_rows:
        lines += [f"Computed from FLOPs (SD v1, per image; {GPUS} GPUs at {PEAK_FLOPS / 1e12:.0f} TFLOP/s dense "
                  f"fp16/bf16 and an assumed {ASSUMED_MFU:.0%} utilisation):", "",
                  "| px | UNet (50 steps x 2) TFLOP | VAE decode | Inception | CLIP ViT-H-14 | 30k prompts on 8 GPUs |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in flop_rows:
            t = r["tflop_per_image"]
            lines.append(f"| {r['resolution']} | {t['unet']:.2f} | {t['vae_decode']:.3f} | {t['inception']:.4f} | "
                         f"{t['clip']:.4f} | {r['minutes_30k_on_8_gpus']:.1f} min |")
        lines.append("")
    lines.append("Reading: generation is nearly all of the cost (the UNet's 100 rows per image); scoring 30,000 images "
                 "with Inception and ViT-H-14 costs well under a minute of GPU time. Training-time evaluation "
                 "(--eval_steps, --eval_num_images 64 by default) costs about 64/30,000 of these minutes. Until "
                 "`python bench/bench_eval.py --preset sd-v1` runs on a GPU, the GPU minutes are the FLOPs estimate "
                 "above (utilisation assumed, not measured); the CPU row only shows the code path runs end to end "
                 "and is dominated by the shared machine's load.")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tiny", "sd-v1"), default="tiny")
    p.add_argument("--resolution", type=int, nargs="+", default=None, help="default: 32 (tiny), 256 512 (sd-v1)")
    p.add_argument("--images", type=int, default=None, help="images generated (default: 16 tiny, 64 sd-v1)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 16")
    p.add_argument("--clip_model", default=None, help="default: ViT-H-14 on a GPU, ViT-B-32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--flops-only", action="store_true")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    a = p.parse_args()
    measured = []
    if not a.flops_only:
        for res in a.resolution or ([32] if a.preset == "tiny" else [256, 512]):
            measured.append(measure(a.preset, res, a.images or (16 if a.preset == "tiny" else 64), a.batch_size or 16,
                                    a.clip_model or ("ViT-H-14" if a.device.startswith("cuda") else "ViT-B-32"),
                                    a.device))
            print(json.dumps(measured[-1]), flush=True)
    flop_rows = [] if a.no_flops else flops_rows()
    if a.json:
        Path(a.json).write_text(json.dumps({"measured": measured, "flops": flop_rows}, indent=1))
    publish(section(flop_rows, measured, "python bench/bench_eval.py " + " ".join(sys.argv[1:])), write=a.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

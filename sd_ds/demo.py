"""The embedded demo: `./run.sh` with no arguments.

On a machine with no GPU, no internet and no data it runs the whole sd-ds workflow on generated data in a
few minutes and leaves a model whose samples follow their prompts:

1. LAION-format parts (gzip, ``caption \\t _ \\t base64``) from photos scikit-image ships and from drawn
   captioned shapes ("a red circle on a blue background"), listed in a ``train.filelist.list`` like the
   seed's data;
2. ``tools/convert_laion_to_wds.py`` turns them into webdataset shards;
3. ``python -m sd_ds.init --preset tiny`` makes the model; since no pretrained VAE can be downloaded, the tiny
   VAE is trained briefly on the demo images, and its ``scaling_factor`` set so the latents have unit
   variance (what SD's 0.18215 does for its VAE; left at 0.18215 the tiny UNet barely learns from text);
4. ``./run.sh`` trains the UNet with DeepSpeed ZeRO-2 on every local device, with EMA and image logging;
5. ``python -m sd_ds.export`` and a sample grid for prompt combinations held out of training;
6. where everything is.

Every stage is skipped when its output already exists, so a re-run reuses what is built.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

from sd_ds.convert.parts import write_part

REPO = Path(__file__).resolve().parent.parent

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "white": (245, 245, 245), "black": (15, 15, 15), "purple": (140, 40, 170), "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("red", "green", "blue", "yellow", "white", "black")
# Never drawn for training: the final grid shows whether the model composes colour, shape and background.
HELD_OUT = (
    ("green", "circle", "yellow"), ("red", "triangle", "white"), ("blue", "square", "yellow"),
    ("yellow", "circle", "black"), ("white", "triangle", "blue"), ("orange", "square", "green"),
)
PHOTOS = {  # scikit-image's bundled colour photos and a caption for each
    "astronaut": "a photo of an astronaut in a white suit in front of a flag",
    "chelsea": "a photo of a ginger tabby cat",
    "coffee": "a photo of a cup of coffee on a saucer",
    "rocket": "a photo of a rocket on a launch pad",
    "retina": "a photo of a human retina",
    "immunohistochemistry": "a microscope photo of stained tissue",
    "hubble_deep_field": "a photo of galaxies in deep space",
    "colorwheel": "a color wheel",
    "logo": "the scikit-image logo",
}  # (only photos inside the wheel: others would need pooch and the network)


def caption_of(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def draw_shape(color: str, shape: str, background: str, rng: random.Random, size: int = 40) -> Image.Image:
    img = Image.new("RGB", (size, size), COLORS[background])
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.32) * size
    # Keep the shape inside the centre crop the trainer takes (shorter side → res/0.9, then crop res).
    cx = size / 2 + rng.uniform(-0.1, 0.1) * size
    cy = size / 2 + rng.uniform(-0.1, 0.1) * size
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r * 1.1, cy + r * 0.9), (cx + r * 1.1, cy + r * 0.9)], fill=fill)
    return img


def training_combinations() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS if c != b and (c, s, b) not in HELD_OUT]


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def demo_samples(per_combination: int, photo_crops: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """(caption, image bytes): drawn shapes as PNG, photo crops as JPEG."""
    rng = random.Random(seed)
    for _ in range(per_combination):
        for combo in training_combinations():
            yield caption_of(*combo), encode(draw_shape(*combo, rng=rng), "PNG")
    from skimage import data as skdata

    for name, caption in PHOTOS.items():
        try:
            arr = getattr(skdata, name)()
        except Exception:  # noqa: BLE001 - a photo missing from this scikit-image version is just skipped
            continue
        if arr.ndim != 3:
            continue
        photo = Image.fromarray(arr[..., :3].astype(np.uint8))
        for _ in range(photo_crops):
            w, h = photo.size
            side = int(min(w, h) * rng.uniform(0.7, 1.0))
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            yield caption, encode(photo.crop((x, y, x + side, y + side)).resize((64, 64), Image.LANCZOS), "JPEG")


def write_demo_parts(data_dir: Path, *, per_combination: int, photo_crops: int, parts: int = 4) -> Path:
    """Parts + filelist + train.filelist.list, the seed's data layout. Returns the .list path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    samples = list(demo_samples(per_combination, photo_crops))
    random.Random(1).shuffle(samples)
    part_paths = []
    for i in range(parts):
        path = data_dir / f"part-{i:05d}.gz"
        write_part(path, samples[i::parts])  # caption \t _ \t base64, gzip
        part_paths.append(path)
    filelist = data_dir / "laion_demo.filelist"
    filelist.write_text("".join(f"{p.resolve()}\n" for p in part_paths))
    file_list_list = data_dir / "train.filelist.list"
    file_list_list.write_text(f"{filelist.resolve()} 1.0\n")
    return file_list_list


# --- the tiny VAE ------------------------------------------------------------------------------

def train_vae(model_dir: Path, images: list[Image.Image], *, steps: int, resolution: int, batch_size: int = 32,
              lr: float = 2e-3, seed: int = 0) -> float:
    """Train the tiny VAE (reconstruction + small KL), then set scaling_factor = 1/std(latents)."""
    import torch
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    x_all = torch.stack([
        torch.from_numpy(np.asarray(im.convert("RGB").resize((resolution, resolution), Image.LANCZOS))).permute(2, 0, 1)
        for im in images]).float() / 127.5 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(steps), desc="demo: train tiny VAE", unit="step", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x = x_all[idx]
        if step % 2:
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))
        bar.set_postfix(mse=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x_all[i:i + 64]).latent_dist.mode() for i in range(0, len(x_all), 64)])
        mse = torch.nn.functional.mse_loss(
            torch.cat([vae.decode(vae.encode(x_all[i:i + 64]).latent_dist.mode()).sample
                       for i in range(0, len(x_all), 64)]), x_all).item()
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(model_dir / "vae", safe_serialization=True)
    return mse


# --- orchestration -------------------------------------------------------------------------------

@dataclass
class DemoSettings:
    output: Path
    per_combination: int = 12
    photo_crops: int = 12
    vae_steps: int = 500
    train_steps: int = 1100
    micro_batch_size: int = 32
    image_logging_steps: int = 400
    sample_steps: int = 20
    nproc: Optional[int] = None


def status(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    status("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, cwd=REPO, **kw)


def run_demo(s: DemoSettings) -> Path:
    t_start = time.time()
    out = s.output.resolve()
    data_dir, shards, model_dir, train_dir, export_dir = (out / n for n in ("data", "shards", "model", "train", "export"))

    list_path = data_dir / "train.filelist.list"
    if list_path.is_file():
        status(f"1/6 demo parts: reusing {data_dir}")
    else:
        status("1/6 building demo LAION parts (drawn shapes + scikit-image photos)")
        write_demo_parts(data_dir, per_combination=s.per_combination, photo_crops=s.photo_crops)

    if (shards / "stats.json").is_file():
        status(f"2/6 shards: reusing {shards}")
    else:
        status("2/6 converting parts to webdataset shards")
        run([sys.executable, "tools/convert_laion_to_wds.py", "--file_list", list_path, "--output_dir", shards,
             "--samples_per_shard", "64"])  # enough shards for every rank x worker

    if (model_dir / "vae" / ".demo_trained").is_file():
        status(f"3/6 tiny model: reusing {model_dir}")
    else:
        status("3/6 creating the tiny model, then training its VAE on the demo images")
        run([sys.executable, "-m", "sd_ds.init", "--output_dir", model_dir, "--preset", "tiny", "--seed", "0"])
        images = [Image.open(io.BytesIO(b)) for _, b in demo_samples(2, 8, seed=7)]
        mse = train_vae(model_dir, images, steps=s.vae_steps, resolution=32, batch_size=16, lr=1.5e-3)
        (model_dir / "vae" / ".demo_trained").write_text(json.dumps({"reconstruction_mse": mse}))
        status(f"   VAE reconstruction MSE {mse:.4f} (images in [-1, 1])")

    final = train_dir / f"checkpoint-{s.train_steps}"
    if (final / "trainer_state.json").is_file():
        status(f"4/6 training: reusing {final}")
    else:
        status(f"4/6 training the UNet with DeepSpeed ZeRO-2 ({s.train_steps} steps, EMA, image logging)")
        env = dict(os.environ)
        if s.nproc:
            env["NPROC_PER_NODE"] = str(s.nproc)
        env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 500))
        run(["./run.sh", "--output_dir", train_dir, "--train_shards", shards,
             "--pretrained_model_name_or_path", model_dir, "--resolution", "32", "--center_crop", "True",
             "--min_size", "32", "--per_device_train_batch_size", s.micro_batch_size, "--learning_rate", "1e-3",
             # Demo captions are at most 14 tokens: a 16-token context halves the tiny UNet's cross-attention cost.
             "--model_max_length", "16",
             "--lr_scheduler_type", "cosine", "--warmup_steps", str(min(100, s.train_steps // 10)),
             "--max_steps", s.train_steps, "--logging_steps", math.gcd(25, s.image_logging_steps), "--image_logging_steps", s.image_logging_steps,
             "--num_inference_steps", s.sample_steps, "--save_steps", s.train_steps, "--save_total_limit", "2",
             "--use_ema", "--ema_decay", "0.995", "--ema_warmup", "True", "--dataloader_num_workers", "1",
             "--shuffle_buffer", "500", "--seed", "0", "--max_grad_norm", "1.0", "--bf16", "True",
             "--validation_prompts", *[caption_of(*c) for c in HELD_OUT[:4]]], env=env)

    if (export_dir / "model_index.json").is_file():
        status(f"5/6 export: reusing {export_dir}")
    else:
        status("5/6 exporting the EMA weights to a diffusers folder")
        run([sys.executable, "-m", "sd_ds.export", final, export_dir, "--ema"])
    grid = out / "heldout_prompts.png"
    prompts = [caption_of(*c) for c in HELD_OUT]
    run([sys.executable, "-m", "sd_ds.sample", "--model", export_dir, *sum([["--prompt", p] for p in prompts], []),
         "--num_images", "4", "--steps", str(s.sample_steps), "--guidance_scale", "7.5", "--seed", "0",
         "--output", grid])

    status(f"6/6 done in {time.time() - t_start:.0f} s")
    print(f"""
  model (diffusers):   {export_dir}
  held-out prompts:    {grid}   (rows: {'; '.join(prompts)})
  training samples:    {train_dir / 'samples'}
  TensorBoard logs:    {train_dir / 'runs'}
  open TensorBoard:    .venv/bin/tensorboard --logdir {train_dir / 'runs'}
  sample again:        .venv/bin/python -m sd_ds.sample --model {export_dir} --prompt "a red circle on a blue background"
""", flush=True)
    return grid


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_ds.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.environ.get("SD_DS_DEMO_DIR", str(REPO / "demo_output")),
                   help="where everything is written (env SD_DS_DEMO_DIR)")
    p.add_argument("--train_steps", type=int, default=DemoSettings.train_steps)
    p.add_argument("--vae_steps", type=int, default=DemoSettings.vae_steps)
    p.add_argument("--per_combination", type=int, default=DemoSettings.per_combination,
                   help="drawn images per (colour, shape, background) combination")
    p.add_argument("--photo_crops", type=int, default=DemoSettings.photo_crops,
                   help="random crops per scikit-image photo")
    p.add_argument("--micro_batch_size", type=int, default=DemoSettings.micro_batch_size)
    p.add_argument("--image_logging_steps", type=int, default=DemoSettings.image_logging_steps)
    p.add_argument("--sample_steps", type=int, default=DemoSettings.sample_steps)
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: run.sh's NPROC_PER_NODE default)")
    a = p.parse_args(argv)
    run_demo(DemoSettings(output=Path(a.output), per_combination=a.per_combination, photo_crops=a.photo_crops,
                          vae_steps=a.vae_steps,
                          train_steps=a.train_steps, micro_batch_size=a.micro_batch_size,
                          image_logging_steps=a.image_logging_steps, sample_steps=a.sample_steps, nproc=a.nproc))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The embedded demo: `./run.sh` with no arguments.

On a machine with no GPU, no internet and no data it runs the whole sd-ds workflow on generated data in a
few minutes and leaves a model whose samples follow their prompts:

1. LAION-format parts (gzip, ``caption \\t _ \\t base64``) from photos scikit-image ships and from drawn
   captioned shapes ("a red circle on a blue background"), listed in a ``train.filelist.list`` like the
   seed's data;
2. the converter (``python -m sd_ds.convert``, also ``tools/convert_laion_to_wds.py``) turns them into webdataset
   shards; held-out shards (other drawings and crops) are written beside them for the validation loss;
3. ``python -m sd_ds.init --preset tiny`` makes the model; since no pretrained VAE can be downloaded, the tiny
   VAE is trained briefly (as a near-deterministic autoencoder, on the demo images and random-colour shapes),
   and its ``scaling_factor`` set so the latents have unit variance (what SD's 0.18215 does for its VAE; left
   at 0.18215 the tiny UNet barely learns from text);
4. ``python -m sd_ds.encode_latents`` encodes the training and held-out shards once with that VAE (latent
   shards: the training step then runs no VAE encoder and its loader decodes no image);
5. ``./run.sh`` (from an installed package, the deepspeed launcher: ``trainer_launcher``) trains the UNet
   (v-prediction) on the latent shards with DeepSpeed ZeRO-2 on every local device, with EMA, the validation
   loss on the held-out shards every few hundred steps, and a sample grid in TensorBoard at the end;
6. ``python -m sd_ds.export`` and a sample grid for prompt combinations held out of training;
7. the prompt-following score (``python -m sd_ds.demo --score`` alone): are the prompt's shape colour,
   background colour and shape in the images, for held-out and trained combinations, printed beside the
   validation loss over training; then where everything is.

Every stage is skipped when its output already exists, so a re-run reuses what is built. The CLIs of stages
4 and 6 run inside the demo's own process (the command is printed): it has torch loaded already, and a fresh
interpreter importing torch, diffusers and DeepSpeed costs seconds a stage on two cores.
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
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from sd_ds.convert.parts import write_part
from sd_ds.data import ImageTransform
from sd_ds.fileio import write_json_atomic
from sd_ds.pipeline import generate, load_pipeline
from sd_ds.shapes import (HELD_OUT, Combination, caption_of, draw_shape, image_bytes, random_color_shapes,
                          score_images, trained_combinations_scored, training_combinations)

REPO = Path(__file__).resolve().parent.parent
# In a checkout the demo trains through ./run.sh and writes beside it; an installed package (no run.sh beside
# it) launches the ranks with the deepspeed launcher itself and writes under the current directory.
CHECKOUT: Optional[Path] = REPO if (REPO / "run.sh").is_file() else None

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


def demo_samples(per_combination: int, photo_crops: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """(caption, image bytes): drawn shapes as PNG, photo crops as JPEG."""
    rng = random.Random(seed)
    for _ in range(per_combination):
        for combo in training_combinations():
            yield caption_of(*combo), image_bytes(draw_shape(*combo, rng=rng), "PNG")
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
            yield caption, image_bytes(photo.crop((x, y, x + side, y + side)).resize((64, 64), Image.LANCZOS), "JPEG")


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


def write_validation_shards(out_dir: Path, *, per_combination: int, photo_crops: int, seed: int = 99) -> Path:
    """Held-out shards for the validation loss: fresh drawings of the trained combinations and other crops of the
    photos (another seed than the training data), written straight in the shard layout (OUT/NNNNN.tar +
    sizes.json). The validation loss measures how well the UNet denoises images it has not seen."""
    import webdataset as wds

    samples = list(demo_samples(per_combination, photo_crops, seed=seed))
    random.Random(seed).shuffle(samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out_dir / "00000.tar.tmp")) as sink:
        for i, (caption, data) in enumerate(samples):
            ext = "png" if data[:4] == b"\x89PNG" else "jpg"
            sink.write({"__key__": f"{i:09d}", ext: data, "txt": caption})
    os.replace(out_dir / "00000.tar.tmp", out_dir / "00000.tar")
    (out_dir / "sizes.json").write_text(json.dumps({"00000.tar": len(samples)}))
    return out_dir


def validation_curve(train_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's validation losses from its TensorBoard events: {"loss": [(step, value)], "loss_ema": [...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(train_dir / "runs"))
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    return {name: [(e.step, e.value) for e in acc.Scalars(f"validation/{name}")]
            for name in ("loss", "loss_ema") if f"validation/{name}" in tags}


def format_validation(curve: dict[str, list[tuple[int, float]]], samples: int) -> str:
    if not curve.get("loss"):
        return "  validation loss:         (not logged)"
    points = " -> ".join(f"{v:.4f} (step {s})" for s, v in curve["loss"])
    ema = f"; EMA weights {curve['loss_ema'][-1][1]:.4f}" if curve.get("loss_ema") else ""
    return f"  validation loss ({samples} held-out samples x 8 timesteps): {points}{ema}"


# --- the tiny VAE ------------------------------------------------------------------------------

def train_vae(model_dir: Path, images: list[Image.Image], *, steps: int, resolution: int, batch_size: int = 32,
              lr: float = 2e-3, warmup_steps: int = 50, seed: int = 0) -> float:
    """Train the tiny VAE as a near-deterministic autoencoder, then set scaling_factor = 1/std(latents).

    The posterior's log-variance is pinned at -10 (std e^-5 ≈ 0.007, about 1/150 of the latents' spread) and
    only the mean is trained, on reconstruction alone. Sampling a freshly initialised posterior (std 1) and
    leaving a tiny KL term to shrink it, as before, kept the colour in the latents noisy for the whole of 500
    steps: decoded yellow came back orange, orange red, white yellow (BENCHMARKS.md, demo prompt following).
    A pretrained SD VAE has a small posterior std for the same reason. The learning rate warms up linearly
    over ``warmup_steps``, then follows a cosine: without the warm-up, some seeds end with a colour cast
    (yellow decoded orange), most often on colour pairs the training images do not have.
    """
    import torch
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    channels = vae.config.latent_channels
    with torch.no_grad():  # quant_conv: [mean; logvar]; the logvar half gets no gradient below, so it stays
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:].fill_(-10.0)
    x_all = vae_pixels(images, resolution)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(steps), desc="demo: train tiny VAE", unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps)) * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
        x = x_all[idx]
        if step % 2:
            x = x.flip(-1)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = torch.nn.functional.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(mse=f"{loss.item():.4f}", refresh=False)
    return save_trained_vae(vae, x_all, model_dir / "vae")


def vae_pixels(images: list[Image.Image], resolution: int) -> "torch.Tensor":
    """Images resized to ``resolution`` as a float [N, 3, H, W] batch in [-1, 1]."""
    import torch

    return torch.stack([
        torch.from_numpy(np.array(im.convert("RGB").resize((resolution, resolution), Image.LANCZOS))).permute(2, 0, 1)
        for im in images]).float() / 127.5 - 1


def save_trained_vae(vae: Any, x_all: "torch.Tensor", vae_dir: Path) -> float:
    """Set scaling_factor = 1/std of the latents of ``x_all`` (posterior modes), save the VAE, and return the
    reconstruction MSE of ``x_all``."""
    import torch

    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x_all[i:i + 64]).latent_dist.mode() for i in range(0, len(x_all), 64)])
        mse = torch.nn.functional.mse_loss(
            torch.cat([vae.decode(latents[i:i + 64]).sample for i in range(0, len(x_all), 64)]), x_all).item()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(vae_dir, safe_serialization=True)
    return mse


def vae_training_images() -> list[Image.Image]:
    """The tiny VAE's images: a few of each trained combination and photo crops (a different draw from the
    UNet's data), and random-colour shapes."""
    return [Image.open(io.BytesIO(b)) for _, b in demo_samples(2, 8, seed=7)] + random_color_shapes(300, seed=11)


def vae_color_fidelity(vae_dir: Path, per_combination: int = 16, resolution: int = 32) -> dict:
    """The prompt-following score of decode(encode(x)) for fresh drawings x of the scored combinations, as the
    trainer crops them: what the VAE alone loses, an upper bound for the whole model."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    transform, rng = ImageTransform(resolution, center_crop=True), random.Random(123)
    result = {}
    for name, combos in (("held_out", list(HELD_OUT)), ("trained", trained_combinations_scored())):
        combos = [c for c in combos for _ in range(per_combination)]
        x = torch.stack([transform(draw_shape(*c, rng=rng), rng) for c in combos]).float() / 127.5 - 1
        with torch.no_grad():
            recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        result[name] = score_images([Image.fromarray(a) for a in pixels], combos)
    return result


# --- prompt following: are the prompt's colours and shape in the image? ---------------------------

# Seeds the grid never uses (it uses 0 .. prompts x images - 1): the score is not measured on what is shown.
SCORE_SEED_BASE = 1000


def generate_for_scoring(pipe: Any, combos: list[Combination], seeds: int, *, steps: int, guidance_scale: float,
                         batch_size: int = 64) -> list[Image.Image]:
    """``seeds`` images per combination, seed SCORE_SEED_BASE + k for the k-th image of a combination, in
    batches (one generator per image, so an image does not depend on its batch)."""
    jobs = [(caption_of(*c), SCORE_SEED_BASE + k) for c in combos for k in range(seeds)]
    return generate(pipe, [p for p, _ in jobs], seeds=[s for _, s in jobs], steps=steps,
                    guidance_scale=guidance_scale, batch_size=batch_size)


def score_model(model: Any, *, seeds: int, steps: int, guidance_scale: float,
                trained_seeds: Optional[int] = None) -> dict:
    """Prompt-following score of an exported model (a diffusers folder, or a loaded pipeline): the held-out
    combinations x ``seeds`` and trained_combinations_scored() x ``trained_seeds`` (default seeds / 2)."""
    pipe = model
    if isinstance(model, (str, Path)):
        pipe = load_pipeline(model, device="cpu", dtype=None)
    trained_seeds = trained_seeds if trained_seeds is not None else max(1, seeds // 2)
    result: dict = {"steps": steps, "guidance_scale": guidance_scale, "seed_base": SCORE_SEED_BASE}
    for name, combos, n in (("held_out", list(HELD_OUT), seeds),
                            ("trained", trained_combinations_scored(), trained_seeds)):
        images = generate_for_scoring(pipe, combos, n, steps=steps, guidance_scale=guidance_scale)
        result[name] = {**score_images(images, [c for c in combos for _ in range(n)]),
                        "combinations": [caption_of(*c) for c in combos], "seeds_per_combination": n}
    return result


def format_score(score: dict) -> str:
    return "\n".join(f"  {name.replace('_', '-') + ' combinations:':24s} shape colour right in "
                     f"{score[name]['shape_color_pct']:3.0f} %, background colour in "
                     f"{score[name]['background_color_pct']:3.0f} %, both in {score[name]['both_colors_pct']:3.0f} %, "
                     f"shape in {score[name]['shape_pct']:3.0f} % of {score[name]['images']} images"
                     for name in ("held_out", "trained"))


def write_score(model_dir: Path, path: Path, *, seeds: int, steps: int, guidance_scale: float) -> Path:
    """Score the exported model, write the JSON, print the figures."""
    score = score_model(model_dir, seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    write_json_atomic(path, {"model": str(model_dir), **score})
    print(f"prompt following ({steps} DDIM steps, guidance {guidance_scale:g}; chance: 1/8 shape colour, "
          f"1/6 background, 1/3 shape):\n{format_score(score)}", flush=True)
    return path


# --- orchestration -------------------------------------------------------------------------------

def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DemoSettings:
    """The demo's knobs (each is a --flag of ``python -m sd_ds.demo``); the defaults fit 10 minutes on 2 cores."""

    output: Path = _f(Path(os.environ.get("SD_DS_DEMO_DIR", str((CHECKOUT or Path()) / "demo_output"))),
                      "where everything is written (env SD_DS_DEMO_DIR)")
    per_combination: int = _f(36, "drawn images per (colour, shape, background) combination (36: 4,320 drawings; "
                                   "with 12 the held-out shapes were lost at 800 steps, BENCHMARKS.md 15)")
    photo_crops: int = _f(12, "random crops per scikit-image photo")
    vae_steps: int = _f(500, "tiny-VAE training steps")
    train_steps: int = _f(800, "UNet optimizer steps")
    learning_rate: float = _f(2e-3, "UNet peak learning rate (cosine schedule, 80 warm-up steps)")
    micro_batch_size: int = _f(64, "per rank (2 CPU ranks: global batch 128; a micro batch of 64 uses a CPU core "
                                   "better than 32: 369 instead of 265 images/s; BENCHMARKS.md 14-15)")
    ema_decay: float = _f(0.995, "EMA decay (with warm-up); the EMA weights are exported and scored")
    image_logging_steps: int = _f(0, "sample grids in TensorBoard every N steps (0: once, at the end)")
    sample_steps: int = _f(20, "DDIM steps for the grid and the score")
    guidance_scale: float = _f(5.0, "classifier-free guidance for the grid and the score")
    score_seeds: int = _f(16, "images per held-out combination in the score (half as many per trained one)")
    validation_samples: int = _f(128, "held-out samples (separate shards) in the validation loss")
    validation_steps: int = _f(200, "validation loss every N steps (and at step 0)")
    nproc: Optional[int] = _f(None, "ranks (default: run.sh's NPROC_PER_NODE default)")


def status(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    status("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, cwd=CHECKOUT, **kw)


def trainer_launcher(nproc: Optional[int], env: dict[str, str]) -> list[str]:
    """The command that starts the trainer's ranks on this machine, and the variables it needs set in ``env``.

    In a checkout: ./run.sh (NPROC_PER_NODE; it sets up the CPU ranks itself). From an installed package: the
    deepspeed launcher, set up as run.sh sets up one node: N ranks (all GPUs, or 2 CPU ranks), DeepSpeed's CPU
    accelerator without a GPU, the cores shared between the ranks.
    """
    if nproc:
        env["NPROC_PER_NODE"] = str(nproc)
    env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 500))
    if CHECKOUT is not None:
        return ["./run.sh"]
    import torch

    gpus = torch.cuda.device_count()
    ranks = nproc or gpus or 2
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_addr", "127.0.0.1",
            "--master_port", env["MASTER_PORT"], "--module", "sd_ds.train"]


def run_here(module: str, argv: list[Any]) -> None:
    """``python -m MODULE ARGV`` run in this process: the same ``main(argv)`` the command line runs."""
    import importlib

    argv = [str(a) for a in argv]
    status(f"$ python -m {module} " + " ".join(argv) + "   (in this process)")
    rc = importlib.import_module(module).main(argv)
    if rc:
        raise SystemExit(f"demo: python -m {module} failed (exit {rc})")


def run_demo(s: DemoSettings) -> Path:
    t_start = time.time()

    def stage(msg: str) -> None:
        status(f"{msg}  [{time.time() - t_start:.0f} s]")

    out = s.output.resolve()
    data_dir, shards, model_dir, train_dir, export_dir, val_shards, latents, val_latents = (
        out / n for n in ("data", "shards", "model", "train", "export", "validation_shards", "latents",
                          "validation_latents"))

    list_path = data_dir / "train.filelist.list"
    if list_path.is_file():
        stage(f"1/7 demo parts: reusing {data_dir}")
    else:
        stage("1/7 building demo LAION parts (drawn shapes + scikit-image photos)")
        write_demo_parts(data_dir, per_combination=s.per_combination, photo_crops=s.photo_crops)

    if (shards / "stats.json").is_file():
        stage(f"2/7 shards: reusing {shards}")
    else:
        stage("2/7 converting parts to webdataset shards")
        run([sys.executable, "-m", "sd_ds.convert", "--file_list", list_path, "--output_dir", shards,
             "--samples_per_shard", "64"])  # enough shards for every rank x worker
    if not (val_shards / "sizes.json").is_file():
        write_validation_shards(val_shards, per_combination=max(1, s.validation_samples // 120),
                                photo_crops=max(1, s.validation_samples // 60))

    if (model_dir / "vae" / ".demo_trained").is_file():
        stage(f"3/7 tiny model: reusing {model_dir}")
    else:
        stage("3/7 creating the tiny model, then training its VAE on the demo images")
        run_here("sd_ds.init", ["--output_dir", model_dir, "--preset", "tiny", "--seed", "0"])
        mse = train_vae(model_dir, vae_training_images(), steps=s.vae_steps, resolution=32, batch_size=16, lr=1.5e-3)
        fidelity = vae_color_fidelity(model_dir / "vae")
        (model_dir / "vae" / ".demo_trained").write_text(json.dumps({"reconstruction_mse": mse, **fidelity}))
        status(f"   VAE reconstruction MSE {mse:.4f} (images in [-1, 1]); colours kept by decode(encode(x)): "
               f"held-out combinations {fidelity['held_out']['both_colors_pct']:.0f} %, "
               f"trained {fidelity['trained']['both_colors_pct']:.0f} %")

    if (latents / "latents.json").is_file() and (val_latents / "latents.json").is_file():
        stage(f"4/7 latent shards: reusing {latents}")
    else:
        stage("4/7 encoding the training and held-out shards with the VAE: latent shards")
        for source, target in ((shards, latents), (val_shards, val_latents)):
            # No loader workers: forking this process, whose torch has run threads, is not safe.
            run_here("sd_ds.encode_latents", [
                "--train_shards", source, "--output_dir", target, "--pretrained_model_name_or_path", model_dir,
                "--resolution", "32", "--min_size", "32", "--dataloader_num_workers", "0", "--disable_tqdm"])

    final = train_dir / f"checkpoint-{s.train_steps}"
    if (final / "trainer_state.json").is_file():
        stage(f"5/7 training: reusing {final}")
    else:
        stage(f"5/7 training the UNet with DeepSpeed ZeRO-2 ({s.train_steps} steps, EMA, validation loss)")
        env = dict(os.environ)
        run([*trainer_launcher(s.nproc, env), "--output_dir", train_dir, "--train_shards", latents,
             "--pretrained_model_name_or_path", model_dir, "--resolution", "32", "--center_crop", "True",
             "--per_device_train_batch_size", s.micro_batch_size, "--learning_rate", s.learning_rate,
             # Demo captions are at most 14 tokens: a 16-token context halves the tiny UNet's cross-attention cost.
             "--model_max_length", "16",
             # v-prediction: at the noisiest steps, where the colours are decided, epsilon-prediction's image
             # estimate amplifies the UNet's error ~14x; with it the background colour followed the prompt in
             # 31 % of trained-combination images, with v-prediction in 92 % (BENCHMARKS.md).
             "--prediction_type", "v_prediction",
             "--lr_scheduler_type", "cosine", "--warmup_steps", str(min(100, s.train_steps // 10)),
             "--max_steps", s.train_steps, "--logging_steps", math.gcd(25, s.train_steps),
             "--image_logging_steps", s.image_logging_steps or s.train_steps,
             "--num_inference_steps", s.sample_steps, "--save_steps", s.train_steps, "--save_total_limit", "2",
             "--use_ema", "--ema_decay", s.ema_decay, "--ema_warmup", "True",
             # Latents need no decoding: loader workers would only take CPU from the 2 ranks (5 % slower).
             "--dataloader_num_workers", "0",
             "--shuffle_block", "500", "--seed", "0", "--max_grad_norm", "1.0",
             "--validation_shards", val_latents, "--validation_samples", s.validation_samples,
             "--validation_steps", s.validation_steps, "--validation_batch_size", "64",
             "--validation_prompts", *[caption_of(*c) for c in HELD_OUT[:4]]], env=env)

    if (export_dir / "model_index.json").is_file():
        stage(f"6/7 export: reusing {export_dir}")
    else:
        stage("6/7 exporting the EMA weights to a diffusers folder")
        run_here("sd_ds.export", [final, export_dir, "--ema"])
    grid = out / "heldout_prompts.png"
    prompts = [caption_of(*c) for c in HELD_OUT]
    run_here("sd_ds.sample", ["--model", export_dir, *sum([["--prompt", p] for p in prompts], []),
                              "--num_images", "4", "--batch_size", "24", "--steps", s.sample_steps, "--guidance_scale", s.guidance_scale,
                              "--seed", "0", "--output", grid])

    stage(f"7/7 scoring prompt following: {len(HELD_OUT)} held-out and {len(trained_combinations_scored())} trained "
           f"combinations, seeds from {SCORE_SEED_BASE} (the grid's are 0-{4 * len(HELD_OUT) - 1})")
    score_path = write_score(export_dir, out / "prompt_following.json", seeds=s.score_seeds, steps=s.sample_steps,
                             guidance_scale=s.guidance_scale)
    # Beside the score: how well the UNet denoises held-out images, over training (falls as it learns).
    print(format_validation(validation_curve(train_dir), s.validation_samples), flush=True)
    status(f"done in {time.time() - t_start:.0f} s")
    print(f"""
  model (diffusers):   {export_dir}
  held-out prompts:    {grid}   (rows: {'; '.join(prompts)})
  prompt following:    {score_path}
  training samples:    {train_dir / 'samples'}
  latent shards:       {latents}   (python -m sd_ds.encode_latents; image shards: {shards})
  validation shards:   {val_shards}   (as latents: {val_latents}; validation/loss in TensorBoard)
  TensorBoard logs:    {train_dir / 'runs'}
  open TensorBoard:    {Path(sys.executable).parent / 'tensorboard'} --logdir {train_dir / 'runs'}
  sample again:        {sys.executable} -m sd_ds.sample --model {export_dir} --prompt "a red circle on a blue background"
""", flush=True)
    return grid


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_ds.demo", description=__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(DemoSettings)
    for f in fields(DemoSettings):
        kind = hints[f.name]
        kind = int if kind == Optional[int] else kind
        p.add_argument(f"--{f.name}", type=kind, default=f.default, help=f"{f.metadata['help']} (default: %(default)s)")
    p.add_argument("--score", action="store_true",
                   help="only score the model already exported under --output (prompt_following.json), then exit")
    a = vars(p.parse_args(argv))
    score_only = a.pop("score")
    s = DemoSettings(**a)
    if score_only:
        out = s.output.resolve()
        if not (out / "export" / "model_index.json").is_file():
            p.error(f"no exported model in {out / 'export'}: run the demo first")
        write_score(out / "export", out / "prompt_following.json", seeds=s.score_seeds, steps=s.sample_steps,
                    guidance_scale=s.guidance_scale)
        return 0
    run_demo(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

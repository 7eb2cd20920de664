#!/usr/bin/env python
"""Training data pipeline throughput: images/s per worker from ~512 px JPEG shards to 256 px crops + tokens.

    python bench/bench_data.py                      # 320 JPEGs, workers 0/1/2, stage breakdown, draft check
    python bench/bench_data.py --workers 0 4 8 --images 2000 --shard_dir /tmp/bench_shards
    python bench/bench_data.py --latents            # latent vs JPEG shards → BENCHMARKS.md section 8

Writes converter-layout shards (photo crops from scikit-image, shorter side 512, JPEG q90) unless they exist,
then times ``build_train_loader`` as the trainer uses it (random crop + flip, caption dropout, CLIP
tokenisation) after a warm-up, and times each stage on one core. Prints a Markdown report for BENCHMARKS.md.

``--latents`` compares, at 256 and 512 px, the loader on JPEG shards with the loader on the latent shards
``python -m sd_ds.encode_latents`` makes from them (samples per CPU-second of one worker, bytes per sample),
and times the SD v1 VAE encoder (random weights, SD v1's config: the same FLOPs) on this machine's CPU.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from benchmarks_md import publish  # noqa: E402
from PIL import Image, features  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field")
CAPTIONS = ("a photo of an astronaut in a space suit", "a cup of coffee on a saucer", "a tabby cat looking left",
            "a rocket on the launch pad at dawn", "a stained tissue sample under a microscope",
            "a human retina, fundus photograph", "deep field image of many distant galaxies")


def photo_jpegs(n: int, shorter: int, seed: int = 0) -> list[tuple[str, bytes]]:
    from skimage import data as skdata

    photos = [Image.fromarray(getattr(skdata, name)()[..., :3]) for name in PHOTOS]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randrange(len(photos))
        photo = photos[k]
        side = int(min(photo.size) * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
        longer = int(shorter * rng.uniform(1.0, 1.33))
        size = (longer, shorter) if i % 2 else (shorter, longer)
        img = photo.crop((x, y, x + side, y + side)).resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append((CAPTIONS[k], buf.getvalue()))
    return out


def write_shards(shard_dir: Path, n: int, shorter: int, per_shard: int = 40) -> None:
    import webdataset as wds

    if (shard_dir / "sizes.json").is_file():
        return
    shard_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    jpegs = photo_jpegs(n, shorter)
    for shard in range(0, n, per_shard):
        name = f"{shard // per_shard:05d}.tar"
        with wds.TarWriter(str(shard_dir / name)) as sink:
            for i, (caption, jpeg) in enumerate(jpegs[shard:shard + per_shard]):
                key = f"{(shard // per_shard) * 10_000 + i:09d}"
                sink.write({"__key__": key, "jpg": jpeg, "txt": caption, "json": json.dumps({"key": key})})
        sizes[name] = len(jpegs[shard:shard + per_shard])
    (shard_dir / "sizes.json").write_text(json.dumps(sizes))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def loader_throughput(shard_dir: Path, tokenizer, *, num_workers: int, batches: int, micro_batch_size: int,
                      resolution: int, random_flip: bool = True, center_crop: bool = False) -> tuple[float, float, float]:
    """(images/s taken by a consumer that does nothing else, images per CPU-second of the process(es) that
    make the batches, main-process CPU ms per image), after each worker made its first batches. CPU time is
    what other jobs on a shared machine do not inflate much; wall-clock rates are what the trainer sees."""
    from sd_ds.config import DataConfig
    from sd_ds.conditioning import CaptionTokenizer
    from sd_ds.data import build_train_loader

    data_cfg = DataConfig(train_shards=[str(shard_dir)], resolution=resolution, random_flip=random_flip,
                          center_crop=center_crop, dataloader_num_workers=num_workers, shuffle_block=200,
                          samples_per_epoch=10**7)  # no epoch end (worker restart) inside
    data = build_train_loader(data_cfg, tokenize=CaptionTokenizer((tokenizer,), 77), micro_batch_size=micro_batch_size,
                              seed=0)
    it = iter(data)
    for _ in range(2 * max(1, num_workers)):  # fork, fill the shuffle buffer
        next(it)
    pids = [w.pid for w in getattr(data._workers, "_workers", [])]  # torch's worker processes (private)
    assert len(pids) == num_workers
    workers_cpu0, main_cpu0, t0 = sum(map(cpu_seconds, pids)), time.process_time(), time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    elapsed = time.perf_counter() - t0
    main_cpu, workers_cpu = time.process_time() - main_cpu0, sum(map(cpu_seconds, pids)) - workers_cpu0
    assert len(batch["keys"]) == micro_batch_size and ("pixel_values" in batch or "latent_moments" in batch)
    it.close()
    images = batches * micro_batch_size
    return images / elapsed, images / (workers_cpu if num_workers else main_cpu), main_cpu / images * 1000


def per_image_ms(fn, items, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - t0) / len(items) * 1000)
    return min(times)


def stage_breakdown(shard_dir: Path, tokenizer, resolution: int) -> list[tuple[str, float]]:
    import webdataset as wds

    from sd_ds.data import ImageTransform
    from sd_ds.models import tokenize

    samples = list(wds.DataPipeline(wds.SimpleShardList(sorted(map(str, shard_dir.glob("*.tar")))),
                                    wds.tarfile_to_samples()))[:120]
    transform = ImageTransform(resolution, random_flip=True)
    rng = random.Random(0)
    decoded = [transform.decode(s)[0] for s in samples]
    target = transform.resize_to

    def resize_then_crop(img: Image.Image) -> None:
        w, h = img.size
        size = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
        full = img.resize(size, Image.Resampling.LANCZOS)
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
        np.asarray(full.crop((left, top, left + resolution, top + resolution)))

    shards = sorted(map(str, shard_dir.glob("*.tar")))
    t0 = time.perf_counter()
    raw = sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))
    tar_ms = (time.perf_counter() - t0) / raw * 1000
    captions = [s["txt"].decode() for s in samples]
    return [
        ("tar read + group (webdataset)", tar_ms),
        ("JPEG decode (full size, Pillow/libjpeg-turbo)", per_image_ms(transform.decode, samples)),
        ("LANCZOS resize of the crop window + crop + flip + to tensor (ours)",
         per_image_ms(lambda img: transform(img, rng), decoded)),
        ("  for comparison: LANCZOS resize of the whole image, then crop", per_image_ms(resize_then_crop, decoded)),
        ("CLIP tokenisation (clean + BPE, batch of 16, per caption)",
         per_image_ms(lambda i: tokenize(tokenizer, captions[i:i + 16], 77), range(0, len(captions), 16)) / 16),
    ]


def draft_check(resolution: int, shorter: int) -> tuple[float, float]:
    """ms per image, decode + transform, for large JPEGs with and without JPEG draft (DCT-domain downscale)."""
    from sd_ds.data import ImageTransform

    samples = [{"jpg": jpeg, "txt": caption} for caption, jpeg in photo_jpegs(40, shorter, seed=1)]
    rng = random.Random(0)
    result = []
    for draft in (False, True):
        t = ImageTransform(resolution, random_flip=True, jpeg_draft=draft)
        result.append(per_image_ms(lambda s: t(t.decode(s)[0], rng), samples))
    return result[0], result[1]


# --- latent shards vs JPEG shards (--latents) --------------------------------------------------------

SECTION = "## 8. Latent shards vs JPEG shards"
# SD v1's VAE (CompVis/stable-diffusion-v1-4 vae/config.json): the encode rate is measured on it.
SD_V1_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
# SD's latent geometry (8x downsampling, 4 latent channels: the same bytes per sample) for about 1/1000 of the
# FLOPs, to make the latent shards the loader reads; the loader's speed does not depend on the weights.
SD_GEOMETRY_VAE = dict(SD_V1_VAE, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=8)


def save_vae(config: dict, out: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL

    if not (out / "config.json").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            AutoencoderKL(**config).save_pretrained(out)
    return out


def encode_shards(jpeg_dir: Path, out: Path, vae_dir: Path, resolution: int, flip: bool) -> Path:
    """Latent shards made by the real CLI (in this process), unless they exist."""
    from sd_ds.encode_latents import main as encode_main

    if not (out / "latents.json").is_file():
        assert encode_main(["--train_shards", str(jpeg_dir), "--output_dir", str(out), "--vae_name_or_path",
                            str(vae_dir), "--resolution", str(resolution), "--batch_size", "16",
                            "--dataloader_num_workers", "1", "--disable_tqdm"] + (["--flip_variants"] if flip else [])) == 0
    return out


def bytes_per_sample(shard_dir: Path) -> float:
    """Shard bytes (tar headers, captions and metadata included) per sample."""
    sizes = json.loads((shard_dir / "sizes.json").read_text())
    return sum((shard_dir / name).stat().st_size for name in sizes) / sum(sizes.values())


def vae_encode_rate(resolution: int, batch_size: int, batches: int) -> float:
    """images/s of sd_ds.latents.encode_moments with the SD v1 VAE (fp32, random weights) on the CPU."""
    import torch
    from diffusers import AutoencoderKL

    from sd_ds.latents import encode_moments

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**SD_V1_VAE).eval()
    pixels = torch.randint(0, 256, (batch_size, 3, resolution, resolution), dtype=torch.uint8)
    encode_moments(vae, pixels[:1])  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
        encode_moments(vae, pixels)
    return batch_size * batches / (time.perf_counter() - t0)


def latents_vs_jpeg(args: argparse.Namespace, tokenizer, root: Path) -> str:
    vae_dir = save_vae(SD_GEOMETRY_VAE, root / "sd_geometry_vae")
    load_before = os.getloadavg()[0]
    rows = []
    for resolution in (256, 512):
        jpeg = root / f"jpeg_{resolution}"
        write_shards(jpeg, args.images, 2 * resolution)
        plain = encode_shards(jpeg, root / f"latents_{resolution}", vae_dir, resolution, flip=False)
        flipped = encode_shards(jpeg, root / f"latents_flip_{resolution}", vae_dir, resolution, flip=True)
        settings = [("JPEG, random crop + flip", jpeg, dict(random_flip=True), args.batches),
                    ("latents", plain, dict(random_flip=False, center_crop=True), args.latent_batches),
                    ("latents with --flip_variants, --random_flip", flipped, dict(random_flip=True, center_crop=True),
                     args.latent_batches)]
        runs: dict[str, list] = {name: [] for name, *_ in settings}
        for _ in range(args.repeats):  # interleaved, so that a busy moment of the machine hits every setting
            for name, shard_dir, kw, batches in settings:
                runs[name].append(loader_throughput(shard_dir, tokenizer, num_workers=1, batches=batches,
                                                    micro_batch_size=args.micro_batch_size, resolution=resolution,
                                                    **kw))
        for name, shard_dir, *_ in settings:
            wall, per_cpu, main_ms = (statistics.median(r[i] for r in runs[name]) for i in range(3))
            rows.append((resolution, name, per_cpu, wall, main_ms, bytes_per_sample(shard_dir),
                         [r[1] for r in runs[name]]))
            print(f"{resolution} px {name}: {per_cpu:.0f} per CPU-s, {wall:.0f}/s wall", file=sys.stderr)
    encode_rates = [(r, b, n, vae_encode_rate(r, b, n)) for r, b, n in ((256, 4, 2), (512, 2, 1))]
    load_after = os.getloadavg()[0]

    lines = [SECTION, "",
             f"{datetime.date.today().isoformat()} · {machine()} · load average {load_before:.1f} at the start, "
             f"{load_after:.1f} at the end · `python bench/bench_data.py {' '.join(sys.argv[1:])}`", "",
             f"What is measured: `build_train_loader` as the trainer calls it, one loader worker, micro batch "
             f"{args.micro_batch_size}, CLIP tokens and caption dropout included, on {args.images} photo crops "
             f"(JPEG q90, shorter side 2x the resolution) in shards of 40, and on the latent shards "
             f"`python -m sd_ds.encode_latents` made from them (fp16 moments, centre crops). 'Samples per "
             f"CPU-second' is samples divided by the worker process's CPU time (from /proc): what one dedicated "
             f"core delivers, which the other jobs on this shared machine inflate much less than wall-clock rates. "
             f"Median of {args.repeats} interleaved runs of {args.batches} (JPEG) / {args.latent_batches} (latent) "
             f"batches after a warm-up. The latent shards were written with a VAE of SD v1's latent geometry (8x "
             f"downsampling, 4 channels, so SD v1's bytes per sample) but few channels: the loader only reads "
             f"bytes, and encoding them with SD v1's VAE on these 2 CPU cores would take hours.", "",
             "| resolution | shards | samples per CPU-second of the worker | samples/s (wall clock) | main process "
             "CPU ms per sample | bytes per sample | per-CPU-second runs |", "|---:|---|---:|---:|---:|---:|---|"]
    for resolution, name, per_cpu, wall, main_ms, nbytes, per_cpu_runs in rows:
        lines.append(f"| {resolution} | {name} | {per_cpu:.0f} | {wall:.0f} | {main_ms:.2f} | "
                     f"{nbytes / 1024:.1f} KiB | {', '.join(f'{r:.0f}' for r in per_cpu_runs)} |")
    latent_rates = {(res, name): per_cpu for res, name, per_cpu, *_ in rows}
    speedups = ", ".join(f"{res} px {latent_rates[(res, 'latents')] / latent_rates[(res, 'JPEG, random crop + flip')]:.1f}x"
                         for res in (256, 512))
    jpeg_256, latent_256 = latent_rates[(256, "JPEG, random crop + flip")], latent_rates[(256, "latents")]
    lines += ["", f"Latent vs JPEG samples per CPU-second: {speedups} (goal: >= 500 latent samples/s per core: "
              f"{'met' if min(latent_rates[(r, 'latents')] for r in (256, 512)) >= 500 else 'not met'}). "
              f"Reading: a 256 px sample costs a loader worker {1000 / jpeg_256:.2f} ms of CPU from a JPEG and "
              f"{1000 / latent_256:.2f} ms from latent shards (tar read, tokenising and batching are what is left). "
              f"Feeding one H100 at 700 images/s (issue 9's upper figure at 256 px) takes "
              f"{700 / jpeg_256:.1f} dedicated cores from JPEGs and {700 / latent_256:.2f} from latents; at 512 px the "
              f"JPEG path is slower still (larger decodes and resizes) while a latent sample only grows by its "
              f"bytes. The price is disk: a latent sample is fp16 moments (mean + log-variance) plus ~3 KiB of tar "
              f"headers, caption and metadata, twice the moments with --flip_variants. Rows from one run only "
              f"compare with each other: the machine and its load differ between sections.", "",
              "SD v1 VAE encoder (`encode_moments`, fp32, random weights with SD v1's config: the same FLOPs) on "
              "this machine's CPU (torch's default threads, shared cores):", "",
              "| resolution | batch | images/s |", "|---:|---:|---:|"]
    lines += [f"| {r} | {b} | {rate:.2f} |" for r, b, n, rate in encode_rates]
    lines += ["", "No GPU was lent to this task: the encoder's GPU rate (one image is 273 GFLOP at 256 px, 1117 at "
              "512 px) is not measured here."]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    import PIL
    import torch

    return (f"{cpu}, {os.cpu_count()} cores visible (shared with other jobs), {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, Pillow "
            f"{PIL.__version__} (libjpeg-turbo: {features.check_feature('libjpeg_turbo')})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shard_dir", type=Path, default=None, help="reuse/write shards here (default: a temp dir)")
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--shorter_side", type=int, default=512)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=16)
    p.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    p.add_argument("--latents", action="store_true",
                   help=f"latent vs JPEG shards at 256 and 512 px, and the VAE encode rate: {SECTION!r}")
    p.add_argument("--latent_batches", type=int, default=400, help="timed batches per latent setting")
    p.add_argument("--no_write", action="store_true", help="--latents: print the section, leave BENCHMARKS.md")
    args = p.parse_args()

    from transformers import CLIPTokenizer

    from sd_ds.models import CLIP_TOKENIZER_DIR

    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    if args.latents:
        with tempfile.TemporaryDirectory() as tmp:
            section = latents_vs_jpeg(args, tokenizer, args.shard_dir or Path(tmp))
        publish(section, write=not args.no_write)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir = args.shard_dir or Path(tmp) / "shards"
        write_shards(shard_dir, args.images, args.shorter_side)
        rows = []
        for nw in args.workers:
            runs = [loader_throughput(shard_dir, tokenizer, num_workers=nw, batches=args.batches,
                                      micro_batch_size=args.micro_batch_size, resolution=args.resolution)
                    for _ in range(args.repeats)]
            wall, per_cpu, main_ms = (statistics.median(r[i] for r in runs) for i in range(3))
            rows.append((nw, wall, per_cpu, main_ms, [r[0] for r in runs]))
            print(f"num_workers={nw}: {wall:.0f} img/s, {per_cpu:.0f} img per CPU-s, runs={runs}", file=sys.stderr)
        stages = stage_breakdown(shard_dir, tokenizer, args.resolution)
        no_draft, draft = draft_check(args.resolution, 1024)

    print(f"Date: {datetime.date.today().isoformat()}  \nMachine: {machine()}  \n"
          f"Command: `python bench/bench_data.py {' '.join(sys.argv[1:])}`".rstrip() + "\n")
    print(f"{args.images} JPEGs (q90, shorter side {args.shorter_side}, longer up to 1.33x) in shards of 40 → "
          f"{args.resolution} px random crops + flip + caption dropout + CLIP tokens, micro batch "
          f"{args.micro_batch_size}; median of {args.repeats} runs of {args.batches} batches after warm-up.\n")
    print("| num_workers | images/s (wall clock, total) | images/s per worker (wall) | images per CPU-second of "
          "a worker | main process CPU ms per image | wall-clock runs |\n|---|---:|---:|---:|---:|---|")
    for nw, wall, per_cpu, main_ms, walls in rows:
        print(f"| {nw} (in the main process)" if nw == 0 else f"| {nw}", end="")
        print(f" | {wall:.0f} | {wall / max(1, nw):.0f} | {per_cpu:.0f} | {main_ms:.2f} | "
              f"{', '.join(f'{r:.0f}' for r in walls)} |")
    print("\nPer image on one core (best of 3):\n\n| stage | ms |\n|---|---|")
    for name, ms in stages:
        print(f"| {name} | {ms:.2f} |")
    print(f"\nJPEG draft on 1024 px photos (decode + transform, ms per image): without {no_draft:.2f}, "
          f"with {draft:.2f} ({no_draft / draft:.1f}x).")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Converter throughput against the decompression floor (`gzip -dc PART > /dev/null`), and its scaling
with --processes. Results go to BENCHMARKS.md, section 1.

    python bench/bench_converter.py                     # 300-sample parts, 3 repeats, processes 1..cores
    python bench/bench_converter.py --samples_per_part 500 --repeats 5

Parts are generated once (cached in --data_dir): hundreds of 20-60 KB JPEGs cut from scikit-image's photos,
base64 in LAION's ``caption \\t _ \\t base64`` layout, gzip level 6 as LAION's tools wrote them.
Steady state excludes start-up: throughput = (bytes of N parts - bytes of 1 part) / (time N - time 1), for
the converter and for gzip alike, each the best of --repeats runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sd_ds.laion import write_part  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_parts(data_dir: Path, n_parts: int, samples_per_part: int, seed: int = 0) -> list[Path]:
    """Parts of 20-60 KB JPEG crops (varied size and quality), cached by their parameters."""
    from skimage import data as skdata

    data_dir.mkdir(parents=True, exist_ok=True)
    paths = [data_dir / f"part-{i:05d}-{samples_per_part}.gz" for i in range(n_parts)]
    if all(p.is_file() for p in paths):
        return paths
    photos = [Image.fromarray(getattr(skdata, n)()[..., :3].astype(np.uint8)) for n in PHOTOS]
    rng = random.Random(seed)
    for i, path in enumerate(paths):
        if path.is_file():
            continue
        rows = []
        while len(rows) < samples_per_part:
            img = photos[rng.randrange(len(photos))]
            side = rng.randint(160, min(img.size))
            x, y = rng.randint(0, img.width - side), rng.randint(0, img.height - side)
            crop = img.crop((x, y, x + side, y + side))
            scale = rng.uniform(1.0, 1.8)
            crop = crop.resize((int(side * scale), int(side * scale * rng.uniform(0.75, 1.0))), Image.BICUBIC)
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=rng.randint(75, 95))
            if 20_000 <= buf.tell() <= 60_000:
                rows.append((f"a photo, crop {len(rows)} of part {i}, {crop.width}x{crop.height}", buf.getvalue()))
        write_part(path.with_suffix(".tmp"), rows)
        os.replace(path.with_suffix(".tmp"), path)
    return paths


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gzip_dc(parts: list[Path]) -> None:
    subprocess.run(["gzip", "-dc", *map(str, parts)], stdout=subprocess.DEVNULL, check=True)


def converter(parts: list[Path], processes: int, inflate_thread: str, work: Path) -> None:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, str(REPO / "tools/convert_laion_to_wds.py"), *map(str, parts),
                    "--output_dir", str(out), "--processes", str(processes), "--inflate_thread", inflate_thread,
                    "--no_progress", "--samples_per_shard", "1000"], stdout=subprocess.DEVNULL, check=True)


def steady_rate(run, parts: list[Path], n: int, repeats: int, small: int = 1) -> tuple[float, float]:
    """(MB/s of compressed input, seconds for the n-part run) from time(n parts) - time(small parts)."""
    size = lambda ps: sum(p.stat().st_size for p in ps)  # noqa: E731
    t_small = best_time(lambda: run(parts[:small]), repeats)
    t_big = best_time(lambda: run(parts[:n]), repeats)
    return (size(parts[:n]) - size(parts[:small])) / (t_big - t_small) / 1e6, t_big


def pixel_decode_rate(part: Path) -> float:
    """MB/s (compressed input) of a full PIL pixel decode of every image of a part, inflate included."""
    import base64

    from sd_ds.laion import iter_part_lines

    t0 = time.perf_counter()
    for line in iter_part_lines(part):
        Image.open(io.BytesIO(base64.b64decode(line.split(b"\t")[2]))).load()
    return part.stat().st_size / (time.perf_counter() - t0) / 1e6


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores available, load average {os.getloadavg()[0]:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "sd_ds_bench_parts"))
    p.add_argument("--samples_per_part", type=int, default=300)
    p.add_argument("--parts", type=int, default=6, help="parts per process in the big run (default 6)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max_processes", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()

    procs = list(range(1, args.max_processes + 1))
    parts = make_parts(Path(args.data_dir), args.parts * procs[-1], args.samples_per_part)
    mean_kb = np.mean([p.stat().st_size for p in parts]) / 1e3
    print(f"# {time.strftime('%Y-%m-%d')} · {machine()} · Python {platform.python_version()}")
    print(f"# {len(parts)} parts of {args.samples_per_part} JPEGs (20-60 KB), {mean_kb / 1e3:.1f} MB each "
          f"compressed; steady state = {args.parts} parts minus 1, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gz, gz_t = steady_rate(gzip_dc, parts, args.parts, args.repeats)
        print(f"{'gzip -dc (1 process)':<48}{gz:8.1f} MB/s ({args.parts:2d} parts in {gz_t:5.2f} s)")
        base = None
        # --processes 1 with and without the inflate thread (auto turns it on when cores are idle, off for
        # --processes = cores); the scaling column is against --processes 1 without it: one core each.
        for n, thread in [(1, "no"), (1, "yes"), *[(n, "auto") for n in procs[1:]]]:
            # n processes: n x parts parts minus n parts, so start-up and the last wave cancel out
            rate, t = steady_rate(lambda ps: converter(ps, n, thread, work), parts, args.parts * n, args.repeats,
                                  small=n)
            base = base or rate
            label = f"converter --processes {n} --inflate_thread {thread}"
            print(f"{label:<48}{rate:8.1f} MB/s ({args.parts * n:2d} parts in {t:5.2f} s)"
                  f"  {rate / gz:.2f}x gzip -dc  {rate / base:.2f}x first row")
        pix = pixel_decode_rate(parts[0])
        print(f"{'full PIL pixel decode, for reference':<48}{pix:8.1f} MB/s {'':24}  {pix / gz:.2f}x gzip -dc")


if __name__ == "__main__":
    main()

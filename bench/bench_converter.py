#!/usr/bin/env python
"""Converter throughput against the decompression floor (`gzip -dc PART > /dev/null`), and its scaling
with --processes. Results go to BENCHMARKS.md, section 1.

    python bench/bench_converter.py                  # 300-sample parts, best of 5, processes 1..cores
    python bench/bench_converter.py --no-write       # print only
    python bench/bench_converter.py --engines        # section 10: local, Spark, Ray; start-up; the 60,000-part plan

Parts are generated once (cached in --data_dir): hundreds of 20-60 KB JPEGs cut from scikit-image's photos,
base64 in LAION's ``caption \\t _ \\t base64`` layout, gzip level 6 as LAION's tools wrote them.
Steady state excludes start-up: throughput = (bytes of N parts - bytes of 1 part) / (time N - time 1), for
the converter and for gzip alike, each the best of --repeats runs (the machine may be shared), plus CPU
seconds per GB, which other jobs do not inflate.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_md import publish

import numpy as np
from PIL import Image

from sd_ds.convert.parts import write_part
from sd_ds.testing import REPO_ROOT as REPO

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


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of child processes) of one run."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime


def gzip_dc(parts: list[Path], processes: int = 1) -> None:
    """``gzip -dc`` over the parts, split between ``processes`` gzip processes running side by side."""
    procs = [subprocess.Popen(["gzip", "-dc", *map(str, parts[i::processes])], stdout=subprocess.DEVNULL)
             for i in range(processes)]
    if any(p.wait() for p in procs):
        raise RuntimeError("gzip -dc failed")


def converter(parts: list[Path], processes: int, inflate_thread: str, work: Path, samples_per_shard: int,
              engine: tuple[str, ...] = ()) -> None:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, str(REPO / "tools/convert_laion_to_wds.py"), *map(str, parts),
                    "--output_dir", str(out), "--processes", str(processes), "--inflate_thread", inflate_thread,
                    "--no_progress", "--samples_per_shard", str(samples_per_shard), *engine],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def steady_states(configs: dict, parts: list[Path], repeats: int, best_out: dict | None = None) -> dict:
    """Per config (run, small, big): throughput from time(big parts) - time(small parts), as MB/s of
    compressed input, and CPU seconds per GB. The runs of all configs are interleaved, round after round,
    and the fastest of each kept, so a burst of other work on the machine does not land on one config."""
    best: dict = {}
    for _ in range(repeats):
        for name, (run, small, big) in configs.items():
            for n in (small, big):
                wall, cpu = timed(lambda: run(parts[:n]))
                if (name, n) not in best or wall < best[name, n][0]:
                    best[name, n] = (wall, cpu)
    if best_out is not None:
        best_out.update(best)
    results = {}
    for name, (run, small, big) in configs.items():
        nbytes = sum(p.stat().st_size for p in parts[small:big])
        (wall_s, cpu_s), (wall_b, cpu_b) = best[name, small], best[name, big]
        results[name] = {"mb_s": nbytes / (wall_b - wall_s) / 1e6, "cpu_s_per_gb": (cpu_b - cpu_s) / nbytes * 1e9,
                         "parts": big}
    return results


def pixel_decode_rate(part: Path) -> float:
    """MB/s (compressed input) of a full PIL pixel decode of every image of a part, inflate included."""
    import base64

    from sd_ds.convert.parts import iter_part_lines

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
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


SECTION = "## 1. Converter vs gzip -dc"




ENGINE_SECTION = "## 10. Converter engines: local, Spark, Ray; the plan for 60,000 parts"

PLAN_CODE = """
import resource, sys, time
from sd_ds.convert.planning import ConvertOptions, Frontier, collect_sources, plan_record
t0 = time.perf_counter()
collected = collect_sources(filelists=[sys.argv[1]])
plan = plan_record(collected.sources, ConvertOptions())
t1 = time.perf_counter()
frontier = Frontier(collected.sources, 10000, None)
shards = 0
for part in range(len(frontier.part_paths)):  # LAION-400M: ~6,700 samples per part
    shards += len(frontier.consume(6667))
t2 = time.perf_counter()
print(len(frontier.part_paths), shards, t1 - t0, t2 - t1, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def plan_at_scale(work: Path, n_parts: int = 60_000) -> dict:
    """The driver's work for LAION-400M's part count: list and size 60,000 parts named in a filelist, record the
    plan, and number every shard as the part counts come in (~400 M samples in 10,000-sample shards); in a
    fresh process, for its peak memory."""
    parts_dir = work / "plan_parts"
    parts_dir.mkdir()
    for i in range(n_parts):
        (parts_dir / f"part-{i:05d}.gz").write_bytes(b"")
    filelist = work / "laion400m.filelist"
    filelist.write_text("".join(f"{parts_dir}/part-{i:05d}.gz\n" for i in range(n_parts)))
    out = subprocess.run([sys.executable, "-c", PLAN_CODE, str(filelist)], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    return {"parts": int(out[0]), "shards": int(out[1]), "plan_s": float(out[2]), "frontier_s": float(out[3]),
            "max_rss_mb": float(out[4])}


def _engine_runs(engine: str, n: int, parts: list[Path], small: int, big: int, repeats: int, work: Path,
                 samples_per_shard: int) -> tuple[float, float, float]:
    """(start-up s, steady MB/s, CPU s per GB of this process and its children) of one engine with n executors,
    started once in this process: a Spark session on local[n], a local Ray with n CPUs, or n local workers
    (started by each run, so their start-up is part of each run and cancels out in the difference)."""
    from sd_ds.convert.engines import EngineSettings
    from sd_ds.convert.planning import ConvertOptions, PartSource
    from sd_ds.convert.run import convert

    t0 = time.perf_counter()
    if engine == "spark":
        from pyspark.sql import SparkSession

        session = SparkSession.builder.master(f"local[{n}]").config("spark.ui.enabled", "false").getOrCreate()
        session.sparkContext.parallelize([0], 1).count()  # the first job starts the Python workers
    elif engine == "ray":
        import ray

        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
        ray.get(ray.remote(lambda: 0).remote())
    startup = time.perf_counter() - t0
    options = ConvertOptions(samples_per_shard=samples_per_shard)
    best: dict[int, float] = {}
    try:
        for _ in range(repeats):
            for count in (small, big):
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                sources = [PartSource("inputs", 1.0, tuple(str(p) for p in parts[:count]))]
                t = time.perf_counter()
                convert(sources, out, options, progress=False, log=lambda _: None, inflate_thread=False,
                        engine=EngineSettings(engine, n))
                best[count] = min(best.get(count, 1e9), time.perf_counter() - t)
    finally:
        if engine == "spark":
            session.stop()
        elif engine == "ray":
            ray.shutdown()
    nbytes = sum(p.stat().st_size for p in parts[small:big])
    return startup, nbytes / (best[big] - best[small]) / 1e6, best[small]


def engines_main(args: argparse.Namespace) -> None:
    """Section 10: steady-state throughput by engine and executor count, each engine's start-up, the plan."""
    counts = [n for n in (1, 2) if n <= args.max_processes]
    per = args.engine_parts
    parts = make_parts(Path(args.data_dir), per * counts[-1], args.samples_per_part)
    part_mb = np.mean([p.stat().st_size for p in parts]) / 1e6
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gz = steady_states({"gzip": (gzip_dc, 1, per)}, parts, args.repeats)["gzip"]["mb_s"]
        rows = []
        for engine in ("local", "spark", "ray"):
            for n in counts:
                startup, mb_s, small_s = _engine_runs(engine, n, parts, n, per * n, args.repeats, work,
                                                      args.samples_per_part)
                rows.append((f"`--engine {engine}`, {n} executor{'s' if n > 1 else ''}", per * n, mb_s, startup,
                             small_s))
        plan = plan_at_scale(work)
    table = ["| engine, executors | parts | MB/s (compressed input) | × gzip -dc | engine start-up, s | "
             "a run of n parts (one each), s |", "|---|---:|---:|---:|---:|---:|",
             f"| `gzip -dc PARTS > /dev/null` | {per} | {gz:.1f} | 1.00 | | |"]
    for label, n_parts, mb_s, startup, small_s in rows:
        table.append(f"| {label} | {n_parts} | {mb_s:.1f} | {mb_s / gz:.2f} | {startup:.1f} | {small_s:.1f} |")
    command = "python bench/bench_converter.py " + " ".join(sys.argv[1:])
    section = f"""{ENGINE_SECTION}

{time.strftime('%Y-%m-%d')} · {machine()}, shared with other jobs (load average {load:.2f} at the start) · \
Python {platform.python_version()} · `{command.strip()}`

Throughput: the same {args.samples_per_part}-JPEG parts as section 1 ({part_mb:.1f} MB each, one shard per part),
steady state = time({per}n parts) minus time(n parts) for n executors, best of {args.repeats} runs, MB/s of
compressed input; `convert()` in the bench's process with the engine already up (Spark on `local[n]`: one JVM,
n Python workers; Ray: a local Ray with n CPUs). Engine start-up: the session or `ray.init` and a first task
(the tool pays it once per run, plus shipping sd_ds to the workers). The driver plans and numbers; every part
and every shard is one engine task (Spark: a one-task job, submitted from driver threads; Ray: a task), so
the bytes are the same for every row (tests/test_convert_engines.py).

{chr(10).join(table)}

The plan at LAION-400M scale (the driver's own work, in a fresh process): list and size {plan['parts']:,} parts
named in a filelist and record the plan (convert_options.json): {plan['plan_s']:.2f} s; number
{plan['shards']:,} shards of 10,000 samples as the part counts come in (~6,667 samples per part):
{plan['frontier_s']:.2f} s; peak memory of the process {plan['max_rss_mb']:.0f} MB. Parts at s3:// or gs://
are sized with one listing per folder (1,000 keys per request: 60 requests for 60,000 parts), at http(s)://
with one HEAD each, 16 at a time.
"""
    publish(section, write=not args.no_write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "sd_ds_bench_parts"))
    parser.add_argument("--samples_per_part", type=int, default=300)
    parser.add_argument("--parts", type=int, default=6, help="parts per process in the big run (default 6)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_processes", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--engines", action="store_true",
                        help="section 10 instead: --engine local/spark/ray by executor count, start-up, the plan")
    parser.add_argument("--engine_parts", type=int, default=6, help="parts per executor in --engines (default 6)")
    args = parser.parse_args()
    if args.engines:
        engines_main(args)
        return

    procs = list(range(1, args.max_processes + 1))
    parts = make_parts(Path(args.data_dir), args.parts * procs[-1], args.samples_per_part)
    part_mb = np.mean([p.stat().st_size for p in parts]) / 1e6
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        configs = {"`gzip -dc PARTS > /dev/null`": (gzip_dc, 1, args.parts)}
        # What the machine gives two processes right now (it may be shared): the ceiling for scaling
        for n in procs[1:]:
            configs[f"{n} × `gzip -dc` side by side"] = ((lambda n_: lambda ps: gzip_dc(ps, n_))(n), n, args.parts * n)
        # --processes 1 with and without the inflate thread (auto turns it on when cores are idle, off for
        # --processes = cores); n processes: n x parts minus n parts, so start-up and the last wave cancel out;
        # one shard per part, so the shard assembled at the end of a run is the same size for every length
        for n, thread in [(1, "no"), (1, "yes"), *[(n, "auto") for n in procs[1:]]]:
            run = (lambda n_, t_: lambda ps: converter(ps, n_, t_, work, args.samples_per_part))(n, thread)
            configs[f"converter `--processes {n} --inflate_thread {thread}`"] = (run, n, args.parts * n)
        rows = list(steady_states(configs, parts, args.repeats).items())
        pix = pixel_decode_rate(parts[0])
    gz = rows[0][1]
    base = next(r["mb_s"] for label, r in rows if "--processes 1 --inflate_thread no" in label)
    table = ["| command | parts | MB/s (compressed input) | × gzip -dc | × converter, 1 process | CPU s per GB |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        table.append(f"| {label} | {r['parts']} | {r['mb_s']:.1f} | {r['mb_s'] / gz['mb_s']:.2f} | "
                     f"{r['mb_s'] / base:.2f} | {r['cpu_s_per_gb']:.2f} |")
    table.append(f"| full PIL pixel decode of every image (reference, not what the converter does) | 1 | {pix:.1f} | "
                 f"{pix / gz['mb_s']:.2f} | | |")
    command = "python bench/bench_converter.py " + " ".join(sys.argv[1:])
    by_label = dict(rows)
    reading = (f"Reading: one converter process moves {base / gz['mb_s']:.2f}x the compressed bytes per second "
               f"that `gzip -dc` inflates (goal: at least 0.8x).")
    if len(procs) > 1:
        n = procs[-1]
        conv = by_label[f"converter `--processes {n} --inflate_thread auto`"]["mb_s"]
        ceiling = by_label[f"{n} × `gzip -dc` side by side"]["mb_s"] / gz["mb_s"]
        reading += (f" {n} processes convert {conv / base:.2f}x as fast as one, where {n} gzip processes side by "
                    f"side reached {ceiling:.2f}x at the same time. On the shared 2-core machine of 2026-11-28 "
                    f"this figure moved between runs: 1.5-2.0x when it was quiet, down to 1.0x while other "
                    f"jobs held a core. The nearly flat CPU s per GB shows that the work per byte hardly grows "
                    f"with --processes; the rest is the machine (the kernel's page-cache writeback of the "
                    f"output shares the same cores, gzip writes nothing).")
    section = f"""{SECTION}

{time.strftime('%Y-%m-%d')} · {machine()}, shared with other jobs (load average {load:.2f} at the start) · \
Python {platform.python_version()} · `{command.strip()}`

Input: {len(parts)} generated parts of {args.samples_per_part} JPEGs (20-60 KB crops of scikit-image's photos,
base64, gzip level 6), {part_mb:.1f} MB each. Steady state: time({args.parts} parts) minus time(1 part) (with n
processes: {args.parts}n parts minus n), best of {args.repeats} interleaved runs; MB/s of compressed input. CPU s per GB:
CPU time of all processes per GB of compressed input, which other jobs on the machine barely change.
The converter's figure includes everything: inflate, checks, the fragment write and the shard assembly
(--samples_per_shard {args.samples_per_part}, one shard per part). --inflate_thread auto is "yes" below the core
count and "no" at it. The "side by side" gzip rows show how much parallel speed the machine gave at the time
(other jobs share it): the ceiling for the converter's scaling.

{chr(10).join(table)}

{reading}
"""
    publish(section, write=not args.no_write)


if __name__ == "__main__":
    main()

"""OpenMP wait policy: the single-process CPU stages alone and beside one busy process, torch's default
(idle OpenMP threads spin) against sd-ds's (``OMP_WAIT_POLICY=PASSIVE``, set by ``import sd_ds``) and one thread.

    python bench/bench_omp_wait.py [--rounds 2] [--workloads conv vae sample] [--output raw.json] [--write]
    python bench/bench_omp_wait.py --results raw.json --write     # the section again from saved figures

Each measurement is a fresh child process, because the OpenMP runtime reads its settings once, when torch loads:
- ``spin``: torch's default. The child imports torch before sd_ds (so sd_ds cannot set the policy) with neither
  OMP_WAIT_POLICY nor GOMP_SPINCOUNT in its environment: libgomp's threads spin a while before they sleep;
- ``passive``: what sd-ds does. The child imports sd_ds first, which sets OMP_WAIT_POLICY=PASSIVE, then torch;
- ``1 thread``: ``torch.set_num_threads(1)``, the reference that no waiting policy matters for.
Threads: torch's default (one per core) for spin and passive; OMP_NUM_THREADS is removed from the children.

Workloads (time per iteration, median over the timed iterations, after a warm-up):
- ``conv``: a 4-layer 3x3 conv stack (64 channels, batch 4, 32x32) forward + backward;
- ``vae``: the demo's stage 3, ``sd_ds.demo.train_vae`` on the tiny preset's VAE (32 px, batch 16): per step,
  from the difference of a 3-step and a 9-step call after a 2-step warm-up call (so loading is not counted);
- ``sample``: ``sd_ds.sample``'s ``main`` on the tiny preset (4 images, 10 DDIM steps, guidance 7.5), the second
  of two calls in one process (the first loads and warms up).

Load: one other process spinning on a core (``while True: pass``), started before the loaded measurements and
stopped after them. Quiet and loaded runs alternate, round by round, so the two are measured back to back.
The system load average before each round is recorded: on a shared machine "quiet" means no load of ours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Optional

SECTION = "## 20. OpenMP wait policy: the CPU stages on a shared machine"
POLICIES = ("spin", "passive", "1 thread")
WORKLOADS = ("conv", "vae", "sample")
HERE = Path(__file__).resolve().parent


# --- child: one measurement --------------------------------------------------------------------------------

def child(workload: str, policy: str, model_dir: str) -> dict:
    given = os.environ.get("OMP_WAIT_POLICY")
    if policy == "spin":
        import torch  # noqa: F401  (first: the OpenMP runtime starts with the environment as given)
    import sd_ds  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE: too late for the runtime if torch came first)
    import torch

    if policy == "1 thread":
        torch.set_num_threads(1)
    # the policy the OpenMP runtime started with: the environment when torch was imported
    at_load = given if policy == "spin" else os.environ.get("OMP_WAIT_POLICY")
    result = {"threads": torch.get_num_threads(), "omp_wait_policy": at_load}
    if workload == "conv":
        torch.manual_seed(0)
        layers = [torch.nn.Conv2d(3 if i == 0 else 64, 64, 3, padding=1) for i in range(4)]
        net = torch.nn.Sequential(*[m for conv in layers for m in (conv, torch.nn.ReLU())])
        x = torch.randn(4, 3, 32, 32)
        times = []
        for i in range(20):
            start = time.perf_counter()
            net(x).square().mean().backward()
            times.append(time.perf_counter() - start)
        result["ms"] = 1000 * statistics.median(times[5:])
    elif workload == "vae":
        from sd_ds.demo import random_color_shapes, train_vae

        images = random_color_shapes(64, seed=1)
        timed = {}
        for steps in (2, 3, 9):  # the first call warms up (lazy imports, first-call allocations): not counted
            start = time.perf_counter()
            train_vae(Path(model_dir), images, steps=steps, resolution=32, batch_size=16, lr=1.5e-3, warmup_steps=2)
            timed[steps] = time.perf_counter() - start
        result["ms"] = 1000 * (timed[9] - timed[3]) / 6
    elif workload == "sample":
        from sd_ds.sample import main
        from sd_ds.testing import scratch_dir

        argv = ["--model", model_dir, "--prompt", "a red circle on a blue background", "--num_images", "4",
                "--batch_size", "4", "--steps", "10", "--device", "cpu",
                "--output", str(scratch_dir("bench_omp_") / "grid.png")]
        main(argv)
        start = time.perf_counter()
        main(argv)
        result["ms"] = 1000 * (time.perf_counter() - start)
    return result


# --- parent: the rounds, the load, the table ---------------------------------------------------------------

def measure(workload: str, policy: str, model_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, __file__, "--child", workload, policy, str(model_dir)], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode:
        raise SystemExit(f"{workload}/{policy} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_load() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def render(results: dict) -> str:
    meta = results["meta"]
    conditions = ("quiet", "loaded")
    lines = [SECTION, "",
             f"`python bench/bench_omp_wait.py --rounds {meta['rounds']}` at commit {meta['commit']} ({meta['date']}): "
             f"{meta['machine']}, torch {meta['torch']} (CPU). Each figure is the median over {meta['rounds']} rounds; "
             "a round measures every stage and policy with no load of ours (\"quiet\"), then beside one process "
             "spinning on a core (\"loaded\"), back to back. Policies: *spin*, torch's default (libgomp's idle "
             "threads spin before they sleep); *passive*, sd-ds's (`OMP_WAIT_POLICY=PASSIVE`, set by `import sd_ds` "
             "before torch loads); *1 thread*, `torch.set_num_threads(1)`. **This machine was shared** with other "
             "engineers' test runs during every figure (1-minute load average before the rounds: "
             f"{', '.join(f'{x:.1f}' for x in meta['loadavg'])}, on 2 cores), so \"quiet\" is not idle and the "
             "absolute figures swing between rounds (raw figures below); the ratios within a round are the result.",
             "", "| stage, ms per iteration | spin | passive | 1 thread | spin, loaded | passive, loaded | "
             "1 thread, loaded | spin ÷ passive | spin ÷ passive, loaded |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    names = {"conv": "conv stack fwd+bwd (4 × 64 ch, 4 × 32²)",
             "vae": "the demo's VAE stage, one step (32 px, batch 16)",
             "sample": "`sd_ds.sample`, 4 images × 10 steps (tiny model)"}
    for workload in meta["workloads"]:
        runs = results[workload]
        cell = {(p, c): statistics.median(runs[p][c]) for p in POLICIES for c in conditions}
        row = [f"{cell[(p, c)]:,.0f}" for c in conditions for p in POLICIES]
        ratios = [f"{cell[('spin', c)] / cell[('passive', c)]:.1f}×" for c in conditions]
        lines.append(f"| {names[workload]} | " + " | ".join(row + ratios) + " |")
    per_round = {w: [results[w]["spin"][c][r] / results[w]["passive"][c][r] for c in conditions
                     for r in range(meta["rounds"])] for w in meta["workloads"]}

    def vs_one_thread(w: str, c: str) -> float:
        return statistics.median(results[w]["passive"][c]) / statistics.median(results[w]["1 thread"][c])

    lines += ["", "Spin ÷ passive in each single round, quiet and loaded: "
              + "; ".join(f"{w} {min(v):.1f}× to {max(v):.1f}×" for w, v in per_round.items())
              + ". Passive ÷ one thread (medians): "
              + "; ".join(f"{w} " + ", ".join(f"{vs_one_thread(w, c):.2f}× {c}" for c in conditions)
                          for w in meta["workloads"]) + "."]
    lines += ["", "Not measured here, for want of an idle machine: what passive waiting costs when nothing else runs "
              "(a sleeping thread's wake-up, microseconds, per parallel region, which a spinning one saves). On a "
              "machine of your own, `GOMP_SPINCOUNT=300000` (libgomp's spin count when no policy is set) gives "
              "torch's default back; sd-ds leaves any OMP_WAIT_POLICY or GOMP_SPINCOUNT you set alone."]
    lines = [textwrap.fill(line, 115, break_on_hyphens=False) if not line.startswith("|") else line
             for line in lines]
    lines += ["", "Raw figures, ms per round: `" + json.dumps({w: results[w] for w in meta["workloads"]}) + "`", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(*argv[1:4])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--output", type=Path, default=None, help="also write the raw results here (JSON)")
    p.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    p.add_argument("--results", type=Path, default=None, help="render these saved results (--output) instead")
    a = p.parse_args(argv)
    from benchmarks_md import git_commit, publish

    if a.results:
        publish(render(json.loads(a.results.read_text())), write=a.write)
        return 0
    import torch

    results: dict = {w: {pol: {"quiet": [], "loaded": []} for pol in POLICIES} for w in a.workloads}
    loadavg = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        subprocess.run([sys.executable, "-m", "sd_ds.init", "--preset", "tiny", "--output_dir", str(model_dir)],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
        for rnd in range(a.rounds):
            loadavg.append(os.getloadavg()[0])
            for condition in ("quiet", "loaded"):
                load = start_load() if condition == "loaded" else None
                try:
                    for workload in a.workloads:
                        for policy in POLICIES:
                            r = measure(workload, policy, model_dir)
                            results[workload][policy][condition].append(round(r["ms"], 1))
                            print(f"round {rnd + 1} {condition:6s} {workload:6s} {policy:8s} {r['ms']:8.1f} ms "
                                  f"(threads {r['threads']}, OMP_WAIT_POLICY {r['omp_wait_policy']})", flush=True)
                finally:
                    if load is not None:
                        load.kill()
                        load.wait()
    results["meta"] = {"rounds": a.rounds, "workloads": a.workloads, "commit": git_commit(), "loadavg": loadavg,
                       "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    if a.output:
        a.output.write_text(json.dumps(results, indent=1))
    publish(render(results), write=a.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())

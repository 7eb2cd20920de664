"""The GPU benchmark is one command on a fresh machine: it imports the installed sd_ds (no sys.path edits),
accepts the deepspeed launcher's --local_rank, and builds the trainer's own engine. Here its code path runs as a
CPU smoke run with the tiny preset (figures are not written)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, subprocess_env

pytestmark = pytest.mark.slow


def test_gpu_throughput_bench_runs_from_anywhere_on_the_trainers_engine(tmp_path):
    env = subprocess_env({"DS_ACCELERATOR": "cpu"})
    env.pop("PYTHONPATH", None)  # `import sd_ds` must work through the editable install alone
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_gpu_throughput.py"), "--device", "cpu", "--preset", "tiny",
         "--micro_batch_size", "2", "--resolution", "32", "--windows", "1", "--steps_per_window", "1", "--warmup", "1",
         "--no-write", "--output", str(out), "--local_rank", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("diffusers loop", "sd-ds", "sd-ds latents"):
        assert result[name]["images_per_s"] > 0, name
    assert result["sd-ds"]["x_diffusers_loop"] > 0 and result["flops_per_step"]["online"] > result["flops_per_step"]["latents"]
    assert not (REPO_ROOT / "BENCHMARKS.md").read_text().count("cpu (no peak")


def test_step_ops_bench_counts_the_engines_phases(tmp_path):
    env = subprocess_env({"DS_ACCELERATOR": "cpu"})
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_step_ops.py"), "--steps", "1", "--no-write"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    optimizer = [c.strip().replace(",", "") for c in rows["optimizer step"].split("|")[2:-1]]
    plain_kernels, sd_ds_kernels = float(optimizer[0]), float(optimizer[1])
    # The streamlined ZeRO step: within 10x the plain fused-AdamW loop's kernel ops (DeepSpeed's own loops: ~1000x).
    assert sd_ds_kernels <= 10 * plain_kernels, rows["optimizer step"]


def test_demo_quality_bench_probes_the_text_path(tmp_path):
    """The cheapest part of the demo-quality benchmark, for real: linear probes on the frozen tiny CLIP's hidden
    states read a caption's colours only from the colour's own token on (never from BOS)."""
    env = subprocess_env({"DS_ACCELERATOR": "cpu"})
    env.pop("PYTHONPATH", None)
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_demo_quality.py"), "--parts", "text",
                           "--results", str(results)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = json.loads((results / "text.json").read_text())
    tokens = [t.replace("</w>", "") for t in probe["tokens"]]
    shape_color_at, background_at = tokens.index("green"), tokens.index("yellow")  # "a green circle on a yellow ..."
    assert probe["shape_color"][str(shape_color_at)] == 100.0 and probe["shape_color"]["0"] < 50
    assert probe["background_color"][str(background_at)] == 100.0 and probe["background_color"][str(shape_color_at)] < 50
    assert "**The text path**" in proc.stdout and "**The whole model**" not in proc.stdout


@pytest.mark.parametrize("kernels, busy", [
    ([(0, 10), (5, 15), (20, 30)], 25.0),  # two streams overlapping: counted once
    ([(0, 10), (2, 4), (10, 12)], 12.0),   # nested and touching
])
def test_gpu_busy_is_the_union_of_kernel_intervals(tmp_path, kernels, busy):
    import gzip

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from bench_gpu_throughput import gpu_busy_us

    events = [{"ph": "X", "cat": "kernel", "ts": a, "dur": b - a, "name": "k"} for a, b in kernels]
    events.append({"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 100, "name": "aten::add"})  # host time: not GPU work
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert gpu_busy_us(trace) == busy


def test_precision_bench_measures_both_precisions(tmp_path):
    env = subprocess_env()
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_precision.py"), "--steps", "1",
                           "--micro_batch", "2", "--no-write"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| this CPU |"))
    fp32_ms, bf16_ms = (float(cell) for cell in row.split("|")[3:5])
    assert fp32_ms > 0 and bf16_ms > 0 and "oneDNN bf16 native:" in row

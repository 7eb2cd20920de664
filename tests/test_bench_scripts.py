"""The GPU benchmark is one command on a fresh machine: it imports the installed sd_ds (no sys.path edits),
accepts the deepspeed launcher's --local_rank, and builds the trainer's own engine. Here its code path runs as a
CPU smoke run with the tiny preset (figures are not written)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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


def test_gpu_throughput_bench_runs_the_sd2_and_sdxl_configurations_at_tiny_sizes(tmp_path):
    """The SD 2.x and SDXL rows' code paths on CPU (tiny-sd2, tiny-sdxl): the diffusers loop with the family's
    conditioning, the trainer's engine online and on latents + stored text conditioning, several micro batches in
    one run, trainer flags set up by the trainer's own prepare_components."""
    env = subprocess_env({"DS_ACCELERATOR": "cpu"})
    for preset, contenders, sizes, section in (
            ("tiny-sd2", "sd-ds latents,sd-ds latents+text", "2,3", "## 25. GPU: SD 2.x UNet at 512 px"),
            ("tiny-sdxl", "diffusers loop,sd-ds,sd-ds latents+text", "2", "## 26. GPU: SDXL UNet at 1024 px")):
        out = tmp_path / f"{preset}.json"
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "bench_gpu_throughput.py"), "--device", "cpu", "--preset",
             preset, "--micro_batch_size", sizes, "--resolution", "32", "--windows", "1", "--steps_per_window", "1",
             "--warmup", "1", "--contenders", contenders, "--trainer_flags=--cudnn_benchmark True", "--no-write",
             "--output", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = json.loads(out.read_text())
        labels = [name if "," not in sizes else f"{name}, micro batch {b}" for b in sizes.split(",")
                  for name in contenders.split(",")]
        for label in labels:
            assert "error" not in result[label] and result[label]["images_per_s"] > 0, (label, proc.stdout[-3000:])
        assert all(result[label]["trainer_flags"] == "--cudnn_benchmark True" for label in labels if "sd-ds" in label)
        flops = result["flops_per_step"]
        assert flops["online"] > flops["latents"] > flops["latents+text"] == flops["unet"]
        assert result["markdown"].startswith(section) and "| sd-ds latents+text |" in result["markdown"]


def test_flops_are_counted_on_the_trainers_conditioning_path_and_meta_counts_equal_real_ones():
    """SDXL's added embedding (pooled text + time_ids through two linears) is in the UNet's count, and the counts on
    meta copies are those of real tensors. Attention: on meta, scaled_dot_product_attention runs its math
    decomposition (two bmm, counted), which is what torch's counter gives CUDA's flash / memory-efficient / cuDNN
    kernels too; on real CPU tensors its flash kernel has no FLOP formula (uncounted), so the CPU check runs the
    math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from bench_gpu_throughput import model_flops

    from sd_ds.presets import TINY_SDXL_UNET

    B = 2
    meta = model_flops("tiny-sdxl", B, 32)
    with sdpa_kernel(SDPBackend.MATH):
        assert meta == model_flops("tiny-sdxl", B, 32, device=torch.device("cpu"))
    assert meta["unet"] > model_flops("tiny-sdxl", B, 32, device=torch.device("cpu"))["unet"]  # attention uncounted
    in_dim, width = TINY_SDXL_UNET["projection_class_embeddings_input_dim"], 4 * TINY_SDXL_UNET["block_out_channels"][0]
    assert meta["unet_added_embedding"] == 3 * 2 * B * (in_dim * width + width * width)  # linear_1, linear_2; x3
    assert model_flops("tiny-sd2", B, 32)["unet_added_embedding"] == 0


def test_gpu_check_dry_run_lists_every_stage_within_the_time_budget(tmp_path):
    """bench/gpu_check.sh --dry-run: the stages' commands with their limits, nothing run, only the log written;
    a TOTAL_S too small for a stage skips it, saying so. (`--cpu` runs the same stages at tiny sizes, ~3-6 min.)"""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path,
                          env=subprocess_env({"OUT": str(out)}), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = [line for line in proc.stdout.splitlines() if line.startswith("=== [")]
    assert [s.split("] ")[1].split(" (limit")[0].split(" --")[0] for s in stages] == [
        "pytest -m gpu", "SD v1", "SD 2.x", "SDXL", "SD v1 compiled"]
    assert "--preset sd-v2 --resolution 512 --micro_batch_size 32,64" in stages[2]
    assert "--preset sdxl --resolution 1024" in stages[3] and "--trainer_flags=--recompute True" in stages[3]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log"]
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path,
                          env=subprocess_env({"OUT": str(out), "TOTAL_S": "70"}), capture_output=True, text=True,
                          timeout=120)
    assert "=== [" in proc.stdout.splitlines()[2] and proc.stdout.count("SKIPPED") == 4, proc.stdout


def test_gpu_check_summary_puts_each_goal_beside_its_figure(tmp_path):
    def row(ips: float, **extra) -> dict:
        return {"images_per_s": ips, "images_per_s_min": ips, "images_per_s_max": ips, "peak_memory_gb": 50.0,
                "mfu_unet": 0.3, "warmup_s": 80.0, "process_s": 120.0, **extra}

    def result(rows: dict, **extra) -> dict:
        return {"device": "NVIDIA H200 (989 TFLOP/s bf16 dense)", "markdown": "## 25. x\n", **rows, **extra}

    (tmp_path / "bench_sd-v2_512.json").write_text(json.dumps(result({
        "sd-ds latents, micro batch 32": row(120.0), "sd-ds latents+text, micro batch 64": row(150.0)})))
    (tmp_path / "bench_sd-v1_256.json").write_text(json.dumps(result({
        "sd-ds": row(250.0), "sd-ds latents": row(400.0), "sd-ds latents+text": {"error": "exit 1"}})))
    (tmp_path / "bench_compile_256.json").write_text(json.dumps(result({"sd-ds --compile": row(500.0)})))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_check_summary.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    sd2 = next(line for line in lines if line.startswith("- SD 2.x"))
    assert "best row `sd-ds latents+text, micro batch 64`: 150.0 img/s" in sd2 and "goal met" in sd2
    v1 = next(line for line in lines if line.startswith("- SD v1"))
    assert "`sd-ds latents`: 400.0 img/s" in v1 and "1.17 x" in v1 and "goal (>= 512.5) not met" in v1
    assert any("baseline rerun `sd-ds`: 250.0 img/s here (2026-12-04 H200: 244.9)" in line for line in lines)
    assert any(line.startswith("- cold compile <= 120 s: `sd-ds --compile` warm-up (compiling) 80 s") for line in lines)
    assert "- SDXL at 1024 px: not run" in lines

"""GPU checks (marked `gpu`, skipped without CUDA): what CPU ranks can only check by proxy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, free_port, make_tiny_model, subprocess_env
from tests.test_engine import run_worker

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def cuda_env(**extra: str) -> dict:
    env = subprocess_env({"MASTER_PORT": str(free_port()), **extra})
    env.pop("DS_ACCELERATOR", None)  # DeepSpeed detects CUDA
    return env


def test_cuda_engine_uses_torch_fused_adamw_and_the_streamlined_step(tmp_path, monkeypatch):
    model = make_tiny_model(tmp_path / "model")
    monkeypatch.setattr("tests.test_engine.subprocess_env", lambda extra: cuda_env(**extra))
    result = run_worker("streamlined", model, tmp_path)
    assert result["device"].startswith("cuda")
    # torch's fused AdamW: no DeepSpeed FusedAdam op JIT-built with nvcc at start-up.
    assert result["optimizer"] == "torch.optim.adamw.AdamW" and result["fused"]
    assert result["skipped"] == [0, 0, 0, 1, 1] and result["finite"]
    # DeepSpeed's throughput timer is off: no accelerator.synchronize() in a step; ZeRO's two host reads remain.
    assert result["device_syncs_per_step"] == 0, result
    assert result["host_reads_per_step"] <= 2, result["host_reads"]


def test_control_group_carries_cpu_tensors_while_the_default_group_is_nccl():
    code = (
        "import torch, torch.distributed as dist\n"
        "from sd_ds.distributed import init_distributed\n"
        "info = init_distributed()\n"
        "assert dist.get_backend() == 'nccl', dist.get_backend()\n"
        "assert info.all_reduce(torch.tensor([1.0]))[0] == 1.0\n"
        "info.barrier(); print('OK', info.broadcast_object({'a': 1}))\n"
        "nccl = dist.distributed_c10d._get_default_group()._get_backend(torch.device('cuda'))\n"
        "print('NCCL_TIMEOUT_S', nccl.options._timeout.total_seconds())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=cuda_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1"))
    assert proc.returncode == 0 and "OK {'a': 1}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    # The data plane fails in minutes on a wedged rank (the gloo control group keeps its long timeout).
    assert "NCCL_TIMEOUT_S 1800.0" in proc.stdout, proc.stdout[-2000:]


def test_a_training_step_with_xformers_attention(tmp_path, monkeypatch):
    pytest.importorskip("xformers")
    model = make_tiny_model(tmp_path / "model")
    flags = "--enable_xformers_memory_efficient_attention True"
    monkeypatch.setattr("tests.test_engine.subprocess_env", lambda extra: cuda_env(SD_DS_WORKER_FLAGS=flags, **extra))
    result = run_worker("streamlined", model, tmp_path)
    assert result["device"].startswith("cuda") and result["finite"] and result["skipped"] == [0, 0, 0, 1, 1]


def test_the_throughput_bench_runs_on_cuda(tmp_path):
    """bench/bench_gpu_throughput.py end to end on CUDA (tiny presets: seconds), each contender in its own process:
    the FLOP count, the trainer's engine set up by the trainer's own prepare_components (--cudnn_benchmark is
    honoured), a profiler trace; SDXL's kind on stored latents and text conditioning."""
    env = cuda_env()
    env.pop("MASTER_PORT")  # one fresh port per contender process
    for preset, contenders in (("tiny", "diffusers loop,sd-ds,sd-ds latents"), ("tiny-sdxl", "sd-ds latents+text")):
        out = tmp_path / f"{preset}.json"
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "bench_gpu_throughput.py"), "--preset", preset,
             "--micro_batch_size", "4", "--resolution", "64", "--windows", "1", "--steps_per_window", "3", "--warmup",
             "2", "--contenders", contenders, "--trace", "sd-ds", "--trace_dir", str(tmp_path), "--peak_tflops", "100",
             "--trainer_flags=--cudnn_benchmark True", "--no-write", "--output", str(out)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = json.loads(out.read_text())
        for name in contenders.split(","):
            assert "error" not in result[name], (name, proc.stdout[-3000:])
            assert result[name]["images_per_s"] > 0 and result[name]["mfu_unet"] > 0
            assert result[name]["peak_memory_gb"] > 0
            assert name == "diffusers loop" or result[name]["cudnn_benchmark"] is True
    assert (tmp_path / "trace_64_sd-ds.json.gz").stat().st_size > 0
    assert json.loads((tmp_path / "tiny.json").read_text())["sd-ds"]["gpu_busy"] > 0

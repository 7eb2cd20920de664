"""Precision that fits the hardware (sd_ds.precision): CPU ranks without native bf16 train in fp32 unless bf16 is
asked for. oneDNN's capability check honours ONEDNN_MAX_CPU_ISA, so ONEDNN_MAX_CPU_ISA=AVX2 reproduces an
AVX2-only CPU on any x86 machine (it reproduces the ~20x bf16 slowdown too: bench/bench_precision.py)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, run_sh, subprocess_env, train_flags

AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2"}

RESOLVE = """
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from sd_ds.config import parse_config
from sd_ds.precision import cpu_has_native_bf16, resolve_precision
cfg = parse_config(sys.argv[1:])
precision = resolve_precision(cfg, torch.device(DEVICE), is_main_process=True)
print(json.dumps({"precision": precision, "native": cpu_has_native_bf16()}))
"""


def resolve(flags: list[str], env: dict, device: str = "cpu", *, fails: bool = False) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", RESOLVE.replace("DEVICE", repr(device)), *flags], cwd=REPO_ROOT,
                          env=subprocess_env(env), capture_output=True, text=True, timeout=120)
    if fails:
        assert proc.returncode != 0, proc.stdout
        return {}, proc.stderr
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def x86_with_onednn() -> bool:
    import platform

    import torch

    return platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available()


needs_x86 = pytest.mark.skipif(not x86_with_onednn(), reason="ONEDNN_MAX_CPU_ISA=AVX2 emulates an x86 CPU")


@needs_x86
def test_cpu_without_native_bf16_trains_fp32_unless_asked():
    result, log = resolve([], AVX2_ONLY)
    assert result == {"precision": "fp32", "native": False}
    lines = [line for line in log.splitlines() if "precision:" in line]
    assert len(lines) == 1 and "fp32" in lines[0] and "--bf16 True" in lines[0], log

    # Asked for explicitly: obeyed, with one warning that gives the factor measured on this CPU.
    result, log = resolve(["--bf16", "True"], AVX2_ONLY)
    assert result["precision"] == "bf16"
    warnings = [line for line in log.splitlines() if line.startswith("WARNING") and "precision:" in line]
    assert len(warnings) == 1 and "--bf16 False" in warnings[0], log
    factor = float(warnings[0].split("run ")[1].split("x slower")[0])
    assert factor > 3  # ~7-20x on an AVX2-only CPU (emulated or real); ~1x where bf16 is native

    assert resolve(["--bf16", "False"], AVX2_ONLY)[0]["precision"] == "fp32"
    # fp16 needs native fp16 on a CPU rank (AVX-512-FP16 / AMX-FP16), which an AVX2-only CPU has not: DeepSpeed's CPU
    # accelerator would refuse the engine with a traceback; the trainer says so first.
    _, log = resolve(["--fp16", "True"], AVX2_ONLY, fails=True)
    assert "PrecisionUnsupported: --fp16 on CPU ranks needs a CPU with native fp16" in log


def test_native_cpu_and_gpus_keep_bf16():
    result, log = resolve([], {})
    # Whatever this CPU is, the default follows oneDNN's own check, silently where bf16 is native.
    assert result["precision"] == ("bf16" if result["native"] else "fp32")
    if result["native"]:
        assert "precision:" not in log
    # Not a CPU rank: bf16 unless --fp16 (no capability check; the device is not touched).
    assert resolve([], AVX2_ONLY, device="meta")[0]["precision"] == "bf16"
    assert resolve(["--fp16", "True"], AVX2_ONLY, device="meta")[0]["precision"] == "fp16"


@pytest.mark.slow
def test_trainer_refuses_fp16_on_a_cpu_without_native_fp16(assets, tmp_path):
    """Through run.sh: one line and exit status 2 before any model loads, instead of DeepSpeed's traceback."""
    from sd_ds.precision import cpu_has_native_fp16

    if cpu_has_native_fp16():
        pytest.skip("this CPU runs fp16 natively (AVX-512-FP16 / AMX-FP16)")
    flags = train_flags(tmp_path / "out", assets["shards"], assets["model"], bf16=None, fp16="True", max_steps=1)
    proc = run_sh(flags, nproc=2, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("sd_ds.train: error:")]
    assert len(said) == 1 and "--fp16 on CPU ranks needs a CPU with native fp16" in said[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr.lower()


@needs_x86
@pytest.mark.slow
def test_trainer_on_an_avx2_only_cpu_trains_fp32(assets, tmp_path):
    """Through run.sh, without --bf16: the engine is fp32 (DeepSpeed's fp32 optimizer files), said once."""
    out = tmp_path / "out"
    flags = train_flags(out, assets["shards"], assets["model"], bf16=None, max_steps=2, save_steps=2)
    proc = run_sh(flags, nproc=2, extra_env=AVX2_ONLY)
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "precision: fp32" in line]
    assert len(said) == 1, proc.stdout[-3000:]
    ckpt = out / "checkpoint-2"
    assert (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert not list(ckpt.glob("bf16_*")), sorted(p.name for p in ckpt.iterdir())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["config"]["optim"]["bf16"] is False

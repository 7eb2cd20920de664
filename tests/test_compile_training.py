"""--torch_compile end to end on 2 CPU ranks through run.sh (inductor, C++ kernels): the losses are eager's within
bf16's tolerance (tiny-sdxl, whose added_cond_kwargs condition the compiled blocks), the first step saves
the compiled kernels beside the checkpoints, and a restart on an empty inductor cache (a fresh node) loads them and
compiles nothing: no AOTAutograd or inductor cache miss, no kernel library built (the trainer's log line).
The time it saves is bench/bench_compile.py's figure (BENCHMARKS.md, torch.compile cold start); here the counters are asserted.
Each cold compile takes minutes on this machine's CPUs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, run_sh, scalars, subprocess_env, train_flags

pytestmark = pytest.mark.slow


def losses(out) -> list[float]:
    return [v for _, v in scalars(out / "runs", "train/loss")]


def compile_line(proc: subprocess.CompletedProcess) -> dict:
    """The numbers of rank 0's last "torch.compile: ..." log line."""
    lines = re.findall(r"torch\.compile: .*", proc.stdout + proc.stderr)
    assert lines, (proc.stdout + proc.stderr)[-3000:]
    numbers = re.search(r"(\d+) graphs traced; AOTAutograd cache (\d+) hits, (\d+) misses; inductor cache (\d+) hits, "
                        r"(\d+) misses; (\d+) kernel libraries built; loaded from \S+: (.*)", lines[-1])
    assert numbers, lines[-1]
    keys = ("graphs", "aot_hits", "aot_misses", "inductor_hits", "inductor_misses", "kernels_built")
    return {**dict(zip(keys, map(int, numbers.groups()[:6]))), "loaded": numbers.group(7)}


def assert_close_to_eager(compiled: list[float], eager: list[float]) -> None:
    """bf16 weights and activations: inductor fuses (and rounds) differently from eager, and a step's update moves
    the next step's loss by as much; a bug (a wrong region, lost gradients) moves it by orders of magnitude more."""
    assert len(compiled) == len(eager)
    for step, (c, e) in enumerate(zip(compiled, eager), start=1):
        assert abs(c - e) <= 0.02 * max(1.0, abs(e)), (step, compiled, eager)


def test_compiled_training_matches_eager_and_a_restart_compiles_nothing(assets, tmp_path):
    """tiny-sdxl, the family with the most glue around the compiled blocks: two text encoders, the pooled embedding
    and the six micro-conditioning numbers through the UNet's added embedding (eager) into the compiled blocks. The
    SD v1 and SD 2.x regions are compiled and checked in-process (tests/test_compile.py); one cold compile on 2
    ranks here, as each takes minutes."""
    model = tmp_path / "tiny-sdxl"
    subprocess.run([sys.executable, "-m", "sd_ds.init", "--output_dir", str(model), "--preset", "tiny-sdxl",
                    "--seed", "0"], check=True, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True)

    def flags(out, max_steps: int, **extra):
        return train_flags(out, assets["shards"], model, max_steps=max_steps, save_steps=2, **extra)

    eager = tmp_path / "eager"
    run_sh(flags(eager, 4), nproc=2)
    out = tmp_path / "compiled"
    cold = run_sh(flags(out, 2, torch_compile="True"), nproc=2,
                  extra_env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor_cold")})
    first = compile_line(cold)
    # 7 UNet blocks + the VAE encoder, each compiled (cache misses), and the kernels saved per local rank.
    assert first["graphs"] == 8 and first["aot_misses"] == 8 and first["kernels_built"] > 0, first
    assert first["loaded"] == "nothing"
    saved = sorted(p.name for p in (out / "compile_cache").iterdir())
    assert saved == ["local_rank_0.tar", "local_rank_1.tar"], saved

    restart = run_sh(flags(out, 4, torch_compile="True"), nproc=2,
                     extra_env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor_fresh_node")})
    warm = compile_line(restart)
    assert "resum" in (restart.stdout + restart.stderr).lower()  # from checkpoint-2
    assert warm["graphs"] == 8, warm  # dynamo traces again (seconds) ...
    assert (warm["aot_misses"], warm["inductor_misses"], warm["kernels_built"]) == (0, 0, 0), warm  # ... nothing compiles
    assert warm["aot_hits"] == 8 and warm["inductor_hits"] == first["inductor_misses"], warm
    assert "'kernel_libraries': " in warm["loaded"], warm
    assert_close_to_eager(losses(out), losses(eager))

"""The streamlined ZeRO step (sd_ds.zero_step.streamline_zero_optimizer) trains exactly as DeepSpeed's own: the same
gradient norms and clipping, a non-finite step detected, skipped and counted, the same weights after."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import pytest

from tests.helpers import REPO_ROOT, free_port, make_tiny_model, subprocess_env

pytestmark = pytest.mark.slow


def run_worker(mode: str, model, tmp_path, flags: str = "", extra_env: dict | None = None) -> dict:
    env = subprocess_env({"MASTER_PORT": str(free_port()), "MASTER_ADDR": "127.0.0.1", "RANK": "0",
                          "WORLD_SIZE": "1", "LOCAL_RANK": "0", **({"SD_DS_WORKER_FLAGS": flags} if flags else {}),
                          **(extra_env or {})})
    proc = subprocess.run([sys.executable, "-m", "tests.streamline_worker", mode, str(model), str(tmp_path / mode)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_streamlined_zero_step_matches_deepspeeds(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    reference = run_worker("deepspeed", model, tmp_path)
    lean = run_worker("streamlined", model, tmp_path)
    # Step 3 had NaN gradients: both skip it (counted, norm reported as inf), and only it.
    assert reference["skipped"] == [0, 0, 0, 1, 1] and lean["skipped"] == [0, 0, 0, 1, 1]
    assert math.isinf(lean["norms"][3]) and math.isinf(reference["norms"][3])
    # Per-tensor norms in fp32 instead of fp64: the first step's norm agrees to float rounding; later ones can
    # differ by a bf16 ulp flipped in some weight. Clipping at 0.05 with norms ~1 scales every update by ~20,
    # so a step that clipped otherwise (or not at all) would differ by orders of magnitude more.
    assert lean["norms"][0] == pytest.approx(reference["norms"][0], rel=1e-6)
    for a, b in zip(reference["norms"], lean["norms"]):
        if math.isfinite(a):
            assert b == pytest.approx(a, rel=1e-4), (reference["norms"], lean["norms"])
    assert lean["finite"] and reference["finite"]
    assert lean["sum"] == pytest.approx(reference["sum"], rel=1e-4, abs=1e-4)
    assert lean["abs_sum"] == pytest.approx(reference["abs_sum"], rel=1e-5)


def test_fp16_recipe_skips_an_overflow_as_deepspeeds_own_step(tmp_path):
    """--fp16 True (ds_configs/zero2_fp16.json: fp16 weights and gradients, fp32 master weights, dynamic loss scale
    from 2^16): the streamlined ZeRO step unscales, clips, detects the overflow and skips it exactly as DeepSpeed's
    own step does. DeepSpeed refuses an fp16 engine on a CPU without native fp16 (this one); the worker lets it
    through (SD_DS_WORKER_FP16_ON_CPU) to run the recipe's logic on torch's reference fp16 kernels."""
    model = make_tiny_model(tmp_path / "model")
    fp16 = {"extra_env": {"SD_DS_WORKER_FP16_ON_CPU": "1"}, "flags": "--fp16 True"}
    reference = run_worker("deepspeed", model, tmp_path, **fp16)
    lean = run_worker("streamlined", model, tmp_path, **fp16)
    assert reference["skipped"] == lean["skipped"] == [0, 0, 0, 1, 1]  # step 3's NaN: skipped and counted
    # Gradients are scaled by 2^16 in fp16 and unscaled in fp32: the norms reported are the true ones, as bf16's.
    assert 0.1 < lean["norms"][0] < 10 and math.isinf(lean["norms"][3])
    # hysteresis 2: the first overflow spends the hysteresis, the scale halves only at a second one in a row.
    assert lean["scales"] == reference["scales"] == [65536.0] * 5
    assert lean["norms"] == reference["norms"]
    assert lean["sum"] == reference["sum"] and lean["abs_sum"] == reference["abs_sum"] and lean["finite"]


def test_a_step_syncs_the_device_at_most_twice(tmp_path):
    """Device syncs per step as a CUDA rank issues them (accelerator.synchronize, counted on CPU) plus host reads
    of device values (.item(), bool(t)): DeepSpeed's throughput timer adds two syncs a step unless turned off."""
    model = make_tiny_model(tmp_path / "model")
    result = run_worker("streamlined", model, tmp_path)
    # ZeRO's step reads two values on the host (the overflow decision, the norm's validity); nothing else does.
    assert result["device_syncs_per_step"] == 0, result
    assert result["host_reads_per_step"] <= 2, result["host_reads"]
    # The counter sees the timer's syncs when a user's JSON turns it back on.
    config = json.loads((REPO_ROOT / "ds_configs" / "zero2_bf16.json").read_text())
    config["timers"] = {"throughput": {"enabled": True}}
    (tmp_path / "timer.json").write_text(json.dumps(config))
    timed = run_worker("streamlined", model, tmp_path, flags=f"--deepspeed {tmp_path / 'timer.json'}")
    assert timed["device_syncs_per_step"] == 2, timed


@pytest.mark.parametrize("max_region_parameters", [None, 100_000])
def test_compiled_unet_makes_gradients_ready_region_by_region(max_region_parameters):
    """--torch_compile compiles the UNet in regions (sd_ds.compile): the backward is a chain of compiled nodes, each
    owning its region's parameters, so ZeRO's gradient hooks (fired as each parameter's gradient is accumulated)
    start reducing the last regions while the first regions' backward still runs. Compiled whole, one node would
    own them all. Blocks above the size limit (here 0.1 M parameters, SDXL's 0.4 B) are compiled per child."""
    from diffusers import UNet2DConditionModel

    from sd_ds.compile import compile_regions, unet_regions
    from sd_ds.presets import TINY_UNET

    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    limit = {"max_region_parameters": max_region_parameters} if max_region_parameters else {}
    compile_regions(unet, backend="aot_eager", **limit)  # the same autograd structure as inductor's, no codegen
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 16, 64)).sample
    owners: dict[int, set] = {}
    seen, stack = set(), [out.sum().grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and type(child).__name__ == "AccumulateGrad" and "Compiled" in type(node).__name__:
                owners.setdefault(id(node), set()).add(id(child.variable))
            stack.append(child)
    regions = unet_regions(unet, **{"max_parameters": max_region_parameters} if max_region_parameters else {})
    assert len(regions) == (7 if max_region_parameters is None else 20)
    assert len(owners) == len(regions), len(owners)
    for name, region in regions:
        ids = {id(p) for p in region.parameters()}
        assert any(ids == owned for owned in owners.values()), name
    torch._dynamo.reset()


def test_streamlining_refuses_a_deepspeed_without_a_replaced_method(monkeypatch):
    """A DeepSpeed whose ZeRO optimizer renamed a method the streamlined step replaces must stop the run, not
    train on silently with half the replacements (here: 0.19.8's class with get_grad_norm_direct removed)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from sd_ds.zero_step import STREAMLINED_ATTRIBUTES, streamline_zero_optimizer

    optimizer = object.__new__(DeepSpeedZeroOptimizer)  # no engine needed: the check runs before any patching
    optimizer.cpu_offload, optimizer.has_moe_layers = False, False
    for name in STREAMLINED_ATTRIBUTES:
        if name != "loss_scale":
            setattr(optimizer, name, None)
    optimizer.loss_scaler = types.SimpleNamespace(cur_scale=1.0)  # what the loss_scale property reads
    monkeypatch.delattr(DeepSpeedZeroOptimizer, "get_grad_norm_direct")
    with pytest.raises(RuntimeError, match=r"get_grad_norm_direct.*deepspeed==0\.19\.8"):
        streamline_zero_optimizer(optimizer)
    assert "get_grad_norm_direct" not in vars(optimizer)  # nothing was replaced


def test_gradient_reduction_moves_the_ideal_zero2_bytes(tmp_path):
    """Every collective's bytes recorded on 2 CPU ranks (bench/bench_comm_volume.py): DeepSpeed's bucket all-reduce
    moves 1.5x ZeRO-2's ideal (reduce-scatter of the gradients + all-gather of the weights); sd-ds's reduction to
    each slice's owner moves the ideal, and both train to the same weights."""
    out = tmp_path / "comm.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_comm_volume.py"), "--world_sizes", "2",
                           "--no-write", "--output", str(out)], cwd=tmp_path, env=subprocess_env({}),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    deepspeed, lean = (next(r for r in rows if r.get("mode") == mode) for mode in ("deepspeed", "sd-ds"))
    assert deepspeed["x_ideal"] == pytest.approx(1.5, abs=0.02)
    assert lean["x_ideal"] <= 1.1 and "all_reduce" not in {op for op, b in lean["by_op"].items() if b > 1024}
    assert next(r for r in rows if "same_weights" in r)["same_weights"]  # 2 ranks: a + b either way, bit for bit

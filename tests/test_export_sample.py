"""Train tiny on 3 CPU ranks (EMA, image logging, validation loss, --only_save_updated_model) → resume on 2 ranks →
export → StableDiffusionPipeline / the sample CLI. Real multi-rank DeepSpeed through run.sh. Checkpoints hold
optimizer files pickled as CPython 3.11.2 writes them (an Enum by name, issue 21) as well as this Python's own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO_ROOT, fp32_weights, make_tiny_model, run_sh, subprocess_env, train_flags, write_tiny_shards
from tests.test_checkpoint_loading import (BY_NAME_SITE, GETATTR, _Call, enums_pickled_by_name, pickled_globals,
                                          resave_enums_by_name)

pytestmark = pytest.mark.slow

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 ranks to step 4 (checkpoints 2, 4), then 2 ranks resume from checkpoint-4 to step 6."""
    root = tmp_path_factory.mktemp("export")
    shards = write_tiny_shards(root / "shards", num_shards=6, samples_per_shard=24)
    model = make_tiny_model(root / "model")
    out = root / "run"
    # Fixed decay (no warm-up): the re-sharded-EMA test reasons about decay 0.9 per update.
    common = dict(use_ema=True, ema_decay=0.9, ema_warmup="False", only_save_updated_model="True", save_steps=2,
                  per_device_train_batch_size=2, dataloader_num_workers=0,
                  validation_shards=shards, validation_steps=2, validation_samples=6, validation_batch_size=2)
    first = run_sh(train_flags(out, shards, model, max_steps=4, image_logging_steps=2, num_inference_steps=2,
                               validation_prompts=PROMPTS, **common), nproc=3, timeout=900)
    # Issue 21: ZeroStageEnum pickled by name, as CPython 3.11.2 (Debian 12's python3) writes it, in ranks 0 and
    # 1's optimizer files (rank 2's stays as this Python wrote it: the conversion reads both kinds); and the
    # second run pickles that way throughout (its universal copy, checkpoint-6, which the export tests read).
    for rank in (0, 1):
        resave_enums_by_name(out / "checkpoint-4" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    second = run_sh(train_flags(out, shards, model, max_steps=6, image_logging_steps=0, **common), nproc=2,
                    timeout=900, extra_env={"PYTHONPATH": f"{BY_NAME_SITE}:{REPO_ROOT}"})
    return out, first.stdout + first.stderr, second.stdout + second.stderr


def _unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _export(ckpt: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd_ds.export", str(ckpt), str(target), *extra], cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600, check=True)


def test_image_logging_writes_pngs_and_tensorboard_images(run):
    out, log, _ = run
    samples = out / "samples"
    for name in ("reconstruction", "samples_guidance_1", "samples_guidance_7.5", "validation_prompts"):
        for step in (2, 4):
            assert (samples / f"step_{step:08d}_{name}.png").is_file(), (name, step, log[-3000:])
    from PIL import Image

    recon = Image.open(samples / "step_00000004_reconstruction.png")
    assert recon.size == (2 * 32, 2 * 32), "two training images (micro batch 2) over their reconstructions"
    assert len((samples / "step_00000004_captions.txt").read_text().splitlines()) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert {"images/reconstruction", "images/samples_guidance_7.5", "images/validation_prompts"} <= set(tags)
    assert [e.step for e in acc.Images("images/reconstruction")] == [2, 4]


def test_validation_loss_logged_at_start_and_every_n_steps_and_resume_keeps_the_schedule(run):
    from tests.helpers import scalars

    out, log, log2 = run
    # Fresh run: step 0 and every 2 steps; the resumed run (from step 4) does not repeat step 4.
    loss = scalars(out / "runs", "validation/loss")
    assert [s for s, _ in loss] == [0, 2, 4, 6], loss
    assert [s for s, _ in scalars(out / "runs", "validation/loss_ema")] == [0, 2, 4, 6]
    assert [s for s, _ in scalars(out / "runs", "validation/loss/t0062")] == [0, 2, 4, 6]
    # Before any update the EMA is the weights: the same loss.
    assert scalars(out / "runs", "validation/loss_ema")[0][1] == loss[0][1]
    assert "step 2 validation loss" in log and "on 6 held-out samples x 8 timesteps" in log, log[-3000:]
    assert "step 6 validation loss" in log2 and "step 4 validation loss" not in log2


def test_resume_on_fewer_ranks_reshards_ema_and_continues(run):
    out, _, log = run
    assert "resumed from" in log and "checkpoint-4" in log, log[-3000:]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoint-4").glob("ema_rank_*.pt")) == [
        f"ema_rank_{r:05d}.pt" for r in range(3)]
    assert sorted(p.name for p in (out / "checkpoint-6").glob("ema_rank_*.pt")) == [
        f"ema_rank_{r:05d}.pt" for r in range(2)]
    # The optimizer went through DeepSpeed's universal checkpoint: resumed weights continue from step 4's.
    before, after = fp32_weights(out / "checkpoint-4"), fp32_weights(out / "checkpoint-6")
    assert 0 < _max_diff(before, after) < 1.0


def test_resharded_ema_continues_the_saved_ema(run):
    """EMA at step 6 = decay-weighted mix of the EMA loaded from 3 shards and the 2-rank weights: with decay 0.9
    and two more updates it stays close to the step-4 EMA, far closer than to a fresh copy of the weights."""
    from sd_ds.ema import consolidate_ema

    out, _, _ = run
    ema4, ema6 = consolidate_ema(out / "checkpoint-4"), consolidate_ema(out / "checkpoint-6")
    w6 = fp32_weights(out / "checkpoint-6")
    assert set(ema4) == set(ema6) == set(w6)
    assert _max_diff(ema4, ema6) < _max_diff(ema6, w6)
    assert _max_diff(ema6, w6) > 0


def test_export_weights_equal_zero_to_fp32_and_ema_reference(run, tmp_path):
    from sd_ds.ema import consolidate_ema

    out, _, _ = run
    ckpt = out / "checkpoint-6"
    _export(ckpt, tmp_path / "plain")
    _export(ckpt, tmp_path / "ema", "--ema")
    for folder in (tmp_path / "plain", tmp_path / "ema"):
        for part in ("model_index.json", "unet/config.json", "vae/diffusion_pytorch_model.safetensors",
                     "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                     "scheduler/scheduler_config.json"):
            assert (folder / part).is_file(), (folder, part)
    reference = {k[len("unet."):]: v for k, v in fp32_weights(ckpt).items()}
    assert _max_diff(_unet_weights(tmp_path / "plain"), reference) == 0.0
    ema = {k[len("unet."):]: v for k, v in consolidate_ema(ckpt).items()}
    assert _max_diff(_unet_weights(tmp_path / "ema"), ema) == 0.0
    assert _max_diff(ema, reference) > 0
    assert json.loads((tmp_path / "ema" / "sd_ds_export.json").read_text())["ema"] is True


def test_only_save_updated_model_writes_the_unet_in_each_checkpoint(run):
    out, _, _ = run
    for step in (4, 6):
        ckpt = out / f"checkpoint-{step}"
        reference = {k[len("unet."):]: v for k, v in fp32_weights(ckpt).items()}
        assert _max_diff(_unet_weights(ckpt), reference) == 0.0


def test_export_of_something_not_a_checkpoint_is_an_argument_error(run, tmp_path):
    out, _, _ = run
    proc = subprocess.run([sys.executable, "-m", "sd_ds.export", str(out / "checkpoint-6" / "unet"),
                           str(tmp_path / "x")], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr


def test_pipeline_and_sample_cli_generate_deterministic_pngs(run, tmp_path):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    out, _, _ = run
    model = tmp_path / "model"
    _export(out, model, "--ema")  # output_dir → its newest checkpoint
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    def sample(seed: int, name: str, *extra: str) -> Image.Image:
        target = tmp_path / name
        subprocess.run([sys.executable, "-m", "sd_ds.sample", "--model", str(model), "--prompt", PROMPTS[0],
                        "--prompt", PROMPTS[1], "--num_images", "2", "--steps", "3", "--seed", str(seed),
                        "--output", str(target), *extra], cwd=REPO_ROOT, env=subprocess_env(), check=True,
                       capture_output=True, timeout=300)
        return Image.open(target)

    a, b, c = sample(1, "a.png"), sample(1, "b.png"), sample(2, "c.png")
    assert a.size == (2 * 32, 2 * 32)
    assert a.tobytes() == b.tobytes(), "same seed, same images"
    assert a.tobytes() != c.tobytes(), "other seed, other images"
    # a drew its 4 images in one batch (the default --batch_size 4), d one by one: each image has its own seed,
    # so the same images up to float rounding of batched kernels.
    d = np.asarray(sample(1, "d.png", "--batch_size", "1"), dtype=np.int16)
    assert np.abs(d - np.asarray(a, dtype=np.int16)).max() <= 2
    assert np.abs(d - np.asarray(c, dtype=np.int16)).max() > 20, "the comparison sees a change of seed"
    for scheduler in ("euler", "dpm"):
        assert sample(1, f"{scheduler}.png", "--scheduler", scheduler).size == a.size


def test_checkpoints_with_enums_pickled_by_name_resume_and_export(run, tmp_path):
    """Issue 21: the fixture's 3 → 2 rank resume converted optimizer files holding ZeroStageEnum by name (as CPython
    3.11.2 writes it) to universal, wrote that copy by name too and loaded it; the export tests read checkpoint-6,
    written by name; the same-rank resume is test_train_deepspeed's exact-resume test. Here: the files really
    were by name, and a by-name file whose getattr reaches a function's globals is refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from sd_ds.diffusers_export import export_checkpoint

    out, _, log = run
    assert "Convert DeepSpeed Checkpoint" in log and "resumed from" in log, log[-3000:]
    by_name = [out / "checkpoint-4" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    by_name += [out / ".checkpoint-4-universal" / "checkpoint-4" / "zero" / "optimizer_state.pt"]
    by_name += [out / "checkpoint-6" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    for path in by_name:
        assert GETATTR in pickled_globals(path), path

    copy = tmp_path / "checkpoint-6"
    shutil.copytree(out / "checkpoint-6", copy)
    target = copy / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(target, map_location="cpu", weights_only=False)  # our own file, trusted here
    state["optimizer_state_dict"]["sd_ds_test_gadget"] = _Call(getattr, _Call(getattr, LossScaler, "__init__"),
                                                               "__globals__")
    with enums_pickled_by_name():
        torch.save(state, target)
    with pytest.raises(Exception, match="Weights only load failed"):
        export_checkpoint(copy, tmp_path / "not_exported", base_model=out / "base_model")

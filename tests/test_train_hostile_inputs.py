"""Issue 30 through the trainer's real entry points (``python -m sd_ds.train`` for one rank, ``run.sh`` for two):
careless inputs get one clear line and a non-zero exit, and nothing is lost or written where it should not be.

- a DeepSpeed config that is YAML, malformed JSON, has an unknown key inside ``zero_optimization`` or a misspelled
  top-level key, or does not exist (--deepspeed or DS_CONFIG): one line naming the file, exit 2, before any model
  loads and before output_dir is created;
- a hub id while offline: one line (not a traceback), exit 2;
- weights that turn non-finite (a learning rate that overflows float32 at the second update): the run stops
  with one line naming the step, no checkpoint with non-finite weights is written, the last finite one stays
  the newest (2 ranks, EMA on: each rank checks its own ZeRO partition, the ranks agree);
- a symlinked checkpoint-N pointing outside output_dir: rotation removes the link, not its target; a save at
  step N replaces the link instead of writing through it (or crashing and losing the steps since the last one).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, free_port, subprocess_env, train_flags

NO_LAUNCHER = {"SD_DS_LAUNCHER_PID": "", "SD_DS_LAUNCHER_HOST": "", "SD_DS_FAULT": "", "SD_DS_FAULT_DIR": ""}


def _train(out: Path, assets: dict, *, nproc: int = 1, env: dict | None = None, timeout: float = 600,
           **flags) -> subprocess.CompletedProcess:
    args = train_flags(out, assets["shards"], assets["model"], dataloader_num_workers=0, **flags)
    cmd = ["bash", str(REPO_ROOT / "run.sh"), *args] if nproc > 1 else [sys.executable, "-m", "sd_ds.train", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env({**NO_LAUNCHER, "NPROC_PER_NODE": str(nproc),
                                              "MASTER_PORT": str(free_port()), **(env or {})}))


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]


def _complete(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                  key=lambda n: int(n.split("-")[1]))


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- DeepSpeed configs ---------------------------------------------------------------------------------------

DS_CONFIGS = {
    "yaml": ("ds.yaml", "zero_optimization:\n  stage: 2\nbf16:\n  enabled: true\n",
             "is not valid JSON: Expecting value at line 1, column 1; it looks like YAML"),
    "trailing_comma": ("ds.json", '{"zero_optimization": {"stage": 2,}\n}\n',
                       "is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 35"),
    "unknown_zero_key": ("ds.json", json.dumps({"zero_optimization": {"stage": 2, "overlap_com": True}}),
                         "'zero_optimization.overlap_com' is not a DeepSpeed setting (DeepSpeedZeroConfig does not "
                         "know it); did you mean 'overlap_comm'?"),
    "misspelled_top_level_key": ("ds.json", json.dumps({"zero_optimization": {"stage": 2},
                                                        "train_micro_batch_sise_per_gpu": 4}),
                                 "unknown key 'train_micro_batch_sise_per_gpu', which DeepSpeed would ignore: did you "
                                 "mean 'train_micro_batch_size_per_gpu'?"),
    "missing": ("ds.json", None, "not found (from --deepspeed or DS_CONFIG)"),
}


@pytest.mark.parametrize("case,how", [*((case, "--deepspeed") for case in DS_CONFIGS),
                                      ("yaml", "DS_CONFIG"), ("unknown_zero_key", "DS_CONFIG")])
def test_a_bad_deepspeed_config_is_one_line_naming_the_file_before_anything_loads(case, how, assets, tmp_path):
    name, text, expected = DS_CONFIGS[case]
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    out = tmp_path / "out"
    proc = (_train(out, assets, deepspeed=path) if how == "--deepspeed"
            else _train(out, assets, env={"DS_CONFIG": str(path)}))
    text_out = proc.stdout + proc.stderr
    assert proc.returncode == 2, text_out[-3000:]
    lines = _error_lines(proc)
    assert len(lines) == 1, text_out[-3000:]
    assert lines[0].startswith(f"sd_ds.train: error: DeepSpeed config {path}"
                               f"{'' if expected.startswith(('is', 'not')) else ':'} {expected}"), lines[0]
    assert "Traceback" not in text_out
    assert not out.exists(), "a refused DeepSpeed config still touched output_dir"


def test_a_hub_id_while_offline_is_one_line(assets, tmp_path):
    out = tmp_path / "out"
    proc = _train(out, assets, pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4",
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")})
    text_out = proc.stdout + proc.stderr
    assert proc.returncode == 2, text_out[-3000:]
    (line,) = _error_lines(proc)
    assert line.startswith("sd_ds.train: error: could not load the UNet from 'CompVis/stable-diffusion-v1-4/unet'")
    assert "python -m sd_ds.init" in line and "HF_HUB_OFFLINE=1" in line
    assert "Traceback" not in text_out
    assert sorted(p.name for p in out.iterdir()) == [".sd_ds.lock"], "only the run's lock may be written"


# --- non-finite weights --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_weights_that_turn_non_finite_stop_the_run_and_are_never_saved(assets, tmp_path):
    """lr 1e38 with a one-step warm-up: update 1 has lr 0 (checkpoint-1 is finite), update 2's Adam step of
    lr / (1 - beta1^2) = 5e38 overflows float32. No clipping and no skipped-steps limit, so only the save-time check
    can stop it. Two ranks through run.sh, with EMA: each rank checks its partitions, the ranks agree."""
    import torch

    from sd_ds.ema import consolidate_ema
    from tests.helpers import fp32_weights

    out = tmp_path / "out"
    proc = _train(out, assets, nproc=2, learning_rate=1e38, lr_scheduler_type="constant_with_warmup",
                  warmup_steps=1, max_grad_norm=-1, max_consecutive_skipped_steps=0, max_steps=4, save_steps=1,
                  per_device_train_batch_size=2, use_ema=True, ema_warmup="False", ema_decay=0.5)
    text_out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, None), text_out[-4000:]
    message = ("step 2: the weights and EMA weights are not finite (NaN/inf), so checkpoint-2 was not written; "
               "checkpoint-1 is the newest checkpoint: resume from it with a lower --learning_rate")
    assert message in text_out, text_out[-4000:]
    assert "Traceback" not in text_out, text_out[-4000:]
    assert " step 3 loss" not in text_out, "the run went on after refusing to save"
    assert _complete(out) == ["checkpoint-1"] and not (out / "checkpoint-2").exists()
    assert (out / "latest").read_text().strip() == "checkpoint-1"
    for weights in (fp32_weights(out / "checkpoint-1"), consolidate_ema(out / "checkpoint-1")):
        assert all(torch.isfinite(w).all() for w in weights.values())


# --- symlinked checkpoints -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_symlinked_checkpoints_lose_their_link_never_their_target(assets, tmp_path):
    """output_dir holds checkpoint-1 -> a complete-looking checkpoint elsewhere (rotated away at step 2: the link
    goes, its target stays) and checkpoint-4 -> someone's folder (the save at step 4 replaces the link: the run
    does not crash, does not write into the folder, and checkpoint-4 is a real, complete checkpoint)."""
    elsewhere = tmp_path / "elsewhere"
    old_checkpoint, folder = elsewhere / "old_checkpoint", elsewhere / "someones_folder"
    for target in (old_checkpoint, folder):
        target.mkdir(parents=True)
        (target / "keep_me.txt").write_text(f"{target.name}\n")
    (old_checkpoint / "trainer_state.json").write_text(json.dumps({"step": 1, "samples_seen": 4, "skipped_steps": 0,
                                                                   "world_size": 1}))
    before = _digests(elsewhere)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-1").symlink_to(old_checkpoint, target_is_directory=True)
    (out / "checkpoint-4").symlink_to(folder, target_is_directory=True)
    proc = _train(out, assets, max_steps=4, save_steps=2, save_total_limit=1, resume_from_checkpoint="none")
    text_out = proc.stdout + proc.stderr
    assert proc.returncode == 0, text_out[-4000:]
    assert f"{out / 'checkpoint-4'} is a symbolic link to {folder}; replacing it" in text_out, text_out[-4000:]
    assert _digests(elsewhere) == before, "a file outside output_dir was written or deleted"
    assert not (out / "checkpoint-1").is_symlink() and not (out / "checkpoint-1").exists()
    assert _complete(out) == ["checkpoint-4"] and not (out / "checkpoint-4").is_symlink()
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4
    assert (out / "latest").read_text().strip() == "checkpoint-4"

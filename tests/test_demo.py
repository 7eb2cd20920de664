"""The demo (`./run.sh` without arguments), shortened: every stage for real, a few steps each."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest
from PIL import Image

from sd_ds.demo import HELD_OUT, caption_of, training_combinations
from tests.helpers import REPO_ROOT, free_port, subprocess_env

pytestmark = pytest.mark.slow


def _demo(out, *extra: str) -> str:
    cmd = [sys.executable, "-m", "sd_ds.demo", "--output", str(out), "--train_steps", "6", "--vae_steps", "5",
           "--per_combination", "1", "--photo_crops", "2", "--micro_batch_size", "4", "--image_logging_steps", "3",
           "--sample_steps", "2", "--nproc", "2", *extra]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env({"MASTER_PORT": str(free_port())}),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout


def test_held_out_prompts_are_never_trained_on():
    trained = {caption_of(*c) for c in training_combinations()}
    assert not trained & {caption_of(*c) for c in HELD_OUT}
    assert len(trained) > 100


def test_short_demo_end_to_end_then_rerun_reuses_everything(tmp_path):
    out = tmp_path / "demo"
    log = _demo(out)
    # 1. the seed's data layout: train.filelist.list → filelist → gzip parts of caption \t _ \t base64
    list_line = (out / "data" / "train.filelist.list").read_text().split()
    assert list_line[1] == "1.0"
    parts = open(list_line[0]).read().split()
    with gzip.open(parts[0], "rt") as f:
        caption, underscore, b64 = f.readline().rstrip("\n").split("\t")
    assert underscore == "_" and len(b64) > 100 and caption
    # 2. converted by the converter
    stats = json.loads((out / "shards" / "stats.json").read_text())
    assert stats["successes"] > 120
    # 3. the tiny VAE was trained and its scaling factor set from the latents' spread
    vae_config = json.loads((out / "model" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215
    # 4. trained with EMA and image logging
    assert (out / "train" / "checkpoint-6" / "ema_rank_00001.pt").is_file()
    assert (out / "train" / "samples" / "step_00000006_validation_prompts.png").is_file()
    assert list((out / "train" / "runs").glob("events.out.tfevents.*"))
    # 5. exported, and a grid for the held-out prompts: 6 prompts x 4 images of 32 px
    assert (out / "export" / "model_index.json").is_file()
    assert Image.open(out / "heldout_prompts.png").size == (4 * 32, len(HELD_OUT) * 32)
    # 6. where things are
    assert "tensorboard --logdir" in log and str(out / "export") in log

    rerun = _demo(out)
    for stage in ("1/6", "2/6", "3/6", "4/6", "5/6"):
        assert any(line.startswith(f"[demo] {stage}") and "reusing" in line for line in rerun.splitlines()), (
            stage, rerun)

"""The demo (`./run.sh` without arguments), shortened: every stage for real, a few steps each."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys

import pytest
from PIL import Image

from sd_ds.shapes import (BACKGROUNDS, COLORS, HELD_OUT, SHAPES, caption_of, draw_shape, score_images,
                          trained_combinations_scored, training_combinations)
from tests.helpers import REPO_ROOT, free_port, subprocess_env


def _demo(out, *extra: str) -> str:
    cmd = [sys.executable, "-m", "sd_ds.demo", "--output", str(out), "--train_steps", "6", "--vae_steps", "5",
           "--per_combination", "1", "--photo_crops", "2", "--micro_batch_size", "4", "--image_logging_steps", "3",
           "--sample_steps", "2", "--score_seeds", "1", "--nproc", "2", "--validation_samples", "16",
           "--validation_steps", "3", *extra]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env({"MASTER_PORT": str(free_port())}),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout


def test_held_out_prompts_are_never_trained_on():
    trained = {caption_of(*c) for c in training_combinations()}
    assert not trained & {caption_of(*c) for c in HELD_OUT}
    assert len(trained) > 100


def _as_trained(img: Image.Image, rng: random.Random) -> Image.Image:
    """A drawn image as the trainer sees it (and the model makes it): resized and centre-cropped to 32 px."""
    from sd_ds.data import ImageTransform

    return Image.fromarray(ImageTransform(32, center_crop=True)(img, rng).permute(1, 2, 0).numpy())


def _other(color: str, palette: tuple[str, ...], avoid: str) -> str:
    return next(c for c in palette if c not in (color, avoid))


def test_scorer_reads_the_colours_and_shapes_of_drawn_images():
    rng = random.Random(0)
    combos = [c for c in list(HELD_OUT) + trained_combinations_scored() for _ in range(10)]
    drawn = [_as_trained(draw_shape(*c, rng=rng), rng) for c in combos]
    assert score_images(drawn, combos) == {"shape_color_pct": 100.0, "background_color_pct": 100.0,
                                           "both_colors_pct": 100.0, "shape_pct": 100.0, "images": len(combos)}
    # The same images judged against prompts with another shape colour, shape and background: all wrong.
    colors = tuple(COLORS)
    wrong = [(_other(c, colors, b), SHAPES[(SHAPES.index(s) + 1) % 3], _other(b, BACKGROUNDS, c)) for c, s, b in combos]
    assert all(w[0] != c[0] and w[1] != c[1] and w[2] != c[2] for w, c in zip(wrong, combos))
    assert score_images(drawn, wrong) == {"shape_color_pct": 0.0, "background_color_pct": 0.0,
                                          "both_colors_pct": 0.0, "shape_pct": 0.0, "images": len(combos)}
    # Each is judged on its own: right shape colour and shape, wrong background.
    half = [(c, s, w[2]) for (c, s, _), w in zip(combos, wrong)]
    assert score_images(drawn, half) == {"shape_color_pct": 100.0, "background_color_pct": 0.0,
                                         "both_colors_pct": 0.0, "shape_pct": 100.0, "images": len(combos)}


def test_scorer_reads_blurred_shapes():
    """Generated images are soft: a shape blurred the way a 4x-downsampled latent blurs it keeps its shape."""
    from PIL import ImageFilter

    rng = random.Random(1)
    combos = [(c, s, b) for c, s, b in trained_combinations_scored()]
    blurred = [_as_trained(draw_shape(*c, rng=rng), rng).filter(ImageFilter.GaussianBlur(1.0)) for c in combos]
    assert score_images(blurred, combos)["shape_pct"] == 100.0


def test_scorer_does_not_read_a_uniform_image_as_a_shape():
    """An image of one colour has the right background at most: no shape or shape colour can be credited."""
    combos = [("red", "circle", "blue"), ("yellow", "square", "black")]
    flat = [Image.new("RGB", (32, 32), COLORS[b]) for _, _, b in combos]
    assert score_images(flat, combos) == {"shape_color_pct": 0.0, "background_color_pct": 100.0,
                                          "both_colors_pct": 0.0, "shape_pct": 0.0, "images": 2}


def test_scored_trained_combinations_were_trained_on_and_cover_every_colour():
    scored = trained_combinations_scored()
    assert set(scored) <= set(training_combinations()) and len(set(scored)) == len(scored) == 12
    assert {c for c, _, _ in scored} == set(COLORS)


@pytest.mark.slow
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
    # 4. the training and held-out shards encoded once by that VAE; training read those latents
    for name, source in (("latents", "shards"), ("validation_latents", "validation_shards")):
        manifest = json.loads((out / name / "latents.json").read_text())
        assert manifest["resolution"] == 32 and manifest["samples"] == sum(
            json.loads((out / source / "sizes.json").read_text()).values())
    assert "--train_shards " + str(out / "latents") in log
    # 5. trained with EMA and image logging
    assert (out / "train" / "checkpoint-6" / "ema_rank_00001.pt").is_file()
    assert (out / "train" / "samples" / "step_00000006_validation_prompts.png").is_file()
    assert list((out / "train" / "runs").glob("events.out.tfevents.*"))
    # ... and the validation loss on held-out shards at steps 0, 3, 6 (EMA too), printed beside the score
    from sd_ds.demo import validation_curve

    curve = validation_curve(out / "train")
    assert [s for s, _ in curve["loss"]] == [0, 3, 6] and [s for s, _ in curve["loss_ema"]] == [0, 3, 6]
    assert "validation loss (16 held-out samples x 8 timesteps):" in log and "(step 6)" in log
    # 6. exported, and a grid for the held-out prompts: 6 prompts x 4 images of 32 px
    assert (out / "export" / "model_index.json").is_file()
    assert Image.open(out / "heldout_prompts.png").size == (4 * 32, len(HELD_OUT) * 32)
    # 7. the prompt-following score: printed, and written for 6 held-out x 1 and 12 trained x 1 images
    score = json.loads((out / "prompt_following.json").read_text())
    assert (score["held_out"]["images"], score["trained"]["images"]) == (len(HELD_OUT), 12)
    assert 0 <= score["held_out"]["both_colors_pct"] <= 100 and "held-out combinations:" in log
    assert score["seed_base"] >= 4 * len(HELD_OUT)  # never the grid's seeds
    # where things are
    assert "tensorboard --logdir" in log and str(out / "export") in log
    # the score alone, from the CLI, for the exported model: the same figures (same seeds)
    rescore = subprocess.run([sys.executable, "-m", "sd_ds.demo", "--score", "--output", str(out), "--score_seeds",
                              "1", "--sample_steps", "2"], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                             text=True, timeout=600)
    assert rescore.returncode == 0, rescore.stderr[-3000:]
    assert json.loads((out / "prompt_following.json").read_text())["held_out"] == score["held_out"]

    rerun = _demo(out)
    for stage in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7"):
        assert any(line.startswith(f"[demo] {stage}") and "reusing" in line for line in rerun.splitlines()), (
            stage, rerun)

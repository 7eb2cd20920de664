"""SD 2.x and SDXL trained by the real entry points on 2 CPU ranks (run.sh → deepspeed → sd_ds.train), tiny kinds of
the families' architectures, from shards of non-square photos: the conditioning the trainer feeds the UNet equals the
exported pipeline's encode_prompt of the batch's captions (dropped captions: the pipeline's unconditional
embedding), SDXL's time_ids carry each image's real original size, crop and target size in diffusers' (h, w) order,
the exports load in the family's pipeline and draw, an SDXL run resumes exactly, and SDXL trains on latent shards
with both its text encoders, each at its own learning rate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_ds.conditioning import CONDITIONING_DUMP_ENV
from sd_ds.data import DEBUG_KEYS_ENV
from tests.helpers import REPO_ROOT, photo_sample, run_sh, scalars, subprocess_env, train_flags
from tests.test_data_buckets import SHAPES, bucket_of, shaped_shards

try:  # the eval extra (requirements-eval.txt); a torchvision built for another torch fails with other errors
    import open_clip  # noqa: F401
    import pytorch_fid.inception  # noqa: F401
    EVAL_EXTRA = True
except Exception:  # noqa: BLE001
    EVAL_EXTRA = False
if EVAL_EXTRA:  # the CLIP-score assets of the evaluate tests
    from tests.test_evaluate import eval_assets  # noqa: F401
else:
    @pytest.fixture
    def eval_assets() -> dict:
        pytest.skip("the eval extra (requirements-eval.txt) is not usable here")

pytestmark = pytest.mark.slow

RES = 64  # tiny models: 16 px divisor; buckets 64x64, 80x48, 48x80 (and 128x32, 32x128) of about 64x64's area


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    import random

    from sd_ds.init import main as init_main

    root = tmp_path_factory.mktemp("families")
    # Every other sample as the converter (or img2dataset) leaves one it shrank: its JSON keeps the original size,
    # twice the stored one; the others have only the stored width and height.
    rng, extra, originals = random.Random(5), {}, {}
    for s, i in [(s, i) for s in range(3) for i in range(1, 8, 2)]:
        key = f"{s * 10_000 + i:09d}"
        width, height = SHAPES[(s + i) % 3]
        sample = photo_sample(key, rng, size=(width, height))
        sample["json"] = json.dumps({**json.loads(sample["json"]), "original_width": 2 * width,
                                     "original_height": 2 * height})
        extra[key], originals[key] = sample, (2 * height, 2 * width)
    sizes = shaped_shards(root / "shards", [8, 8, 8], extra=extra)
    for preset in ("tiny-sd2", "tiny-sdxl"):
        assert init_main(["--output_dir", str(root / preset), "--preset", preset, "--unet_weights"]) == 0
    return {"root": root, "shards": root / "shards", "sizes": sizes, "originals": originals,
            "sd2": root / "tiny-sd2", "sdxl": root / "tiny-sdxl"}


def original_hw(assets: dict, key: str) -> tuple[int, int]:
    if key in assets["originals"]:
        return assets["originals"][key]  # what the converter's JSON kept, not the stored size
    width, height = assets["sizes"][key]
    return height, width


def dumps(out: Path, rank: int) -> list[dict]:
    """The conditioning of each micro batch the rank trained on (SD_DS_CONDITIONING_DUMP), in order."""
    files = sorted((out / "conditioning").glob(f"rank{rank}.*.pt"), key=lambda p: int(p.name.split(".")[1]))
    assert files, out
    return [torch.load(f) for f in files]


def train(out: Path, data: Path, model: Path, *, nproc: int = 2, **flags) -> subprocess.CompletedProcess:
    base = {"resolution": RES, "bf16": "False", "per_device_train_batch_size": 2, "max_steps": 4, "save_steps": 2,
            "random_flip": "True", "center_crop": "False", "min_size": None, "caption_dropout_prob": 0.3}
    return run_sh(train_flags(out, data, model, **{**base, **flags}), nproc=nproc, timeout=1200,
                  extra_env={CONDITIONING_DUMP_ENV: str(out / "conditioning"), DEBUG_KEYS_ENV: str(out / "batches")})


def export(checkpoint: Path, out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, "-m", "sd_ds.export", str(checkpoint), str(out), *extra], cwd=REPO_ROOT,
                   env=subprocess_env(), check=True, capture_output=True, timeout=600)
    return out


def pipeline(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_conditioning_is_encode_prompt(dump: dict, pipe, sdxl: bool) -> None:
    """The trainer's conditioning of a micro batch against the pipeline's encode_prompt of its captions."""
    captions = dump["captions"]
    kept = [i for i, c in enumerate(captions) if c]
    dropped = [i for i, c in enumerate(captions) if not c]
    hidden = dump["encoder_hidden_states"]
    with torch.no_grad():
        if sdxl:
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                [captions[i] for i in kept] or [""], device="cpu", do_classifier_free_guidance=True)
            text_embeds = dump["text_embeds"]
            if kept:
                torch.testing.assert_close(text_embeds[kept], pooled, rtol=0, atol=1e-5)
            for i in dropped:  # SDXL's unconditional embedding: zeros (force_zeros_for_empty_prompt)
                assert torch.equal(text_embeds[i], negative_pooled[0]) and not text_embeds[i].any()
        else:
            embeds, negative = pipe.encode_prompt([captions[i] for i in kept] or [""], "cpu", 1, True)
    if kept:
        torch.testing.assert_close(hidden[kept], embeds, rtol=0, atol=1e-5)
    for i in dropped:
        torch.testing.assert_close(hidden[i], negative[0], rtol=0, atol=1e-5)


def test_sdxl_on_non_square_images_conditions_as_its_pipeline_and_resumes_exactly(assets, tmp_path):
    out = tmp_path / "sdxl"
    train(out, assets["shards"], assets["sdxl"], aspect_ratio_buckets="auto", use_ema=True,
          validation_shards=assets["shards"], validation_samples=4, validation_steps=2, image_logging_steps=4,
          num_inference_steps=2)
    pipe = pipeline(export(out / "checkpoint-4", tmp_path / "export", "--ema"))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    seen = {"dropped": 0, "json original": 0, "stored size": 0, "landscape": 0, "portrait": 0}
    for rank in (0, 1):
        for dump in dumps(out, rank):
            check_conditioning_is_encode_prompt(dump, pipe, sdxl=True)
            height, width = dump["latent_hw"]  # the bucket of the micro batch, in latent cells (the tiny VAE: 4x)
            for key, ids in zip(dump["keys"], dump["time_ids"].tolist()):
                oh, ow, top, left, th, tw = ids
                assert (oh, ow) == original_hw(assets, key), key  # (h, w): the source image's, before any resize
                assert (th, tw) == (4 * height, 4 * width)  # the crop: the batch's bucket
                assert (tw, th) == bucket_of(*assets["sizes"][key])
                assert 0 <= top and 0 <= left  # a crop inside the resized image
                seen["json original" if key in assets["originals"] else "stored size"] += 1
                seen["landscape"] += tw > th
                seen["portrait"] += th > tw
            seen["dropped"] += sum(1 for c in dump["captions"] if not c)
    assert all(seen.values()), seen  # both kinds of size record, both orientations, dropped captions
    tags = {t for t in ("validation/loss", "validation/loss_ema", "lr/unet")
            if scalars(out / "runs", t)}
    assert tags == {"validation/loss", "validation/loss_ema", "lr/unet"}
    assert (out / "samples" / "step_00000004_samples_guidance_7.5.png").is_file()
    # The export draws through StableDiffusionXLPipeline at a non-square size, through sd_ds.sample.
    png = tmp_path / "drawn.png"
    subprocess.run([sys.executable, "-m", "sd_ds.sample", "--model", str(tmp_path / "export"), "--prompt",
                    "a photo number 1", "--steps", "2", "--width", "80", "--height", "48", "--output", str(png)],
                   cwd=REPO_ROOT, env=subprocess_env(), check=True, capture_output=True, timeout=600)
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (80, 48)

    # Exact resume: the step-2 checkpoint continued to step 4 logs the uninterrupted run's losses.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("checkpoint-4", "runs", "conditioning", "batches"))
    train(resumed, assets["shards"], assets["sdxl"], aspect_ratio_buckets="auto", use_ema=True)
    full = dict(scalars(out / "runs", "train/loss"))
    assert dict(scalars(resumed / "runs", "train/loss")) == {3: full[3], 4: full[4]}


def test_sdxl_on_latent_shards_trains_both_text_encoders_at_their_own_rates(assets, eval_assets, tmp_path):
    latents = tmp_path / "latents"
    subprocess.run([sys.executable, "-m", "sd_ds.encode_latents", "--train_shards", str(assets["shards"]),
                    "--output_dir", str(latents), "--pretrained_model_name_or_path", str(assets["sdxl"]),
                    "--resolution", str(RES), "--aspect_ratio_buckets", "auto", "--flip_variants",
                    "--dataloader_num_workers", "0", "--disable_tqdm"], cwd=REPO_ROOT, env=subprocess_env(),
                   check=True, capture_output=True, timeout=900)
    out = tmp_path / "run"
    train(out, latents, assets["sdxl"], aspect_ratio_buckets="auto", max_steps=2, center_crop="True",
          train_text_encoder=True, text_encoder_learning_rate=3e-4, text_encoder_2_learning_rate=2e-4)
    lrs = {tag: scalars(out / "runs", f"lr/{tag}")[-1][1] for tag in ("unet", "text_encoder", "text_encoder_2")}
    assert lrs == pytest.approx({"unet": 1e-3, "text_encoder": 3e-4, "text_encoder_2": 2e-4})
    exported = export(out / "checkpoint-2", tmp_path / "export")
    from safetensors.torch import load_file

    for sub in ("text_encoder", "text_encoder_2"):  # trained: not the frozen copy the run started from
        before = load_file(assets["sdxl"] / sub / "model.safetensors")
        after = load_file(exported / sub / "model.safetensors")
        assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before), sub
    assert type(pipeline(exported)).__name__ == "StableDiffusionXLPipeline"
    # FID and CLIP score on the MLPerf protocol generate through it (sd_ds.evaluate): a tiny random CLIP here.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo number 1\na photo number 2\n")
    metrics = tmp_path / "metrics.json"
    subprocess.run([sys.executable, "-m", "sd_ds.evaluate", "--model", str(exported), "--prompts", str(prompts),
                    "--num_images", "2", "--steps", "2", "--width", "80", "--height", "48", "--metrics", "clip",
                    "--clip_model", str(eval_assets["clip_config"]), "--clip_pretrained",
                    str(eval_assets["clip_weights"]), "--output", str(metrics)],
                   cwd=REPO_ROOT, env=subprocess_env(), check=True, capture_output=True, timeout=600)
    result = json.loads(metrics.read_text())
    assert result["num_images"] == 2 and -1 <= result["clip_score"] <= 1


def test_sd2_trains_with_v_prediction_and_conditions_as_its_pipeline(assets, tmp_path):
    out = tmp_path / "sd2"
    proc = train(out, assets["shards"], assets["sd2"], resolution=32, max_steps=2)
    assert "v_prediction" in proc.stdout
    exported = export(out / "checkpoint-2", tmp_path / "export")
    assert json.loads((exported / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == \
        "v_prediction"
    pipe = pipeline(exported)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    for rank in (0, 1):
        for dump in dumps(out, rank):
            check_conditioning_is_encode_prompt(dump, pipe, sdxl=False)
    image = pipe("a photo number 1", num_inference_steps=2, height=32, width=48, output_type="np").images
    assert image.shape == (1, 32, 48, 3)

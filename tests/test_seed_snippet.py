"""The seed's inference snippet, as printed, on a checkpoint of a short 2-rank run with the default flags:
``UNet2DConditionModel.from_pretrained("OUT/checkpoint-N/unet")`` into a ``StableDiffusionPipeline`` (and the EMA
UNet from ``checkpoint-N/unet_ema``) — no export step in between."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_model, run_sh, train_flags, write_tiny_shards

pytestmark = pytest.mark.slow

STEPS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_snippet")
    model = make_tiny_model(root / "model")
    out = root / "out"
    # Defaults under test: --only_save_updated_model (not passed), EMA warm-up; image logging off with 0.
    run_sh(train_flags(out, write_tiny_shards(root / "shards", num_shards=2, samples_per_shard=16), model,
                       max_steps=STEPS, save_steps=STEPS, image_logging_steps=0, use_ema=True), nproc=2)
    return {"ckpt": out / f"checkpoint-{STEPS}", "model": model, "out": out}


def _snippet(unet_dir, model_dir):
    """The seed's snippet; only the base pipeline (here the run's model dir) and the image size differ."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, unet=unet)
    image = pipe("a red circle on a blue background", guidance_scale=7.5, num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    return unet, image


@pytest.mark.parametrize("subfolder,ema", [("unet", False), ("unet_ema", True)])
def test_seed_inference_snippet_loads_the_checkpoint_unet(run, subfolder, ema):
    from sd_ds.diffusers_export import consolidated_weights

    unet, image = _snippet(run["ckpt"] / subfolder, run["model"])
    assert image.size == (32, 32)
    # The loaded UNet is the trained one (the EMA one for unet_ema/), equal to the checkpoint's ZeRO state.
    expected = {k[len("unet."):]: v for k, v in consolidated_weights(run["ckpt"], ema=ema).items()
                if k.startswith("unet.")}
    loaded = unet.state_dict()
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert torch.equal(loaded[name].float(), value.float()), name


def test_ema_unet_differs_from_the_trained_unet(run):
    from diffusers import UNet2DConditionModel

    raw = UNet2DConditionModel.from_pretrained(run["ckpt"] / "unet").state_dict()
    ema = UNet2DConditionModel.from_pretrained(run["ckpt"] / "unet_ema").state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_image_logging_steps_zero_logs_no_images(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run["out"] / "runs"))
    acc.Reload()
    assert acc.Tags()["scalars"], "the run logged scalars"
    assert acc.Tags()["images"] == []
    assert not (run["out"] / "samples").exists()

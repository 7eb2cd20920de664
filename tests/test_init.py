"""`python -m sd_ds.init`: a complete tiny model offline, the SD v1 preset from a source, seeded init."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_ds.init import main
from sd_ds.models import CLIP_TOKENIZER_DIR
from sd_ds.presets import SD_V1_UNET, init_model

WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    assert main(["--output_dir", str(out), "--preset", "tiny", "--seed", "0"]) == 0
    return out


def weights(model_dir: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(model_dir / part / WEIGHTS[part])


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_layout_and_configs(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    for part in WEIGHTS:
        assert (tiny_dir / part / WEIGHTS[part]).is_file()
    unet = json.loads((tiny_dir / "unet" / "config.json").read_text())
    assert unet["sample_size"] == 8 and unet["layers_per_block"] == 1 and unet["in_channels"] == 4
    vae = json.loads((tiny_dir / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 4 and len(vae["block_out_channels"]) == 3  # 2 downsamplings: 32 px -> 8
    text = json.loads((tiny_dir / "text_encoder" / "config.json").read_text())
    assert (text["vocab_size"], text["max_position_embeddings"]) == (49408, 77)
    assert 64 <= text["hidden_size"] <= 128 and 2 <= text["num_hidden_layers"] <= 4
    assert text["hidden_size"] == unet["cross_attention_dim"]
    sched = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler"
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"],
            sched["prediction_type"]) == ("scaled_linear", 0.00085, 0.012, 1000, "epsilon")
    # vocab.json + merges.txt next to tokenizer.json so transformers 4's slow CLIPTokenizer reads it too.
    assert json.loads((tiny_dir / "tokenizer" / "vocab.json").read_text()) == json.loads(
        (CLIP_TOKENIZER_DIR / "vocab.json").read_text())
    assert (tiny_dir / "tokenizer" / "merges.txt").read_text() == (CLIP_TOKENIZER_DIR / "merges.txt").read_text()


def test_cli_prints_what_it_wrote(tmp_path, capsys):
    main(["--output_dir", str(tmp_path), "--preset", "tiny", "--seed", "1"])
    out = capsys.readouterr().out
    for part in ("unet:", "vae:", "text_encoder:", "tokenizer:", "scheduler:", "model_index.json"):
        assert part in out
    assert "seed 1" in out and str(tmp_path) in out


def test_pipeline_runs_on_the_tiny_model(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    result = pipe("a red circle on a blue background", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    assert result.images.shape == (1, 32, 32, 3)  # default size = unet sample_size 8 x vae factor 4
    assert torch.isfinite(torch.from_numpy(result.images)).all()
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_seeded_init_is_reproducible(tiny_dir, tmp_path):
    init_model(tmp_path / "again", preset="tiny", seed=0)
    init_model(tmp_path / "other", preset="tiny", seed=1)
    for part in WEIGHTS:
        assert same_weights(weights(tiny_dir, part), weights(tmp_path / "again", part)), part
        assert not same_weights(weights(tiny_dir, part), weights(tmp_path / "other", part)), part


def test_unet_config_only(tiny_dir, tmp_path):
    init_model(tmp_path, preset="tiny", seed=0, unet_config_only=True)
    assert [p.name for p in (tmp_path / "unet").iterdir()] == ["config.json"]
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["block_out_channels"] == json.loads(
        (tiny_dir / "unet" / "config.json").read_text())["block_out_channels"]


def test_sd_v1_preset_from_a_local_source(tiny_dir, tmp_path, capsys):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    out = tmp_path / "sd-v1"
    assert main(["--output_dir", str(out), "--preset", "sd-v1", "--source", str(tiny_dir), "--unet_config_only"]) == 0
    assert "cross_attention_dim 768" in capsys.readouterr().out  # tiny text encoder: warned, not silently wrong
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert (unet["cross_attention_dim"], unet["attention_head_dim"], unet["layers_per_block"],
            unet["sample_size"]) == (768, 8, 2, 64)
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    with init_empty_weights():  # meta tensors: count without allocating 3.4 GB
        model = UNet2DConditionModel.from_config(unet)
    assert sum(p.numel() for p in model.parameters()) == 859_520_964  # the SD v1.x UNet
    assert unet == {"_class_name": "UNet2DConditionModel", **SD_V1_UNET}
    # VAE, text encoder, tokenizer and scheduler are the source's.
    for part in ("vae", "text_encoder"):
        assert same_weights(weights(out, part), weights(tiny_dir, part)), part
    assert (out / "tokenizer" / "vocab.json").is_file()
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert json.loads((out / "model_index.json").read_text())["requires_safety_checker"] is False


@pytest.mark.parametrize("source", ["sd-ds-tests/no-such-model", "/nonexistent/source-model"])
def test_missing_source_is_a_clear_error(tmp_path, capsys, source):
    with pytest.raises(SystemExit) as e:
        main(["--output_dir", str(tmp_path), "--preset", "sd-v1", "--source", source, "--unet_config_only"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{source}/vae" in err and "python -m sd_ds.init" in err

"""Model families (SD v1, SD 2.x, SDXL): presets from a source folder, the tiny kinds, family checks, and the
prompt encoding that must equal the family's pipeline's encode_prompt."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_ds.conditioning import PromptEncoder
from sd_ds.data.buckets import model_divisor
from sd_ds.families import SD_V2, SDXL, FamilyMismatchError, family_of_unet
from sd_ds.init import main as init_main
from sd_ds.presets import PRESET_TABLE, unet_parameters

ROWS = ["a red circle on a blue background", "", "a photo of a ginger tabby cat sitting on a chair"]


def write_source(root: Path, family: str) -> Path:
    """A local diffusers folder of the family with 1-layer text encoders at the real widths (OpenCLIP-H 1024 for
    SD 2.x; CLIP-L 768 + OpenCLIP-bigG 1280 with its 1280-wide projection for SDXL): what init copies."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_ds.models import CLIP_TOKENIZER_DIR, load_tokenizer, save_tokenizer
    from sd_ds.presets import TINY_VAE

    small = dict(vocab_size=1000, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=77)
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    if family == "sdxl":
        CLIPTextModel(CLIPTextConfig(hidden_size=768, num_attention_heads=12, **small)).save_pretrained(
            root / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, num_attention_heads=20, projection_dim=1280,
                                                   **small)).save_pretrained(root / "text_encoder_2")
        EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
            root / "scheduler")
        index = {"_class_name": "StableDiffusionXLPipeline"}
    else:
        width = 1024 if family == "sd-v2" else 768
        CLIPTextModel(CLIPTextConfig(hidden_size=width, num_attention_heads=16, **small)).save_pretrained(
            root / "text_encoder")
        PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
            root / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline"}
    for sub in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        tokenizer = load_tokenizer(str(CLIP_TOKENIZER_DIR))
        tokenizer.pad_token = "!" if sub == "tokenizer_2" or family == "sd-v2" else tokenizer.pad_token
        save_tokenizer(tokenizer, root / sub)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {name: write_source(root / name, name) for name in ("sd-v1", "sd-v2", "sdxl")}


def same_file_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("preset, params", [("sd-v2", 865_910_724), ("sdxl", 2_567_463_684)])
def test_full_size_presets_from_a_local_source(sources, tmp_path, capsys, preset, params):
    out = tmp_path / preset
    assert init_main(["--output_dir", str(out), "--preset", preset, "--source", str(sources[preset])]) == 0
    printed = capsys.readouterr().out
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert [p.name for p in (out / "unet").iterdir()] == ["config.json"]  # the trainer initialises it from --seed
    assert unet_parameters(unet) == params and f"{params:,} parameters" in printed
    family = family_of_unet(unet)
    assert family.name == preset
    for sub in family.text_encoders:  # the source's frozen parts, unchanged
        assert same_file_weights(out / sub / "model.safetensors", sources[preset] / sub / "model.safetensors"), sub
    assert same_file_weights(out / "vae" / "diffusion_pytorch_model.safetensors",
                             sources[preset] / "vae" / "diffusion_pytorch_model.safetensors")
    for sub in family.tokenizers:
        assert (out / sub / "vocab.json").is_file()
    index = json.loads((out / "model_index.json").read_text())
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    if preset == "sd-v2":
        assert index["_class_name"] == "StableDiffusionPipeline" and sched["prediction_type"] == "v_prediction"
        assert (unet["cross_attention_dim"], unet["attention_head_dim"], unet["use_linear_projection"]) == (
            1024, [5, 10, 20, 20], True)
    else:
        assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
        assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
        assert (unet["transformer_layers_per_block"], unet["cross_attention_dim"], unet["addition_embed_type"]) == (
            [1, 2, 10], 2048, "text_time")
        assert sched["prediction_type"] == "epsilon"
        from sd_ds.models import load_tokenizer

        assert load_tokenizer(str(out), "tokenizer_2").pad_token == "!"
        assert load_tokenizer(str(out), "tokenizer").pad_token == "<|endoftext|>"


@pytest.mark.parametrize("preset, source, says", [
    ("sdxl", "sd-v2", "mixes model families"),           # an SD 2.x folder for SDXL
    ("sd-v2", "sdxl", "mixes model families"),           # an SDXL folder for SD 2.x
    ("sdxl", "sd-v2-unindexed", "there is no text_encoder_2"),  # no model_index.json: no second encoder
    ("sd-v2", "sd-v1", "768 = 768-wide embeddings"),      # CLIP-L does not fit SD 2.x's 1024-wide cross-attention
])
def test_a_source_of_another_family_stops_with_one_line(sources, tmp_path, capsys, preset, source, says):
    if source == "sd-v2-unindexed":
        import shutil

        shutil.copytree(sources["sd-v2"], tmp_path / source)
        (tmp_path / source / "model_index.json").unlink()
        sources = {source: tmp_path / source}
    with pytest.raises(SystemExit) as e:
        init_main(["--output_dir", str(tmp_path / "out"), "--preset", preset, "--source", str(sources[source])])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and str(sources[source]) in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out" / "text_encoder").exists()  # refused before copying anything heavy


def test_unet_config_file_with_the_sources_frozen_parts(sources, tmp_path):
    from sd_ds.presets import SD_V2_UNET

    wide = dict(SD_V2_UNET, block_out_channels=[384, 768, 1536, 1536])
    config = tmp_path / "wide_unet.json"
    config.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **wide}))
    out = tmp_path / "wide"
    assert init_main(["--output_dir", str(out), "--unet_config", str(config), "--source", str(sources["sd-v2"])]) == 0
    written = json.loads((out / "unet" / "config.json").read_text())
    assert written["block_out_channels"] == [384, 768, 1536, 1536] and family_of_unet(written) == SD_V2
    # an SDXL UNet config over an SD 2.x source: refused
    config.write_text(json.dumps(PRESET_TABLE["sdxl"].unet))
    with pytest.raises(SystemExit):
        init_main(["--output_dir", str(tmp_path / "bad"), "--unet_config", str(config), "--source",
                   str(sources["sd-v2"])])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    for preset in ("tiny-sd2", "tiny-sdxl"):
        assert init_main(["--output_dir", str(root / preset), "--preset", preset]) == 0
    return {"tiny-sd2": root / "tiny-sd2", "tiny-sdxl": root / "tiny-sdxl"}


def test_tiny_kinds_have_the_families_architecture(tiny):
    sd2 = json.loads((tiny["tiny-sd2"] / "unet" / "config.json").read_text())
    xl = json.loads((tiny["tiny-sdxl"] / "unet" / "config.json").read_text())
    assert family_of_unet(sd2) == SD_V2 and sd2["use_linear_projection"] and isinstance(sd2["attention_head_dim"], list)
    assert family_of_unet(xl) == SDXL and xl["addition_embed_type"] == "text_time"
    te2 = json.loads((tiny["tiny-sdxl"] / "text_encoder_2" / "config.json").read_text())
    te1 = json.loads((tiny["tiny-sdxl"] / "text_encoder" / "config.json").read_text())
    assert te1["hidden_size"] + te2["hidden_size"] == xl["cross_attention_dim"]
    assert xl["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * xl["addition_time_embed_dim"]
    vae = json.loads((tiny["tiny-sdxl"] / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025
    assert model_divisor(vae, xl) == 16 and model_divisor(vae, sd2) == 16
    sched = json.loads((tiny["tiny-sd2"] / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"


def pipeline(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl"])
def test_prompt_encoder_equals_the_pipelines_encode_prompt(tiny, preset):
    """The conditioning training computes for captions (one of them dropped to "") is what the family's own
    pipeline computes for those captions at inference: encode_prompt's prompt embeddings for the captions, its
    unconditional embedding for the dropped one (SDXL: zeros, force_zeros_for_empty_prompt)."""
    from sd_ds.models import load_components

    components = load_components(str(tiny[preset]))
    encoder = PromptEncoder.for_components(components, max_length=77)
    assert isinstance(encoder, PromptEncoder) and encoder.family.name == {"tiny-sd2": "sd-v2", "tiny-sdxl": "sdxl"}[preset]
    geometry = {"original_size": torch.tensor([[40, 64], [64, 40], [512, 1023]]),
                "crop_top_left": torch.tensor([[0, 5], [3, 0], [0, 0]]),
                "target_size": torch.tensor([[32, 48], [48, 32], [32, 32]])}
    pipe = pipeline(tiny[preset])
    with torch.no_grad():
        ours = encoder.encode(encoder.tokenize(ROWS), geometry)
        kept = [0, 2]
        if preset == "tiny-sdxl":
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt([ROWS[i] for i in kept], device="cpu",
                                                                           do_classifier_free_guidance=True)
            torch.testing.assert_close(ours.added_cond_kwargs["text_embeds"][kept], pooled, rtol=0, atol=1e-6)
            assert torch.equal(ours.added_cond_kwargs["text_embeds"][1], negative_pooled[0])  # zeros
            assert not negative.any() and ours.added_cond_kwargs["time_ids"].tolist() == [
                [40, 64, 0, 5, 32, 48], [64, 40, 3, 0, 48, 32], [512, 1023, 0, 0, 32, 32]]  # (h, w) order
        else:
            embeds, negative = pipe.encode_prompt([ROWS[i] for i in kept], "cpu", 1, True)
            assert ours.added_cond_kwargs is None
        torch.testing.assert_close(ours.encoder_hidden_states[kept], embeds, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.encoder_hidden_states[1], negative[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl"])
def test_tiny_kinds_draw_with_their_pipeline(tiny, preset):
    image = pipeline(tiny[preset])("a red circle", num_inference_steps=2, height=32, width=48, output_type="np",
                                    generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 48, 3) and torch.isfinite(torch.from_numpy(image)).all()


def test_a_mixed_model_folder_is_refused(tiny, tmp_path):
    import shutil

    from sd_ds.models import load_components

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny["tiny-sdxl"], mixed)
    shutil.rmtree(mixed / "text_encoder_2")
    shutil.copytree(tiny["tiny-sd2"] / "text_encoder", mixed / "text_encoder_2")  # no pooled projection
    with pytest.raises(FamilyMismatchError, match="projection_class_embeddings_input_dim"):
        load_components(str(mixed))
    shutil.rmtree(mixed / "unet")
    shutil.copytree(tiny["tiny-sd2"] / "unet", mixed / "unet")  # an SD 2.x UNet in an SDXL folder
    with pytest.raises(FamilyMismatchError, match="mixes model families"):
        load_components(str(mixed))

"""Precomputed text conditioning: `python -m sd_ds.encode_latents --text_embeddings` stores each sample's
PromptEncoder output and the empty prompt's; the loader hands them out (the empty prompt's for a dropped caption);
the trainer runs no text encoder on them and refuses shards made by other text encoders, or --train_text_encoder.

Tiny models (SD v1 and SDXL kinds), 32 px, CPU. Stored in fp16, so "equal" is equal to fp16 rounding: each value
within 2^-11 of its magnitude (half an fp16 ulp) plus the smallest normal's worth.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from sd_ds.conditioning import EMPTY_CAPTION_KEY, GEOMETRY_KEYS, TOKEN_KEYS, PromptEncoder
from sd_ds.config import DataConfig
from sd_ds.data import build_train_loader
from sd_ds.data.manifest import (EMPTY_PROMPT, LatentCacheMismatch, check_text_embeddings, read_empty_prompt,
                                 weights_fingerprint)
from sd_ds.diffusers_export import BASE_MODEL_DIR
from sd_ds.encode_latents import main as encode_main
from sd_ds.models import load_components
from tests.helpers import (REPO_ROOT, fp32_weights, free_port, run_sh, scalars, subprocess_env, train_flags,
                           write_photo_shards)

RES = 32


def init_model(out: Path, preset: str) -> Path:
    if not (out / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "sd_ds.init", "--output_dir", str(out), "--preset", preset, "--seed",
                        "0"], check=True, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True)
    return out


def encode(images: Path, out: Path, model: Path, *extra: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = encode_main(["--train_shards", str(images), "--output_dir", str(out), "--pretrained_model_name_or_path",
                            str(model), "--resolution", str(RES), "--batch_size", "3", "--dataloader_num_workers", "0",
                            "--disable_tqdm", *extra])
    finally:
        torch.set_num_threads(threads)
    assert code == 0


def fp16_close(stored: torch.Tensor, reference: torch.Tensor) -> bool:
    stored, reference = stored.float(), reference.float()
    return bool(((stored - reference).abs() <= reference.abs() * 2 ** -11 + 2 ** -14).all())


def batches(shards: Path, prompt_encoder: PromptEncoder, n: int, **data) -> list[dict]:
    config = DataConfig(train_shards=[str(shards)], **{
        "resolution": RES, "center_crop": True, "random_flip": False, "caption_dropout_prob": 0.0, "shuffle_block": 8,
        "dataloader_num_workers": 0, **data})
    loader = build_train_loader(config, tokenize=prompt_encoder.tokenize, micro_batch_size=4, seed=3)
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("images")
    write_photo_shards(out, [6, 6])
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_stored_conditioning_is_the_prompt_encoders_and_a_dropped_caption_gets_the_empty_prompts(
        tmp_path, images, preset):
    model = init_model(tmp_path / "model", preset)
    latents = tmp_path / "latents"
    encode(images, latents, model, "--text_embeddings")
    components = load_components(str(model))
    family = components.family
    prompt_encoder = PromptEncoder.for_components(components, 77)

    manifest = json.loads((latents / "latents.json").read_text())
    text = manifest["text_embeddings"]
    shapes = {"prompt_embeds": [77, sum(e.config.hidden_size for e in components.text_encoders)]}
    if family.is_sdxl:
        shapes["pooled_prompt_embeds"] = [components.text_encoder_2.config.projection_dim]
    assert text["family"] == family.name and text["max_length"] == 77 and text["shapes"] == shapes
    assert text["bytes_per_sample"] == sum(2 * torch.Size(s).numel() for s in shapes.values())  # fp16
    for sub, encoder in zip(family.text_encoders, components.text_encoders):
        assert text["text_encoders"][sub]["weights_sha256"] == weights_fingerprint(encoder, sub)
    assert set(text["tokenizers"]) == set(family.tokenizers)

    # The batch's stored conditioning is PromptEncoder.encode of its captions (fp16-rounded), time_ids built alike.
    for batch in batches(latents, prompt_encoder, 3):
        tokens = {k: batch[k] for k in (*TOKEN_KEYS, EMPTY_CAPTION_KEY) if k in batch}
        geometry = {k: batch[k] for k in GEOMETRY_KEYS}
        reference = prompt_encoder.encode(tokens, geometry)
        stored = prompt_encoder.stored({k: batch[k] for k in shapes}, geometry)
        assert stored.encoder_hidden_states.dtype == torch.float16 and all(c != "" for c in batch["captions"])
        assert fp16_close(stored.encoder_hidden_states, reference.encoder_hidden_states)
        assert (reference.added_cond_kwargs is None) == (stored.added_cond_kwargs is None) == (not family.is_sdxl)
        if family.is_sdxl:
            assert fp16_close(stored.added_cond_kwargs["text_embeds"], reference.added_cond_kwargs["text_embeds"])
            assert torch.equal(stored.added_cond_kwargs["time_ids"], reference.added_cond_kwargs["time_ids"])

    # Caption dropout: the dropped rows get the stored empty prompt (SDXL: zeros, force_zeros_for_empty_prompt),
    # which is PromptEncoder.encode of "" (fp16-rounded); the others keep their own.
    empty = read_empty_prompt(str(latents), manifest)
    assert set(empty) == set(shapes) and (latents / EMPTY_PROMPT).is_file()
    reference_empty = prompt_encoder.encode(prompt_encoder.tokenize([""]), {
        k: torch.zeros(1, 2, dtype=torch.int64) for k in GEOMETRY_KEYS})
    assert fp16_close(empty["prompt_embeds"], reference_empty.encoder_hidden_states[0])
    if family.is_sdxl:
        assert not empty["prompt_embeds"].any() and not empty["pooled_prompt_embeds"].any()
    else:
        assert empty["prompt_embeds"].abs().sum() > 0
    undropped = {key: row for batch in batches(latents, prompt_encoder, 3)
                 for key, row in zip(batch["keys"], batch["prompt_embeds"])}
    dropped = kept = 0
    for batch in batches(latents, prompt_encoder, 3, caption_dropout_prob=0.5):
        for i, (key, caption) in enumerate(zip(batch["keys"], batch["captions"])):
            expected = empty if caption == "" else {"prompt_embeds": undropped[key]}
            for name, value in expected.items():
                assert torch.equal(batch[name][i], value), (key, caption, name)
            dropped, kept = dropped + (caption == ""), kept + (caption != "")
    assert dropped and kept


def test_a_run_with_other_text_encoders_or_training_them_is_refused(tmp_path, images):
    model = init_model(tmp_path / "model", "tiny")
    latents = tmp_path / "latents"
    encode(images, latents, model, "--text_embeddings")
    manifest = json.loads((latents / "latents.json").read_text())
    components = load_components(str(model))

    def check(encoder: torch.nn.Module = components.text_encoder, *, max_length: int = 77,
              train_text_encoder: bool = False) -> None:
        check_text_embeddings(manifest, family="sd-v1", tokenizers={"tokenizer": components.tokenizer},
                              text_encoders={"text_encoder": encoder}, max_length=max_length,
                              train_text_encoder=train_text_encoder, where="latent shards (X)")

    check()  # the encoders it was made with
    with pytest.raises(LatentCacheMismatch, match=r"--train_text_encoder would train encoders the run never runs"):
        check(train_text_encoder=True)
    with pytest.raises(LatentCacheMismatch, match="captions of 77 tokens, this run uses --model_max_length 64"):
        check(max_length=64)
    other = load_components(str(model)).text_encoder
    with torch.no_grad():
        other.final_layer_norm.bias += 0.01
    with pytest.raises(LatentCacheMismatch, match=r"^latent shards \(X\) were encoded with other text_encoder weights"):
        check(other)
    other.config.hidden_act = "gelu"
    with pytest.raises(LatentCacheMismatch, match="another text_encoder config .differs in hidden_act"):
        check(other)


def losses(out: Path) -> list[float]:
    return [v for _, v in scalars(out / "runs", "train/loss")]


@pytest.mark.slow
def test_training_on_stored_text_embeddings_gives_the_run_of_the_text_encoder(tmp_path):
    """Two ranks, fp32, caption dropout on: the same run on latent shards with and without stored text conditioning
    gives the same losses and weights, up to the fp16 storage of the embeddings; a run whose text encoder differs,
    or that would train it, stops in one line (exit 2) before anything is written."""
    STEPS = 4
    images = tmp_path / "images"
    write_photo_shards(images, [8, 8, 8, 8])
    model = init_model(tmp_path / "model", "tiny")
    plain, with_text = tmp_path / "latents", tmp_path / "latents_text"
    encode(images, plain, model)
    encode(images, with_text, model, "--text_embeddings")

    def flags(out: Path, shards: Path, **kw) -> list[str]:
        return train_flags(out, shards, model, **{"bf16": "False", "max_steps": STEPS, "save_steps": STEPS,
                                                  "caption_dropout_prob": 0.5, **kw})

    # The control: the same shards with another stored empty prompt (zeros): the run reads what is stored, so the
    # dropped captions' conditioning, and with it the weights, differ (were the text encoder run, nothing would).
    tampered = tmp_path / "latents_tampered"
    shutil.copytree(with_text, tampered)
    empty = read_empty_prompt(str(tampered), json.loads((tampered / "latents.json").read_text()))
    (tampered / EMPTY_PROMPT).write_bytes(save({k: torch.zeros_like(v) for k, v in empty.items()}))
    for name, shards in (("plain", plain), ("text", with_text), ("tampered", tampered)):
        run_sh(flags(tmp_path / name, shards), nproc=2)
    reference, stored = losses(tmp_path / "plain"), losses(tmp_path / "text")
    assert len(reference) == len(stored) == STEPS
    assert stored == pytest.approx(reference, rel=1e-5)  # measured: equal in fp32
    # The tiny UNet's zeroed output projections keep the conditioning's effect on the first losses small (~1e-6:
    # too little for them to tell the control apart), so the weights decide. Measured: the stored run's are
    # 1.5e-4 (L2) from the reference run's, the control's 0.32.
    weights = {name: fp32_weights(tmp_path / name / f"checkpoint-{STEPS}") for name in ("plain", "text", "tampered")}

    def distance(a: str, b: str) -> float:
        return sum(float(((weights[a][k] - weights[b][k]).double() ** 2).sum()) for k in weights[a]) ** 0.5

    assert distance("text", "plain") < 0.01 * distance("tampered", "plain"), (distance("text", "plain"),
                                                                               distance("tampered", "plain"))

    other = load_components(str(model)).text_encoder
    with torch.no_grad():
        other.final_layer_norm.bias += 0.01
    other.save_pretrained(tmp_path / "other_text_encoder")
    for out, extra, message in (
            (tmp_path / "other", {"text_encoder_name_or_path": tmp_path / "other_text_encoder"},
             "were encoded with other text_encoder weights"),
            (tmp_path / "trained", {"train_text_encoder": "True"}, "--train_text_encoder would train encoders")):
        proc = subprocess.run([sys.executable, "-m", "sd_ds.train", *flags(out, with_text, **extra)], cwd=REPO_ROOT,
                              env=subprocess_env({"MASTER_PORT": str(free_port())}), capture_output=True, text=True,
                              timeout=600)
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and not list(out.glob("checkpoint-*"))
        assert not (out / BASE_MODEL_DIR).exists()  # refused before the run's base components are written

"""The latent-shard manifest: one home for what ``python -m sd_ds.encode_latents`` writes and the trainer checks.

A latent directory holds ``latents.json`` (written when every shard is encoded): the settings that fix the cached
moments (resolution, crop, dtype, shape, flip variants, the VAE's config, weight fingerprint and scaling factor)
and the sources with their weights and sample counts. The directory may be local or any URL (s3://, gs://,
http(s)://): it is read through sd_ds.fileio.

Encoded with ``--text_embeddings``, it also holds each sample's text conditioning (the family's prompt encoding,
``sd_ds.conditioning.PromptEncoder``) and, once, the empty prompt's (``empty_prompt.safetensors``, what caption
dropout gives); the manifest's ``text_embeddings`` records the text encoders (config and weight fingerprint),
tokenizers and token length they were made with, which a run must share (``check_text_embeddings``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from sd_ds import fileio
from sd_ds.data.checks import MetadataError, check_latent_manifest_fields, read_metadata_json

if TYPE_CHECKING:
    from sd_ds.models import Components
    from diffusers import AutoencoderKL

FORMAT = "sd-ds latent shards"
VERSION = 1
LATENT_MANIFEST = "latents.json"  # in the output directory, written when every shard is encoded
LATENT_WORK_DIR = ".encode"       # the encoder's plan and per-shard records while it runs
MOMENTS, MOMENTS_FLIPPED = "moments", "moments_flip"  # sample members: raw little-endian [2C, R/f, R/f]
# Sample members: each variant's micro-conditioning geometry, six little-endian int32 (sd_ds.data.transforms).
MICROCOND, MICROCOND_FLIPPED = "microcond", "microcond_flip"
# --text_embeddings: sample members (raw little-endian, the manifest's dtype) and batch keys of the stored text
# conditioning: the UNet's encoder_hidden_states [L, D] and SDXL's pooled projection [P] (its text_embeds).
PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS = "prompt_embeds", "pooled_prompt_embeds"
EMPTY_PROMPT = "empty_prompt.safetensors"  # beside latents.json: the empty prompt's members, [L, D] and [P]
LATENT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# What a cache fixes and every latent directory of one run must share.
LATENT_COMPATIBLE = ("resolution", "crop", "dtype", "shape", "flip_variants", "vae", "buckets", "text_embeddings")


class LatentCacheMismatch(MetadataError):
    """Latent shards that this run cannot train on as they are (their text encoders are not this run's, or the
    run would train the text encoders the shards replace): one line, exit status 2."""


def latent_manifest_in_dir(directory: Union[str, Path]) -> Optional[dict]:
    """The manifest of a latent-shard directory (local or URL); None for a directory that is not one; an error
    for a local one whose encoding has not finished."""
    path = fileio.join(directory, LATENT_MANIFEST)
    manifest = read_metadata_json(path)
    if manifest is not None:
        check_latent_manifest_fields(manifest, path)  # dtype, shape, sources: what the loader relies on
        return manifest
    if not fileio.is_url(directory):
        work = Path(directory) / LATENT_WORK_DIR
        if (work / "plan.json").is_file():
            done = len(list(work.glob("*.tar.json")))
            raise ValueError(f"{directory}: latent encoding has not finished ({done} shard(s) done, no "
                             f"{LATENT_MANIFEST}); run the same `python -m sd_ds.encode_latents` command again to "
                             f"finish it")
    return None


# --- the VAE record: what a manifest stores about the VAE, and the check against this run's --------------

def vae_fingerprint(vae: "AutoencoderKL") -> str:
    """sha256 over the VAE's state dict (names, shapes, float32 values) as loaded: call it before casting."""
    return weights_fingerprint(vae, "the VAE")


def weights_fingerprint(module: torch.nn.Module, what: str) -> str:
    """sha256 over a module's state dict (names, shapes, float32 values) as loaded: call it before casting."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ValueError(f"weights_fingerprint: {name} is {tensor.dtype}; fingerprint {what} as loaded (float32), "
                             f"before it is cast to the training dtype")
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _vae_config(vae: "AutoencoderKL") -> dict:
    """The config that shapes the latents: diffusers' bookkeeping (``_...``) and scaling_factor left out."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_") and k != "scaling_factor"}
    return json.loads(json.dumps(config, default=str))  # tuples → lists, as read back from JSON


def vae_record(vae: "AutoencoderKL") -> dict:
    return {"config": _vae_config(vae), "weights_sha256": vae_fingerprint(vae),
            "scaling_factor": float(vae.config.scaling_factor)}


def check_latent_manifest(manifest: dict, vae: "AutoencoderKL", resolution: int, *,
                          micro_conditioning: bool = False) -> None:
    """A clear error (MetadataError: one line) when latent shards were made otherwise than this run would make its
    latents: another resolution, VAE config, VAE weights (another family's VAE among them) or scaling_factor; for
    SDXL (``micro_conditioning``), shards that do not store each variant's original size and crop. Call with the
    VAE as loaded (float32, before casting)."""
    where = f"latent shards ({manifest.get('output_dir', 'the --train_shards directory')})"
    fix = ("encode the image shards again with this run's VAE and --resolution (python -m sd_ds.encode_latents), "
           "or train with the VAE and resolution the shards were made with")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise MetadataError(f"{where}: format {manifest.get('format')!r} version {manifest.get('version')!r}, this "
                         f"trainer reads {FORMAT!r} version {VERSION}; encode them again")
    if manifest["resolution"] != resolution:
        raise MetadataError(f"{where} were encoded at --resolution {manifest['resolution']}, this run trains at "
                         f"{resolution}: {fix}")
    if micro_conditioning and MICROCOND not in (manifest.get("members") or {}):
        raise MetadataError(f"{where} do not store each image's original size and crop (encoded by an earlier "
                            "sd-ds), which SDXL conditions on: encode them again (python -m sd_ds.encode_latents)")
    saved, now = manifest["vae"], vae_record(vae)
    if saved["scaling_factor"] != now["scaling_factor"]:
        raise MetadataError(f"{where} were encoded for a VAE with scaling_factor {saved['scaling_factor']}, this run's "
                         f"VAE has {now['scaling_factor']}: {fix}")
    if saved["config"] != now["config"]:
        differ = sorted(k for k in set(saved["config"]) | set(now["config"])
                        if saved["config"].get(k) != now["config"].get(k))
        raise MetadataError(f"{where} were encoded with another VAE config (differs in {', '.join(differ)}): {fix}")
    if saved["weights_sha256"] != now["weights_sha256"]:
        raise MetadataError(f"{where} were encoded with other VAE weights (sha256 {saved['weights_sha256'][:12]}..., "
                         f"this run's VAE {now['weights_sha256'][:12]}...): {fix}")


# --- the text-embeddings record: what conditioning the shards store, and the check against this run's ----------

# Config keys that say nothing about what an encoder computes (bookkeeping, the dtype it was saved in).
_CONFIG_BOOKKEEPING = ("transformers_version", "torch_dtype", "dtype", "architectures")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over what decides a tokenizer's ids: its model (BPE vocabulary and merges), normalizer, pre-tokenizer,
    post-processor and added tokens (a fast tokenizer's; padding and truncation are left out: each call sets them),
    else its vocabulary; and its pad token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        content = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "post_processor", "added_tokens")}
    else:
        content = {"vocab": tokenizer.get_vocab()}
    content["pad_token"] = str(tokenizer.pad_token)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def text_encoders_record(family: str, tokenizers: dict[str, Any], text_encoders: dict[str, torch.nn.Module],
                         max_length: int) -> dict:
    """The text side a stored conditioning was made with: the family, the token length, each tokenizer (pad token,
    fingerprint) and each text encoder (config, weight fingerprint), by subfolder. Call with the encoders as loaded
    (float32, before casting)."""
    def config(encoder: torch.nn.Module) -> dict:
        c = {k: v for k, v in encoder.config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_BOOKKEEPING}
        return json.loads(json.dumps(c, sort_keys=True, default=str))

    return {"family": family, "max_length": int(max_length),
            "tokenizers": {sub: {"pad_token": str(tok.pad_token), "sha256": tokenizer_fingerprint(tok)}
                           for sub, tok in tokenizers.items()},
            "text_encoders": {sub: {"config": config(enc), "weights_sha256": weights_fingerprint(enc, sub)}
                              for sub, enc in text_encoders.items()}}


def check_text_embeddings(manifest: dict, *, family: str, tokenizers: dict[str, Any],
                          text_encoders: dict[str, torch.nn.Module], max_length: int, train_text_encoder: bool,
                          where: str) -> None:
    """Latent shards that store text conditioning (``--text_embeddings``) against this run: a run that trains the
    text encoders, or whose family, token length, tokenizers or text encoders (config, weights) differ from those
    the shards were encoded with, is refused (``LatentCacheMismatch``, one line naming the first difference).
    Call with the encoders as loaded (float32, before casting). Shards without stored text pass."""
    saved = manifest.get("text_embeddings")
    if not saved:
        return
    fix = ("encode the shards again with this run's model (python -m sd_ds.encode_latents --text_embeddings), or "
           "train with the text encoder(s) they were encoded with")
    if train_text_encoder:
        raise LatentCacheMismatch(
            f"{where} store the text encoder(s)' outputs (encoded with --text_embeddings): --train_text_encoder "
            "would train encoders the run never runs. Train on latent shards encoded without --text_embeddings, "
            "or drop --train_text_encoder")
    now = text_encoders_record(family, tokenizers, text_encoders, max_length)
    if saved["family"] != now["family"]:
        raise LatentCacheMismatch(f"{where} store {saved['family']} text conditioning, this run's model is "
                                  f"{now['family']}: {fix}")
    if saved["max_length"] != now["max_length"]:
        raise LatentCacheMismatch(f"{where} were encoded with captions of {saved['max_length']} tokens, this run "
                                  f"uses --model_max_length {now['max_length']}: {fix}")
    for sub, tok in now["tokenizers"].items():
        old = saved["tokenizers"].get(sub)
        if old != tok:
            what = (f"pad token {old['pad_token']!r}, this run's {tok['pad_token']!r}" if old and old["pad_token"] !=
                    tok["pad_token"] else "another vocabulary or merges" if old else "no such tokenizer")
            raise LatentCacheMismatch(f"{where} were encoded with another {sub} ({what}): {fix}")
    for sub, enc in now["text_encoders"].items():
        old = saved["text_encoders"].get(sub)
        if old is None:
            raise LatentCacheMismatch(f"{where} were encoded without a {sub}: {fix}")
        if old["config"] != enc["config"]:
            differ = sorted(k for k in set(old["config"]) | set(enc["config"])
                            if old["config"].get(k) != enc["config"].get(k))
            raise LatentCacheMismatch(f"{where} were encoded with another {sub} config (differs in "
                                      f"{', '.join(differ)}): {fix}")
        if old["weights_sha256"] != enc["weights_sha256"]:
            raise LatentCacheMismatch(f"{where} were encoded with other {sub} weights (sha256 "
                                      f"{old['weights_sha256'][:12]}..., this run's {enc['weights_sha256'][:12]}...): "
                                      f"{fix}")


def read_empty_prompt(directory: Union[str, Path], manifest: dict) -> dict[str, torch.Tensor]:
    """The stored empty prompt's conditioning members ({prompt_embeds: [L, D], pooled_prompt_embeds: [P] for
    SDXL}, the manifest's dtype) from beside latents.json: what a dropped caption is conditioned on."""
    from safetensors.torch import load

    text = manifest["text_embeddings"]
    path = fileio.join(directory, text["empty_prompt"])
    try:
        with fileio.open_file(path, "rb") as f:
            tensors = load(f.read())
    except (OSError, ValueError, RuntimeError) as e:  # missing, unreadable, not safetensors
        raise MetadataError(f"{path}: the empty prompt's stored conditioning cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); encode the shards again") from None
    dtype = LATENT_DTYPES[manifest["dtype"]]
    shapes = {k: list(v) for k, v in text["shapes"].items()}
    got = {k: list(v.shape) for k, v in tensors.items()}
    if got != shapes or any(v.dtype != dtype for v in tensors.values()):
        raise MetadataError(f"{path} holds {got} ({', '.join(sorted({str(v.dtype) for v in tensors.values()}))}), "
                            f"the manifest says {shapes} ({manifest['dtype']}): encode the shards again")
    return tensors


def check_latent_cache(manifest: dict, components: "Components", *, resolution: int, max_length: int,
                       train_text_encoder: bool, where: str) -> None:
    """Latent shards against this run's model, before anything is written (MetadataError: one line): the VAE and
    resolution they were encoded with (``check_latent_manifest``; SDXL also needs each image's micro-conditioning)
    and, when they store text conditioning, the family's tokenizers and text encoders (``check_text_embeddings``).
    Call with the components as loaded (float32). The text encoders stay loaded all the same: the export's base
    components, the validation loss, image logging and FID/CLIP prompts use them."""
    family = components.family
    check_latent_manifest(manifest, components.vae, resolution, micro_conditioning=family.micro_conditioning)
    check_text_embeddings(manifest, family=family.name, tokenizers=dict(zip(family.tokenizers, components.tokenizers)),
                          text_encoders=dict(zip(family.text_encoders, components.text_encoders)),
                          max_length=max_length, train_text_encoder=train_text_encoder, where=where)

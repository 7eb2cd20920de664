"""The latent-shard manifest: one home for what ``python -m sd_ds.encode_latents`` writes and the trainer checks.

A latent directory holds ``latents.json`` (written when every shard is encoded): the settings that fix the cached
moments (resolution, crop, dtype, shape, flip variants, the VAE's config, weight fingerprint and scaling factor)
and the sources with their weights and sample counts. The directory may be local or any URL (s3://, gs://,
http(s)://): it is read through sd_ds.fileio.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch

from sd_ds import fileio
from sd_ds.data.checks import MetadataError, check_latent_manifest_fields, read_metadata_json

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

FORMAT = "sd-ds latent shards"
VERSION = 1
LATENT_MANIFEST = "latents.json"  # in the output directory, written when every shard is encoded
LATENT_WORK_DIR = ".encode"       # the encoder's plan and per-shard records while it runs
MOMENTS, MOMENTS_FLIPPED = "moments", "moments_flip"  # sample members: raw little-endian [2C, R/f, R/f]
# Sample members: each variant's micro-conditioning geometry, six little-endian int32 (sd_ds.data.transforms).
MICROCOND, MICROCOND_FLIPPED = "microcond", "microcond_flip"
LATENT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# What a cache fixes and every latent directory of one run must share.
LATENT_COMPATIBLE = ("resolution", "crop", "dtype", "shape", "flip_variants", "vae", "buckets")


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
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise ValueError(f"vae_fingerprint: {name} is {tensor.dtype}; fingerprint the VAE as loaded (float32), "
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

"""Models in Hugging Face diffusers format: a checkpoint exported to a complete pipeline folder, the trained
models written inside each checkpoint (``--only_save_updated_model``), and the frozen components a run keeps in
``output_dir/base_model/`` so that an export never depends on the original model path.

The UNet weights of an export are DeepSpeed's own fp32 consolidation of the ZeRO partitions (``zero_to_fp32``),
or the consolidated EMA partitions; nothing here starts torch.distributed, so an export runs on a laptop.
``python -m sd_ds.export`` is the command over it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from sd_ds.checkpoint import safe_loading
from sd_ds.ema import consolidate_ema
from sd_ds.families import family_of_unet
from sd_ds.fileio import replaced_directory
from sd_ds.models import save_tokenizer
from sd_ds.presets import TEXT_ENCODER_CLASSES

BASE_MODEL_DIR = "base_model"
EXPORT_INFO = "sd_ds_export.json"
# What an export folder holds: diffusers' pipeline folders of every family (SDXL adds the _2 encoder and tokenizer;
# the safety checker and feature extractor are never written by sd-ds but are a diffusers folder's own) and
# EXPORT_INFO.
EXPORT_ENTRIES = frozenset({"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                            "tokenizer_2", "scheduler", "safety_checker", "feature_extractor", "image_encoder",
                            EXPORT_INFO})


class ExportTargetError(ValueError):
    """The export's output folder is not one it may replace (someone's files, a link); the message says why."""


def check_export_target(output_dir: str | Path, *, overwrite: bool = False) -> None:
    """Refuse an output folder that is not this exporter's to replace, before any work: a symbolic link (the
    export would land wherever it points), something that is not a directory, or (unless ``overwrite``) a
    non-empty directory that is not an earlier sd-ds export. An earlier export is recognised by its EXPORT_INFO
    and holds nothing an export does not write (someone's README added to it would be deleted by a re-export)."""
    output_dir = Path(output_dir)
    if output_dir.is_symlink():
        raise ExportTargetError(f"{output_dir} is a symbolic link (to {os.readlink(output_dir)}); the export never "
                                "writes through a link: give the folder itself")
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ExportTargetError(f"{output_dir} exists and is not a directory")
    entries = sorted(p.name for p in output_dir.iterdir())
    if not entries or overwrite:
        return
    info = output_dir / EXPORT_INFO
    others = [name for name in entries if name not in EXPORT_ENTRIES]
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    if info.is_file() and not info.is_symlink():
        if others:
            raise ExportTargetError(f"{output_dir} is an earlier sd-ds export but also holds {shown}, which a new "
                                    "export would delete: move them out, or pass --overwrite")
        return
    raise ExportTargetError(f"{output_dir} is not empty ({shown}) and is not an earlier sd-ds export (no "
                            f"{EXPORT_INFO}): choose another folder, or pass --overwrite to replace it")


def save_base_components(comp: Any, output_dir: str | Path) -> Path:
    """Main process, once per run: keep what export needs besides the trained weights."""
    base = Path(output_dir) / BASE_MODEL_DIR
    if (base / "model_index.json").is_file():
        return base
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    comp.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    for sub, encoder in zip(comp.family.text_encoders, comp.text_encoders):
        encoder.save_pretrained(tmp / sub, safe_serialization=True)
    for sub, tokenizer in zip(comp.family.tokenizers, comp.tokenizers):
        save_tokenizer(tokenizer, tmp / sub)
    comp.noise_scheduler.save_pretrained(tmp / "scheduler")
    comp.unet.save_config(tmp / "unet")
    (tmp / "model_index.json").write_text(json.dumps({"_class_name": "sd_ds_base_model"}))
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)
    return base


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def consolidated_weights(ckpt: Path, *, ema: bool) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the engine's module (keys ``unet.*`` and ``text_encoder.*``), unpickled weights-only."""
    if ema:
        return consolidate_ema(ckpt)
    # Lazy, as every DeepSpeed and diffusers import in this module: seconds of import time that `python -m
    # sd_ds.export --help` and the trainer's start-up do not need.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with safe_loading():
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def export_checkpoint(ckpt: str | Path, output_dir: str | Path, *, ema: bool = False,
                      base_model: Optional[str | Path] = None, overwrite: bool = False) -> Path:
    """A complete pipeline folder of the run's family (StableDiffusionPipeline for SD v1/2.x,
    StableDiffusionXLPipeline for SDXL) with the checkpoint's UNet (and trained text encoders).

    ``output_dir`` is written whole or not at all: into a temporary sibling that then replaces it
    (``sd_ds.fileio.replaced_directory``), so a full disk or a kill leaves an earlier export intact (or no folder),
    never a mix. ``check_export_target`` says which folders it may replace."""
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from sd_ds.pipeline import assemble_pipeline

    check_export_target(output_dir, overwrite=overwrite)  # before minutes of consolidation
    ckpt = Path(ckpt)
    if not (ckpt / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete sd-ds checkpoint (no trainer_state.json)")
    if ema and not any(ckpt.glob("ema_*")):
        raise FileNotFoundError(f"{ckpt} holds no EMA (was the run trained with --use_ema?)")
    base = Path(base_model) if base_model else ckpt.parent / BASE_MODEL_DIR
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found: pass --base_model with the model directory the run started from")
    state = consolidated_weights(ckpt, ema=ema)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base / "unet"))
    unet.load_state_dict(_strip(state, "unet."), strict=True)
    family = family_of_unet(dict(unet.config))
    text_encoders = []
    for sub in family.text_encoders:
        encoder = getattr(transformers, TEXT_ENCODER_CLASSES[sub]).from_pretrained(base / sub, torch_dtype=torch.float32)
        trained = _strip(state, sub + ".")  # --train_text_encoder: the engine's module holds it under this name
        if trained:
            encoder.load_state_dict(trained, strict=False)
        text_encoders.append(encoder)
    pipe = assemble_pipeline(
        family, vae=AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32), unet=unet,
        text_encoders=text_encoders, tokenizers=[CLIPTokenizer.from_pretrained(base / sub) for sub in family.tokenizers],
        # DDIM on the training noise schedule: deterministic and good at ~50 steps.
        scheduler=DDIMScheduler.from_config(json.loads((base / "scheduler" / "scheduler_config.json").read_text())))
    output_dir = Path(output_dir)
    info = json.loads((ckpt / "trainer_state.json").read_text())
    with replaced_directory(output_dir) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        for sub in family.tokenizers:
            save_tokenizer(getattr(pipe, sub), staging / sub)  # loadable by transformers 4 as well
        (staging / EXPORT_INFO).write_text(json.dumps(
            {"checkpoint": str(ckpt.resolve()), "step": info["step"], "samples_seen": info["samples_seen"],
             "ema": ema, "resolution": info.get("config", {}).get("data", {}).get("resolution")}, indent=2))
    return output_dir


def save_trained_models(engine: Any, components: Any, ema: Any, ckpt: Path, *, is_main_process: bool) -> None:
    """--only_save_updated_model: the trained UNet (``unet/``), its EMA (``unet_ema/``) and a trained text encoder
    (``text_encoder/``) in diffusers format inside a checkpoint, so that
    ``UNet2DConditionModel.from_pretrained(ckpt / "unet")`` works as in the seed. Collective: gathers each
    parameter's fp32 master copy (and the EMA) from the ZeRO partitions; the main process writes."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    # One parameter at a time: each gather is collective (every rank takes part and receives the full tensor), but
    # only the main process keeps it, on the CPU; the others drop it at once. Collected as a dict on the device,
    # every rank's GPU would hold a full fp32 UNet while saving (+3.4 GiB at SD v1).
    full = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            value = safe_get_full_fp32_param(p)
            if is_main_process:
                full[name] = value.detach().cpu()
            del value
    ema_unet = ema.full_state_dict(module.unet) if ema is not None else None
    if not is_main_process:
        return
    for sub in ("unet", "text_encoder", "text_encoder_2"):
        part = getattr(module, sub, None)
        if part is None or not any(k.startswith(sub + ".") for k in full):
            continue
        weights = _strip(full, sub + ".")
        _save_fresh(part, weights, ckpt / sub, strict_unet=sub == "unet")
    if ema_unet is not None:
        _save_fresh(module.unet, ema_unet, ckpt / "unet_ema", strict_unet=True)
    del components  # the frozen parts live in output_dir/base_model, written once per run


def _save_fresh(part: torch.nn.Module, weights: dict[str, torch.Tensor], directory: Path, *, strict_unet: bool) -> None:
    """A new fp32 module of ``part``'s class and config holding ``weights``, saved with save_pretrained."""
    fresh = type(part).from_config(part.config) if hasattr(type(part), "from_config") else type(part)(part.config)
    missing = fresh.load_state_dict(weights, strict=False)
    if missing.missing_keys and strict_unet:
        raise RuntimeError(f"UNet weights missing from the ZeRO partitions: {missing.missing_keys[:5]}")
    fresh.save_pretrained(directory, safe_serialization=True)

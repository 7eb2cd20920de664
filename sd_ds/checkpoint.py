"""Save, find, rotate and load training checkpoints.

A checkpoint is ``output_dir/checkpoint-{step}/`` holding, explicitly:
- the DeepSpeed engine state (module, ZeRO-2 optimizer partitions, LR scheduler), written by
  ``engine.save_checkpoint`` so that DeepSpeed's own ``zero_to_fp32.py`` and ``ds_to_universal`` work on it;
- ``rank_{r}_state.pt`` per rank: data-loader position and RNG states (each rank reads its own shards and
  draws its own noise);
- the rank's EMA partition (``sd_ds.ema``) when EMA is on;
- optionally the trained UNet in diffusers format (``--only_save_updated_model``);
- ``trainer_state.json`` (step, samples seen, world size, resolved config), written LAST by the main
  process after every rank finished: its presence is what makes a checkpoint complete.
``output_dir/latest`` names the newest complete checkpoint; it is replaced atomically (tmp + os.replace) and
has the format DeepSpeed's loaders expect, so ``zero_to_fp32.py output_dir out`` works as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from sd_ds.distributed import barrier

PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
_STEP_RE = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / TRAINER_STATE).is_file()


def list_checkpoints(output_dir: str | Path, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, path) sorted by step, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (is_complete(p) or not complete_only):
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def find_resume_checkpoint(output_dir: str | Path, resume_from_checkpoint: str) -> Optional[Path]:
    """``latest`` → newest complete checkpoint in output_dir (or None); ``none`` → None; else a path."""
    choice = (resume_from_checkpoint or "none").strip()
    if choice.lower() in ("none", "false", "no", ""):
        return None
    if choice.lower() == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(choice)
    if not is_complete(path):
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a complete sd-ds checkpoint (no {TRAINER_STATE})")
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rank_state_path(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank_{rank}_state.pt"


def save_checkpoint(engine: Any, output_dir: str | Path, step: int, *, rank: int, is_main_process: bool,
                    trainer_state: dict[str, Any], rank_state: dict[str, Any], ema: Any = None,
                    save_total_limit: Optional[int] = None, export_models: Any = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint path."""
    output_dir = Path(output_dir)
    ckpt = checkpoint_path(output_dir, step)
    if is_main_process and ckpt.exists():
        # A leftover from a crash at this very step; never mix two attempts in one directory.
        shutil.rmtree(ckpt)
    barrier()
    # save_latest=False: our own `latest` is written only once the whole checkpoint is complete.
    engine.save_checkpoint(str(output_dir), tag=ckpt.name, client_state={"sd_ds_step": step}, save_latest=False)
    torch.save(rank_state, rank_state_path(ckpt, rank))
    if ema is not None:
        from sd_ds.ema import save_ema_shard

        save_ema_shard(ema, ckpt, rank)
    if export_models is not None:
        export_models(ckpt)  # collective (gathers fp32 weights), writes on the main process
    barrier()
    if is_main_process:
        _write_atomic(ckpt / TRAINER_STATE, json.dumps(trainer_state, indent=2, default=str))
        _write_atomic(output_dir / LATEST, ckpt.name)
        rotate_checkpoints(output_dir, save_total_limit, keep=ckpt)
    barrier()
    return ckpt


def rotate_checkpoints(output_dir: str | Path, save_total_limit: Optional[int], keep: Optional[Path] = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the limit, and incomplete leftovers older than the newest
    complete one. The newest complete checkpoint is never deleted."""
    complete = list_checkpoints(output_dir)
    if not complete:
        return []
    newest_step = complete[-1][0]
    doomed = []
    if save_total_limit is not None and len(complete) > save_total_limit:
        doomed += [p for _, p in complete[: len(complete) - save_total_limit]]
    doomed += [p for s, p in list_checkpoints(output_dir, complete_only=False) if not is_complete(p) and s < newest_step]
    doomed = [p for p in doomed if p != complete[-1][1] and p != keep]
    for p in doomed:
        # Un-mark first, so a crash mid-delete leaves an incomplete checkpoint, never a broken "complete" one.
        (p / TRAINER_STATE).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def load_checkpoint(engine: Any, ckpt: Path, *, rank: int, world_size: int, ema: Any = None,
                    universal_dir: Optional[Path] = None) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Restore the engine (and EMA); return (trainer_state, this rank's saved state or None when the
    checkpoint was written by a different number of ranks)."""
    trainer_state = read_trainer_state(ckpt)
    same_world = trainer_state.get("world_size") == world_size
    if same_world:
        load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_lr_scheduler_states=True)
    else:
        if universal_dir is None:
            raise ValueError("resuming on a different number of ranks needs the universal checkpoint")
        load_path, _ = engine.load_checkpoint(str(universal_dir.parent), tag=universal_dir.name,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt}")
    if ema is not None:
        from sd_ds.ema import load_ema_shards

        ema.load_state_dict(load_ema_shards(ckpt, ema, rank, world_size))
    rank_state = torch.load(rank_state_path(ckpt, rank), weights_only=False) if same_world else None
    return trainer_state, rank_state


def make_universal(ckpt: Path, *, is_main_process: bool) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (once, on the main process) so it can be
    loaded by a different number of ranks. Collective."""
    out = ckpt.parent / f".{ckpt.name}-universal"
    target = out / ckpt.name
    if is_main_process and not (out / ".complete").exists():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        shutil.rmtree(out, ignore_errors=True)
        ds_to_universal(Namespace(input_folder=str(ckpt), output_folder=str(target), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True))
        (out / ".complete").write_text("")
    barrier()
    return target

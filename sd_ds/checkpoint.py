"""Save, find, rotate and load training checkpoints: one ``Checkpointer`` owns what a checkpoint holds.

A checkpoint is ``output_dir/checkpoint-{step}/`` holding, explicitly:
- the DeepSpeed engine state (module, ZeRO-2 optimizer partitions, LR scheduler), written by
  ``engine.save_checkpoint`` so that DeepSpeed's own ``zero_to_fp32.py`` and ``ds_to_universal`` work on it;
- ``rank_{r}_state.safetensors`` per rank: data-loader position and RNG states (each rank reads its own shards
  and draws its own noise), as tensors plus JSON metadata: no pickle, so loading it cannot run code;
- the rank's EMA partition (``sd_ds.ema``) when EMA is on;
- with ``--only_save_updated_model`` (default) the trained UNet (``unet/``, ``unet_ema/`` with EMA, and
  ``text_encoder/`` when trained) in diffusers format;
- ``trainer_state.json`` (TrainState, world size, resolved config), written LAST by the main process after
  every rank finished: its presence is what makes a checkpoint complete.
``output_dir/latest`` names the newest complete checkpoint; it is replaced atomically and has the format
DeepSpeed's loaders expect, so ``zero_to_fp32.py output_dir out`` works as well.

DeepSpeed's own files are pickles. They are loaded with ``weights_only`` unpickling (``safe_loading``), which
builds only tensors, containers and the allow-listed DeepSpeed/torch types below and never calls other code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from sd_ds.config import TrainConfig
from sd_ds.distributed import DistInfo, rng_state, set_rng_state
from sd_ds.ema import load_ema_shards, save_ema_shard
from sd_ds.fileio import is_disk_full, save_atomic, write_atomic, write_json_atomic
from sd_ds.redaction import redact_json

logger = logging.getLogger("sd_ds.checkpoint")

PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"
_STEP_RE = re.compile(rf"^{PREFIX}(\d+)$")


@dataclass
class TrainState:
    step: int = 0              # optimizer steps taken (skipped overflow steps included)
    samples_seen: int = 0      # over all ranks
    skipped_steps: int = 0     # steps whose gradients held inf/nan (not applied)

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state[f.name]))


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the previous complete one is intact."""


class NonFiniteWeightsError(RuntimeError):
    """The weights (or their EMA) hold NaN/inf at a save: that checkpoint is not written, the previous one stays
    the newest."""


# --- finding checkpoints ----------------------------------------------------------------------------------

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


def rotate_checkpoints(output_dir: str | Path, save_total_limit: Optional[int], keep: Optional[Path] = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond the limit, and incomplete leftovers older than the newest
    complete one. The newest complete checkpoint is never deleted. A checkpoint that is a symbolic link (say, to a
    copy on another disk) loses the link only: what it points to is not this run's to delete."""
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
        if p.is_symlink():
            p.unlink()
            continue
        # Un-mark first, so a crash mid-delete leaves an incomplete checkpoint, never a broken "complete" one.
        (p / TRAINER_STATE).unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# --- loading without running pickled code ------------------------------------------------------------------

def _deepspeed_checkpoint_types() -> list[Any]:
    """The non-tensor classes DeepSpeed 0.19 pickles into ZeRO-1/2 checkpoints (model, optimizer and universal
    files), allow-listed for weights_only unpickling: building them calls no code of the file's choosing."""
    import collections

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    types: list[Any] = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, collections.OrderedDict]
    with contextlib.suppress(ImportError):
        from deepspeed.checkpoint.constants import PARAM_SLICE_MAPPINGS  # noqa: F401
    return types


def _checkpoint_enums() -> list[type[enum.Enum]]:
    return [t for t in _deepspeed_checkpoint_types() if isinstance(t, type) and issubclass(t, enum.Enum)]


def _enum_member_by_name(*args: Any) -> enum.Enum:
    """Stands in for ``getattr`` while unpickling, and does only what an Enum pickled by name needs.

    Some Pythons (Debian 12's CPython 3.11.2, other early 3.11 releases) pickle a member of an ``(int, Enum)``
    class such as DeepSpeed's ``ZeroStageEnum`` as ``getattr(ZeroStageEnum, 'gradients')`` instead of
    ``ZeroStageEnum(2)``. The real ``getattr`` must never be callable from a file: ``getattr(<allowed class>,
    '__init__')`` and so on reach functions, their ``__globals__``, and from there anything. So this accepts a
    class allow-listed above that is an Enum, and the name of one of its members, and nothing else."""
    if len(args) != 2:
        raise pickle.UnpicklingError(f"getattr with {len(args)} arguments in a checkpoint: only (Enum class, name)")
    cls, name = args
    allowed = _checkpoint_enums()
    if not any(cls is t for t in allowed):
        raise pickle.UnpicklingError(f"getattr on {cls!r} in a checkpoint: only allow-listed Enum classes "
                                     f"({', '.join(t.__qualname__ for t in allowed)}) may be rebuilt by name")
    # Exact str (not a subclass with its own __eq__/__hash__) and a member, never another attribute.
    if type(name) is not str or name not in cls.__members__:
        raise pickle.UnpicklingError(f"getattr({cls.__qualname__}, {name!r}) in a checkpoint: not a member name")
    return cls.__members__[name]


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Every ``torch.load`` inside the block, DeepSpeed's included (which pass weights_only=False), unpickles
    with ``weights_only=True`` and the allow-list above: a tampered checkpoint fails to load instead of running
    its payload. The global ``builtins.getattr`` of a file resolves to ``_enum_member_by_name``, never to
    ``getattr`` itself."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([*_deepspeed_checkpoint_types(),
                                               (_enum_member_by_name, "builtins.getattr")]):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


# --- per-rank state without pickle ---------------------------------------------------------------------------

def rank_state_path(ckpt: Path, rank: int) -> Path:
    return ckpt / f"rank_{rank}_state.safetensors"


def _split_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """JSON-able structure with every tensor replaced by {"__tensor__": name} and stored in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        name = prefix or "tensor"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, tensors, f"{prefix}.{k}" if prefix else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_rank_state(path: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = _split_tensors(state, tensors)
    save_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"sd_ds_state": json.dumps(meta)}))


def load_rank_state(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["sd_ds_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _join_tensors(meta, tensors)


# --- the checkpointer -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResumePoint:
    path: Path
    world_size: int                     # ranks that wrote it
    universal_dir: Optional[Path] = None  # DeepSpeed universal copy when this run has another rank count


def plan_resume(cfg: "TrainConfig", dist_info: "DistInfo") -> Optional[ResumePoint]:
    """Collective. Rank 0 picks the checkpoint (a late-listing filesystem could show ranks different newest
    checkpoints) and every rank gets its choice; a different rank count converts it to DeepSpeed's universal
    format first (once, on rank 0)."""
    choice: Optional[str] = None
    error: Optional[str] = None
    if dist_info.is_main_process:
        try:
            found = find_resume_checkpoint(cfg.output_dir, cfg.checkpoint.resume_from_checkpoint)
            choice = str(found) if found is not None else None
        except FileNotFoundError as e:
            error = str(e)
    choice, error = dist_info.broadcast_object((choice, error))
    if error:
        raise SystemExit(error)
    if choice is None:
        return None
    path = Path(choice)
    if not is_complete(path):
        raise RuntimeError(f"rank {dist_info.rank}: cannot read {path / TRAINER_STATE}, the checkpoint rank 0 chose "
                           "to resume from; is output_dir on a filesystem that every node sees?")
    saved_world_size = int(read_trainer_state(path)["world_size"])
    universal = None
    if saved_world_size != dist_info.world_size:
        universal = make_universal(path, dist_info)
    return ResumePoint(path, saved_world_size, universal)


def make_universal(ckpt: Path, dist_info: "DistInfo") -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (once, on the main process) so that a different
    number of ranks can load it. Collective."""
    out = ckpt.parent / f".{ckpt.name}-universal"
    target = out / ckpt.name
    if dist_info.is_main_process and not (out / ".complete").exists():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        if out.is_symlink():
            out.unlink()  # ours by name: replaced, never written through
        shutil.rmtree(out, ignore_errors=True)
        with safe_loading():
            ds_to_universal(Namespace(input_folder=str(ckpt), output_folder=str(target), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True))
        write_atomic(out / ".complete", "")
    dist_info.barrier()
    return target


class Checkpointer:
    """Saves and restores everything a run needs to continue exactly: the engine (weights, ZeRO optimizer
    partitions, LR schedule), the EMA shard, the data loader's position, the RNG states and the objective's
    generator, and the TrainState; and optionally the trained models in diffusers format."""

    def __init__(self, cfg: "TrainConfig", dist_info: "DistInfo", *, engine: Any, loader: Any,
                 generator: torch.Generator, ema: Any = None,
                 export_models: Optional[Callable[[Path], None]] = None,
                 fault_point: Optional[Callable[[str, int], None]] = None) -> None:
        self.output_dir = Path(cfg.output_dir)
        self.cfg, self.dist = cfg, dist_info
        self.engine, self.loader, self.generator, self.ema = engine, loader, generator, ema
        self.export_models = export_models  # collective: gathers the weights, writes on the main process
        self.fault_point = fault_point or (lambda name, step: None)

    def _rank_state(self) -> dict[str, Any]:
        return {"data": self.loader.state_dict(), "rng": rng_state(), "generator": self.generator.get_state()}

    def save(self, state: TrainState) -> Path:
        """Collective: every rank calls it at the same step."""
        ckpt = checkpoint_path(self.output_dir, state.step)
        self._refuse_non_finite(ckpt, state)
        try:
            self._save(ckpt, state)
        except Exception as e:
            if not is_disk_full(e):
                raise
            intact = list_checkpoints(self.output_dir)
            intact_msg = f"{intact[-1][1].name} is intact" if intact else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"no space left on device while writing {ckpt.name} in {self.output_dir}; "
                                       f"{intact_msg} (a new run resumes from it)") from e
        logger.info("saved %s", ckpt.name)
        return ckpt

    def _refuse_non_finite(self, ckpt: Path, state: TrainState) -> None:
        """Collective, before anything of ``ckpt`` is written or deleted: raise ``NonFiniteWeightsError`` on every
        rank when any rank's fp32 master partition (or EMA partition) holds a NaN/inf. Each rank checks only its own
        ZeRO partition and the ranks agree on the gloo control group; the one host read it costs is paid per save,
        not per step. (A step with non-finite gradients is skipped, so weights turn non-finite only when a finite
        update overflows them, e.g. a learning rate near float32's maximum.)"""
        weights = list(self.engine.optimizer.single_partition_of_fp32_groups)
        ema = list(self.ema.partitions) if self.ema is not None else []

        device = weights[0].device if weights else torch.device("cpu")

        def non_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
            if not tensors:
                return torch.zeros((), dtype=torch.bool, device=device)
            return torch.stack([~torch.isfinite(t).all() for t in tensors]).any()

        flags = torch.stack([non_finite(weights), non_finite(ema)]).to(torch.int32)  # [weights bad, EMA bad]
        bad_weights, bad_ema = (bool(x) for x in self.dist.all_reduce(flags, op="max").tolist())
        if not (bad_weights or bad_ema):
            return
        what = " and ".join(name for name, bad in (("weights", bad_weights), ("EMA weights", bad_ema)) if bad)
        intact = list_checkpoints(self.output_dir)
        kept = (f"{intact[-1][1].name} is the newest checkpoint: resume from it with a lower --learning_rate"
                if intact else "no earlier checkpoint exists: start again with a lower --learning_rate")
        raise NonFiniteWeightsError(
            f"step {state.step}: the {what} are not finite (NaN/inf), so {ckpt.name} was not written; {kept}")

    def _save(self, ckpt: Path, state: TrainState) -> None:
        dist_info = self.dist
        if dist_info.is_main_process and (ckpt.is_symlink() or (ckpt.exists() and not ckpt.is_dir())):
            # checkpoint-N is this run's name in output_dir: a link there (or a file) is replaced, never followed.
            # Writing through it would put this save wherever it points (another run's checkpoint, someone's
            # folder); saving under another name would hide this step from `latest`, resume and rotation. Only
            # the link goes: what it points to is left as it is.
            logger.warning("%s is %s; replacing it with this checkpoint (%s)", ckpt,
                           f"a symbolic link to {os.readlink(ckpt)}" if ckpt.is_symlink() else "not a directory",
                           "its target is left as it is" if ckpt.is_symlink() else "the file is removed")
            ckpt.unlink()
        elif dist_info.is_main_process and ckpt.exists():
            # A leftover from a crash at this very step; never mix two attempts in one directory.
            (ckpt / TRAINER_STATE).unlink(missing_ok=True)
            shutil.rmtree(ckpt)
        dist_info.barrier()
        self.fault_point("save_begin", state.step)
        # save_latest=False: our own `latest` is written only once the whole checkpoint is complete.
        self.engine.save_checkpoint(str(self.output_dir), tag=ckpt.name, client_state={"sd_ds_step": state.step},
                                    save_latest=False)
        self.fault_point("save_engine_written", state.step)
        save_rank_state(rank_state_path(ckpt, dist_info.rank), self._rank_state())
        if self.ema is not None:
            save_ema_shard(self.ema, ckpt, dist_info.rank)
        if self.export_models is not None:
            self.export_models(ckpt)
        self.fault_point("save_before_complete", state.step)
        # Every rank reports whether its part is on disk; only then does the main process mark it complete.
        dist_info.barrier()
        if dist_info.is_main_process:
            trainer_state = {**state.state_dict(), "world_size": dist_info.world_size,
                             "global_batch_size": self.cfg.global_batch_size(dist_info.world_size),
                             "config": redact_json(self.cfg.to_dict())}  # no credential of a URL flag
            write_json_atomic(ckpt / TRAINER_STATE, trainer_state, indent=2, default=str)
            write_atomic(self.output_dir / LATEST, ckpt.name)
            rotate_checkpoints(self.output_dir, self.cfg.checkpoint.save_total_limit, keep=ckpt)
        dist_info.barrier()

    def load(self, resume: Optional[ResumePoint]) -> TrainState:
        """Restore everything from ``resume`` (see ``plan_resume``); a fresh TrainState when None."""
        state = TrainState()
        if resume is None:
            return state
        same_world = resume.world_size == self.dist.world_size
        source = resume.path if same_world else resume.universal_dir
        with safe_loading():
            load_path, _ = self.engine.load_checkpoint(str(source.parent), tag=source.name,
                                                       load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {source}")
        if self.ema is not None:
            self.ema.load_state_dict(load_ema_shards(resume.path, self.ema, self.dist.rank, self.dist.world_size))
        state.load_state_dict(read_trainer_state(resume.path))
        def every_rank() -> list[dict]:
            # Collective (every rank's loader asks, or none does): an elastic data resume needs what every saved
            # rank's readers consumed, a few numbers each; the main process reads the files once for all.
            states = ([load_rank_state(rank_state_path(resume.path, r))["data"] for r in range(resume.world_size)]
                      if self.dist.is_main_process else None)
            return self.dist.broadcast_object(states)

        if same_world:
            rank_state = load_rank_state(rank_state_path(resume.path, self.dist.rank))
            self.loader.load_state_dict(rank_state["data"], every_rank=every_rank)
            set_rng_state(rank_state["rng"])
            self.generator.set_state(rank_state["generator"])
        else:
            # Other ranks: the data epoch continues elastically (the loader says so); RNG states start anew.
            logger.info("checkpoint %s was written by %d ranks, this run has %d", resume.path, resume.world_size,
                        self.dist.world_size)
            self.loader.load_state_dict(load_rank_state(rank_state_path(resume.path, 0))["data"],
                                        every_rank=every_rank)
        logger.info("resumed from %s at step %d", resume.path, state.step)
        return state

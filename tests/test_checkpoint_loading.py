"""Weights-only loading of DeepSpeed's pickles (``sd_ds.checkpoint.safe_loading``) on every supported Python.

Issue 21: CPython 3.11.2 (Debian 12's python3) and other early 3.11 releases pickle a member of an ``(int, Enum)``
class by name, ``getattr(ZeroStageEnum, 'gradients')``; 3.10, later 3.11 releases, 3.12 and 3.13 pickle it by
value, ``ZeroStageEnum(2)``. DeepSpeed writes ``zero_stage`` into every ``*_optim_states.pt`` (and into the
universal copy's ``zero/optimizer_state.pt``), so the loader must rebuild exactly that ``getattr`` and no other.
``enums_pickled_by_name`` makes any interpreter write files the way those Pythons do, so these tests run
everywhere; ``.ci/run`` also runs this module under /usr/bin/python3 3.11.2, where it is the interpreter's own
behaviour. The end-to-end counterpart (resume on the same and on another number of ranks, export, on real
multi-rank checkpoints) is ``test_export_sample.py::test_checkpoints_with_enums_pickled_by_name_resume_and_export``.

No DeepSpeed engine here: these stay fast enough to run under a second interpreter in CI.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import pickle
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from sd_ds.checkpoint import _deepspeed_checkpoint_types, safe_loading

GETATTR = "builtins.getattr"


# --- writing files the way CPython 3.11.2 does (imported by test_export_sample.py) --------------------------------

#: A folder with a sitecustomize.py doing the same in every process started with it first on PYTHONPATH.
BY_NAME_SITE = Path(__file__).with_name("enum_by_name_site")


def _reduce_ex_by_name(self: enum.Enum, proto: int) -> tuple:
    return getattr, (self.__class__, self._name_)  # CPython 3.11.2's Enum.__reduce_ex__


@contextlib.contextmanager
def enums_pickled_by_name() -> Iterator[None]:
    """Every pickler in this process (``torch.save`` included, DeepSpeed's too) writes Enum members as
    ``getattr(cls, name)`` inside the block, as CPython 3.11.2 does."""
    previous = enum.Enum.__dict__["__reduce_ex__"]
    enum.Enum.__reduce_ex__ = _reduce_ex_by_name
    try:
        yield
    finally:
        enum.Enum.__reduce_ex__ = previous


def pickled_globals(path: Path) -> set[str]:
    """The globals a torch.save file names beyond torch's defaults (read without unpickling it)."""
    return set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def resave_enums_by_name(path: Path) -> None:
    """Rewrite a DeepSpeed file this test run produced as CPython 3.11.2 would have written it."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, trusted here
    with enums_pickled_by_name():
        torch.save(state, path)
    assert GETATTR in pickled_globals(path), f"{path} holds no Enum: nothing was pickled by name"


class _Call:
    """Pickles as ``func(*args)``: how a tampered file asks the unpickler to call something."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


# --- the tests ----------------------------------------------------------------------------------------------------

def _optim_states(**extra: Any) -> dict:
    """The shape of DeepSpeed 0.19's ZeRO-2 ``*_optim_states.pt`` (the parts that are not plain tensors)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return {"optimizer_state_dict": {
        "loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
        "base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
                                 "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "single_partition_of_fp32_groups": [torch.arange(4.0)], "zero_stage": ZeroStageEnum.gradients,
        "group_paddings": [0], "partition_count": [2], "ds_version": "0.19.8",
        "param_slice_mappings": [collections.OrderedDict()], **extra}, "ds_config": {}, "ds_version": "0.19.8"}


def _save(path: Path, state: dict, *, by_name: bool) -> Path:
    with enums_pickled_by_name() if by_name else contextlib.nullcontext():
        torch.save(state, path)
    return path


@pytest.mark.parametrize("by_name", [True, False], ids=["by_name", "this_pythons_own"])
def test_optimizer_states_with_an_enum_load_weights_only(tmp_path, by_name):
    from deepspeed.checkpoint.ds_to_universal import _get_zero_stage
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = _save(tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", _optim_states(), by_name=by_name)
    if by_name or sys.version_info[:3] == (3, 11, 2):
        # What Debian 12's python3 writes (natively there): the allow-list without getattr refuses it (the issue).
        assert GETATTR in pickled_globals(path)
        with torch.serialization.safe_globals(_deepspeed_checkpoint_types()), \
                pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL getattr"):
            torch.load(path, weights_only=True, map_location="cpu")
    with safe_loading():
        loaded = torch.load(path, map_location="cpu", weights_only=False)  # forced to weights_only inside
        # The frame of the traceback: DeepSpeed's universal conversion reading the ZeRO stage.
        assert _get_zero_stage([str(path)]) is ZeroStageEnum.gradients
    optim = loaded["optimizer_state_dict"]
    assert optim["zero_stage"] is ZeroStageEnum.gradients
    assert torch.equal(optim["single_partition_of_fp32_groups"][0], torch.arange(4.0))
    assert optim["loss_scaler"].cur_scale == 1.0


def _tampered() -> dict[str, Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return {
        # From an allow-listed class to a function and on to its module's globals (then to os, eval, ...).
        "function_globals": _Call(getattr, _Call(getattr, LossScaler, "__init__"), "__globals__"),
        "enum_function": _Call(getattr, ZeroStageEnum, "__init__"),
        "enum_class_attribute": _Call(getattr, ZeroStageEnum, "__class__"),
        "enum_private_attribute": _Call(getattr, ZeroStageEnum, "_member_map_"),
        "enum_method": _Call(getattr, ZeroStageEnum, "mro"),
        "unknown_member": _Call(getattr, ZeroStageEnum, "zero_stage_9"),
        "member_attribute": _Call(getattr, ZeroStageEnum.gradients, "real"),
        "with_default": _Call(getattr, ZeroStageEnum, "gradients", None),
        "allow_listed_non_enum": _Call(getattr, collections.OrderedDict, "fromkeys"),
        "torch_function_globals": _Call(getattr, torch._utils._rebuild_tensor, "__globals__"),
        # getattr(getattr, '__self__') is the builtins module: exec, eval, open.
        "builtins_module": _Call(getattr, getattr, "__self__"),
    }


@pytest.mark.parametrize("name", list(_tampered()))
def test_getattr_beyond_an_enum_member_is_refused(tmp_path, name):
    """A file that uses getattr for anything but an allow-listed Enum's member fails to load, through the very
    loader that reads the by-name ZeroStageEnum beside it."""
    path = _save(tmp_path / "tampered_optim_states.pt", _optim_states(sd_ds_test_gadget=_tampered()[name]),
                 by_name=True)
    with safe_loading(), pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, map_location="cpu", weights_only=False)
    # The same file without the gadget loads: the refusal is the gadget's.
    _save(path, _optim_states(), by_name=True)
    with safe_loading():
        torch.load(path, map_location="cpu", weights_only=False)


def test_getattr_stays_refused_outside_safe_loading(tmp_path):
    """safe_loading's stand-in for getattr is scoped: plain weights-only loads refuse it as before."""
    path = _save(tmp_path / "optim_states.pt", _optim_states(), by_name=True)
    with safe_loading():
        torch.load(path, map_location="cpu", weights_only=False)
    assert not any(GETATTR in str(g) for g in torch.serialization.get_safe_globals())
    with torch.serialization.safe_globals(_deepspeed_checkpoint_types()), \
            pytest.raises(pickle.UnpicklingError, match="Unsupported global: GLOBAL getattr"):
        torch.load(path, map_location="cpu", weights_only=True)


def test_the_subprocess_hook_pickles_enums_by_name():
    """BY_NAME_SITE (used for the trainer runs of test_export_sample.py) makes a fresh interpreter write what
    CPython 3.11.2 writes."""
    import subprocess

    code = ("import enum, pickle, pickletools\n"
            "class Stage(int, enum.Enum):\n    gradients = 2\n"
            "ops = pickletools.genops(pickle.dumps(Stage.gradients, 2))\n"
            "print(sorted(arg for op, arg, _ in ops if op.name == 'GLOBAL'))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(BY_NAME_SITE)}, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "['__builtin__ getattr', '__main__ Stage']", out

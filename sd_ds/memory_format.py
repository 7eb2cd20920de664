"""Memory layout (NCHW vs channels-last NHWC) of the convolutions' and normalisations' inputs: where a model runs in
which layout, how often it switches, and the switch to channels-last for the parts sd-ds owns outright.

Why it matters: cuDNN's tensor-core convolutions and oneDNN's CPU convolutions compute in NHWC. Fed NCHW, each
convolution transposes its input in and its output back out (on the H200, ~32 ms of a 252 ms SD v1 step were such
transposes: BENCHMARKS.md "GPU: SD v1 UNet throughput"). A model that is channels-last end to end transposes nothing; a model that
switches layout between layers pays a copy at every switch, so the number that matters is the count of switches.

``LayoutRecorder`` counts them: a forward pre-hook on every Conv2d, GroupNorm and LayerNorm records the layout of
its (4-D) input, in call order; a switch is a recorded input whose layout differs from the previous one's. Hooks
see eager modules only: inside a torch.compile region the layout is inductor's choice (it converts to
channels-last around convolutions itself: ``sd_ds.compile``), so the recorder is used on eager models and on the
regions' boundaries.

Which weights can be channels-last: the frozen VAE's (``to_channels_last``: sd-ds owns them). The trained UNet's
cannot: ZeRO-1/2 re-point every trained parameter at a view of one flat buffer (NCHW-contiguous slices) and copy
every gradient into flat buckets with ``view(-1)``, so a channels-last weight would need DeepSpeed's flattening,
bucketing, partitioning and checkpoint layout rewritten; a convolution fed channels-last activations converts its
NCHW weight as it reads it (a copy of the weights, ~1.7 GB per step for SD v1 in bf16: a few per cent of the
activations' traffic).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

CHANNELS_LAST = "channels_last"
CONTIGUOUS = "contiguous"
AMBIGUOUS = "either"   # both layouts at once: one channel, or 1x1 spatial size (a view, no copy either way)
STRIDED = "strided"    # neither (a permuted or sliced view)

RECORDED_MODULES = (torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def layout_of(tensor: torch.Tensor) -> str:
    """The memory layout of a 4-D tensor: channels_last, contiguous (NCHW), either, or strided."""
    nchw = tensor.is_contiguous()
    nhwc = tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)
    if nchw and nhwc:
        return AMBIGUOUS
    return CONTIGUOUS if nchw else CHANNELS_LAST if nhwc else STRIDED


def memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    """torch.channels_last for a channels-last 4-D tensor, else torch.contiguous_format: the layout to give a
    module's input so that it matches the module's weights."""
    return torch.channels_last if layout_of(tensor) == CHANNELS_LAST else torch.contiguous_format


@dataclass
class LayoutRecord:
    module: str             # the module's qualified name
    kind: str               # Conv2d | GroupNorm | LayerNorm
    layout: str             # of the input
    weight_layout: Optional[str] = None  # of a convolution's weight


@dataclass
class LayoutSummary:
    """What one pass recorded: inputs by layout, and the switches between consecutive 4-D inputs."""

    records: list[LayoutRecord] = field(default_factory=list)

    @property
    def by_layout(self) -> dict[str, int]:
        return dict(Counter(r.layout for r in self.records))

    @property
    def switches(self) -> int:
        """Consecutive recorded 4-D inputs (call order) whose layouts differ, AMBIGUOUS matching either."""
        count, previous = 0, None
        for record in self.records:
            if record.layout == AMBIGUOUS:
                continue
            if previous is not None and record.layout != previous:
                count += 1
            previous = record.layout
        return count

    @property
    def converted_conv_weights(self) -> int:
        """Convolutions whose weight layout differs from their input's: the kernel converts one to the other."""
        return sum(1 for r in self.records if r.kind == "Conv2d" and AMBIGUOUS not in (r.layout, r.weight_layout)
                   and r.layout != r.weight_layout)

    def switch_sites(self) -> list[str]:
        """The modules at which the layout switched (the first module in the new layout)."""
        sites, previous = [], None
        for record in self.records:
            if record.layout == AMBIGUOUS:
                continue
            if previous is not None and record.layout != previous:
                sites.append(f"{record.module} ({previous} -> {record.layout})")
            previous = record.layout
        return sites

    def as_dict(self) -> dict[str, Any]:
        return {"inputs": len(self.records), "by_layout": self.by_layout, "switches": self.switches,
                "converted_conv_weights": self.converted_conv_weights}


class LayoutRecorder:
    """Records the input layout of every Conv2d / GroupNorm / LayerNorm of ``modules`` while active::

        with LayoutRecorder({"unet": unet, "vae": vae}) as recorder:
            step()
        recorder.summary().switches

    LayerNorm inputs are 3-D token sequences ([B, HW, C], channels last by construction) and are left out of the
    counts: only 4-D inputs have two layouts."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.modules = modules
        self.records: list[LayoutRecord] = []
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Any:
        def record(module: torch.nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                return
            weight = getattr(module, "weight", None)
            self.records.append(LayoutRecord(
                name, type(module).__name__, layout_of(x),
                layout_of(weight) if isinstance(module, torch.nn.Conv2d) and weight is not None else None))
        return record

    def __enter__(self) -> "LayoutRecorder":
        for prefix, root in self.modules.items():
            for name, module in root.named_modules():
                if isinstance(module, RECORDED_MODULES):
                    self._handles.append(module.register_forward_pre_hook(self._hook(f"{prefix}.{name}")))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def summary(self, prefix: Optional[str] = None) -> LayoutSummary:
        """The records of all modules, or of those under ``prefix`` ("unet", "vae", ...)."""
        return LayoutSummary([r for r in self.records if prefix is None or r.module.split(".", 1)[0] == prefix])


def to_channels_last(modules: Iterable[torch.nn.Module]) -> None:
    """Every 4-D parameter and buffer of ``modules`` channels-last (in place): for modules sd-ds owns outright,
    the frozen VAE (never for the engine's trained weights: see the module docstring)."""
    for module in modules:
        module.to(memory_format=torch.channels_last)

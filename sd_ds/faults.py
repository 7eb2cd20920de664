"""Fault injection for the tests: one mechanism, one environment variable, for every sd-ds program.

A program passes named points as it runs (``fault_point("save_begin", step)`` in the trainer, an injector's
``hook("sample")`` in the converter's processes, ``hook("batch")`` in the latent encoder). Nothing happens at
them unless ``SD_DS_FAULT`` names the point; then the process is killed, paused or slowed down there, so a test
lands a fault at an exact moment, not after a racing sleep.

    SD_DS_FAULT = FAULT[,FAULT...]        FAULT = POINT[:KEY=VALUE...]

- ``action``: ``kill`` (default): SIGKILL this process, and when it is a worker of a run whose main process built
  the injector (the converter's workers get it pickled), that main process first, as a crash of the whole run;
  ``kill_worker``: SIGKILL this process only, never the main process (a lost executor, whose task runs again);
  ``pause``: write ``reached.RANK`` into ``SD_DS_FAULT_DIR`` and wait until ``go`` appears there, so a test can act
  on a run provably at that point (fill the disk, start a second run, kill the launcher);
  ``sleep``: sleep ``seconds`` every time the point is reached, so a test can kill the run from outside mid-way.
- ``step=N``: only at optimizer step N (points reached with a step: the trainer's);
- ``count=N``: at the N-th time this process reaches the point (after the step and rank filters; default 1);
- ``rank=R``: only in global rank R (``RANK``; 0 when unset);
- ``seconds=S``: how long ``sleep`` sleeps;
- ``once=PATH``: only the first process of the run to get there fires (it creates PATH; no other process, a
  retried task's included, fires again). A path without ``:`` or ``,``.

E.g. ``save_begin:step=4:action=pause``, ``save_before_complete:step=4:rank=1``, ``part:count=3``,
``sample:action=kill_worker:count=3:once=/tmp/killed``, ``sample:action=sleep:seconds=0.1``.
With ``SD_DS_FAULT_DIR`` set, a firing fault also writes ``fired.ACTION.RANK`` there.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping, Optional

FAULT_ENV = "SD_DS_FAULT"
FAULT_DIR_ENV = "SD_DS_FAULT_DIR"

# Every point a program passes, and when. A fault naming another point is an error, not a silent no-op.
POINTS = {
    # the trainer's Checkpointer, each rank, during a save (a kill at any of them must leave the newest complete
    # checkpoint loadable and the older ones untouched)
    "save_begin": "trainer: the checkpoint directory is prepared (all ranks past a barrier), nothing written yet",
    "save_engine_written": "trainer: DeepSpeed's model/optimizer files of this rank are written",
    "save_before_complete": "trainer: this rank's own state (and EMA shard) written; trainer_state.json not yet",
    # the converter (tools/convert_laion_to_wds.py)
    "sample": "converter worker: a sample written into a fragment",
    "part": "converter worker: a part recorded as done",
    "shard_chunk": "converter worker: a chunk of samples copied into a shard",
    "shard": "converter worker: a shard renamed into place; latent encoder: a shard renamed into place, not yet "
             "recorded",
    "main_shard": "converter main process: a shard seen finished",
    # the latent encoder (python -m sd_ds.encode_latents)
    "batch": "latent encoder: a batch written into a shard's temporary file",
}
ACTIONS = ("kill", "kill_worker", "pause", "sleep")

Hook = Callable[..., None]
"""``hook(point)`` or ``hook(point, step)``: what a program calls at each point."""


def no_hook(point: str, step: Optional[int] = None) -> None:
    """The default hook: nothing happens at any point."""


@dataclass(frozen=True)
class Fault:
    """One parsed FAULT of ``SD_DS_FAULT`` (see the module docstring)."""

    point: str
    action: str = "kill"
    step: Optional[int] = None
    count: int = 1
    rank: Optional[int] = None
    seconds: float = 0.0
    once: str = ""


_KEYS = {f.name: f.type for f in fields(Fault) if f.name != "point"}


def parse_faults(spec: str) -> list[Fault]:
    """The faults of an ``SD_DS_FAULT`` value; ValueError naming what is wrong (a typo never passes silently)."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, *options = item.split(":")
        if point not in POINTS:
            raise ValueError(f"{FAULT_ENV}: unknown fault point {point!r} (known: {', '.join(POINTS)})")
        values: dict[str, object] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in _KEYS:
                raise ValueError(f"{FAULT_ENV}: {option!r} in {item!r} is not KEY=VALUE with KEY one of "
                                 f"{', '.join(_KEYS)}")
            try:
                values[key] = value if key in ("action", "once") else (float(value) if key == "seconds"
                                                                       else int(value))
            except ValueError:
                raise ValueError(f"{FAULT_ENV}: {key}={value!r} in {item!r} is not a number") from None
        fault = Fault(point, **values)  # type: ignore[arg-type]
        if fault.action not in ACTIONS:
            raise ValueError(f"{FAULT_ENV}: unknown action {fault.action!r} (known: {', '.join(ACTIONS)})")
        if fault.count < 1:
            raise ValueError(f"{FAULT_ENV}: count must be >= 1 in {item!r}")
        faults.append(fault)
    return faults


@dataclass
class FaultInjector:
    """The faults of one run, called at every point: ``injector(point)`` or ``injector(point, step)``. Picklable,
    so a converter's workers carry it; counts are per process."""

    faults: list[Fault]
    main_pid: int = field(default_factory=os.getpid)
    """The process that built it (the run's main process)."""
    seen: Counter = field(default_factory=Counter)
    """Matching reaches of each fault so far, in this process."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Hook:
        """The injector ``SD_DS_FAULT`` asks for, or ``no_hook`` when it is empty."""
        faults = parse_faults(environ.get(FAULT_ENV, ""))
        return cls(faults) if faults else no_hook

    def __call__(self, point: str, step: Optional[int] = None) -> None:
        rank = int(os.environ.get("RANK", "0") or 0)
        for fault in self.faults:
            if (fault.point != point or (fault.step is not None and fault.step != step)
                    or (fault.rank is not None and fault.rank != rank)):
                continue
            if fault.action == "sleep":
                time.sleep(fault.seconds)
                continue
            if fault.action == "kill_worker" and os.getpid() == self.main_pid:
                continue  # a worker's fault: the main process passes the point untouched
            self.seen[fault] += 1
            if self.seen[fault] != fault.count:
                continue
            if fault.once:
                try:  # O_EXCL: exactly one process of the run fires
                    os.close(os.open(fault.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
            self._fire(fault, rank, step)

    def _fire(self, fault: Fault, rank: int, step: Optional[int]) -> None:
        where = f"{fault.point}" + (f" (step {step}, rank {rank})" if step is not None else f" (rank {rank})")
        marker_dir = os.environ.get(FAULT_DIR_ENV)
        if marker_dir:
            Path(marker_dir).mkdir(parents=True, exist_ok=True)
            (Path(marker_dir) / f"fired.{fault.action}.{rank}").write_text(f"{where} {time.time()}\n")
        print(f"sd_ds: injected fault {fault.action} at {where}", file=sys.stderr, flush=True)
        if fault.action == "pause":
            if not marker_dir:
                raise RuntimeError(f"{FAULT_ENV} action pause needs {FAULT_DIR_ENV}")
            (Path(marker_dir) / f"reached.{rank}").write_text(f"{os.getpid()}\n")
            go = Path(marker_dir) / "go"
            deadline = time.time() + 600
            while not go.exists():
                if time.time() > deadline:
                    raise RuntimeError(f"fault pause at {where}: nobody created {go} within 600 s")
                time.sleep(0.1)
            return
        if fault.action == "kill" and os.getpid() != self.main_pid:
            os.kill(self.main_pid, signal.SIGKILL)  # a worker's crash takes the whole run down
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # the signal is delivered asynchronously; never run on past the fault


_injector: Optional[Hook] = None


def fault_point(name: str, step: Optional[int] = None) -> None:
    """A named point of this process (the trainer's save points pass their optimizer step): does nothing unless
    ``SD_DS_FAULT`` names it; otherwise it costs one call of an empty function."""
    global _injector
    if _injector is None:
        _injector = FaultInjector.from_env()
    _injector(name, step)

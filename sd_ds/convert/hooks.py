"""The converter's one injectable hook: a callable that the run calls at named points, so a test decides
exactly when a fault lands (a SIGKILL at the n-th point) or slows the run down enough to kill it from outside.

Points, and the process that reaches them:

- ``sample``: a worker wrote a sample into a fragment;
- ``part``: a worker recorded a part as done;
- ``shard_chunk``: a worker copied a chunk of samples into a shard;
- ``shard``: a worker renamed a shard into place;
- ``main_shard``: the main process saw a shard finish.

``convert(..., hook=...)`` takes it; the workers get a pickled copy each at start-up, so a count of points is
per process. ``tools/convert_laion_to_wds.py`` builds it from the environment (``FaultInjection.from_env``),
which is how the tests reach a converter started as a subprocess.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

__all__ = ["Hook", "no_hook", "FaultInjection", "KILL_AT_ENV", "KILL_WORKER_AT_ENV", "SLOW_ENV"]

Hook = Callable[[str], None]

KILL_AT_ENV = "SD_DS_CONVERT_KILL_AT"
"""``point:n``: SIGKILL the run at the n-th ``point`` of a process (n defaults to 1)."""
KILL_WORKER_AT_ENV = "SD_DS_CONVERT_KILL_WORKER_AT"
"""``point:n:MARKER``: SIGKILL only the worker process (a Spark/Ray executor's task, a local pool worker) at
the n-th ``point`` of a process, once per run: the first process to get there creates the file MARKER, and
no other process (the engine's retry of the task included) fires again."""
SLOW_ENV = "SD_DS_CONVERT_SLOW_TEST"
"""Seconds to sleep per sample written, so a test can SIGKILL the run from outside mid-way."""


def no_hook(point: str) -> None:
    """The default hook: nothing happens at any point."""


@dataclass
class FaultInjection:
    """Kill the whole run at the ``kill_count``-th ``kill_point`` of a process; sleep ``sleep_per_sample_s``
    at each ``sample`` point. Picklable, so the workers carry it."""

    kill_point: str = ""
    kill_count: int = 1
    sleep_per_sample_s: float = 0.0
    main_pid: int = field(default_factory=os.getpid)
    """The run's main process: a worker that fires kills it too, as a crash of the whole run would."""
    seen: Counter = field(default_factory=Counter)
    """Points reached so far in this process."""
    worker_marker: str = ""
    """Set: kill only the process that reaches the point (not the run's main process), once per marker file."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Hook:
        """The hook the environment asks for (``KILL_AT_ENV``, ``SLOW_ENV``), or ``no_hook``."""
        spec = environ.get(KILL_AT_ENV, "")
        worker_spec = environ.get(KILL_WORKER_AT_ENV, "")
        sleep_s = float(environ.get(SLOW_ENV) or 0)
        if not spec and not worker_spec and not sleep_s:
            return no_hook
        if worker_spec:
            point, count, marker = worker_spec.split(":", 2)
            return cls(kill_point=point, kill_count=int(count or 1), sleep_per_sample_s=sleep_s,
                       worker_marker=marker)
        point, _, count = spec.partition(":")
        return cls(kill_point=point, kill_count=int(count or 1), sleep_per_sample_s=sleep_s)

    def __call__(self, point: str) -> None:
        if point == "sample" and self.sleep_per_sample_s:
            time.sleep(self.sleep_per_sample_s)
        if not self.kill_point or point != self.kill_point:
            return
        self.seen[point] += 1
        if self.seen[point] == self.kill_count:
            if self.worker_marker:
                if self.main_pid == os.getpid():
                    return
                try:  # O_EXCL: exactly one process in the run fires
                    os.close(os.open(self.worker_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return
                os.kill(os.getpid(), signal.SIGKILL)
            if self.main_pid != os.getpid():
                os.kill(self.main_pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

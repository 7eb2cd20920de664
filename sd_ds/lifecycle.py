"""Run lifecycle guards: one run per output directory, ranks that die with their launcher, and a stop when every
step is skipped. (The fault-injection points the fault tests drive are ``sd_ds.faults``.)

- ``OutputDirLock``: global rank 0 holds an exclusive lock on ``output_dir`` for the whole run, so a second run
  on a live directory stops at once (naming the holder) instead of training beside it and deleting its
  checkpoints. The kernel drops the lock when the holder dies, even by ``kill -9``: a dead run's lock is simply
  taken over. ``hold_output_dir`` is the collective form the trainer uses: every rank stops when it is refused.
- ``start_parent_watchdog``: a rank exits within about a second when its launcher (``run.sh``, the deepspeed
  launcher, or the per-node ``deepspeed.launcher.launch`` process) dies, instead of training on as an orphan.
- ``run_to_exit``/``end_process``: a process that ran gloo collectives leaves without finalizing the interpreter,
  where gloo's threads can abort it after its work is done.
- ``SkipGuard``: stops the run with ``TrainingDiverged`` after N optimizer steps in a row were skipped for
  non-finite gradients, so a run that trains nothing never "succeeds".
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

from sd_ds.redaction import redact_argv

logger = logging.getLogger("sd_ds.lifecycle")

LOCK_FILE = ".sd_ds.lock"
LAUNCHER_PID_ENV = "SD_DS_LAUNCHER_PID"    # exported by run.sh ($$)
LAUNCHER_HOST_ENV = "SD_DS_LAUNCHER_HOST"  # exported by run.sh ($(hostname)); the pid means nothing elsewhere


# --- one run per output directory ------------------------------------------------------------------------

class OutputDirLocked(RuntimeError):
    """Another live run holds the output directory."""


class OutputDirLock:
    """Exclusive lock on ``output_dir`` for one run (``with OutputDirLock(dir): train(...)``); global rank 0
    takes it before anything is read or written there.

    The lock is a POSIX record lock (``fcntl.lockf``) on ``output_dir/.sd_ds.lock``, not ``flock``: both are
    released by the kernel when the holder dies (kill -9 included), but an ``flock`` is shared with every
    forked child, so a killed rank 0's data-loader workers would keep holding it for seconds after it died;
    a record lock belongs to the process that took it alone. Record locks also go through the NFS lock
    manager (NLM / NFSv4), where ``flock`` is on some setups only local to one client. Locks on network
    filesystems are still only as good as their lock service: on an NFS mount without one (``nolock``) two
    hosts can both "hold" it.

    The file records the holder (host, pid, start time, command) for the message a second run prints. It is
    rewritten in place, never replaced: a new inode would be a new, unlocked file.
    """

    def __init__(self, output_dir: str | os.PathLike, command: Optional[list[str]] = None) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.command = list(sys.argv if command is None else command)
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: a losing contender must not wipe the holder's record before reading it.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise OutputDirLocked(self._held_message()) from None
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": shlex.join(redact_argv(self.command))}  # the file is world-readable
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: deleting it would let a contender lock a fresh inode while a third process still
            # waits on the old one. Its stale record is only ever read while someone holds the lock.
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict[str, Any]:
        """The record the current holder wrote ({} if unreadable, e.g. caught mid-write)."""
        try:
            # Only ever called by a process that does NOT hold the lock: closing any descriptor of the file
            # would drop a record lock this process held.
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _held_message(self) -> str:
        h = self.holder()
        who = (f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, running since {h.get('start_time', '?')}"
               if h else "another process (its record in the lock file is not readable yet)")
        text = f"{self.path.parent} is in use by another training run: {who}."
        if h.get("command"):
            text += f"\n  its command: {h['command']}"
        return (text + f"\nStop that run first, or choose another --output_dir. (The lock is {self.path}; it is "
                       "released when its holder exits or dies, so there is nothing to delete by hand.)")

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def hold_output_dir(output_dir: str | os.PathLike, dist_info: Any) -> Iterator[Optional[OutputDirLock]]:
    """Collective, around the whole run: global rank 0 holds ``OutputDirLock``; when another live run holds
    it, every rank stops at once (SystemExit with the holder's host and pid), not only rank 0 while the others
    wait in a collective until the launcher's SIGKILL. ``dist_info``: ``is_main_process`` and
    ``broadcast_object`` (sd_ds.distributed.DistInfo)."""
    lock: Optional[OutputDirLock] = None
    refused: Optional[str] = None
    if dist_info.is_main_process:
        try:
            lock = OutputDirLock(output_dir).acquire()
        except OutputDirLocked as e:
            refused = str(e)
    refused = dist_info.broadcast_object(refused)
    if refused:
        raise SystemExit(f"sd_ds: {refused}")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


# --- ranks die with their launcher -----------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` when our parent dies (Linux only). The parent of a rank is the per-node
    ``deepspeed.launcher.launch`` process; SIGKILL, not SIGTERM, because SIGTERM asks the trainer for a
    checkpoint, whose collectives cannot finish once the launcher (and soon the other ranks) are gone."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie (killed, not yet reaped by its parent) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True  # no /proc to tell a zombie from a live process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # exited between the two checks
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _child_pids() -> list[int]:
    """Direct children of this process (Linux /proc; [] elsewhere)."""
    pids: list[int] = []
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


def _die(reason: str) -> None:
    # Without configured logging, Python's last-resort handler still prints this to stderr.
    logger.error("%s; exiting without a checkpoint (pid %d)", reason, os.getpid())
    # Our data-loader workers would notice our death only at their next status check (seconds later).
    for child in _child_pids():
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass
    os._exit(1)


@dataclass
class _Watch:
    parent_pid: int
    launcher_pid: Optional[int]


def _launcher_to_watch() -> Optional[int]:
    pid = os.environ.get(LAUNCHER_PID_ENV, "").strip()
    host = os.environ.get(LAUNCHER_HOST_ENV, "").strip()
    if not pid.isdigit() or not host:
        return None
    # On another node of a multi-node run the launcher's pid is another machine's: watch it only here.
    if host not in (socket.gethostname(), socket.getfqdn()):
        return None
    return int(pid)


def start_parent_watchdog(poll_s: float = 0.5) -> Optional[threading.Thread]:
    """Make this rank exit (``os._exit(1)``, no checkpoint) within about ``poll_s`` of its launcher's death.

    Three lines of defence, each for a case the others miss:
    1. ``PR_SET_PDEATHSIG`` (SIGKILL when the parent dies): instant, but only for the direct parent, the
       per-node ``deepspeed.launcher.launch`` process.
    2. The parent pid changes (we were re-parented to init or a subreaper): the parent died and the signal
       was missed, e.g. it died before ``prctl`` ran, or on a non-Linux system.
    3. ``run.sh`` (``SD_DS_LAUNCHER_PID`` on host ``SD_DS_LAUNCHER_HOST``) is gone: killing run.sh, or the
       ``deepspeed`` runner between them, leaves the per-node launcher alive, so 1 and 2 never fire.

    Returns the daemon thread, or None when there is nothing to watch (already re-parented to init at start
    and no launcher pid given): then this is a no-op.
    """
    parent = os.getppid()
    _set_parent_death_signal()
    launcher = _launcher_to_watch()
    if launcher is not None and not pid_alive(launcher):
        _die(f"the launcher (run.sh, pid {launcher}) is already gone")
    watch = _Watch(parent_pid=parent if parent > 1 else 0, launcher_pid=launcher)
    if not watch.parent_pid and watch.launcher_pid is None:
        return None
    thread = threading.Thread(target=_watch_loop, args=(watch, poll_s), name="sd_ds-parent-watchdog", daemon=True)
    thread.start()
    return thread


def _watch_loop(watch: _Watch, poll_s: float) -> None:
    while True:
        if watch.parent_pid and os.getppid() != watch.parent_pid:
            _die(f"the launcher process (parent pid {watch.parent_pid}) died")
        if watch.launcher_pid is not None and not pid_alive(watch.launcher_pid):
            _die(f"the launcher (run.sh, pid {watch.launcher_pid}) died")
        time.sleep(poll_s)


# --- leaving a process that ran collectives ------------------------------------------------------------------

_process_groups_created = False


def note_process_group() -> None:
    """Record that this process created a torch.distributed group: ``run_to_exit`` must then not finalize."""
    global _process_groups_created
    _process_groups_created = True


def _ran_collectives() -> bool:
    dist = sys.modules.get("torch.distributed")
    return _process_groups_created or (dist is not None and dist.is_available() and dist.is_initialized())


def end_process(status: int = 0) -> NoReturn:
    """Exit with ``status`` as the interpreter would, but without finalizing it.

    Gloo's worker threads drop a finished collective's tensors a moment after the caller has its result, and
    each drop takes the GIL (torch keeps a tensor's Python object alive while C++ holds the tensor). Once the
    interpreter has begun finalizing, CPython ends a thread that asks for the GIL with ``pthread_exit``, whose
    unwinding through that (noexcept) destructor calls ``std::terminate``: the rank dies with SIGABRT
    ("terminate called without an active exception") after its work is done and the launcher fails the job.
    Destroying the process groups does not end those threads (DeepSpeed keeps references to the groups). Caught in
    a core dump of tests/ema_worker.py (about 1 run in 10 on 2 busy cores): main thread in ``Py_FinalizeEx``, a gloo
    ``runLoop`` thread in ``~AsyncBarrierWork`` -> ``~AsyncAllgatherWork`` -> ``take_gil`` -> ``pthread_exit``.

    So a process that ran collectives does here what finalization does that matters: waits for its non-daemon
    threads, runs the atexit handlers (logging, data-loader workers, ``close_distributed``) while the GIL is
    still available to every thread, flushes stdout and stderr, and leaves with ``os._exit`` before any
    finalization starts.
    """
    # What the interpreter's own exit calls first: the threading-atexit hooks (concurrent.futures' pools, inductor's
    # compile pool: their idle workers wait for exactly that wake-up, so a plain join() of them never returns), then
    # a join of every non-daemon thread.
    if threading.current_thread() is threading.main_thread() and hasattr(threading, "_shutdown"):
        threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing more can be said there
            pass
    os._exit(status)


def run_to_exit(main: Callable[[], Any]) -> Any:
    """``sys.exit(run_to_exit(main))``: ``main()``'s exit status, and in a process that created a
    torch.distributed group the exit itself (``end_process``: no interpreter finalization to abort in)."""
    try:
        code = main()
    except SystemExit as e:
        if not _ran_collectives():
            raise
        code = e.code
    if not _ran_collectives():
        return code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what sys.exit("message") prints
        code = 1
    end_process(code or 0)


# --- consecutive skipped steps ---------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row were skipped for non-finite gradients."""


class SkipGuard:
    """Counts optimizer steps skipped in a row (non-finite gradients: the engine leaves the weights as they
    were) and raises ``TrainingDiverged`` at ``max_consecutive`` of them; 0 turns the guard off.

    Call ``update(engine.skipped_steps)`` once per optimizer step, before the step's checkpoint is saved: the
    run then stops with the last good checkpoint as the newest one (a skipped step changes no weights, so
    checkpoints saved during the streak hold the same weights, never non-finite ones).
    """

    def __init__(self, max_consecutive: int, skipped_total_at_start: int = 0) -> None:
        """``skipped_total_at_start``: the engine's count when this run started (restored on resume)."""
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self._last_total = skipped_total_at_start

    def update(self, skipped_total: int) -> None:
        """``skipped_total``: the engine's running count of skipped optimizer steps, after this step."""
        newly = skipped_total - self._last_total
        self._last_total = skipped_total
        self.consecutive = self.consecutive + newly if newly > 0 else 0
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: the last {self.consecutive} optimizer steps were all skipped because the "
                f"gradients were not finite (NaN/inf), so nothing is being trained. The newest checkpoint holds "
                f"the last good weights. Lower --learning_rate, check the data, or turn clipping on "
                f"(--max_grad_norm); --max_consecutive_skipped_steps {self.max_consecutive} set this limit "
                f"(0 = never stop).")

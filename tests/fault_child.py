"""Processes for tests/test_faults.py: a launcher stand-in with a rank under it, a lock holder, a fault point.

    python tests/fault_child.py parent [--no-pdeathsig]   spawns `rank`, prints its pid, sleeps
    python tests/fault_child.py rank [--no-pdeathsig]     start_parent_watchdog(), prints "ready", sleeps
    python tests/fault_child.py lock DIR [--fork]         holds OutputDirLock(DIR) (and forks a sleeping child
                                                          that inherits its descriptors), prints "locked PID"
    python tests/fault_child.py steps N                   calls fault_point("save_begin", s) for s = 1..N,
                                                          printing "step s" before each
Every mode sleeps at most 120 s, so nothing outlives a broken test for long.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_ds import faults, lifecycle  # noqa: E402


def main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "parent":
        child = subprocess.Popen([sys.executable, __file__, "rank", *args])
        print(child.pid, flush=True)
        time.sleep(120)
    elif mode == "rank":
        if "--no-pdeathsig" in args:  # leave only the watchdog thread to notice the parent's death
            lifecycle._set_parent_death_signal = lambda *a, **k: False
        thread = lifecycle.start_parent_watchdog(poll_s=0.2)
        print("ready" if thread is not None else "ready (nothing to watch)", flush=True)
        time.sleep(120)
    elif mode == "lock":
        lock = lifecycle.OutputDirLock(args[0], command=["fault_child", "lock"]).acquire()
        child_pid = 0
        if "--fork" in args:
            child_pid = os.fork()
            if child_pid == 0:  # like a data-loader worker: forked after the lock was taken
                time.sleep(120)
                os._exit(0)
        print(f"locked {child_pid}", flush=True)
        time.sleep(120)
        lock.release()
    elif mode == "steps":
        for step in range(1, int(args[0]) + 1):
            print(f"step {step}", flush=True)
            faults.fault_point("save_begin", step)
        print("done", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])

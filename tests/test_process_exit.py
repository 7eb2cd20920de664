"""How a process that ran gloo collectives leaves (sd_ds.lifecycle.run_to_exit / end_process): everything normal
exit does that matters still happens (its status, atexit handlers, non-daemon threads, buffered output), but the
interpreter is not finalized, which is where gloo's worker threads abort a finished rank (the lifecycle docstring
has the core dump). A process without collectives exits as before, finalization included."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT, free_port, subprocess_env

SCRIPT = """
import atexit, os, sys, threading, time
from sd_ds.lifecycle import run_to_exit

class Finalized:
    def __del__(self):
        os.write(1, b"interpreter finalized\\n")

marker = Finalized()  # a module global: collected only when the interpreter finalizes
pools = []
atexit.register(lambda: print("atexit handler ran"))

def main():
    if os.environ["GROUP"] == "1":
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
        t = torch.ones(3)
        dist.all_reduce(t)
        atexit.register(dist.destroy_process_group)  # as sd_ds.distributed.init_distributed does
        assert t.tolist() == [1.0, 1.0, 1.0]
    threading.Thread(target=lambda: (time.sleep(0.3), print("non-daemon thread finished"))).start()
    # An executor left open, as inductor's compile pool is: its idle workers wake only at the interpreter's exit.
    from concurrent.futures import ThreadPoolExecutor
    pools.append(ThreadPoolExecutor(2))  # kept referenced (a dropped executor would stop its workers itself)
    assert pools[0].submit(lambda: 6 * 7).result() == 42
    print("buffered, never flushed by main")  # stdout is a pipe: block-buffered
    code = os.environ["CODE"]
    if code.startswith("raise:"):
        raise SystemExit(code[6:] if not code[6:].isdigit() else int(code[6:]))
    return int(code)

sys.exit(run_to_exit(main))
"""


def run(group: bool, code: str) -> subprocess.CompletedProcess:
    env = subprocess_env({"GROUP": "1" if group else "0", "CODE": code, "PORT": str(free_port())})
    # A process that waits on its own idle threads at exit hangs: the timeout turns that into a failure.
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("code, status", [("0", 0), ("3", 3), ("raise:2", 2)])
def test_after_collectives_the_process_exits_as_usual_but_without_finalizing(code, status):
    proc = run(True, code)
    assert proc.returncode == status, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "buffered, never flushed by main" in lines
    assert "non-daemon thread finished" in lines
    assert lines[-1] == "atexit handler ran", lines  # after the thread, as at a normal exit
    assert "interpreter finalized" not in lines


def test_a_message_passed_to_sys_exit_is_printed_with_status_1():
    proc = run(True, "raise:cannot go on")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "cannot go on"
    assert "interpreter finalized" not in proc.stdout


def test_without_collectives_nothing_changes():
    """The marker proves the other tests' point: a normal exit finalizes (and would print it)."""
    proc = run(False, "3")
    assert proc.returncode == 3
    lines = proc.stdout.splitlines()
    assert {"buffered, never flushed by main", "non-daemon thread finished", "atexit handler ran"} <= set(lines)
    assert lines[-1] == "interpreter finalized"

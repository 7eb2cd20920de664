"""The suite's own plumbing under pytest-xdist (sd_ds.testing): the ports handed to servers a child starts, and
the scratch directories of bench scripts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from tests.helpers import REPO_ROOT, subprocess_env

EPHEMERAL_LOW = 32768  # Linux's default ip_local_port_range starts here


def _ports(worker: str, n: int = 50) -> list[int]:
    code = f"import json\nfrom sd_ds.testing import free_port\nprint(json.dumps([free_port() for _ in range({n})]))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=subprocess_env({"PYTEST_XDIST_WORKER": worker}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_workers_hand_out_ports_from_blocks_of_their_own_below_the_ephemeral_range():
    gw0, gw1, gw0_again = _ports("gw0"), _ports("gw1"), _ports("gw0")
    assert len(set(gw0)) == len(gw0)  # a process never hands out a port twice
    assert all(p < EPHEMERAL_LOW for p in gw0 + gw1)
    assert not set(gw0) & set(gw1) and not set(gw0_again) & set(gw1)
    assert gw0 != gw0_again  # two processes of one worker start at different places in its block


def test_a_port_someone_listens_on_is_never_handed_out(monkeypatch):
    from sd_ds import testing

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw5")
    monkeypatch.setattr(testing, "_next_port", 100)  # mid-block: no wrap-around in this test
    first = testing.free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", first + 1))
        held.listen()
        second = testing.free_port()
    assert 25000 <= first < second < 26000 and second != first + 1


def test_a_scratch_directory_is_gone_when_the_process_ends_through_end_process():
    code = ("import sys\nfrom sd_ds.lifecycle import end_process\nfrom sd_ds.testing import scratch_dir\n"
            "d = scratch_dir('sd_ds_test_')\n(d / 'f').write_bytes(b'x' * 1000)\nprint(d, flush=True)\nend_process(0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    from pathlib import Path

    made = Path(proc.stdout.strip())
    assert made.name.startswith("sd_ds_test_") and not made.exists()

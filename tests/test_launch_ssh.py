"""run.sh's launches: what it hands the deepspeed launcher (fast, with a stand-in `deepspeed` and `nvidia-smi`), and
a real multi-node launch over ssh: run.sh → DeepSpeed's pdsh runner → ssh → two "nodes" on loopback.

The ssh test starts its own sshd (host and user keys in a temporary directory, a free port, listening on 127.0.0.1
and 127.0.0.2) and points ssh at it through a wrapper on PATH (ssh reads ~/.ssh/config from the passwd home,
not $HOME, so the real ~/.ssh is never touched). Every rank, the one on 127.0.0.1 too, is started by sshd with
a fresh environment: what the launching shell sets reaches it only through run.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sd_ds.ema import shard_path
from tests.helpers import REPO_ROOT, free_port, subprocess_env, train_flags


SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)


# --- what run.sh hands the launcher --------------------------------------------------------------------------

FAKE_DEEPSPEED = """#!/bin/sh
# Stands in for the deepspeed launcher: records its arguments, its environment and the env file it was given.
printf '%s\\n' "$@" > "$SD_DS_TEST_RECORD/args"
env > "$SD_DS_TEST_RECORD/env"
if [ -n "$DS_ENV_FILE" ] && [ -f "$DS_ENV_FILE" ]; then cp "$DS_ENV_FILE" "$SD_DS_TEST_RECORD/ds_env"; fi
"""
FAKE_NVIDIA_SMI = """#!/bin/sh
for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""


def launch(tmp_path: Path, env: dict, flags: tuple = ("--output_dir", "out"), gpus: bool = False) -> dict:
    """Run run.sh with a recording `deepspeed` (and an 8-GPU `nvidia-smi` when gpus) first on PATH."""
    fake = tmp_path / "fake_bin"
    record = tmp_path / "record"
    for d in (fake, record):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    tools = {"deepspeed": FAKE_DEEPSPEED, **({"nvidia-smi": FAKE_NVIDIA_SMI} if gpus else {})}
    for name, text in tools.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    full_env = subprocess_env({"PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                               "VIRTUAL_ENV": str(Path(sys.executable).parent.parent), "HOME": str(home),
                               "SD_DS_TEST_RECORD": str(record)})
    for inherited in ("HOSTFILE", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "INCLUDE", "EXCLUDE", "NO_SSH",
                      "NODE_RANK", "DS_CONFIG", "FLAG_USE_EMA", "FLAG_RECOMPUTE", "FLAG_XFORMERS",
                      "CUDA_VISIBLE_DEVICES", "LAUNCHER_ARGS", "DS_ENV_FILE", "DS_ACCELERATOR"):
        full_env.pop(inherited, None)
    full_env.update(env)
    proc = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), *flags], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=300)
    got = {"rc": proc.returncode, "stderr": proc.stderr}
    if (record / "args").exists():
        got["args"] = (record / "args").read_text().splitlines()
        got["env"] = dict(line.split("=", 1) for line in (record / "env").read_text().splitlines() if "=" in line)
        got["ds_env"] = (record / "ds_env").read_text() if (record / "ds_env").exists() else None
    return got


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def test_single_node_gpu_selection(tmp_path):
    # All GPUs: no --num_gpus / --include, DeepSpeed takes every GPU (or CUDA_VISIBLE_DEVICES', which it reads).
    got = launch(tmp_path, {}, gpus=True)
    assert got["rc"] == 0, got["stderr"]
    assert "--num_gpus" not in got["args"] and "--include" not in got["args"]
    assert _value(got["args"], "--master_addr") == "127.0.0.1"
    got = launch(tmp_path, {"CUDA_VISIBLE_DEVICES": "2,3"}, gpus=True)
    assert "--num_gpus" not in got["args"] and got["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    # NPROC_PER_NODE with CUDA_VISIBLE_DEVICES: the first N of the visible GPUs (--num_gpus would take 0..N-1).
    got = launch(tmp_path, {"CUDA_VISIBLE_DEVICES": "1,3,5", "NPROC_PER_NODE": "2"}, gpus=True)
    assert _value(got["args"], "--include") == "localhost:1,3" and "--num_gpus" not in got["args"]
    got = launch(tmp_path, {"NPROC_PER_NODE": "4"}, gpus=True)
    assert _value(got["args"], "--num_gpus") == "4"
    # GPU ranks share the node's cores (CPU Adam with offload): OMP_NUM_THREADS = cores / ranks unless given.
    got = launch(tmp_path, {"NPROC_PER_NODE": "4", "OMP_NUM_THREADS": ""}, gpus=True)
    assert got["env"]["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 4))
    # CPU-only: CPU ranks are counted by --num_gpus (2 by default).
    got = launch(tmp_path, {})
    assert _value(got["args"], "--num_gpus") == "2" and got["env"]["DS_ACCELERATOR"] == "cpu"


@pytest.mark.slow
def test_hostfile_slots_include_exclude_and_master_addr(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=8\nnodeB slots=8\nnodeC slots=8\n")
    got = launch(tmp_path, {"HOSTFILE": str(hostfile)}, gpus=True)
    assert got["rc"] == 0, got["stderr"]
    # The hostfile's slots rule (no --num_gpus); the rendezvous is its first host, as DeepSpeed's default.
    assert "--num_gpus" not in got["args"] and _value(got["args"], "--hostfile") == str(hostfile)
    assert _value(got["args"], "--master_addr") == "nodeA"
    got = launch(tmp_path, {"HOSTFILE": str(hostfile), "INCLUDE": "nodeB:0,1@nodeC"}, gpus=True)
    assert _value(got["args"], "--include") == "nodeB:0,1@nodeC" and "--num_gpus" not in got["args"]
    assert _value(got["args"], "--master_addr") == "nodeB"
    got = launch(tmp_path, {"HOSTFILE": str(hostfile), "EXCLUDE": "nodeA"}, gpus=True)
    assert _value(got["args"], "--exclude") == "nodeA" and _value(got["args"], "--master_addr") == "nodeB"
    got = launch(tmp_path, {"HOSTFILE": str(hostfile), "MASTER_ADDR": "10.0.0.7"}, gpus=True)
    assert _value(got["args"], "--master_addr") == "10.0.0.7"
    # An explicit NPROC_PER_NODE overrides the slots, as documented; it cannot be combined with INCLUDE.
    got = launch(tmp_path, {"HOSTFILE": str(hostfile), "NPROC_PER_NODE": "4"}, gpus=True)
    assert _value(got["args"], "--num_gpus") == "4"
    got = launch(tmp_path, {"HOSTFILE": str(hostfile), "INCLUDE": "nodeA", "NPROC_PER_NODE": "4"}, gpus=True)
    assert got["rc"] == 2 and "NPROC_PER_NODE cannot be combined with INCLUDE" in got["stderr"]
    got = launch(tmp_path, {"HOSTFILE": str(hostfile), "INCLUDE": "nodeD"}, gpus=True)
    assert got["rc"] == 2 and "nodeD" in got["stderr"] and "args" not in got


@pytest.mark.slow
def test_env_switches_become_flags_and_reach_other_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=eth1\n# a comment\n\nHF_HOME=/shared/hf\n")
    env = {"HOSTFILE": str(hostfile), "FLAG_USE_EMA": "1", "FLAG_RECOMPUTE": "0", "FLAG_XFORMERS": "True",
           "DS_CONFIG": "ds_configs/zero2_bf16_offload.json", "HF_HOME": "/local/hf", "HF_TOKEN": "hf_abc",
           "SD_DS_SOMETHING": "a b", "HF_BAD": 'say "hi"', "UNRELATED_VAR": "x", "GLOO_SOCKET_IFNAME": "ib0",
           "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "CUDA_VISIBLE_DEVICES": "3,4"}
    got = launch(tmp_path, env, gpus=True)
    assert got["rc"] == 0, got["stderr"]
    args = got["args"]
    user = args[args.index("sd_ds.train") + 1:]
    assert user == ["--output_dir", "out", "--use_ema", "1", "--enable_xformers_memory_efficient_attention", "True",
                    "--deepspeed", "ds_configs/zero2_bf16_offload.json"]
    lines = got["ds_env"].splitlines()
    for line in ("FLAG_USE_EMA=1", "HF_TOKEN=hf_abc", "SD_DS_SOMETHING=a b", "NCCL_SOCKET_IFNAME=eth1",
                 f"SD_DS_LAUNCHER_HOST={got['env']['SD_DS_LAUNCHER_HOST']}",
                 f"SD_DS_LAUNCHER_PID={got['env']['SD_DS_LAUNCHER_PID']}", "GLOO_SOCKET_IFNAME=ib0",
                 "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", "CUDA_DEVICE_MAX_CONNECTIONS=1"):
        assert line in lines, line
    # The user's ~/.deepspeed_env comes after this shell's values (DeepSpeed lets the file win); no junk lines.
    assert lines.index("HF_HOME=/shared/hf") > lines.index("HF_HOME=/local/hf")
    assert all("=" in line and not line.startswith("#") for line in lines)
    # CUDA_VISIBLE_DEVICES is the launcher's per node: this node's value must not pin the others' GPUs.
    assert not any(line.startswith(("HF_BAD=", "UNRELATED_VAR=", "CUDA_VISIBLE_DEVICES=")) for line in lines)
    assert "not forwarding HF_BAD" in got["stderr"]
    # An explicit --deepspeed wins over DS_CONFIG; a switch that is off adds nothing.
    got = launch(tmp_path, {"DS_CONFIG": "a.json", "FLAG_USE_EMA": "off"}, ("--deepspeed", "b.json"))
    user = got["args"][got["args"].index("sd_ds.train") + 1:]
    assert user == ["--deepspeed", "b.json"]
    # Without ssh (single node) there is no env file: the ranks are children of this shell.
    assert got["ds_env"] is None


# --- a real launch over ssh --------------------------------------------------------------------------------

def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux (127.0.0.2 as a second loopback host, /proc)"
    for tool, have in (("pdsh", shutil.which("pdsh")), ("sshd (openssh-server)", SSHD), ("ssh", shutil.which("ssh")),
                       ("ssh-keygen", shutil.which("ssh-keygen"))):
        if not have:
            return f"{tool} is not installed (.ci/run installs openssh-server and pdsh with apt-get)"
    if os.geteuid() != 0:
        return "the test's sshd must run as root to accept logins (run the tests as root, as .ci/run does in CI)"
    return None


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory):
    """sshd on a free port; yields the PATH that makes ssh (and so pdsh and DeepSpeed) use it."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True, timeout=60)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n")
    (d / "ssh_config").write_text(
        f"Host *\n  Port {port}\n  IdentityFile {d / 'user_key'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  GlobalKnownHostsFile /dev/null\n"
        "  ConnectTimeout 10\n  LogLevel ERROR\n")
    bin_dir = d / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d / "ssh_config"} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = open(d / "sshd.log", "w")
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    path = f"{bin_dir}:{os.environ['PATH']}"
    try:
        deadline = time.time() + 30
        while True:
            probes = [subprocess.run(["ssh", host, "true"], env={**os.environ, "PATH": path}, timeout=20,
                                     capture_output=True) for host in ("127.0.0.1", "127.0.0.2")]
            if all(p.returncode == 0 for p in probes):
                break
            if sshd.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the test's sshd does not accept logins:\n{(d / 'sshd.log').read_text()}\n"
                                     f"{probes[-1].stderr.decode(errors='replace')}")
            time.sleep(0.5)
        yield {"PATH": path}
    finally:
        sshd.terminate()
        try:
            sshd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sshd.kill()
            sshd.wait(timeout=10)
        log.close()


def _launched_by(launcher_pid: int) -> list[int]:
    """Processes (ranks, their launchers' children) whose environment names run.sh `launcher_pid` on this host."""
    marker = f"SD_DS_LAUNCHER_PID={launcher_pid}".encode()
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if marker in (p / "environ").read_bytes().split(b"\0"):
                found.append(int(p.name))
        except OSError:
            continue
    return found


def _wait_for(path: Path, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run.sh exited early ({proc.returncode}):\n{proc.stdout.read()[-6000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.5)


@pytest.mark.slow
def test_pdsh_launch_forwards_the_environment_and_sigterm_checkpoints_every_node(ssh_nodes, assets, tmp_path):
    # 127.0.0.2 first: with a HOSTFILE and no MASTER_ADDR the rendezvous is the hostfile's first host.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.2 slots=1\n127.0.0.1 slots=1\n")
    out = tmp_path / "out"
    max_steps = 100
    flags = train_flags(out, assets["shards"], assets["model"], max_steps=max_steps, save_steps=3)
    env = subprocess_env({"HOSTFILE": str(hostfile), "FLAG_USE_EMA": "1", "MASTER_PORT": str(free_port()),
                          "HF_SD_DS_TEST_MARKER": "forwarded", **ssh_nodes})
    for inherited in ("MASTER_ADDR", "NPROC_PER_NODE", "NO_SSH", "NODE_RANK", "INCLUDE", "EXCLUDE", "DS_ENV_FILE"):
        env.pop(inherited, None)
    proc = subprocess.Popen(["bash", str(REPO_ROOT / "run.sh"), *flags], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(out / "checkpoint-3" / "trainer_state.json", 600, proc)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=240)  # a node that never got the signal would train on to max_steps
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=60)
        stragglers = _launched_by(proc.pid)
        for pid in stragglers:  # only this run's processes, found by the run.sh pid in their environment
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, log[-6000:]
    assert not stragglers, f"processes of the run outlived run.sh: {stragglers}"

    # The pdsh command line carries the launching shell's variables to every node, the rendezvous is the
    # hostfile's first host, and each node runs its hostfile slots (one rank), not a --num_gpus count.
    (cmd,) = [line for line in log.splitlines() if "cmd = pdsh" in line]
    for export in ("export FLAG_USE_EMA=1;", "export HF_HUB_OFFLINE=1;", "export HF_SD_DS_TEST_MARKER=forwarded;",
                   "export DS_ACCELERATOR=cpu;", f"export SD_DS_LAUNCHER_PID={proc.pid};", "export OMP_NUM_THREADS=1;"):
        assert export in cmd, export
    assert "--master_addr=127.0.0.2" in cmd
    assert "WORLD INFO DICT: {'127.0.0.2': [0], '127.0.0.1': [0]}" in log
    lines = log.splitlines()
    for node in ("127.0.0.1", "127.0.0.2"):
        # run.sh's SIGTERM reached the node over ssh, and the node's rank then exited 0.
        assert any(line.startswith(f"{node}: run.sh: ") and "asking trainer ranks" in line for line in lines), node
        assert any(line.startswith(f"{node}: ") and "exits successfully" in line for line in lines), node
    assert "stop requested" in log

    # Every rank checkpointed where the stop was agreed, with its EMA shard; EMA ran on both ranks from step 1.
    done = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    stopped_at = done[-1]
    assert 3 < stopped_at < max_steps, (done, log[-3000:])
    ckpt = out / f"checkpoint-{stopped_at}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == stopped_at
    assert state["config"]["ema"]["use_ema"] is True
    applied_steps = stopped_at - state["skipped_steps"]  # an overflow-skipped step is no EMA update
    for rank in (0, 1):
        shard = torch.load(shard_path(ckpt, rank), map_location="cpu", weights_only=True)
        assert shard["dp_rank"] == rank and shard["dp_world_size"] == 2
        assert shard["num_updates"] == applied_steps, (rank, shard["num_updates"], applied_steps)

"""Fault suite (issue 11): each fault is injected for real and the run must survive it with nothing lost.

The unit tests drive ``sd_ds.lifecycle`` through real processes (tests/fault_child.py). The end-to-end tests
run the trainer (tiny preset, 32 px, a few steps; 2 CPU ranks through run.sh, or one rank directly) and land
each fault at an exact moment through ``SD_DS_FAULT`` (a kill or a pause at a named point of a save), never
after a racing sleep:

- kill -9 of every rank in the middle of a save, then a rerun: it resumes from the newest complete
  checkpoint; the older checkpoints stay byte-identical;
- kill -9 of run.sh, and of the deepspeed launcher: no process of the run is left a few seconds later;
- a second run on a live output_dir: refused at once, naming the holder (host, pid);
- one rank killed: the run exits non-zero within seconds;
- a full disk while saving (a small tmpfs; skipped where mount is not allowed): a clear message, the
  previous checkpoint intact;
- an empty and a non-tar ``.tar`` among the shards: named, skipped, training goes on;
- tampered checkpoint files (a pickle payload in DeepSpeed's model/optimizer files, in the rank state): no
  code runs, on resume or export;
- a learning rate that makes every step non-finite: the run stops non-zero after N skipped steps in a row,
  the last good checkpoint kept;
- out-of-range flags: exit 2 with the rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil
import pytest

from sd_ds.faults import Fault, parse_faults
from sd_ds.lifecycle import OutputDirLock, OutputDirLocked, SkipGuard, TrainingDiverged
from tests.helpers import REPO_ROOT, free_port, small_tmpfs, subprocess_env, train_flags, write_tiny_shards

CHILD = Path(__file__).with_name("fault_child.py")
HOST = socket.gethostname()
NO_LAUNCHER = {"SD_DS_LAUNCHER_PID": "", "SD_DS_LAUNCHER_HOST": "", "SD_DS_FAULT": "", "SD_DS_FAULT_DIR": ""}


# --- process helpers --------------------------------------------------------------------------------------------

def _spawn(*args: str, env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env({**NO_LAUNCHER, **(env or {})}))


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float) -> list[str]:
    """Survivors after ``timeout`` seconds, described (pid and command line)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.2)
    survivors = []
    for p in pids:
        if not _gone(p):
            try:
                survivors.append(f"{p}: {' '.join(psutil.Process(p).cmdline())[:200]}")
            except psutil.NoSuchProcess:
                pass
    return survivors


def _descendants(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_all(pids) -> None:
    """Teardown: SIGKILL what a failed test may have left (only processes this test started)."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


# --- lifecycle unit tests -------------------------------------------------------------------------------------

def test_second_holder_is_refused_with_the_holders_host_and_pid_and_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = _spawn("lock", str(tmp_path))
    try:
        assert holder.stdout.readline().startswith("locked"), holder.stderr.read()
        with pytest.raises(OutputDirLocked) as refused:
            OutputDirLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"pid {holder.pid} on host {HOST}" in message and "fault_child lock" in message, message
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        # The kernel dropped the dead holder's lock: taken over, nothing to clean by hand.
        with OutputDirLock(tmp_path, command=["the", "second", "run"]):
            contender = _spawn("lock", str(tmp_path))
            _, err = contender.communicate(timeout=60)
            assert contender.returncode != 0 and f"pid {os.getpid()} on host {HOST}" in err, err
            assert "the second run" in err
        # Released on leaving the block: another process gets it.
        third = _spawn("lock", str(tmp_path))
        assert third.stdout.readline().startswith("locked"), third.stderr.read()
        third.kill()
        third.wait()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_forked_children_do_not_keep_the_lock(tmp_path):
    """Rank 0's data-loader workers are forked after it took the lock; its death must free the lock at once,
    not when they notice (seconds later)."""
    holder = _spawn("lock", str(tmp_path), "--fork")
    child = 0
    try:
        line = holder.stdout.readline()
        child = int(line.split()[1])
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        assert not _gone(child)
        OutputDirLock(tmp_path).acquire().release()
    finally:
        holder.kill()
        _kill_all([child] if child else [])


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["prctl", "reparent-poll"])
def test_rank_dies_within_seconds_when_its_parent_is_killed(pdeathsig):
    parent = _spawn("parent", *([] if pdeathsig else ["--no-pdeathsig"]))
    rank = 0
    try:
        rank = int(parent.stdout.readline())
        assert parent.stdout.readline().startswith("ready"), parent.stderr.read()
        killed_at = time.time()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_gone([rank], timeout=5) == []
        assert time.time() - killed_at < 5
    finally:
        _kill_all([parent.pid, rank] if rank else [parent.pid])


def test_rank_dies_when_run_sh_is_gone_even_while_its_parent_lives():
    """Killing run.sh (or the deepspeed runner under it) leaves the per-node launcher, the ranks' parent,
    alive: only SD_DS_LAUNCHER_PID tells the ranks."""
    launcher = subprocess.Popen(["sleep", "120"])
    rank = _spawn("rank", env={"SD_DS_LAUNCHER_PID": str(launcher.pid), "SD_DS_LAUNCHER_HOST": HOST})
    try:
        assert rank.stdout.readline().startswith("ready"), rank.stderr.read()
        launcher.kill()  # not reaped yet: a zombie, which must count as dead
        _, err = rank.communicate(timeout=10)
        assert rank.returncode == 1
        assert f"the launcher (run.sh, pid {launcher.pid}) died" in err
    finally:
        launcher.kill()
        launcher.wait()
        rank.kill()


def test_watchdog_is_a_no_op_when_the_launcher_is_another_hosts_pid():
    launcher = subprocess.Popen(["sleep", "120"])
    rank = _spawn("rank", env={"SD_DS_LAUNCHER_PID": str(launcher.pid), "SD_DS_LAUNCHER_HOST": "another-node.invalid"})
    try:
        assert rank.stdout.readline().startswith("ready"), rank.stderr.read()
        launcher.kill()
        launcher.wait()
        time.sleep(1.5)  # the watchdog polls every 0.2 s here
        assert rank.poll() is None, rank.stderr.read()
    finally:
        launcher.kill()
        rank.kill()
        rank.wait()


def test_skip_guard_counts_only_skips_in_a_row():
    guard = SkipGuard(3)
    for total in (0, 1, 1, 2, 3):  # applied, skipped, applied (streak reset), skipped, skipped
        guard.update(total)
    assert guard.consecutive == 2
    with pytest.raises(TrainingDiverged, match="last 3 optimizer steps were all skipped"):
        guard.update(4)
    off = SkipGuard(0)
    for total in range(1, 1001):
        off.update(total)
    resumed = SkipGuard(2, skipped_total_at_start=10)  # the engine's count survives a resume
    resumed.update(10)
    resumed.update(11)
    with pytest.raises(TrainingDiverged):
        resumed.update(12)


def test_fault_specs_parse_and_typos_are_errors():
    assert parse_faults("save_begin:step=3") == [Fault("save_begin", step=3)]
    assert parse_faults("save_engine_written:action=pause:rank=1, save_before_complete") == [
        Fault("save_engine_written", action="pause", rank=1), Fault("save_before_complete")]
    assert parse_faults("sample:action=kill_worker:count=3:once=/tmp/m,sample:action=sleep:seconds=0.5") == [
        Fault("sample", action="kill_worker", count=3, once="/tmp/m"), Fault("sample", action="sleep", seconds=0.5)]
    assert parse_faults("") == []
    with pytest.raises(ValueError, match="unknown fault point"):
        parse_faults("save_beginn:step=3")
    with pytest.raises(ValueError, match="unknown action"):
        parse_faults("save_begin:step=3:action=explode")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_faults("save_begin:3")  # the positional form is not accepted: every option says what it is
    with pytest.raises(ValueError, match="not a number"):
        parse_faults("part:count=three")


def test_fault_point_kills_at_the_named_step_only_on_the_named_rank(tmp_path):
    proc = _spawn("steps", "5", env={"SD_DS_FAULT": "save_begin:step=3", "SD_DS_FAULT_DIR": str(tmp_path),
                                     "RANK": "0"})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert out.split() == ["step", "1", "step", "2", "step", "3"]
    assert (tmp_path / "fired.kill.0").is_file()
    other_rank = _spawn("steps", "5", env={"SD_DS_FAULT": "save_begin:step=3:rank=1", "RANK": "0"})
    out, err = other_rank.communicate(timeout=60)
    assert other_rank.returncode == 0 and out.strip().endswith("done"), err


def test_fault_pause_holds_the_process_until_go(tmp_path):
    proc = _spawn("steps", "3", env={"SD_DS_FAULT": "save_begin:step=2:action=pause",
                                     "SD_DS_FAULT_DIR": str(tmp_path)})
    try:
        deadline = time.time() + 60
        while not (tmp_path / "reached.0").exists():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None
        (tmp_path / "go").touch()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and out.split() == ["step", "1", "step", "2", "step", "3", "done"]
    finally:
        proc.kill()


# --- end to end: the trainer under faults ------------------------------------------------------------------------

def _digests(ckpt: Path) -> dict[str, str]:
    return {str(p.relative_to(ckpt)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ckpt.rglob("*")) if p.is_file()}


def _complete(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                  key=lambda n: int(n.split("-")[1]))


class Run:
    """One trainer launch with its log in a file: ``./run.sh`` (nproc ranks) or ``python -m sd_ds.train``
    (one rank, no launcher). Remembers every process it saw below it, for the no-orphans checks and teardown."""

    def __init__(self, out: Path, assets: dict, log: Path, *, nproc: int = 2, fault: str = "",
                 fault_dir: Optional[Path] = None, shards: Optional[Path] = None, **flags) -> None:
        self.log, self.fault_dir, self.seen = log, fault_dir, set()
        args = train_flags(out, shards or assets["shards"], assets["model"], **flags)
        env = subprocess_env({**NO_LAUNCHER, "NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(free_port()),
                              "SD_DS_FAULT": fault, "SD_DS_FAULT_DIR": str(fault_dir or "")})
        cmd = ["bash", str(REPO_ROOT / "run.sh"), *args] if nproc > 1 else [sys.executable, "-m", "sd_ds.train", *args]
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.seen.add(self.proc.pid)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return self.text()[-n:]

    def watch(self) -> None:
        if self.proc.poll() is None:
            self.seen.update(_descendants(self.proc.pid))

    def wait_reached(self, ranks: int, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not all((self.fault_dir / f"reached.{r}").exists() for r in range(ranks)):
            self.watch()
            if self.proc.poll() is not None:
                raise AssertionError(f"run exited ({self.proc.returncode}) before the fault point:\n{self.tail()}")
            if time.time() > deadline:
                raise AssertionError(f"no rank reached the fault point in {timeout} s:\n{self.tail()}")
            time.sleep(0.2)
        self.watch()

    def wait(self, timeout: float = 300) -> int:
        deadline = time.time() + timeout
        while self.proc.poll() is None:
            self.watch()
            if time.time() > deadline:
                raise AssertionError(f"run did not finish in {timeout} s:\n{self.tail()}")
            time.sleep(0.2)
        return self.proc.returncode

    def kill_leftovers(self) -> None:
        _kill_all(self.seen)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.mark.slow
def test_kills_during_a_run_lose_nothing_and_leave_no_process(assets, tmp_path):
    """One output_dir through five launches (2 CPU ranks, run.sh), each ending in a different fault, the last
    one finishing: save every 2 steps, 6 steps."""
    out = tmp_path / "out"
    runs: list[Run] = []

    def launch(name: str, fault: str = "") -> Run:
        run = Run(out, assets, tmp_path / f"{name}.log", fault=fault, fault_dir=tmp_path / name,
                  max_steps=6, save_steps=2)
        runs.append(run)
        return run

    try:
        # 1. Every rank SIGKILLed in the middle of saving checkpoint-4 (DeepSpeed's files written, ours not).
        run = launch("kill_all_mid_save", "save_engine_written:step=4")
        assert run.wait() != 0
        assert (tmp_path / "kill_all_mid_save" / "fired.kill.0").is_file(), run.tail()
        assert _complete(out) == ["checkpoint-2"] and (out / "checkpoint-4").is_dir()
        checkpoint_2 = _digests(out / "checkpoint-2")

        # 2. Paused at the next save: a second run on the live output_dir is refused, naming the holder; then
        #    kill -9 run.sh: every process of the run must be gone within seconds.
        run = launch("kill_run_sh", "save_begin:step=4:action=pause")
        run.wait_reached(ranks=2)
        assert f"resumed from {out / 'checkpoint-2'} at step 2" in run.text(), run.tail()
        holder_pid = int((tmp_path / "kill_run_sh" / "reached.0").read_text())
        second = subprocess.run([sys.executable, "-m", "sd_ds.train",
                                 *train_flags(out, assets["shards"], assets["model"], max_steps=6, save_steps=2)],
                                cwd=REPO_ROOT, env=subprocess_env({**NO_LAUNCHER, "MASTER_PORT": str(free_port())}),
                                capture_output=True, text=True, timeout=180)
        refusal = second.stdout + second.stderr
        assert second.returncode != 0, refusal[-3000:]
        assert f"pid {holder_pid} on host {HOST}" in refusal and "in use by another training run" in refusal, refusal[-3000:]
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait()
        assert _wait_gone(sorted(run.seen), timeout=10) == [], "processes outlived run.sh"

        # 3. The same with the deepspeed launcher (the runner run.sh started) killed instead.
        run = launch("kill_launcher", "save_begin:step=4:action=pause")
        run.wait_reached(ranks=2)
        (runner,) = [c for c in psutil.Process(run.proc.pid).children()
                     if "deepspeed" in " ".join(c.cmdline()) and "deepspeed.launcher.launch" not in " ".join(c.cmdline())]
        runner.send_signal(signal.SIGKILL)
        assert _wait_gone(sorted(run.seen), timeout=10) == [], "processes outlived the deepspeed launcher"
        assert run.wait(timeout=10) != 0

        # 4. One rank killed (rank 1, its part of checkpoint-4 written): the run exits non-zero within seconds.
        run = launch("kill_one_rank", "save_before_complete:step=4:rank=1")
        rc = run.wait()
        exited_at = time.time()
        fired = tmp_path / "kill_one_rank" / "fired.kill.1"
        assert rc != 0 and fired.is_file(), run.tail()
        took = exited_at - float(fired.read_text().split()[-1])
        assert took < 20, f"the run took {took:.1f} s to stop after rank 1 died"
        assert not (tmp_path / "kill_one_rank" / "fired.kill.0").exists()
        assert _wait_gone(sorted(run.seen), timeout=10) == []

        # 5. A clean rerun resumes from the newest complete checkpoint and finishes.
        run = launch("finish")
        assert run.wait() == 0, run.tail()
        assert f"resumed from {out / 'checkpoint-2'} at step 2" in run.text()
        assert _complete(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
        assert (out / "latest").read_text().strip() == "checkpoint-6"
        assert _digests(out / "checkpoint-2") == checkpoint_2, "a complete checkpoint changed"
        assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["samples_seen"] == 6 * 8
    finally:
        for run in runs:
            run.kill_leftovers()


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "160m") as mount_point:
        yield mount_point


@pytest.mark.slow
def test_disk_full_while_saving_names_the_checkpoint_and_keeps_the_previous_one(assets, small_disk, tmp_path):
    out, fault_dir = small_disk / "out", tmp_path / "fault"
    run = Run(out, assets, tmp_path / "run.log", nproc=1, fault="save_begin:step=4:action=pause", fault_dir=fault_dir,
              max_steps=4, save_steps=2, dataloader_num_workers=0)
    try:
        run.wait_reached(ranks=1)
        checkpoint_2 = _digests(out / "checkpoint-2")
        # Leave 64 KiB: checkpoint-4's first file cannot be written.
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        with open(small_disk / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, free - 64 * 1024)
        (fault_dir / "go").touch()
        assert run.wait() != 0
        log = run.text()
        assert "no space left on device while writing checkpoint-4" in log and "checkpoint-2 is intact" in log, log[-4000:]
        # The first error a user reads says what happened (not torch's "basic_ios::clear: iostream error"), and
        # no later error (a log file closed on the full disk) buries it.
        after_fault = log[log.index("injected fault pause"):].splitlines()[1:]
        errors = [line for line in after_fault if "error" in line.lower()]
        assert "no space left on device while writing checkpoint-4" in errors[0], "\n".join(errors)
        assert "no space left on device while writing checkpoint-4" in errors[-1], "\n".join(errors)
        assert _complete(out) == ["checkpoint-2"]
        assert _digests(out / "checkpoint-2") == checkpoint_2
    finally:
        run.kill_leftovers()


@pytest.fixture(scope="module")
def diverging_run(assets, tmp_path_factory):
    """One rank (launches cost tens of seconds here, so one run serves three scenarios): shards = 2 good ones
    plus a zero-byte and a non-tar .tar, without sizes.json; --learning_rate 1e30, so step 1 blows the weights
    up and every later step has non-finite gradients and is skipped; a limit of 3 skipped steps in a row."""
    root = tmp_path_factory.mktemp("diverging")
    shards = write_tiny_shards(root / "shards", num_shards=2, samples_per_shard=16)
    (shards / "sizes.json").unlink()
    (shards / "00002.tar").write_bytes(b"")
    (shards / "00003.tar").write_bytes(b"this is not a tar archive\n" * 64)
    out = root / "out"
    run = Run(out, assets, root / "run.log", nproc=1, shards=shards, learning_rate=1e30,
              max_consecutive_skipped_steps=3, max_steps=20, save_steps=2, dataloader_num_workers=0)
    rc = run.wait()
    run.kill_leftovers()
    return out, run.text(), rc


@pytest.mark.slow
def test_empty_and_corrupt_shards_are_named_and_skipped(diverging_run):
    out, log, _ = diverging_run
    assert "00002.tar" in log and "00003.tar" in log, log[-4000:]
    assert " step 3 loss" in log, "training did not go on with the readable shards"


@pytest.mark.slow
def test_every_step_non_finite_stops_the_run_and_keeps_the_last_good_checkpoint(diverging_run):
    """Steps 2, 3, 4 skipped: the run must stop at step 4, non-zero, before saving it (or logging step 5)."""
    import torch

    from tests.helpers import fp32_weights

    out, log, rc = diverging_run
    assert rc != 0, log[-4000:]
    assert "training diverged: the last 3 optimizer steps were all skipped" in log, log[-4000:]
    assert " step 3 loss" in log and " step 5 loss" not in log
    assert _complete(out) == ["checkpoint-2"]
    weights = fp32_weights(out / "checkpoint-2")
    assert all(torch.isfinite(w).all() for w in weights.values()), "the kept checkpoint holds non-finite weights"


class _Payload:
    """Unpickling this runs code: it writes ``marker``. Loading a checkpoint must never do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickled code ran')",))


def _plant(path: Path, marker: Path) -> None:
    """Add a payload to a torch.save file, keeping everything else, so that an unsafe load would succeed."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, trusted here
    state["sd_ds_test_payload"] = _Payload(marker)
    torch.save(state, path)


def _copy_run(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("runs"))
    return dest


@pytest.mark.slow
def test_tampered_model_states_do_not_run_code_on_resume(assets, diverging_run, tmp_path):
    out = _copy_run(diverging_run[0], tmp_path / "out")
    marker = tmp_path / "PWNED_model_states"
    _plant(out / "checkpoint-2" / "mp_rank_00_model_states.pt", marker)
    run = Run(out, assets, tmp_path / "run.log", nproc=1, max_steps=4, save_steps=2, dataloader_num_workers=0)
    try:
        rc = run.wait()
        assert not marker.exists(), "resuming ran code planted in mp_rank_00_model_states.pt"
        assert rc != 0, "a tampered checkpoint was loaded as if it were sound"
        assert "Weights only load failed" in run.text() or "mp_rank_00_model_states.pt" in run.text(), run.tail()
    finally:
        run.kill_leftovers()


@pytest.mark.slow
def test_tampered_checkpoint_files_do_not_run_code_on_load_or_export(diverging_run, tmp_path):
    from sd_ds.checkpoint import load_rank_state, rank_state_path
    from sd_ds.diffusers_export import export_checkpoint

    out = diverging_run[0]
    for name in ("mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        copy = _copy_run(out, tmp_path / name)
        marker = tmp_path / f"PWNED_{name}"
        _plant(copy / "checkpoint-2" / name, marker)
        with pytest.raises(Exception):
            export_checkpoint(copy / "checkpoint-2", tmp_path / f"exported_{name}")
        assert not marker.exists(), f"export ran code planted in {name}"

    # Our per-rank state: a pickle where the safetensors file should be is refused, never unpickled.
    import torch

    copy = _copy_run(out, tmp_path / "rank_state")
    marker = tmp_path / "PWNED_rank_state"
    path = rank_state_path(copy / "checkpoint-2", 0)
    torch.save({"data": _Payload(marker)}, path)
    with pytest.raises(Exception):
        load_rank_state(path)
    assert not marker.exists(), "loading the rank state ran pickled code"


@pytest.mark.slow
def test_out_of_range_flags_exit_2_with_the_rule_through_the_launcher(assets, tmp_path):
    args = train_flags(tmp_path / "out", assets["shards"], assets["model"], save_steps=0)
    done = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=subprocess_env({**NO_LAUNCHER, "NPROC_PER_NODE": "2",
                                                           "MASTER_PORT": str(free_port())}))
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "--save_steps must be >= 1 (got 0)" in done.stderr
    assert not (tmp_path / "out").exists(), "a rejected command line wrote into output_dir"

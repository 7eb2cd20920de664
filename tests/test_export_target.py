"""Issue 30: ``python -m sd_ds.export CKPT DIR`` replaces DIR whole or not at all, and only when DIR is its own.

- someone's files in DIR: refused (one line, exit 2), every file kept; ``--overwrite`` replaces them;
- an earlier export: replaced whole (the same bytes as a fresh export), nothing left beside it; an earlier export
  with someone's file added: refused, naming the file;
- DIR a symbolic link: refused, its target untouched; links inside an earlier export: removed with it, what they
  point to untouched;
- a full disk (a small tmpfs; skipped where mount is not allowed) during a re-export: one line, exit 1, the
  earlier export byte-identical, the partial copy gone;
- a kill during a re-export: DIR is the old export or the new one, never a mix; the next export clears the
  partial copy the kill left.

The checkpoints come from one tiny training run (one CPU rank, two steps, EMA).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, free_port, small_tmpfs, subprocess_env, train_flags

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(assets, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("export_target") / "run"
    args = train_flags(out, assets["shards"], assets["model"], max_steps=2, save_steps=1, use_ema=True,
                       only_save_updated_model="False", dataloader_num_workers=0)
    proc = subprocess.run([sys.executable, "-m", "sd_ds.train", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env=subprocess_env({"SD_DS_LAUNCHER_PID": "", "MASTER_PORT": str(free_port())}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "checkpoint-1", out / "checkpoint-2"


def _export(ckpt: Path, target: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "sd_ds.export", str(ckpt), str(target), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def _digests(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (not following links): files by content, links by where they point."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _siblings(target: Path) -> list[str]:
    """What the export left beside ``target`` (temporary folders are hidden .NAME.* siblings)."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Fresh exports of each checkpoint into empty folders: what a replaced folder must equal, byte for byte."""
    root = tmp_path_factory.mktemp("reference")
    digests = {}
    for name, ckpt in zip(("old", "new"), checkpoints):
        assert _export(ckpt, root / name).returncode == 0
        digests[name] = _digests(root / name)
    assert digests["old"] != digests["new"]
    return {name: {k: v for k, v in d.items() if k != "sd_ds_export.json"} for name, d in digests.items()}


def _same_export(folder: Path, expected: dict[str, str]) -> bool:
    return {k: v for k, v in _digests(folder).items() if k != "sd_ds_export.json"} == expected


def test_someones_files_are_refused_and_kept_and_overwrite_replaces_them(checkpoints, tmp_path):
    target = tmp_path / "model"
    (target / "thesis").mkdir(parents=True)
    (target / "notes.txt").write_text("mine\n")
    (target / "thesis" / "draft.tex").write_text("\\section{Results}\n")
    before = _digests(target)
    proc = _export(checkpoints[0], target)
    assert proc.returncode == 2
    assert _one_error_line(proc) == (f"python -m sd_ds.export: error: {target} is not empty (notes.txt, thesis) and is "
                                     "not an earlier sd-ds export (no sd_ds_export.json): choose another folder, or "
                                     "pass --overwrite to replace it")
    assert _digests(target) == before and _siblings(target) == []
    proc = _export(checkpoints[0], target, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "model_index.json").is_file() and not (target / "notes.txt").exists()


def test_an_earlier_export_is_replaced_whole_unless_someone_added_files(checkpoints, reference, tmp_path):
    target = tmp_path / "model"
    assert _export(checkpoints[0], target).returncode == 0
    assert _same_export(target, reference["old"])
    proc = _export(checkpoints[1], target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _same_export(target, reference["new"]), "the re-export is not exactly a fresh export"
    assert json.loads((target / "sd_ds_export.json").read_text())["step"] == 2
    assert _siblings(target) == []
    (target / "README.md").write_text("my model card\n")
    proc = _export(checkpoints[0], target)
    assert proc.returncode == 2
    assert _one_error_line(proc) == (f"python -m sd_ds.export: error: {target} is an earlier sd-ds export but also "
                                     "holds README.md, which a new export would delete: move them out, or pass "
                                     "--overwrite")
    assert (target / "README.md").read_text() == "my model card\n" and _same_export(
        target, {**reference["new"], "README.md": hashlib.sha256(b"my model card\n").hexdigest()})


def test_links_are_never_written_through(checkpoints, reference, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "weights").mkdir(parents=True)
    (elsewhere / "weights" / "precious.safetensors").write_bytes(b"not yours")
    (elsewhere / "vocab.json").write_text('{"mine": 0}')
    before = _digests(elsewhere)
    # DIR itself a link: refused, the folder it points to untouched.
    link = tmp_path / "model_link"
    link.symlink_to(elsewhere, target_is_directory=True)
    proc = _export(checkpoints[0], link)
    assert proc.returncode == 2
    assert _one_error_line(proc) == (f"python -m sd_ds.export: error: {link} is a symbolic link (to {elsewhere}); the "
                                     "export never writes through a link: give the folder itself")
    # Links inside an earlier export (its unet/ and its tokenizer's vocab.json replaced by links out of DIR).
    target = tmp_path / "model"
    assert _export(checkpoints[0], target).returncode == 0
    for name in os.listdir(target / "unet"):
        (target / "unet" / name).unlink()
    (target / "unet").rmdir()
    (target / "unet").symlink_to(elsewhere / "weights", target_is_directory=True)
    (target / "tokenizer" / "vocab.json").unlink()
    (target / "tokenizer" / "vocab.json").symlink_to(elsewhere / "vocab.json")
    proc = _export(checkpoints[1], target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digests(elsewhere) == before, "a file outside the export folder was written or deleted"
    assert not (target / "unet").is_symlink() and not (target / "tokenizer" / "vocab.json").is_symlink()
    assert _same_export(target, reference["new"])


@pytest.fixture
def small_disk(tmp_path):
    # One tiny export is ~37 MB: room for one, not for a second beside it.
    with small_tmpfs(tmp_path / "disk", "56m") as mount_point:
        yield mount_point


def test_a_full_disk_leaves_the_earlier_export_whole(checkpoints, reference, small_disk):
    target = small_disk / "model"
    assert _export(checkpoints[0], target).returncode == 0
    before = _digests(target)
    free_before = os.statvfs(small_disk).f_bavail
    proc = _export(checkpoints[1], target)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _one_error_line(proc) == (f"python -m sd_ds.export: error: no space left on device while exporting "
                                     f"{checkpoints[1]} to {target}; {target} is as it was (the partial export was "
                                     "removed)")
    assert _digests(target) == before and _same_export(target, reference["old"])
    assert _siblings(target) == [] and os.statvfs(small_disk).f_bavail == free_before


def test_a_kill_during_a_re_export_leaves_the_old_or_the_new_export_never_a_mix(checkpoints, reference, tmp_path):
    target = tmp_path / "model"
    assert _export(checkpoints[0], target).returncode == 0
    proc = _export(checkpoints[1], target, wait=False)
    try:
        # Kill it once it is writing: its temporary folder beside DIR holds a file.
        deadline = time.time() + 300
        while not any(p.is_file() for s in _siblings(target) for p in (tmp_path / s).rglob("*")):
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            assert time.time() < deadline, "the export never started writing"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert _same_export(target, reference["old"]) or _same_export(target, reference["new"]), "a mix of two exports"
    # The next export (same host, the killed pid gone) clears what the kill left and succeeds.
    proc = _export(checkpoints[1], target)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _siblings(target) == [] and _same_export(target, reference["new"])


def test_without_an_atomic_swap_the_old_folder_is_moved_aside_then_removed(tmp_path, monkeypatch):
    """Filesystems without RENAME_EXCHANGE (the library call, with the swap unavailable): same result, and a
    failure inside the block leaves the old folder."""
    from sd_ds import fileio

    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.replaced_directory(target) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("disk trouble")
    assert sorted(os.listdir(target)) == ["old.txt"] and _siblings(target) == []
    with fileio.replaced_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(os.listdir(target)) == ["new.txt"] and _siblings(target) == []
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

"""Checkpoint bookkeeping without an engine: completeness, rotation, resume lookup."""

import json

import pytest

from sd_ds import checkpoint as ck


def make(output_dir, step, complete=True):
    p = ck.checkpoint_path(output_dir, step)
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (p / ck.TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": 1}))
    return p


def test_rotation_keeps_limit_and_newest(tmp_path):
    for s in (10, 20, 30, 40):
        make(tmp_path, s)
    deleted = ck.rotate_checkpoints(tmp_path, save_total_limit=2)
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-20"]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [30, 40]


def test_rotation_never_deletes_newest_complete_even_if_newer_incomplete_exists(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)  # a save that crashed
    ck.rotate_checkpoints(tmp_path, save_total_limit=1)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [20]
    # The newer incomplete one is not ours to delete yet (it may be in progress).
    assert (tmp_path / "checkpoint-30").exists()


def test_incomplete_leftovers_older_than_newest_complete_are_removed(tmp_path):
    make(tmp_path, 10, complete=False)
    make(tmp_path, 20)
    ck.rotate_checkpoints(tmp_path, save_total_limit=None)
    assert not (tmp_path / "checkpoint-10").exists()
    assert (tmp_path / "checkpoint-20").exists()


def test_find_resume_checkpoint(tmp_path):
    assert ck.find_resume_checkpoint(tmp_path, "latest") is None
    make(tmp_path, 5)
    make(tmp_path, 7)
    make(tmp_path, 9, complete=False)
    assert ck.find_resume_checkpoint(tmp_path, "latest").name == "checkpoint-7"
    assert ck.find_resume_checkpoint(tmp_path, "none") is None
    assert ck.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-5")).name == "checkpoint-5"
    with pytest.raises(FileNotFoundError):
        ck.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))


def _outside_checkpoint(root, name):
    """A complete-looking checkpoint folder outside output_dir, with someone's file in it."""
    target = root / name
    target.mkdir(parents=True)
    (target / ck.TRAINER_STATE).write_text(json.dumps({"step": 1, "world_size": 1}))
    (target / "someone_elses.bin").write_bytes(b"keep me")
    return target


def test_rotation_removes_a_symlinked_checkpoint_not_its_target(tmp_path):
    """Issue 30: a symlinked checkpoint-1 pointing outside output_dir lost its target's trainer_state.json."""
    out = tmp_path / "out"
    target = _outside_checkpoint(tmp_path / "elsewhere", "ckpt")
    out.mkdir()
    (out / "checkpoint-1").symlink_to(target, target_is_directory=True)
    make(out, 2, complete=False)
    make(out, 3)
    make(out, 4)
    deleted = ck.rotate_checkpoints(out, save_total_limit=1)
    assert sorted(p.name for p in deleted) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (out / "checkpoint-1").exists() and not (out / "checkpoint-1").is_symlink()
    assert sorted(p.name for p in target.iterdir()) == sorted([ck.TRAINER_STATE, "someone_elses.bin"])
    assert (target / "someone_elses.bin").read_bytes() == b"keep me"


def test_rotation_removes_a_symlinked_incomplete_leftover_not_its_target(tmp_path):
    out = tmp_path / "out"
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "someone_elses.bin").write_bytes(b"keep me")
    out.mkdir()
    (out / "checkpoint-1").symlink_to(target, target_is_directory=True)  # incomplete: no trainer_state.json
    make(out, 2)
    ck.rotate_checkpoints(out, save_total_limit=None)
    assert not (out / "checkpoint-1").is_symlink()
    assert (target / "someone_elses.bin").read_bytes() == b"keep me"

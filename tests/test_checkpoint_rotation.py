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

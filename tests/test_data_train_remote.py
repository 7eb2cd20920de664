"""The trainer on remote shards and across a change of rank count (run.sh → deepspeed → sd_ds.train, CPU ranks):
2-rank runs from HTTP and from S3 give exactly the local run's losses; a 2-rank run stopped mid-epoch and resumed
on 1 rank serves every sample of the epoch once (keys recorded through SD_DS_DATA_KEYS)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sd_ds.data import DEBUG_KEYS_ENV
from tests.helpers import run_sh, scalars, train_flags
from tests.object_stores import http_server_factory, s3_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

STEPS = 8  # 64 samples, global batch 8: one epoch


def losses(out: Path) -> list[float]:
    return [v for _, v in scalars(out / "runs", "train/loss")]


def served_keys(keys_dir: Path, epoch: int = 0) -> list[str]:
    out = []
    for f in sorted(keys_dir.glob("keys.rank*.txt")):
        for line in f.read_text().splitlines():
            e, *keys = line.split()
            if int(e) == epoch:
                out += keys
    return out


def flags(out: Path, shards, assets, **kw) -> list[str]:
    return train_flags(out, shards, assets["model"], **{"max_steps": STEPS, "save_steps": STEPS, **kw})


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory, http_server_factory, s3_server):  # noqa: F811
    """Local, HTTP and S3 runs of the same 2-rank training, side by side."""
    root = tmp_path_factory.mktemp("remote_runs")
    http = http_server_factory(assets["shards"])
    s3_url = s3_server.upload_dir(assets["shards"], "train", "tiny")
    jobs = {"local": str(assets["shards"]), "http": http.url(), "s3": s3_url + "/"}
    results: dict[str, object] = {}

    def run(name: str, shards: str) -> None:
        try:
            results[name] = run_sh(flags(root / name, shards, assets), nproc=2,
                                   extra_env={**s3_server.env, DEBUG_KEYS_ENV: str(root / name / "keys")})
        except BaseException as e:  # noqa: BLE001 - reported by the test
            results[name] = e

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return root, results


def test_http_and_s3_runs_give_the_local_losses(runs):
    root, results = runs
    for name, result in results.items():
        assert not isinstance(result, BaseException), f"{name}: {result}"
    local = losses(root / "local")
    assert len(local) == STEPS
    assert losses(root / "http") == local
    assert losses(root / "s3") == local
    keys = served_keys(root / "local" / "keys")
    assert len(keys) == len(set(keys)) == 64  # the epoch: every sample once


def test_two_ranks_then_one_rank_serve_the_epoch_once(assets, runs, tmp_path):
    root, _ = runs
    out, keys_dir = tmp_path / "elastic", tmp_path / "keys"
    run_sh(flags(out, assets["shards"], assets, max_steps=3, save_steps=3), nproc=2,
           extra_env={DEBUG_KEYS_ENV: str(keys_dir / "two")})
    proc = run_sh(flags(out, assets["shards"], assets, max_steps=13, save_steps=13), nproc=1,
                  extra_env={DEBUG_KEYS_ENV: str(keys_dir / "one")})
    assert "elastic data resume" in proc.stdout + proc.stderr
    before, after = served_keys(keys_dir / "two"), served_keys(keys_dir / "one")
    assert len(before) == 24 and len(after) == 40  # 3 steps x 8, then 10 steps x 4
    assert not set(before) & set(after)
    assert sorted(before + after) == sorted(served_keys(root / "local" / "keys"))

"""The trainer on remote shards and across a change of rank count (run.sh → deepspeed → sd_ds.train, CPU ranks):
2-rank runs from HTTP and from S3 give exactly the local run's losses, also from an HTTP server that answers
every 2nd shard GET with 503 (the reads are retried, and counted); a 2-rank run stopped mid-epoch, resumed
on 1 rank and then on 2 again serves every sample of the epoch once (keys recorded through SD_DS_DATA_KEYS)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from sd_ds.data import DEBUG_KEYS_ENV
from tests.helpers import run_sh, scalars, train_flags
from tests.object_stores import HTTPFileServer, http_server_factory, s3_server  # noqa: F401 - fixtures

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
    """Local, HTTP, flaky HTTP and S3 runs of the same 2-rank training, side by side."""
    root = tmp_path_factory.mktemp("remote_runs")
    http = http_server_factory(assets["shards"])
    flaky = HTTPFileServer(assets["shards"], fail_every=2, fail_suffix=".tar").start()
    s3_url = s3_server.upload_dir(assets["shards"], "train", "tiny")
    jobs = {"local": str(assets["shards"]), "http": http.url(), "http_flaky": flaky.url(), "s3": s3_url + "/"}
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
    flaky.stop()
    results["flaky_failures"] = flaky.failures
    return root, results


def test_http_and_s3_runs_give_the_local_losses(runs):
    root, results = runs
    for name, result in results.items():
        assert not isinstance(result, BaseException), f"{name}: {result}"
        assert name == "flaky_failures" or result.returncode == 0
    local = losses(root / "local")
    assert len(local) == STEPS
    assert losses(root / "http") == local
    assert losses(root / "s3") == local
    keys = served_keys(root / "local" / "keys")
    assert len(keys) == len(set(keys)) == 64  # the epoch: every sample once


def test_a_flaky_store_gives_the_local_losses_and_samples(runs):
    """Every 2nd shard GET answered 503: each failed read is retried from the sample it was at, so the run logs
    exactly the local run's losses and serves its samples in its order; the retries are logged and counted."""
    root, results = runs
    result = results["http_flaky"]
    assert not isinstance(result, BaseException), result
    assert results["flaky_failures"] >= 2
    assert losses(root / "http_flaky") == losses(root / "local")
    for rank in (0, 1):
        name = f"keys.rank{rank}.txt"
        assert (root / "http_flaky" / "keys" / name).read_text() == (root / "local" / "keys" / name).read_text()
    console = result.stdout + result.stderr
    logged = re.findall(r"data rank (\d) worker \d epoch \d+: storage retry #\d+", console)
    assert 1 <= len(logged) <= results["flaky_failures"] and "Traceback" not in console
    if "0" in logged:  # rank 0's count reaches TensorBoard (data/* are rank 0's, as the skip counts are)
        assert scalars(root / "http_flaky" / "runs", "data/storage_retries")[-1][1] >= 1


def test_two_ranks_then_one_then_two_serve_the_epoch_once(assets, runs, tmp_path):
    """2 ranks for 3 steps, 1 rank to step 8, 2 ranks again to step 10: the epoch's samples are served once; the
    last 4 (fewer than a global batch on the last cut) are left, as in any epoch."""
    root, _ = runs
    out, keys_dir = tmp_path / "elastic", tmp_path / "keys"
    run_sh(flags(out, assets["shards"], assets, max_steps=3, save_steps=3), nproc=2,
           extra_env={DEBUG_KEYS_ENV: str(keys_dir / "a")})
    proc = run_sh(flags(out, assets["shards"], assets, max_steps=8, save_steps=8), nproc=1,
                  extra_env={DEBUG_KEYS_ENV: str(keys_dir / "b")})
    assert "elastic data resume" in proc.stdout + proc.stderr
    proc = run_sh(flags(out, assets["shards"], assets, max_steps=10, save_steps=10), nproc=2,
                  extra_env={DEBUG_KEYS_ENV: str(keys_dir / "c")})
    assert "elastic data resume" in proc.stdout + proc.stderr
    a, b, c = (served_keys(keys_dir / x) for x in "abc")
    assert (len(a), len(b), len(c)) == (24, 20, 16)  # 3 x 8, 5 x 4, 2 x 8
    both = a + b + c
    assert len(both) == len(set(both))  # none twice
    epoch = served_keys(root / "local" / "keys")
    assert set(both) <= set(epoch) and len(epoch) - len(both) == 4  # 4 < one global batch (8) left

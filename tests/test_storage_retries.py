"""Transient storage errors: a loopback HTTP server that answers every Nth GET with 503 serves exactly the batches
of a failure-free read (a shard read restarts at the sample it was at) and the retries are counted; a server
that always fails stops the loader, and the trainer, with one line after the configured bound. Which errors are
transient (5xx, 429, timeouts, resets, S3 SlowDown, also wrapped by fsspec/s3fs) and which are not (404, 403)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from sd_ds.retries import RetryPolicy, StorageUnavailable, default_policy, is_transient, set_default_policy
from tests.helpers import REPO_ROOT, free_port, subprocess_env, train_flags, write_photo_shards
from tests.object_stores import HTTPFileServer
from tests.test_data_remote import loader, same, take, tokenizer  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Two weighted sources (sources.json) and sizes.json, 55 samples in 6 shards."""
    out = tmp_path_factory.mktemp("converted")
    write_photo_shards(out, [12, 10, 11, 9])
    write_photo_shards(out, [6, 7], first_shard=4, seed=1)
    (out / "sources.json").write_text(json.dumps({"sources": [
        {"name": "big", "weight": 0.7, "shards": [f"{i:05d}.tar" for i in range(4)], "samples": 42},
        {"name": "small", "weight": 0.3, "shards": ["00004.tar", "00005.tar"], "samples": 13}]}))
    return out


@pytest.fixture
def retry_timeout():
    """Sets this process's retry bound for a test, restoring the default after it."""
    saved = default_policy()

    def set_timeout(seconds: float) -> None:
        set_default_policy(RetryPolicy(timeout_s=seconds))

    yield set_timeout
    set_default_policy(saved)


def test_which_errors_are_transient():
    import aiohttp
    from botocore.exceptions import ClientError

    def http_error(status: int) -> Exception:
        return aiohttp.ClientResponseError(None, (), status=status, message="x")  # type: ignore[arg-type]

    def wrapped(cause: Exception, outer: type = FileNotFoundError) -> Exception:
        try:
            try:
                raise cause
            except Exception as e:
                raise outer("http://h/x.tar") from e  # what fsspec's HTTP info() raises for any failed GET
        except Exception as e:  # noqa: BLE001
            return e

    def s3_error(code: str, status: int) -> Exception:
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")

    for exc in (http_error(503), http_error(500), http_error(429), wrapped(http_error(502)), ConnectionResetError(),
                TimeoutError(), aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("cut"),
                s3_error("SlowDown", 503), wrapped(s3_error("SlowDown", 503), OSError),
                s3_error("InternalError", 500)):
        assert is_transient(exc), exc
    for exc in (http_error(404), http_error(403), http_error(401), http_error(501), wrapped(http_error(404)),
                FileNotFoundError("x"), ValueError("not a tar"), s3_error("AccessDenied", 403),
                s3_error("NoSuchKey", 404), PermissionError()):
        assert not is_transient(exc), exc


@pytest.mark.slow  # the retries' backoff: ~15 s each
@pytest.mark.parametrize("member_index", [False, True])
def test_a_flaky_store_gives_the_same_batches_and_counts_its_retries(converted, tokenizer, tmp_path,  # noqa: F811
                                                                     monkeypatch, member_index):
    """Small ranged reads (8 KB blocks), so that GETs fail inside shards, after samples were served from them: the
    reader opens the shard again at the sample it was reading (seeking with the member index, or reading past the
    samples before it without one)."""
    import shutil

    from sd_ds.data import reading

    local = take(loader(converted, tokenizer), 14)
    served = tmp_path / "served"
    shutil.copytree(converted, served)
    if member_index:
        from sd_ds.data.index import main as index_main

        assert index_main([str(served)]) == 0
    monkeypatch.setattr(reading, "REMOTE_BLOCK", 8 << 10)
    with HTTPFileServer(served, fail_every=3) as flaky:  # every 3rd GET fails: metadata and shards alike
        data = loader(flaky.url(), tokenizer)
        batches = take(data, 14)
    same(batches, local)  # every sample, in the same order, with the same crops, flips and captions
    shard_failures = [r for p, r in zip(flaky.failed_paths, flaky.failed_ranges) if p.endswith(".tar")]
    assert len(shard_failures) >= 3 and flaky.failures > len(shard_failures)  # shard and metadata reads failed
    assert any(r and not r.startswith("bytes=0-") for r in shard_failures)  # some inside a shard
    assert 1 <= data.stats()["storage_retries"] <= len(shard_failures)  # counted (the data/storage_retries metric)
    assert set(data.stats()) == {"storage_retries"}  # and no sample was skipped for it


def test_a_store_that_keeps_failing_stops_with_one_line_after_the_bound(converted, tokenizer,  # noqa: F811
                                                                         retry_timeout):
    retry_timeout(1.5)
    with HTTPFileServer(converted, fail_every=1) as down:  # every GET fails: the metadata cannot be read
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as e:
            loader(down.url(), tokenizer)
        assert time.monotonic() - started < 10
    assert "giving up after --storage_retry_timeout 1.5 s" in str(e.value) and "503" in str(e.value)
    with HTTPFileServer(converted, fail_every=1, fail_suffix=".tar") as down:  # shards fail, in a worker
        data = loader(down.url(), tokenizer, dataloader_num_workers=1)
        with pytest.raises(StorageUnavailable) as e:
            take(data, 1)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message, message  # one line, not the worker's traceback
    assert ".tar (reading sample #" in message and "giving up after --storage_retry_timeout 1.5 s" in message


@pytest.mark.slow
def test_the_trainer_stops_with_one_line_when_the_store_keeps_failing(assets, tmp_path):
    """One rank, shards at a server whose every shard GET fails (metadata reads work): the run stops within the
    configured bound after its first retry, exit 1, one line naming the shard, no traceback."""
    with HTTPFileServer(assets["shards"], fail_every=1, fail_suffix=".tar") as down:
        flags = train_flags(tmp_path / "out", down.url(), assets["model"], max_steps=2, storage_retry_timeout=3)
        proc = subprocess.Popen([sys.executable, "-m", "sd_ds.train", *flags], cwd=REPO_ROOT, text=True,
                                env=subprocess_env({"MASTER_PORT": str(free_port())}), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        first_retry, lines = None, []
        for line in proc.stdout:
            lines.append(line)
            if first_retry is None and "storage retry #1" in line:
                first_retry = time.monotonic()
        proc.wait(timeout=300)
        ended = time.monotonic()
    output = "".join(lines)
    assert proc.returncode == 1, output[-3000:]
    assert first_retry is not None and ended - first_retry < 3 + 30, output[-3000:]  # the bound, and an exit
    final = [line for line in lines if line.startswith("sd_ds.train: ")]
    assert len(final) == 1 and "giving up after --storage_retry_timeout 3 s" in final[0], output[-3000:]
    assert f"{down.url()}0000" in final[0] and "Traceback" not in output, output[-3000:]

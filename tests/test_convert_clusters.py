"""The converter on real multi-process clusters on loopback: a Spark standalone master with two workers, and a
Ray head with a second node, each started as the docs start them (spark-class Master/Worker, ray start). The
tool joins them (--spark_master spark://..., --ray_address HOST:PORT: sd_ds shipped to the workers), a worker
process is SIGKILLed mid-part, and the output is byte-identical to --engine local.

Everything started here carries a tag in its environment, and only tagged processes are ended afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from test_convert_engines import _processes_tagged, needs_java, parts  # noqa: F401 - the parts fixture
from test_converter import output_files, run_tool
from tests.helpers import free_port

pytest.importorskip("pyspark", reason="pip install -e '.[spark]'")
pytest.importorskip("ray", reason="pip install -e '.[ray]'")

SPP = 3
BIN = Path(sys.executable).parent


def _wait_port(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _end_tagged(tag: str) -> None:
    for pid in _processes_tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _convert_with_a_worker_killed(parts, tmp_path, engine_args: list, env: dict) -> None:  # noqa: F811
    paths, reference = parts
    root = paths[0].parent
    out = tmp_path / "o"
    marker = tmp_path / "killed"
    run_tool("--file_list", root / "train.filelist.list", "--output_dir", out, "--samples_per_shard", SPP,
             *engine_args, env={**env, "SD_DS_FAULT": f"sample:action=kill_worker:count=3:once={marker}"})
    assert marker.exists()  # a worker process really died mid-part; its task ran again elsewhere
    assert output_files(out) == output_files(reference)


@pytest.mark.slow
@needs_java
def test_spark_standalone_master_and_two_workers(parts, tmp_path):  # noqa: F811
    tag = f"SD_DS_TEST_RUN={uuid.uuid4().hex}"
    import pyspark

    spark_home = Path(pyspark.__file__).parent  # pip's pyspark is a Spark distribution
    env = {**os.environ, tag.split("=")[0]: tag.split("=")[1], "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_HOME": str(spark_home), "PYSPARK_PYTHON": sys.executable,
           "SPARK_WORKER_DIR": str(tmp_path / "work"), "SPARK_LOG_DIR": str(tmp_path / "logs")}
    port = free_port()
    master = f"spark://127.0.0.1:{port}"
    spark_class = str(spark_home / "bin" / "spark-class")
    logs = open(tmp_path / "cluster.log", "w")
    try:
        subprocess.Popen([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port",
                          str(port), "--webui-port", str(free_port())], env=env, stdout=logs, stderr=logs)
        _wait_port(port)
        for _ in range(2):
            subprocess.Popen([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores",
                              "1", "--memory", "1g", "--webui-port", str(free_port()), master],
                             env=env, stdout=logs, stderr=logs)
        _convert_with_a_worker_killed(parts, tmp_path, ["--engine", "spark", "--spark_master", master],
                                      {tag.split("=")[0]: tag.split("=")[1], "SPARK_LOCAL_IP": "127.0.0.1"})
    finally:
        _end_tagged(tag)
        logs.close()


@pytest.mark.slow
def test_ray_head_and_a_second_node(parts, tmp_path):  # noqa: F811
    tag = f"SD_DS_TEST_RUN={uuid.uuid4().hex}"
    temp_dir = Path("/tmp") / f"ray_{uuid.uuid4().hex[:8]}"  # its own session folder (Ray's socket paths are short)
    # RAY_AUTH_MODE: without it, Ray 2.60's second `ray start` on this host fails its GCS token check
    ray_env = {tag.split("=")[0]: tag.split("=")[1], "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env = {**os.environ, **ray_env}
    port = free_port()
    ray = str(BIN / "ray")
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                        "--include-dashboard", "false", "--temp-dir", str(temp_dir), *common],
                       env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", *common],
                       env=env, check=True, capture_output=True, timeout=180)
        _convert_with_a_worker_killed(parts, tmp_path, ["--engine", "ray", "--ray_address", f"127.0.0.1:{port}"],
                                      ray_env)
    finally:
        _end_tagged(tag)
        shutil.rmtree(temp_dir, ignore_errors=True)

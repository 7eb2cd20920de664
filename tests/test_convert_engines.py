"""The converter on Spark and Ray: a real local Spark (local[2]) and a real local Ray (2 CPUs) give the same bytes
as --engine local; a worker killed mid-run (its task retried by the engine or the driver) changes nothing; a
killed driver resumes with the same command and finishes identically; a missing engine is a one-line error.

Cluster start-ups cost seconds on 2 cores, so each engine starts once per module for the in-process runs
(``convert`` uses a session or Ray that is already up and leaves it running); only the driver-kill tests start
the engine in the converter's own process (twice each: the killed run and its resume).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from laion_parts import bad_lines, crops
from sd_ds.convert.engines import EngineSettings
from sd_ds.faults import Fault, FaultInjector
from sd_ds.convert.parts import write_part
from sd_ds.convert.planning import ConvertOptions, collect_sources
from sd_ds.convert.run import convert
from test_converter import output_files, run_tool

pyspark = pytest.importorskip("pyspark", reason="pip install -e '.[spark]'")
ray = pytest.importorskip("ray", reason="pip install -e '.[ray]'")

needs_java = pytest.mark.skipif(shutil.which("java") is None and not os.environ.get("JAVA_HOME"),
                                reason="Spark needs Java 17 (apt-get install openjdk-17-jre-headless)")

SPP = 3
OPTIONS = ConvertOptions(samples_per_shard=SPP)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[list[Path], Path]:
    """Eight parts of 5 good and 1 bad line (two sources), and their conversion by --engine local."""
    root = tmp_path_factory.mktemp("engine_parts")
    pics = crops(40, seed=11, formats=("JPEG", "PNG", "WEBP"))
    paths = []
    for i in range(8):
        rows = [(c, b) for c, b, _ in pics[5 * i: 5 * i + 5]]
        rows.insert(i % 5, bad_lines()["truncated_image"])
        paths.append(root / f"part-{i:05d}.gz")
        write_part(paths[-1], rows)
    (root / "a.filelist").write_text("".join(f"{p}\n" for p in paths[:5]))
    (root / "b.filelist").write_text("".join(f"{p}\n" for p in paths[5:]))
    (root / "train.filelist.list").write_text("a.filelist 2\nb.filelist 1\n")
    reference = root / "reference"
    run_tool("--file_list", root / "train.filelist.list", "--output_dir", reference, "--samples_per_shard", SPP,
             "--processes", 2)
    return paths, reference


def _convert_in_process(root: Path, out: Path, engine: EngineSettings, hook=None) -> dict:
    sources = collect_sources([str(root / "train.filelist.list")]).sources
    kwargs = {"hook": hook} if hook is not None else {}
    return convert(sources, out, OPTIONS, progress=False, log=lambda _: None, engine=engine, **kwargs)


@pytest.fixture(scope="module")
def spark_session():
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("sd-ds test")
             .config("spark.ui.enabled", "false").getOrCreate())
    yield spark
    spark.stop()


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _engine_cases():
    return [pytest.param("spark", "spark_session", id="spark-local2", marks=needs_java),
            pytest.param("ray", "ray_local", id="ray-2cpus")]


@pytest.mark.slow
@pytest.mark.parametrize("engine,cluster", _engine_cases())
def test_identical_bytes_and_worker_killed_mid_run(parts, tmp_path, request, engine, cluster):
    """Same bytes as --engine local; then a worker process SIGKILLed in the middle of its third sample: the
    engine (Ray) or the driver (Spark) runs the task again and the output is still the same."""
    request.getfixturevalue(cluster)
    paths, reference = parts
    root = paths[0].parent
    settings = EngineSettings(engine, processes=2)
    out = tmp_path / "clean"
    stats = _convert_in_process(root, out, settings)
    assert stats["successes"] == 40 and output_files(out) == output_files(reference)

    marker = tmp_path / "killed"
    hook = FaultInjector([Fault("sample", action="kill_worker", count=3, once=str(marker))])
    out = tmp_path / "faulty"
    _convert_in_process(root, out, settings, hook=hook)
    assert marker.exists()  # a worker really died mid-part
    assert output_files(out) == output_files(reference)
    assert not list(out.glob(".*")) and not (out / "_convert" / "parts").exists()


@pytest.mark.slow
@pytest.mark.parametrize("engine,extra", [pytest.param("spark", ["--spark_master", "local[2]"], marks=needs_java),
                                          ("ray", ["--processes", "2"])])
def test_killed_driver_resumes_identically(parts, tmp_path, engine, extra):
    paths, reference = parts
    root = paths[0].parent
    out = tmp_path / "o"
    args = ["--file_list", root / "train.filelist.list", "--output_dir", out, "--samples_per_shard", SPP,
            "--engine", engine, *extra]
    tag = f"SD_DS_TEST_RUN={uuid.uuid4().hex}"
    proc = run_tool(*args, env={"SD_DS_FAULT": "main_shard:count=3", tag.split("=")[0]: tag.split("=")[1]},
                    check_rc=None)
    for pid in _processes_tagged(tag):  # a SIGKILLed driver's local Ray leaves its agents behind: end them
        os.kill(pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not (out / "stats.json").exists() and len(list(out.glob("*.tar"))) >= 3
    run_tool(*args)
    assert output_files(out) == output_files(reference)


def _processes_tagged(tag: str) -> set[int]:
    """Live processes whose environment holds ``tag`` (what the test's own runs started, and nothing else)."""
    pids = set()
    for proc_dir in Path("/proc").iterdir():
        try:
            environ = (proc_dir / "environ").read_bytes()
            state = (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and tag.encode() in environ.split(b"\0") and int(proc_dir.name) != os.getpid():
            pids.add(int(proc_dir.name))
    return pids


def test_missing_engine_is_a_one_line_error(parts, tmp_path):
    paths, _ = parts
    tool = Path(__file__).resolve().parents[1] / "tools" / "convert_laion_to_wds.py"
    for engine, module in (("spark", "pyspark"), ("ray", "ray")):
        code = (f"import runpy, sys; sys.modules[{module!r}] = None\n"
                f"sys.argv = ['x', {str(paths[0])!r}, '--output_dir', {str(tmp_path / engine)!r}, "
                f"'--engine', {engine!r}]\nrunpy.run_path({str(tool)!r}, run_name='__main__')")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert f"pip install -e '.[{engine}]'" in proc.stderr and not (tmp_path / engine).exists()

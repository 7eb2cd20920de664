"""Where the converter's tasks run: local worker processes, a Spark cluster or a Ray cluster, behind one small
interface (img2dataset's ``distributor`` idea: one function per engine, the driver numbers everything).

The driver (``run.ConversionRun``) plans every part and every shard and numbers them; an engine only runs the
two kinds of task (``workers.convert_part``, ``workers.assemble_shard_job``), each writing its own files under
names the driver chose. So no two tasks can write the same name with different bytes, whichever executor runs
them, and a task run twice (an engine retry, a straggler of a killed driver, Spark speculation) writes the
same bytes again: conversion is deterministic.

An engine is ``submit(fn, *args) -> concurrent.futures.Future`` plus ``parallelism`` (tasks worth running at
once), ``progress_queue`` (mid-task progress reports, local only: cluster tasks report with their result) and
``shutdown()``. Faults: a task whose executor dies is retried (Ray: the task's ``max_retries``; Spark: the
driver resubmits a failed job, ``TASK_ATTEMPTS`` times in all) and a killed driver resumes from the files.

The cluster's workers need the output folder (and the work folder in it) on storage every host reaches: a
shared file system (NFS, Lustre, a mounted bucket) for now.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from sd_ds.convert.workers import run_task, worker_init
from sd_ds.faults import Hook, no_hook

__all__ = ["ENGINES", "EngineUnavailable", "EngineSettings", "LocalEngine", "SparkEngine", "RayEngine",
           "build_engine", "check_installed", "TASK_ATTEMPTS"]

logger = logging.getLogger("sd_ds.convert")

ENGINES = ("local", "spark", "ray")
TASK_ATTEMPTS = 4  # Spark's own default spark.task.maxFailures on a cluster
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # sd_ds/, shipped to cluster workers


class EngineUnavailable(RuntimeError):
    """The engine asked for is not installed; the message is one line with the install command."""


class EngineSettings:
    """What the command line says about the engine (not part of the plan: it never changes the output)."""

    def __init__(self, engine: str = "local", processes: int = 1, spark_master: Optional[str] = None,
                 ray_address: Optional[str] = None):
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: choose {', '.join(ENGINES)}")
        self.engine, self.processes = engine, processes
        self.spark_master, self.ray_address = spark_master, ray_address


class LocalEngine:
    """Today's worker processes on this host (spawned; they die with the driver, report progress mid-part)."""

    reader_default = None  # run.convert decides: inflate in a thread when cores are idle

    def __init__(self, processes: int, hook: Hook = no_hook):
        context = mp.get_context("spawn")  # no fork after threads (tqdm, queue feeders); workers import little
        self.progress_queue = context.Queue()
        self.parallelism = processes
        self._pool = ProcessPoolExecutor(processes, mp_context=context, initializer=worker_init,
                                         initargs=(self.progress_queue, os.getpid(), hook))

    def submit(self, fn: Callable, *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _missing(engine: str, module: str) -> EngineUnavailable:
    return EngineUnavailable(f"--engine {engine} needs {module}, which is not installed: "
                             f"pip install -e '.[{engine}]' (or pip install {module})")


def check_installed(engine: str) -> None:
    """Raise EngineUnavailable (one line, with the install command) before any work when ``engine``'s package
    is missing."""
    import importlib.util

    module = {"spark": "pyspark", "ray": "ray"}.get(engine)
    if module and importlib.util.find_spec(module) is None:
        raise _missing(engine, module)


def _ship_package(workdir: str) -> str:
    """A zip of the sd_ds package, for cluster workers that do not have it installed (Spark's addPyFile)."""
    base = os.path.join(workdir, "sd_ds_package")
    return shutil.make_archive(base, "zip", root_dir=_PACKAGE_DIR.parent, base_dir=_PACKAGE_DIR.name)


class SparkEngine:
    """Each task is a one-task Spark job, submitted from a driver thread; Spark runs concurrent jobs side by
    side, so ``parallelism`` threads keep every executor core busy. The driver resubmits a failed job (a
    killed Python worker or executor fails it in local mode, where Spark does not retry) up to TASK_ATTEMPTS
    times in all."""

    reader_default = "buffered"  # one core per task: no inflate thread beside the parser

    def __init__(self, master: Optional[str], hook: Hook = no_hook, app_name: str = "sd-ds convert"):
        try:
            from pyspark import SparkConf
            from pyspark.sql import SparkSession
        except ImportError:
            raise _missing("spark", "pyspark") from None
        self.hook, self.run_id = hook, uuid.uuid4().hex
        self._tmp = tempfile.mkdtemp(prefix="sd_ds_spark_")
        # Local workers import sd_ds from the driver's environment; remote ones get the zip below.
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")) if p)
        active = SparkSession.getActiveSession()
        self._owned = active is None
        if active is not None:  # a session made by the caller (a notebook, a wrapper script): use it as is
            self.spark = active
        else:
            from pyspark import SparkContext

            # Join spark-submit's JVM (or start one), so that the submission's settings are visible: under
            # spark-submit the master comes with the submission, and --spark_master overrides it only when given.
            SparkContext._ensure_initialized()
            builder = SparkSession.builder.appName(app_name)
            if master or not SparkConf().contains("spark.master"):
                builder = builder.master(master or "local[*]")
            self.spark = builder.config("spark.ui.showConsoleProgress", "false").getOrCreate()
        self.context = self.spark.sparkContext
        self.context.setLogLevel("ERROR")
        self.context.addPyFile(_ship_package(self._tmp))
        self.parallelism = max(1, self.context.defaultParallelism)
        self.progress_queue = None
        self._threads = ThreadPoolExecutor(self.parallelism + 1, thread_name_prefix="spark-job")
        self._closing = False

    def submit(self, fn: Callable, *args: Any) -> Future:
        return self._threads.submit(self._run, fn, args)

    def _run(self, fn: Callable, args: tuple) -> Any:
        hook, run_id = self.hook, self.run_id
        for attempt in range(1, TASK_ATTEMPTS + 1):
            try:
                rdd = self.context.parallelize([0], 1)
                return rdd.map(lambda _: run_task(hook, run_id, fn, *args)).collect()[0]
            except Exception as e:  # noqa: BLE001 - Py4JJavaError wraps every executor-side failure
                if attempt == TASK_ATTEMPTS or self._closing:
                    raise
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                logger.warning("spark: %s failed (attempt %d of %d), retrying: %s", fn.__name__, attempt,
                               TASK_ATTEMPTS, first_line[:200])

    def shutdown(self) -> None:
        self._closing = True  # jobs still running belong to a run that stopped: cancel them, no retries
        self.context.cancelAllJobs()
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self._owned:
            self.spark.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)


class RayEngine:
    """Each task is a Ray task (one CPU); Ray retries a task whose worker process or node dies
    (``max_retries``), and the driver's futures come from ``ObjectRef.future()``. ``address``: None starts a
    local Ray with ``num_cpus`` CPUs; "auto" or "ray://host:port" joins a running cluster."""

    reader_default = "buffered"

    def __init__(self, address: Optional[str], num_cpus: int, hook: Hook = no_hook):
        try:
            import ray
        except ImportError:
            raise _missing("ray", "ray") from None
        self.ray, self.hook, self.run_id = ray, hook, uuid.uuid4().hex
        self._owned = not ray.is_initialized()
        if self._owned:
            os.environ["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(_PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")) if p)
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            if address:
                # a cluster's workers get this checkout of sd_ds (they may have none, or another version)
                kwargs.update(address=address, runtime_env={"py_modules": [str(_PACKAGE_DIR)]})
            else:
                kwargs.update(num_cpus=num_cpus)
            ray.init(**kwargs)
        self.parallelism = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.progress_queue = None
        self._remote = ray.remote(run_task).options(num_cpus=1, max_retries=TASK_ATTEMPTS - 1)
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args: Any) -> Future:
        with self._lock:
            return self._remote.remote(self.hook, self.run_id, fn, *args).future()

    def shutdown(self) -> None:
        if self._owned:
            self.ray.shutdown()


def build_engine(settings: EngineSettings, hook: Hook = no_hook) -> Any:
    """The engine the settings ask for. Raises EngineUnavailable when its package is not installed."""
    if settings.engine == "spark":
        return SparkEngine(settings.spark_master, hook)
    if settings.engine == "ray":
        return RayEngine(settings.ray_address, settings.processes, hook)
    return LocalEngine(settings.processes, hook)

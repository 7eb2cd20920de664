import os
import sys
from pathlib import Path

# Offline by construction: a model that is not on disk must fail at once, not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402


# Worker processes for `-n auto` (pyproject.toml's addopts; pytest-xdist, whole files per worker: --dist loadfile).
# A test spends much of its time in one-core phases (imports, the deepspeed launcher, process start-up and exit)
# between multi-rank runs, so a worker per core keeps the cores busy; each worker needs room for a 3-rank run.
GIB_PER_WORKER = 6
MAX_WORKERS = 8  # sd_ds.testing.free_port hands each worker a port block of its own, for up to 12


def pytest_xdist_auto_num_workers(config):
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # the user's count: xdist reads it
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gib = GIB_PER_WORKER * cores
    return max(1, min(cores, int(memory_gib // GIB_PER_WORKER), MAX_WORKERS))


# The files that take the longest (minutes each on 2 cores), longest first: handed out before the others
# (--no-loadscope-reorder keeps this order), so that no worker starts one of them while the rest sit idle at the
# end. A file that is not listed keeps its place after these.
LONGEST_FILES = ("test_compile_training.py", "test_evaluate.py", "test_compile.py", "test_data_buckets.py",
                 "test_families_train.py", "test_text_embeddings.py", "test_faults.py", "test_export_sample.py",
                 "test_data_train_remote.py", "test_bench_scripts.py", "test_export_target.py", "test_engine.py")


def _longest_first(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its tests' order


def pytest_collection_modifyitems(config, items):
    _longest_first(items)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    """Tiny webdataset shards and a tiny model directory, built once per test module that trains."""
    from tests.helpers import make_tiny_model, write_tiny_shards

    root = tmp_path_factory.mktemp("assets")
    return {"shards": write_tiny_shards(root / "shards", num_shards=4, samples_per_shard=16),
            "model": make_tiny_model(root / "model")}

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


def pytest_collection_modifyitems(config, items):
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

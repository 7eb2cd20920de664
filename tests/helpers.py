"""The shared fixtures live in sd_ds.testing (bench/ uses them too); tests import them from here, with the few helpers
only tests use."""

import contextlib
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from sd_ds.testing import (REPO_ROOT, encode_image, fp32_weights, free_port, make_tiny_model, photo_sample,  # noqa: F401
                           photos, run_sh, scalars, subprocess_env, train_flags, write_photo_shards, write_tiny_shards)


def take(data_loader, n: int) -> list[dict]:
    """The first ``n`` batches of a fresh iterator, closed after (its workers stop)."""
    it = iter(data_loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "56m") mounted at ``mount_point``, for full-disk scenarios; skips the test where
    mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"the full-disk scenario needs a small tmpfs, and mount is not allowed here "
                    f"({(done.stderr or done.stdout).strip() or 'not root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)

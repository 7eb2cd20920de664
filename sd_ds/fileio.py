"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every durable marker in sd-ds (checkpoint ``trainer_state.json`` and ``latest``, converter shards and stats,
EMA shards, latent-shard manifests) is written through here: write to a temporary name in the same
directory, flush to disk, then ``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union


def temporary_path(path: Union[str, Path]) -> Path:
    """A sibling name unique to this process, hidden from ``*.tar``/``checkpoint-*`` globs."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def write_atomic(path: Union[str, Path], data: Union[bytes, str], *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically. ``fsync`` makes it durable before it becomes visible, so a
    power loss cannot leave an empty file under the final name."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Union[str, Path], obj: Any, *, indent: Optional[int] = 1,
                      default: Optional[Callable[[Any], Any]] = None) -> Path:
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=default) + "\n"
    return write_atomic(path, text)


def save_atomic(path: Union[str, Path], writer: Callable[[Path], None]) -> Path:
    """``writer(tmp)`` writes the file (e.g. ``torch.save`` or ``safetensors.save_file``); then it is renamed."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

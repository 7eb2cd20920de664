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


# --- any fsspec URL (object stores) -------------------------------------------------------------------
# Write-side helpers for outputs that may live on S3/GCS/any fsspec URL as well as on a local disk. Local
# paths keep the temporary-name-then-os.replace scheme above.

# Stores where an upload becomes visible only when it is complete (a single PUT, or a multipart upload
# completed on close): a file is written straight under its final name, and abandoned uploads never appear.
COMMIT_ON_CLOSE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def is_fsspec_url(path: Union[str, Path]) -> bool:
    """True for ``protocol://...`` (s3://, gs://, http(s)://, file://, ...), False for a plain local path."""
    return "://" in str(path)


def url_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


class AtomicUpload:
    """A file written to ``url`` that appears there only complete: ``commit()`` publishes it, ``abort()`` (or
    an exception inside ``with``) drops it. On stores in COMMIT_ON_CLOSE_PROTOCOLS it is written straight
    under its final name (the store's commit is the atomic step); elsewhere under a temporary name moved into
    place on commit. A process killed mid-write leaves nothing under the final name either way."""

    def __init__(self, url: str, block_size: int = 16 << 20):
        import socket

        self.fs, self.path = url_fs(url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.direct = any(p in COMMIT_ON_CLOSE_PROTOCOLS for p in protocols)
        name = self.path.rsplit("/", 1)
        # host and pid: two hosts of a cluster may run writers with the same pid
        self.target = self.path if self.direct else "/".join(
            name[:-1] + [f".{name[-1]}.tmp.{socket.gethostname()}.{os.getpid()}"])
        self.file = self.fs.open(self.target, "wb", block_size=block_size) if self.direct else \
            self.fs.open(self.target, "wb")
        self.done = False

    def write(self, data: Any) -> int:
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def commit(self) -> None:
        self.file.close()
        if not self.direct:
            self.fs.mv(self.target, self.path)
        self.done = True

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        discard = getattr(self.file, "discard", None)
        if discard is not None:
            discard()  # s3fs: abort the multipart upload
        if hasattr(self.file, "buffer") and hasattr(self.file, "closed"):
            try:  # an fsspec buffered file closed now would upload what it holds: mark it closed instead
                self.file.closed = True
            except AttributeError:
                self.file.close()
        else:
            self.file.close()
        if not self.direct:
            try:
                self.fs.rm(self.target)
            except (FileNotFoundError, OSError):
                pass

    def __enter__(self) -> "AtomicUpload":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None or not self.done:
            self.abort()


def write_atomic_url(url: str, data: Union[bytes, str]) -> None:
    """``write_atomic`` for a local path or any fsspec URL."""
    if not is_fsspec_url(url):
        write_atomic(url, data)
        return
    with AtomicUpload(url) as upload:
        upload.write(data.encode("utf-8") if isinstance(data, str) else data)
        upload.commit()


def write_json_atomic_url(url: str, obj: Any, *, indent: Optional[int] = 1) -> None:
    """``write_json_atomic`` (the same bytes) for a local path or any fsspec URL."""
    write_atomic_url(url, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")

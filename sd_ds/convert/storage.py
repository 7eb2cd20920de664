"""The output folder as the converter sees it: a local folder or any fsspec URL (s3://, gs://, ...).

Every file the converter writes or reads in OUT (shards, stats, records, fragments) goes through a ``Store`` by
its name relative to OUT ("00000.tar", "_convert/parts/000001.frag"), so the run loop, the workers and the
shard assembly are the same code for both. A file is published only complete (``Store.writer``):

- local: a temporary name carrying the writer's pid, then ``os.replace`` (JSON records also fsync'd);
- an object store (``fileio.COMMIT_ON_CLOSE_PROTOCOLS``): straight under the final name, the upload's own
  commit being the atomic step; a killed writer's unfinished upload never appears;
- any other fsspec URL: a temporary name, then a move.

A local OUT is locked with ``flock`` against a second run; a store has no such lock, so one run at a time is
the user's part there (the plan record still refuses a run with other inputs or options).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Optional

from sd_ds.fileio import (AtomicUpload, is_url, temporary_path, url_fs, write_atomic, write_json_atomic,
                          write_json_atomic_url)

__all__ = ["Store", "LocalStore", "RemoteStore", "open_store", "UPLOAD_BLOCK_ENV"]

UPLOAD_BLOCK_ENV = "SD_DS_CONVERT_UPLOAD_BLOCK"
"""Bytes per block of an upload to a store (S3 multipart part size; at least 5 MiB there). Default 16 MiB."""


class Store:
    """OUT: names are relative to it, with "/" separators."""

    root: str

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name).decode("utf-8"))

    def open_read(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def writer(self, name: str, fsync: bool = False) -> Any:
        """A file that appears under ``name`` only complete: ``write``, ``tell``, ``commit()``; an exception
        inside ``with`` (or no commit) drops it. ``fsync``: durable before it appears (local files)."""
        raise NotImplementedError

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Create ``name`` with ``data`` unless it exists; True when this call created it. Exact on a local
        or shared POSIX file system (O_EXCL); on a store an exists-then-write, so two writers racing may both
        succeed (callers must tolerate that: a duplicate of deterministic work)."""
        if self.exists(name):
            return False
        self.write_bytes(name, data)
        return True

    def write_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def write_json(self, name: str, obj: Any, indent: Optional[int] = 1) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def list(self, folder: str = "") -> list[str]:
        """Names of the files directly in ``folder`` (file names only), sorted."""
        raise NotImplementedError

    def remove_tree(self, folder: str) -> None:
        raise NotImplementedError

    def remove_temporaries(self, folder: str = "", of: str = "") -> None:
        """Temporary files of writers that died (a killed run, a retried task); only those of the file named
        ``of`` when given."""
        prefix = f".{of}.tmp." if of else "."
        for name in self.list(folder):
            if ".tmp." in name and name.startswith(prefix):
                self.delete(f"{folder}/{name}" if folder else name)

    def __str__(self) -> str:
        return self.root


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.path = Path(root)
        self.root = str(root)

    def _p(self, name: str) -> Path:
        return self.path / name

    def exists(self, name: str) -> bool:
        return self._p(name).exists()

    def read_bytes(self, name: str) -> bytes:
        return self._p(name).read_bytes()

    def open_read(self, name: str) -> IO[bytes]:
        return open(self._p(name), "rb")

    def writer(self, name: str, fsync: bool = False) -> "_LocalWriter":
        return _LocalWriter(self._p(name), fsync)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._p(name).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self._p(name), data, fsync=False)

    def write_json(self, name: str, obj: Any, indent: Optional[int] = 1) -> None:
        self._p(name).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._p(name), obj, indent=indent)

    def delete(self, name: str) -> None:
        self._p(name).unlink(missing_ok=True)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        self._p(name).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._p(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def list(self, folder: str = "") -> list[str]:
        directory = self._p(folder) if folder else self.path
        return sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []

    def remove_tree(self, folder: str) -> None:
        shutil.rmtree(self._p(folder), ignore_errors=True)


class _LocalWriter:
    """A local file under a temporary name (the writer's pid in it), renamed into place on commit."""

    def __init__(self, path: Path, fsync: bool = False):
        self.path, self.tmp, self.fsync = path, temporary_path(path), fsync
        self.file = open(self.tmp, "wb", buffering=1 << 20)
        self.done = False

    def write(self, data: Any) -> int:
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def commit(self) -> None:
        if self.fsync:  # durable before visible: a power loss cannot leave a short file under the name
            self.file.flush()
            os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        self.done = True

    def __enter__(self) -> "_LocalWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if not self.done:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            self.done = True


class RemoteStore(Store):
    """OUT at an fsspec URL. Reads stream through fsspec's buffered files (large blocks: fragments and parts
    are read front to back)."""

    def __init__(self, url: str):
        self.root = url.rstrip("/")
        self.fs, self.base = url_fs(self.root)
        self.upload_block = int(os.environ.get(UPLOAD_BLOCK_ENV) or 16 << 20)

    def _p(self, name: str) -> str:
        return f"{self.base}/{name}" if name else self.base

    def _url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._p(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._p(name))

    def open_read(self, name: str) -> IO[bytes]:
        return self.fs.open(self._p(name), "rb", block_size=8 << 20)

    def writer(self, name: str, fsync: bool = False) -> AtomicUpload:
        return AtomicUpload(self._url(name), block_size=self.upload_block)  # a store's commit is durable

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.writer(name) as upload:
            upload.write(data)
            upload.commit()

    def write_json(self, name: str, obj: Any, indent: Optional[int] = 1) -> None:
        write_json_atomic_url(self._url(name), obj, indent=indent)

    def delete(self, name: str) -> None:
        try:
            self.fs.rm_file(self._p(name))
        except FileNotFoundError:
            pass

    def list(self, folder: str = "") -> list[str]:
        self.fs.invalidate_cache(self._p(folder))  # other processes write here: never answer from a cache
        try:
            entries = self.fs.ls(self._p(folder), detail=True)
        except FileNotFoundError:
            return []
        return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries
                      if entry.get("type") == "file")

    def remove_tree(self, folder: str) -> None:
        for name in self.list(folder):
            self.delete(f"{folder}/{name}")


def open_store(output_dir: str | os.PathLike) -> Store:
    """The store of ``--output_dir``: a URL (``protocol://``) is an fsspec store, anything else a local path."""
    return RemoteStore(str(output_dir)) if is_url(output_dir) else LocalStore(output_dir)


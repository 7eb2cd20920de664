"""File I/O shared by the package: atomic writes, and reading local paths and URLs the same way.

Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every durable marker in sd-ds (checkpoint ``trainer_state.json`` and ``latest``, converter shards and stats,
EMA shards, latent-shard manifests) is written through here: write to a temporary name in the same
directory, flush to disk, then ``os.replace`` (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from sd_ds.lifecycle import pid_alive  # a writer killed mid-write leaves a sibling named after its PID


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


def save_atomic(path: Union[str, Path], writer: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """``writer(tmp)`` writes the file (e.g. ``torch.save`` or ``safetensors.save_file``); then it is flushed to
    disk (``fsync``, as ``write_atomic``) and renamed."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        writer(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a full disk, as Python, torch and safetensors
    report it."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        text = str(err)
        # torch.save's C++ writer reports a full disk as a bare stream error; safetensors as "StorageFull".
        if ("No space left on device" in text or "iostream error" in text or "file write failed" in text
                or "StorageFull" in text):
            return True
        err = err.__cause__ or err.__context__
    return False


# --- a whole directory, replaced at once -------------------------------------------------------------------

_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one rename


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (Linux renameat2 RENAME_EXCHANGE); False where the
    C library or the filesystem does not offer it."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk, so that what a rename publishes is on it."""
    for folder, _, files in os.walk(root):
        for name in [*files, "."]:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _stale(prefix: str, parent: Path) -> list[Path]:
    """Siblings named ``prefix`` + PID-... whose process (on this host) is gone: left by a killed writer."""
    import glob

    stale = []
    for leftover in parent.glob(glob.escape(prefix) + "*"):
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            stale.append(leftover)
    return stale


@contextlib.contextmanager
def replaced_directory(target: Union[str, Path]) -> Iterator[Path]:
    """Write a directory that replaces ``target`` whole, or not at all.

    Yields a fresh temporary sibling (``.NAME.partial-HOST-PID-*``, on the same filesystem) to write into. When the
    block succeeds its files are flushed to disk and it takes ``target``'s place: an existing ``target`` is swapped
    out in one rename (Linux RENAME_EXCHANGE) and then deleted; where the filesystem cannot swap, ``target`` is
    moved aside (``.NAME.replaced-HOST-PID-*``) and the new folder renamed into place. When the block fails (a full
    disk, an error) the temporary folder is deleted and ``target`` is as it was; after a kill it is left behind and
    the next call on this host removes it (and moves a folder that was aside back, were ``target`` then missing).
    Nothing is ever written into ``target`` itself, so links inside an old ``target`` are never followed (deleting
    it removes the links, not what they point to); a ``target`` that is itself a link is the caller's to refuse."""
    import shutil
    import socket
    import tempfile

    target = Path(target)
    host = socket.gethostname().replace("/", "_")
    partial, aside = f".{target.name}.partial-{host}-", f".{target.name}.replaced-{host}-"
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _stale(aside, target.parent):
        if not os.path.lexists(target) and (leftover / "old").is_dir():
            os.rename(leftover / "old", target)  # a kill between the two renames below: the old folder returns
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in _stale(partial, target.parent):
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{partial}{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        _fsync_tree(staging)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)  # mkdtemp's 0700 would make the published folder private
        if not os.path.lexists(target):
            os.rename(staging, target)
        elif _exchange(staging, target):
            if staging.is_symlink():  # the old target, swapped out: a link loses only itself
                staging.unlink()
            else:
                shutil.rmtree(staging)
        else:
            held = Path(tempfile.mkdtemp(prefix=f"{aside}{os.getpid()}-", dir=target.parent))
            os.rename(target, held / "old")
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(held / "old", target)
                held.rmdir()
                raise
            shutil.rmtree(held)
        _fsync_tree_entry(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_tree_entry(directory: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- any fsspec URL (object stores) -------------------------------------------------------------------
# Write-side helpers for outputs that may live on S3/GCS/any fsspec URL as well as on a local disk. Local
# paths keep the temporary-name-then-os.replace scheme above.

def is_url(path: Union[str, Path]) -> bool:
    """The one test of what is a URL in sd-ds: ``scheme://...`` (s3://, gs://, http(s)://, file://, any fsspec
    protocol) is read and written through fsspec; a plain local path (and a ``pipe:`` command) is not."""
    return "://" in str(path)


# Stores where an upload becomes visible only when it is complete (a single PUT, or a multipart upload
# completed on close): a file is written straight under its final name, and abandoned uploads never appear.
COMMIT_ON_CLOSE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def url_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a URL; a missing backend (s3fs, gcsfs, aiohttp) is one clear error."""
    return _fs(url)


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
    if not is_url(url):
        write_atomic(url, data)
        return
    with AtomicUpload(url) as upload:
        upload.write(data.encode("utf-8") if isinstance(data, str) else data)
        upload.commit()


def write_json_atomic_url(url: str, obj: Any, *, indent: Optional[int] = 1) -> None:
    """``write_json_atomic`` (the same bytes) for a local path or any fsspec URL."""
    write_atomic_url(url, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
# --- reading: local paths and any fsspec URL (s3://, gs://, http(s)://, ...) --------------------------
#
# One set of functions for both, so that the data pipeline treats a converter output directory on S3 exactly as
# one on local disk. Credentials and endpoints come the standard way of each store (for S3: the AWS_* variables,
# profiles and AWS_ENDPOINT_URL, read by botocore under s3fs; for GCS: gcsfs's default credentials). A local
# path never goes through fsspec, so plain runs need none of the optional packages.

def _retried_for_urls(read: Callable[..., Any]) -> Callable[..., Any]:
    """``read(path, ...)`` tried again, with bounded backoff, when a URL's store fails transiently (HTTP 5xx,
    timeouts, resets, S3 SlowDown: ``sd_ds.retries``); a local path is read once."""
    import functools

    @functools.wraps(read)
    def wrapper(path: Union[str, Path], *args: Any, **kwargs: Any) -> Any:
        if not is_url(path):
            return read(path, *args, **kwargs)
        from sd_ds.retries import retrying

        return retrying(lambda: read(path, *args, **kwargs), str(path))
    return wrapper


def _fs(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the requirements
        raise ImportError(f"{url}: reading URLs needs fsspec (pip install fsspec)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        extra = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}.get(
            url.split("://", 1)[0], "the fsspec backend for it")
        raise ImportError(f"{url}: reading this URL needs {extra} (pip install 'sd-ds[remote]' or "
                          f"pip install {extra}): {e}") from None


def join(base: Union[str, Path], name: str) -> str:
    """``base/name`` for a local directory or a URL prefix."""
    s = str(base)
    if is_url(s):
        return s.rstrip("/") + "/" + name
    return str(Path(s) / name)


def is_pipe(path: Union[str, Path]) -> bool:
    """webdataset's ``pipe:COMMAND`` shards: the shard is what COMMAND writes to stdout."""
    return str(path).startswith("pipe:")


class _PipeStream:
    """A ``pipe:`` shard's stdout, read front to back; closing it ends and reaps the command (a reader that stops
    early, e.g. at its span's end, must not leave the download running)."""

    def __init__(self, command: str) -> None:
        import subprocess

        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)

    def read(self, n: int = -1) -> bytes:
        return self.process.stdout.read(n)

    def close(self) -> None:
        import subprocess

        self.process.stdout.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "_PipeStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_file(path: Union[str, Path], mode: str = "rb", **kwargs: Any) -> Any:
    """A file object for a local path, a URL (read modes; fsspec's buffered random-access file for URLs) or a
    ``pipe:COMMAND`` (its stdout, sequential only)."""
    if is_pipe(path):
        return _PipeStream(str(path)[len("pipe:"):])
    if not is_url(path):
        return open(path, mode)
    fs, p = _fs(str(path))
    return fs.open(p, mode, **kwargs)


def exists(path: Union[str, Path]) -> bool:
    if is_pipe(path):
        return True  # known only by running the command
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(str(path))
    return bool(fs.exists(p))


def is_file(path: Union[str, Path]) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = _fs(str(path))
    try:
        return bool(fs.isfile(p))
    except (OSError, ValueError):
        return False


@_retried_for_urls
def is_dir(path: Union[str, Path]) -> bool:
    """A local directory, or a URL prefix with objects under it (an HTTP URL ending in '/' that lists)."""
    if not is_url(path):
        return os.path.isdir(path)
    s = str(path)
    if s.rsplit("/", 1)[-1].endswith(".tar") or any(ch in s for ch in "*?[{"):
        return False
    fs, p = _fs(s)
    try:
        return bool(fs.isdir(p))
    except (OSError, ValueError) as e:
        from sd_ds.retries import is_transient

        if is_transient(e):
            raise  # the store failed, not the path: tried again
        return False


@_retried_for_urls
def read_bytes(path: Union[str, Path]) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_json(path: Union[str, Path]) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


def read_json_if_exists(path: Union[str, Path]) -> Optional[Any]:
    """The JSON at ``path``, or None when there is no such file (a URL answering 404 included)."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


@_retried_for_urls
def list_files(directory: Union[str, Path], suffix: str) -> list[str]:
    """Files directly in a directory (local or URL prefix) whose names end with ``suffix``, sorted by name, as
    paths or URLs. HTTP: the links of the server's directory listing."""
    if not is_url(directory):
        return sorted(str(p) for p in Path(directory).glob(f"*{suffix}") if p.is_file())
    fs, p = _fs(str(directory))
    names = fs.ls(p, detail=False)
    out = []
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(suffix) and not base.startswith("."):
            out.append(join(directory, base))
    return sorted(set(out))


@_retried_for_urls
def glob_urls(pattern: str) -> list[str]:
    """Paths or URLs matching a glob (``*``, ``?``, ``[...]``), sorted; the protocol is kept on URLs."""
    if not is_url(pattern):
        import glob as globlib

        return sorted(globlib.glob(pattern))
    fs, p = _fs(pattern)
    protocol = pattern.split("://", 1)[0]
    return sorted(m if "://" in m else f"{protocol}://{m}" for m in fs.glob(p))


def write_bytes_to(path: Union[str, Path], data: bytes) -> None:
    """Write a small file (metadata) to a local path or a URL, whole or not at all (``write_atomic_url``)."""
    write_atomic_url(str(path), data)

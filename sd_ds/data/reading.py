"""Reading samples out of tar shards on any storage: a shard opened at member k, and per-source cursors.

A shard is streamed once from the start of the sample asked for: through ``sd_ds.fileio.open_file`` (a local
file, or fsspec's buffered reader for s3://, gs://, http(s)://), with tarfile's stream mode. Opening at sample k
seeks to it when the shard has a member index (``NNNNN.tar.offsets`` beside it: little-endian int64, the shard's
size in bytes, then the byte offset of each sample's first tar header; written by ``python -m sd_ds.data.index``,
like webdataset's wids indexes; an index whose size does not match the shard is ignored); without one it reads (and drops) the k samples before it: at most one shard. A reader that asks for the next
samples of the shard it is reading continues the open stream, so an epoch reads every byte once.
"""

from __future__ import annotations

import logging
import os
import tarfile
from typing import Any, Callable, Iterator, Optional

from sd_ds import fileio
from sd_ds.retries import Backoff, is_transient

logger = logging.getLogger("sd_ds.data")

REMOTE_BLOCK = 4 << 20  # bytes per ranged read from object storage: a few samples' worth, sequential readahead
OFFSETS_SUFFIX = ".offsets"  # the member index beside a shard


def sample_offsets(url: str) -> list[int]:
    """The byte offset of each sample's first tar header in a shard (local or URL), read from its headers."""
    offsets, key = [], None
    with fileio.open_file(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for member in tf:
            if not member.isfile():
                continue
            base, _ = _base_plus_ext(member.name)
            if base is not None and base != key:
                offsets.append(member.offset)
                key = base
    return offsets


def offsets_bytes(shard_size: int, offsets: list[int]) -> bytes:
    """A member index file's bytes."""
    import numpy as np

    return np.asarray([shard_size, *offsets], dtype="<i8").tobytes()


def read_offsets(url: str, shard_size: int) -> Optional[list[int]]:
    """A shard's member index, or None when it has none or it was made for other bytes (a rewritten shard)."""
    import numpy as np

    try:
        values = np.frombuffer(fileio.read_bytes(url + OFFSETS_SUFFIX), dtype="<i8").tolist()
    except FileNotFoundError as e:
        if is_transient(e):
            raise
        return None
    if not values or values[0] != shard_size:
        logger.warning("%s%s does not match the shard's size: ignored (run python -m sd_ds.data.index again)",
                       url, OFFSETS_SUFFIX)
        return None
    return values[1:]


def _size(f: Any) -> Optional[int]:
    size = getattr(f, "size", None)  # fsspec files
    if size is None:
        try:
            size = os.fstat(f.fileno()).st_size
        except (OSError, AttributeError, ValueError):
            return None
    return int(size)


def _base_plus_ext(name: str) -> tuple[Optional[str], Optional[str]]:
    import webdataset as wds

    return wds.tariterators.base_plus_ext(name)


def shard_samples(url: str, start: int = 0, on_error: Optional[Callable[[Exception], None]] = None,
                  resume_at: Optional[tuple[int, int]] = None, progress: Optional[dict] = None
                  ) -> Iterator[tuple[int, dict]]:
    """(member index, sample) for the samples of a tar shard from the ``start``-th on (webdataset's grouping:
    consecutive members with the same key make a sample; ``__key__`` and ``__url__`` set). A read error ends
    the shard after ``on_error(exception)`` (default: raise); a transient storage error (``sd_ds.retries``) is
    raised, for the caller to open the shard again at the sample it needs.

    ``progress`` (a dict) learns ``at`` = (index, byte offset of its first header) of each sample as the stream
    reaches it; ``resume_at`` = such a pair (index <= ``start``) starts the stream there: a read that failed
    goes on from the sample it was reading without the member index and without reading the shard again."""
    index, current, key = 0, None, None
    origin = 0  # the byte offset the tar stream starts at
    try:
        kw: dict[str, Any] = {"block_size": REMOTE_BLOCK, "cache_type": "readahead"} if fileio.is_url(url) else {}
        with fileio.open_file(url, "rb", **kw) as f:
            if resume_at is not None and resume_at[0] <= start:
                index, origin = resume_at
                f.seek(origin)
            else:
                size = _size(f) if start > 0 else None
                offsets = read_offsets(url, size) if size is not None else None
                if offsets is not None and start < len(offsets):
                    f.seek(offsets[start])  # a tar stream can begin at any member's header
                    index, origin = start, offsets[start]
            tf = tarfile.open(fileobj=f, mode="r|")
            for member in tf:
                if not member.isfile():
                    continue
                base, ext = _base_plus_ext(member.name)
                if base is None:
                    continue
                if base != key:
                    if current is not None:
                        if index >= start:
                            yield index, current
                        index += 1
                    key, current = base, {"__key__": base, "__url__": url}
                    if progress is not None:
                        progress["at"] = (index, origin + member.offset)
                if index >= start:  # samples before the start are passed over: their data is not kept
                    data = tf.extractfile(member)
                    current[ext] = data.read() if data is not None else b""
            tf.close()
        if current is not None and index >= start:
            yield index, current
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        if on_error is None or is_transient(e):
            raise
        on_error(e)


class SourceCursor:
    """Sequential reads of one source's samples (by shard and member), continuing the open shard stream when
    the next sample asked for is the next one in it. A transient storage error reopens the shard at the sample
    asked for, after a backoff (``backoff``; it raises StorageUnavailable when the store keeps failing), so the
    samples served are those of a read without failures."""

    def __init__(self, shard_urls: tuple[str, ...], on_error: Callable[[Exception], None],
                 backoff: Optional[Backoff] = None) -> None:
        self.shard_urls, self.on_error = shard_urls, on_error
        self.backoff = backoff or Backoff()
        self._shard: Optional[int] = None
        self._stream: Optional[Iterator[tuple[int, dict]]] = None
        self._next: Optional[tuple[int, dict]] = None  # read ahead by one
        self._at = 0  # no member before this one can come from the open stream any more
        self.opened = 0  # shards opened (for tests and logs)
        self._progress: dict = {}  # where the open stream is: (sample, byte offset), for a retry to go on from

    def _open(self, shard: int, member: int, resume_at: Optional[tuple[int, int]] = None) -> None:
        self._close()
        self._shard = shard
        self._progress = {}
        self._stream = shard_samples(self.shard_urls[shard], member, self._error, resume_at, self._progress)
        self._next = None
        self._at = member
        self.opened += 1

    def _error(self, exn: Exception) -> None:
        self.on_error(RuntimeError(f"{self.shard_urls[self._shard]}: {type(exn).__name__}: {exn}"))

    def _close(self) -> None:
        if self._stream is not None:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        self._stream, self._next = None, None

    def get(self, shard: int, member: int) -> Optional[dict]:
        """The sample at ``member`` of ``shard``; None when the shard has no such sample (cut short, unreadable)."""
        if self._shard != shard or self._stream is None or member < self._at:
            self._open(shard, member)
        self._at = member + 1
        while True:
            if self._next is None:
                self._next = self._read_next(shard, member)
                if self._next is None:
                    # The shard ended before this member (cut short, or fewer samples than sizes.json says):
                    # counted once per opening, and the shard is not read again for its later members.
                    self._stream = iter(())
                    self.on_error(EOFError(f"{self.shard_urls[shard]} ended before its sample #{member}"))
                    return None
            index, sample = self._next
            if index == member:
                self._next = None
                return sample
            if index > member:
                return None  # a member missing from the shard (a tar error in between)
            self._next = None  # an earlier member (a repeat never asks for it): pass over it

    def _read_next(self, shard: int, member: int) -> Optional[tuple[int, dict]]:
        """The open stream's next sample (None at its end). On a transient storage error the stream is dead:
        wait (``backoff``), open the shard again at ``member`` (nothing before it is needed any more: the
        stream had not yielded it) and read on."""
        while True:
            try:
                item = next(self._stream, None)  # type: ignore[arg-type]
            except Exception as e:  # noqa: BLE001 - sorted by is_transient
                if not is_transient(e):
                    raise
                self.backoff.failed(e, f"{self.shard_urls[shard]} (reading sample #{member})")
                self._open(shard, member, self._progress.get("at"))  # from the sample the stream was reading
                self._at = member + 1
                continue
            self.backoff.succeeded()
            return item

    def close(self) -> None:
        self._close()
        self._shard = None


def basename(url: str) -> str:
    """The shard's file name (it seeds the shard's shuffle: a local and a remote copy read alike)."""
    if fileio.is_pipe(url):
        url = pipe_target(url)
    return os.path.basename(url.split("?", 1)[0].rstrip("/"))


def pipe_target(url: str) -> str:
    """The shard a ``pipe:`` command reads: its last argument naming a .tar (``pipe:aws s3 cp s3://b/00001.tar -``
    -> ``s3://b/00001.tar``), else its last argument."""
    words = url[len("pipe:"):].split()
    return next((w for w in reversed(words) if ".tar" in w), words[-1] if words else url)

"""Tar writing: ustar headers from a template, the fragment writer (a part's good samples as finished tar
members under a placeholder key), and shard assembly (byte ranges of fragments copied into a shard with the
real keys written in). Plain file work: nothing here knows LAION lines or images.

Work-folder layout of one part (``OUT/_convert/parts/NNNNNN.*``, names in the output ``Store``): ``.frag``
(the tar members), ``.idx`` (uint64 byte offset where each sample starts, plus the end) and ``.json`` (the part
record: sample count, failures, empty captions). The record is written last: its presence marks the part done.
A shard's ``NNNNN_stats.json`` is written before its tar: the tar's presence marks the shard done.
"""

from __future__ import annotations

import bisect
import json
import tarfile
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple

from sd_ds.convert.storage import Store
from sd_ds.faults import Hook

__all__ = ["KeyFormat", "tar_header", "FragmentPaths", "fragment_paths", "FragmentWriter", "PartSpan", "ShardJob",
           "assemble_shard", "shard_name", "stats_name", "KEY_SHARD_DIGITS", "PARTS_DIR"]

TAR_RECORD = 10240  # tar pads the archive to 20 blocks, as tarfile and GNU tar do
CHUNK_BYTES = 8 << 20  # assembly copies in chunks of about this size
KEY_SHARD_DIGITS = 5
_JSON_KEY_PREFIX = b'{"key": "'  # how every sample's JSON member starts (FragmentWriter.add writes it)
_ZEROS = bytes(TAR_RECORD)


@dataclass(frozen=True)
class KeyFormat:
    """Keys of the img2dataset scheme: shard digits then index digits, fixed width for a run."""

    samples_per_shard: int

    @property
    def index_digits(self) -> int:
        return max(4, len(str(self.samples_per_shard - 1)))

    @property
    def width(self) -> int:
        return KEY_SHARD_DIGITS + self.index_digits

    def key(self, shard: int, index: int) -> str:
        if shard >= 10 ** KEY_SHARD_DIGITS:
            raise ValueError(f"shard {shard} does not fit the {KEY_SHARD_DIGITS}-digit key field "
                             f"(at most {10 ** KEY_SHARD_DIGITS} shards); raise --samples_per_shard")
        return f"{shard:0{KEY_SHARD_DIGITS}d}{index:0{self.index_digits}d}"

    @property
    def placeholder(self) -> str:
        return "0" * self.width


def shard_name(shard: int) -> str:
    return f"{shard:05d}.tar"


def stats_name(shard: int) -> str:
    return f"{shard:05d}_stats.json"


# --- tar headers ---------------------------------------------------------------------------------------

def _header_template() -> bytes:
    info = tarfile.TarInfo("")
    info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime = 0o644, 0, 0, "", "", 0
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


_TEMPLATE = _header_template()
# Checksum of the template with its checksum field counted as spaces (the tar rule) and an empty name.
_TEMPLATE_SUM = sum(_TEMPLATE[:148]) + 8 * 32 + sum(_TEMPLATE[156:]) - sum(_TEMPLATE[124:136])


def tar_header(name: bytes, size: int) -> bytes:
    """The ustar header tarfile writes for a regular file (mode 644, uid/gid 0, no user names, mtime 0),
    built from a template: tarfile's own TarInfo.tobuf costs ~20 µs, a third of a sample's budget."""
    header = bytearray(_TEMPLATE)
    header[: len(name)] = name
    size_field = b"%011o\x00" % size
    header[124:136] = size_field
    checksum = _TEMPLATE_SUM + sum(name) + sum(size_field)
    header[148:156] = b"%06o\x00 " % checksum
    return bytes(header)


def _padding(size: int) -> int:
    return -size % 512


def _patch_keys(buf: bytearray, start: int, key: bytes) -> int:
    """Write ``key`` over the placeholder in one sample's three members (image, txt, json) that begin at
    ``start`` in ``buf``: the member names, their header checksums and the JSON's "key" value. Returns the
    offset after the sample. Keys and placeholders have the same width, so no size or offset changes."""
    width = len(key)
    delta = sum(key) - 0x30 * width  # the placeholder is all '0'
    position = start
    for member in range(3):
        buf[position: position + width] = key
        checksum = int(buf[position + 148: position + 154], 8) + delta
        buf[position + 148: position + 156] = b"%06o\x00 " % checksum
        size = int(buf[position + 124: position + 135], 8)
        if member == 2:
            value = position + 512 + len(_JSON_KEY_PREFIX)
            buf[value: value + width] = key
        position += 512 + size + _padding(size)
    return position


# --- fragments -----------------------------------------------------------------------------------------

class FragmentPaths(NamedTuple):
    """Names in the output store (relative to OUT)."""

    members: str  # the tar members of the part's good samples
    offsets: str  # where each sample starts in ``members``
    record: str  # the part record; present = the part is done


PARTS_DIR = "_convert/parts"  # in OUT: fragments and part records


def fragment_paths(part: int) -> FragmentPaths:
    stem = f"{PARTS_DIR}/{part:06d}"
    return FragmentPaths(f"{stem}.frag", f"{stem}.idx", f"{stem}.json")


class FragmentWriter:
    """Tar members of one part's samples, keyed with a placeholder, and the byte offset where each sample
    starts; published only complete (``Store.writer``), by ``commit`` (record last).

        with FragmentWriter(store, paths, placeholder) as fragment:
            fragment.add(...)
        fragment.commit(record)
    """

    def __init__(self, store: Store, paths: FragmentPaths, placeholder: str):
        self.store, self.paths, self.placeholder = store, paths, placeholder
        self.offsets = array("Q", [0])
        self._file = store.writer(paths.members)

    def __enter__(self) -> "FragmentWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is not None:
            self._file.__exit__(*exc_info)  # drop the unfinished fragment

    def add(self, ext: str, image: bytes, caption: str, meta: dict) -> None:
        meta_bytes = json.dumps({"key": self.placeholder, **meta}, ensure_ascii=False).encode("utf-8")
        position = self.offsets[-1]
        for member, data in ((ext, image), ("txt", caption.encode("utf-8")), ("json", meta_bytes)):
            self._file.write(tar_header(f"{self.placeholder}.{member}".encode("ascii"), len(data)))
            self._file.write(data)
            pad = _padding(len(data))
            if pad:
                self._file.write(_ZEROS[:pad])
            position += 512 + len(data) + pad
        self.offsets.append(position)

    def commit(self, record: dict) -> None:
        """Members and offsets first, the record last: the record's presence is what marks the part done."""
        self._file.commit()
        self.store.write_bytes(self.paths.offsets, self.offsets.tobytes())
        self.store.write_json(self.paths.record, record, indent=None)


# --- shards ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PartSpan:
    """A part as a shard sees it: its good samples are samples ``first_sample ..`` of its source."""

    part: int  # global index, in input order
    first_sample: int
    samples: int
    path: str

    @property
    def end_sample(self) -> int:
        return self.first_sample + self.samples


@dataclass(frozen=True)
class ShardJob:
    """One shard to assemble: samples [first_sample, end_sample) of source ``source_index``, and the failures
    that belong to it: those with ``failures_from .. failures_to`` (inclusive) good samples of the source
    before them. ``parts`` covers both."""

    shard: int
    source_index: int
    first_sample: int
    end_sample: int
    failures_from: int
    failures_to: int
    parts: tuple[PartSpan, ...]


def assemble_shard(job: ShardJob, source_name: str, store: Store, keys: KeyFormat,
                   redo_part: Callable[[PartSpan], None], hook: Hook) -> bool:
    """Copy one shard's samples out of fragments, write the real keys, publish the shard. Returns False when
    the shard already existed. ``redo_part`` converts a part again whose fragment is gone (a resumed run
    deletes fragments once their shards exist; conversion is deterministic, so the bytes match)."""
    name = shard_name(job.shard)
    if store.exists(name):
        return False
    failures: Counter = Counter()
    empty_captions = index = 0
    with store.writer(name) as dst:
        for span in job.parts:
            paths = fragment_paths(span.part)
            # the part's own sample range this shard takes (empty when the part only brings failures)
            lo = max(job.first_sample, span.first_sample) - span.first_sample
            hi = min(job.end_sample, span.end_sample) - span.first_sample
            if lo < hi and not (store.exists(paths.members) and store.exists(paths.offsets)):
                redo_part(span)
            record = store.read_json(paths.record)
            for _line, reason, good_before in record["failures"]:
                if job.failures_from <= span.first_sample + good_before <= job.failures_to:
                    failures[reason] += 1
            if lo >= hi:
                continue
            empties = record["empty_captions"]
            empty_captions += bisect.bisect_left(empties, hi) - bisect.bisect_left(empties, lo)
            offsets = array("Q")
            offsets.frombytes(store.read_bytes(paths.offsets))
            with store.open_read(paths.members) as src:
                chunk_start = lo
                while chunk_start < hi:
                    chunk_end = chunk_start + 1  # a chunk of whole samples, about CHUNK_BYTES
                    while chunk_end < hi and offsets[chunk_end + 1] - offsets[chunk_start] <= CHUNK_BYTES:
                        chunk_end += 1
                    src.seek(offsets[chunk_start])
                    buf = bytearray(offsets[chunk_end] - offsets[chunk_start])
                    if src.readinto(buf) != len(buf):
                        raise OSError(f"{store}/{paths.members}: fragment shorter than its offsets")
                    position = 0
                    for _ in range(chunk_start, chunk_end):
                        position = _patch_keys(buf, position, keys.key(job.shard, index).encode("ascii"))
                        index += 1
                    dst.write(buf)
                    hook("shard_chunk")
                    chunk_start = chunk_end
        size = dst.tell() + 1024
        dst.write(_ZEROS[: 1024 + (-size % TAR_RECORD)])
        stats = {"shard": name, "source": source_name, "count": index + sum(failures.values()),
                 "successes": index, "failures": dict(sorted(failures.items())), "empty_captions": empty_captions}
        # Stats first, tar last: the tar's presence is what marks the shard done.
        store.write_json(stats_name(job.shard), stats)
        dst.commit()
    hook("shard")
    return True

"""Tar writing: ustar headers from a template, the fragment writer (a part's good samples as finished tar
members under a placeholder key), and shard assembly (byte ranges of fragments copied into a shard with the
real keys written in). Plain file work: nothing here knows LAION lines or images.

Work-folder layout of one part (``WORK/parts/NNNNNN.*``): ``.frag`` (the tar members), ``.idx`` (uint64 byte
offset where each sample starts, plus the end) and ``.json`` (the part record: sample count, failures, empty
captions). The record is written last: its presence marks the part done. A shard's ``NNNNN_stats.json`` is
written before its tar: the tar's presence marks the shard done.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import tarfile
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from sd_ds.convert.hooks import Hook
from sd_ds.fileio import temporary_path, write_json_atomic

__all__ = ["KeyFormat", "tar_header", "FragmentPaths", "fragment_paths", "FragmentWriter", "PartSpan", "ShardJob",
           "assemble_shard", "shard_name", "stats_name", "KEY_SHARD_DIGITS"]

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
    members: Path  # the tar members of the part's good samples
    offsets: Path  # where each sample starts in ``members``
    record: Path  # the part record; present = the part is done


def fragment_paths(work: Path, part: int) -> FragmentPaths:
    stem = Path(work) / "parts" / f"{part:06d}"
    return FragmentPaths(stem.with_suffix(".frag"), stem.with_suffix(".idx"), stem.with_suffix(".json"))


class FragmentWriter:
    """Tar members of one part's samples, keyed with a placeholder, and the byte offset where each sample
    starts; written under temporary names, put in place by ``commit`` (record last).

        with FragmentWriter(paths, placeholder) as fragment:
            fragment.add(...)
        fragment.commit(record)
    """

    def __init__(self, paths: FragmentPaths, placeholder: str):
        self.paths, self.placeholder = paths, placeholder
        self.offsets = array("Q", [0])
        self._members_tmp = temporary_path(paths.members)
        self._file: io.BufferedWriter = open(self._members_tmp, "wb", buffering=1 << 20)

    def __enter__(self) -> "FragmentWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()

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
        self._file.close()
        offsets_tmp = temporary_path(self.paths.offsets)
        with open(offsets_tmp, "wb") as f:
            self.offsets.tofile(f)
        os.replace(self._members_tmp, self.paths.members)
        os.replace(offsets_tmp, self.paths.offsets)
        write_json_atomic(self.paths.record, record, indent=None)


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


def assemble_shard(job: ShardJob, source_name: str, out: Path, work: Path, keys: KeyFormat,
                   redo_part: Callable[[PartSpan], None], hook: Hook) -> bool:
    """Copy one shard's samples out of fragments, write the real keys, rename the shard into place. Returns
    False when the shard already existed. ``redo_part`` converts a part again whose fragment is gone (a
    resumed run deletes fragments once their shards exist; conversion is deterministic, so the bytes match)."""
    name = shard_name(job.shard)
    if (out / name).exists():
        return False
    failures: Counter = Counter()
    empty_captions = index = 0
    tmp = temporary_path(out / name)
    with open(tmp, "wb") as dst:
        for span in job.parts:
            paths = fragment_paths(work, span.part)
            # the part's own sample range this shard takes (empty when the part only brings failures)
            lo = max(job.first_sample, span.first_sample) - span.first_sample
            hi = min(job.end_sample, span.end_sample) - span.first_sample
            if lo < hi and not (paths.members.exists() and paths.offsets.exists()):
                redo_part(span)
            record = json.loads(paths.record.read_text(encoding="utf-8"))
            for _line, reason, good_before in record["failures"]:
                if job.failures_from <= span.first_sample + good_before <= job.failures_to:
                    failures[reason] += 1
            if lo >= hi:
                continue
            empties = record["empty_captions"]
            empty_captions += bisect.bisect_left(empties, hi) - bisect.bisect_left(empties, lo)
            offsets = array("Q")
            with open(paths.offsets, "rb") as f:
                offsets.frombytes(f.read())
            with open(paths.members, "rb") as src:
                chunk_start = lo
                while chunk_start < hi:
                    chunk_end = chunk_start + 1  # a chunk of whole samples, about CHUNK_BYTES
                    while chunk_end < hi and offsets[chunk_end + 1] - offsets[chunk_start] <= CHUNK_BYTES:
                        chunk_end += 1
                    src.seek(offsets[chunk_start])
                    buf = bytearray(offsets[chunk_end] - offsets[chunk_start])
                    src.readinto(buf)
                    position = 0
                    for _ in range(chunk_start, chunk_end):
                        position = _patch_keys(buf, position, keys.key(job.shard, index).encode("ascii"))
                        index += 1
                    dst.write(buf)
                    hook("shard_chunk")
                    chunk_start = chunk_end
        size = dst.tell() + 1024
        dst.write(_ZEROS[: 1024 + (-size % TAR_RECORD)])
    stats = {"shard": name, "source": source_name, "count": index + sum(failures.values()), "successes": index,
             "failures": dict(sorted(failures.items())), "empty_captions": empty_captions}
    # Stats first, tar last: the tar's presence is what marks the shard done.
    write_json_atomic(out / stats_name(job.shard), stats)
    os.replace(tmp, out / name)
    hook("shard")
    return True

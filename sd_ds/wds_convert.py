"""LAION parts → webdataset shards in the img2dataset layout: plan, convert, assemble, resume.

Output (OUT = --output_dir)::

    00000.tar 00001.tar ...   samples "{key}.jpg|png|webp" (original bytes), "{key}.txt", "{key}.json"
    00000_stats.json ...      per shard: count, successes, failures by reason, empty captions
    sizes.json                {"00000.tar": samples, ...}
    sources.json              {"sources": [{"name", "weight", "shards", "samples"}]}: one per filelist
    stats.json                totals and per-source totals
    convert_options.json      inputs and options of the run (a resume must match them)

Keys are ``f"{shard:05d}{index:04d}"`` (img2dataset's scheme; the index widens when --samples_per_shard
exceeds 10^4), so a key names its shard and position.

How the work is split, and why. Shard numbers need the sample counts of all earlier parts, and a gzip part
cannot be counted without inflating it: a counting pass would read a 60,000-part input twice. So each part is
read exactly once, by one worker, into a *fragment* (``OUT/_convert/parts/NNNNNN.frag``): the finished tar
members of its good samples, in line order, with a placeholder key of the final width; next to it a small
record of the sample count, byte offsets and failures. When the counts of all parts up to a shard's end are
known, a worker *assembles* the shard: it copies the shard's byte ranges out of one or more fragments, writes
the real keys into the member names and JSON (same width, so sizes and offsets do not move) and renames the
tar into place. Every shard therefore holds exactly --samples_per_shard samples except the last one of each
source (a shard never mixes two filelists), samples keep their input order, and nothing depends on which
worker did what: the output is byte-identical for any --processes. The price is one extra sequential copy of
the output bytes (page-cache warm; with it, one process still converts faster than ``gzip -dc`` inflates, see
BENCHMARKS.md section 1). Parts are handed out in input order with a bounded look-ahead, so few fragments wait for
assembly at any time, and each is deleted once its shards exist. img2dataset's other option, every part
writing its own shard range, would leave one short shard per part (a 7,000-line part → a 7,000-sample shard).

Resume. Fragments, records and shards are written under temporary names and renamed when complete; a record
marks a part done and a shard file marks a shard done. A run killed at any point (SIGKILL included) and
started again with the same arguments skips what exists and redoes the rest, so no sample is lost or
duplicated. Workers die with the main process (PR_SET_PDEATHSIG) and temporary names carry the writer's pid,
so a straggler of a killed run cannot corrupt the next one. Different inputs or options are refused.
Renames protect against killed processes, not against a machine losing power (nothing is fsync'ed).

Bad input is counted, never fatal: see ``FAILURE_REASONS``. A failure is attributed to the shard of the
previous good sample of its source (the first shard when there is none).
"""

from __future__ import annotations

import bisect
import fcntl
import glob
import io
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import time
from array import array
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from sd_ds.image_header import ImageInfo, ImageRejected, probe_image
from sd_ds.laion import (LAYOUTS, Layout, LineRejected, PartStreamError, decode_image_base64, detect_layout,
                         iter_part_lines, read_file_list_list, read_filelist, split_line)

__all__ = ["ConvertOptions", "Source", "KeyFormat", "collect_sources", "convert", "OutputDirError", "available_cores",
           "format_summary", "FAILURE_REASONS", "PIL_MAX_IMAGE_PIXELS"]

PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS, without importing PIL at start-up

FAILURE_REASONS = {
    "too_few_columns": "line has fewer tab-separated columns than the layout needs",
    "undecodable_text": "caption is neither UTF-8 nor GB18030",
    "invalid_caption_json": "laion_aes caption column is not a JSON object with a string caption",
    "invalid_base64": "image column is not valid base64",
    "not_an_image": "decoded bytes are not a JPEG/PNG/WebP (or its header does not parse)",
    "unsupported_format": "GIF/BMP/TIFF/ICO image (shards carry jpg/png/webp only)",
    "truncated_image": "image data ends before the format's end marker",
    "image_too_large": "width x height above --max_pixels (decompression bomb)",
    "too_small": "shorter side below --min_size",
    "decode_error": "pixel decode failed while re-encoding (--max_side/--resize_shorter_to)",
    "truncated_gzip": "gzip stream ends early (lines before it are kept)",
    "gzip_error": "gzip stream corrupt (CRC or format error; lines before it are kept)",
    "unreadable_part": "part file could not be opened",
}

WORK_DIR = "_convert"
OPTIONS_FILE = "convert_options.json"
COMPLETE_FILE = "complete.json"
TAR_RECORD = 10240  # tar pads the archive to 20 blocks, as tarfile and GNU tar do
CHUNK_BYTES = 8 << 20  # assembly copies in chunks of about this size
KEY_SHARD_DIGITS = 5
PROGRESS_INTERVAL_S = 0.25


# --- options and inputs --------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvertOptions:
    """Everything that decides the output bytes (so a resume must match it); not --processes."""

    layout: str = "auto"
    """Line layout: laion400m, laion_aes, or auto (decided per part from its first good line)."""
    samples_per_shard: int = 10000
    min_size: int = 0
    """Skip images whose shorter side is below this (0: keep all)."""
    max_pixels: int = PIL_MAX_IMAGE_PIXELS
    """Skip images with more pixels than this (decompression bombs); 0: no limit."""
    max_side: int = 0
    """Downscale (and re-encode as JPEG) images whose longer side exceeds this; 0: never."""
    resize_shorter_to: int = 0
    """Downscale (and re-encode as JPEG) images whose shorter side exceeds this to exactly this; 0: never."""
    jpeg_quality: int = 95
    limit: Optional[int] = None
    """Convert only the first N good samples (in input order)."""

    def __post_init__(self) -> None:
        if self.layout not in ("auto", *LAYOUTS):
            raise ValueError(f"layout {self.layout!r}: choose auto, {', '.join(LAYOUTS)}")
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        for name in ("min_size", "max_pixels", "max_side", "resize_shorter_to"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in 1..100")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")

    @property
    def reencodes(self) -> bool:
        return bool(self.max_side or self.resize_shorter_to)


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


@dataclass(frozen=True)
class Source:
    """One filelist (or the loose part paths, named 'inputs'): its parts and its mixing weight."""

    name: str
    weight: float
    parts: tuple[str, ...]


class OutputDirError(RuntimeError):
    """OUT cannot be used: written with other inputs/options, not a converter output, or in use."""


def collect_sources(file_lists: Iterable[str] = (), filelists: Iterable[str] = (),
                    inputs: Iterable[str] = ()) -> tuple[list[Source], list[str]]:
    """Sources from ``train.filelist.list`` files, filelists and part paths/globs, in that order; and every
    input path that does not exist (lists, filelists, parts, globs matching nothing), so a run can refuse
    before any work."""
    sources: list[Source] = []
    missing: list[str] = []
    listed: list[tuple[str, float]] = []
    for path in file_lists:
        if os.path.isfile(path):
            listed.extend(read_file_list_list(path))
        else:
            missing.append(path)
    listed.extend((path, 1.0) for path in filelists)
    for path, weight in listed:
        if os.path.isfile(path):
            sources.append(Source(path, weight, tuple(read_filelist(path))))
        else:
            missing.append(path)
    loose: list[str] = []
    for pattern in inputs:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            loose.extend(matches)
            if not matches:
                missing.append(pattern)
        else:
            loose.append(pattern)
    if loose:
        sources.append(Source("inputs", 1.0, tuple(loose)))
    seen = set(missing)
    for source in sources:
        for part in source.parts:
            if part not in seen and not os.path.isfile(part):
                missing.append(part)
                seen.add(part)
    return sources, missing


# --- tar members -----------------------------------------------------------------------------------

def _header_template() -> bytes:
    import tarfile

    info = tarfile.TarInfo("")
    info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime = 0o644, 0, 0, "", "", 0
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


_TEMPLATE = _header_template()
# Checksum of the template with its checksum field counted as spaces (the tar rule) and an empty name.
_TEMPLATE_SUM = sum(_TEMPLATE[:148]) + 8 * 32 + sum(_TEMPLATE[156:]) - sum(_TEMPLATE[124:136])
_ZEROS = bytes(TAR_RECORD)


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
    pos = start
    for member in range(3):
        buf[pos: pos + width] = key
        checksum = int(buf[pos + 148: pos + 154], 8) + delta
        buf[pos + 148: pos + 156] = b"%06o\x00 " % checksum
        size = int(buf[pos + 124: pos + 135], 8)
        if member == 2:
            value = pos + 512 + len(_JSON_KEY_PREFIX)
            buf[value: value + width] = key
        pos += 512 + size + _padding(size)
    return pos


_JSON_KEY_PREFIX = b'{"key": "'


# --- worker side -----------------------------------------------------------------------------------

_progress_queue: Optional[Any] = None
_kill_at: Optional[tuple[str, int]] = None
_kill_counts: Counter = Counter()
_main_pid: Optional[int] = None


def _worker_init(progress_queue: Any, main_pid: int) -> None:
    global _progress_queue, _main_pid
    _progress_queue, _main_pid = progress_queue, main_pid
    if sys.platform.startswith("linux"):
        try:  # die with the main process, so a killed run leaves no writer behind
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != main_pid:  # the main process died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process


def _test_kill_point(point: str) -> None:
    """Test hook: SD_DS_CONVERT_KILL_AT=point:n SIGKILLs the run at the n-th ``point`` of this process."""
    global _kill_at
    if _kill_at is None:
        spec = os.environ.get("SD_DS_CONVERT_KILL_AT", "")
        name, _, n = spec.partition(":")
        _kill_at = (name, int(n or 1)) if name else ("", 0)
    if _kill_at[0] != point:
        return
    _kill_counts[point] += 1
    if _kill_counts[point] == _kill_at[1]:
        if _main_pid and _main_pid != os.getpid():
            os.kill(_main_pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


# Test hook: seconds to sleep per sample written, so a test can SIGKILL a run from outside mid-way.
_TEST_SLOW_S = float(os.environ.get("SD_DS_CONVERT_SLOW_TEST") or 0)


def _report_progress(nbytes: int, samples: int) -> None:
    if _progress_queue is not None and (nbytes or samples):
        _progress_queue.put((nbytes, samples))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: Any, indent: Optional[int] = 1) -> None:
    _write_atomic(path, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))


def _resize(image: bytes, info: ImageInfo, opt: ConvertOptions) -> tuple[bytes, ImageInfo]:
    """Downscale to the size limits and re-encode as JPEG; images already within them keep their bytes."""
    w, h = info.width, info.height
    scale = 1.0
    if opt.resize_shorter_to and min(w, h) > opt.resize_shorter_to:
        scale = opt.resize_shorter_to / min(w, h)
    if opt.max_side and max(w, h) * scale > opt.max_side:
        scale = opt.max_side / max(w, h)
    if scale >= 1.0:
        return image, info
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = opt.max_pixels or None  # already enforced on the header; keep PIL consistent
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.draft("RGB", size)  # JPEG: decode at a reduced DCT scale, much faster for large downscales
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            else:
                im = im.convert("RGB")
            im = im.resize(size, Image.LANCZOS)
            out = io.BytesIO()
            im.save(out, format="JPEG", quality=opt.jpeg_quality)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected("decode_error", str(e)) from None
    return out.getvalue(), ImageInfo("jpeg", *size)


def _part_paths(work: Path, part: int) -> tuple[Path, Path, Path]:
    stem = work / "parts" / f"{part:06d}"
    return stem.with_suffix(".frag"), stem.with_suffix(".idx"), stem.with_suffix(".json")


def _parse_sample(line: bytes, layout: Layout, opt: ConvertOptions) -> tuple[str, bytes, ImageInfo, ImageInfo]:
    """(caption, image bytes, image info, original image info) of a line; raises LineRejected/ImageRejected."""
    caption, image_b64 = split_line(line, layout)
    image = decode_image_base64(image_b64)
    info = original = probe_image(image, opt.max_pixels)
    if opt.min_size and min(info.width, info.height) < opt.min_size:
        raise ImageRejected("too_small", f"{info.width}x{info.height}")
    if opt.reencodes:
        image, info = _resize(image, info, opt)
    return caption, image, info, original


class _FragmentWriter:
    """Tar members of samples, keyed with a placeholder, and the byte offset where each sample starts."""

    def __init__(self, file: io.BufferedWriter, placeholder: str):
        self.file, self.placeholder = file, placeholder
        self.offsets = array("Q", [0])

    def add(self, ext: str, image: bytes, caption: str, meta: dict) -> None:
        meta_bytes = json.dumps({"key": self.placeholder, **meta}, ensure_ascii=False).encode("utf-8")
        pos = self.offsets[-1]
        for member, data in ((ext, image), ("txt", caption.encode("utf-8")), ("json", meta_bytes)):
            self.file.write(tar_header(f"{self.placeholder}.{member}".encode("ascii"), len(data)))
            self.file.write(data)
            pad = _padding(len(data))
            if pad:
                self.file.write(_ZEROS[:pad])
            pos += 512 + len(data) + pad
        self.offsets.append(pos)


def convert_part(job: dict) -> dict:
    """Worker: one part → fragment (tar members of its good samples), offsets and record (the part's sample
    count, failures and empty captions). Returns the record's part, samples and bytes.

    job: part (index), path, work (dir), options (dict), limit (good samples to stop after, or None), reader.
    """
    opt = ConvertOptions(**job["options"])
    path = job["path"]
    frag_path, idx_path, record_path = _part_paths(Path(job["work"]), job["part"])
    frag_tmp, idx_tmp = (p.with_name(f"{p.name}.tmp.{os.getpid()}") for p in (frag_path, idx_path))
    layout = LAYOUTS[opt.layout if opt.layout != "auto" else (detect_layout(path) or "laion400m")]
    limit = job.get("limit")
    failures: list[list] = []  # [line number, reason, good samples before it in this part]
    empty_captions: list[int] = []  # indices of the part's samples that have one
    stream_error: Optional[str] = None
    samples = lines = 0
    position = [0]  # compressed bytes read, for progress
    reported = (0, 0)
    next_report = time.monotonic() + PROGRESS_INTERVAL_S
    with open(frag_tmp, "wb", buffering=1 << 20) as f:
        fragment = _FragmentWriter(f, KeyFormat(opt.samples_per_shard).placeholder)
        try:
            for line in iter_part_lines(path, position, reader=job.get("reader", "buffered")):
                lines += 1
                try:
                    caption, image, info, original = _parse_sample(line, layout, opt)
                except (LineRejected, ImageRejected) as e:
                    failures.append([lines, e.reason, samples])
                    continue
                meta = {"caption": caption, "width": info.width, "height": info.height}
                if info is not original:
                    meta.update(original_width=original.width, original_height=original.height)
                meta.update(source_part=path, line_number=lines, format=layout.name, image_format=info.format)
                fragment.add(info.ext, image, caption, meta)
                if not caption:
                    empty_captions.append(samples)
                samples += 1
                if _TEST_SLOW_S:
                    time.sleep(_TEST_SLOW_S)
                _test_kill_point("sample")
                if lines % 32 == 0 and time.monotonic() >= next_report:
                    _report_progress(position[0] - reported[0], samples - reported[1])
                    reported, next_report = (position[0], samples), time.monotonic() + PROGRESS_INTERVAL_S
                if limit is not None and samples >= limit:
                    break
        except PartStreamError as e:
            failures.append([lines + 1, e.reason, samples])
            stream_error = str(e)
    with open(idx_tmp, "wb") as f:
        fragment.offsets.tofile(f)
    record = {"part": job["part"], "path": path, "layout": layout.name, "lines": lines, "samples": samples,
              "bytes": _file_size(path), "stream_error": stream_error, "failures": failures,
              "empty_captions": empty_captions}
    # Fragment and offsets first, the record last: the record's presence is what marks the part done.
    os.replace(frag_tmp, frag_path)
    os.replace(idx_tmp, idx_path)
    _write_json_atomic(record_path, record, indent=None)
    _test_kill_point("part")
    # the progress not yet reported rides on the result, so the bar ends exact
    return {"part": job["part"], "samples": samples, "bytes": record["bytes"],
            "unreported": (record["bytes"] - reported[0], samples - reported[1])}


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def assemble_shard(job: dict) -> dict:
    """Worker: copy one shard's samples out of fragments, write the real keys, rename into place.

    job: shard, out, work, source (name), lo/hi (sample range in the source), g_lo/g_hi (failure window:
    failures with that many good samples of the source before them belong here), parts: [(part, start,
    count, path)], convert (the convert_part job template, to redo a part whose fragment is gone).
    """
    out, work = Path(job["out"]), Path(job["work"])
    name = shard_name(job["shard"])
    if (out / name).exists():
        return {"shard": job["shard"], "existed": True}
    keys = KeyFormat(ConvertOptions(**job["convert"]["options"]).samples_per_shard)
    failures: Counter = Counter()
    empty = index = 0
    tmp = out / f"{name}.tmp.{os.getpid()}"
    with open(tmp, "wb") as dst:
        for part, start, count, path in job["parts"]:
            frag_path, idx_path, record_path = _part_paths(work, part)
            lo, hi = max(job["lo"], start) - start, min(job["hi"], start + count) - start
            if lo < hi and not (frag_path.exists() and idx_path.exists()):
                convert_part({**job["convert"], "part": part, "path": path})  # deterministic: same bytes
            record = json.loads(record_path.read_text(encoding="utf-8"))
            for _line, reason, good_before in record["failures"]:
                if job["g_lo"] <= start + good_before <= job["g_hi"]:
                    failures[reason] += 1
            if lo >= hi:
                continue
            empties = record["empty_captions"]
            empty += bisect.bisect_left(empties, hi) - bisect.bisect_left(empties, lo)
            offsets = array("Q")
            with open(idx_path, "rb") as f:
                offsets.frombytes(f.read())
            with open(frag_path, "rb") as src:
                i = lo
                while i < hi:
                    j = i + 1  # a chunk of whole samples, about CHUNK_BYTES
                    while j < hi and offsets[j + 1] - offsets[i] <= CHUNK_BYTES:
                        j += 1
                    src.seek(offsets[i])
                    buf = bytearray(offsets[j] - offsets[i])
                    src.readinto(buf)
                    pos = 0
                    for _ in range(i, j):
                        pos = _patch_keys(buf, pos, keys.key(job["shard"], index).encode("ascii"))
                        index += 1
                    dst.write(buf)
                    _test_kill_point("shard_chunk")
                    i = j
        size = dst.tell() + 1024
        dst.write(_ZEROS[: 1024 + (-size % TAR_RECORD)])
    stats = {"shard": name, "source": job["source"], "count": index + sum(failures.values()), "successes": index,
             "failures": dict(sorted(failures.items())), "empty_captions": empty}
    # Stats first, tar last: the tar's presence is what marks the shard done.
    _write_json_atomic(out / stats_name(job["shard"]), stats)
    os.replace(tmp, out / name)
    _test_kill_point("shard")
    return {"shard": job["shard"], "existed": False}


def shard_name(shard: int) -> str:
    return f"{shard:05d}.tar"


def stats_name(shard: int) -> str:
    return f"{shard:05d}_stats.json"


# --- main side: the order of shards ------------------------------------------------------------------

@dataclass
class _SourceResult:
    shards: list[int] = field(default_factory=list)
    samples: int = 0
    excluded: bool = False  # after the --limit cut: nothing from it is used or counted


class _Frontier:
    """Turns sample counts, learnt part by part in input order, into shard jobs.

    Shard k of a source holds its samples [k·S, (k+1)·S). It is ready when the part holding sample (k+1)·S
    is known (so every failure before that sample is known too), or when the source ends.
    """

    def __init__(self, sources: list[Source], samples_per_shard: int, limit: Optional[int]):
        self.spp, self.limit = samples_per_shard, limit
        self.part_paths = [p for s in sources for p in s.parts]
        self.source_end: list[int] = []  # global index after the last part of each source
        n = 0
        for s in sources:
            n += len(s.parts)
            self.source_end.append(n)
        self.results = [_SourceResult() for _ in sources]
        self.next_part = 0  # parts before this are consumed
        self.source = 0
        self.entries: deque = deque()  # (part, start, count) of the current source still needed
        self.known = 0  # good samples of the current source in consumed parts
        self.k = 0  # next shard index within the current source
        self.next_shard = 0  # global id of the next shard
        self.before = 0  # samples included from earlier sources
        self.cut = False
        self._advance()

    @property
    def done(self) -> bool:
        return self.source >= len(self.results)

    def first_needed_part(self) -> int:
        return self.entries[0][0] if self.entries else self.next_part

    def consume(self, count: int) -> list[dict]:
        """The sample count of part ``next_part``; returns the shard jobs that became ready."""
        self.entries.append((self.next_part, self.known, count))
        self.known += count
        self.next_part += 1
        return self._advance()

    def _advance(self) -> list[dict]:
        jobs = []
        while not self.done:
            final = self.next_part >= self.source_end[self.source]
            included = self.known
            if self.limit is not None and self.known >= self.limit - self.before:
                self.cut, final, included = True, True, self.limit - self.before
            while True:
                lo = self.k * self.spp
                if final:
                    if lo >= included:
                        break
                    hi = min(lo + self.spp, included)
                    last = hi >= included
                elif self.known > lo + self.spp:
                    hi, last = lo + self.spp, False
                else:
                    break
                jobs.append(self._job(lo, hi, last, included))
                self.k += 1
            if not final:
                break
            self.results[self.source].samples = included
            self.before += included
            self.source += 1
            self.entries.clear()
            self.known = self.k = 0
            if self.cut:
                if included == 0:
                    self.results[self.source - 1].excluded = True
                for r in self.results[self.source:]:
                    r.excluded = True
                self.source = len(self.results)
        return jobs

    def _job(self, lo: int, hi: int, last: bool, included: int) -> dict:
        g_lo = 0 if lo == 0 else lo + 1
        g_hi = hi if not last else (included - 1 if self.cut else float("inf"))
        while self.entries and self.entries[0][1] + self.entries[0][2] < g_lo:
            self.entries.popleft()  # no later shard needs it: all its samples and failures are behind
        parts = [(p, start, count, self.part_paths[p]) for p, start, count in self.entries
                 if start <= g_hi and start + count >= g_lo]
        shard = self.next_shard
        self.next_shard += 1
        self.results[self.source].shards.append(shard)
        return {"shard": shard, "lo": lo, "hi": hi, "g_lo": g_lo, "g_hi": g_hi if g_hi != float("inf") else 2**62,
                "parts": parts, "source_index": self.source}


# --- main side: the run --------------------------------------------------------------------------------

def _plan_record(sources: list[Source], options: ConvertOptions) -> dict:
    return {"version": 1, "options": asdict(options),
            "sources": [{"name": s.name, "weight": s.weight, "parts": [[p, _file_size(p)] for p in s.parts]}
                        for s in sources]}


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where}: {_short(a)} now, {_short(b)} before"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_output(out: Path, plan: dict):
    """Check that ``out`` is empty or holds a run of this plan, take its lock, record the plan. Returns the
    lock's file handle (held until closed)."""
    options_path = out / OPTIONS_FILE
    if not options_path.is_file() and out.is_dir() and any(out.iterdir()):
        raise OutputDirError(f"{out} is not empty and was not written by this converter; "
                             f"choose an empty or new --output_dir")
    (out / WORK_DIR / "parts").mkdir(parents=True, exist_ok=True)
    lock = open(out / WORK_DIR / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise OutputDirError(f"another conversion is writing to {out}") from None
    if options_path.is_file():
        before = json.loads(options_path.read_text(encoding="utf-8"))
        if before != plan:
            lock.close()
            raise OutputDirError(
                f"{out} holds a conversion with other inputs or options ({_first_difference(plan, before)}). "
                f"Resume with the same arguments, or choose another --output_dir.")
    else:
        _write_json_atomic(options_path, plan)
    return lock


def _remove_stale_temporaries(out: Path) -> None:
    for directory in (out, out / WORK_DIR / "parts"):
        for tmp in directory.glob("*.tmp.*"):
            tmp.unlink(missing_ok=True)


def convert(sources: list[Source], output_dir: str | os.PathLike, options: ConvertOptions, processes: int = 1,
            progress: bool = True, inflate_thread: Optional[bool] = None,
            log: Callable[[str], None] = print) -> dict:
    """Convert ``sources`` into shards in ``output_dir`` (resuming what a previous run left); returns the
    totals written to stats.json. Raises OutputDirError when ``output_dir`` cannot be used.

    ``inflate_thread``: inflate each part in a thread of its own, overlapping the parsing (None: when
    ``processes`` leaves cores idle). The output is the same either way."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan_record(sources, options)
    lock = _open_output(out, plan)
    try:
        complete = out / WORK_DIR / COMPLETE_FILE
        if complete.is_file():
            shutil.rmtree(out / WORK_DIR / "parts", ignore_errors=True)
            stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
            log(f"{out}: already complete")
            return stats
        _remove_stale_temporaries(out)
        t0 = time.monotonic()
        if inflate_thread is None:
            inflate_thread = processes < available_cores()
        total_bytes = sum(size for source in plan["sources"] for _, size in source["parts"])
        frontier = _run(sources, out, options, processes, progress, "threaded" if inflate_thread else "buffered",
                        total_bytes)
        stats = _finalize(sources, out, frontier)
        _write_json_atomic(complete, {"seconds_last_run": round(time.monotonic() - t0, 3)})
        shutil.rmtree(out / WORK_DIR / "parts", ignore_errors=True)
        return stats
    finally:
        lock.close()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run(sources: list[Source], out: Path, options: ConvertOptions, processes: int, progress: bool,
         reader: str, total_bytes: int) -> _Frontier:
    work = out / WORK_DIR
    frontier = _Frontier(sources, options.samples_per_shard, options.limit)
    paths = frontier.part_paths
    n_parts = len(paths)
    counts: dict[int, int] = {}
    done_bytes = 0
    for record_path in (work / "parts").glob("*.json"):
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record["part"] < n_parts and record["path"] == paths[record["part"]]:
            counts[record["part"]] = record["samples"]
            done_bytes += record["bytes"]
    convert_template = {"work": str(work), "options": asdict(options), "limit": options.limit, "reader": reader}

    # Workers even for --processes 1: the main process stays free to show progress mid-part. Spawned, not
    # forked: no fork after threads (tqdm, queue feeders), and workers import little.
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    executor = ProcessPoolExecutor(processes, mp_context=ctx, initializer=_worker_init,
                                   initargs=(progress_queue, os.getpid()))

    from tqdm import tqdm

    bar = tqdm(total=total_bytes, initial=min(done_bytes, total_bytes), unit="B", unit_scale=True,
               desc="convert", dynamic_ncols=True, disable=not progress, smoothing=0.05, mininterval=0.5)
    t_start = time.monotonic()
    samples_this_run = 0

    def show(nbytes: int, samples: int) -> None:
        nonlocal samples_this_run
        samples_this_run += samples
        bar.update(nbytes)
        rate = samples_this_run / max(time.monotonic() - t_start, 1e-9)
        bar.set_postfix_str(f"{samples_this_run:,} samples, {rate:,.0f} samples/s", refresh=False)

    pending: dict[Future, tuple[str, Any]] = {}
    in_flight_parts: set[int] = set()
    shard_first_part: dict[int, int] = {}
    deleted_below = 0
    next_dispatch = 0
    lookahead = 4 * processes + 2  # parts converted ahead of the oldest part not yet consumed

    def submit_shards(jobs: list[dict]) -> None:
        for job in jobs:
            name = shard_name(job["shard"])
            first_sample_part = next((p for p, start, count, _ in job["parts"] if start + count > job["lo"]),
                                     frontier.next_part)
            if (out / name).exists():
                continue
            job.update(out=str(out), work=str(work), source=sources[job.pop("source_index")].name,
                       convert=convert_template)
            shard_first_part[job["shard"]] = first_sample_part
            pending[executor.submit(assemble_shard, job)] = ("shard", job["shard"])

    def consume_ready() -> None:
        while frontier.next_part in counts and not frontier.done:
            submit_shards(frontier.consume(counts[frontier.next_part]))

    def delete_consumed_fragments() -> None:
        nonlocal deleted_below
        low = min([frontier.first_needed_part(), *shard_first_part.values()])
        for part in range(deleted_below, low):
            for path in _part_paths(work, part)[:2]:
                path.unlink(missing_ok=True)
        deleted_below = max(deleted_below, low)

    try:
        consume_ready()
        while True:
            while (not frontier.done and len(in_flight_parts) < max(processes, 1) + 1
                   and next_dispatch < n_parts and next_dispatch < frontier.next_part + lookahead):
                if next_dispatch not in counts and next_dispatch not in in_flight_parts:
                    job = {**convert_template, "part": next_dispatch, "path": paths[next_dispatch]}
                    in_flight_parts.add(next_dispatch)
                    pending[executor.submit(convert_part, job)] = ("part", next_dispatch)
                next_dispatch += 1
            if not pending:
                break
            finished, _ = wait(list(pending), timeout=0.2, return_when=FIRST_COMPLETED)
            try:
                while True:
                    show(*progress_queue.get_nowait())
            except queue.Empty:
                pass
            for future in finished:
                kind, ident = pending.pop(future)
                result = future.result()  # a worker exception is a bug or an I/O error: stop the run
                if kind == "part":
                    in_flight_parts.discard(ident)
                    counts[ident] = result["samples"]
                    show(*result["unreported"])
                    consume_ready()
                else:
                    shard_first_part.pop(ident, None)
                    _test_kill_point("main_shard")
            delete_consumed_fragments()
        if not frontier.done:  # cannot happen: every part was converted and consumed
            raise RuntimeError("conversion ended before all parts were consumed")
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        try:  # reports still on their way from the workers
            while True:
                show(*progress_queue.get(timeout=0.05))
        except queue.Empty:
            pass
        bar.close()
    return frontier


def _finalize(sources: list[Source], out: Path, frontier: _Frontier) -> dict:
    work = out / WORK_DIR
    sizes: dict[str, int] = {}
    totals: Counter = Counter()
    per_source = []
    successes = empty = 0
    for source, result in zip(sources, frontier.results):
        failures: Counter = Counter()
        for shard in result.shards:
            stats = json.loads((out / stats_name(shard)).read_text(encoding="utf-8"))
            sizes[shard_name(shard)] = stats["successes"]
            failures.update(stats["failures"])
            empty += stats["empty_captions"]
        if not result.shards and not result.excluded:
            # No sample to attribute failures to: count them from the part records.
            first = frontier.source_end[len(per_source)] - len(source.parts)
            for part in range(first, first + len(source.parts)):
                record = json.loads(_part_paths(work, part)[2].read_text(encoding="utf-8"))
                failures.update(reason for _, reason, _ in record["failures"])
        totals.update(failures)
        successes += result.samples
        per_source.append({"name": source.name, "weight": source.weight, "parts": len(source.parts),
                           "shards": len(result.shards), "samples": result.samples,
                           "failures": dict(sorted(failures.items())), "excluded_by_limit": result.excluded})
    stats = {"count": successes + sum(totals.values()), "successes": successes,
             "failures": dict(sorted(totals.items())), "empty_captions": empty, "shards": len(sizes),
             "parts": sum(len(s.parts) for s in sources), "sources": per_source}
    sources_json = {"sources": [
        {"name": s.name, "weight": s.weight, "shards": [shard_name(i) for i in r.shards], "samples": r.samples}
        for s, r in zip(sources, frontier.results)]}
    _write_json_atomic(out / "sizes.json", sizes)
    _write_json_atomic(out / "sources.json", sources_json)
    _write_json_atomic(out / "stats.json", stats)
    return stats


def format_summary(stats: dict) -> str:
    """The end-of-run table: converted samples and each failure reason, with shares of all lines."""
    total = max(stats["count"], 1)
    rows = [("converted", stats["successes"])] + [(f"skipped: {r}", n) for r, n in stats["failures"].items()]
    rows.append(("(kept, empty caption)", stats["empty_captions"]))
    width = max(len(r) for r, _ in rows) + 2
    lines = [f"{'outcome':<{width}}{'samples':>14}{'share':>9}"]
    lines += [f"{r:<{width}}{n:>14,}{100 * n / total:>8.2f}%" for r, n in rows]
    lines.append(f"{stats['shards']:,} shards from {stats['parts']:,} parts in {len(stats['sources'])} source(s)")
    return "\n".join(lines)

"""Work planning: what a conversion will do, before and while it runs.

- ``ConvertOptions``: everything that decides the output bytes;
- ``PartSource`` and ``collect_sources``: the sources (one per filelist) and their parts, from the command line,
  with missing and repeated parts set aside;
- the plan record (``convert_options.json``) a resumed run must match, and ``open_output``, which checks the
  output folder against it and takes the folder's lock;
- ``Frontier``: turns part sample counts, learnt in input order, into shard jobs.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Optional

from sd_ds.convert.image_header import PIL_MAX_IMAGE_PIXELS
from sd_ds.convert.parts import LAYOUTS, _url_sizes, part_size, read_file_list_list, read_filelist, url_sizes
from sd_ds.convert.tar_writing import PartSpan, ShardJob
from sd_ds.convert.storage import LocalStore, Store
from sd_ds.fileio import glob_urls, is_url
from sd_ds.redaction import redact_url

__all__ = ["ConvertOptions", "PartSource", "CollectedInputs", "collect_sources", "OutputDirError", "plan_record",
           "open_output", "Frontier", "SourceResult", "WORK_DIR"]

WORK_DIR = "_convert"  # OUT/_convert: the run's bookkeeping (lock, fragments, part records)
OPTIONS_FILE = "convert_options.json"
_FILTERS_ADDED_LATER = ("max_aspect_ratio", "min_aesthetic", "max_punsafe", "max_pwatermark")
_OPEN_END = 2 ** 62  # "no upper bound" in a failure window


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
    max_aspect_ratio: float = 0.0
    """Skip images whose longer side / shorter side exceeds this (0: keep all)."""
    min_aesthetic: Optional[float] = None
    """laion_aes: skip lines whose metadata's aesthetic score is below this (lines without one are kept)."""
    max_punsafe: Optional[float] = None
    """laion_aes: skip lines whose metadata's punsafe (NSFW probability) is above this."""
    max_pwatermark: Optional[float] = None
    """laion_aes: skip lines whose metadata's pwatermark (watermark probability) is above this."""

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
        if self.max_aspect_ratio and self.max_aspect_ratio < 1:
            raise ValueError("max_aspect_ratio must be >= 1 (or 0: off)")

    @property
    def metadata_filters(self) -> dict[str, tuple[float, int, str]]:
        """laion_aes metadata filters that are on: column name → (threshold, sign, reason); a line is skipped
        when ``sign * value < sign * threshold`` (sign 1: a minimum, -1: a maximum)."""
        filters = {"aesthetic": (self.min_aesthetic, 1, "aesthetic_too_low"),
                   "punsafe": (self.max_punsafe, -1, "punsafe_too_high"),
                   "pwatermark": (self.max_pwatermark, -1, "pwatermark_too_high")}
        return {name: spec for name, spec in filters.items() if spec[0] is not None}

    @property
    def reencodes(self) -> bool:
        return bool(self.max_side or self.resize_shorter_to)


# --- sources -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PartSource:
    """One filelist (or the loose part paths, named 'inputs'): the parts to convert and its mixing weight."""

    name: str
    weight: float
    parts: tuple[str, ...]
    missing_parts: tuple[str, ...] = ()
    """Listed parts that do not exist: skipped, and counted in stats.json (``--strict`` refuses them)."""
    duplicate_parts: tuple[str, ...] = ()
    """Parts listed before, here or in an earlier source: converted once, where they are first listed."""


@dataclass
class CollectedInputs:
    """The sources of a run, and what is wrong with the inputs that named them."""

    sources: list[PartSource]
    missing_inputs: list[str]
    """Lists, filelists, part paths given on the command line and globs matching nothing that do not exist:
    a run refuses them, before any work."""

    @property
    def directory_inputs(self) -> list[str]:
        """Of ``missing_inputs``: local directories, named where a part, filelist or list file belongs."""
        return [path for path in self.missing_inputs if not is_url(path) and os.path.isdir(path)]

    @property
    def missing_parts(self) -> list[str]:
        return [part for source in self.sources for part in source.missing_parts]

    @property
    def duplicate_parts(self) -> list[str]:
        return [part for source in self.sources for part in source.duplicate_parts]


def collect_sources(file_lists: Iterable[str] = (), filelists: Iterable[str] = (),
                    inputs: Iterable[str] = ()) -> CollectedInputs:
    """Sources from ``train.filelist.list`` files, filelists and part paths/globs, in that order.

    A part listed in a filelist that does not exist goes to the source's ``missing_parts`` (a 60,000-name
    filelist need not have every part on disk); a part listed again (the same file, however its path is
    written) to ``duplicate_parts``. Everything named on the command line that does not exist goes to
    ``missing_inputs``."""
    missing_inputs: list[str] = []
    listed: list[tuple[str, float]] = []
    for path in file_lists:
        if _is_file(path):
            listed.extend(read_file_list_list(path))
        else:
            missing_inputs.append(path)
    listed.extend((path, 1.0) for path in filelists)
    named: list[tuple[str, float, list[str]]] = []  # (source name, weight, parts as listed)
    for path, weight in listed:
        if _is_file(path):
            named.append((path, weight, read_filelist(path)))
        else:
            missing_inputs.append(path)
    loose: list[str] = []
    for pattern in inputs:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern)) if not is_url(pattern) else glob_urls(pattern)
            loose.extend(matches)
            if not matches:
                missing_inputs.append(pattern)
        else:
            loose.append(pattern)
            if not _is_file(pattern):
                missing_inputs.append(pattern)
    if loose:
        named.append(("inputs", 1.0, [part for part in loose if _is_file(part)]))
    # every listed part at a URL, sized in one go (a listing per folder): 60,000 parts, not 60,000 requests
    url_sizes([part for _, _, parts in named for part in parts if is_url(part) and part not in _url_sizes])
    sources = []
    seen: set[str] = set()  # real paths of the parts listed so far
    for name, weight, listed_parts in named:
        parts, missing, duplicates = [], [], []
        for part in listed_parts:
            identity = part if is_url(part) else os.path.realpath(part)
            if identity in seen:
                duplicates.append(part)
                continue
            seen.add(identity)
            (parts if _is_file(part) else missing).append(part)
        sources.append(PartSource(name, weight, tuple(parts), tuple(missing), tuple(duplicates)))
    return CollectedInputs(sources, missing_inputs)


def _is_file(path: str) -> bool:
    """A local file, or a URL that exists (its size is known from ``url_sizes``)."""
    if not is_url(path):
        return os.path.isfile(path)
    if path not in _url_sizes:
        url_sizes([path])
    return _url_sizes[path] is not None


# --- the plan record and the output folder ------------------------------------------------------------

class OutputDirError(RuntimeError):
    """OUT cannot be used: written with other inputs/options, not a converter output, or in use."""


def plan_record(sources: list[PartSource], options: ConvertOptions) -> dict:
    """What ``convert_options.json`` holds: the options and every part with its size (names and parts less any
    credential in their URLs: a resume with a fresh presigned URL of the same part matches)."""
    recorded = asdict(options)
    for name in _FILTERS_ADDED_LATER:  # off: left out, so outputs of runs before these filters still resume
        if recorded[name] == ConvertOptions.__dataclass_fields__[name].default:
            del recorded[name]
    return {"version": 1, "options": recorded,
            "sources": [{"name": redact_url(source.name), "weight": source.weight,
                         "parts": [[redact_url(part), part_size(part)] for part in source.parts]}
                        for source in sources]}


def first_difference(now: Any, before: Any, where: str = "") -> str:
    """Where two JSON-like records (a saved plan and this run's) first differ, as one short line."""
    if isinstance(now, dict) and isinstance(before, dict):
        for key in sorted(set(now) | set(before)):
            if now.get(key) != before.get(key):
                return first_difference(now.get(key), before.get(key), f"{where}.{key}" if where else key)
    if isinstance(now, list) and isinstance(before, list) and len(now) == len(before):
        for index, (item_now, item_before) in enumerate(zip(now, before)):
            if item_now != item_before:
                return first_difference(item_now, item_before, f"{where}[{index}]")
    return f"{where}: {_short(now)} now, {_short(before)} before"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_output(store: Store, plan: dict) -> Optional[IO[str]]:
    """Create OUT if needed, check that it is empty or holds a run of this plan, take its lock (a local OUT),
    record the plan. Returns the lock's file handle (held until closed; None for a store, which has no lock).
    Raises OutputDirError, with a one-line reason, for any OUT that cannot be used, including one the file
    system or store refuses (a file, no permission, no such bucket)."""
    if isinstance(store, LocalStore):
        out = store.path
        if out.exists() and not out.is_dir():
            raise OutputDirError(f"--output_dir {out} is a file, not a folder")
    try:
        if isinstance(store, LocalStore):
            store.path.mkdir(parents=True, exist_ok=True)
        return _lock_and_record(store, plan)
    except OSError as e:
        reason = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else str(e).splitlines()[0] if str(e) \
            else type(e).__name__
        raise OutputDirError(f"cannot create or write to --output_dir {store} ({reason})") from None


def _lock_and_record(store: Store, plan: dict) -> Optional[IO[str]]:
    has_plan = store.exists(OPTIONS_FILE)
    # local: any entry, folders too; a store has files only (its "folders" are name prefixes)
    entries = any(store.path.iterdir()) if isinstance(store, LocalStore) else bool(store.list())
    if not has_plan and entries:
        raise OutputDirError(f"{store} is not empty and was not written by this converter; "
                             f"choose an empty or new --output_dir")
    lock = None
    if isinstance(store, LocalStore):
        (store.path / WORK_DIR / "parts").mkdir(parents=True, exist_ok=True)
        lock = open(store.path / WORK_DIR / "lock", "w")
    try:
        if lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise OutputDirError(f"another conversion is writing to {store}") from None
        if has_plan:
            before = store.read_json(OPTIONS_FILE)
            if before != plan:
                raise OutputDirError(
                    f"{store} holds a conversion with other inputs or options ({first_difference(plan, before)}). "
                    f"Resume with the same arguments, or choose another --output_dir.")
        else:
            store.write_json(OPTIONS_FILE, plan)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock


# --- the order of shards -------------------------------------------------------------------------------

@dataclass
class SourceResult:
    """What a source ends up with: its shards (global numbers) and samples."""

    shards: list[int] = field(default_factory=list)
    samples: int = 0
    excluded: bool = False  # after the --limit cut: nothing from it is used or counted


class Frontier:
    """Turns sample counts, learnt part by part in input order, into shard jobs.

    Shard k of a source holds its samples [k·S, (k+1)·S). It is ready when the part holding sample (k+1)·S
    is known (so every failure before that sample is known too), or when the source ends.
    """

    def __init__(self, sources: list[PartSource], samples_per_shard: int, limit: Optional[int]):
        self.samples_per_shard, self.limit = samples_per_shard, limit
        self.part_paths = [part for source in sources for part in source.parts]
        self.source_end: list[int] = []  # global index after the last part of each source
        parts_so_far = 0
        for source in sources:
            parts_so_far += len(source.parts)
            self.source_end.append(parts_so_far)
        self.results = [SourceResult() for _ in sources]
        self.next_part = 0  # parts before this are consumed
        self.source = 0  # the source being cut into shards
        self.entries: deque[tuple[int, int, int]] = deque()  # (part, first sample, samples) still needed
        self.known = 0  # good samples of the current source in consumed parts
        self.shard_in_source = 0  # next shard index within the current source
        self.next_shard = 0  # global number of the next shard
        self.before = 0  # samples included from earlier sources
        self.cut = False  # the --limit is reached
        self._advance()

    @property
    def done(self) -> bool:
        return self.source >= len(self.results)

    def first_needed_part(self) -> int:
        return self.entries[0][0] if self.entries else self.next_part

    def consume(self, samples: int) -> list[ShardJob]:
        """The sample count of part ``next_part``; returns the shard jobs that became ready."""
        self.entries.append((self.next_part, self.known, samples))
        self.known += samples
        self.next_part += 1
        return self._advance()

    def _advance(self) -> list[ShardJob]:
        jobs = []
        per_shard = self.samples_per_shard
        while not self.done:
            final = self.next_part >= self.source_end[self.source]
            included = self.known
            if self.limit is not None and self.known >= self.limit - self.before:
                self.cut, final, included = True, True, self.limit - self.before
            while True:
                lo = self.shard_in_source * per_shard
                if final:
                    if lo >= included:
                        break
                    hi = min(lo + per_shard, included)
                    last = hi >= included
                elif self.known > lo + per_shard:
                    hi, last = lo + per_shard, False
                else:
                    break
                jobs.append(self._job(lo, hi, last, included))
                self.shard_in_source += 1
            if not final:
                break
            self.results[self.source].samples = included
            self.before += included
            self.source += 1
            self.entries.clear()
            self.known = self.shard_in_source = 0
            if self.cut:
                if included == 0:
                    self.results[self.source - 1].excluded = True
                for result in self.results[self.source:]:
                    result.excluded = True
                self.source = len(self.results)
        return jobs

    def _job(self, lo: int, hi: int, last: bool, included: int) -> ShardJob:
        # A failure belongs to the shard of the good sample before it (the first shard when there is none).
        failures_from = 0 if lo == 0 else lo + 1
        failures_to = hi if not last else (included - 1 if self.cut else _OPEN_END)
        while self.entries and self.entries[0][1] + self.entries[0][2] < failures_from:
            self.entries.popleft()  # no later shard needs it: all its samples and failures are behind
        parts = tuple(PartSpan(part, first, samples, self.part_paths[part]) for part, first, samples in self.entries
                      if first <= failures_to and first + samples >= failures_from)
        shard = self.next_shard
        self.next_shard += 1
        self.results[self.source].shards.append(shard)
        return ShardJob(shard=shard, source_index=self.source, first_sample=lo, end_sample=hi,
                        failures_from=failures_from, failures_to=failures_to, parts=parts)

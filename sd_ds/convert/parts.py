"""Part reading: LAION part files, their line layouts, filelists, and writing parts for tests and demos.

A part is a text file (usually gzip-compressed), one sample per line, tab-separated. Two layouts occur:

- ``laion400m``: ``caption \\t _ \\t base64 image`` (columns past the third are ignored);
- ``laion_aes``: column 3 (index 2) holds a JSON object whose ``caption_en`` (else ``blip_caption_en``) is
  the caption, column 6 (index 5) the base64 image.

Captions decode as UTF-8, falling back to GB18030 (parts from Chinese pipelines mix the two). A part is listed
in a *filelist* (one part path per line), and filelists in a ``train.filelist.list`` (``path [weight]`` per
line): the layout of ppdiffusers, sd-ds's predecessor. A relative path in a list is taken as written (relative
to the working directory, as ppdiffusers did) when it exists there, else relative to the listing file's folder.
"""

from __future__ import annotations

import base64
import binascii
import gzip as _gzip_std
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional, Union

from sd_ds.convert.image_header import ImageRejected, probe_image
from sd_ds.convert.reasons import Rejected
from sd_ds.fileio import is_url, url_fs

__all__ = [
    "LAYOUTS", "Layout", "LineRejected", "split_line", "decode_text", "decode_image_base64",
    "read_filelist", "read_file_list_list", "resolve_listed_path", "iter_part_lines", "part_size",
    "PartStreamError", "detect_layout", "write_part", "format_line", "line_metadata", "METADATA_KEYS", "url_sizes",
]

try:  # ISA-L inflate is ~3x zlib's; the threaded reader also overlaps it with the caller's work
    from isal import igzip as _igzip
    from isal import igzip_threaded as _igzip_threaded
except ImportError:  # pragma: no cover - exercised only where isal is not installed
    import gzip as _igzip

    _igzip_threaded = None

try:  # SIMD base64: the decode is a large share of the per-sample cost
    import pybase64 as _fast_base64
except ImportError:  # pragma: no cover
    _fast_base64 = base64

GZIP_MAGIC = b"\x1f\x8b"


class LineRejected(Rejected):
    """A line the converter skips."""


@dataclass(frozen=True)
class Layout:
    """Where a layout keeps the caption and the base64 image (0-based tab-separated columns)."""

    name: str
    caption_column: int
    image_column: int
    caption_is_json: bool


LAYOUTS = {
    "laion400m": Layout("laion400m", caption_column=0, image_column=2, caption_is_json=False),
    "laion_aes": Layout("laion_aes", caption_column=2, image_column=5, caption_is_json=True),
}


def decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("gb18030")
    except UnicodeDecodeError:
        raise LineRejected("undecodable_text", "neither UTF-8 nor GB18030") from None


def _caption_from_json(text: str) -> str:
    try:
        obj = json.loads(text)
    except ValueError:
        raise LineRejected("invalid_caption_json") from None
    if not isinstance(obj, dict):
        raise LineRejected("invalid_caption_json", "not an object")
    caption = obj.get("caption_en") or obj.get("blip_caption_en") or ""
    if not isinstance(caption, str):
        raise LineRejected("invalid_caption_json", "caption is not a string")
    return caption


def split_line(line: bytes, layout: Layout) -> tuple[str, memoryview]:
    """(caption, base64 image) of one line (trailing newline allowed). Raises LineRejected.

    The caption is stripped of surrounding whitespace and may be empty: the caller keeps such samples. The
    image column comes back as a view into ``line``: ``bytes.split`` would scan and copy the ~50 KB column
    (8x the cost of decoding it).
    """
    starts = [0]
    pos = -1
    for _ in range(layout.image_column):
        pos = line.find(b"\t", pos + 1)
        if pos < 0:
            raise LineRejected("too_few_columns", f"{len(starts)} < {layout.image_column + 1}")
        starts.append(pos + 1)
    image_start = starts[-1]
    image_end = line.find(b"\t", image_start)
    if image_end < 0:  # the image is the last column: drop the line ending
        image_end = len(line)
        while image_end > image_start and line[image_end - 1] in (10, 13):
            image_end -= 1
    caption_start = starts[layout.caption_column]
    caption = decode_text(line[caption_start: starts[layout.caption_column + 1] - 1])
    if layout.caption_is_json:
        caption = _caption_from_json(caption)
    return caption.strip(), memoryview(line)[image_start:image_end]


# Where laion_aes metadata keeps each filter's value: keys of the JSON column, first present wins.
METADATA_KEYS = {"aesthetic": ("aesthetic", "aesthetic_score", "AESTHETIC_SCORE"), "punsafe": ("punsafe",),
                 "pwatermark": ("pwatermark",)}


def line_metadata(line: bytes, layout: Layout) -> dict[str, float]:
    """The filterable numbers (``METADATA_KEYS``) a line's metadata holds; {} for a layout without metadata.
    Call after ``split_line`` accepted the line (the JSON column is known to parse then)."""
    if not layout.caption_is_json:
        return {}
    column = line.split(b"\t", layout.caption_column + 1)[layout.caption_column]
    obj = json.loads(decode_text(column))
    values = {}
    for name, keys in METADATA_KEYS.items():
        value = next((obj[key] for key in keys if key in obj), None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = float(value)
    return values


def decode_image_base64(data: Union[bytes, memoryview]) -> bytes:
    try:
        return _fast_base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise LineRejected("invalid_base64") from None


# --- filelists -----------------------------------------------------------------------------------

def resolve_listed_path(entry: str, listing_file: Union[str, Path]) -> str:
    """A path read from a list file: as written if it exists (as ppdiffusers did), else next to the list. A
    URL is taken as written; a relative entry in a list at a URL is taken next to the list."""
    if is_url(entry) or os.path.isabs(entry):
        return entry
    if is_url(listing_file):
        return f"{str(listing_file).rsplit('/', 1)[0]}/{entry}"
    if os.path.exists(entry):
        return entry
    beside = os.path.join(os.path.dirname(os.fspath(listing_file)), entry)
    return beside if os.path.exists(beside) else entry


def _list_lines(path: Union[str, Path]) -> Iterator[str]:
    with (open(path, encoding="utf-8") if not is_url(path) else _open_url(str(path), text=True)) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def read_filelist(path: Union[str, Path]) -> list[str]:
    """Part paths listed in a filelist (blank lines and ``#`` comments skipped), resolved as above."""
    return [resolve_listed_path(entry, path) for entry in _list_lines(path)]


def read_file_list_list(path: Union[str, Path]) -> list[tuple[str, float]]:
    """(filelist path, weight) per line of a ``train.filelist.list``; weight 1.0 when the line has none."""
    entries = []
    for line in _list_lines(path):
        entry, weight = line, 1.0
        tokens = line.rsplit(None, 1)
        if len(tokens) == 2:
            try:
                entry, weight = tokens[0], float(tokens[1])
            except ValueError:
                pass  # a path with a space in it and no weight
        if not weight >= 0:
            raise ValueError(f"{path}: negative or NaN weight in line {line!r}")
        entries.append((resolve_listed_path(entry, path), weight))
    return entries


# --- reading parts -------------------------------------------------------------------------------

class PartStreamError(Exception):
    """The compressed stream of a part ended early or is corrupt after ``lines`` good lines."""

    def __init__(self, reason: str, lines: int, detail: str):
        super().__init__(f"{reason} after {lines} lines: {detail}")
        self.reason = reason
        self.lines = lines


def _open_reader(raw: io.BufferedReader, mode: str) -> BinaryIO:
    """A binary line reader over ``raw``, inflating when it starts with the gzip magic (compressed and plain
    parts are told apart by content, not name). Modes, for gzip: "threaded" (ISA-L inflate in a thread, ahead
    of the caller), "buffered" (ISA-L inflate in 1 MB calls; igzip's own reader refills 8 KB at a time, 25%
    slower on 50 KB lines) and "exact" (the stdlib's zlib reader: slower, but it gives every line that can
    be inflated before a stream error, where ISA-L holds back the last few kilobytes)."""
    if raw.peek(2)[:2] != GZIP_MAGIC:
        return raw
    if mode == "threaded" and _igzip_threaded is not None:
        return _igzip_threaded.open(raw, "rb", threads=1)
    if mode == "exact":
        return _gzip_std.open(raw, "rb")
    return io.BufferedReader(_igzip.open(raw, "rb"), 1 << 20)


def iter_part_lines(path: Union[str, Path], raw_position: list[int] | None = None,
                    reader: str = "threaded") -> Iterator[bytes]:
    """Lines (with their line endings) of a part; raises PartStreamError where the gzip stream breaks.

    The fast readers inflate ahead in 1 MB blocks and, on an error, drop the lines of the last block that
    inflated fine. So after an error the part is read again with the exact reader, past the lines already
    given: what comes out is every complete line before the break, at full speed for good parts.
    ``raw_position``, if given, gets the compressed bytes consumed so far in its first item (for progress).
    ``reader``: "threaded", "buffered" or "exact", see ``_open_reader``.
    """
    done = 0  # lines given so far (a retry with the exact reader skips them)
    error: Optional[PartStreamError] = None
    for mode in dict.fromkeys((reader, "exact")):
        try:
            raw = open(path, "rb", buffering=1 << 20) if not is_url(path) else _open_url(str(path))
        except OSError as e:
            raise PartStreamError("unreadable_part", done, f"{type(e).__name__}: {e}") from None
        with raw:
            compressed = raw.peek(2)[:2] == GZIP_MAGIC
            try:
                with _open_reader(raw, mode) as stream:
                    for line_index, line in enumerate(stream):
                        if line_index < done:
                            continue
                        done += 1
                        if raw_position is not None:
                            raw_position[0] = raw.tell()
                        yield line
                return
            except EOFError as e:
                error = PartStreamError("truncated_gzip", done, str(e))
            except (OSError, ValueError) as e:  # BadGzipFile (CRC, header), isal/zlib errors, read errors
                reason = "gzip_error" if compressed else "unreadable_part"
                error = PartStreamError(reason, done, f"{type(e).__name__}: {e}")
        if not compressed:
            break
    raise error


def part_size(path: Union[str, Path]) -> int:
    """Bytes of a part on disk or in its store (its share of the progress bar); 0 when it cannot be read."""
    if is_url(path):
        if str(path) not in _url_sizes:
            _url_sizes.update(url_sizes([str(path)]))
        return _url_sizes[str(path)] or 0
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# --- parts and lists at URLs (s3://, gs://, http(s)://: anything fsspec reaches) ----------------------------

_url_sizes: dict[str, Optional[int]] = {}  # what url_sizes learnt in this process: the plan needs every size


def _open_url(url: str, text: bool = False) -> BinaryIO:
    """A URL opened for sequential reading: fsspec's file in large blocks, behind a buffer with ``peek``.
    Missing or unreachable: OSError (FileNotFoundError for a missing object)."""
    try:
        fs, path = url_fs(url)
        raw = fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - every store's client raises its own kinds
        raise OSError(f"{url}: {type(e).__name__}: {e}") from None
    reader = io.BufferedReader(raw, 1 << 20)
    return io.TextIOWrapper(reader, encoding="utf-8") if text else reader


def url_sizes(urls: Iterable[str]) -> dict[str, Optional[int]]:
    """Size of each URL (None when it does not exist), with one listing per folder on stores that list
    (s3, gs, ...: 60,000 parts in a few dozen requests) and one HEAD per URL on HTTP. Remembered for
    ``part_size``."""
    from concurrent.futures import ThreadPoolExecutor

    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(url.rsplit("/", 1)[0], []).append(url)
    sizes: dict[str, Optional[int]] = {}

    def one(url: str) -> Optional[int]:
        fs, path = url_fs(url)
        try:
            info = fs.info(path)
        except (FileNotFoundError, OSError):
            return None
        return int(info["size"]) if info.get("type", "file") == "file" and info.get("size") is not None else None

    for folder, members in by_folder.items():
        fs, folder_path = url_fs(folder)
        if not str(folder).startswith(("http://", "https://")):
            try:
                listed = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in
                          fs.ls(folder_path, detail=True)}
            except (FileNotFoundError, OSError):
                listed = {}
            for url in members:
                entry = listed.get(url.rsplit("/", 1)[-1])
                sizes[url] = int(entry["size"]) if entry and entry.get("type") == "file" else None
        else:
            with ThreadPoolExecutor(16) as pool:
                sizes.update(zip(members, pool.map(one, members)))
    _url_sizes.update(sizes)
    return sizes


def detect_layout(path: Union[str, Path], max_lines: int = 10000) -> Optional[str]:
    """The layout of a part's first good line (its image column decodes to a JPEG/PNG/WebP header), or None
    when none of its first ``max_lines`` lines is good in any layout."""
    try:
        # the exact reader: the fast ones would inflate 1 MB ahead (and start a thread) for a line or two
        for line_index, line in enumerate(iter_part_lines(path, reader="exact")):
            if line_index >= max_lines:
                break
            for layout in LAYOUTS.values():
                try:
                    _, image_base64 = split_line(line, layout)
                    probe_image(decode_image_base64(image_base64))
                    return layout.name
                except (LineRejected, ImageRejected):
                    continue
    except PartStreamError:
        pass
    return None


# --- writing parts (tests, demos, benchmarks) --------------------------------------------------------

Row = Union[tuple[Union[str, dict], bytes], bytes]


def format_line(caption: Union[str, dict], image: bytes, layout: str = "laion400m") -> bytes:
    """One part line for ``caption`` and encoded ``image`` (a dict caption is the laion_aes JSON as is)."""
    image_base64 = base64.b64encode(image)
    if layout == "laion400m":
        return caption.encode("utf-8") + b"\t_\t" + image_base64 + b"\n"
    if layout == "laion_aes":
        meta = caption if isinstance(caption, dict) else {"caption_en": caption}
        text = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        return b"\t".join([b"_", b"_", text, b"_", b"_", image_base64]) + b"\n"
    raise ValueError(f"unknown layout {layout!r}; choose from {sorted(LAYOUTS)}")


def write_part(path: Union[str, Path], rows: Iterable[Row], fmt: str = "laion400m", gzip: bool = True,
               compresslevel: int = 6) -> int:
    """Write a LAION part: each row a ``(caption, image bytes)`` pair or a raw ``bytes`` line (written as is,
    newline added if missing, for malformed-input tests). Returns the number of lines."""
    lines = 0
    # stdlib gzip (zlib) writes what LAION's tools wrote; isal's writer only knows levels 0-3
    with (_gzip_std.open(path, "wb", compresslevel=compresslevel) if gzip else open(path, "wb")) as f:
        for row in rows:
            if isinstance(row, (bytes, bytearray)):
                line = bytes(row) if row.endswith(b"\n") else bytes(row) + b"\n"
            else:
                line = format_line(row[0], row[1], fmt)
            f.write(line)
            lines += 1
    return lines

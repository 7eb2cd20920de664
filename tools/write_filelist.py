#!/usr/bin/env python
"""Write a filelist: N part paths from a pattern, one per line (ppdiffusers' LAION layout by default).

    python tools/write_filelist.py data/filelist/laion400m_en.filelist           # ppdiffusers' 60,000 paths
    python tools/write_filelist.py my.filelist --pattern '/data/aes/part-{:05}.gz' --count 100 --check_exists
    python tools/write_filelist.py s3://bucket/laion.filelist --pattern 's3://bucket/laion/part-{:05}.gz' --check_exists

The pattern is a Python format string given the part number (``--start`` .. ``--start + --count - 1``).
With --check_exists, parts that do not exist are reported (count and the first few) and the exit status is 1;
the filelist is written either way, so it can be fixed by re-running once the data is in place. Pair it with
a ``train.filelist.list`` line ``PATH [weight]`` for tools/convert_laion_to_wds.py --file_list, which skips
(and counts) listed parts that do not exist, or refuses them with --strict. Parts and the filelist may be
URLs (s3://, gs://, http(s)://, any fsspec URL): --check_exists then lists each folder once (HEADs for http).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sd_ds.fileio import is_url, write_atomic, write_atomic_url  # noqa: E402

# ppdiffusers' filelist: 60,000 LAION-400M parts under /data/laion400m
PPDIFFUSERS_PATTERN = "/data/laion400m/part-{:05}.gz"
PPDIFFUSERS_COUNT = 60000


def part_paths(pattern: str, count: int, start: int = 0) -> list[str]:
    return [pattern.format(number) for number in range(start, start + count)]


def write_filelist(path: str | os.PathLike, parts: list[str]) -> None:
    if is_url(path):
        write_atomic_url(str(path), "".join(f"{part}\n" for part in parts))
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(f"{part}\n" for part in parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="filelist to write (parent folders are created)")
    parser.add_argument("--pattern", default=PPDIFFUSERS_PATTERN, help="part path format string (default %(default)s)")
    parser.add_argument("--count", type=int, default=PPDIFFUSERS_COUNT, help="number of parts (default %(default)s)")
    parser.add_argument("--start", type=int, default=0, help="first part number (default 0)")
    parser.add_argument("--check_exists", action="store_true",
                        help="report parts that do not exist (exit status 1)")
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error("--count must be >= 0")
    try:
        parts = part_paths(args.pattern, args.count, args.start)
    except (IndexError, KeyError, ValueError) as e:
        parser.error(f"--pattern {args.pattern!r} does not format a part number: {e}")
    write_filelist(args.output, parts)
    print(f"wrote {len(parts):,} part paths to {args.output}")
    if args.check_exists:
        from sd_ds.convert.parts import url_sizes

        sizes = url_sizes([part for part in parts if is_url(part)])
        missing = [part for part in parts if (sizes[part] is None if is_url(part) else not os.path.isfile(part))]
        if missing:
            print(f"{len(missing):,} of {len(parts):,} parts do not exist, e.g.:", file=sys.stderr)
            for part in missing[:10]:
                print(f"  {part}", file=sys.stderr)
            return 1
        print(f"all {len(parts):,} parts exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())

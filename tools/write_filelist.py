#!/usr/bin/env python
"""Write a filelist: N part paths from a pattern, one per line (the seed's LAION layout by default).

    python tools/write_filelist.py data/filelist/laion400m_en.filelist           # 60,000 seed paths
    python tools/write_filelist.py my.filelist --pattern '/data/aes/part-{:05}.gz' --count 100 --check_exists

The pattern is a Python format string given the part number (``--start`` .. ``--start + --count - 1``).
With --check_exists, parts that do not exist are reported (count and the first few) and the exit status is 1;
the filelist is written either way, so it can be fixed by re-running once the data is in place. Pair it with
a ``train.filelist.list`` line ``PATH [weight]`` for tools/convert_laion_to_wds.py --file_list.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SEED_PATTERN = "/data/laion400m/part-{:05}.gz"
SEED_COUNT = 60000


def part_paths(pattern: str, count: int, start: int = 0) -> list[str]:
    return [pattern.format(i) for i in range(start, start + count)]


def write_filelist(path: str | os.PathLike, parts: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{p}\n" for p in parts), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="filelist to write (parent folders are created)")
    p.add_argument("--pattern", default=SEED_PATTERN, help="part path format string (default %(default)s)")
    p.add_argument("--count", type=int, default=SEED_COUNT, help="number of parts (default %(default)s)")
    p.add_argument("--start", type=int, default=0, help="first part number (default 0)")
    p.add_argument("--check_exists", action="store_true", help="report parts that do not exist (exit status 1)")
    args = p.parse_args(argv)
    if args.count < 0:
        p.error("--count must be >= 0")
    try:
        parts = part_paths(args.pattern, args.count, args.start)
    except (IndexError, KeyError, ValueError) as e:
        p.error(f"--pattern {args.pattern!r} does not format a part number: {e}")
    write_filelist(args.output, parts)
    print(f"wrote {len(parts):,} part paths to {args.output}")
    if args.check_exists:
        missing = [q for q in parts if not os.path.isfile(q)]
        if missing:
            print(f"{len(missing):,} of {len(parts):,} parts do not exist, e.g.:", file=sys.stderr)
            for q in missing[:10]:
                print(f"  {q}", file=sys.stderr)
            return 1
        print(f"all {len(parts):,} parts exist")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write the missing sizes.json of shard directories once, so that no training run counts tar headers.

    python -m sd_ds.data.index s3://bucket/shards/ /data/more_shards/ [--workers 16]

For each directory (local or any fsspec URL), every ``*.tar`` that its sizes.json does not list yet is read once
(its headers; in parallel threads) and the counts are merged into sizes.json, written beside the shards (a local
file atomically, an object in one PUT). Unreadable shards are reported and left out. The converter and the latent
encoder write sizes.json themselves: this is for shards made by other tools.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import sys
from typing import Optional

from sd_ds import fileio
from sd_ds.data.sources import SIZES_JSON, UnreadableShardError, count_samples
from sd_ds.data.reading import basename

logger = logging.getLogger("sd_ds.data.index")


def index_directory(directory: str, workers: int = 8) -> dict[str, int]:
    """Count the shards of ``directory`` that its sizes.json lacks and write the merged sizes.json."""
    sizes = fileio.read_json_if_exists(fileio.join(directory, SIZES_JSON)) or {}
    todo = [s for s in fileio.list_files(directory, ".tar") if basename(s) not in sizes]
    if not todo:
        logger.info("%s: sizes.json lists all shards", directory)
        return sizes

    def count(shard: str) -> Optional[int]:
        try:
            return count_samples(shard)
        except UnreadableShardError as e:
            logger.warning("%s", e)
            return None

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for shard, n in zip(todo, pool.map(count, todo)):
            if n:
                sizes[basename(shard)] = n
    sizes = dict(sorted(sizes.items()))
    fileio.write_bytes_to(fileio.join(directory, SIZES_JSON), (json.dumps(sizes, indent=1) + "\n").encode())
    logger.info("%s: counted %d shard(s); sizes.json lists %d shards, %d samples", directory, len(todo), len(sizes),
                sum(sizes.values()))
    return sizes


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_ds.data.index", description=__doc__.split("\n\n")[0])
    p.add_argument("directories", nargs="+", help="shard directories: local paths or URLs (s3://, gs://, ...)")
    p.add_argument("--workers", type=int, default=8, help="shards read at the same time (threads)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for directory in args.directories:
        index_directory(directory, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

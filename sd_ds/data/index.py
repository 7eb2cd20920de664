"""Index shard directories once: the missing sizes.json, and a member index and a size index per shard.

    python -m sd_ds.data.index s3://bucket/shards/ /data/more_shards/ [--workers 16]

For each directory (local or any fsspec URL), every ``*.tar`` that its sizes.json does not list yet, or that has
no member index or size index, is read (in parallel threads): its sample count is merged into sizes.json, the byte
offset of each sample goes to ``NNNNN.tar.offsets`` beside it, so that a reader starting inside a shard (each
epoch's span boundaries, every resume) seeks to its sample instead of reading the shard from its start, and each
sample's image size (from its JSON, else its image header) to ``NNNNN.tar.sizes`` (``sd_ds.data.image_sizes``),
so that aspect-ratio bucketing reads one small file per shard instead of the shard. Files are
written beside the shards (local ones atomically, objects in one PUT). Unreadable shards are reported and left
out. The converter and the latent encoder write sizes.json themselves: without the member index a reader skips
at most one shard's samples.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import sys
from typing import Optional

from sd_ds import fileio
from sd_ds.data.image_sizes import SIZES_SUFFIX, read_shard_sizes, write_size_index
from sd_ds.data.reading import OFFSETS_SUFFIX, basename, offsets_bytes, sample_offsets
from sd_ds.data.sources import SIZES_JSON

logger = logging.getLogger("sd_ds.data.index")


def index_shard(shard: str) -> Optional[int]:
    """Write the shard's member index and size index; its sample count (None: not a readable tar)."""
    import tarfile

    try:
        offsets = sample_offsets(shard)
        with fileio.open_file(shard, "rb") as f:
            size = f.seek(0, 2)
        sizes = read_shard_sizes(shard)  # a second read: the JSON members and image headers
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        logger.warning("%s: not a readable tar (%s: %s): left out", shard, type(e).__name__, e)
        return None
    fileio.write_bytes_to(shard + OFFSETS_SUFFIX, offsets_bytes(size, offsets))
    if len(sizes) == len(offsets):
        write_size_index(shard, sizes)
    return len(offsets)


def index_directory(directory: str, workers: int = 8) -> dict[str, int]:
    """Index the shards of ``directory`` that lack a size or a member index; write the merged sizes.json."""
    sizes = fileio.read_json_if_exists(fileio.join(directory, SIZES_JSON)) or {}
    shards = fileio.list_files(directory, ".tar")
    indexed = {basename(s)[:-len(OFFSETS_SUFFIX)] for s in fileio.list_files(directory, ".tar" + OFFSETS_SUFFIX)}
    sized = {basename(s)[:-len(SIZES_SUFFIX)] for s in fileio.list_files(directory, ".tar" + SIZES_SUFFIX)}
    todo = [s for s in shards if basename(s) not in sizes or basename(s) not in indexed or basename(s) not in sized]
    if not todo:
        logger.info("%s: every shard has its sample count, member index and size index", directory)
        return sizes
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for shard, n in zip(todo, pool.map(index_shard, todo)):
            if n:
                sizes[basename(shard)] = n
    sizes = dict(sorted(sizes.items()))
    fileio.write_bytes_to(fileio.join(directory, SIZES_JSON), (json.dumps(sizes, indent=1) + "\n").encode())
    logger.info("%s: indexed %d shard(s); sizes.json lists %d shards, %d samples", directory, len(todo), len(sizes),
                sum(sizes.values()))
    return sizes


def main(argv: Optional[list[str]] = None) -> int:
    from sd_ds.redaction import guard_console

    guard_console()  # no credential of a shard URL reaches the console
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

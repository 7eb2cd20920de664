"""Image sizes from metadata, never from decoding: what aspect-ratio bucketing orders samples by.

A sample's size is (width, height, original width, original height):

- from its ``.json`` member: ``width``/``height`` (the stored image's size; the converter and img2dataset write
  them) and ``original_width``/``original_height`` (the size before a converter or img2dataset resize; absent when
  the image was not resized: then the original is the stored size);
- else from the image's header (PIL reads the header only; nothing is decoded).

Per shard, the sizes can be indexed once: ``NNNNN.tar.sizes`` beside the shard (written by
``python -m sd_ds.data.index`` next to the member offsets, and by the latent encoder for its shards) holds
little-endian int32 rows (width, height, original width, original height), one per sample in shard order. Shards
without one are read once per run (their .json members and image headers) when the loader is built.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from sd_ds import fileio
from sd_ds.data.buckets import BucketList
from sd_ds.data.order import _Cache

if TYPE_CHECKING:
    from sd_ds.data.sources import ShardSource

logger = logging.getLogger("sd_ds.data")

SIZES_SUFFIX = ".sizes"  # the per-shard size index beside a shard
COLUMNS = 4  # width, height, original width, original height


def _positive_int(value: Any) -> Optional[int]:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def json_sizes(meta: Any) -> Optional[tuple[int, int, int, int]]:
    """(width, height, original width, original height) from a sample's parsed JSON, or None without width and
    height. The original falls back to the stored size."""
    if not isinstance(meta, dict):
        return None
    w, h = _positive_int(meta.get("width")), _positive_int(meta.get("height"))
    if w is None or h is None:
        return None
    ow, oh = _positive_int(meta.get("original_width")), _positive_int(meta.get("original_height"))
    return (w, h, ow, oh) if ow is not None and oh is not None else (w, h, w, h)


def parse_json_member(sample: dict) -> Optional[dict]:
    data = sample.get("json")
    if data is None:
        return None
    try:
        meta = json.loads(data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data)
    except (ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def sample_sizes(sample: dict) -> tuple[int, int, int, int]:
    """A webdataset sample's sizes from its JSON, else its image header; (0, 0, 0, 0) when neither says."""
    from sd_ds.data.transforms import IMAGE_EXTS

    sizes = json_sizes(parse_json_member(sample))
    if sizes is not None:
        return sizes
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is not None:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(sample[ext])) as img:  # the header only
                w, h = img.size
            return (w, h, w, h)
        except Exception:  # noqa: BLE001 - an unreadable header: the sample will be skipped when it is read
            pass
    return (0, 0, 0, 0)


def read_shard_sizes(url: str) -> np.ndarray:
    """int32 [samples, 4] for a shard, read once from its members (JSON, else image headers): webdataset's
    grouping of consecutive members with one key into a sample. A read error ends the shard (the rows so far)."""
    from sd_ds.data.reading import shard_samples

    rows = [sample_sizes(sample) for _, sample in shard_samples(url, 0, lambda e: logger.warning(
        "%s: %s: %s (sizes of the samples before it kept)", url, type(e).__name__, e))]
    return np.asarray(rows, dtype=np.int32).reshape(-1, COLUMNS)


def sizes_bytes(rows: np.ndarray) -> bytes:
    return np.ascontiguousarray(rows, dtype="<i4").reshape(-1, COLUMNS).tobytes()


def read_size_index(url: str) -> Optional[np.ndarray]:
    """A shard's size index, int32 [samples, 4], or None when it has none."""
    try:
        data = fileio.read_bytes(url + SIZES_SUFFIX)
    except (FileNotFoundError, OSError):
        return None
    if len(data) % (4 * COLUMNS):
        logger.warning("%s%s: not a size index (%d bytes): ignored", url, SIZES_SUFFIX, len(data))
        return None
    return np.frombuffer(data, dtype="<i4").reshape(-1, COLUMNS).astype(np.int32)


def write_size_index(url: str, rows: np.ndarray) -> None:
    fileio.write_bytes_to(url + SIZES_SUFFIX, sizes_bytes(rows))



# --- per-run bucket metadata ----------------------------------------------------------------------------------

@dataclass
class BucketMeta:
    """What the bucketed order needs of the data, per run: the bucket list, each source's per-shard bucket
    histograms (int [shards, K], in the source's shard order) and each shard's per-member buckets on demand: from
    ``in_memory`` (shards indexed by this run) or the shard's ``.sizes`` index (read when needed, LRU-cached)."""

    buckets: BucketList
    histograms: list[np.ndarray]
    shard_urls: list[tuple[str, ...]]
    in_memory: dict[str, np.ndarray] = field(default_factory=dict)
    clamped: int = 0  # samples whose aspect ratio is beyond the list (served in the extreme bucket)
    cache_size: int = 64
    _cache: Optional[_Cache] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.histograms = [np.asarray(h).astype(np.uint16 if h.size == 0 or h.max() < 2**16 else np.int32)
                           for h in self.histograms]

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    def shard_buckets(self, source: int, shard: int) -> np.ndarray:
        """Bucket of each member of a shard (uint8, its histogram's count long)."""
        if self._cache is None:
            self._cache = _Cache(self.cache_size)
        url = self.shard_urls[source][shard]
        return self._cache.get_or(url, lambda: self._load(source, shard, url))

    def _load(self, source: int, shard: int, url: str) -> np.ndarray:
        want = int(self.histograms[source][shard].sum())
        if url in self.in_memory:
            return self.in_memory[url]
        rows = read_size_index(url)
        if rows is None or len(rows) != want:
            raise RuntimeError(f"{url}: its size index is missing or changed since the loader was built "
                               f"({'none' if rows is None else len(rows)} rows, {want} expected)")
        index, _ = self.buckets.assign(rows[:, 0], rows[:, 1])
        return index.astype(np.uint8)

    def digest(self) -> str:
        """What a saved position's meaning depends on: the bucket list and every shard's histogram."""
        h = hashlib.sha1(self.buckets.key().encode())
        for hist in self.histograms:
            h.update(np.ascontiguousarray(hist, dtype="<i8").tobytes())
        return h.hexdigest()[:16]


IN_MEMORY_WARN = 20_000_000  # samples whose buckets this run holds in memory: above it, say to index the shards


def build_bucket_meta(sources: list["ShardSource"], buckets: BucketList, *, rank: int = 0, world_size: int = 1,
                      all_reduce: Optional[Callable[[Any], Any]] = None) -> BucketMeta:
    """Every shard's bucket histogram (and, for shards without a size index, its members' buckets), read once per
    run: each shard by one rank (shard i by rank i % world_size), summed over the ranks with ``all_reduce`` (the
    trainer's gloo control group; None: one process reads all). Shards with a ``.sizes`` index cost one small read;
    the others are read once (their JSON members and image headers) and their members' buckets kept in memory."""
    import torch

    urls = list(dict.fromkeys(url for s in sources for url in s.shards))
    expected = {url: int(n) for s in sources for url, n in zip(s.shards, s.sizes or ())}
    K = len(buckets)
    # Per shard: K histogram counts, samples clamped, 1 if read here (members kept in memory).
    table = torch.zeros(len(urls), K + 2, dtype=torch.int64)
    members: dict[str, np.ndarray] = {}
    shared = all_reduce is not None and world_size > 1
    first, step = (rank, world_size) if shared else (0, 1)  # without a group, every rank reads every shard
    for i in range(first, len(urls), step):
        url, want = urls[i], expected[urls[i]]
        rows = read_size_index(url)
        if rows is not None and len(rows) != want:
            logger.warning("%s%s lists %d samples, the shard has %d: ignored (run python -m sd_ds.data.index "
                           "again)", url, SIZES_SUFFIX, len(rows), want)
            rows = None
        read_here = rows is None
        if read_here:
            rows = read_shard_sizes(url)
            if len(rows) != want:  # a shard cut short: its missing members are passed over when read
                rows = np.vstack([rows[:want], np.zeros((max(0, want - len(rows)), COLUMNS), np.int32)])
        index, clamped = buckets.assign(rows[:, 0], rows[:, 1])
        table[i, :K] = torch.from_numpy(np.bincount(index, minlength=K))
        table[i, K] = int(clamped.sum())
        if read_here:
            members[url] = index.astype(np.uint8)
            table[i, K + 1] = 1
    if shared:
        table = all_reduce(table)
    in_memory_urls = [u for u, flag in zip(urls, table[:, K + 1].tolist()) if flag]
    offsets = np.cumsum([0] + [expected[u] for u in in_memory_urls])
    if shared and in_memory_urls:
        vector = torch.zeros(int(offsets[-1]), dtype=torch.uint8)  # bucket + 1 where this rank read the shard
        for u, a in zip(in_memory_urls, offsets):
            if u in members:
                vector[int(a):int(a) + expected[u]] = torch.from_numpy(members[u] + 1)
        vector = all_reduce(vector).numpy()
        members = {u: (vector[int(a):int(a) + expected[u]] - 1).astype(np.uint8)
                   for u, a in zip(in_memory_urls, offsets)}
    if offsets[-1] > IN_MEMORY_WARN:
        logger.warning("aspect-ratio buckets: %d samples in %d shards have no size index, so this run read them "
                       "and holds their buckets in memory (1 byte a sample in every data-loader worker): index them "
                       "once with python -m sd_ds.data.index DIR", int(offsets[-1]), len(in_memory_urls))
    by_url = {u: i for i, u in enumerate(urls)}
    histograms = [table[[by_url[u] for u in s.shards], :K].numpy() for s in sources]
    meta = BucketMeta(buckets, histograms, [tuple(s.shards) for s in sources], in_memory=members,
                      clamped=int(table[:, K].sum()))
    logger.info("aspect-ratio buckets: %d buckets; sizes of %d shard(s) from their size index, %d read once by "
                "this run%s", K, len(urls) - len(in_memory_urls), len(in_memory_urls),
                f"; {meta.clamped} sample(s) of aspect beyond the list clamped to the extreme buckets"
                if meta.clamped else "")
    return meta

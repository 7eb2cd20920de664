"""``--train_shards`` → weighted sources of shards with their sample counts, from local paths or any URL.

An entry is a directory or URL prefix (all its ``*.tar``; a converter output's ``sources.json`` or a latent
directory's ``latents.json`` makes each of its sources a weighted source), a brace pattern, a glob, or a list of
these, each optionally suffixed with ``::weight``. Metadata (sources.json, sizes.json, latents.json) is read from
beside the shards, wherever they are: ``s3://bucket/shards/`` trains exactly as ``/data/shards/`` does.

Sample counts come from sizes.json (the converter and the encoder write it). Shards it does not list are counted
once per run from their tar headers, each by one rank (``count_missing``), or once and for all by
``python -m sd_ds.data.index URL...``, which writes the sizes.json.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from sd_ds import fileio
from sd_ds.data.checks import (check_fits_shard, check_manifest_against_shards, check_sizes_table,
                               check_source_total, check_sources_listing, json_entry, read_metadata_json)
from sd_ds.data.manifest import LATENT_COMPATIBLE, LATENT_MANIFEST, latent_manifest_in_dir
from sd_ds.data.reading import basename, pipe_target
from sd_ds.retries import is_transient, retrying

logger = logging.getLogger("sd_ds.data")

SIZES_JSON = "sizes.json"
SOURCES_JSON = "sources.json"


@dataclass(frozen=True)
class ShardSource:
    """A set of shards drawn from with one mixture weight (one ``--train_shards`` entry, or one source of a
    converter's ``sources.json`` / a latent manifest)."""

    name: str  # for messages and the latent manifest (where the encoder read the source)
    weight: float
    shards: tuple[str, ...]
    samples: Optional[int]  # from sources.json / sizes.json / the latent manifest; None until counted
    sizes: Optional[tuple[int, ...]] = None  # per shard, when sizes.json (or counting) gave every one

    def seed_key(self, index: int) -> str:
        """What seeds this source's shuffles: its place in the run and its shards' names, not where they are
        stored (a local and a remote copy train on the same order; a latent directory keeps its image shards'
        names, hence their order)."""
        names = hashlib.sha1("\n".join(basename(s) for s in self.shards).encode()).hexdigest()[:16]
        return f"{index}:{names}"


class UnreadableShardError(ValueError):
    """A shard that is not a readable tar (zero bytes, not a tar, unreadable file)."""


def split_weight(entry: str) -> tuple[str, float]:
    """``URL::weight`` → (URL, weight); a plain URL has weight 1."""
    url, weight = entry, 1.0
    if "::" in entry:
        url, w = entry.rsplit("::", 1)
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--train_shards {entry!r}: the weight after '::' must be a number") from None
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"--train_shards {entry!r}: mixture weights must be finite numbers > 0")
    return url, weight


def expand(url: str) -> list[str]:
    """Brace patterns and globs → shard paths/URLs (a glob on a URL lists the store)."""
    import braceexpand

    out: list[str] = []
    for u in braceexpand.braceexpand(url):
        out.extend(fileio.glob_urls(u) if _is_glob(u) else [u])
    return out


def _is_glob(url: str) -> bool:
    """A glob pattern; in an http(s) URL a ``?`` starts its query (a presigned URL's signature), not a wildcard."""
    if fileio.is_pipe(url):
        return False
    if url.startswith(("http://", "https://")):
        return any(ch in url.split("?", 1)[0] for ch in "*[")
    return any(ch in url for ch in "*?[")


def _parent(shard: str) -> str:
    if fileio.is_pipe(shard):
        # The metadata of a ``pipe:`` shard is looked for beside the file its command reads, where it can be read
        # (a remote one needs its fsspec backend); else the shards are counted, once per run.
        target = pipe_target(shard)
        if fileio.is_url(target):
            try:
                fileio.url_fs(target)
            except ImportError:
                return "/nonexistent"
        return _parent(target)
    return shard.rsplit("/", 1)[0] if fileio.is_url(shard) else str(Path(shard).parent)


def shard_sizes(shards: Iterable[str]) -> dict[str, int]:
    """{shard: samples} for the shards listed in the sizes.json beside them (one read per directory)."""
    tables: dict[str, dict] = {}
    out = {}
    for shard in shards:
        d = _parent(shard)
        path = fileio.join(d, SIZES_JSON)
        if d not in tables:
            tables[d] = check_sizes_table(read_metadata_json(path), path)  # every count a whole number in range
        n = tables[d].get(basename(shard))
        if n is not None:
            check_fits_shard(n, shard, f"{path}: {json_entry(basename(shard))}")
            out[shard] = n
    return out


def sizes_json_count(shards: Iterable[str]) -> Optional[int]:
    """Samples in the shards according to the sizes.json beside them; None if any shard is not listed."""
    shards = list(shards)
    sizes = shard_sizes(shards)
    return sum(sizes.values()) if len(sizes) == len(shards) else None


def count_samples(shard: str) -> int:
    """Samples (distinct keys) in a tar shard (local or URL), read from its headers. UnreadableShardError (naming
    the shard) when it is no tar at all; a tar cut short counts the samples before the cut."""
    import webdataset as wds

    keys = set()
    try:
        # A URL is streamed (its headers are spread over the whole object); a local file seeks past member data.
        mode = "r|" if fileio.is_url(shard) else "r"
        with fileio.open_file(shard, "rb") as f, tarfile.open(fileobj=f, mode=mode) as tf:
            try:
                for member in tf:
                    if member.isfile():
                        keys.add(wds.tariterators.base_plus_ext(member.name)[0])
            except (tarfile.TarError, OSError) as e:  # cut short: the reader counts it as a tar error too
                if is_transient(e):
                    raise  # the store's failure, not the shard's: count it again (count_here)
                logger.warning("shard %s: %s: %s (counted the %d samples before it)", shard, type(e).__name__, e,
                               len(keys))
    except (tarfile.TarError, OSError) as e:
        if is_transient(e):
            raise
        size = Path(shard).stat().st_size if not fileio.is_url(shard) and Path(shard).is_file() else None
        raise UnreadableShardError(f"{shard}: not a readable tar ({'zero bytes' if size == 0 else e})") from None
    keys.discard(None)
    return len(keys)


def _with_sizes(source: ShardSource, where: Optional[str] = None) -> ShardSource:
    """``where``: the file and entry that gave the source's sample count (checked against its shards')."""
    sizes = shard_sizes(source.shards)
    if len(sizes) == len(source.shards):
        per_shard = tuple(sizes[s] for s in source.shards)
        check_source_total(source.samples, per_shard, where or source.name)
        samples = source.samples if source.samples is not None else sum(per_shard)
        return replace(source, sizes=per_shard, samples=samples)
    return source


def parse_sources(train_shards: list[str]) -> list[ShardSource]:
    """``--train_shards`` entries → sources (see the module docstring), with per-shard sizes where sizes.json
    gives them."""
    sources: list[ShardSource] = []
    for entry in train_shards:
        url, weight = split_weight(entry)
        is_dir = fileio.is_dir(url)
        manifest = latent_manifest_in_dir(url) if is_dir else None
        if manifest is not None:
            # Each source under the name the encoder gave it (its image source's); entries checked on loading.
            path = fileio.join(url, LATENT_MANIFEST)
            sources.extend(_with_sizes(ShardSource(s["name"], float(s["weight"]) * weight,
                                                   tuple(fileio.join(url, n) for n in s["shards"]), int(s["samples"])),
                                       f"{path}: source {json_entry(s['name'])}")
                           for s in manifest["sources"] if s["shards"])
            continue
        path = fileio.join(url, SOURCES_JSON)
        listing = read_metadata_json(path) if is_dir else None
        if listing is not None:
            for s in check_sources_listing(listing, path):  # weights finite >= 0, counts whole numbers
                shards = tuple(fileio.join(url, n) for n in s["shards"])
                if shards and s["weight"] > 0:
                    sources.append(_with_sizes(ShardSource(
                        f"{url}:{s.get('name', len(sources))}", s["weight"] * weight, shards, s["samples"]),
                        f"{path}: source {json_entry(s.get('name', len(sources)))}"))
            continue
        shards = tuple(fileio.list_files(url, ".tar")) if is_dir else tuple(expand(url))
        missing = [s for s in shards if not fileio.is_url(s) and not fileio.is_pipe(s) and not Path(s).is_file()]
        if not shards or missing:
            raise FileNotFoundError(f"--train_shards {entry!r}: no shards found"
                                    + (f" (missing: {', '.join(missing[:3])})" if missing else ""))
        sources.append(_with_sizes(ShardSource(url, weight, shards, None)))
    if not sources:
        raise ValueError("--train_shards: no sources (empty list, or sources.json lists no shards)")
    return sources


def check_shard_metadata(train_shards: list[str]) -> None:
    """Read and check what the loader will read beside the shards (latents.json, against its first shard;
    sources.json; sizes.json) so that a wrong entry stops a run at its start, before anything is built or written:
    MetadataError, one line naming the file and the entry."""
    latent_manifest_of_shards(train_shards)
    parse_sources(train_shards)


Counter = Callable[[list[str]], list[Optional[int]]]


def count_here(shards: list[str]) -> list[Optional[int]]:
    """Counts of the shards read by this process (None: unreadable), warning about each unreadable one."""
    out: list[Optional[int]] = []
    for shard in shards:
        try:
            out.append(retrying(lambda: count_samples(shard), shard))  # a store's transient failure: read again
        except UnreadableShardError as e:
            logger.warning("%s", e)
            out.append(None)
    return out


def count_missing(sources: list[ShardSource], counter: Counter = count_here
                  ) -> tuple[list[ShardSource], dict[str, str]]:
    """Sources with every shard's size: from sizes.json, else counted by ``counter`` (``count_here``, or the
    trainer's ``shared_counter``: each shard by one rank). Shards that are no readable tar or hold no sample are
    left out (→ (sources, {left-out shard: why})); a source left with no shard is an error naming its shards."""
    todo = sorted({sh for s in sources if s.sizes is None for sh in s.shards} - set(shard_sizes(
        sh for s in sources if s.sizes is None for sh in s.shards)))
    counted = dict(zip(todo, counter(todo))) if todo else {}
    out, left_out = [], {}
    for s in sources:
        if s.sizes is not None:
            out.append(s)
            continue
        known = shard_sizes(s.shards)
        sizes = {sh: known.get(sh, counted.get(sh)) for sh in s.shards}
        for sh, n in sizes.items():
            if not n:
                left_out[sh] = f"{sh}: not a readable tar" if n is None else f"{sh}: no samples"
        kept = tuple(sh for sh in s.shards if sizes[sh])
        if not kept:
            raise ValueError(f"source {s.name!r}: no shard with a readable sample: "
                             + "; ".join(left_out.get(sh, f"{sh}: no samples") for sh in s.shards[:5])
                             + (f"; ... ({len(s.shards)} shards)" if len(s.shards) > 5 else ""))
        if len(kept) < len(s.shards):
            logger.warning("source %r: skipping %d of %d shards: %s", s.name, len(s.shards) - len(kept),
                           len(s.shards), "; ".join(left_out[sh] for sh in s.shards if sh not in kept))
        per_shard = tuple(int(sizes[sh]) for sh in kept)
        out.append(replace(s, shards=kept, sizes=per_shard, samples=sum(per_shard)))
    return out, left_out


def shared_counter(rank: int, world_size: int, all_reduce: Callable[[Any], Any]) -> Counter:
    """A counter for ``count_missing`` that splits the shards over the ranks (shard i by rank i % world_size)
    and sums the results over the ranks with ``all_reduce`` (the gloo control group: CPU tensors)."""
    def count(shards: list[str]) -> list[Optional[int]]:
        import torch

        mine = count_here(shards[rank::world_size])
        vector = torch.zeros(len(shards), dtype=torch.int64)
        for i, n in zip(range(rank, len(shards), world_size), mine):
            vector[i] = -1 if n is None else n + 1  # 0: not counted here
        total = all_reduce(vector).tolist()
        return [None if v < 0 else v - 1 for v in total]
    return count


def raise_if_raw_parts(path: str) -> None:
    """The seed's ``--file_list`` (a list of filelists of raw base64 LAION parts) is not read by the trainer:
    say how to convert it. A directory of tar shards passed by mistake is left for the caller to report."""
    p = Path(path)
    if p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
        return
    raise SystemExit(
        f"--file_list {path}: the trainer reads webdataset shards, not raw LAION parts. Convert them once "
        f"(resumable, uses all cores):\n"
        f"    python tools/convert_laion_to_wds.py --file_list {path} --output_dir SHARDS\n"
        f"then train with\n"
        f"    --train_shards SHARDS\n"
        f"(the filelist weights are kept in SHARDS/sources.json and used to mix the sources).")


# --- which entries are latent shards ---------------------------------------------------------------------

def _latent_directory(url: str) -> Optional[str]:
    """The latent directory an entry reads from: itself, or the directory of the shards it names."""
    if fileio.is_dir(url):
        return url if latent_manifest_in_dir(url) is not None else None
    parents = {_parent(s) for s in expand(url)}
    latent = [p for p in sorted(parents) if latent_manifest_in_dir(p) is not None]
    if latent and len(latent) < len(parents):
        raise ValueError(f"--train_shards {url!r} names latent shards ({latent[0]}) and image shards together")
    return latent[0] if latent else None


def latent_directory_of_shards(train_shards: list[str]) -> Optional[str]:
    """The first latent directory ``--train_shards`` names (the one whose manifest ``latent_manifest_of_shards``
    returns), or None."""
    for entry in train_shards:
        directory = _latent_directory(split_weight(entry)[0])
        if directory is not None:
            return directory
    return None


def latent_manifest_of_shards(train_shards: list[str]) -> Optional[dict]:
    """The latent manifest ``--train_shards`` trains on (that of the first latent directory; all of them must
    agree on everything in LATENT_COMPATIBLE), or None for image shards. Mixing latent and image sources, or
    latent directories made differently, is an error."""
    manifests: dict[str, Optional[dict]] = {}
    for entry in train_shards:
        url, _ = split_weight(entry)
        directory = _latent_directory(url)
        manifests[entry] = latent_manifest_in_dir(directory) if directory is not None else None
        if manifests[entry] is not None:
            # The manifest against the shards it describes (an edited dtype or shape stops the run here).
            check_manifest_against_shards(manifests[entry], directory, fileio.join(directory, LATENT_MANIFEST))
    latent = [e for e, m in manifests.items() if m is not None]
    images = [e for e, m in manifests.items() if m is None]
    if not latent:
        return None
    if images:
        raise ValueError(
            f"--train_shards mixes latent shards ({', '.join(latent)}) with image shards ({', '.join(images)}): a run "
            f"trains on one or the other. Encode the image shards too (python -m sd_ds.encode_latents --train_shards "
            f"... --output_dir ..., with the same VAE and resolution) or train on the image shards only.")
    first = manifests[latent[0]]
    for entry in latent[1:]:
        other = manifests[entry]
        differ = [k for k in LATENT_COMPATIBLE if other.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"--train_shards: the latent shards of {latent[0]!r} and {entry!r} were encoded "
                             f"differently ({', '.join(differ)}); encode every source with the same settings")
    return first

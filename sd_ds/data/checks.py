"""Checks of the metadata beside shards against what can be right: sizes.json counts, sources.json and
latents.json entries, and latents.json against the shards it describes.

A hand-edited or damaged file must stop a run at its start with one line naming the file and the entry, not train
on wrong data (a count of 2.5 read as 2, a dtype edited from fp16 to bf16 reinterpreting every byte), hang (a count
of 10**12 sends the readers after samples that do not exist) or fail later with a message that does not say why
(a traceback, "no sources", "1033 samples in a row were unusable"). Every failure is a ``MetadataError``, which
the trainer prints as that one line (exit status 2).
"""

from __future__ import annotations

import math
import os
import tarfile
from typing import Any, Optional

from sd_ds import fileio

MAX_SHARD_SAMPLES = 10_000_000
"""A sanity bound on one shard's sample count: even at the smallest possible sample (one 512-byte tar header) such a
shard is 5 GB, and webdataset shards hold thousands of samples, not millions."""
TAR_BLOCK = 512  # every sample has at least one member, hence one tar header
LATENT_HEADER_PREFIX = "SDDS."  # PAX header keys the encoder puts on each shard's first moments members
MAX_LATENT_SIDE = 1 << 16


class MetadataError(ValueError):
    """A sizes.json, sources.json or latents.json entry that cannot be right (a one-line message)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sample_count(value: Any, where: str, *, minimum: int = 1, limit: int = MAX_SHARD_SAMPLES) -> int:
    """``value`` as a sample count (a whole number in ``minimum..limit``), or MetadataError naming ``where``."""
    ok = _is_number(value) and math.isfinite(value) and float(value).is_integer() and minimum <= value <= limit
    if not ok:
        raise MetadataError(f"{where}: {value!r} is not a sample count (a whole number from {minimum} to "
                            f"{limit:,}); fix or delete the file (python -m sd_ds.data.index writes sizes.json anew)")
    return int(value)


def mixture_weight(value: Any, where: str) -> float:
    """``value`` as a mixture weight (a finite number >= 0; 0 leaves the source out), or MetadataError."""
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise MetadataError(f"{where}: weight {value!r} is not a mixture weight (a finite number >= 0)")
    return float(value)


def read_metadata_json(path: str) -> Any:
    """The JSON at ``path`` (local or URL), None when there is none; MetadataError when it is not JSON."""
    try:
        return fileio.read_json_if_exists(path)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise MetadataError(f"{path}: not valid JSON ({e})") from None


def check_sizes_table(table: Any, path: str) -> dict[str, int]:
    """A sizes.json's content ({shard file name: sample count}), every count checked; {} for no file (None)."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise MetadataError(f"{path}: expected an object {{\"00000.tar\": samples, ...}}, found "
                            f"{type(table).__name__}")
    return {str(name): sample_count(n, f"{path}: {json_entry(name)}") for name, n in table.items()}


def check_fits_shard(count: int, shard: str, where: str) -> None:
    """A count larger than a local shard's bytes can hold (one 512-byte header per sample at the least)."""
    if fileio.is_url(shard) or fileio.is_pipe(shard):
        return  # the size of a remote shard would cost a request per shard: the MAX_SHARD_SAMPLES bound applies
    try:
        size = os.path.getsize(shard[len("file://"):] if shard.startswith("file://") else shard)
    except OSError:
        return  # missing: reported where the shard is read
    if count * TAR_BLOCK > size:
        raise MetadataError(f"{where}: {count:,} samples cannot fit in {shard} ({size:,} bytes hold at most "
                            f"{size // TAR_BLOCK:,}); fix or delete the file (python -m sd_ds.data.index writes "
                            f"sizes.json anew)")


def check_sources_listing(listing: Any, path: str) -> list[dict]:
    """A sources.json's sources ({"sources": [{"name", "weight", "shards", "samples"}, ...]}), each entry checked:
    weight a finite number >= 0 (default 1), shards a list of file names, samples (if given) a count >= 0."""
    sources = listing.get("sources") if isinstance(listing, dict) else None
    if not isinstance(sources, list):
        raise MetadataError(f"{path}: expected {{\"sources\": [{{\"name\", \"weight\", \"shards\", \"samples\"}}, "
                            f"...]}}")
    out = []
    for i, source in enumerate(sources):
        if not isinstance(source, dict):
            raise MetadataError(f"{path}: sources[{i}] is not an object")
        where = f"{path}: source {json_entry(source.get('name', i))}"
        shards = source.get("shards", [])
        if not isinstance(shards, list) or not all(isinstance(s, str) and s for s in shards):
            raise MetadataError(f"{where}: \"shards\" must be a list of shard file names")
        weight = mixture_weight(source.get("weight", 1.0), where)
        samples = source.get("samples")
        if samples is not None:
            samples = sample_count(samples, f"{where}: \"samples\"", minimum=0,
                                   limit=MAX_SHARD_SAMPLES * max(1, len(shards)))
        out.append({**source, "weight": weight, "shards": shards, "samples": samples})
    return out


def check_source_total(samples: Optional[int], per_shard: tuple[int, ...], where: str) -> None:
    """A source's sample count against the sum of its shards' (sizes.json): they must agree."""
    if samples is not None and samples != sum(per_shard):
        raise MetadataError(f"{where}: says {samples:,} samples, but its shards hold {sum(per_shard):,} by "
                            f"sizes.json; the files disagree: fix or rewrite them")


def json_entry(name: Any) -> str:
    return f'"{name}"' if isinstance(name, str) else str(name)


# --- latents.json ----------------------------------------------------------------------------------------

def check_latent_manifest_fields(manifest: Any, path: str) -> None:
    """What the loader reads from a latents.json: dtype, shape and sources (weights, counts, shard names)."""
    from sd_ds.data.manifest import LATENT_DTYPES

    if not isinstance(manifest, dict):
        raise MetadataError(f"{path}: expected an object (the encoder's manifest)")
    if manifest.get("dtype") not in LATENT_DTYPES:
        raise MetadataError(f"{path}: dtype {manifest.get('dtype')!r} is not one of {', '.join(LATENT_DTYPES)}")
    shape = manifest.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_LATENT_SIDE for n in shape)):
        raise MetadataError(f"{path}: shape {shape!r} is not [2C, H/f, W/f] (three positive whole numbers)")
    check_sources_listing(manifest, path)


def check_manifest_against_shards(manifest: dict, directory: str, path: str, samples_to_read: int = 8) -> None:
    """latents.json against the first samples of its first shard: the moments member's byte length must be that of
    the manifest's shape x dtype, and the dtype and shape the encoder recorded in the shard (PAX headers on each
    shard's first moments members) must be the manifest's. Reads a few samples, not the shard."""
    from sd_ds.data.manifest import LATENT_DTYPES, MOMENTS
    from sd_ds.data.reading import _base_plus_ext
    from sd_ds.retries import retrying

    first = next((s["shards"][0] for s in manifest["sources"] if s.get("shards")), None)
    if first is None:
        return  # no samples at all: the loader says so
    shard = fileio.join(directory, first)
    dtype, shape = manifest["dtype"], list(manifest["shape"])
    # Bucketed caches (--aspect_ratio_buckets) store each sample at its bucket: [2C, H/f, W/f] for one of them.
    factor = manifest["resolution"] // shape[1]
    shapes = [shape] + [[shape[0], h // factor, w // factor] for w, h in manifest.get("buckets") or []]
    expected = {math.prod(s) * LATENT_DTYPES[dtype].itemsize for s in shapes}

    def read() -> tuple[list[tuple[str, int]], dict[str, str]]:
        sizes: list[tuple[str, int]] = []
        recorded: dict[str, str] = {}
        kw: dict[str, Any] = {"block_size": 1 << 20} if fileio.is_url(shard) else {}
        with fileio.open_file(shard, "rb", **kw) as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for member in tf:
                base, ext = _base_plus_ext(member.name)
                if ext != MOMENTS or not member.isfile():
                    continue
                sizes.append((member.name, member.size))
                if not recorded:
                    recorded = {k[len(LATENT_HEADER_PREFIX):]: v for k, v in member.pax_headers.items()
                                if k.startswith(LATENT_HEADER_PREFIX)}
                if len(sizes) >= samples_to_read:
                    break
        return sizes, recorded

    try:
        sizes, recorded = retrying(read, shard)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise MetadataError(f"{path}: its first shard {shard} cannot be read ({type(e).__name__}: {e})") from None
    disagree = f"{path} disagrees with its shards"
    fix = "the manifest was edited or belongs to other shards: restore it, or encode the shards again"
    if recorded.get("dtype", dtype) != dtype or recorded.get("shape", ",".join(map(str, shape))) not in {
            ",".join(map(str, s)) for s in shapes}:
        raise MetadataError(f"{disagree}: it says dtype {dtype}, shape {shape}; {shard} was written as dtype "
                            f"{recorded.get('dtype', '?')}, shape [{recorded.get('shape', '?')}]; {fix}")
    if not sizes:
        raise MetadataError(f"{disagree}: {shard} holds no .{MOMENTS} member in its first samples; {fix}")
    if all(size not in expected for _, size in sizes):
        name, size = sizes[0]
        raise MetadataError(f"{disagree}: shape {shape} x {dtype} is {min(expected):,} bytes a sample, {shard}'s "
                            f"{name} has {size:,} bytes (and the next {len(sizes) - 1} likewise differ); {fix}")

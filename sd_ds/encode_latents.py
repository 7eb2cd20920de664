"""Encode image shards once with the frozen VAE: latent shards that the trainer reads instead of images.

    python -m sd_ds.encode_latents --train_shards SRC... --output_dir DST --pretrained_model_name_or_path M \\
        [--vae_name_or_path V] --resolution 256 [--flip_variants] [--batch_size 32] [--dtype fp16|bf16] \\
        [--aspect_ratio_buckets auto|FILE] [--text_embeddings [--model_max_length 77]]
    torchrun --nproc_per_node 8 -m sd_ds.encode_latents ...              # every local GPU
    deepspeed --hostfile HOSTFILE --module sd_ds.encode_latents ...       # several nodes, as training

Then train with ``--train_shards DST``. Why: the VAE encoder costs about half of a UNet training step's FLOPs
per image, and the JPEG pipeline about 150 images/s per CPU core; the cache pays both once.

Work split: shards are handed out dynamically. Every data-loader worker of every rank (RANK and WORLD_SIZE from
torchrun / the deepspeed launcher; one process alone is rank 0 of 1) claims its next shard through a claim file
in DST (``.encode/claims/``), starting at its own place in the shard order, so a rank that finishes early takes
more and no process group is needed. A worker reads its shard through the trainer's own ``ImageTransform``
(centre crop, no flip, the same skips; with --aspect_ratio_buckets each image at its bucket, as the trainer
assigns it from the sample's metadata), its rank encodes it on its device (``cuda:LOCAL_RANK``, else the CPU)
and writes one output shard per source shard. A claim not refreshed for --claim_lease_s (its rank died) is
taken over by another rank; rank 0 waits for the last shards and writes the manifest once. DST and the source
shards may be local or at any fsspec URL (s3://, gs://, ...); output names are the source shards' file names,
whatever the URL (a ``pipe:`` command's .tar word).

DST after a finished run:

    NNNNN.tar      per source shard of the same name (none when no sample of it could be encoded), its samples
                   with the same keys: .txt and .json as in the source, .moments = the VAE posterior's mean then
                   log-variance channels [2C, R/f, R/f] as raw little-endian fp16 (or bf16) bytes — the
                   distribution, not a sample, so training still draws a fresh latent each step as the online path
                   does; with --flip_variants also .moments_flip, the horizontally flipped image's; .microcond
                   (and .microcond_flip): the variant's micro-conditioning, six little-endian int32 (original
                   height, width; crop top, left; target height, width: sd_ds.data.transforms). With
                   --aspect_ratio_buckets each sample's moments are [2C, H/f, W/f] for its bucket (encoded in
                   batches of one bucket, written in the source's order, so the trainer's batches are the image
                   run's); with --text_embeddings also .prompt_embeds, the caption's text conditioning as the
                   family's PromptEncoder gives it ([L, D] raw bytes in --dtype: SD v1/2 the last hidden states,
                   SDXL both encoders' penultimate ones concatenated), and SDXL's .pooled_prompt_embeds [P]
    empty_prompt.safetensors  with --text_embeddings: the empty prompt's (what caption dropout gives; SDXL zeros)
    NNNNN.tar.sizes  with --aspect_ratio_buckets: each sample's source image size (sd_ds.data.image_sizes), in the
                   shard's order, from which the trainer assigns the same buckets
    sizes.json     samples per output shard
    latents.json   the manifest: what a trainer checks (resolution, crop, dtype, shape, the bucket list, the VAE's
                   config, weight fingerprint and scaling_factor; with --text_embeddings the text encoders' configs
                   and weight fingerprints, the tokenizers and token length, the stored shapes and bytes per sample)
                   and what was done (sources with their mixture weights and sample counts, skips by reason, per
                   shard)
    .encode/       the plan (the settings a rerun must match) and one record per finished shard

Resumable per shard: a shard is written under a temporary name and renamed into place, then recorded; a rerun
skips recorded shards and redoes the rest. Batches never span two shards and each shard's batches are the same
whatever the rank count, so the output bytes depend neither on the ranks nor on interruptions (same hardware
and software).

The VAE side it shares with the trainer (``encode_moments``, ``sample_latents``, ``latent_shape``) lives in
``sd_ds.latents``; the manifest's format and its check in ``sd_ds.data.manifest``.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import os
import random
import socket
import sys
import tarfile
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import torch

from sd_ds.convert.planning import first_difference
from sd_ds.convert.storage import LocalStore, Store, open_store
from sd_ds.data import (ImageTransform, ShardSource, SkipLog, SkipSample, latent_manifest_of_shards, parse_sources,
                        sizes_json_count)
from sd_ds.data.buckets import BucketList, model_divisor, resolve_buckets
from sd_ds.data.image_sizes import SIZES_SUFFIX, sample_sizes, sizes_bytes
from sd_ds.data.manifest import (EMPTY_PROMPT, FORMAT, LATENT_DTYPES, LATENT_MANIFEST, LATENT_WORK_DIR, MICROCOND,
                                 MICROCOND_FLIPPED, MOMENTS, MOMENTS_FLIPPED, POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS,
                                 VERSION, text_encoders_record, vae_record)
from sd_ds.data.transforms import ImageSamples, decode_caption, geometry_bytes, mirrored
from sd_ds.faults import FaultInjector
from sd_ds.latents import encode_moments, latent_shape
from sd_ds.lifecycle import pid_alive
from sd_ds.models import from_pretrained
from sd_ds.data.checks import LATENT_HEADER_PREFIX
from sd_ds.redaction import guard_console, redact_url

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from sd_ds.conditioning import PromptEncoder

logger = logging.getLogger("sd_ds.encode_latents")

REORDER_WINDOW = 32  # batches: how far a bucket's open batch may hold back the samples written after it
CLAIM_POLL_S = 1.0  # how often rank 0 looks whether the shards others claimed are done
# log-variance range DiagonalGaussianDistribution clamps to: stored clamped, so fp16 cannot overflow on it.
LOGVAR_RANGE = (-30.0, 20.0)
VAE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- plan: what a run encodes, and what a rerun must match --------------------------------------------

class EncodeError(RuntimeError):
    """A problem with the arguments or the output directory; the CLI exits 2 with the message."""


def _output_name(url: str) -> str:
    """The output shard's name: the source shard's file name, from a path, a URL (query dropped) or a
    ``pipe:`` command (its last word naming a .tar, e.g. ``pipe:curl -s https://host/00001.tar -`` → 00001.tar)."""
    if url.startswith("pipe:"):
        words = [w.strip("'\"") for w in url[len("pipe:"):].split()]
        tars = [w for w in words if w.split("?", 1)[0].endswith(".tar")]
        if not tars:
            raise EncodeError(f"cannot tell the shard's name from {url!r}: no word of the command ends in .tar")
        url = tars[-1]
    return os.path.basename(url.split("?", 1)[0].rstrip("/")) or url


def build_plan(sources: list[ShardSource], vae: "AutoencoderKL", *, resolution: int, min_size: Optional[int],
               dtype: str, flip_variants: bool, vae_dtype: str, batch_size: int,
               buckets: Optional[BucketList] = None, text_embeddings: Optional[dict] = None) -> dict:
    """Everything that decides the output bytes; a rerun into the same directory must have the same plan."""
    names: dict[str, str] = {}
    for source in sources:
        for url in source.shards:
            name = _output_name(url)
            if name in names:
                raise EncodeError(f"two source shards would write the same output shard {name!r} ({names[name]} and "
                                  f"{url}): encode each source into its own --output_dir and train with both "
                                  f"(--train_shards DST1::w1 DST2::w2)")
            names[name] = url
    plan = {
        "format": FORMAT, "version": VERSION, "resolution": resolution, "crop": "center", "min_size": min_size,
        "dtype": dtype, "shape": latent_shape(vae, resolution), "byte_order": "little",
        "flip_variants": flip_variants, "vae": vae_record(vae), "vae_dtype": vae_dtype, "batch_size": batch_size,
        # Written down (plan.json, latents.json): URLs less any credential; the reader keeps the real ones.
        "sources": [{"name": redact_url(s.name), "weight": s.weight, "source_samples": s.samples,
                     "shards": [[redact_url(url), _output_name(url)] for url in s.shards]} for s in sources],
    }
    if buckets is not None:  # squares keep the plan they always had (a rerun of an older encoding still matches)
        plan["buckets"] = buckets.to_json()
    if text_embeddings is not None:  # likewise without --text_embeddings
        plan["text_embeddings"] = text_embeddings
    return plan


def open_output(out: Store, plan: dict) -> None:
    """Create DST with its plan, or check that an existing one was started with the same plan."""
    try:
        if isinstance(out, LocalStore):
            (out.path / LATENT_WORK_DIR).mkdir(parents=True, exist_ok=True)
        plan_name = f"{LATENT_WORK_DIR}/plan.json"
        if out.exists(plan_name):
            saved = out.read_json(plan_name)
            if saved != plan:
                raise EncodeError(f"--output_dir {out} holds an encoding made with other settings ("
                                  f"{first_difference(plan, saved)}); rerun with the same settings to finish it, "
                                  f"or use a new --output_dir")
            return
        if any(name.endswith(".tar") for name in out.list()):
            raise EncodeError(f"--output_dir {out} already holds .tar files but no encoding plan: use an empty "
                              f"directory")
        out.write_json(plan_name, plan)  # every rank writes the same bytes; the write is atomic
    except OSError as e:
        raise EncodeError(f"--output_dir {out}: cannot create or write it ({e})") from None


def _record_name(name: str) -> str:
    return f"{LATENT_WORK_DIR}/{name}.json"


def _done(out: Store, name: str) -> Optional[dict]:
    """The shard's record if it is finished (its tar in place when it has samples), else None."""
    if not out.exists(_record_name(name)):
        return None
    record = out.read_json(_record_name(name))
    return record if record["samples"] == 0 or out.exists(name) else None


CLAIMS_DIR = f"{LATENT_WORK_DIR}/claims"  # NAME.json: which process encodes shard NAME, refreshed while it does


class ShardClaims:
    """Shards handed out dynamically through claim files in DST, so that a rank that finishes early takes
    more and no launcher or process group is needed. A claim ``.encode/claims/NAME.json`` says who encodes
    NAME and when it last said so; its owner refreshes it while it reads the shard and deletes it once the
    shard is recorded. A claim older than ``lease_s`` belongs to a dead process (a killed rank, a lost node):
    any rank takes it over and encodes the shard again. On a POSIX file system a claim is taken exactly
    once (O_EXCL); on an object store two ranks may race to the same shard, which only costs time: the
    bytes do not depend on who encodes.

    Each data-loader worker of each rank starts at its own place in the plan's shard order (worker ``g`` of
    ``G`` at shard ``g·N/G``), so claims collide only at the end."""

    def __init__(self, out: Store, shards: list[tuple[str, str]], lease_s: float, owner: str):
        self.out, self.shards, self.lease_s, self.owner = out, shards, lease_s, owner

    def _claim_name(self, name: str) -> str:
        return f"{CLAIMS_DIR}/{name}.json"

    def _payload(self) -> bytes:
        return json.dumps({"owner": self.owner, "time": time.time()}).encode()

    def _stale(self, name: str) -> bool:
        try:
            claim = self.out.read_json(self._claim_name(name))
        except (FileNotFoundError, ValueError):
            return True  # gone (released) or half-written by a killed writer of a store without atomic writes
        host, _, rest = str(claim.get("owner", "")).partition(":")
        pid = rest.partition(":")[0]
        if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
            return True  # its process, on this host, is gone: no need to wait for the lease (a resume)
        return time.time() - float(claim.get("time", 0)) > self.lease_s

    def claimed(self, worker: int, workers: int) -> Iterator[tuple[str, str]]:
        """The shards this loader worker encodes, claimed one at a time (``worker`` of ``workers`` over all
        ranks). First the unclaimed ones, then those whose claim went stale."""
        n = len(self.shards)
        start = (worker * n) // max(workers, 1)
        order = self.shards[start:] + self.shards[:start]
        for url, name in order:
            if _done(self.out, name) is None and self.out.create_exclusive(self._claim_name(name), self._payload()):
                self.out.remove_temporaries(of=name)  # a killed run's half-written file of this shard
                yield url, name
        for url, name in order:
            if _done(self.out, name) is None and self.out.exists(self._claim_name(name)) and self._stale(name):
                logger.warning("%s: its claim's process is gone, or silent for %.0f s: encoding it here", name,
                               self.lease_s)
                self.refresh(name)
                self.out.remove_temporaries(of=name)
                yield url, name

    def refresh(self, name: str) -> None:
        self.out.write_bytes(self._claim_name(name), self._payload())

    def release(self, name: str) -> None:
        self.out.delete(self._claim_name(name))


def finalize(out: Store, plan: dict) -> Optional[dict]:
    """Write sizes.json and the manifest when every shard is recorded (rank 0, once, after every shard is;
    a rerun of a finished encoding writes the same bytes again). Returns the manifest, or None while shards
    are missing."""
    records, skipped = {}, collections.Counter()
    for source in plan["sources"]:
        for url, name in source["shards"]:
            record = _done(out, name)
            if record is None:
                return None
            records[name] = record
            skipped.update(record["skipped"])
    sources = []
    for source in plan["sources"]:
        names = [name for _, name in source["shards"] if records[name]["samples"] > 0]
        sources.append({"name": source["name"], "weight": source["weight"], "shards": names,
                        "samples": sum(records[n]["samples"] for n in names),
                        "source_samples": source["source_samples"]})
    manifest = {k: v for k, v in plan.items() if k != "sources"}
    manifest.update({
        "members": {MOMENTS: "mean then log-variance channels of the VAE posterior, raw bytes, shape and dtype "
                             "above",
                    MOMENTS_FLIPPED: "the same for the horizontally flipped image" if plan["flip_variants"] else None,
                    MICROCOND: "the moments' micro-conditioning: original height, width; crop top, left; target "
                               "height, width; six little-endian int32",
                    MICROCOND_FLIPPED: "the same for the flipped image" if plan["flip_variants"] else None,
                    "txt": "caption, as in the source", "json": "metadata, as in the source (when it had one)",
                    **{k: v for k, v in {
                        PROMPT_EMBEDS: "the caption's text conditioning (the UNet's encoder_hidden_states), raw bytes "
                                       "in dtype, shape text_embeddings.shapes",
                        POOLED_PROMPT_EMBEDS: "SDXL: the pooled projection (text_embeds), likewise"}.items()
                       if k in (plan.get("text_embeddings") or {}).get("shapes", {})}},
        "sources": sources, "samples": sum(s["samples"] for s in sources), "skipped": dict(sorted(skipped.items())),
        "shards": records,
    })
    out.write_json("sizes.json", {n: r["samples"] for n, r in records.items() if r["samples"] > 0})
    out.write_json(LATENT_MANIFEST, manifest)
    out.remove_tree(CLAIMS_DIR)
    return manifest


# --- reading and writing shards ----------------------------------------------------------------------

class ShardImages(torch.utils.data.IterableDataset):
    """The shards a rank's data-loader workers claim (``ShardClaims``), each worker its own: per shard, batches
    of centre-cropped uint8 images in the shard's order (with ``buckets``: per bucket, each batch one bucket's,
    as they fill), the last one flagged with the shard's skip counts. ``rank``/``world_size``: where this rank's
    workers sit among all ranks' workers."""

    def __init__(self, claims: ShardClaims, transform: ImageTransform, batch_size: int, rank: int = 0,
                 world_size: int = 1, buckets: Optional[BucketList] = None) -> None:
        self.claims, self.transform, self.batch_size = claims, transform, batch_size
        self.rank, self.world_size, self.buckets = rank, world_size, buckets

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        log = SkipLog(f"encode worker {worker}")  # warns about the first few of each reason, counts all
        unused_rng = random.Random(0)  # a centre crop without flip draws nothing
        samples = ImageSamples(self.transform)
        refresh_every = self.claims.lease_s / 4
        for url, name in self.claims.claimed(self.rank * workers + worker, self.world_size * workers):
            refreshed = time.monotonic()
            skipped: collections.Counter[str] = collections.Counter()

            def tar_error(exn: Exception) -> bool:
                skipped["tar_errors"] += 1
                return log.tar_error(exn)

            batches: dict[Optional[int], list[tuple]] = {}  # bucket (None: squares) -> its batch filling up
            seq = 0  # the shard's usable samples, numbered in its order: the writer writes them in that order
            for sample in wds.tarfile_samples([{"url": url}], handler=tar_error):
                if time.monotonic() - refreshed > refresh_every:  # still alive: keep the claim
                    self.claims.refresh(name)
                    refreshed = time.monotonic()
                if not is_safe_member_key(sample["__key__"]):
                    # "../../x", "/etc/x": such a name copied into our shard would write outside the folder of
                    # whoever extracts it. Not renamed (a renamed key could collide with another): skipped, counted.
                    skipped["unsafe_member_name"] += 1
                    log.skip("unsafe_member_name", f"{url}: member name {sample['__key__']!r}: not a relative "
                                                   f"path inside the shard")
                    continue
                sizes = sample_sizes(sample)  # the metadata the trainer assigns the bucket from
                bucket = None if self.buckets is None else int(self.buckets.assign([sizes[0]], [sizes[1]])[0][0])
                try:
                    pixels, _, geometry, resized_width = samples.prepare_with_width(sample, unused_rng,
                                                                                   self._target(bucket))
                except SkipSample as skip:
                    skipped[skip.reason] += 1
                    log.skip(skip.reason, f"{url}:{sample['__key__']}: {skip}")
                    continue
                batch = batches.setdefault(bucket, [])
                batch.append((sample["__key__"], pixels, sample["txt"], sample.get("json"), geometry,
                              mirrored(geometry, resized_width), sizes, seq))
                seq += 1
                if len(batch) == self.batch_size:
                    yield self._pack(name, batches.pop(bucket), bucket, None)
                # The writer keeps the shard's order, so a rare bucket's open batch would hold back every sample
                # after it: encode it early (a smaller batch) once it holds back more than REORDER_WINDOW batches.
                while batches and seq - min(b[0][7] for b in batches.values()) > REORDER_WINDOW * self.batch_size:
                    oldest = min(batches, key=lambda b: batches[b][0][7])
                    yield self._pack(name, batches.pop(oldest), oldest, None)
            rest = sorted(batches, key=lambda b: batches[b][0][7])  # by their first sample: a fixed order
            for bucket in rest[:-1]:
                yield self._pack(name, batches[bucket], bucket, None)
            yield self._pack(name, batches[rest[-1]] if rest else [], rest[-1] if rest else None, dict(skipped))

    def _target(self, bucket: Optional[int]) -> Optional[tuple[int, int]]:
        return None if bucket is None or self.buckets is None else self.buckets.sizes[bucket]

    def _pack(self, name: str, batch: list, bucket: Optional[int], skipped: Optional[dict]) -> dict:
        tw, th = self._target(bucket) or (self.transform.resolution, self.transform.resolution)
        return {"name": name, "keys": [b[0] for b in batch], "txt": [b[2] for b in batch],
                "json": [b[3] for b in batch], "geometry": [b[4] for b in batch],
                "geometry_flip": [b[5] for b in batch],
                "sizes": [b[6] for b in batch], "seq": [b[7] for b in batch], "last": skipped is not None,
                "skipped": skipped or {},
                "pixels": torch.stack([b[1] for b in batch]) if batch else torch.empty(0, 3, th, tw,
                                                                                      dtype=torch.uint8)}


def is_safe_member_key(key: str) -> bool:
    """A sample key that is a plain relative path (no ``..``, not absolute, no empty or ``.`` parts): its members
    extract inside the folder they are extracted in."""
    import posixpath

    return (bool(key) and not key.startswith("/") and "\\" not in key and posixpath.normpath(key) == key
            and ".." not in key.split("/"))


class LatentShardWriter:
    """One output shard, streamed into a temporary file and renamed into place when complete. Tar headers carry
    no time, owner or mode from the machine, so the bytes depend only on the members. The first sample's moments
    members carry the dtype and shape they are stored in (PAX headers ``SDDS.dtype``, ``SDDS.shape``, which tar
    readers ignore), so the trainer can check latents.json against the shards (``sd_ds.data.checks``)."""

    def __init__(self, out: Store, name: str) -> None:
        self.file = out.writer(name, fsync=True)
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0
        self.sizes: list[tuple[int, int, int, int]] = []  # each sample's source image size, in the shard's order
        # Encoded samples waiting for an earlier one (bucket batches complete out of order): seq -> (key, members,
        # sizes, PAX headers), or None for one that will not be written (non-finite moments).
        self.waiting: dict[int, Optional[tuple[str, dict[str, bytes], tuple, dict]]] = {}
        self.next_seq = 0

    def put(self, seq: int, sample: Optional[tuple[str, dict[str, bytes], tuple, dict]]) -> None:
        """Write the shard's samples in their order, each once every earlier one has come."""
        self.waiting[seq] = sample
        while self.next_seq in self.waiting:
            ready = self.waiting.pop(self.next_seq)
            self.next_seq += 1
            if ready is not None:
                key, members, sizes, headers = ready
                self.add(key, members, headers)
                self.sizes.append(sizes)

    def add(self, key: str, members: dict[str, bytes], headers: Optional[dict[str, dict[str, str]]] = None) -> None:
        """``headers``: {member extension: PAX records} (written for the shard's first sample only)."""
        if not is_safe_member_key(key):
            raise ValueError(f"refusing to write a member named {key!r} (not a relative path inside the shard)")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0, 0o444, 0, 0, "", "")
            if headers and ext in headers and self.samples == 0:
                info.pax_headers = dict(headers[ext])
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def commit(self) -> None:
        self.tar.close()
        self.file.commit()

    def abort(self) -> None:
        self.file.__exit__(None, None, None)  # not committed: dropped


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.int16).numpy().tobytes()  # 2-byte dtypes; little-endian on every CPU we run


# --- the run -----------------------------------------------------------------------------------------

def load_vae(pretrained_model_name_or_path: Optional[str], vae_name_or_path: Optional[str]) -> "AutoencoderKL":
    from diffusers import AutoencoderKL  # lazy: seconds of import that `--help` does not need

    if vae_name_or_path:
        return from_pretrained(AutoencoderKL, "VAE", vae_name_or_path)
    if pretrained_model_name_or_path:
        return from_pretrained(AutoencoderKL, "VAE", pretrained_model_name_or_path, "vae")
    raise EncodeError("no VAE given: pass --pretrained_model_name_or_path (a model directory with vae/) or "
                      "--vae_name_or_path")


def encode(args: argparse.Namespace) -> int:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # The same algorithms for the same batch on every run: the bytes must not depend on which rank encodes.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    out = open_store(args.output_dir)
    if latent_manifest_of_shards(list(args.train_shards)) is not None:
        raise EncodeError("--train_shards names latent shards: the encoder reads image shards")
    sources = parse_sources(list(args.train_shards))
    vae = load_vae(args.pretrained_model_name_or_path, args.vae_name_or_path)
    vae.requires_grad_(False).eval()
    buckets = encoding_buckets(args, vae)
    prompt_encoder, text_record, empty_prompt = (text_side(args, device) if args.text_embeddings
                                                 else (None, None, None))
    plan = build_plan(sources, vae, resolution=args.resolution, min_size=args.min_size, dtype=args.dtype,
                      flip_variants=args.flip_variants, vae_dtype=args.vae_dtype, batch_size=args.batch_size,
                      buckets=buckets, text_embeddings=text_record)
    open_output(out, plan)
    if empty_prompt is not None:  # every rank writes the same bytes; the write is atomic
        out.write_bytes(EMPTY_PROMPT, empty_prompt)
    vae.to(device)
    if args.vae_dtype != "fp32":
        vae.to(VAE_DTYPES[args.vae_dtype])

    real_urls = {_output_name(url): url for s in sources for url in s.shards}  # the plan holds redacted ones
    every = [(real_urls[name], name) for s in plan["sources"] for _, name in s["shards"]]
    todo = [(url, name) for url, name in every if _done(out, name) is None]
    logger.info("rank %d of %d: %d of %d shard(s) left to encode (%d already done), handed out as ranks ask for "
                "them, on %s", rank, world_size, len(todo), len(every), len(every) - len(todo), device)

    transform = ImageTransform(args.resolution, center_crop=True, random_flip=False, min_size=args.min_size)
    owner = f"{socket.gethostname()}:{os.getpid()}:rank{rank}"
    claims = ShardClaims(out, todo, args.claim_lease_s, owner)
    workers = min(args.dataloader_num_workers, len(todo))
    progress = _progress(sizes_json_count(url for url, _ in todo) if world_size == 1 else None,
                         disable=args.disable_tqdm or rank != 0)
    encoder = ShardEncoder(vae, out, dict((name, url) for url, name in todo), claims,
                           store_dtype=LATENT_DTYPES[args.dtype], flip_variants=args.flip_variants, progress=progress,
                           size_index=buckets is not None, prompt_encoder=prompt_encoder)
    started = time.perf_counter()
    manifest = None
    try:
        while True:
            loader = torch.utils.data.DataLoader(
                ShardImages(claims, transform, args.batch_size, rank, world_size, buckets), batch_size=None,
                num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None)
            for item in loader:
                encoder.add(item)
            if rank != 0:
                break  # nothing left to claim; rank 0 waits for the shards still claimed and writes the manifest
            manifest = finalize(out, plan)
            if manifest is not None:
                break
            time.sleep(CLAIM_POLL_S)  # others are encoding: wait, and take over their shards if they die
    finally:
        encoder.close()
        progress.close()
    elapsed = time.perf_counter() - started
    logger.info("rank %d: encoded %d images from %d shard(s) in %.1f s (%.1f images/s), skipped %s; %s", rank,
                encoder.encoded, encoder.shards, elapsed, encoder.encoded / max(elapsed, 1e-9),
                dict(encoder.skipped) or "none", f"{out}/{LATENT_MANIFEST} written: {manifest['samples']} samples"
                if manifest else "rank 0 writes the manifest once every shard is encoded")
    return 0


def text_side(args: argparse.Namespace, device: torch.device) -> tuple["PromptEncoder", dict, bytes]:
    """--text_embeddings: the model's prompt encoder (its tokenizers and text encoders, in float32 on ``device``),
    the manifest's record of it (with the stored shapes and bytes per sample), and the empty prompt's stored
    conditioning (safetensors bytes, for ``EMPTY_PROMPT``)."""
    from safetensors.torch import save

    from sd_ds.conditioning import PromptEncoder
    from sd_ds.models import load_text_side

    if not args.pretrained_model_name_or_path:
        raise EncodeError("--text_embeddings needs --pretrained_model_name_or_path: the model folder whose UNet config "
                          "gives the family and whose text encoder(s) and tokenizer(s) encode the captions")
    family, tokenizers, encoders = load_text_side(
        args.pretrained_model_name_or_path, text_encoder_name_or_path=args.text_encoder_name_or_path,
        tokenizer_name=args.tokenizer_name, text_encoder_2_name_or_path=args.text_encoder_2_name_or_path,
        tokenizer_2_name=args.tokenizer_2_name, model_max_length=args.model_max_length)
    record = text_encoders_record(family.name, dict(zip(family.tokenizers, tokenizers)),
                                  dict(zip(family.text_encoders, encoders)), args.model_max_length)  # as loaded
    prompt_encoder = PromptEncoder(family, [t for t in tokenizers], [e.to(device) for e in encoders],
                                   max_length=args.model_max_length)
    store_dtype = LATENT_DTYPES[args.dtype]
    empty = {k: v[0].contiguous() for k, v in text_members(prompt_encoder, [""], [(0,) * 6], store_dtype).items()}
    shapes = {k: list(v.shape) for k, v in empty.items()}
    record.update(shapes=shapes, empty_prompt=EMPTY_PROMPT,
                  bytes_per_sample=sum(v.numel() * v.element_size() for v in empty.values()))
    logger.info("text embeddings: %s conditioning %s stored per sample (%d bytes in %s)", family.name,
                ", ".join(f"{k} {v}" for k, v in shapes.items()), record["bytes_per_sample"], args.dtype)
    return prompt_encoder, record, save(empty)


@torch.no_grad()
def text_members(prompt_encoder: "PromptEncoder", captions: list[str], geometry: list[tuple[int, ...]],
                 store_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored text conditioning of a batch of captions, on the CPU in ``store_dtype``: PromptEncoder.encode of
    their tokens (what the trainer's step computes without them; PromptEncoder.stored reads it back)."""
    device = next(prompt_encoder.text_encoders[0].parameters()).device
    tokens = {k: v.to(device) for k, v in prompt_encoder.tokenize(captions).items()}
    ids = torch.tensor(geometry, dtype=torch.int64, device=device).view(-1, 6)  # time_ids are not stored
    conditioning = prompt_encoder.encode(tokens, {"original_size": ids[:, 0:2], "crop_top_left": ids[:, 2:4],
                                                  "target_size": ids[:, 4:6]})
    members = {PROMPT_EMBEDS: conditioning.encoder_hidden_states}
    if conditioning.added_cond_kwargs is not None:
        members[POOLED_PROMPT_EMBEDS] = conditioning.added_cond_kwargs["text_embeds"]
    return {k: v.float().to(store_dtype).cpu() for k, v in members.items()}


def encoding_buckets(args: argparse.Namespace, vae: "AutoencoderKL") -> Optional[BucketList]:
    """--aspect_ratio_buckets with the model's divisor: the VAE's downsampling and the UNet's, from the unet/ config
    of --pretrained_model_name_or_path."""
    if args.aspect_ratio_buckets == "off":
        return None
    if not args.pretrained_model_name_or_path:
        raise EncodeError("--aspect_ratio_buckets needs --pretrained_model_name_or_path: its unet/ config gives the "
                          "buckets' divisor (VAE x UNet downsampling)")
    from diffusers import UNet2DConditionModel

    try:
        unet_config = UNet2DConditionModel.load_config(args.pretrained_model_name_or_path, subfolder="unet")
    except (OSError, ValueError) as e:
        raise EncodeError(f"--aspect_ratio_buckets: cannot read the UNet config of "
                          f"{args.pretrained_model_name_or_path} ({type(e).__name__}): it gives the divisor") from None
    buckets = resolve_buckets(args.aspect_ratio_buckets, args.resolution, model_divisor(vae.config, unet_config))
    logger.info("aspect-ratio buckets (width x height): %s", buckets.key())
    return buckets


class ShardEncoder:
    """The main process's side: encodes each batch from the loader on the VAE's device, streams it into its
    shard's temporary file, and renames and records a shard when its last batch has come."""

    def __init__(self, vae: "AutoencoderKL", out: Store, urls: dict[str, str], claims: ShardClaims, *,
                 store_dtype: torch.dtype, flip_variants: bool, progress: Any, size_index: bool = False,
                 prompt_encoder: Optional["PromptEncoder"] = None) -> None:
        self.vae, self.out, self.urls, self.claims = vae, out, urls, claims
        self.prompt_encoder = prompt_encoder  # --text_embeddings
        self.size_index = size_index  # write NNNNN.tar.sizes (bucketed latents: the trainer's bucket metadata)
        self.shards = 0  # finished by this process
        self.store_dtype, self.flip_variants, self.progress = store_dtype, flip_variants, progress
        self.writers: dict[str, LatentShardWriter] = {}  # one per worker's shard in progress
        self.nonfinite: collections.Counter[str] = collections.Counter()  # per shard
        self.skipped: collections.Counter[str] = collections.Counter()  # this run's, by reason
        self.encoded = 0
        self.hook = FaultInjector.from_env()  # SD_DS_FAULT: the tests kill a run at a chosen batch or shard

    def add(self, item: dict) -> None:
        name = item["name"]
        writer = self.writers.get(name) or self.writers.setdefault(name, LatentShardWriter(self.out, name))
        if item["keys"]:
            pixels = item["pixels"].to(next(self.vae.parameters()).device, non_blocking=True)
            variants = {MOMENTS: _to_store(encode_moments(self.vae, pixels), self.store_dtype)}
            if self.flip_variants:
                variants[MOMENTS_FLIPPED] = _to_store(encode_moments(self.vae, pixels.flip(-1)), self.store_dtype)
            text = ({} if self.prompt_encoder is None else text_members(
                self.prompt_encoder, [decode_caption(t) for t in item["txt"]], item["geometry"], self.store_dtype))
            finite = torch.stack([torch.isfinite(m).flatten(1).all(1) for m in (*variants.values(), *text.values())]
                                 ).all(0)
            for i, key in enumerate(item["keys"]):
                if not finite[i]:  # a VAE in fp16 can overflow; training must never see it
                    self.nonfinite[name] += 1
                    writer.put(item["seq"][i], None)
                    continue
                members = {"txt": item["txt"][i]}
                if item["json"][i] is not None:
                    members["json"] = item["json"][i]
                members.update({ext: _raw(m[i]) for ext, m in (*variants.items(), *text.items())})
                members[MICROCOND] = geometry_bytes(item["geometry"][i])
                if self.flip_variants:
                    members[MICROCOND_FLIPPED] = geometry_bytes(item["geometry_flip"][i])
                writer.put(item["seq"][i], (key, members, tuple(item["sizes"][i]),
                                               {ext: self._layout(m[i]) for ext, m in variants.items()}))
            self.encoded += int(finite.sum())
            self.progress.update(len(item["keys"]))
            self.hook("batch")
        if item["last"]:
            self._finish(name, item["skipped"])

    def _layout(self, moments: torch.Tensor) -> dict[str, str]:
        """How a moments member is stored: the PAX records the trainer checks latents.json against."""
        dtype = next(k for k, v in LATENT_DTYPES.items() if v == self.store_dtype)
        return {f"{LATENT_HEADER_PREFIX}dtype": dtype,
                f"{LATENT_HEADER_PREFIX}shape": ",".join(str(n) for n in moments.shape)}

    def _finish(self, name: str, skipped: dict[str, int]) -> None:
        shard_skipped = collections.Counter(skipped)
        shard_skipped["nonfinite_moments"] += self.nonfinite.pop(name, 0)
        shard_skipped = +shard_skipped  # without zero counts
        self.skipped.update(shard_skipped)
        writer = self.writers.pop(name)
        assert not writer.waiting, f"{name}: samples {sorted(writer.waiting)} were never preceded"
        if writer.samples:
            if self.size_index:  # before the shard is in place: a trainer never sees it without its sizes
                self.out.write_bytes(name + SIZES_SUFFIX, sizes_bytes(np.asarray(writer.sizes, dtype=np.int32)))
            writer.commit()
            self.hook("shard")
        else:
            writer.abort()  # nothing to train on: no file; the record says 0 samples
        self.out.write_json(_record_name(name), {"source": redact_url(self.urls[name]), "samples": writer.samples,
                                                 "skipped": dict(sorted(shard_skipped.items()))})
        self.claims.release(name)
        self.shards += 1
        self.progress.update(sum(skipped.values()) - skipped.get("tar_errors", 0))  # read, but not encoded
        self.progress.set_postfix(skipped=sum(self.skipped.values()), refresh=False)

    def close(self) -> None:
        """Drop the temporary files of unfinished shards (a rerun redoes them)."""
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()


def _to_store(moments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mean, logvar = moments.float().chunk(2, dim=1)
    return torch.cat([mean, logvar.clamp(*LOGVAR_RANGE)], dim=1).to(dtype).cpu()  # [B, 2C, R/f, R/f]


def _progress(total: Optional[int], disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="encoding", disable=disable, dynamic_ncols=True, smoothing=0.1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sd_ds.encode_latents", description=__doc__.split("\n\n")[0],
        epilog="Several ranks: launch with torchrun or the deepspeed launcher (RANK/WORLD_SIZE/LOCAL_RANK); "
               "ranks claim shards as they go (a fast rank takes more). Rerun the same command to resume.")
    p.add_argument("--train_shards", nargs="+", required=True,
                   help="image shards as the trainer takes them: directories (a converter output's sources.json "
                        "weights are kept), brace URLs, globs, URL::weight")
    p.add_argument("--output_dir", required=True,
                   help="where the latent shards and latents.json go: a folder or any fsspec URL (s3://, gs://)")
    p.add_argument("--pretrained_model_name_or_path", help="model directory or hub id with a vae/ subfolder")
    p.add_argument("--vae_name_or_path", help="VAE override (path or hub id), as the trainer's flag")
    p.add_argument("--resolution", type=int, default=256, help="training resolution (centre crops) (default: 256)")
    p.add_argument("--min_size", type=int, default=None,
                   help="skip (and count) images whose shorter side is smaller; default: none, smaller images are "
                        "upscaled as in training")
    p.add_argument("--aspect_ratio_buckets", default="off", metavar="auto|FILE|off",
                   help="encode each image at its aspect-ratio bucket, as the trainer's --aspect_ratio_buckets (auto: "
                        "from --resolution and the model's divisor, read from --pretrained_model_name_or_path's unet/ "
                        "config; FILE: one WxH per line); train with the same flag (default: off, squares)")
    p.add_argument("--flip_variants", action="store_true",
                   help="also store the horizontally flipped image's moments, so that --random_flip works")
    p.add_argument("--text_embeddings", action="store_true",
                   help="also store each sample's text conditioning (the model family's prompt encoding, in --dtype) "
                        "and the empty prompt's once, so that training runs no text encoder; needs "
                        "--pretrained_model_name_or_path. Costs 2 x L x D bytes per sample (+ 2 x P for SDXL): SD v1 "
                        "118,272, SD 2.x 157,696, SDXL 317,952 at 77 tokens")
    p.add_argument("--model_max_length", type=int, default=77,
                   help="with --text_embeddings: token length captions are padded/truncated to, as the trainer's flag "
                        "(default: 77)")
    for flag, what in (("--text_encoder_name_or_path", "text encoder"), ("--tokenizer_name", "tokenizer"),
                       ("--text_encoder_2_name_or_path", "SDXL's second text encoder"),
                       ("--tokenizer_2_name", "SDXL's second tokenizer")):
        p.add_argument(flag, default=None, help=f"with --text_embeddings: {what} override, as the trainer's flag")
    p.add_argument("--batch_size", type=int, default=32, help="images per VAE forward on each device (default: 32)")
    p.add_argument("--dtype", choices=sorted(LATENT_DTYPES), default="fp16",
                   help="how the moments are stored (default: fp16)")
    p.add_argument("--vae_dtype", choices=sorted(VAE_DTYPES), default="fp32",
                   help="precision the VAE encoder runs in (default: fp32)")
    p.add_argument("--dataloader_num_workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)),
                   help="image-decoding worker processes per rank (default: cores - 1, at most 8)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--claim_lease_s", type=float, default=600.0,
                   help="a shard claimed by a rank that has not refreshed its claim for this long (a dead rank) is "
                        "encoded by another rank (default: 600)")
    p.add_argument("--disable_tqdm", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p


def main(argv: Optional[list[str]] = None) -> int:
    guard_console()  # no credential of a shard URL reaches the console
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resolution <= 0 or args.resolution % 8 or args.batch_size < 1 or args.dataloader_num_workers < 0:
        parser.error("--resolution must be a positive multiple of 8, --batch_size >= 1, --dataloader_num_workers >= 0")
    if args.min_size is not None and args.min_size < 1:
        parser.error("--min_size must be >= 1")
    if args.model_max_length < 1:
        parser.error("--model_max_length must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return encode(args)
    except (EncodeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The training data pipeline: webdataset shards on local disk or any fsspec URL → rank- and worker-local,
seeded, exactly and elastically resumable batches, every sample once per epoch.

One concern per module:
- ``sources``: ``--train_shards`` → weighted sources with per-shard sample counts (sizes.json, sources.json,
  latents.json read from beside the shards, wherever they are; counting once what no sizes.json lists);
- ``order``: the epoch's global sample order from (seed, epoch, metadata) alone, and the readers' spans of it;
- ``buckets``: aspect-ratio bucket lists (auto, a file) and which bucket a sample goes to;
- ``image_sizes``: image sizes from metadata (sample JSON, image header, the per-shard ``.sizes`` index) and the
  per-run bucket histograms;
- ``bucket_order``: with buckets, the epoch's micro batches of one bucket each, formed over the global order;
- ``reading``: samples out of tar shards on any storage, a shard opened at a member;
- ``transforms``: decode, resize, crop, flip; latent moments; skip accounting;
- ``manifest``: the latent-shard manifest the encoder writes and the trainer checks;
- ``checks``: the metadata beside shards checked against what can be right (``MetadataError``: one line);
- ``loader``: the per-worker dataset and the ``TrainLoader`` the training loop iterates (its state for resume);
- ``index``: ``python -m sd_ds.data.index URL...`` writes the missing sizes.json, member and size indexes once.
"""

from sd_ds.data.checks import MetadataError
from sd_ds.data.loader import DEBUG_KEYS_ENV, ShardStream, TrainLoader, build_train_loader
from sd_ds.data.manifest import (LATENT_COMPATIBLE, LATENT_DTYPES, LATENT_MANIFEST, LATENT_WORK_DIR, MOMENTS,
                                 MOMENTS_FLIPPED, check_latent_manifest, latent_manifest_in_dir)
from sd_ds.data.checks import MetadataError
from sd_ds.data.sources import (ShardSource, UnreadableShardError, check_shard_metadata, count_samples,
                                latent_manifest_of_shards, parse_sources, raise_if_raw_parts, sizes_json_count)
from sd_ds.data.transforms import IMAGE_EXTS, ImageSamples, ImageTransform, LatentSamples, SkipLog, SkipSample

__all__ = [
    "DEBUG_KEYS_ENV", "IMAGE_EXTS", "LATENT_COMPATIBLE", "LATENT_DTYPES", "LATENT_MANIFEST", "LATENT_WORK_DIR",
    "MOMENTS", "MOMENTS_FLIPPED", "MetadataError", "ImageSamples", "ImageTransform", "LatentSamples", "ShardSource", "ShardStream",
    "SkipLog", "SkipSample", "TrainLoader", "UnreadableShardError", "build_train_loader", "check_latent_manifest",
    "check_shard_metadata", "count_samples", "latent_manifest_in_dir", "latent_manifest_of_shards", "parse_sources", "raise_if_raw_parts",
    "sizes_json_count",
]

"""Aspect-ratio buckets: the bucket lists, the bucketed epoch order on metadata alone (against a streaming
bucketer over the global order), and the loader on shards of landscape, portrait and square photos: one bucket per
micro batch, crops and micro-conditioning, exact and elastic resume, sizes from JSON, headers or the size index,
latent shards encoded at their buckets."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_ds.config import DataConfig
from sd_ds.conditioning import CaptionTokenizer
from sd_ds.data import build_train_loader
from sd_ds.data import order as order_lib
from sd_ds.data.bucket_order import BucketedEpoch
from sd_ds.data.buckets import BucketError, BucketList, auto_buckets, model_divisor, read_bucket_file
from sd_ds.data.image_sizes import BucketMeta, read_size_index
from sd_ds.presets import SD_V1_UNET, TINY_UNET, TINY_VAE
from tests.helpers import REPO_ROOT, photo_sample, subprocess_env, take, write_photo_shards
from tests.object_stores import http_server_factory  # noqa: F401 - fixture

RES = 64
BUCKETS = auto_buckets(RES, 16)  # the tiny preset's divisor: 32x128, 48x80, 64x64, 80x48, 128x32
SHAPES = [(128, 64), (64, 128), (96, 96)]  # (width, height): landscape, portrait, square


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from sd_ds.models import CLIP_TOKENIZER_DIR

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)


def shaped_shards(out: Path, shard_sizes: list[int], *, extra: dict | None = None, seed: int = 0) -> dict[str, tuple]:
    """Photo shards whose sample i of shard s is SHAPES[(s + i) % 3] (JSON width/height written); ``extra``
    replaces samples. Returns {key: (width, height)}."""
    rng = random.Random(seed)
    special, sizes = {}, {}
    for s, n in enumerate(shard_sizes):
        for i in range(n):
            key = f"{s * 10_000 + i:09d}"
            sizes[key] = SHAPES[(s + i) % 3]
            special[key] = photo_sample(key, rng, size=sizes[key])
    for key, sample in (extra or {}).items():
        special[key] = sample
        sizes[key] = tuple(json.loads(sample["json"])[k] for k in ("width", "height"))
    write_photo_shards(out, shard_sizes, special=special)
    return sizes


def loader(shards, tokenizer, *, micro_batch_size: int = 4, seed: int = 7, rank: int = 0, world_size: int = 1,
           buckets: BucketList | None = BUCKETS, **fields):
    base = dict(resolution=RES, dataloader_num_workers=0, shuffle_block=8, random_flip=True, caption_dropout_prob=0.2)
    base.update(fields)
    return build_train_loader(DataConfig(train_shards=[str(s) for s in shards], **base),
                              tokenize=CaptionTokenizer((tokenizer,), 77), micro_batch_size=micro_batch_size,
                              seed=seed, rank=rank, world_size=world_size, buckets=buckets)



def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"]
        for name in ("pixel_values", "input_ids", "original_size", "crop_top_left", "target_size"):
            assert torch.equal(x[name], y[name]), name


def bucket_of(width: int, height: int) -> tuple[int, int]:
    return BUCKETS.sizes[int(BUCKETS.assign([width], [height])[0][0])]


# --- bucket lists ------------------------------------------------------------------------------------

def test_auto_lists_are_sdxls_scaled_to_the_resolution_and_the_divisor():
    sdxl = auto_buckets(1024, 64)
    assert len(sdxl) == 41 and {(1024, 1024), (512, 2048), (2048, 512), (832, 1216), (1216, 832), (896, 1152),
                                (1344, 768), (1536, 640)} <= set(sdxl.sizes)
    assert all(w % 64 == 0 and h % 64 == 0 and 0.9 * 1024**2 < w * h <= 1024**2 and 0.25 <= w / h <= 4
               for w, h in sdxl.sizes)
    assert BUCKETS.sizes == ((32, 128), (48, 80), (64, 64), (80, 48), (128, 32))
    assert auto_buckets(256, 64).sizes == ((128, 512), (192, 320), (256, 256), (320, 192), (512, 128))
    assert model_divisor(TINY_VAE, TINY_UNET) == 16
    assert model_divisor({"block_out_channels": [128, 256, 512, 512]}, SD_V1_UNET) == 64
    with pytest.raises(BucketError, match="multiple of the model's divisor 64"):
        auto_buckets(96, 64)


def test_bucket_files_are_validated_in_one_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# width x height\n512x768\n\n768x512  # landscape\n512X512\n")
    assert read_bucket_file(good, 64).sizes == ((512, 768), (512, 512), (768, 512))  # tallest first
    cases = {"side.txt": ("512x768\n520x512\n", r"side.txt:2: 520x512 has a side that is not a multiple of 64 px"),
             "empty.txt": ("# nothing\n\n", "the file lists no WxH bucket"),
             "bad.txt": ("512x768\n512 by 512\n", r"bad.txt:2: '512 by 512' is not WxH"),
             "twice.txt": ("64x64\n64x64\n", "listed twice")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(BucketError, match=message) as e:
            read_bucket_file(tmp_path / name, 64)
        assert "\n" not in str(e.value)


def test_nearest_bucket_in_log_ratio_and_extreme_aspects_clamped():
    index, clamped = BUCKETS.assign([128, 64, 96, 100, 512, 8, 256], [64, 128, 96, 60, 16, 512, 64])
    names = [BUCKETS.sizes[i] for i in index]
    # 2:1 is nearer 5:3 than 4:1 in log ratio; 4:1 itself is on the list (not clamped), 32:1 and 1:64 are beyond.
    assert names == [(80, 48), (48, 80), (64, 64), (80, 48), (128, 32), (32, 128), (128, 32)]
    assert clamped.tolist() == [False, False, False, False, True, True, False]


def test_trainer_rejects_a_bucket_file_in_one_line_exit_2(tmp_path):
    from tests.helpers import make_tiny_model, train_flags

    bad = tmp_path / "buckets.txt"
    bad.write_text("")
    proc = subprocess.run([sys.executable, "-m", "sd_ds.train", "--output_dir", str(tmp_path / "out"),
                           "--train_shards", str(tmp_path), "--aspect_ratio_buckets", str(bad)],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "the file lists no WxH bucket" in proc.stderr.splitlines()[-1], proc.stderr
    # A side that is not a multiple of the model's divisor (16 px for the tiny preset): known once the model is.
    bad.write_text("64x64\n40x40\n")
    shaped_shards(tmp_path / "shards", [3])
    model = make_tiny_model(tmp_path / "model")
    proc = subprocess.run([sys.executable, "-m", "sd_ds.train", *train_flags(
        tmp_path / "out", tmp_path / "shards", model, resolution=RES, aspect_ratio_buckets=bad)],
        cwd=REPO_ROOT, env=subprocess_env({"MASTER_PORT": "0"}), capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert errors == [f"sd_ds.train: error: --aspect_ratio_buckets {bad}:2: 40x40 has a side that is not a multiple "
                      f"of 16 px, the model's divisor (VAE x UNet downsampling)"]


# --- the bucketed order on metadata alone ----------------------------------------------------------------

def random_metadata(seed: int, sources: int, buckets: int = 5, shards: int | None = None):
    rng = np.random.default_rng(seed)
    metas, histograms, urls, members = [], [], [], {}
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05][:buckets])
    for s in range(sources):
        sizes = rng.integers(3, 30, size=int(rng.integers(2, 9))) if shards is None else \
            rng.integers(1, 5, size=shards)
        hist, names = [], []
        for i, n in enumerate(sizes):
            members[f"s{s}/{i}.tar"] = rng.choice(buckets, size=n, p=p / p.sum()).astype(np.uint8)
            names.append(f"s{s}/{i}.tar")
            hist.append(np.bincount(members[names[-1]], minlength=buckets))
        metas.append(order_lib.SourceMeta(f"{s}:x", float(1 + s), tuple(int(n) for n in sizes)))
        histograms.append(np.array(hist))
        urls.append(tuple(names))
    meta = BucketMeta(BucketList(tuple((16 * (b + 1), 16) for b in range(buckets))), histograms, urls,
                      in_memory=members)
    return metas, meta


def streaming_bucketer(epoch_order: order_lib.EpochOrder, meta: BucketMeta, B: int) -> list[tuple[int, list[int]]]:
    """The reference: one reader walks the whole epoch's global order with an open batch per bucket."""
    groups: dict[int, list[int]] = {}
    out = []
    for p in range(epoch_order.length):
        s, k = epoch_order.item(p)
        shard, member, _ = epoch_order.locate(s, k)
        b = int(meta.in_memory[meta.shard_urls[s][shard]][member])
        groups.setdefault(b, []).append(p)
        if len(groups[b]) == B:
            out.append((b, groups.pop(b)))
    return out


@pytest.mark.parametrize("seed", range(9))
def test_bucketed_batches_are_the_streaming_bucketers_from_metadata_alone(seed):
    """Any cut of the ordinals (a reader's span, a resume inside it) gives the batches a single reader streaming
    the whole epoch would form: from histograms, block mixing and a few shards' members, not a replay."""
    # (seed 8: 700 shards a source, past the 256-shard partial sums of a pass's histogram)
    metas, meta = random_metadata(seed, sources=1 + seed % 3, shards=700 if seed == 8 else None)
    B = [1, 2, 4, 8][seed % 4]
    length = sum(m.samples for m in metas) * (2 if seed % 2 else 1) + seed  # several passes of weighted sources
    for epoch in (0, 1):
        def order():
            return order_lib.EpochOrder(metas, seed=seed, epoch=epoch, length=length, block=5 + seed)
        epoch_batches = BucketedEpoch(order(), meta, B)
        reference = streaming_bucketer(order(), meta, B)
        G = epoch_batches.total_batches()
        assert G == len(reference)
        cuts = sorted({0, G, *np.random.default_rng(seed).integers(0, G + 1, size=5).tolist()})
        served = []
        for a, b in zip(cuts, cuts[1:]):
            read: set[int] = set()
            for plan in BucketedEpoch(order(), meta, B).walk(a, b):
                read.update(plan.read)
                for ordinal, bucket, members in plan.batches:
                    assert set(members) <= read  # every member was read, by the end of its batch's block
                    served.append((ordinal, bucket, members))
        assert [o for o, _, _ in served] == list(range(G))
        assert [(b, m) for _, b, m in served] == reference
        # Unserved: each bucket's last partial batch only.
        per_bucket = epoch_batches.samples_per_bucket()
        assert length - B * G == int((per_bucket % B).sum()) < len(meta.buckets) * B


def test_bucketed_elastic_remainder_serves_the_rest_once():
    metas, meta = random_metadata(3, sources=2)
    order = order_lib.EpochOrder(metas, seed=1, epoch=0, length=sum(m.samples for m in metas), block=9)
    epoch = BucketedEpoch(order, meta, 2)
    G = epoch.total_batches()
    intervals = [(0, G)]
    span = order_lib.span_length(G, 4, 1)
    consumed = {0: 3, 1: 0, 2: span, 3: 1}
    first = [o for x in range(4) for a, b in order_lib.cut(order_lib.reader_span(intervals, x, 4, span), 0, consumed[x])
             for o in range(a, b)]
    left = order_lib.remaining(intervals, 4, span, consumed)
    span2 = order_lib.span_length(order_lib.total(left), 3, 1)
    second = [o for x in range(3) for a, b in order_lib.reader_span(left, x, 3, span2) for o in range(a, b)]
    positions = [p for a, b in order_lib.cut(intervals, 0, G) for plan in epoch.walk(a, b)
                 for o, _, members in plan.batches if o in set(first + second) for p in members]
    assert len(first + second) == len(set(first + second)) > G - 3 - 4  # < one batch per reader left, each cut
    assert len(positions) == len(set(positions))  # no sample twice


def test_scale_simulation_runs_and_global_bucketing_meets_its_bound():
    """bench/bench_buckets_plan.py at a reduced scale (the full 40,000 shards x 4,096 readers are in BENCHMARKS.md)."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_buckets_plan.py"), "--shards", "100",
                           "--ranks", "8", "--workers", "2", "--probe_readers", "2", "--no_write"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ")}
    number = lambda cell: int(cell.strip().split(" ")[0].replace(",", ""))  # noqa: E731
    per_reader, global_ = number(rows["per reader (each reader buckets its own span)"][2]), \
        number(rows["global (sd_ds.data.bucket_order)"][2])
    bound = int(rows["global (sd_ds.data.bucket_order)"][4].split("=")[1].split("(")[0].replace(",", ""))
    assert global_ < bound and global_ < per_reader


# --- the loader --------------------------------------------------------------------------------------

def test_one_bucket_per_micro_batch_every_sample_once_across_ranks_and_workers(tmp_path, tokenizer, caplog):
    wide = {f"{20_000 + i:09d}": photo_sample(f"{20_000 + i:09d}", random.Random(i), size=(320, 40))
            for i in (1, 3, 5, 9, 13)}
    sizes = shaped_shards(tmp_path, [16, 14, 15], extra=wide)  # 45 samples, five of 8:1 (beyond 4:1)
    served, shapes = [], set()
    with caplog.at_level(logging.INFO, logger="sd_ds.data"):
        loaders = [loader([tmp_path], tokenizer, rank=r, world_size=2, dataloader_num_workers=2) for r in (0, 1)]
    assert "aspect-ratio buckets, one per micro batch" in caplog.text
    for data in loaders:
        for batch in take(data, data.batches_per_epoch):
            px = batch["pixel_values"]
            shapes.add(tuple(px.shape[2:]))
            # One bucket per batch: every sample's own bucket is the batch's size, its micro-conditioning says so.
            assert {bucket_of(*sizes[k])[::-1] for k in batch["keys"]} == {tuple(px.shape[2:])}
            assert batch["target_size"].tolist() == [list(px.shape[2:])] * 4
            assert batch["original_size"].tolist() == [list(sizes[k][::-1]) for k in batch["keys"]]
            served += batch["keys"]
        assert data.epoch == 0 and data.stats() == {"aspect_clamped": 5}
    assert shapes == {(48, 80), (80, 48), (64, 64), (32, 128)}  # landscape, portrait, square; 8:1 clamped to 4:1
    assert len(served) == len(set(served))  # no sample twice
    per_bucket = {b: sum(bucket_of(*s) == b for s in sizes.values()) for b in BUCKETS.sizes}
    assert len(sizes) - len(served) < 4 * (1 + len(per_bucket))  # < B per bucket + < one batch per reader


def cover_resized(img: Image.Image, target: tuple[int, int]) -> list[np.ndarray]:
    """The image resized (whole, LANCZOS, both 1-D pass orders) to cover ``target`` = (width, height)."""
    w, h = img.size
    scale = max(target[0] / w, target[1] / h)
    size = (max(target[0], round(w * scale)), max(target[1], round(h * scale)))
    img = img.convert("RGB")
    return [np.asarray(img.resize((size[0], h), Image.Resampling.LANCZOS).resize(size, Image.Resampling.LANCZOS),
                       dtype=np.float32).transpose(2, 0, 1),
            np.asarray(img.resize((w, size[1]), Image.Resampling.LANCZOS).resize(size, Image.Resampling.LANCZOS),
                       dtype=np.float32).transpose(2, 0, 1)]


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """The same crop: Pillow's window resize rounds a few percent of the pixels differently between its two 1-D
    passes (a few 8-bit levels, more at clipped edges; sd_ds.data.transforms), another crop differs everywhere."""
    d = np.abs(a.astype(np.float32) - b)
    return bool(np.mean(d > 1) < 0.05 and d.max() <= 32)


def test_crops_cover_the_bucket_and_micro_conditioning_says_where(tmp_path, tokenizer):
    """Each sample is its image resized to cover the bucket and cropped at crop_top_left; a flipped one is the
    mirror of the crop at the mirrored left (resized width - left - crop width)."""
    import io

    import webdataset as wds

    shaped_shards(tmp_path, [9, 9])
    originals = {s["__key__"]: Image.open(io.BytesIO(s[next(e for e in ("jpg", "png", "webp") if e in s)]))
                 for s in wds.DataPipeline(wds.SimpleShardList(sorted(map(str, tmp_path.glob("*.tar")))),
                                           wds.tarfile_to_samples())}
    flips, lefts = set(), set()
    for center in (False, True):
        for batch in take(loader([tmp_path], tokenizer, center_crop=center, micro_batch_size=3), 6):
            for key, px, (top, left), (th, tw) in zip(batch["keys"], batch["pixel_values"].numpy(),
                                                      batch["crop_top_left"].tolist(), batch["target_size"].tolist()):
                full = cover_resized(originals[key], (tw, th))
                rw = full[0].shape[2]
                plain = any(close(px, f[:, top:top + th, left:left + tw]) for f in full)
                mirror = rw - left - tw
                flipped = any(close(px[:, :, ::-1], f[:, top:top + th, mirror:mirror + tw]) for f in full)
                assert plain or flipped, key
                flips.add(flipped and not plain)
                lefts.add((center, left if plain else mirror))
                if center:
                    assert (top, left if plain else mirror) == (round((full[0].shape[1] - th) / 2),
                                                                round((rw - tw) / 2))
    assert flips == {False, True}  # random flips, each with its mirrored left


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bucketed_resume_is_exact_across_an_epoch_boundary(tmp_path, tokenizer, num_workers):
    bad = {"000000004": {"jpg": b"not an image", "txt": "x", "json": json.dumps({"width": 128, "height": 64})}}
    shaped_shards(tmp_path, [13, 11, 12], extra=bad)
    kw = dict(dataloader_num_workers=num_workers, micro_batch_size=3)
    reference = loader([tmp_path], tokenizer, **kw)
    per_epoch = reference.batches_per_epoch
    n, m = 4, per_epoch  # 4 + one epoch's worth crosses into epoch 1
    everything = take(reference, n + m)
    first = loader([tmp_path], tokenizer, **kw)
    assert_same_batches(take(first, n), everything[:n])
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader([tmp_path], tokenizer, **kw)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, m), everything[n:])
    assert resumed.epoch == reference.epoch == 1
    skipped = reference.stats()["undecodable"]  # the bad sample, once in each epoch that reached its batch
    assert resumed.stats() == reference.stats() and skipped >= 1
    # Its place in its batch is taken by a good sample of the same batch (a repeat), the batch keeps its bucket.
    short = [b for b in everything if len(set(b["keys"])) < 3]
    assert len(short) == skipped and all(b["pixel_values"].shape[2:] == (48, 80) for b in short)


def test_bucketed_elastic_resume_two_ranks_to_one_serves_no_sample_twice(tmp_path, tokenizer, caplog):
    shaped_shards(tmp_path, [16, 16, 16])
    first = [loader([tmp_path], tokenizer, rank=r, world_size=2, micro_batch_size=2) for r in (0, 1)]
    served = [k for data in first for b in take(data, 3) for k in b["keys"]]
    states = [json.loads(json.dumps(data.state_dict())) for data in first]
    second = loader([tmp_path], tokenizer, micro_batch_size=2, dataloader_num_workers=2)
    with caplog.at_level(logging.INFO, logger="sd_ds.data"):
        second.load_state_dict(states[0], every_rank=lambda: states)
    assert "elastic data resume" in caplog.text and "batches its readers had not consumed" in caplog.text
    served += [k for b in take(second, second.batches_per_epoch) for k in b["keys"]]
    assert second.epoch == 0
    assert len(served) == len(set(served)) >= 48 - 2 * 2 * 2 - 3 * 2  # no sample twice; the bounded remainder

    other = loader([tmp_path], tokenizer, micro_batch_size=4, dataloader_num_workers=2)  # other batches now
    with caplog.at_level(logging.WARNING, logger="sd_ds.data"):
        other.load_state_dict(states[0], every_rank=lambda: states)
    assert "micro_batch_size=2 (now 4)" in caplog.text and "restarts" in caplog.text


def test_sizes_from_the_index_json_or_header_give_the_same_batches(tmp_path, tokenizer,
                                                                   http_server_factory):  # noqa: F811
    import webdataset as wds

    from sd_ds.data.index import main as index_main

    sizes = shaped_shards(tmp_path / "json", [10, 11])
    reference = take(loader([tmp_path / "json"], tokenizer), 4)
    # Without JSON members: the image headers say the same sizes.
    raw = tmp_path / "headers"
    raw.mkdir()
    for shard in sorted((tmp_path / "json").glob("*.tar")):
        with wds.TarWriter(str(raw / shard.name)) as sink:
            for s in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()):
                sink.write({k: v for k, v in s.items() if k not in ("json", "__url__", "__local_path__")})
    (raw / "sizes.json").write_text((tmp_path / "json" / "sizes.json").read_text())
    assert [b["keys"] for b in take(loader([raw], tokenizer), 4)] == [b["keys"] for b in reference]
    # The size index, written once by the index command, gives them without reading a shard (served over HTTP).
    assert index_main([str(tmp_path / "json")]) == 0
    rows = read_size_index(str(tmp_path / "json" / "00001.tar"))
    assert [tuple(r[:2]) for r in rows] == [sizes[f"{10_000 + i:09d}"] for i in range(11)]
    http = http_server_factory(tmp_path / "json")
    indexed = loader([http.url()], tokenizer)
    assert not [r for r in http.requests if r[1].endswith(".tar")]  # built from sizes.json and the .sizes files
    assert indexed.dataset.bucket_meta.in_memory == {}  # members' buckets read from the index when needed
    assert_same_batches(take(indexed, 4), reference)


def _bucket_meta_on_rank(rank: int, world_size: int, port: int, url: str, out: str) -> None:
    import torch.distributed as dist

    from sd_ds.lifecycle import end_process
    from sd_ds.data.image_sizes import build_bucket_meta
    from sd_ds.data.sources import parse_sources

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)

    def all_reduce(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    meta = build_bucket_meta(parse_sources([url]), BUCKETS, rank=rank, world_size=world_size, all_reduce=all_reduce)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"histograms": [h.tolist() for h in meta.histograms],
                   "members": {u.rsplit("/", 1)[-1]: m.tolist() for u, m in meta.in_memory.items()}}, f)
    dist.destroy_process_group()
    end_process()  # gloo threads can abort a finalizing interpreter (sd_ds.lifecycle.end_process)


def test_shards_without_a_size_index_are_read_once_per_run_not_per_rank(tmp_path, http_server_factory):  # noqa: F811
    """Two real ranks (gloo) build the bucket metadata from HTTP shards without .sizes: each shard is read by one
    rank, and both ranks get every shard's histogram and members' buckets."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    sizes = shaped_shards(tmp_path / "raw", [5, 7, 6, 4, 8])
    http = http_server_factory(tmp_path / "raw")
    out = str(tmp_path / "meta")
    mp.spawn(_bucket_meta_on_rank, args=(2, free_port(), http.url(), out), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"meta.{r}").read_text()) for r in (0, 1)]
    assert results[0] == results[1]
    members = results[0]["members"]
    assert sorted(members) == [f"{i:05d}.tar" for i in range(5)]
    for shard, buckets in members.items():
        keys = [f"{int(shard[:5]) * 10_000 + i:09d}" for i in range(len(buckets))]
        assert [BUCKETS.sizes[b] for b in buckets] == [bucket_of(*sizes[k]) for k in keys]
    shard_gets = [path for method, path, n in http.requests if path.endswith(".tar") and method == "GET"]
    assert sorted(shard_gets) == [f"/{i:05d}.tar" for i in range(5)]  # one read per shard, by one rank


def test_square_runs_and_other_lists_do_not_resume_bucketed_positions(tmp_path, tokenizer, caplog):
    shaped_shards(tmp_path, [12, 12])
    bucketed = loader([tmp_path], tokenizer)
    take(bucketed, 2)
    state = bucketed.state_dict()
    square = loader([tmp_path], tokenizer, buckets=None)
    with caplog.at_level(logging.WARNING, logger="sd_ds.data"):
        square.load_state_dict(state)
    assert "restarts from its beginning" in caplog.text
    assert square.state_dict()["intervals"] == [[0, 24]]  # squares: positions again


# --- latent shards -------------------------------------------------------------------------------------

def test_latent_shards_encoded_at_their_buckets_train_on_the_same_buckets(tmp_path, tokenizer):
    from sd_ds.data import latent_manifest_of_shards
    from sd_ds.encode_latents import main as encode_main
    from tests.helpers import make_tiny_model

    images, latents = tmp_path / "images", tmp_path / "latents"
    shaped_shards(images, [9, 8])
    model = make_tiny_model(tmp_path / "model")
    flags = ["--train_shards", str(images), "--output_dir", str(latents), "--resolution", str(RES),
             "--aspect_ratio_buckets", "auto", "--flip_variants", "--batch_size", "2", "--dataloader_num_workers", "0",
             "--disable_tqdm"]
    assert encode_main(flags + ["--vae_name_or_path", str(model / "vae")]) == 2  # the divisor needs the UNet's config
    assert encode_main(flags + ["--pretrained_model_name_or_path", str(model)]) == 0
    manifest = latent_manifest_of_shards([str(latents)])
    assert manifest["buckets"] == BUCKETS.to_json()
    assert len(read_size_index(str(latents / "00001.tar"))) == 8  # the trainer's bucket metadata, written with it
    kw = dict(center_crop=True, random_flip=False, caption_dropout_prob=0.0, micro_batch_size=3)
    from_images, from_latents = take(loader([images], tokenizer, **kw), 5), take(loader([latents], tokenizer, **kw), 5)
    for image_batch, latent_batch in zip(from_images, from_latents):
        assert image_batch["keys"] == latent_batch["keys"]  # the same batches: the same buckets from the same sizes
        h, w = image_batch["pixel_values"].shape[2:]
        assert latent_batch["latent_moments"].shape == (3, 8, h // 4, w // 4)  # the tiny VAE: 4x, 4 channels
        for name in ("original_size", "crop_top_left", "target_size"):
            assert torch.equal(latent_batch[name], image_batch[name]), name
    assert {tuple(b["latent_moments"].shape[2:]) for b in from_latents} == {(12, 20), (20, 12), (16, 16)}
    flipped = take(loader([latents], tokenizer, **{**kw, "random_flip": True}), 5)
    assert [b["keys"] for b in flipped] == [b["keys"] for b in from_latents]

    with pytest.raises(ValueError, match=r"were encoded with aspect-ratio buckets 32x128,.*, this run trains with "
                                         r"squares \(--aspect_ratio_buckets off\)"):
        loader([latents], tokenizer, buckets=None)
    with pytest.raises(ValueError, match="this run trains with aspect-ratio buckets 64x64"):
        loader([latents], tokenizer, buckets=BucketList(((64, 64),)))


# --- end to end: run.sh, 2 CPU ranks ---------------------------------------------------------------------

def batch_log(keys_dir: Path, what: str, rank: int) -> list[list[str]]:
    """The lines of a rank's SD_DS_DATA_KEYS log (``keys`` or ``shapes``): one per micro batch, epoch first."""
    path = keys_dir / f"{what}.rank{rank}.txt"
    return [line.split() for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_two_ranks_train_on_buckets_resume_exactly_elastically_and_on_latent_shards(tmp_path):
    """128x64, 64x128 and 96x96 photos at --resolution 64 --aspect_ratio_buckets auto on 2 CPU ranks (run.sh,
    tiny model: 16 px divisor): the UNet sees 12x20 and 20x12 latents (48x80 and 80x48 px, about 64x64's area) and
    16x16, one bucket per micro batch; a run stopped at step 4 and resumed gives the uninterrupted run's batches and
    losses; the step-4 checkpoint resumed on 1 rank serves no sample twice; latent shards encoded with the flag
    train on the same batches."""
    import shutil

    from sd_ds.data import DEBUG_KEYS_ENV
    from tests.helpers import make_tiny_model, run_sh, scalars, train_flags

    shards, model = tmp_path / "shards", make_tiny_model(tmp_path / "model")
    sizes = shaped_shards(shards, [20, 20, 20])  # 20 of each shape; micro batch 2: 30 batches an epoch
    steps = 8

    def run(out: Path, *, nproc: int = 2, data: Path = shards, **kw) -> list[float]:
        flags = train_flags(out, data, model, **{"resolution": RES, "aspect_ratio_buckets": "auto", "bf16": "False",
                                                 "per_device_train_batch_size": 2, "max_steps": steps, "save_steps": 4,
                                                 "random_flip": "True", **kw})
        run_sh(flags, nproc=nproc, timeout=900, extra_env={DEBUG_KEYS_ENV: str(out / "batches")})
        return [v for _, v in scalars(out / "runs", "train/loss")]

    full = run(tmp_path / "full", image_logging_steps=steps, num_inference_steps=2)
    assert len(full) == steps
    # Image logging draws the step's batch captions at its bucket: a non-square grid of 2 (the micro batch).
    last_shape = batch_log(tmp_path / "full/batches", "shapes", 0)[-1][1]
    height, width = map(int, last_shape.split("x"))
    with Image.open(tmp_path / f"full/samples/step_{steps:08d}_samples_guidance_1.png") as grid:
        assert grid.size == (2 * width, height)
    for rank in (0, 1):
        keys, shapes = batch_log(tmp_path / "full/batches", "keys", rank), batch_log(tmp_path / "full/batches",
                                                                                   "shapes", rank)
        assert len(keys) == len(shapes) == steps
        for (epoch, *batch), (_, shape) in zip(keys, shapes):
            height, width = map(int, shape.split("x"))
            # One bucket per micro batch: each sample's own bucket is the batch's size.
            assert {bucket_of(*sizes[k]) for k in batch} == {(width, height)}, (batch, shape)
            assert abs(height * width - RES * RES) <= 0.1 * RES * RES  # about 64x64's area
    seen = {s for r in (0, 1) for _, s in batch_log(tmp_path / "full/batches", "shapes", r)}
    assert {"48x80", "80x48"} <= seen <= {"48x80", "80x48", "64x64"}  # landscape and portrait (latents 12x20, 20x12)

    # Stopped at step 4 (a run that ends there, checkpoint-4), then resumed: the uninterrupted batches and losses.
    stopped = tmp_path / "stopped"
    first_half = run(stopped, max_steps=4)
    shutil.copytree(stopped, tmp_path / "elastic")
    second_half = run(stopped)
    assert first_half + second_half[-4:] == full
    for rank in (0, 1):
        assert batch_log(stopped / "batches", "keys", rank) == batch_log(tmp_path / "full/batches", "keys", rank)

    # The step-4 checkpoint resumed on 1 rank: the epoch continues with what the 2 ranks had not consumed.
    run(tmp_path / "elastic", nproc=1)
    before = [k for r in (0, 1) for _, *batch in batch_log(tmp_path / "full/batches", "keys", r)[:4] for k in batch]
    after = [k for epoch, *batch in batch_log(tmp_path / "elastic/batches", "keys", 0)[4:] for k in batch]
    assert len(after) == 8 and len(before + after) == len(set(before + after))  # no sample twice

    # Latent shards encoded with the flag: the same batches, at the bucket's latent size (the tiny VAE: 4x).
    latents = tmp_path / "latents"
    subprocess.run([sys.executable, "-m", "sd_ds.encode_latents", "--train_shards", str(shards), "--output_dir",
                    str(latents), "--pretrained_model_name_or_path", str(model), "--resolution", str(RES),
                    "--aspect_ratio_buckets", "auto", "--flip_variants", "--dataloader_num_workers", "0",
                    "--disable_tqdm"], cwd=REPO_ROOT, env=subprocess_env(), check=True, capture_output=True,
                   timeout=600)
    run(tmp_path / "on_latents", data=latents, max_steps=3)
    for rank in (0, 1):
        assert batch_log(tmp_path / "on_latents/batches", "keys", rank) == \
            batch_log(tmp_path / "full/batches", "keys", rank)[:3]
        pixel_shapes = [s for _, s in batch_log(tmp_path / "full/batches", "shapes", rank)[:3]]
        latent_shapes = [s for _, s in batch_log(tmp_path / "on_latents/batches", "shapes", rank)]
        assert latent_shapes == ["x".join(str(int(v) // 4) for v in s.split("x")) for s in pixel_shapes]

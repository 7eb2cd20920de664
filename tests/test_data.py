"""The training data pipeline on converter-layout webdataset shards written at test time."""

from __future__ import annotations

import gzip
import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_ds.config import DataConfig
from sd_ds.conditioning import CaptionTokenizer
from sd_ds.data import ImageTransform, build_train_loader, raise_if_raw_parts
from tests.helpers import encode_image, photo_sample, photos, take, write_photo_shards

RES = 32  # training resolution in these tests; images are 36..80 px photo crops


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from sd_ds.models import CLIP_TOKENIZER_DIR

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)


def loader(shards, tokenizer, *, micro_batch_size: int = 4, seed: int = 7, rank: int = 0, world_size: int = 1,
           **data_fields):
    """build_train_loader as the trainer calls it; data_fields override DataConfig's fields."""
    fields = dict(resolution=RES, dataloader_num_workers=0, shuffle_block=8, random_flip=True,
                  caption_dropout_prob=0.2)
    fields.update(data_fields)
    return build_train_loader(DataConfig(train_shards=[str(s) for s in shards], **fields),
                              tokenize=CaptionTokenizer((tokenizer,), 77), micro_batch_size=micro_batch_size,
                              seed=seed, rank=rank, world_size=world_size)



def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"]
        assert x["captions"] == y["captions"]
        assert torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["pixel_values"], y["pixel_values"])


# --- batches and transforms --------------------------------------------------------------------------

def test_batch_layout_range_and_tokens(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [10, 10])
    batch = take(loader([tmp_path], tokenizer, caption_dropout_prob=0.0), 1)[0]
    px = batch["pixel_values"]
    # uint8 to the device (4x fewer bytes than fp32); the trainer normalises there as x / 127.5 - 1.
    assert px.shape == (4, 3, RES, RES) and px.dtype == torch.uint8
    assert px.min() < 64 and px.max() > 192  # real photos span most of [0, 255]
    assert batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == torch.long
    assert batch["captions"] == [f"a photo number {k}" for k in batch["keys"]]
    expected = tokenizer(batch["captions"], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    assert torch.equal(batch["input_ids"], expected)
    # SDXL's micro-conditioning per sample, int64 [B, 2] (height, width) / (top, left): here square crops.
    assert set(batch) == {"pixel_values", "input_ids", "empty_caption", "captions", "keys", "original_size",
                          "crop_top_left", "target_size"}  # internal fields removed
    assert batch["empty_caption"].tolist() == [c == "" for c in batch["captions"]]
    for name in ("original_size", "crop_top_left", "target_size"):
        assert batch[name].shape == (4, 2) and batch[name].dtype == torch.int64
    assert batch["target_size"].tolist() == [[RES, RES]] * 4

    dropped = take(loader([tmp_path], tokenizer, caption_dropout_prob=1.0), 1)[0]
    assert dropped["captions"] == [""] * 4
    assert torch.equal(dropped["input_ids"], tokenizer([""] * 4, padding="max_length", max_length=77,
                                                       return_tensors="pt").input_ids)


def test_caption_dropout_rate(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [40, 40])
    batches = take(loader([tmp_path], tokenizer, caption_dropout_prob=0.3, micro_batch_size=8), 10)
    dropped = sum(c == "" for b in batches for c in b["captions"])
    assert 12 <= dropped <= 36  # 80 draws at p=0.3: mean 24, sd 4.1


def resized(img: Image.Image) -> list[np.ndarray]:
    """The seed's resize done the plain way (whole image, shorter side to int(R/0.9), LANCZOS), as floats 0..255.
    Pillow resizes in two 1-D passes and may order them either way for a crop window, which changes the
    8-bit rounding between the passes: both orders are returned, the pipeline must match one of them."""
    target = int(RES / 0.9)
    w, h = img.size
    size = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
    img = img.convert("RGB")
    horizontal_first = img.resize((size[0], h), Image.Resampling.LANCZOS).resize(size, Image.Resampling.LANCZOS)
    vertical_first = img.resize((w, size[1]), Image.Resampling.LANCZOS).resize(size, Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(horizontal_first), np.asarray(img.resize(size, Image.Resampling.LANCZOS)))
    return [np.asarray(x, dtype=np.float32).transpose(2, 0, 1) for x in (horizontal_first, vertical_first)]


ONE_STEP = 1.0  # within one 8-bit step (float rounding of the crop window's coordinates)


def crop_matches(px: np.ndarray, full: list[np.ndarray], top: int, left: int) -> bool:
    return any(np.abs(px.astype(np.float32) - f[:, top:top + RES, left:left + RES]).max() <= ONE_STEP for f in full)


def images_by_key(shard_dir: Path) -> dict[str, Image.Image]:
    import webdataset as wds

    out = {}
    for sample in wds.DataPipeline(wds.SimpleShardList(sorted(map(str, shard_dir.glob("*.tar")))),
                                   wds.tarfile_to_samples()):
        ext = next(e for e in ("jpg", "png", "webp") if e in sample)
        out[sample["__key__"]] = Image.open(io.BytesIO(sample[ext]))
    return out


def test_center_crop_matches_plain_resize_then_crop_and_is_deterministic(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [8, 8])
    originals = images_by_key(tmp_path)
    a = take(loader([tmp_path], tokenizer, center_crop=True, random_flip=False, seed=1), 4)
    b = take(loader([tmp_path], tokenizer, center_crop=True, random_flip=False, seed=2), 4)
    by_key_a = {k: px for batch in a for k, px in zip(batch["keys"], batch["pixel_values"])}
    by_key_b = {k: px for batch in b for k, px in zip(batch["keys"], batch["pixel_values"])}
    assert [batch["keys"] for batch in a] != [batch["keys"] for batch in b]  # other seed, other order
    assert by_key_a.keys() == by_key_b.keys() == originals.keys()
    for key, px in by_key_a.items():
        assert torch.equal(px, by_key_b[key])  # no randomness in a center crop
        full = resized(originals[key])
        top, left = round((full[0].shape[1] - RES) / 2), round((full[0].shape[2] - RES) / 2)
        assert crop_matches(px.numpy(), full, top, left)


def test_random_crop_and_flip_are_crops_of_the_resized_image(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [8, 8])
    originals = images_by_key(tmp_path)
    batches = take(loader([tmp_path], tokenizer, random_flip=True), 4)
    offsets, flips = set(), set()
    for batch in batches:
        for key, px in zip(batch["keys"], batch["pixel_values"].numpy()):
            full = resized(originals[key])
            matches = [(top, left, flip) for top in range(full[0].shape[1] - RES + 1)
                       for left in range(full[0].shape[2] - RES + 1) for flip in (False, True)
                       if crop_matches(px[:, :, ::-1] if flip else px, full, top, left)]
            assert matches, f"{key}: not a crop of the resized image"
            offsets.add(matches[0][:2])
            flips.add(matches[0][2])
    assert len(offsets) > 3 and flips == {False, True}  # random, not fixed


def test_small_images_are_upscaled_unless_min_size_skips_them(tmp_path, tokenizer):
    rng = random.Random(3)
    small = {f"{i:09d}": photo_sample(f"{i:09d}", rng, size=(60, 24)) for i in (1, 4, 7, 9)}
    keys = write_photo_shards(tmp_path, [12], special=small)
    originals = images_by_key(tmp_path)

    # Default, as the seed's transform: the shorter side is upscaled to int(R / 0.9), nothing is skipped.
    data = loader([tmp_path], tokenizer, shuffle_block=1, center_crop=True, random_flip=False)
    by_key = {k: px for b in take(data, 3) for k, px in zip(b["keys"], b["pixel_values"].numpy())}
    assert set(by_key) == set(keys) and data.stats() == {}
    for key in small:
        full = resized(originals[key])
        assert full[0].shape[1:] == (35, 87)  # 24 px upscaled to 35, not skipped
        assert crop_matches(by_key[key], full, round((35 - RES) / 2), round((87 - RES) / 2))

    # Opt-in: --min_size skips them and counts them. (The epoch's 12 positions hold 8 big ones: the first two
    # batches serve them; a skipped sample's place in the batches is taken by a repeat at the end of the span.)
    strict = loader([tmp_path], tokenizer, shuffle_block=1, min_size=RES)
    seen = {k for b in take(strict, 2) for k in b["keys"]}
    assert seen == set(keys) - set(small)
    assert strict.stats() == {"too_small": 4}


def test_corrupt_samples_are_skipped_counted_and_warned_about_sparingly(tmp_path, tokenizer, caplog):
    rng = random.Random(4)
    jpeg = encode_image(photos()[1].resize((64, 48)), "JPEG")
    special = {}
    for i in range(0, 28, 2):  # 14 undecodable: random bytes or a truncated image
        blob = bytes(rng.getrandbits(8) for _ in range(300)) if i % 4 else jpeg[: len(jpeg) // 2]
        special[f"{i:09d}"] = {"jpg": blob, "txt": "broken"}
    special.update({f"{i:09d}": {"txt": "no image", "json": "{}"} for i in (29, 31)})
    special.update({f"{i:09d}": {"png": encode_image(photos()[0].resize((50, 50)), "PNG")} for i in (33, 35)})
    keys = write_photo_shards(tmp_path, [40 + 6], special=special)  # 18 bad, 28 good; the last sample is good
    caplog.set_level(logging.WARNING, logger="sd_ds.data")
    # Shuffle block 1: the samples in shard order, 46 positions for 23 batches of 2; the 28 good ones fill 14.
    data = loader([tmp_path], tokenizer, shuffle_block=1, micro_batch_size=2)
    seen = {k for b in take(data, 14) for k in b["keys"]}
    assert seen == set(keys) - set(special)
    assert data.stats() == {"undecodable": 14, "missing_image": 2, "missing_caption": 2}
    warnings = [r for r in caplog.records if r.name == "sd_ds.data" and r.levelno == logging.WARNING]
    # Per reason: the first three, then the 10th, 100th, ...: 4 for the 14 undecodable, 2 + 2 for the others.
    assert len(warnings) == 8
    assert sum("undecodable" in r.getMessage() for r in warnings) == 4


def test_truncated_shard_warns_and_continues(tmp_path, tokenizer):
    keys = write_photo_shards(tmp_path, [10, 10])
    shard = tmp_path / "00001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    data = loader([tmp_path], tokenizer)  # sizes.json still says 10 + 10: the missing ones are passed over
    seen = {k for b in take(data, 3) for k in b["keys"]}
    assert {k[:5] for k in seen} == {"00000", "00001"}  # the readable part of the broken shard is used
    assert seen <= set(keys) and data.stats().get("tar_errors", 0) >= 1


def test_unusable_data_is_an_error_not_a_hang(tmp_path, tokenizer):
    rng = random.Random(5)
    write_photo_shards(tmp_path / "small", [4, 4], special={f"{s * 10_000 + i:09d}": photo_sample("s", rng, size=(20, 20))
                                                      for s in range(2) for i in range(4)})
    with pytest.raises(RuntimeError, match="in a row were unusable"):
        take(loader([tmp_path / "small"], tokenizer, min_size=RES), 1)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for i in range(2):  # big enough for 8 samples (512 bytes each at the least: sizes.json is checked against it)
        (garbage / f"{i:05d}.tar").write_bytes(b"this is not a tar file" * 250)
    (garbage / "sizes.json").write_text(json.dumps({"00000.tar": 8, "00001.tar": 8}))
    with pytest.raises(RuntimeError, match="no readable sample"):  # raised in a worker, re-raised here
        take(loader([garbage], tokenizer, dataloader_num_workers=2), 1)


@pytest.mark.parametrize("bad", ["zero_bytes", "not_a_tar"])
def test_unreadable_shard_without_sizes_json_is_named_skipped_and_counted(tmp_path, tokenizer, caplog, bad):
    keys = write_photo_shards(tmp_path, [6, 6, 6], sizes_json=False)
    broken = tmp_path / "00001.tar"
    broken.write_bytes(b"" if bad == "zero_bytes" else b"this is not a tar file" * 50)
    with caplog.at_level(logging.WARNING, logger="sd_ds.data"):
        data = loader([tmp_path], tokenizer, caption_dropout_prob=0.0)
    assert str(broken) in caplog.text  # the warning names the shard
    assert data.batches_per_epoch == 3  # the 12 samples of the two readable shards
    seen = {k for b in take(data, 3) for k in b["keys"]}
    assert seen == {k for k in keys if not k.startswith("00001")}
    assert data.stats() == {"unreadable_shards": 1}

    resumed = loader([tmp_path], tokenizer, caption_dropout_prob=0.0)
    resumed.load_state_dict(data.state_dict())
    assert resumed.stats() == {"unreadable_shards": 1}  # counted once, not once per resume

    for i in (0, 2):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="no shard with a readable sample") as e:
        loader([tmp_path], tokenizer)
    assert all(f"{tmp_path / f'{i:05d}.tar'}: not a readable tar" in str(e.value) for i in range(3))


# --- determinism and exact resume --------------------------------------------------------------------

def bad_samples(rng: random.Random, shard_sizes: list[int]) -> dict[str, dict]:
    """A few corrupt and too-small samples so that resume has to account for skipped raw samples."""
    out = {}
    for shard, n in enumerate(shard_sizes):
        for i in rng.sample(range(n), 2):
            out[f"{shard * 10_000 + i:09d}"] = ({"jpg": b"not an image", "txt": "x"} if i % 2 else
                                                photo_sample("s", rng, size=(20, 60)))
    return out


def test_same_seed_same_batches_other_seed_other_batches(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [12, 12, 12])
    a = take(loader([tmp_path], tokenizer, seed=5), 4)
    assert_same_batches(a, take(loader([tmp_path], tokenizer, seed=5), 4))
    assert [b["keys"] for b in a] != [b["keys"] for b in take(loader([tmp_path], tokenizer, seed=6), 4)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_across_an_epoch_boundary(tmp_path, tokenizer, num_workers):
    sizes = [13, 11, 12, 12]
    write_photo_shards(tmp_path, sizes, special=bad_samples(random.Random(1), sizes))
    kw = dict(dataloader_num_workers=num_workers, caption_dropout_prob=0.3, min_size=RES)  # skips the small ones
    reference_run = loader([tmp_path], tokenizer, **kw)
    assert reference_run.batches_per_epoch == 12  # 48 samples / 4 (rounded down to whole batches per worker)
    n, m = 5, 10  # 5 + 10 crosses into epoch 1
    everything = take(reference_run, n + m)
    first = loader([tmp_path], tokenizer, **kw)
    head = take(first, n)  # the workers prefetched more than this
    state = json.loads(json.dumps(first.state_dict()))  # what the trainer saves
    assert_same_batches(head, everything[:n])

    resumed = loader([tmp_path], tokenizer, **kw)
    resumed.load_state_dict(state)
    tail = take(resumed, m)
    assert_same_batches(tail, everything[n:])
    assert resumed.epoch == reference_run.epoch == 1
    assert resumed.stats() == reference_run.stats() and sum(resumed.stats().values()) > 0


def test_resume_is_exact_with_mixed_sources(tmp_path, tokenizer):
    write_photo_shards(tmp_path / "a", [10, 10])
    write_photo_shards(tmp_path / "b", [6, 6], first_shard=2, seed=1)
    shards = [tmp_path / "a", f"{tmp_path / 'b'}::3"]
    everything = take(loader(shards, tokenizer), 12)
    assert 0.3 < source_fraction(everything, 2) < 0.95  # both sources present (weights 1:3)
    first = loader(shards, tokenizer)
    take(first, 4)
    resumed = loader(shards, tokenizer)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(take(resumed, 8), everything[4:])


def test_resume_at_an_epoch_boundary_and_resume_of_a_resume(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [12, 12])
    everything = take(loader([tmp_path], tokenizer), 14)
    first = loader([tmp_path], tokenizer)
    take(first, 6)  # exactly one epoch
    assert first.state_dict()["epoch"] == 1
    second = loader([tmp_path], tokenizer)
    second.load_state_dict(first.state_dict())
    assert_same_batches(take(second, 3), everything[6:9])
    third = loader([tmp_path], tokenizer)
    third.load_state_dict(second.state_dict())
    assert_same_batches(take(third, 5), everything[9:14])


def test_resume_skips_raw_samples_without_decoding_them(tmp_path, tokenizer, monkeypatch):
    write_photo_shards(tmp_path, [24, 24])
    first = loader([tmp_path], tokenizer)
    everything = take(first, 10)
    before = loader([tmp_path], tokenizer)
    take(before, 9)
    decoded = []
    real_decode = ImageTransform.decode
    monkeypatch.setattr(ImageTransform, "decode", lambda self, s: decoded.append(s["__key__"]) or real_decode(self, s))
    resumed = loader([tmp_path], tokenizer)
    resumed.load_state_dict(before.state_dict())
    assert_same_batches(take(resumed, 1), everything[9:])
    assert decoded == everything[9]["keys"]  # the 36 samples before were skipped, not decoded


def test_other_world_size_or_workers_continue_the_epoch_elastically(tmp_path, tokenizer, caplog):
    """2 ranks x 1 worker → 1 rank x 2 workers → 2 ranks x 2 workers, within one epoch: every sample of the
    epoch is served once (the uninterrupted epoch's set), and the log says the epoch continues."""
    keys = write_photo_shards(tmp_path, [11, 13, 9, 15])  # 48 samples
    kw = dict(caption_dropout_prob=0.0)
    first = [loader([tmp_path], tokenizer, rank=r, world_size=2, **kw) for r in (0, 1)]
    served = [k for data in first for b in take(data, 2) for k in b["keys"]]  # 2 of 6 batches per rank
    states = [json.loads(json.dumps(data.state_dict())) for data in first]
    second = loader([tmp_path], tokenizer, dataloader_num_workers=2, **kw)
    with caplog.at_level(logging.INFO, logger="sd_ds.data"):
        second.load_state_dict(states[0], every_rank=lambda: states)
    assert "elastic data resume" in caplog.text and "32 samples its readers had not consumed" in caplog.text
    assert second.batches_per_epoch == 8  # 32 left / (1 rank x 2 workers x 4) = 4 per worker
    served += [k for b in take(second, 3) for k in b["keys"]]
    state = second.state_dict()
    third = [loader([tmp_path], tokenizer, rank=r, world_size=2, dataloader_num_workers=2, **kw) for r in (0, 1)]
    for data in third:
        data.load_state_dict(state, every_rank=lambda: [state])
    assert third[0].batches_per_epoch == 2  # 20 left / (2 ranks x 2 workers x 4) = 1 per worker (4 dropped)
    served += [k for data in third for b in take(data, 2) for k in b["keys"]]
    assert len(served) == len(set(served)) == 44  # none twice; 4 (< one global batch of 16) left at the end
    assert set(served) <= set(keys)
    assert all(data.epoch == 0 for data in third)  # the 2 batches each ended the epoch: the next take rolls over

    # A resume with other data (here: another seed) restarts the epoch, saying why.
    other = loader([tmp_path], tokenizer, seed=8, **kw)
    with caplog.at_level(logging.WARNING, logger="sd_ds.data"):
        other.load_state_dict(states[0], every_rank=lambda: states)
    assert "seed=7 (now 8)" in caplog.text and "restarts" in caplog.text


# --- ranks, workers, shard counts --------------------------------------------------------------------

def test_ranks_read_disjoint_samples_and_an_epoch_reads_every_sample_once(tmp_path, tokenizer):
    keys = write_photo_shards(tmp_path, [8] * 8)
    per_rank = []
    for rank in (0, 1):
        data = loader([tmp_path], tokenizer, rank=rank, world_size=2, dataloader_num_workers=2, shuffle_block=100)
        assert data.batches_per_epoch == 8  # 64 samples / (2 ranks x 2 workers x 4) = 4 per worker
        per_rank.append([k for b in take(data, 8) for k in b["keys"]])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)  # each sample exactly once


def test_uneven_shards_give_every_rank_the_same_batch_count(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [3, 20, 5, 12])  # rank 1 gets far fewer samples than rank 0 in some epochs
    counts = []
    for rank in (0, 1):
        data = loader([tmp_path], tokenizer, rank=rank, world_size=2)
        it = iter(data)
        for _ in range(data.batches_per_epoch):
            next(it)
        assert data.epoch == 0
        next(it)
        assert data.epoch == 1  # the epoch ended after exactly batches_per_epoch batches
        it.close()
        counts.append(data.batches_per_epoch)
    assert counts == [5, 5]  # 40 samples / (2 ranks x 4)


def test_fewer_shards_than_readers_still_serve_every_sample_once(tmp_path, tokenizer):
    keys = write_photo_shards(tmp_path, [8, 8, 8])  # 3 shards, 4 readers: spans cut across shards
    served = [k for rank in (0, 1) for b in take(loader([tmp_path], tokenizer, world_size=2, rank=rank,
                                                        dataloader_num_workers=2), 2) for k in b["keys"]]
    assert len(served) == 16 and len(set(served)) == 16 and set(served) <= set(keys)  # 24 // 16 batches


def test_resampled_shards_allow_fewer_shards_than_readers(tmp_path, tokenizer):
    keys = write_photo_shards(tmp_path, [10, 10])
    data = loader([tmp_path], tokenizer, world_size=2, rank=1, dataloader_num_workers=2, resample_shards=True)
    assert data.batches_per_epoch == 2  # 20 samples / (2 ranks x 2 workers x 4) = 1 batch per worker
    batches = take(data, 5)
    assert {k for b in batches for k in b["keys"]} <= set(keys) and data.epoch == 2

    # Resampling is seeded and resumable too.
    single = dict(world_size=2, rank=0, resample_shards=True)
    everything = take(loader([tmp_path], tokenizer, **single), 5)
    first = loader([tmp_path], tokenizer, **single)
    take(first, 2)
    resumed = loader([tmp_path], tokenizer, **single)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(take(resumed, 3), everything[2:])


# --- sources and sizes -------------------------------------------------------------------------------

def source_fraction(batches: list[dict], first_shard: int) -> float:
    keys = [k for b in batches for k in b["keys"]]
    return sum(int(k) // 10_000 >= first_shard for k in keys) / len(keys)


def test_mixture_weights_from_sources_json(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [50, 50])
    write_photo_shards(tmp_path, [50, 50], first_shard=2, seed=1)
    (tmp_path / "sources.json").write_text(json.dumps({"sources": [
        {"name": "big", "weight": 0.9, "shards": ["00000.tar", "00001.tar"], "samples": 100},
        {"name": "rare", "weight": 0.1, "shards": ["00002.tar", "00003.tar"], "samples": 100}]}))
    batches = take(loader([tmp_path], tokenizer, micro_batch_size=10), 20)  # 200 samples
    assert 0.04 <= source_fraction(batches, 2) <= 0.17  # 0.1 (binomial sd 0.021)


def test_mixture_weights_from_url_suffix(tmp_path, tokenizer):
    write_photo_shards(tmp_path / "a", [50, 50])
    write_photo_shards(tmp_path / "b", [50, 50], first_shard=2, seed=1)
    batches = take(loader([f"{tmp_path / 'a'}/{{00000..00001}}.tar::0.1", f"{tmp_path / 'b'}::0.9"], tokenizer,
                          micro_batch_size=10, random_flip=False, caption_dropout_prob=0.1, seed=0), 20)
    assert 0.83 <= source_fraction(batches, 2) <= 0.96


def test_batches_per_epoch_from_sizes_json_from_counting_or_given(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [12, 12, 12, 12])
    assert loader([tmp_path], tokenizer, dataloader_num_workers=2).batches_per_epoch == 12
    (tmp_path / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 100 for i in range(4)}))
    assert loader([tmp_path], tokenizer, dataloader_num_workers=2).batches_per_epoch == 100  # read, not counted
    (tmp_path / "sizes.json").unlink()
    assert loader([tmp_path], tokenizer, dataloader_num_workers=2).batches_per_epoch == 12  # counted from the tars
    glob = loader([f"{tmp_path}/*.tar"], tokenizer, dataloader_num_workers=2, samples_per_epoch=20)
    assert glob.batches_per_epoch == 4  # 20 // (2 workers x 4) = 2 per worker


def test_missing_shards_are_an_error(tmp_path, tokenizer):
    write_photo_shards(tmp_path, [4, 4])
    with pytest.raises(FileNotFoundError, match="missing"):
        loader([f"{tmp_path}/{{00000..00003}}.tar"], tokenizer)


def test_raw_parts_file_list_names_the_converter(tmp_path):
    part = tmp_path / "part-00000.gz"
    with gzip.open(part, "wt") as f:
        f.write("a caption\t_\tAAAA\n")
    (tmp_path / "laion.filelist").write_text(f"{part}\n")
    file_list = tmp_path / "train.filelist.list"
    file_list.write_text(f"{tmp_path / 'laion.filelist'} 1.0\n")
    with pytest.raises(SystemExit) as e:
        raise_if_raw_parts(str(file_list))
    message = str(e.value)
    assert f"python tools/convert_laion_to_wds.py --file_list {file_list} --output_dir SHARDS" in message
    assert "--train_shards SHARDS" in message
    assert message.index("--output_dir SHARDS") < message.index("--train_shards SHARDS")

    write_photo_shards(tmp_path / "shards", [2])
    assert raise_if_raw_parts(str(tmp_path / "shards")) is None  # shards, not raw parts

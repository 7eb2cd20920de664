"""Training data from object storage: a converter output directory served by a real HTTP server and by moto's S3
server on loopback (tests/object_stores.py) gives the same batches as the local directory; a resume reads at
most a shard per reader whatever the step; a latent directory works remotely too."""

from __future__ import annotations

import json

import pytest
import torch

from sd_ds.config import DataConfig
from sd_ds.conditioning import CaptionTokenizer
from sd_ds.data import build_train_loader
from tests.helpers import take, write_photo_shards
from tests.object_stores import http_server_factory, s3_server  # noqa: F401 - fixtures

RES = 32


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from sd_ds.models import CLIP_TOKENIZER_DIR

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converter-layout directory with two weighted sources (sources.json) and sizes.json."""
    out = tmp_path_factory.mktemp("converted")
    write_photo_shards(out, [12, 10, 11, 9])
    write_photo_shards(out, [6, 7], first_shard=4, seed=1)
    (out / "sources.json").write_text(json.dumps({"sources": [
        {"name": "big", "weight": 0.7, "shards": [f"{i:05d}.tar" for i in range(4)], "samples": 42},
        {"name": "small", "weight": 0.3, "shards": ["00004.tar", "00005.tar"], "samples": 13}]}))
    return out


def loader(url, tokenizer, **fields):
    base = dict(resolution=RES, dataloader_num_workers=0, shuffle_block=8, random_flip=True, caption_dropout_prob=0.2)
    base.update(fields)
    return build_train_loader(DataConfig(train_shards=[str(url)], **base), tokenize=CaptionTokenizer((tokenizer,), 77),
                              micro_batch_size=4, seed=3)



def same(a, b):
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        assert x["captions"] == y["captions"]
        assert torch.equal(x["pixel_values"] if "pixel_values" in x else x["latent_moments"],
                           y["pixel_values"] if "pixel_values" in y else y["latent_moments"])


def test_http_and_s3_give_the_local_batches(converted, tokenizer, http_server_factory, s3_server):  # noqa: F811
    local = take(loader(converted, tokenizer), 14)  # 55 samples: 13 batches, then the next epoch
    assert 0.15 < sum(int(k) >= 40_000 for b in local[:13] for k in b["keys"]) / 52 < 0.45  # weight 0.3
    http = http_server_factory(converted)
    same(take(loader(http.url(), tokenizer), 14), local)
    url = s3_server.upload_dir(converted, "shards", "laion/part0")
    same(take(loader(url + "/", tokenizer), 14), local)
    # A brace pattern over URLs (one source, no sources.json) works as it does on local paths.
    pattern = "{00000..00003}.tar"
    same(take(loader(http.url(pattern), tokenizer), 3), take(loader(f"{converted}/{pattern}", tokenizer), 3))


def test_a_file_url_is_a_url_and_gives_the_local_batches(converted, tokenizer):
    """One definition of a URL (sd_ds.fileio.is_url): file:// is one, read through fsspec, and gives the plain
    path's batches; the converter and the trainer agree on it."""
    from sd_ds.fileio import is_url

    assert is_url(f"file://{converted}") and is_url("s3://bucket/x") and is_url("https://host/x.tar")
    assert not is_url(converted) and not is_url(str(converted)) and not is_url("pipe:cat 00000.tar")
    same(take(loader(f"file://{converted}", tokenizer), 14), take(loader(converted, tokenizer), 14))


def test_resume_reads_a_bounded_number_of_bytes_whatever_the_step(tmp_path, tokenizer,
                                                                   http_server_factory):  # noqa: F811
    """Bytes read from the server before the first resumed batch, early vs late in the epoch: the same bound (one
    shard and a block), not growing with the position; the resumed batches equal the uninterrupted ones."""
    root = tmp_path / "shards"
    write_photo_shards(root, [40] * 10)  # 400 samples, one reader: 100 batches
    http = http_server_factory(root)
    shard_bytes = max(p.stat().st_size for p in root.glob("*.tar"))
    everything = take(loader(http.url(), tokenizer, shuffle_block=16), 90)
    read = {}
    for step in (5, 85):
        first = loader(http.url(), tokenizer, shuffle_block=16)
        take(first, step)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = loader(http.url(), tokenizer, shuffle_block=16)
        resumed.load_state_dict(state)
        http.reset_counts()
        batch = take(resumed, 1)
        read[step] = sum(n for method, path, n in http.requests if path.endswith(".tar"))
        same(batch, everything[step:step + 1])
    assert read[85] <= 2 * shard_bytes and read[5] <= 2 * shard_bytes, (read, shard_bytes)
    # Today's replay read everything consumed so far: 85 batches are 340 of 400 samples, ~8.5 shards.


def test_a_latent_directory_on_s3(tmp_path, tokenizer, s3_server):  # noqa: F811
    from sd_ds.data import latent_manifest_of_shards
    from tests.test_latents import encode_flags, encode_in_process

    images, latents = tmp_path / "images", tmp_path / "latents"
    write_photo_shards(images, [8, 8])
    from diffusers import AutoencoderKL

    from sd_ds.presets import TINY_VAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    assert encode_in_process(encode_flags(images, latents, tmp_path / "vae")) == 0
    url = s3_server.upload_dir(latents, "latents", "run1")
    assert latent_manifest_of_shards([url]) == latent_manifest_of_shards([str(latents)])
    kw = dict(center_crop=True, random_flip=False)
    same(take(loader(url, tokenizer, **kw), 3), take(loader(latents, tokenizer, **kw), 3))


def test_index_command_writes_sizes_json_on_s3_once(tmp_path, tokenizer, s3_server):  # noqa: F811
    from sd_ds import fileio
    from sd_ds.data.index import main as index_main

    write_photo_shards(tmp_path / "raw", [5, 7, 6], sizes_json=False)
    url = s3_server.upload_dir(tmp_path / "raw", "unindexed", "x")
    assert not fileio.exists(url + "/sizes.json")
    assert index_main([url]) == 0
    assert fileio.read_json(url + "/sizes.json") == {"00000.tar": 5, "00001.tar": 7, "00002.tar": 6}
    assert fileio.exists(url + "/00001.tar.offsets")  # and a member index per shard
    s3_server.reset_counts()
    data = loader(url, tokenizer)  # sizes from sizes.json: no shard is read to build the loader
    assert data.batches_per_epoch == 4 and not [r for r in s3_server.requests if r[1].endswith(".tar")]


def _count_on_rank(rank: int, world_size: int, port: int, url: str, out: str) -> None:
    import torch.distributed as dist

    from sd_ds.lifecycle import end_process
    from sd_ds.data.sources import count_missing, parse_sources, shared_counter

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)

    def all_reduce(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    sources, _ = count_missing(parse_sources([url]), shared_counter(rank, world_size, all_reduce))
    with open(f"{out}.{rank}", "w") as f:
        json.dump([list(s.sizes) for s in sources], f)
    dist.destroy_process_group()
    end_process()  # gloo threads can abort a finalizing interpreter (sd_ds.lifecycle.end_process)


@pytest.mark.slow
def test_shards_without_sizes_json_are_counted_once_per_run_not_per_rank(tmp_path, http_server_factory):  # noqa: F811
    """Two real ranks (gloo) build their sources from HTTP shards without sizes.json: every shard is read once in
    all, and both ranks get every count."""
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    write_photo_shards(tmp_path / "raw", [5, 7, 6, 4, 8], sizes_json=False)
    http = http_server_factory(tmp_path / "raw")
    out = str(tmp_path / "sizes")
    mp.spawn(_count_on_rank, args=(2, free_port(), http.url(), out), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"sizes.{r}").read_text()) for r in (0, 1)]
    assert results[0] == results[1] == [[5, 7, 6, 4, 8]]
    shard_gets = [path for method, path, n in http.requests if path.endswith(".tar") and method == "GET"]
    assert sorted(set(shard_gets)) == [f"/{i:05d}.tar" for i in range(5)]
    assert len(shard_gets) == 5  # one read per shard, by one rank


def test_a_member_index_lets_a_reader_start_inside_a_shard_without_reading_its_start(tmp_path,
                                                                                    http_server_factory):  # noqa: F811
    from sd_ds.data.index import main as index_main
    from sd_ds.data.reading import shard_samples

    write_photo_shards(tmp_path, [40])
    http = http_server_factory(tmp_path)
    url, size = http.url("00000.tar"), (tmp_path / "00000.tar").stat().st_size
    without = list(shard_samples(url, 30))
    read_without = http.bytes_served
    assert [i for i, _ in without] == list(range(30, 40)) and read_without >= size
    assert index_main([str(tmp_path)]) == 0
    http.reset_counts()
    indexed = list(shard_samples(url, 30))
    assert [(i, s["__key__"], s["txt"]) for i, s in indexed] == [(i, s["__key__"], s["txt"]) for i, s in without]
    served = sum(n for _, path, n in http.requests if path.endswith(".tar"))
    assert served < 0.4 * size  # samples 30..39 only (the index itself is 41 x 8 bytes)

    # A shard rewritten after indexing: its stale index is ignored (the samples are still right).
    write_photo_shards(tmp_path, [39])
    assert [i for i, _ in shard_samples(url, 30)] == list(range(30, 39))


def test_pipe_shards_give_the_local_batches(converted, tokenizer):
    """webdataset's ``pipe:COMMAND`` shards (e.g. ``pipe:aws s3 cp s3://bucket/{00000..00003}.tar -``) read as the
    same files do: the command's target names the shard (its shuffle seed) and the sizes.json beside it."""
    pattern = "{00000..00003}.tar"
    local = take(loader(f"{converted}/{pattern}", tokenizer), 5)
    same(take(loader(f"pipe:cat {converted}/{pattern}", tokenizer), 5), local)
    # resumed inside the epoch: the same batches as the uninterrupted run from there on
    first = loader(f"pipe:cat {converted}/{pattern}", tokenizer)
    it = iter(first)
    [next(it) for _ in range(3)]
    state = first.state_dict()
    it.close()
    resumed = loader(f"pipe:cat {converted}/{pattern}", tokenizer)
    resumed.load_state_dict(state)
    same(take(resumed, 2), local[3:5])

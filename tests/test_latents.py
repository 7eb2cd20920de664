"""Latent shards: `python -m sd_ds.encode_latents` and the training loader reading them (tiny VAE, 32 px, CPU).

The reference encoding runs in-process on one thread; the interrupted and multi-rank encodings run as
subprocesses with one thread each (tests.helpers.subprocess_env), and their bytes must equal the reference's.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from sd_ds.config import DataConfig
from sd_ds.conditioning import CaptionTokenizer
from sd_ds.data import (LATENT_MANIFEST, ImageTransform, build_train_loader, check_latent_manifest,
                        latent_manifest_in_dir, latent_manifest_of_shards)
from sd_ds.data.manifest import vae_fingerprint
from sd_ds.encode_latents import main
from sd_ds.faults import FAULT_ENV
from sd_ds.latents import encode_moments, sample_latents
from tests.helpers import REPO_ROOT, photo_sample, subprocess_env, take, write_photo_shards

RES = 32
# Shards of 7, 6 and 5 samples, one undecodable and one without a caption: 16 encodable.
SHARD_SIZES = [7, 6, 5]
BAD = {"000000003": {"jpg": b"not an image", "txt": "broken"}, "000010002": {"txt": "no image", "json": "{}"}}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    from sd_ds.models import CLIP_TOKENIZER_DIR

    return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    from sd_ds.presets import TINY_VAE

    out = tmp_path_factory.mktemp("vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE).save_pretrained(out)
    return out


def load_vae(vae_dir: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two weighted sources in one converter-layout directory, with two unusable samples."""
    out = tmp_path_factory.mktemp("images")
    write_photo_shards(out, SHARD_SIZES, special=BAD)
    (out / "sources.json").write_text(json.dumps({"sources": [
        {"name": "a", "weight": 0.25, "shards": ["00000.tar", "00001.tar"], "samples": 13},
        {"name": "b", "weight": 0.75, "shards": ["00002.tar"], "samples": 5}]}))
    return out


def encode_flags(images: Path, out: Path, vae_dir: Path, *extra: str) -> list[str]:
    return ["--train_shards", str(images), "--output_dir", str(out), "--vae_name_or_path", str(vae_dir),
            "--resolution", str(RES), "--batch_size", "3", "--dataloader_num_workers", "0", "--disable_tqdm", *extra]


def encode_in_process(flags: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same kernels, the same bytes
    try:
        return main(flags)
    finally:
        torch.set_num_threads(threads)


def encode_subprocess(flags: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sd_ds.encode_latents", *flags], cwd=REPO_ROOT,
                            env=subprocess_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, images, vae_dir) -> Path:
    out = tmp_path_factory.mktemp("latents") / "dst"
    assert encode_in_process(encode_flags(images, out, vae_dir, "--flip_variants")) == 0
    return out


def files(directory: Path) -> dict[str, bytes]:
    """Every file under the directory (the encoder's records included) → its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tar_members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def source_samples(images: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(images.glob("*.tar")):
        for name, data in tar_members(shard).items():
            key, ext = name.split(".", 1)
            samples.setdefault(key, {})[ext] = data
    return samples


def stored_moments(latents: Path, member: str = "moments") -> dict[str, torch.Tensor]:
    manifest = latent_manifest_in_dir(latents)
    out = {}
    for shard in sorted(latents.glob("*.tar")):
        for name, data in tar_members(shard).items():
            key, ext = name.split(".", 1)
            if ext == member:
                out[key] = torch.frombuffer(bytearray(data), dtype=torch.float16).view(manifest["shape"])
    return out


def data_config(shards: list, **fields) -> DataConfig:
    base = dict(resolution=RES, center_crop=True, random_flip=False, caption_dropout_prob=0.0, shuffle_block=8,
                dataloader_num_workers=0)
    base.update(fields)
    return DataConfig(train_shards=[str(s) for s in shards], **base)


def loader(shards: list, tokenizer, **fields):
    return build_train_loader(data_config(shards, **fields), tokenize=CaptionTokenizer((tokenizer,), 77),
                              micro_batch_size=4, seed=3)



# --- what the encoder writes -------------------------------------------------------------------------

def test_manifest_records_settings_vae_sources_and_skips(encoded, images, vae_dir):
    manifest = json.loads((encoded / LATENT_MANIFEST).read_text())
    vae = load_vae(vae_dir)
    assert (manifest["resolution"], manifest["crop"], manifest["dtype"], manifest["shape"]) == (RES, "center", "fp16",
                                                                                              [8, 8, 8])
    assert manifest["flip_variants"] is True and manifest["min_size"] is None
    assert manifest["vae"]["weights_sha256"] == vae_fingerprint(vae)
    assert manifest["vae"]["scaling_factor"] == vae.config.scaling_factor
    assert [(s["name"], s["weight"], s["shards"], s["samples"], s["source_samples"]) for s in manifest["sources"]] == [
        (f"{images}:a", 0.25, ["00000.tar", "00001.tar"], 11, 13), (f"{images}:b", 0.75, ["00002.tar"], 5, 5)]
    assert manifest["samples"] == 16
    assert manifest["skipped"] == {"missing_image": 1, "undecodable": 1}
    assert manifest["shards"]["00001.tar"] == {"source": str(images / "00001.tar"), "samples": 5,
                                               "skipped": {"missing_image": 1}}
    assert json.loads((encoded / "sizes.json").read_text()) == {"00000.tar": 6, "00001.tar": 5, "00002.tar": 5}

    # Same keys in the same order, .txt and .json as in the source, moments and flipped moments added.
    source = source_samples(images)
    for shard in sorted(encoded.glob("*.tar")):
        members = tar_members(shard)
        keys = list(dict.fromkeys(name.split(".", 1)[0] for name in members))
        assert keys == [k for k in sorted(source) if k[:5] == shard.stem and k not in BAD]
        for key in keys:
            assert members[f"{key}.txt"] == source[key]["txt"] and members[f"{key}.json"] == source[key]["json"]
            assert len(members[f"{key}.moments"]) == len(members[f"{key}.moments_flip"]) == 8 * 8 * 8 * 2


def test_latents_from_shards_equal_the_online_path(encoded, images, vae_dir):
    """Centre crop, no flip: a latent drawn from the stored moments is the online path's latent for the same
    image and generator, up to the fp16 rounding of the stored moments."""
    vae = load_vae(vae_dir)
    transform = ImageTransform(RES, center_crop=True)
    stored, stored_flip = stored_moments(encoded), stored_moments(encoded, "moments_flip")
    source = source_samples(images)
    assert len(stored) == 16
    for i, (key, moments) in enumerate(sorted(stored.items())):
        img, _ = transform.decode(source[key])
        pixels = transform(img, None)[None]  # uint8 [1, 3, R, R]
        online = encode_moments(vae, pixels)[0]
        # The stored moments are the online ones rounded to fp16 (the log-variance clamped as diffusers does).
        mean, logvar = online.chunk(2)
        assert torch.allclose(moments.float(), torch.cat([mean, logvar.clamp(-30, 20)]), rtol=2 ** -10, atol=1e-6)
        assert torch.allclose(stored_flip[key].float(), encode_moments(vae, pixels.flip(-1))[0], rtol=2 ** -10,
                              atol=1e-6)
        a = sample_latents(moments[None], torch.Generator().manual_seed(i), vae.config.scaling_factor)
        b = vae.encode(pixels.float() / 127.5 - 1).latent_dist.sample(torch.Generator().manual_seed(i))
        b = b * vae.config.scaling_factor  # what diffusers' training scripts do
        std = torch.exp(0.5 * logvar)
        noise = (b / vae.config.scaling_factor - mean) / std
        # fp16: |Δmean| <= 2^-11 |mean|, |Δstd| <= std * |Δlogvar| / 2 with |Δlogvar| <= 2^-11 |logvar|.
        bound = vae.config.scaling_factor * (mean.abs() + std * noise.abs() * logvar.abs() / 2) * 2 ** -11 + 1e-6
        assert ((a[0] - b[0]).abs() <= bound).all()
        other = sample_latents(moments[None], torch.Generator().manual_seed(i + 100), vae.config.scaling_factor)
        assert not torch.allclose(a, other)  # the latent is drawn, not stored


def test_the_loader_gives_the_image_runs_samples_as_moments(tmp_path, vae_dir, tokenizer):
    """Same seed and flags: the latent loader hands out the image loader's samples in the same order, and
    the latents drawn from both agree (to fp16 rounding)."""
    images = tmp_path / "images"
    write_photo_shards(images, [8, 8])
    latents = tmp_path / "latents"
    assert encode_in_process(encode_flags(images, latents, vae_dir)) == 0
    vae = load_vae(vae_dir)
    check_latent_manifest(latent_manifest_of_shards([str(latents)]), vae, RES)
    from_images, from_latents = take(loader([images], tokenizer), 3), take(loader([latents], tokenizer), 3)
    for image_batch, latent_batch in zip(from_images, from_latents):
        assert image_batch["keys"] == latent_batch["keys"] and image_batch["captions"] == latent_batch["captions"]
        assert torch.equal(image_batch["input_ids"], latent_batch["input_ids"])
        assert set(latent_batch) == {"latent_moments", "input_ids", "empty_caption", "captions", "keys",
                                     "original_size", "crop_top_left", "target_size"}
        for name in ("original_size", "crop_top_left", "target_size"):  # stored with the moments: the image run's
            assert torch.equal(latent_batch[name], image_batch[name]), name
        moments = latent_batch["latent_moments"]
        assert moments.shape == (4, 8, 8, 8) and moments.dtype == torch.float16
        pixels = image_batch["pixel_values"]
        if pixels.dtype != torch.uint8:  # [-1, 1] floats back to the exact uint8 values
            pixels = ((pixels + 1) * 127.5).round().to(torch.uint8)
        online = sample_latents(encode_moments(vae, pixels), torch.Generator().manual_seed(0), 0.18215)
        cached = sample_latents(moments, torch.Generator().manual_seed(0), 0.18215)
        assert torch.allclose(online, cached, rtol=5e-3, atol=2e-3)


# --- resumable and rank-independent bytes ------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_mid_encode_then_rerun_gives_the_uninterrupted_bytes(tmp_path, encoded, images, vae_dir):
    out = tmp_path / "dst"
    flags = encode_flags(images, out, vae_dir, "--flip_variants")
    # Killed right after shard 00000.tar was renamed into place, before it was recorded: redone.
    code, output = finish(encode_subprocess(flags, {FAULT_ENV: "shard:count=1"}))
    assert code == -9, output
    assert (out / "00000.tar").is_file() and not (out / ".encode" / "00000.tar.json").exists()
    # Killed mid-way through a shard (its second batch written to the temporary file).
    code, output = finish(encode_subprocess(flags, {FAULT_ENV: "batch:count=5"}))
    assert code == -9, output
    assert list(out.glob(".*.tar.tmp.*")) and not (out / LATENT_MANIFEST).exists()
    code, output = finish(encode_subprocess(flags))
    assert code == 0, output
    assert "already done" in output
    assert files(out) == files(encoded)  # shards, sizes.json, manifest and records; no temporary left


@pytest.mark.slow
def test_one_and_two_encoding_ranks_give_the_same_bytes(tmp_path, encoded, images, vae_dir):
    out = tmp_path / "dst"
    flags = encode_flags(images, out, vae_dir, "--flip_variants")
    ranks = [encode_subprocess(flags, {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in (0, 1)]
    results = [finish(p) for p in ranks]
    assert [code for code, _ in results] == [0, 0], results
    # Which rank encodes which shard is a race (in CI rank 1 once finished two before rank 0 had loaded its VAE);
    # what must hold is that the two encode the three shards between them, each once.
    encoded_by = [int(re.search(r"rank \d: encoded \d+ images from (\d+) shard\(s\)", log).group(1))
                  for _, log in results]
    assert sum(encoded_by) == 3, results
    assert "latents.json written" in results[0][1] and "latents.json written" not in results[1][1]  # once
    assert files(out) == files(encoded)


@pytest.mark.slow
def test_a_dead_ranks_shard_is_encoded_by_another_rank(tmp_path, encoded, images, vae_dir):
    """Shards are claimed, not dealt: rank 1 claims a shard and is SIGKILLed at its first batch; rank 0 then
    encodes its own shards, takes the dead rank's over, and writes the manifest once: the same bytes."""
    out = tmp_path / "dst"
    flags = encode_flags(images, out, vae_dir, "--flip_variants")
    two = {"WORLD_SIZE": "2"}
    code, output = finish(encode_subprocess(flags, {**two, "RANK": "1", "LOCAL_RANK": "1", FAULT_ENV: "batch"}))
    assert code == -9, output
    assert [p.name for p in (out / ".encode" / "claims").iterdir()] == ["00001.tar.json"]  # its claim, left
    code, output = finish(encode_subprocess(flags, {**two, "RANK": "0", "LOCAL_RANK": "0"}))
    assert code == 0, output
    assert "00001.tar: its claim's process is gone" in output and "latents.json written" in output
    assert files(out) == files(encoded)  # the claims are gone too


def test_output_names_never_carry_a_pipe_tail():
    from sd_ds.encode_latents import _output_name

    assert _output_name("pipe:curl -s -L https://host/data/00001.tar -") == "00001.tar"
    assert _output_name("pipe:aws s3 cp s3://b/shards/00007.tar -") == "00007.tar"
    assert _output_name("pipe:cat '/data/x y/00002.tar'") == "00002.tar"
    assert _output_name("https://host/shards/00003.tar?token=abc") == "00003.tar"
    assert _output_name("s3://bucket/prefix/00004.tar") == "00004.tar"


@pytest.mark.slow
def test_encoding_into_s3_gives_the_local_bytes(tmp_path, encoded, images, vae_dir):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.object_stores import S3Server

    with S3Server() as s3:
        s3.client().create_bucket(Bucket="latents")
        flags = encode_flags(images, "s3://latents/dst", vae_dir, "--flip_variants")  # type: ignore[arg-type]
        code, output = finish(encode_subprocess(flags, s3.env))
        assert code == 0, output
        client = s3.client()
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="latents", Prefix="dst/").get("Contents", [])]
        remote = {k[len("dst/"):]: client.get_object(Bucket="latents", Key=k)["Body"].read() for k in sorted(keys)}
    assert remote == files(encoded)


def test_a_rerun_with_other_settings_is_refused(tmp_path, encoded, images, vae_dir):
    out = tmp_path / "dst"
    shutil.copytree(encoded, out)
    assert encode_in_process(encode_flags(images, out, vae_dir, "--flip_variants")) == 0  # finished: nothing to do
    assert files(out) == files(encoded)
    assert encode_in_process(encode_flags(images, out, vae_dir, "--flip_variants", "--dtype", "bf16")) == 2


# --- the loader on latent shards ---------------------------------------------------------------------

def rewrite_member(shard: Path, name: str, data: bytes) -> None:
    members = tar_members(shard)
    members[name] = data
    with tarfile.open(shard, "w") as tf:
        for member, payload in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


def test_corrupt_latent_members_are_skipped_and_counted(tmp_path, encoded, tokenizer):
    latents = tmp_path / "latents"
    shutil.copytree(encoded, latents)
    rewrite_member(latents / "00000.tar", "000000000.moments", b"\x00" * 100)  # cut short
    rewrite_member(latents / "00002.tar", "000020000.moments", b"\x00\x7e" * 512)  # NaN
    # One source, samples in shard order: 12 good samples need all three shards, each read from its first sample.
    data = loader([f"{latents}/{{00000..00002}}.tar"], tokenizer, shuffle_block=1)
    keys = [k for b in take(data, 3) for k in b["keys"]]
    assert len(set(keys)) == 12 and not {"000000000", "000020000"} & set(keys)
    assert data.stats() == {"corrupt_latent": 2}


def test_random_flip_picks_the_flipped_moments_and_needs_them(tmp_path, encoded, images, vae_dir, tokenizer):
    straight, flipped = stored_moments(encoded), stored_moments(encoded, "moments_flip")
    batches = take(loader([encoded], tokenizer, random_flip=True, samples_per_epoch=10**4), 12)  # 48 draws
    picks = []
    for batch in batches:
        for key, moments in zip(batch["keys"], batch["latent_moments"]):
            assert torch.equal(moments, straight[key]) or torch.equal(moments, flipped[key])
            picks.append(torch.equal(moments, flipped[key]))
    assert 12 <= sum(picks) <= 36  # 48 fair coin flips

    no_flips = tmp_path / "no_flips"
    write_photo_shards(tmp_path / "img", [4])
    assert encode_in_process(encode_flags(tmp_path / "img", no_flips, vae_dir)) == 0
    with pytest.raises(ValueError, match="--random_flip on latent shards needs .*--flip_variants"):
        loader([no_flips], tokenizer, random_flip=True)


def test_vae_resolution_and_scaling_factor_mismatches_are_rejected(encoded, vae_dir):
    manifest = latent_manifest_of_shards([str(encoded)])
    vae = load_vae(vae_dir)
    check_latent_manifest(manifest, vae, RES)  # the VAE it was made with: fine
    with pytest.raises(ValueError, match="--resolution 32, this run trains at 64"):
        check_latent_manifest(manifest, vae, 64)
    other_scale = load_vae(vae_dir)
    other_scale.register_to_config(scaling_factor=0.5)
    with pytest.raises(ValueError, match="scaling_factor 0.18215, this run's VAE has 0.5"):
        check_latent_manifest(manifest, other_scale, RES)
    other_weights = load_vae(vae_dir)
    with torch.no_grad():
        other_weights.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(ValueError, match="other VAE weights"):
        check_latent_manifest(manifest, other_weights, RES)
    other_config = json.loads(json.dumps(manifest))
    other_config["vae"]["config"]["latent_channels"] = 16
    with pytest.raises(ValueError, match="another VAE config .*latent_channels"):
        check_latent_manifest(other_config, vae, RES)
    with pytest.raises(ValueError, match="before it is cast"):
        check_latent_manifest(manifest, load_vae(vae_dir).to(torch.bfloat16), RES)


def test_mixed_and_unfinished_sources_are_rejected(tmp_path, encoded, images, tokenizer):
    assert latent_manifest_of_shards([str(images)]) is None
    with pytest.raises(ValueError, match="mixes latent shards .* with image shards"):
        latent_manifest_of_shards([str(encoded), f"{images}::2"])
    with pytest.raises(ValueError, match="mixes latent shards"):
        loader([encoded, images], tokenizer)
    with pytest.raises(ValueError, match="names latent shards .* and image shards together"):
        latent_manifest_of_shards([f"{{{encoded},{images}}}/00000.tar"])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(encoded, unfinished)
    (unfinished / LATENT_MANIFEST).unlink()
    with pytest.raises(ValueError, match="latent encoding has not finished .*run the same"):
        loader([unfinished], tokenizer)


# --- the trainer on latent shards --------------------------------------------------------------------

def train(flags: list[str], env: dict | None = None) -> subprocess.Popen:
    from tests.helpers import free_port

    return subprocess.Popen([sys.executable, "-m", "sd_ds.train", *flags], cwd=REPO_ROOT,
                            env=subprocess_env({"MASTER_PORT": str(free_port()), **(env or {})}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(out: Path) -> list[float]:
    from tests.helpers import scalars

    return [v for _, v in scalars(out / "runs", "train/loss")]


@pytest.mark.slow
def test_training_on_latents_matches_images_and_resumes_exactly_after_sigterm(tmp_path):
    """fp32, centre crop, no flip: the first steps' losses on latent shards are the image run's (the same
    samples in the same order, the same generator draws); a SIGTERM'd latent run resumes to the same weights;
    a run whose VAE differs from the cache's stops before training."""
    from tests.helpers import fp32_weights, make_tiny_model, train_flags

    STEPS = 8
    images, latents = tmp_path / "images", tmp_path / "latents"
    write_photo_shards(images, [8, 8, 8, 8])
    model = make_tiny_model(tmp_path / "model")
    assert encode_in_process(["--train_shards", str(images), "--output_dir", str(latents),
                              "--pretrained_model_name_or_path", str(model), "--resolution", str(RES),
                              "--dataloader_num_workers", "0", "--disable_tqdm"]) == 0

    def flags(out: Path, shards: Path, **kw) -> list[str]:
        return train_flags(out, shards, model, **{"bf16": "False", "max_steps": STEPS, "save_steps": 2, **kw})

    # Three runs side by side: images, latents, and latents interrupted by a SIGTERM after the step-2
    # checkpoint. That process is frozen the moment the checkpoint is complete, so the signal lands in step 3
    # or 4 (of 8) whatever the machine's speed, and the run checkpoints that step and exits 0.
    out = tmp_path / "interrupted"
    other_vae = load_vae(model / "vae")
    with torch.no_grad():
        other_vae.encoder.conv_in.bias += 0.01
    other_vae.save_pretrained(tmp_path / "other_vae")
    runs = [train(flags(tmp_path / "img", images, max_steps=3)), train(flags(tmp_path / "lat", latents)),
            train(flags(out, latents)),
            # A cache from another VAE: refused before training starts.
            train(flags(tmp_path / "mismatch", latents, vae_name_or_path=tmp_path / "other_vae"))]
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert runs[2].poll() is None and time.time() < deadline, finish(runs[2])[1][-4000:]
            time.sleep(0.02)
        for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGCONT):
            runs[2].send_signal(sig)
        results = [finish(proc) for proc in runs]
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
    for code, log in results[:2]:
        assert code == 0, log[-4000:]
    code, log = results[3]
    assert code != 0 and "were encoded with other VAE weights" in log, log[-4000:]
    assert not list((tmp_path / "mismatch").glob("checkpoint-*"))
    image_losses, latent_losses = losses(tmp_path / "img"), losses(tmp_path / "lat")
    assert len(image_losses) == 3 and len(latent_losses) == STEPS
    assert latent_losses[:3] == pytest.approx(image_losses, rel=5e-3)

    code, log = results[2]
    assert code == 0 and "stop requested" in log, log[-4000:]
    stopped_at = max(int(state.parent.name.split("-")[1]) for state in out.glob("checkpoint-*/trainer_state.json"))
    assert 2 < stopped_at < STEPS, log[-4000:]
    code, log = finish(train(flags(out, latents)))
    assert code == 0, log[-4000:]
    resumed = fp32_weights(out / f"checkpoint-{STEPS}")
    reference = fp32_weights(tmp_path / "lat" / f"checkpoint-{STEPS}")
    assert set(resumed) == set(reference)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert losses(out)[-(STEPS - stopped_at):] == latent_losses[stopped_at:]

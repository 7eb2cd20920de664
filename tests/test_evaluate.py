"""python -m sd_ds.evaluate against the libraries it glues: FID equals pytorch-fid's on the same folders and
weights (a random-init Inception saved to a file), the CLIP score equals open_clip's cosine on a tiny random
open_clip model, the --save_reference_stats .npz is pytorch-fid's format, and generation spread over 3 ranks
(one with no image to draw) gives the figures of 1 rank. Needs the eval extra (pytorch-fid, open-clip-torch,
torchvision: requirements-eval.txt)."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:  # a torchvision built for another torch fails with errors other than ImportError
    import open_clip
    import pytorch_fid.inception  # noqa: F401
except Exception as e:  # noqa: BLE001
    pytest.skip(f"the eval extra (requirements-eval.txt, tools/setup_env.sh --eval) is not usable here: {e!r}",
                allow_module_level=True)

from sd_ds import fid_clip  # noqa: E402
from tests.helpers import REPO_ROOT, free_port, make_tiny_model, subprocess_env  # noqa: E402

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _drawn_images(folder: Path, n: int, seed: int) -> list[str]:
    from sd_ds.shapes import BACKGROUNDS, COLORS, SHAPES, caption_of, draw_shape

    folder.mkdir(parents=True)
    rng = random.Random(seed)
    captions = []
    for i in range(n):
        c, s, b = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(BACKGROUNDS)
        draw_shape(c, s, b, rng, size=32).save(folder / f"{i:03d}.png")
        captions.append(caption_of(c, s, b))
    return captions


@pytest.fixture(scope="module")
def eval_assets(tmp_path_factory):
    from pytorch_fid import inception as fid_inception

    root = tmp_path_factory.mktemp("eval")
    captions_a = _drawn_images(root / "a", 6, seed=0)
    _drawn_images(root / "b", 6, seed=1)
    (root / "captions_a.txt").write_text("\n".join(captions_a) + "\n")
    # Random Inception weights (pytorch-fid's FID blocks have the parameters of torchvision's), batch-norm
    # statistics set from one batch so that the pool features do not vanish.
    torch.manual_seed(0)
    net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299) * 2 - 1)
        # Pool features ~0.25 instead of ~80: with 6 images (covariances of rank 5 in 2048-d) scipy's sqrtm
        # leaves imaginary parts proportional to their scale, which pytorch-fid rejects above 1e-3.
        for name, m in net.Mixed_7c.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(0.01)
                m.bias.mul_(0.01)
    hub = root / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    weights = hub / "checkpoints" / fid_clip.FID_WEIGHTS_FILE
    torch.save(net.state_dict(), weights)
    # A tiny random open_clip model: its config file and its weights.
    config = root / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    clip_model = open_clip.create_model("tiny-clip")
    clip_weights = root / "tiny_clip.pt"
    torch.save(clip_model.state_dict(), clip_weights)
    return {"root": root, "a": root / "a", "b": root / "b", "captions_a": root / "captions_a.txt", "hub": hub,
            "fid_weights": weights, "clip_config": config, "clip_weights": clip_weights}


def _evaluate(*args: str, nproc: int = 1, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 f"--master_port={free_port()}", "-m", "sd_ds.evaluate"] if nproc > 1
                else [sys.executable, "-m", "sd_ds.evaluate"])
    proc = subprocess.run([*launcher, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                          env=subprocess_env({"MASTER_PORT": str(free_port()), **(env or {})}))
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def _fid(eval_assets, images: Path, reference: str, out: Path, *extra: str) -> dict:
    _evaluate("--images", str(images), "--reference", reference, "--metrics", "fid",
              "--fid_weights", str(eval_assets["fid_weights"]), "--output", str(out), *extra)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fid_equals_pytorch_fid_and_of_a_set_with_itself_is_zero_and_npz_is_theirs(eval_assets, tmp_path,
                                                                                    monkeypatch):
    from pytorch_fid.fid_score import calculate_fid_given_paths, compute_statistics_of_path
    from pytorch_fid.inception import InceptionV3

    a, b = eval_assets["a"], eval_assets["b"]
    itself = _fid(eval_assets, a, str(a), tmp_path / "self.json")
    assert itself["num_images"] == 6 and abs(itself["fid"]) < 1e-3, itself
    ours = _fid(eval_assets, a, str(b), tmp_path / "ab.json", "--save_reference_stats", str(tmp_path / "b.npz"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(eval_assets["hub"]))  # pytorch-fid reads the same file
    theirs = calculate_fid_given_paths([str(a), str(b)], batch_size=50, device="cpu", dims=2048, num_workers=0)
    assert theirs > 1e-3
    assert ours["fid"] == pytest.approx(theirs, rel=1e-3)
    # The .npz: pytorch-fid reads it, holds b's statistics, and FID against it is the same figure.
    model = InceptionV3([3]).eval()
    mu, sigma = compute_statistics_of_path(str(tmp_path / "b.npz"), model, 50, 2048, "cpu", 0)
    mu_b, sigma_b = compute_statistics_of_path(str(b), model, 50, 2048, "cpu", 0)
    # (float32 Inception in two processes with different thread counts: agreement to ~1e-6 of the scale)
    np.testing.assert_allclose(mu, mu_b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, sigma_b, rtol=1e-4, atol=1e-5)
    against_npz = _fid(eval_assets, a, str(tmp_path / "b.npz"), tmp_path / "anpz.json")
    assert against_npz["fid"] == pytest.approx(theirs, rel=1e-3)


@pytest.mark.slow
def test_clip_score_equals_open_clip_cosine(eval_assets, tmp_path):
    out = tmp_path / "clip.json"
    _evaluate("--images", str(eval_assets["a"]), "--prompts", str(eval_assets["captions_a"]), "--metrics", "clip",
              "--clip_model", str(eval_assets["clip_config"]), "--clip_pretrained", str(eval_assets["clip_weights"]),
              "--output", str(out))
    ours = json.loads(out.read_text())
    # Directly with open_clip: its model, preprocessing and tokenizer, one image at a time.
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip",
                                                                 pretrained=str(eval_assets["clip_weights"]))
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip")
    captions = eval_assets["captions_a"].read_text().splitlines()
    cosines = []
    with torch.no_grad():
        for path, caption in zip(sorted(eval_assets["a"].glob("*.png")), captions):
            image = model.encode_image(preprocess(Image.open(path).convert("RGB"))[None])
            text = model.encode_text(tokenizer([caption]))
            cosines.append(torch.nn.functional.cosine_similarity(image, text).item())
    assert ours["num_images"] == 6
    assert ours["clip_score"] == pytest.approx(float(np.mean(cosines)), rel=1e-4, abs=1e-6)
    assert "fid" not in ours


@pytest.mark.slow
def test_missing_weights_offline_is_one_line_naming_the_file_and_where_it_goes(tmp_path):
    empty_caches = {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    proc = _evaluate("--images", str(tmp_path), "--reference", str(tmp_path), "--metrics", "fid", check=False,
                     env=empty_caches)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert fid_clip.FID_WEIGHTS_FILE in lines[-1] and "fetch https://" in lines[-1] and "--fid_weights" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    proc = _evaluate("--images", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--metrics", "clip",
                     check=False, env=empty_caches)
    assert proc.returncode == 1 and "open_clip_pytorch_model.bin" in proc.stderr.strip().splitlines()[-1], \
        proc.stderr[-2000:]


@pytest.mark.slow
def test_generation_over_three_ranks_equals_one_rank_even_with_an_idle_rank(eval_assets, tmp_path):
    model = make_tiny_model(eval_assets["root"] / "model")
    prompts = eval_assets["root"] / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    common = ["--model", str(model), "--prompts", str(prompts), "--num_images", "4", "--batch_size", "2",
              "--steps", "2", "--resolution", "32", "--reference", str(eval_assets["b"]),
              "--fid_weights", str(eval_assets["fid_weights"]), "--clip_model", str(eval_assets["clip_config"]),
              "--clip_pretrained", str(eval_assets["clip_weights"]), "--guidance_scale", "8", "2"]
    one = _evaluate(*common, "--output", str(tmp_path / "one.json"), "--save_images", str(tmp_path / "img1"))
    _evaluate(*common, "--output", str(tmp_path / "three.json"), "--save_images", str(tmp_path / "img3"), nproc=3)
    r1, r3 = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "three.json").read_text())
    assert "guidance 8: fid" in one.stdout
    assert r3["world_size"] == 3 and r1["world_size"] == 1
    assert [r["guidance_scale"] for r in r1["results"]] == [8.0, 2.0]
    for x, y in zip(r1["results"], r3["results"]):
        assert x["num_images"] == y["num_images"] == 4
        assert x["fid"] == pytest.approx(y["fid"], rel=1e-9) and x["clip_score"] == pytest.approx(y["clip_score"],
                                                                                                   rel=1e-9)
    assert {k: r1[k] for k in ("fid", "clip_score", "num_images")} == {k: r1["results"][0][k] for k in
                                                                       ("fid", "clip_score", "num_images")}
    # Rank 2 had no batch (2 batches of 2 images over 3 ranks); the images are the same files, bit for bit.
    files = sorted(p.relative_to(tmp_path / "img1") for p in (tmp_path / "img1").rglob("*.png"))
    assert len(files) == 8
    for f in files:
        assert (tmp_path / "img1" / f).read_bytes() == (tmp_path / "img3" / f).read_bytes(), f


@pytest.mark.slow
def test_training_time_evaluation_on_more_ranks_than_images(eval_assets, tmp_path):
    """3 DeepSpeed ranks, 2 images per evaluation (batch 1): rank 2 draws nothing and must not hang the others."""
    from tests.helpers import run_sh, scalars, train_flags, write_tiny_shards

    shards = write_tiny_shards(tmp_path / "shards", num_shards=3, samples_per_shard=8)
    model = make_tiny_model(eval_assets["root"] / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n")
    out = tmp_path / "run"
    proc = run_sh(train_flags(out, shards, model, max_steps=2, save_steps=2, per_device_train_batch_size=2,
                              dataloader_num_workers=0, eval_steps=2, eval_prompts=prompts, eval_num_images=2,
                              eval_batch_size=1, eval_num_inference_steps=2, eval_reference=eval_assets["b"],
                              fid_weights=eval_assets["fid_weights"], clip_model=eval_assets["clip_config"],
                              clip_pretrained=eval_assets["clip_weights"]), nproc=3, timeout=900)
    log = proc.stdout + proc.stderr
    fid, clip = scalars(out / "runs", "eval/fid"), scalars(out / "runs", "eval/clip_score")
    assert [s for s, _ in fid] == [0, 2] and [s for s, _ in clip] == [0, 2], log[-3000:]
    assert all(np.isfinite(v) for _, v in fid + clip)
    assert "step 2 eval (2 images, guidance 8, 2 steps" in log


@pytest.mark.slow
def test_shard_reference_is_each_image_centre_cropped_and_prompts_are_their_captions(eval_assets, tmp_path):
    from PIL import Image

    from tests.helpers import write_tiny_shards

    shards = write_tiny_shards(tmp_path / "shards", num_shards=2, samples_per_shard=3, size=40)
    device = torch.device("cpu")
    inception = fid_clip.load_fid_inception(eval_assets["fid_weights"], device)
    mu, sigma = fid_clip.reference_statistics(str(shards), inception, None, batch_size=4, resolution=32,
                                              device=device)
    import webdataset as wds

    samples = list(wds.tarfile_samples([{"url": str(p)} for p in sorted(shards.glob("*.tar"))]))
    images = [fid_clip.center_crop_resize(Image.open(io.BytesIO(s["png"])).convert("RGB"), 32)
              for s in samples]
    assert images[0].size == (32, 32)
    features = np.concatenate([fid_clip.inception_features(inception, images[:4], device),
                               fid_clip.inception_features(inception, images[4:], device)])
    np.testing.assert_array_equal(mu, fid_clip.fid_statistics(features)[0])
    assert fid_clip.read_prompts(str(shards)) == [s["txt"].decode() for s in samples]


def test_a_reference_npz_of_the_wrong_keys_or_shapes_is_one_line_before_any_model_loads(tmp_path):
    """Issue 30: a --reference .npz that is not pytorch-fid's statistics is refused by name, with what it holds.
    Empty weight caches: had a model been loaded first, the error would be the missing Inception weights."""
    files = {
        "other_keys.npz": dict(mean=np.zeros(2048), cov=np.zeros((2048, 2048))),
        "other_shapes.npz": dict(mu=np.zeros(64), sigma=np.zeros((64, 64))),
        "non_finite.npz": dict(mu=np.full(2048, np.nan), sigma=np.eye(2048)),
    }
    expected = "expected mu [2048] and sigma [2048, 2048] (pytorch-fid's statistics, as --save_reference_stats writes them)"
    found = {"other_keys.npz": f"holds mean [2048] float64, cov [2048, 2048] float64; {expected}",
             "other_shapes.npz": f"holds mu [64] float64, sigma [64, 64] float64; {expected}",
             "non_finite.npz": f"mu or sigma holds NaN/inf; {expected}, finite",
             "one_array.npz": f"not an .npz archive; {expected}",
             "pickled.npz": "cannot read it (Object arrays cannot be loaded when allow_pickle=False); " + expected,
             "missing.npz": "no such file"}
    for name, arrays in files.items():
        np.savez(tmp_path / name, **arrays)
    with open(tmp_path / "one_array.npz", "wb") as f:
        np.save(f, np.zeros(2048))
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(2))
    empty_caches = {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    for name, what in found.items():
        proc = _evaluate("--images", str(tmp_path), "--reference", str(tmp_path / name), "--metrics", "fid",
                         check=False, env=empty_caches)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"python -m sd_ds.evaluate: error: --reference {tmp_path / name}: {what}"), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and fid_clip.FID_WEIGHTS_FILE not in proc.stderr
    # pytorch-fid's own statistics pass.
    np.savez(tmp_path / "good.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    mu, sigma = fid_clip.read_statistics(tmp_path / "good.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)

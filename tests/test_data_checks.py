"""Careless metadata beside the shards stops the trainer at its start with one line naming the file and the entry
(exit 2, no traceback, nothing written): sizes.json counts that are negative, zero, fractional, strings or absurd;
sources.json weights that are NaN, negative, infinite or strings; a latents.json whose dtype or shape was edited
so that it no longer describes its shards. Each case runs the real entry point, ``python -m sd_ds.train``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, free_port, subprocess_env, write_photo_shards

pytestmark = pytest.mark.slow  # a trainer start per case (imports torch, DeepSpeed, diffusers)


def train(shards: Path, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    """The trainer on ``shards``; its model does not exist, so a run that got past the data checks fails
    differently (and later)."""
    flags = ["--train_shards", str(shards), "--output_dir", str(out), "--pretrained_model_name_or_path",
             str(out.parent / "no_model"), "--resolution", "32", "--max_steps", "2", "--dataloader_num_workers", "0"]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sd_ds.train", *flags], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env=subprocess_env({"MASTER_PORT": str(free_port())}))
    return proc, time.monotonic() - started


def run_cases(root: Path, cases: dict[str, Path]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(train, shards, root / "out" / name) for name, shards in cases.items()}
        return {name: f.result()[0] for name, f in futures.items()}


def assert_one_clear_line(proc: subprocess.CompletedProcess, out: Path, *fragments: str) -> str:
    console = proc.stdout + proc.stderr
    assert proc.returncode == 2, console[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sd_ds.train: ")]
    assert len(lines) == 1, console[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in console, console[-3000:]
    assert not out.exists(), "the run wrote into output_dir before it stopped"
    return lines[0]


SIZES = {"negative": -5, "zero": 0, "a_string": "abc", "fractional": 2.5, "absurd": 10 ** 12, "a_bool": True}
WEIGHTS = {"nan": "NaN", "negative": "-1", "infinite": "Infinity", "a_string": '"heavy"'}


def test_bad_sizes_and_sources_entries_stop_the_trainer_with_one_line(tmp_path):
    cases: dict[str, Path] = {}
    for name, count in SIZES.items():
        d = tmp_path / f"sizes_{name}"
        write_photo_shards(d, [6, 6])
        (d / "sizes.json").write_text(json.dumps({"00000.tar": 6, "00001.tar": count}))
        cases[f"sizes_{name}"] = d
    d = tmp_path / "sizes_beyond_the_shard"  # more samples than the shard's bytes can hold
    write_photo_shards(d, [6, 6])
    (d / "sizes.json").write_text(json.dumps({"00000.tar": 6, "00001.tar": 100_000}))
    cases["sizes_beyond_the_shard"] = d
    d = tmp_path / "sizes_not_an_object"
    write_photo_shards(d, [6, 6])
    (d / "sizes.json").write_text("[6, 6]")
    cases["sizes_not_an_object"] = d
    for name, weight in WEIGHTS.items():
        d = tmp_path / f"weight_{name}"
        write_photo_shards(d, [6, 6])
        (d / "sources.json").write_text(
            '{"sources": [{"name": "a", "weight": 1.0, "shards": ["00000.tar"], "samples": 6}, '
            f'{{"name": "b", "weight": {weight}, "shards": ["00001.tar"], "samples": 6}}]}}')
        cases[f"weight_{name}"] = d
    d = tmp_path / "samples_disagree"  # sources.json's count against sizes.json's
    write_photo_shards(d, [6, 6])
    (d / "sources.json").write_text(json.dumps({"sources": [
        {"name": "a", "weight": 1.0, "shards": ["00000.tar", "00001.tar"], "samples": 13}]}))
    cases["samples_disagree"] = d

    results = run_cases(tmp_path, cases)
    out = tmp_path / "out"
    for name, count in SIZES.items():
        assert_one_clear_line(results[f"sizes_{name}"], out / f"sizes_{name}", f"{tmp_path}/sizes_{name}/sizes.json",
                              f'"00001.tar": {count!r}', "is not a sample count")
    assert_one_clear_line(results["sizes_beyond_the_shard"], out / "sizes_beyond_the_shard", "sizes.json",
                          '"00001.tar"', "100,000 samples cannot fit")
    assert_one_clear_line(results["sizes_not_an_object"], out / "sizes_not_an_object", "sizes.json",
                          "expected an object")
    for name in WEIGHTS:
        assert_one_clear_line(results[f"weight_{name}"], out / f"weight_{name}",
                              f"{tmp_path}/weight_{name}/sources.json", 'source "b"', "is not a mixture weight")
    assert_one_clear_line(results["samples_disagree"], out / "samples_disagree", "sources.json", 'source "a"',
                          "says 13 samples", "12 by sizes.json")


def test_a_latents_json_that_disagrees_with_its_shards_stops_the_trainer_with_one_line(tmp_path):
    import torch
    from diffusers import AutoencoderKL

    from sd_ds.presets import TINY_VAE
    from tests.test_latents import encode_flags, encode_in_process

    images, encoded = tmp_path / "images", tmp_path / "encoded"
    write_photo_shards(images, [5, 4])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    assert encode_in_process(encode_flags(images, encoded, tmp_path / "vae")) == 0
    manifest = json.loads((encoded / "latents.json").read_text())
    assert manifest["dtype"] == "fp16"
    edits = {"dtype_bf16": {"dtype": "bf16"}, "dtype_unknown": {"dtype": "fp8"},
             "shape": {"shape": [manifest["shape"][0], manifest["shape"][1] // 2, manifest["shape"][2] // 2]},
             "shape_not_a_shape": {"shape": [8, -1]}}
    cases = {}
    for name, edit in edits.items():
        d = tmp_path / name
        shutil.copytree(encoded, d)
        (d / "latents.json").write_text(json.dumps({**manifest, **edit}))
        cases[name] = d
    results = run_cases(tmp_path, cases)
    out = tmp_path / "out"
    assert_one_clear_line(results["dtype_bf16"], out / "dtype_bf16", f"{tmp_path}/dtype_bf16/latents.json",
                          "disagrees with its shards", "dtype bf16", "written as dtype fp16")
    assert_one_clear_line(results["dtype_unknown"], out / "dtype_unknown", "latents.json", "dtype 'fp8' is not one of")
    assert_one_clear_line(results["shape"], out / "shape", "latents.json", "disagrees with its shards",
                          f"{edits['shape']['shape']}")
    assert_one_clear_line(results["shape_not_a_shape"], out / "shape_not_a_shape", "latents.json",
                          "shape [8, -1] is not")

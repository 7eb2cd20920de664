"""``python -m sd_ds.encode_latents`` on source shards whose member names climb out of the folder (``../../x``) or
are absolute (``/abs/x``): those samples are skipped and counted, never copied into the latent shards (whoever
extracts them would write outside their folder); the other samples are encoded."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import torch

from tests.helpers import encode_image, photos, subprocess_env


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def test_member_names_outside_the_folder_are_skipped_not_copied(tmp_path):
    from diffusers import AutoencoderKL

    from sd_ds.presets import TINY_VAE

    images, out = tmp_path / "images", tmp_path / "work" / "latents"
    images.mkdir()
    (tmp_path / "work").mkdir()
    keys = {"000000000": "000000000", "000000001": "../../evil", "000000002": "000000002",
            "000000003": "/abs/evil", "000000004": "000000004", "000000005": "dir/./x"}
    with tarfile.open(images / "00000.tar", "w") as tf:
        for i, (key, name) in enumerate(keys.items()):
            add(tf, f"{name}.jpg", encode_image(photos()[i % 5].resize((40, 40)), "JPEG"))
            add(tf, f"{name}.txt", f"a photo {key}".encode())
    (images / "sizes.json").write_text(json.dumps({"00000.tar": len(keys)}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")

    proc = subprocess.run([sys.executable, "-m", "sd_ds.encode_latents", "--train_shards", str(images),
                           "--output_dir", str(out), "--vae_name_or_path", str(tmp_path / "vae"), "--resolution", "32",
                           "--batch_size", "2", "--dataloader_num_workers", "0", "--disable_tqdm"],
                          cwd=tmp_path / "work", capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with tarfile.open(out / "00000.tar") as tf:
        names = tf.getnames()
    assert names and all(not n.startswith("/") and ".." not in n.split("/") and "/./" not in n for n in names), names
    assert {n.split(".", 1)[0] for n in names} == {"000000000", "000000002", "000000004"}
    manifest = json.loads((out / "latents.json").read_text())
    assert manifest["samples"] == 3 and manifest["skipped"] == {"unsafe_member_name": 3}
    assert "unsafe_member_name" in proc.stdout + proc.stderr and "'../../evil'" in proc.stdout + proc.stderr
    # nothing was written outside the output folder
    assert not list(tmp_path.rglob("evil*")) and not (tmp_path.parent / "evil.moments").exists()

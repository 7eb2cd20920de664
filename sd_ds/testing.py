"""Fixtures shared by tests/ and bench/: free ports, tiny shards (drawn shapes, real photos), a tiny model dir,
and launching the trainer through the real launchers (run.sh → deepspeed → sd_ds.train).

Part of the package so that bench scripts import it like any module (the checkout is installed editable by
tools/setup_env.sh): no script edits sys.path. ``REPO_ROOT`` is the checkout this module lives in."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from sd_ds.shapes import COLORS, SHAPES, caption_of, draw_shape, image_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout (sd_ds/..)


# Ports handed out for servers a child process will start (rendezvous, sshd, HTTP, clusters): below Linux's
# ephemeral range (32768-60999), so that no outgoing connection of another process takes one between the check
# here and the child's bind; a block of its own per pytest-xdist worker, so that two workers never hand out the
# same port.
_PORT_BASE, _PORT_BLOCK, _PORT_BLOCKS = 20000, 1000, 12
_next_port: Optional[int] = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, new to this process."""
    global _next_port
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    block = _PORT_BASE + _PORT_BLOCK * (int(worker[2:]) % _PORT_BLOCKS if worker[2:].isdigit() else 0)
    if _next_port is None:  # processes of one worker (tests, bench scripts, workers) start at different ports
        _next_port = random.Random(os.getpid()).randrange(_PORT_BLOCK)
    for _ in range(_PORT_BLOCK):
        port = block + _next_port % _PORT_BLOCK
        _next_port += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {block}-{block + _PORT_BLOCK - 1}")


def scratch_dir(prefix: str) -> Path:
    """A new temporary directory, removed when the process exits (atexit: sd_ds.lifecycle.end_process runs it)."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def write_tiny_shards(out_dir: Path, *, num_shards: int = 4, samples_per_shard: int = 16, size: int = 40,
                      seed: int = 0) -> Path:
    """Converter-layout shards of drawn shapes (PNG) with captions, plus sizes.json."""
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colors = list(COLORS)
    sizes = {}
    key = 0
    for shard in range(num_shards):
        name = f"{shard:05d}.tar"
        with wds.TarWriter(str(out_dir / name)) as sink:
            for i in range(samples_per_shard):
                c, s = rng.choice(colors), rng.choice(SHAPES)
                b = rng.choice([x for x in ("red", "blue", "white", "black") if x != c])
                img = draw_shape(c, s, b, rng, size=size)
                cap = caption_of(c, s, b)
                k = f"{shard:05d}{i:04d}"
                sink.write({"__key__": k, "png": image_bytes(img, "PNG"), "txt": cap,
                            "json": json.dumps({"key": k, "caption": cap, "width": size, "height": size})})
                key += 1
        sizes[name] = samples_per_shard
    (out_dir / "sizes.json").write_text(json.dumps(sizes))
    return out_dir


_PHOTOS: list = []


def photos() -> list:
    """Five of the photos scikit-image ships, as RGB PIL images."""
    if not _PHOTOS:
        from PIL import Image
        from skimage import data as skdata

        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
            _PHOTOS.append(Image.fromarray(getattr(skdata, name)()[..., :3]))
    return _PHOTOS


def encode_image(img, fmt: str) -> bytes:
    """A PIL image as JPEG (q90), PNG or WEBP bytes."""
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def photo_sample(key: str, rng: random.Random, *, size: Optional[tuple[int, int]] = None) -> dict:
    """A webdataset sample: a random crop of a photo resized to `size` (default 36..80 px a side), caption, json."""
    from PIL import Image

    photo = rng.choice(photos())
    w, h = size or (rng.randint(36, 80), rng.randint(36, 80))
    side = int(min(photo.size) * rng.uniform(0.5, 1.0))
    x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
    img = photo.crop((x, y, x + side, y + side)).resize((w, h), Image.Resampling.LANCZOS)
    fmt, ext = rng.choice([("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
    return {"__key__": key, ext: encode_image(img, fmt), "txt": f"a photo number {key}",
            "json": json.dumps({"key": key, "width": w, "height": h})}


def write_photo_shards(out: Path, shard_sizes: list[int], *, first_shard: int = 0, seed: int = 0,
                       sizes_json: bool = True, special: Optional[dict[str, dict]] = None) -> list[str]:
    """Photo samples in the converter layout: OUT/NNNNN.tar with 9-digit keys (shard*10^4 + index), sizes.json.
    `special` replaces the sample of a key (corrupt, too small, ...). Returns all keys."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes, keys = {}, []
    sizes_path = out / "sizes.json"
    if sizes_path.is_file():
        sizes = json.loads(sizes_path.read_text())
    for shard, n in enumerate(shard_sizes, start=first_shard):
        name = f"{shard:05d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in range(n):
                key = f"{shard * 10_000 + i:09d}"
                sample = (special or {}).get(key) or photo_sample(key, rng)
                sink.write({"__key__": key, **{k: v for k, v in sample.items() if k != "__key__"}})
                keys.append(key)
        sizes[name] = n
    if sizes_json:
        sizes_path.write_text(json.dumps(sizes))
    return keys


def make_tiny_model(out_dir: Path) -> Path:
    if not (out_dir / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "sd_ds.init", "--output_dir", str(out_dir), "--preset", "tiny",
                        "--seed", "0"], check=True, cwd=REPO_ROOT, env=subprocess_env())
    return out_dir


def subprocess_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                # the checkout first; kept after it: packages on the caller's path (e.g. wheels unpacked there)
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    env.update(extra or {})
    return env


def train_flags(output_dir: Path, shards: Path, model: Path, **overrides) -> list[str]:
    flags = {
        "output_dir": output_dir, "train_shards": shards, "pretrained_model_name_or_path": model,
        "resolution": 32, "center_crop": "True", "min_size": 32, "per_device_train_batch_size": 4,
        "learning_rate": 1e-3, "max_steps": 6, "logging_steps": 1, "image_logging_steps": 0, "save_steps": 3,
        "dataloader_num_workers": 1, "shuffle_block": 16, "seed": 0, "disable_tqdm": "True",
        # Explicit: the multi-rank tests check ZeRO-2 bf16 semantics on every CPU (without it, CPUs lacking
        # native bf16 would train them in fp32: sd_ds.precision).
        "bf16": "True",
    }
    flags.update(overrides)
    out = []
    for k, v in flags.items():
        if v is None:
            continue
        out.append(f"--{k}")
        if isinstance(v, (list, tuple)):
            out += [str(x) for x in v]
        elif v is not True:
            out.append(str(v))
    return out


def run_sh(flags: list[str], *, nproc: int, timeout: float = 600, extra_env: Optional[dict] = None,
           check: bool = True) -> subprocess.CompletedProcess:
    env = subprocess_env({"NPROC_PER_NODE": str(nproc), "MASTER_PORT": str(free_port()), **(extra_env or {})})
    proc = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), *flags], cwd=REPO_ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.sh failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def fp32_weights(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)

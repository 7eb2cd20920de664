"""Shared test helpers: tiny shards, tiny model dir, launching the trainer through the real launchers."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_shards(out_dir: Path, *, num_shards: int = 4, samples_per_shard: int = 16, size: int = 40,
                      seed: int = 0) -> Path:
    """Converter-layout shards of drawn shapes (PNG) with captions, plus sizes.json."""
    import webdataset as wds

    from sd_ds.demo import COLORS, SHAPES, caption_of, draw_shape, encode

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
                sink.write({"__key__": k, "png": encode(img, "PNG"), "txt": cap,
                            "json": json.dumps({"key": k, "caption": cap, "width": size, "height": size})})
                key += 1
        sizes[name] = samples_per_shard
    (out_dir / "sizes.json").write_text(json.dumps(sizes))
    return out_dir


def make_tiny_model(out_dir: Path) -> Path:
    if not (out_dir / "model_index.json").is_file():
        subprocess.run([sys.executable, "-m", "sd_ds.init", "--output_dir", str(out_dir), "--preset", "tiny",
                        "--seed", "0"], check=True, cwd=REPO_ROOT, env=subprocess_env())
    return out_dir


def subprocess_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra or {})
    return env


def train_flags(output_dir: Path, shards: Path, model: Path, **overrides) -> list[str]:
    flags = {
        "output_dir": output_dir, "train_shards": shards, "pretrained_model_name_or_path": model,
        "resolution": 32, "center_crop": "True", "min_size": 32, "per_device_train_batch_size": 4,
        "learning_rate": 1e-3, "max_steps": 6, "logging_steps": 1, "image_logging_steps": 0, "save_steps": 3,
        "dataloader_num_workers": 1, "shuffle_buffer": 16, "seed": 0, "disable_tqdm": "True",
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

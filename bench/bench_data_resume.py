#!/usr/bin/env python
"""Resume cost vs the position resumed from: bytes read from storage and time to the first batch, before (the
replaying loader of main: sd_ds/data.py at git revision --before, skipping every consumed raw sample) and after
(sd_ds.data: each reader opens its shard at the sample).

    python bench/bench_data_resume.py                  # 100 shards of 100 photo samples, resumes at 0..9,000

After: shards served by a loopback HTTP server (tests/object_stores.py) that counts the bytes it sends. Before:
the old loader reads local files only (URLs needed a hand-set --samples_per_epoch), so its bytes are the read()
bytes of the process (/proc/self/io rchar), on the same shards.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")



def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def old_module(revision: str):
    src = subprocess.run(["git", "show", f"{revision}:sd_ds/data.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    from sd_ds.testing import scratch_dir
    path = scratch_dir("bench_data_resume_") / "sd_ds_data_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("sd_ds_data_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def first_batch_after(build, position: int, micro_batch: int, bytes_read) -> tuple[float, int]:
    """Take position // micro_batch batches, save, resume in a new loader: (seconds to its first batch, bytes
    read meanwhile according to ``bytes_read()``, a running count)."""
    first = build()
    it = iter(first)
    for _ in range(position // micro_batch):
        next(it)
    state = first.state_dict()
    it.close()
    resumed = build()
    resumed.load_state_dict(state)
    r0, t0 = bytes_read(), time.perf_counter()
    it = iter(resumed)
    next(it)
    elapsed, read = time.perf_counter() - t0, bytes_read() - r0
    it.close()
    return elapsed, read


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--per_shard", type=int, default=100)
    p.add_argument("--positions", type=int, nargs="+", default=[0, 2060, 5080, 9040])
    p.add_argument("--block", type=int, default=20, help="--shuffle_block")
    p.add_argument("--before", default="main", help="git revision of the replaying loader (sd_ds/data.py)")
    args = p.parse_args()

    from transformers import CLIPTokenizer

    from sd_ds.config import DataConfig
    from sd_ds.conditioning import CaptionTokenizer
    from sd_ds.data import build_train_loader
    from sd_ds.data.index import main as index_main
    from sd_ds.models import CLIP_TOKENIZER_DIR
    from sd_ds.testing import write_photo_shards
    from tests.object_stores import HTTPFileServer

    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    mb = 4
    old = old_module(args.before)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        write_photo_shards(shards, [args.per_shard] * args.shards)
        total_bytes = sum(p.stat().st_size for p in shards.glob("*.tar"))
        shard_bytes = total_bytes / args.shards
        cfg = dict(resolution=32, dataloader_num_workers=0, shuffle_block=args.block, caption_dropout_prob=0.0)
        with HTTPFileServer(shards) as http:
            def new():
                return build_train_loader(DataConfig(train_shards=[http.url()], **cfg),
                                          tokenize=CaptionTokenizer((tokenizer,), 77), micro_batch_size=mb, seed=0)

            def before():
                return old.build_train_loader(DataConfig(train_shards=[str(shards)], **cfg), tokenizer=tokenizer,
                                              model_max_length=77, micro_batch_size=mb, seed=0)

            served = lambda: sum(n for _, path, n in http.requests if path.endswith(".tar"))  # noqa: E731
            for position in args.positions:
                t_old, old_bytes = first_batch_after(before, position, mb, rchar)
                t_new, new_bytes = first_batch_after(new, position, mb, served)
                rows.append([position, old_bytes, t_old, new_bytes, t_new])
            index_main([str(shards)])  # member indexes: a reader seeks to its sample
            for row in rows:
                row += first_batch_after(new, row[0], mb, served)[::-1]
                print(f"position {row[0]}: before {row[1] / 1e6:.1f} MB {row[2]:.2f} s; after {row[3] / 1e6:.2f} MB "
                      f"{row[4]:.2f} s; indexed {row[5] / 1e6:.3f} MB {row[6]:.2f} s", file=sys.stderr)
    lines = [
        "", "### Resume: bytes read and time to the first batch vs the position resumed from", "",
        f"{datetime.date.today().isoformat()} · {platform.machine()}, {os.cpu_count()} cores (shared) · "
        f"`{' '.join(['python bench/bench_data_resume.py', *sys.argv[1:]])}`", "",
        f"{args.shards} shards of {args.per_shard} photo samples (36-80 px JPEG/PNG/WebP, {shard_bytes / 1e3:.0f} kB a "
        f"shard), one reader, micro batch {mb}, shuffle block {args.block}. Before: the loader of `{args.before}` "
        f"(replays and skips every consumed raw sample; local files, bytes = what the process read() from "
        f"iterating the resumed loader to its first batch, /proc/self/io). After: the shards over HTTP, bytes = "
        f"what the server sent to the resumed loader; then the same after `python -m sd_ds.data.index` wrote "
        f"each shard's member index.", "",
        "| resumed at sample | before: bytes read | before: s | after: bytes from the server | after: s | "
        "after, with member index: bytes | with index: s |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for position, old_bytes, t_old, new_bytes, t_new, idx_bytes, t_idx in rows:
        lines.append(f"| {position:,} | {old_bytes / 1e6:.1f} MB | {t_old:.2f} | {new_bytes / 1e6:.2f} MB | "
                     f"{t_new:.2f} | {idx_bytes / 1e6:.3f} MB | {t_idx:.2f} |")
    lines += ["", f"After: at most the shard holding the position ({shard_bytes / 1e6:.2f} MB here), whatever the "
              f"position: without an index the samples before it in that shard are read and dropped; with one the "
              f"reader seeks to the first sample its block needs (fsspec's 4 MiB readahead then fetches the rest of "
              f"these small shards in the same request)."]
    print("\n".join(lines))  # the rows of BENCHMARKS.md section 12 (under bench_data_plan.py's table)

if __name__ == "__main__":
    main()

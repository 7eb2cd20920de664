"""Figure 14: the demo in six minutes — which cheaper recipes keep its prompt following, and where its time goes.

    python bench/bench_demo_speed.py --parts unet [--unet_configs 800 b128x800 ...] [--write]
    python bench/bench_demo_speed.py --demo_log LABEL=demo.log --write     # a real ./run.sh demo's stage times

- unet: the demo's UNet training replicated in one process, one thread (``bench_demo_quality.train_unet``: the
  demo's data, objective, AdamW, cosine schedule, EMA, caption dropout, 16-token context; fp32, VAE moments
  computed once), for recipes that see fewer samples or take fewer optimizer steps than the 1,600 x 64 the demo
  used, each scored by the demo's scorer (``sd_ds.shapes.score_images``) at guidance 5, EMA and raw weights. CPU s:
  this process's training loop; configurations compare with each other (run on the same day and machine), not
  with the trainer's wall time.
- trainer_run: the real trainer's step time (``./run.sh`` on the demo's shards or latent shards, DeepSpeed ZeRO-2,
  CPU ranks), read from each run's ``time_breakdown.json`` and ``trainer_state.json``: micro batch, ranks,
  precision, images or latents, run one after the other on an otherwise idle machine.
- demo_log: the stage times a real ``./run.sh`` printed (``[demo] N/7 ... [T s]``) and the score it wrote.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch
from bench_demo_quality import (UNetConfig, demo_training_data, measure_once, parse_measurement_args,
                                run_unet_config)
from benchmarks_md import publish

SECTION = "## 14. The demo in six minutes"
V = "v_prediction"
SPEED_CONFIGS = {  # name: what changes against the 1,600 x 64 recipe (lr 2e-3) the demo had
    "1600x64": UNetConfig("demo", V, 1600, 2e-3),
    "800": UNetConfig("demo", V, 800, 2e-3),
    "800+lr3": UNetConfig("demo", V, 800, 3e-3),
    "800+snr5": UNetConfig("demo", V, 800, 2e-3, snr_gamma=5.0),
    "600+attn8": UNetConfig("demo", V, 600, 2e-3, unet_blocks="attn8"),
    "800+attn8": UNetConfig("demo", V, 800, 2e-3, unet_blocks="attn8"),
    "b32": UNetConfig("demo", V, 1600, 2e-3, batch_size=32),
    "b128x600+ema99": UNetConfig("demo", V, 600, 2e-3, batch_size=128, ema_decay=0.99),
    "b128x800": UNetConfig("demo", V, 800, 2e-3, batch_size=128),
    "b128x800+ema99": UNetConfig("demo", V, 800, 2e-3, batch_size=128, ema_decay=0.99),
    "b128x800+lr3": UNetConfig("demo", V, 800, 3e-3, batch_size=128),
}
GUIDANCE = "5.0"


def _cells(s: dict) -> str:
    return f"{s['shape_color_pct']:.0f} / {s['background_color_pct']:.0f} / {s['shape_pct']:.0f}"


def stage_times(log: str) -> list[tuple[str, float]]:
    """[(stage title, seconds it took)] from the ``[demo] N/7 title  [T s]`` lines and the final ``done in T s``."""
    marks = [(m.group(1), float(m.group(2))) for m in re.finditer(r"^\[demo\] (\d/\d [^\[]*?)\s+\[(\d+) s\]$", log, re.M)]
    done = re.search(r"^\[demo\] done in (\d+) s$", log, re.M)
    if done:
        marks.append(("end", float(done.group(1))))
    return [(title, marks[i + 1][1] - t) for i, (title, t) in enumerate(marks[:-1])]


def render(results: dict) -> str:
    lines = [SECTION, "",
             f"`python bench/bench_demo_speed.py --parts unet` ({dt.date.today()}, {platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}). The demo's UNet training replicated in one "
             "process, one thread (see the script), for recipes cheaper than the 1,600 steps of 64 the demo had; "
             "each scored by the demo's scorer at guidance 5 (held-out then trained combinations, shape colour / "
             "background colour / shape in %, chance 13 / 17 / 33; 48 images per cell, one image is 2 points). "
             "*attn8*: cross-attention at the 8x8 latent level too. *ema99*: EMA decay 0.99 instead of 0.995.", "",
             "| recipe | steps | batch | samples | lr | other | held-out (EMA) | trained (EMA) | held-out (raw) | "
             "trained (raw) | CPU s |", "| --- " * 11 + "|"]
    for name in SPEED_CONFIGS:
        r = results.get(f"unet_{name}")
        if r is None:
            continue
        other = ", ".join(x for x in (f"snr_gamma {r['snr_gamma']:g}" if r.get("snr_gamma") else "",
                                      r.get("unet_blocks", "tiny") if r.get("unet_blocks", "tiny") != "tiny" else "",
                                      f"EMA {r['ema_decay']:g}" if r.get("ema_decay", 0.995) != 0.995 else "") if x)
        raw = r.get("scores_raw", {}).get(GUIDANCE)
        lines.append(f"| {name} | {r['steps']} | {r['batch_size']} | {r['steps'] * r['batch_size']:,} | "
                     f"{r['lr']:g} | {other or '-'} | {_cells(r['scores'][GUIDANCE]['held_out'])} | "
                     f"{_cells(r['scores'][GUIDANCE]['trained'])} | "
                     f"{_cells(raw['held_out']) if raw else '-'} | {_cells(raw['trained']) if raw else '-'} | "
                     f"{r['train_cpu_s']:.0f} |")
    lines.append("")
    runs = sorted((r for k, r in results.items() if k.startswith("trainer_")), key=lambda r: r["order"])
    if runs:
        lines += ["**The trainer's step** at the demo's settings (tiny preset, 32 px, EMA, logging every 25 steps; "
                  "`./run.sh` on the demo's shards, one run after another on the idle machine; threads = cores / "
                  "ranks unless stated):", "",
                  "| run | ranks | micro batch | global batch | data | precision | steps | s/step | images/s |",
                  "| --- " * 9 + "|"]
        for r in runs:
            lines.append(f"| {r['label']} | {r['ranks']} | {r['micro_batch']} | {r['global_batch']} | {r['data']} | "
                         f"{r['precision']} | {r['steps']} | {r['wall_s'] / r['steps']:.3f} | "
                         f"{r['global_batch'] * r['steps'] / r['wall_s']:.0f} |")
        lines.append("")
    for key, r in sorted(results.items()):
        if not key.startswith("demo_"):
            continue
        lines += [f"**A real demo, `{r['label']}`** ({r['date']}): `./run.sh` on a fresh clone, stage by stage "
                  f"(total {r['total_s']:.0f} s):", "", "| stage | s |", "| --- | ---: |"]
        lines += [f"| {title} | {s:.0f} |" for title, s in r["stages"]]
        if r.get("score"):
            lines += ["", f"Its score: held-out {_cells(r['score']['held_out'])}, trained "
                          f"{_cells(r['score']['trained'])}."]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="*", default=[], choices=["unet"])
    p.add_argument("--unet_configs", nargs="+", default=list(SPEED_CONFIGS), choices=list(SPEED_CONFIGS))
    p.add_argument("--demo_log", action="append", default=[], metavar="LABEL=LOG",
                   help="a real demo's console log (with prompt_following.json beside --demo_output); repeatable")
    p.add_argument("--trainer_run", action="append", default=[], metavar="LABEL=OUTPUT_DIR",
                   help="a finished trainer run to add to the step-time table; repeatable")
    p.add_argument("--demo_output", type=Path, default=None, help="the demo's --output (for its score)")
    a = parse_measurement_args(p, argv, "sd_ds_bench_demo_speed")
    if "unet" in a.parts:
        data = demo_training_data()
        with tempfile.TemporaryDirectory() as tmp:
            for name in a.unet_configs:
                measure_once(a, f"unet_{name}", lambda: run_unet_config(name, Path(tmp), data, configs=SPEED_CONFIGS))
    for order, item in enumerate(a.trainer_run):
        label, sep, run_dir = item.partition("=")
        if not sep:
            p.error(f"--trainer_run wants LABEL=OUTPUT_DIR (got {item!r})")
        run_dir = Path(run_dir)
        timing = json.loads((run_dir / "time_breakdown.json").read_text())
        state = json.loads(sorted(run_dir.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
        cfg = state["config"]
        latents = any((Path(s) / "latents.json").is_file() for s in cfg["data"]["train_shards"])
        (a.results / f"trainer_{label}.json").write_text(json.dumps({
            "label": label, "order": order, "ranks": state["world_size"], "micro_batch": cfg["optim"]["per_device_train_batch_size"],
            "global_batch": state["global_batch_size"], "data": "latents" if latents else "images",
            "precision": "bf16" if cfg["optim"]["bf16"] else "fp32", "steps": timing["steps"],
            "wall_s": timing["wall_s"]}, indent=1))
    for item in a.demo_log:
        label, sep, log = item.partition("=")
        if not sep:
            p.error(f"--demo_log wants LABEL=LOG (got {item!r})")
        text = Path(log).read_text(errors="replace")
        stages = stage_times(text)
        score_file = a.demo_output / "prompt_following.json" if a.demo_output else None
        (a.results / f"demo_{label}.json").write_text(json.dumps({
            "label": label, "date": str(dt.date.today()), "stages": stages, "total_s": sum(s for _, s in stages),
            "score": json.loads(score_file.read_text()) if score_file and score_file.is_file() else None}, indent=1))
    results = {f.stem: json.loads(f.read_text()) for f in sorted(a.results.glob("*.json"))}
    publish(render(results), write=a.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

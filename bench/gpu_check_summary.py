"""The summary of a bench/gpu_check.sh run: issue 33's goals beside the figures, then each benchmark's table.

    python bench/gpu_check_summary.py OUT > OUT/summary.md

Reads the bench_*.json files bench/gpu_check.sh wrote into OUT; a missing or failed row says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

# BENCHMARKS section 5 (2026-12-04, one H200, SD v1 at 256 px, micro batch 64): the figures issue 33 starts from.
H200_BASELINE = {"sd-ds": 244.9, "sd-ds latents": 341.7}
MLPERF_SD2_IMAGES_PER_S = 139.5  # NVIDIA, MLPerf Training v4.1, per H200 (8 GPUs, micro batch 32)


def load(out: Path, name: str) -> Optional[dict]:
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def rows(result: Optional[dict]) -> dict[str, dict]:
    """label -> row, for every contender row of a bench result."""
    if result is None:
        return {}
    return {k: v for k, v in result.items() if isinstance(v, dict) and ("images_per_s" in v or "error" in v)}


def figure(row: Optional[dict]) -> str:
    if row is None:
        return "not run"
    if "error" in row:
        return f"failed ({row['error']})"
    mfu = f", MFU UNet {100 * row['mfu_unet']:.1f} %" if row.get("mfu_unet") else ""
    return (f"{row['images_per_s']:,.1f} img/s ({row['images_per_s_min']:,.1f}-{row['images_per_s_max']:,.1f}){mfu}, "
            f"peak {row['peak_memory_gb']:.1f} GB")


def best(candidates: dict[str, dict]) -> tuple[Optional[str], Optional[dict]]:
    good = {k: v for k, v in candidates.items() if "images_per_s" in v}
    if not good:
        return (next(iter(candidates), None), next(iter(candidates.values()), None))
    label = max(good, key=lambda k: good[k]["images_per_s"])
    return label, good[label]


def named(label: Optional[str]) -> str:
    return f"best row `{label}`: " if label else ""


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python bench/gpu_check_summary.py OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    v1, v2 = load(out, "bench_sd-v1_256.json"), load(out, "bench_sd-v2_512.json")
    xl, compiled = load(out, "bench_sdxl_1024.json"), load(out, "bench_compile_256.json")
    device = next((r["device"] for r in (v1, v2, xl, compiled) if r), "no benchmark ran")
    h200 = device.startswith("NVIDIA H200")
    lines = [f"# gpu_check summary: {device}", "", "## Issue 33's goals", ""]

    label, row = best({k: v for k, v in rows(v2).items() if k.startswith("sd-ds latents")})
    verdict = "" if row is None or "images_per_s" not in row else (
        f" = {row['images_per_s'] / MLPERF_SD2_IMAGES_PER_S:.2f} x MLPerf v4.1's {MLPERF_SD2_IMAGES_PER_S} img/s per "
        f"H200: goal {'met' if row['images_per_s'] >= 140 else 'not met'}{'' if h200 else ' (not an H200: compare on one)'}")
    lines.append(f"- SD 2.x at 512 px on latents >= 140 img/s per H200: {named(label)}{figure(row)}{verdict}")

    v1_rows = rows(v1)
    label, row = best({k: v for k, v in v1_rows.items() if k.startswith("sd-ds latents")})
    goal = 1.5 * H200_BASELINE["sd-ds latents"]
    verdict = "" if row is None or "images_per_s" not in row else (
        f" = {row['images_per_s'] / H200_BASELINE['sd-ds latents']:.2f} x the 2026-12-04 H200's 341.7: goal (>= "
        f"{goal:.1f}) {'met' if row['images_per_s'] >= goal else 'not met'}{'' if h200 else ' (not an H200: compare on one)'}")
    lines.append(f"- SD v1 at 256 px on latents >= 1.5 x 341.7 img/s (same GPU kind): {named(label)}{figure(row)}"
                 f"{verdict}")
    for name, then in H200_BASELINE.items():
        now = v1_rows.get(name)
        if now is not None and "images_per_s" in now:
            lines.append(f"  - baseline rerun `{name}`: {now['images_per_s']:,.1f} img/s here (2026-12-04 H200: "
                         f"{then})")
    crow = rows(compiled).get("sd-ds --compile")
    lines.append("- cold compile <= 120 s: " + ("not run" if crow is None else f"failed ({crow['error']})"
                                                 if "error" in crow else
                                                 f"`sd-ds --compile` warm-up (compiling) {crow['warmup_s']:.0f} s, "
                                                 f"process {crow['process_s']:.0f} s, then {figure(crow)}"))
    label, row = best(rows(xl))
    setting = f" (micro batch {xl['micro_batch_size']}, trainer flags '{xl['trainer_flags']}')" if xl else ""
    lines.append(f"- SDXL at 1024 px{setting}: {named(label)}{figure(row)}")
    for result in (v1, v2, xl, compiled):
        if result is not None:
            lines += ["", result["markdown"].replace("## ", "### ", 1)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

#!/usr/bin/env bash
# The GPU checks as one prepared run (~7-9 min on one H100/H200; stops starting stages at TOTAL_S): `pytest -m gpu`,
# then bench/bench_gpu_throughput.py (random weights from configs: nothing downloaded) for the rows of BENCHMARKS
# sections 5, 25 and 26:
#   1. SD v1 at 256 px, micro batch 64: the baseline (diffusers loop, sd-ds online, sd-ds on latents, as in section 5's
#      2026-12-04 H200 run) beside sd-ds on latents + stored text conditioning, with a profiler trace of one step of
#      the first two;
#   2. SD 2.x at 512 px on latents, micro batch 32 and 64 (MLPerf Training's configuration; 139.5 img/s per H200 is
#      NVIDIA's v4.1 rate): sd-ds latents and latents+text;
#   3. SDXL at 1024 px on latents + stored text, micro batch 8 with --recompute (fits 80 GB; SDXL_MB, SDXL_FLAGS);
#   4. with the time left, the compiled row (sd-ds --compile at 256 px);
# then summary.md: each goal of issue 33 beside its figure. Every stage has its own `timeout`, and a stage that
# cannot get its minimum time before TOTAL_S is skipped (said in the log), so one hang costs only its stage. Rerun
# it as it is: it writes only into $OUT, whose files it replaces.
#
#   OUT=/some/dir PYTHON=/path/to/python3 bash bench/gpu_check.sh   # from the repository root, on the GPU machine
#   OUT=/tmp/x bash bench/gpu_check.sh --cpu                        # the same stages on CPU, tiny presets (~3-6 min)
#   OUT=/tmp/x bash bench/gpu_check.sh --dry-run                    # print the stages' commands and limits only
#
# Through the device tool (a machine without internet, whose image lacks deepspeed, diffusers, webdataset, ...):
# download the wheels of bench/gpu_wheels.txt into .whl/ here once (command in that file), then run
#   run(command="OUT=$OUT bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# The script installs .whl/*.whl into /tmp/site (pip --no-index --no-deps --target) when deepspeed is missing.
#
# Writes into $OUT (8 files, none in sub-folders): gpu_check.log (everything, figures as they come), summary.md,
# bench_sd-v1_256.json, bench_sd-v2_512.json, bench_sdxl_1024.json, bench_compile_256.json,
# trace_256_diffusers-loop.json.gz, trace_256_sd-ds.json.gz.
# One rank, torch.distributed set up by hand (no deepspeed launcher); torch's fused AdamW, no nvcc needed.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: OUT=DIR bash bench/gpu_check.sh [--cpu | --dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:?set OUT to the folder for results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
[ "$MODE" = dry ] || rm -f "$OUT"/gpu_check.log "$OUT"/summary.md "$OUT"/bench_*.json "$OUT"/trace_*.json.gz  # rerun
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_SIZE=1 MASTER_ADDR=127.0.0.1
BENCH=(bench/bench_gpu_throughput.py --no-write)
if [ "$MODE" = cpu ]; then
  export DS_ACCELERATOR=cpu
  TOTAL_S=${TOTAL_S:-1500}
  BENCH+=(--device cpu --windows 1 --steps_per_window 1 --warmup 1)
  V1=(--preset tiny --resolution 32 --micro_batch_size 2); V2=(--preset tiny-sd2 --resolution 32 --micro_batch_size 2,3)
  XL=(--preset tiny-sdxl --resolution 32 --micro_batch_size "${SDXL_MB:-2}")
  #          stage: pytest v1  v2  xl  compile (max s)    min s      per-contender process s
  MAX_S=(600 600 600 400 0); MIN_S=(60 60 60 60 999); PROC_S=(400 400 400 400)
else
  export DS_ACCELERATOR=cuda
  TOTAL_S=${TOTAL_S:-540}
  BENCH+=(--windows 2 --steps_per_window 10 --warmup 3)
  V1=(--resolution 256 --micro_batch_size 64); V2=(--preset sd-v2 --resolution 512 --micro_batch_size 32,64)
  XL=(--preset sdxl --resolution 1024 --micro_batch_size "${SDXL_MB:-8}")
  MAX_S=(200 200 210 150 240); MIN_S=(60 90 80 80 120); PROC_S=(75 80 140 230)
fi
SDXL_FLAGS=${SDXL_FLAGS:---recompute True}

stage() {  # stage <index> <name> <command...>: under timeout min(MAX_S, what is left of TOTAL_S); skipped below MIN_S
  local i=$1 name=$2; shift 2
  local left=$((TOTAL_S - SECONDS)) limit=${MAX_S[$i]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "${MIN_S[$i]}" ]; then
    echo "=== $name SKIPPED: ${SECONDS}s used of TOTAL_S=${TOTAL_S}s, it needs at least ${MIN_S[$i]}s"
    return 0
  fi
  echo "=== [$(date -u +%T)] $name (limit ${limit}s): $*"
  [ "$MODE" = dry ] && return 0
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  return 0
}

echo "=== gpu_check ($MODE) $(date -u +%FT%TZ) in $PWD at $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git status --porcelain 2>/dev/null | grep -q . && echo ' (uncommitted changes)')"
if [ "$MODE" = gpu ] && [ -d .whl ] && ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" && echo "=== wheels from .whl installed into /tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
[ "$MODE" = dry ] || "$PYTHON" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("deepspeed", "diffusers", "transformers", "pytest", "webdataset"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING:", e)
EOF

# 0. The GPU tests (tests/test_gpu.py: the engine on CUDA, the NCCL + gloo groups, the benchmark on tiny presets).
stage 0 "pytest -m gpu" "$PYTHON" -m pytest -o addopts=-ra -m gpu -q -p no:cacheprovider tests/test_gpu.py

# 1. SD v1, 256 px: the baseline rows and stored text conditioning; traces of one step of the first two.
stage 1 "SD v1 ${V1[*]}" "$PYTHON" "${BENCH[@]}" "${V1[@]}" --timeout "${PROC_S[0]}" \
  --contenders "diffusers loop,sd-ds,sd-ds latents,sd-ds latents+text" --trace "diffusers loop,sd-ds" \
  --trace_dir "$OUT" --output "$OUT/bench_sd-v1_256.json"

# 2. SD 2.x, 512 px on latents at micro batch 32 and 64 (MLPerf's).
stage 2 "SD 2.x ${V2[*]}" "$PYTHON" "${BENCH[@]}" "${V2[@]}" --timeout "${PROC_S[1]}" \
  --contenders "sd-ds latents,sd-ds latents+text" --trace "" --output "$OUT/bench_sd-v2_512.json"

# 3. SDXL, 1024 px on latents and stored text conditioning, at what fits 80 GB.
stage 3 "SDXL ${XL[*]} $SDXL_FLAGS" "$PYTHON" "${BENCH[@]}" "${XL[@]}" --timeout "${PROC_S[2]}" \
  --contenders "sd-ds latents+text" --trainer_flags="$SDXL_FLAGS" --trace "" --output "$OUT/bench_sdxl_1024.json"

# 4. With what is left: the compiled row (compilation takes most of its time).
stage 4 "SD v1 compiled ${V1[*]}" "$PYTHON" "${BENCH[@]}" "${V1[@]}" --timeout "${PROC_S[3]}" \
  --contenders "sd-ds --compile" --trace "" --output "$OUT/bench_compile_256.json"

[ "$MODE" = dry ] || "$PYTHON" bench/gpu_check_summary.py "$OUT" > "$OUT/summary.md"
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv 2>/dev/null || true
echo "=== gpu_check done after ${SECONDS}s; files in $OUT:"
ls -la "$OUT"

#!/usr/bin/env bash
# The GPU checks as one prepared run (at most ~9 min on one H100/H200): `pytest -m gpu`, then the throughput
# benchmark (bench/bench_gpu_throughput.py, SD v1 from configs with random weights: nothing downloaded) at 256 px,
# 512 px if time allows, then the compiled rows with the time left. Every stage has its own `timeout`, so one hang costs only its stage.
#
#   OUT=/some/dir PYTHON=/path/to/python3 bash bench/gpu_check.sh        # from the repository root, on the GPU
#   OUT=/tmp/x bash bench/gpu_check.sh --cpu                             # the same stages on CPU, tiny sizes
#
# Writes into $OUT (at most 6 files, none in sub-folders): gpu_check.log (everything, figures as they come),
# bench_256.json, bench_256_compile.json, bench_512.json, trace_256_diffusers-loop.json.gz, trace_256_sd-ds.json.gz.
# One rank, torch.distributed set up by hand (no deepspeed launcher); torch's fused AdamW, no nvcc needed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for results}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-330}  # the 512 px stage runs only if it can finish inside this
TOTAL_S=${TOTAL_S:-530}    # the compiled rows get what is left of this (and at least their own stage limit)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_SIZE=1 MASTER_ADDR=127.0.0.1
if [ "${1:-}" = "--cpu" ]; then
  export DS_ACCELERATOR=cpu
  SIZES=(--device cpu --preset tiny --micro_batch_size 2 --windows 1 --steps_per_window 1 --warmup 1)
  RES=(32 64); STAGE_S=(600 900 900 600); CONTENDER_S=400; MB512=()
else
  export DS_ACCELERATOR=cuda
  SIZES=(--windows 3 --steps_per_window 10 --warmup 3)
  RES=(256 512); STAGE_S=(120 180 150 110); CONTENDER_S=95
  MB512=(--micro_batch_size 32)  # 4x the pixels of 256 px: micro batch 64 would need ~4x the activations
fi

stage() {  # stage <seconds> <name> <command...>: run under timeout, log its time and status
  local seconds=$1 name=$2; shift 2
  local t0=$SECONDS
  echo "=== [$(date -u +%T)] $name (limit ${seconds}s): $*"
  timeout -k 10 "$seconds" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  return 0
}

echo "=== gpu_check $(date -u +%FT%TZ) in $PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("deepspeed", "diffusers", "transformers", "pytest", "webdataset"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING:", e)
EOF

# 1. The GPU tests (tests/test_gpu.py: the engine on CUDA, the NCCL + gloo groups, the benchmark on the tiny preset).
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  stage "${STAGE_S[0]}" "pytest -m gpu" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
else
  echo "=== pytest not importable: GPU tests skipped"
fi

# 2. SD v1 at 256 px, one process per contender (eager rows), with a profiler trace of one step of two of them.
stage "${STAGE_S[1]}" "bench ${RES[0]} px" "$PYTHON" bench/bench_gpu_throughput.py "${SIZES[@]}" \
  --resolution "${RES[0]}" --contenders "diffusers loop,sd-ds,sd-ds latents,sd-ds recompute" \
  --timeout "$CONTENDER_S" --trace "diffusers loop,sd-ds" --trace_dir "$OUT" --no-write \
  --output "$OUT/bench_${RES[0]}.json"

# 3. 512 px at micro batch 32, if the budget allows.
if [ $((SECONDS + STAGE_S[3])) -le "$BUDGET_S" ] || [ "${1:-}" = "--cpu" ]; then
  stage "${STAGE_S[3]}" "bench ${RES[1]} px" "$PYTHON" bench/bench_gpu_throughput.py "${SIZES[@]}" \
    ${MB512[@]+"${MB512[@]}"} --resolution "${RES[1]}" --contenders "diffusers loop,sd-ds" --windows 2 \
    --timeout $((STAGE_S[3] / 2 - 5)) --trace "" --no-write --output "$OUT/bench_${RES[1]}.json"
else
  echo "=== bench ${RES[1]} px skipped: ${SECONDS}s used of ${BUDGET_S}s"
fi

# 4. The compiled rows last, with what is left of TOTAL_S (compilation takes most of their time; at least
# STAGE_S[2]): sd-ds's per-block compile first, then diffusers' whole-UNet compile.
left=$((TOTAL_S - SECONDS)); [ "$left" -ge "${STAGE_S[2]}" ] || left=${STAGE_S[2]}
stage "$left" "bench ${RES[0]} px compiled" "$PYTHON" bench/bench_gpu_throughput.py "${SIZES[@]}" \
  --resolution "${RES[0]}" --contenders "sd-ds --compile,diffusers loop --compile" \
  --timeout $((left / 2 - 5)) --trace "" --no-write --output "$OUT/bench_${RES[0]}_compile.json"

nvidia-smi --query-gpu=memory.used,temperature.gpu,clocks.sm --format=csv 2>/dev/null || true
echo "=== gpu_check done after ${SECONDS}s; files in $OUT:"
ls -la "$OUT"

#!/usr/bin/env bash
# The GPU figures of issue 33 items 2, 3, 4, 6 that CPU ranks cannot give, as one prepared run (~10 min on one
# H100/H200; every stage under its own timeout, so a hang costs only its stage). SD v1 sized, random init, offline:
#   1. bench_compile.py: eager vs --torch_compile (per-block regions), cold start vs a restart from the run's saved
#      kernels (empty inductor cache both times), losses compiled vs eager;  -> compile.json, BENCHMARKS section 24
#   2. the same with --channels_last True (decides its default: on only if it beats stage 1's compiled step);
#   3. the same with --fp16 True (MLPerf's precision recipe) beside stage 1's bf16.
#
#   OUT=/some/dir PYTHON=/path/to/python3 bash bench/gpu_compile.sh        # from the repository root, on the GPU
#
# Writes into $OUT: gpu_compile.log, compile_bf16.json, compile_channels_last.json, compile_fp16.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for results}
PYTHON=${PYTHON:-python3}
RES=${RES:-256}
MB=${MB:-32}
STEPS=${STEPS:-6}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_compile.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL="$OUT/sd_v1_random"

stage() {  # stage <seconds> <name> <command...>
  local seconds=$1 name=$2; shift 2
  local t0=$SECONDS
  echo "=== [$(date -u +%T)] $name (limit ${seconds}s): $*"
  timeout -k 10 "$seconds" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
COMMON=(bench/bench_compile.py --device cuda --nproc 1 --resolution "$RES" --micro_batch "$MB" --steps "$STEPS"
        --no-write --timeout 240)
stage 280 "bf16: eager, compiled cold, compiled restart" \
  "$PYTHON" "${COMMON[@]}" --sd_v1_random "$MODEL" --output "$OUT/compile_bf16.json"
stage 170 "bf16 + channels_last" \
  "$PYTHON" "${COMMON[@]}" --model "$MODEL" --extra "--channels_last True" --output "$OUT/compile_channels_last.json"
stage 170 "fp16 recipe" \
  "$PYTHON" "${COMMON[@]}" --model "$MODEL" --precision fp16 --output "$OUT/compile_fp16.json"
echo "=== done: $(ls "$OUT")"

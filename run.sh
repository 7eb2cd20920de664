#!/usr/bin/env bash
# sd-ds launcher.
#   ./run.sh                  the demo: build demo data, convert, train a tiny model with DeepSpeed, export, sample
#   ./run.sh [trainer flags]  train: `deepspeed` runs `python -m sd_ds.train [trainer flags]` on every rank
#                             (python -m sd_ds.train --help lists the flags)
# Launcher settings come from the environment:
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" lines) for multi-node runs (passed as --hostfile)
#   NPROC_PER_NODE  ranks per node: GPUs to use (default: all), or CPU ranks on a CPU-only machine (default 2)
#   MASTER_ADDR, MASTER_PORT   rendezvous (default 127.0.0.1:29500)
#   DS_CONFIG       DeepSpeed JSON with engine settings (default: ds_configs/zero2_bf16.json by precision)
#   NODE_RANK, NO_SSH=1        launch one node by hand (e.g. under SLURM / without passwordless ssh)
#   LAUNCHER_ARGS   extra arguments for the deepspeed launcher
# SIGTERM/SIGINT: every rank saves a checkpoint at the end of its current step and exits 0.
set -euo pipefail
cd "$(dirname "$0")"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
if ! python -c "import torch, deepspeed, diffusers, transformers, webdataset" 2>/dev/null; then
  echo "run.sh: installing the requirements into .venv (once) ..."
  ./tools/setup_env.sh
  export PATH="$PWD/.venv/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_DISABLE_TELEMETRY=1

if [ $# -eq 0 ]; then
  exec python -m sd_ds.demo
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}
else
  export DS_ACCELERATOR=cpu
  NPROC_PER_NODE=${NPROC_PER_NODE:-2}
  # One CPU rank should not oversubscribe the cores the others use.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
fi

launcher=(deepspeed --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  launcher+=(--hostfile "$HOSTFILE")
  [ -n "${NPROC_PER_NODE:-}" ] && launcher+=(--num_gpus "$NPROC_PER_NODE")
else
  launcher+=(--num_gpus "$NPROC_PER_NODE")
fi
[ -n "${NODE_RANK:-}" ] && launcher+=(--node_rank "$NODE_RANK")
[ "${NO_SSH:-0}" = "1" ] && launcher+=(--no_ssh)
# shellcheck disable=SC2206
[ -n "${LAUNCHER_ARGS:-}" ] && launcher+=($LAUNCHER_ARGS)
trainer_args=("$@")
[ -n "${DS_CONFIG:-}" ] && trainer_args+=(--deepspeed "$DS_CONFIG")

# The deepspeed launcher answers SIGTERM by killing its ranks and exiting 1. Instead, forward the signal
# to the trainer processes so that they checkpoint and exit 0; the launcher then exits 0 too.
trainer_pids() {
  local pids=("$1") out=() p c
  while [ ${#pids[@]} -gt 0 ]; do
    p=${pids[0]}; pids=("${pids[@]:1}")
    for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do
      # A trainer rank: signal it, not its data-loader workers (forked children with the same command line).
      if tr '\0' ' ' < "/proc/$c/cmdline" 2>/dev/null | grep -q -- "-m sd_ds.train"; then out+=("$c"); else pids+=("$c"); fi
    done
  done
  echo "${out[@]:-}"
}
forward() {
  local pids; pids=$(trainer_pids "$launcher_pid")
  echo "run.sh: $1 received; asking the trainer ranks ($pids) to checkpoint and stop" >&2
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
}
"${launcher[@]}" --module sd_ds.train "${trainer_args[@]}" &
launcher_pid=$!
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT
status=0
while true; do
  wait "$launcher_pid" && { status=0; break; } || status=$?
  kill -0 "$launcher_pid" 2>/dev/null || break   # exited (not just a trap interrupting wait)
done
exit "$status"

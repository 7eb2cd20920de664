#!/usr/bin/env bash
# sd-ds launcher.
#   ./run.sh                  the demo: build demo data, convert, train a tiny model with DeepSpeed, export, sample
#   ./run.sh [trainer flags]  train: `deepspeed` runs `python -m sd_ds.train [trainer flags]` on every rank
#                             (python -m sd_ds.train --help lists the flags)
# Launcher settings come from the environment (README, "run.sh environment"):
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" lines): multi-node; run.sh on one node starts all of them
#                   over ssh (DeepSpeed's pdsh runner), one rank per slot
#   NPROC_PER_NODE  ranks per node (default: all GPUs, CUDA_VISIBLE_DEVICES' if set; with HOSTFILE its slots=;
#                   2 CPU ranks on a CPU-only machine)
#   INCLUDE, EXCLUDE  GPUs to use / leave out across nodes, DeepSpeed's syntax: "node1:0,1@node2" (--include/--exclude)
#   MASTER_ADDR, MASTER_PORT   rendezvous (default: the first host of HOSTFILE, else 127.0.0.1; port 29500)
#   DS_CONFIG       DeepSpeed JSON with engine settings (passed as --deepspeed unless that flag is given)
#   FLAG_USE_EMA, FLAG_RECOMPUTE, FLAG_XFORMERS   the seed's switches (=1): --use_ema, --recompute,
#                   --enable_xformers_memory_efficient_attention
#   NODE_RANK, NO_SSH=1        launch one node by hand (e.g. under SLURM / without passwordless ssh)
#   LAUNCHER_ARGS   extra arguments for the deepspeed launcher
# Ranks on other nodes get the FLAG_*, HF_*, SD_DS_*, ... variables of this shell (see forwarded_env below).
# SIGTERM/SIGINT: every rank on every node saves a checkpoint at the end of its current step and exits 0.
set -euo pipefail
cd "$(dirname "$0")"

# This run's trainer ranks on this host: processes running `-m sd_ds.train` whose environment names the run.sh
# (host, pid) that launched them. A rank's parent is DeepSpeed's per-node launcher; a process whose parent runs
# sd_ds.train too is a rank's data-loader worker (forked: same command line and environment), left alone so
# that the rank can finish its step.
rank_pids() {
  local host=$1 pid=$2 p parent line hit
  local -a argv envs
  for p in /proc/[0-9]*; do
    mapfile -d '' argv 2>/dev/null < "$p/cmdline" || continue
    [[ " ${argv[*]} " == *" -m sd_ds.train "* ]] || continue
    mapfile -d '' envs 2>/dev/null < "$p/environ" || continue
    hit=0
    for line in "${envs[@]}"; do
      [[ $line == "SD_DS_LAUNCHER_PID=$pid" || $line == "SD_DS_LAUNCHER_HOST=$host" ]] && hit=$((hit + 1))
    done
    [ "$hit" -eq 2 ] || continue
    parent=$(awk '/^PPid:/ {print $2}' 2>/dev/null < "$p/status") || continue
    mapfile -d '' argv 2>/dev/null < "/proc/$parent/cmdline" || argv=()
    [[ " ${argv[*]} " == *" -m sd_ds.train "* ]] && continue
    echo "${p#/proc/}"
  done
  return 0
}

# Internal: `run.sh --signal-ranks HOST PID` is what a SIGTERM to run.sh runs on every node over ssh.
if [ "${1:-}" = "--signal-ranks" ]; then
  pids=$(rank_pids "$2" "$3" | tr '\n' ' ')
  echo "run.sh: $(hostname): asking trainer ranks (${pids:-none found}) to checkpoint and stop" >&2
  [ -z "${pids// /}" ] || kill -TERM $pids 2>/dev/null || true
  exit 0
fi

if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi
# Located, not imported (importing torch and deepspeed takes seconds, on every launch).
if ! python -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('torch', 'deepspeed', 'diffusers', 'transformers', 'webdataset')))" 2>/dev/null; then
  echo "run.sh: installing the requirements into .venv (once) ..."
  ./tools/setup_env.sh
  export PATH="$PWD/.venv/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_DISABLE_TELEMETRY=1

if [ $# -eq 0 ]; then
  exec python -m sd_ds.demo
fi

die() { echo "run.sh: $*" >&2; exit 2; }
[ -n "${INCLUDE:-}" ] && [ -n "${EXCLUDE:-}" ] && die "INCLUDE and EXCLUDE are mutually exclusive (as DeepSpeed's --include/--exclude)"
[ -n "${INCLUDE:-}${EXCLUDE:-}" ] && [ -n "${NPROC_PER_NODE:-}" ] \
  && die "NPROC_PER_NODE cannot be combined with INCLUDE/EXCLUDE: name the GPUs in INCLUDE instead (e.g. node1:0,1@node2:0,1)"

# With a hostfile: the hosts DeepSpeed will use (after INCLUDE/EXCLUDE, in hostfile order) and the most slots
# one of them has, from DeepSpeed's own hostfile parser.
hosts=""; first_host=""; max_slots=""
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE: no such file"
  read -r first_host hosts max_slots < <(DS_ACCELERATOR=cpu python - "$HOSTFILE" "${INCLUDE:-}" "${EXCLUDE:-}" <<'EOF' 2> >(grep -v "real_accelerator.py" >&2)
import sys
from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion
path, include, exclude = sys.argv[1:4]
try:
    active = parse_inclusion_exclusion(fetch_hostfile(path), include, exclude)
except ValueError as e:
    sys.exit(f"run.sh: HOSTFILE {path}: {e}")
if not active:
    sys.exit(f"run.sh: HOSTFILE {path}: INCLUDE/EXCLUDE leave no host")
print(next(iter(active)), ",".join(active), max(len(s) for s in active.values()))
EOF
  ) || true
  [ -n "$first_host" ] || die "HOSTFILE=$HOSTFILE could not be read (see above)"
fi
# DeepSpeed starts the other nodes over ssh (pdsh) unless NO_SSH=1 or the hostfile leaves a single host.
ssh_launch=0
if [ -n "$hosts" ] && [ "${NO_SSH:-0}" != "1" ] && { [[ $hosts == *,* ]] || [[ " ${LAUNCHER_ARGS:-} " == *" --force_multi "* ]]; }; then
  ssh_launch=1
fi

launcher=(deepspeed --master_port "${MASTER_PORT:-29500}")
# DeepSpeed's default rendezvous host is the first host of the hostfile; without one, this machine.
launcher+=(--master_addr "${MASTER_ADDR:-${first_host:-127.0.0.1}}")
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  if [ -n "${NPROC_PER_NODE:-}" ] && [ -z "$hosts" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # --num_gpus would take GPUs 0..N-1 regardless of CUDA_VISIBLE_DEVICES: take the first N visible ones.
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
    [ "$NPROC_PER_NODE" -le "${#visible[@]}" ] || die "NPROC_PER_NODE=$NPROC_PER_NODE > the ${#visible[@]} GPUs in CUDA_VISIBLE_DEVICES"
    launcher+=(--include "localhost:$(IFS=,; echo "${visible[*]:0:$NPROC_PER_NODE}")")
  elif [ -n "${NPROC_PER_NODE:-}" ]; then
    launcher+=(--num_gpus "$NPROC_PER_NODE")  # with a hostfile: overrides its slots= on every node
  fi
  # Otherwise DeepSpeed picks: the hostfile's slots, INCLUDE/EXCLUDE, CUDA_VISIBLE_DEVICES, or all GPUs.
  # Each rank's CPU work (CPU Adam with an offload config, pinned copies) gets its share of the cores: torch's
  # default of one thread per core in every rank oversubscribes them N-fold.
  gpus_here=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}
  [ "${gpus_here:-0}" -gt 0 ] || gpus_here=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / gpus_here > 0 ? $(nproc) / gpus_here : 1 ))}
else
  export DS_ACCELERATOR=cpu
  ranks_here=${NPROC_PER_NODE:-${max_slots:-2}}
  if [ -z "$hosts" ] && [ -z "${INCLUDE:-}${EXCLUDE:-}" ]; then
    launcher+=(--num_gpus "$ranks_here")   # no hostfile: CPU "devices" are NUMA nodes to DeepSpeed, not ranks
  elif [ -n "${NPROC_PER_NODE:-}" ]; then
    launcher+=(--num_gpus "$NPROC_PER_NODE")
  fi
  # One CPU rank should not oversubscribe the cores the others use.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / ranks_here > 0 ? $(nproc) / ranks_here : 1 ))}
fi
[ -n "$hosts" ] && launcher+=(--hostfile "$HOSTFILE")
[ -n "${INCLUDE:-}" ] && launcher+=(--include "$INCLUDE")
[ -n "${EXCLUDE:-}" ] && launcher+=(--exclude "$EXCLUDE")
[ -n "${NODE_RANK:-}" ] && launcher+=(--node_rank "$NODE_RANK")
[ "${NO_SSH:-0}" = "1" ] && launcher+=(--no_ssh)
# shellcheck disable=SC2206
[ -n "${LAUNCHER_ARGS:-}" ] && launcher+=($LAUNCHER_ARGS)

# The trainer also reads these from its own environment, which on other nodes is not this shell's: pass
# them as flags. A switch that is off adds nothing (so it cannot turn off a flag given on the command line).
trainer_args=("$@")
switch_flag() {
  local value=${!1:-}
  case ${value,,} in ""|0|false|f|no|n|off) ;; *) trainer_args+=("--$2" "$value") ;; esac
}
switch_flag FLAG_USE_EMA use_ema
switch_flag FLAG_RECOMPUTE recompute
switch_flag FLAG_XFORMERS enable_xformers_memory_efficient_attention
if [ -n "${DS_CONFIG:-}" ] && [[ " $* " != *" --deepspeed "* && " $* " != *" --deepspeed="* ]]; then
  trainer_args+=(--deepspeed "$DS_CONFIG")
fi

# Trainer flags holding a credential (a URL with user:token@ or a signed query: X-Amz-Signature, token=, ...)
# never go on a command line: DeepSpeed's launchers print the rank command (three times for 2 ranks), and any
# user of the machine reads /proc/PID/cmdline. They travel in a private file (0600, deleted when run.sh exits)
# that the ranks read as `@FILE` (argparse).
args_file=""
if python -m sd_ds.holds_secret "${trainer_args[@]}"; then
  [ "$ssh_launch" = 1 ] && die "a trainer flag holds a credential (a URL with user:token@ or a signed query);" \
    "a launch over ssh would print it in DeepSpeed's command for every node. Start each node with NO_SSH=1" \
    "NODE_RANK=N, or give the credential the store's own way (AWS_* variables for s3://)"
  for arg in "${trainer_args[@]}"; do
    [[ $arg == *$'\n'* ]] && die "a trainer flag holding a credential spans several lines"
  done
  args_file=$(umask 077 && mktemp "${TMPDIR:-/tmp}/sd_ds_args.XXXXXX")
  trap 'rm -f "$args_file" "${env_file:-}"' EXIT
  printf '%s\n' "${trainer_args[@]}" > "$args_file"
  trainer_args=("@$args_file")
fi

# Ranks know who launched them: SIGTERM forwarding finds them by it, and a rank can tell when run.sh is gone.
export SD_DS_LAUNCHER_PID=$$
SD_DS_LAUNCHER_HOST=$(hostname)
export SD_DS_LAUNCHER_HOST

# The pdsh runner gives remote ranks only some variables (PYTHON*, NCCL*, ...) plus those in a
# `.deepspeed_env` file (read from ~ and the working directory; DS_ENV_FILE names it). Write one with
# what the trainer and its libraries read, then the user's own .deepspeed_env files (theirs win, as in
# DeepSpeed), then the launcher identity.
forwarded_env() {
  local name value file
  for name in $(compgen -e); do
    case $name in
      # CUDA_VISIBLE_DEVICES is the launcher's to set per node; GLOO_SOCKET_IFNAME picks the control group's
      # NIC on multi-NIC clusters, PYTORCH_CUDA_ALLOC_CONF the allocator, CUDA_* (e.g. CUDA_DEVICE_MAX_CONNECTIONS)
      # the driver: each must be the same on every node.
      CUDA_VISIBLE_DEVICES) continue ;;
      FLAG_*|DS_CONFIG|DS_ACCELERATOR|SD_DS_*|HF_*|TRANSFORMERS_*|DIFFUSERS_*|TOKENIZERS_*|OMP_NUM_THREADS|MKL_NUM_THREADS|TORCH_*) ;;
      GLOO_*|PYTORCH_*|CUDA_*) ;;
      *) continue ;;
    esac
    value=${!name}
    # DeepSpeed puts each value in double quotes on the remote command line: these would be expanded there.
    if [[ $value == *[\"\$\`\\]* || $value == *$'\n'* ]]; then
      echo "run.sh: not forwarding $name to the other nodes (its value holds \", \$, \`, \\ or a newline)" >&2
      continue
    fi
    printf '%s=%s\n' "$name" "$value"
  done
  for file in "$HOME/${DS_ENV_FILE:-.deepspeed_env}" "./${DS_ENV_FILE:-.deepspeed_env}"; do
    # Only KEY=VALUE lines: DeepSpeed's reader fails on anything else.
    [ -f "$file" ] && grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$file" || true
  done
  printf 'SD_DS_LAUNCHER_PID=%s\nSD_DS_LAUNCHER_HOST=%s\n' "$SD_DS_LAUNCHER_PID" "$SD_DS_LAUNCHER_HOST"
}
env_file=""
if [ "$ssh_launch" = 1 ]; then
  env_file=$(mktemp "${TMPDIR:-/tmp}/sd_ds_deepspeed_env.XXXXXX")
  trap 'rm -f "$env_file" "${args_file:-}"' EXIT
  forwarded_env > "$env_file"
fi

# The deepspeed launcher answers SIGTERM by killing its ranks (over pdsh: pkill on every node) and exiting 1.
# Instead, signal the trainer ranks themselves so that they checkpoint and exit 0; the launcher then exits 0
# too. Over pdsh every rank (this node's as well) is a child of its node's sshd, not of run.sh: reach each
# node over ssh as DeepSpeed did, and signal the ranks there that carry this run.sh's host and pid.
forward() {
  echo "run.sh: $1 received; asking every trainer rank to checkpoint and stop" >&2
  if [ "$ssh_launch" = 1 ]; then
    PDSH_RCMD_TYPE=ssh timeout 120 pdsh -S -w "$hosts" \
      "cd $(printf %q "$PWD") && bash ./run.sh --signal-ranks $(printf %q "$SD_DS_LAUNCHER_HOST") $$" \
      || echo "run.sh: could not reach every node to stop its ranks" >&2
  else
    local pids; pids=$(rank_pids "$SD_DS_LAUNCHER_HOST" "$$" | tr '\n' ' ')
    [ -z "${pids// /}" ] || kill -TERM $pids 2>/dev/null || true
  fi
}
# Own session: a Ctrl-C in the terminal reaches run.sh only (forwarded as above), not the launcher and pdsh,
# which would kill the ranks without a checkpoint.
setsid=(); command -v setsid >/dev/null 2>&1 && setsid=(setsid --wait)
DS_ENV_FILE=${env_file:-${DS_ENV_FILE:-.deepspeed_env}} \
  "${setsid[@]}" "${launcher[@]}" --module sd_ds.train "${trainer_args[@]}" < /dev/null &
launcher_pid=$!
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT
status=0
while true; do
  wait "$launcher_pid" && { status=0; break; } || status=$?
  kill -0 "$launcher_pid" 2>/dev/null || break   # exited (not just a trap interrupting wait)
done
exit "$status"

#!/usr/bin/env bash
# Create ./.venv with what sd-ds needs (idempotent: a re-run installs only what is missing).
#   tools/setup_env.sh          runtime requirements (the trainer, converter, export, demo)
#   tools/setup_env.sh --eval   + the evaluation extra (requirements-eval.txt: torchvision, pytorch-fid, open_clip)
#   tools/setup_env.sh --dev    + test requirements (pytest, ...) and the evaluation extra (its tests run in CI)
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so that pip does not pull a
# multi-GB CUDA build; on GPU machines install your CUDA torch first (or let pip pick one).
# torchvision (evaluation only) must be built for the installed torch, and PyPI's torchvision does not import
# beside the CPU torch 2.13.0 wheel; so --eval/--dev on a machine without a GPU install the pair
# torch ${SD_DS_EVAL_TORCH:-2.14.1} + torchvision ${SD_DS_EVAL_TORCHVISION:-0.29.1} (tested together; DeepSpeed's
# CPU tests pass on it), and on a GPU machine the torchvision made for the torch already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
# (this machine's pip config names local mirrors that may be absent: drop those warnings, keep real errors)
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored" >&2); }
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch>=2.4"
  elif [ "${1:-}" = "--dev" ] || [ "${1:-}" = "--eval" ]; then
    pip_install "torch==${SD_DS_EVAL_TORCH:-2.14.1}" "torchvision==${SD_DS_EVAL_TORCHVISION:-0.29.1}"
  else
    pip_install "torch==${SD_DS_CPU_TORCH:-2.13.0}"
  fi
fi
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
pip_install -r "$req"
if [ "${1:-}" = "--dev" ] || [ "${1:-}" = "--eval" ]; then
  if ! "$VPY" -c "import torchvision" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      # keep the CUDA torch: pip picks the torchvision release made for it
      pip_install torchvision "torch==$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])')"
    else
      pip_install "torch==${SD_DS_EVAL_TORCH:-2.14.1}" "torchvision==${SD_DS_EVAL_TORCHVISION:-0.29.1}"
    fi
  fi
  pip_install -r requirements-eval.txt
fi
# sd_ds itself, editable: `import sd_ds` works from any directory (bench scripts, tools) with no sys.path edits.
pip_install --no-deps -e .
"$VPY" -c "import torch, deepspeed, diffusers, transformers, webdataset" 2>/dev/null \
  && { [ "${1:-}" != "--dev" ] && [ "${1:-}" != "--eval" ] || "$VPY" -c "import torchvision, pytorch_fid, open_clip" 2>/dev/null; } \
  || { echo "setup_env: the environment in .venv is incomplete; see the pip output above" >&2; exit 1; }
echo "setup_env: .venv ready ($("$VPY" -c 'import torch, deepspeed, diffusers; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, diffusers {diffusers.__version__}")' 2>/dev/null | tail -1))"

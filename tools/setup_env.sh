#!/usr/bin/env bash
# Create ./.venv with what sd-ds needs (idempotent: a re-run installs only what is missing).
#   tools/setup_env.sh          runtime requirements (the trainer, converter, export, demo)
#   tools/setup_env.sh --dev    + test requirements (pytest, scikit-image, the open_clip tokenizer for parity tests)
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so that pip does not pull a
# multi-GB CUDA build; on GPU machines install your CUDA torch first (or let pip pick one).
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
  else
    pip_install "torch==${SD_DS_CPU_TORCH:-2.13.0}"
  fi
fi
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
pip_install -r "$req"
# sd_ds itself, editable: `import sd_ds` works from any directory (bench scripts, tools) with no sys.path edits.
pip_install --no-deps -e .
if [ "${1:-}" = "--dev" ]; then
  # open_clip is needed only for its tokenizer module and BPE file; --no-deps keeps torchvision out.
  pip_install --no-deps "open-clip-torch==3.3.0"
fi
"$VPY" -c "import torch, deepspeed, diffusers, transformers, webdataset" 2>/dev/null \
  || { echo "setup_env: the environment in .venv is incomplete; see the pip output above" >&2; exit 1; }
echo "setup_env: .venv ready ($("$VPY" -c 'import torch, deepspeed, diffusers; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, diffusers {diffusers.__version__}")' 2>/dev/null | tail -1))"

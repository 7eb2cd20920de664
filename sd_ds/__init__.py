"""sd-ds: pretrain Stable Diffusion from scratch with DeepSpeed ZeRO-2."""

import os

__version__ = "0.1.0"

# OpenMP threads that sleep when idle instead of spinning. torch's CPU kernels run on OpenMP (libgomp), whose
# idle threads by default spin before they sleep, each holding a core between two parallel regions. On a
# machine another process shares, the spinning threads and that process take each other's cores: the demo's
# VAE step and `sd_ds.sample` ran 12-34x slower than with passive threads (BENCHMARKS.md "OpenMP wait policy",
# bench/bench_omp_wait.py), about as fast as one thread. The runtime reads the variable once, when it loads
# (at `import torch`); this package is imported before any of its modules, so every `python -m sd_ds.X`,
# `sd-ds X` and trainer rank starts torch with it. A choice of the user's (OMP_WAIT_POLICY, or libgomp's
# GOMP_SPINCOUNT) is kept. It changes nothing where a process has one thread (the trainer's CPU ranks when
# run.sh gives each one core); on GPU ranks it touches only their CPU-side kernels (CPU Adam with offload, host
# copies), whose idle threads then leave the cores to the data loader workers (reasoned, not measured on GPUs).
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

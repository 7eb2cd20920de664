"""OpenMP's wait policy: every sd-ds process starts torch's OpenMP runtime with passive waiting (idle threads sleep
instead of spinning, so a CPU stage keeps its speed beside another busy process: bench/bench_omp_wait.py), unless
the user chose otherwise."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import subprocess_env

# What the OpenMP runtime will read: the environment when torch loads, in a process started the way a command is.
PROBE = ("import sys, os\n"
         "import {module}\n"
         "assert 'torch' in sys.modules or {module!r} == 'sd_ds', 'the module should have loaded torch'\n"
         "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")


def _probe(module: str, extra_env: dict[str, str]) -> str:
    env = subprocess_env()
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(name, None)
    env.update(extra_env)
    proc = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.mark.parametrize("module", ["sd_ds", "sd_ds.sample"])
def test_passive_unless_the_user_set_a_policy(module):
    assert _probe(module, {}) == "PASSIVE None"
    assert _probe(module, {"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE None"
    assert _probe(module, {"GOMP_SPINCOUNT": "10000"}) == "None 10000"


def test_set_before_torch_loads():
    """A command module imports its package first, so the variable is in place before `import torch` starts the
    OpenMP runtime (which reads it once): `python -m sd_ds.X` runs sd_ds/__init__.py before sd_ds/X.py."""
    code = ("import builtins, os\n"
            "seen = []\n"
            "real_import = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name == 'torch' and not seen:\n"
            "        seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
            "    return real_import(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            "import runpy, sys\n"
            "sys.argv = ['sd_ds.sample', '--help']\n"
            "try:\n"
            "    runpy.run_module('sd_ds.sample', run_name='__main__', alter_sys=True)\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('torch first imported with OMP_WAIT_POLICY =', seen[0])")
    env = subprocess_env()
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "torch first imported with OMP_WAIT_POLICY = PASSIVE"

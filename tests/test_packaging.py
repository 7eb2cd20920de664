"""sd-ds as an installed tool: the dependencies pyproject.toml declares (the same as the requirements files), the
package data an installed package reads, the ``sd-ds`` command, and (slow) a non-editable ``pip install .`` into
a fresh venv that then works from another directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from sd_ds.cli import SUBCOMMANDS, main
from tests.helpers import REPO_ROOT, subprocess_env

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _requirements(path: Path) -> dict[str, Requirement]:
    """A requirements file's requirements by normalised name (comments, blank lines and -r includes left out)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            found[_name(req)] = req
    return found


def _name(req: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", req.name).lower()


def _declared(specs: list[str]) -> dict[str, Requirement]:
    return {_name(Requirement(s)): Requirement(s) for s in specs}


def test_project_dependencies_are_requirements_txt():
    """pip install . and pip install -r requirements.txt install the same packages at the same versions."""
    declared, pinned = _declared(PYPROJECT["dependencies"]), _requirements(REPO_ROOT / "requirements.txt")
    assert sorted(declared) == sorted(pinned)
    for name, req in pinned.items():
        assert (declared[name].specifier, declared[name].extras) == (req.specifier, req.extras), name
    # torch is a range, so that a CPU or CUDA build installed first is kept
    assert str(declared["torch"].specifier) == ">=2.4"


def test_extras_cover_the_eval_and_dev_requirements():
    extras = PYPROJECT["optional-dependencies"]
    assert _declared(extras["eval"]) == _requirements(REPO_ROOT / "requirements-eval.txt")

    def expand(specs: list[str]) -> dict[str, Requirement]:
        out = {}
        for name, req in _declared(specs).items():
            if name == "sd-ds":  # sd-ds[eval,spark,...]: those extras' requirements
                for extra in req.extras:
                    out.update(expand(extras[extra]))
            else:
                out[name] = req
        return out

    dev = {**_declared(PYPROJECT["dependencies"]), **expand(extras["dev"])}
    for name, req in _requirements(REPO_ROOT / "requirements-dev.txt").items():
        assert name in dev, f"{name} (requirements-dev.txt) is in neither [project].dependencies nor the dev extra"
        assert (dev[name].specifier, dev[name].extras) == (req.specifier, req.extras), name


def test_packaged_deepspeed_defaults_are_the_ds_configs_examples():
    """The engine's defaults ship in the package (an installed package has no ds_configs/): the same settings as
    the user-facing examples in ds_configs/, and each precision's default exists."""
    from sd_ds.config import TrainConfig, parse_config
    from sd_ds.engine import DS_CONFIG_DIR, default_ds_config_path

    packaged = sorted(DS_CONFIG_DIR.glob("*.json"))
    assert DS_CONFIG_DIR.parent == REPO_ROOT / "sd_ds" and len(packaged) == 3
    for path in packaged:
        assert json.loads(path.read_text()) == json.loads((REPO_ROOT / "ds_configs" / path.name).read_text()), path.name
    for flags, name in (([], "zero2_bf16.json"), (["--fp16", "True", "--bf16", "False"], "zero2_fp16.json"),
                        (["--bf16", "False"], "zero2_fp32.json")):
        cfg: TrainConfig = parse_config(["--output_dir", "x", *flags])
        assert default_ds_config_path(cfg) == DS_CONFIG_DIR / name


def test_sd_ds_help_lists_every_subcommand_without_importing_torch():
    code = "import sys\nfrom sd_ds.cli import main\nrc = main(['--help'])\nprint('torch' in sys.modules, rc)"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "False 0"
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert listed == ["train", "convert", "init", "encode-latents", "index", "export", "sample", "evaluate", "demo"]


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_each_subcommand_is_its_modules_command(name, capsys):
    """`sd-ds X --help` is `python -m MODULE --help`: the same main(argv), the same flags."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    via_sd_ds = capsys.readouterr().out
    module = importlib.import_module(SUBCOMMANDS[name].module)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    direct = capsys.readouterr().out
    # the same text after the usage lines (whose program name, and so wrapping, may differ: sd-ds convert)
    assert via_sd_ds.split("\n\n", 1)[1] == direct.split("\n\n", 1)[1] and "-h, --help" in direct


def test_unknown_subcommand_is_one_line_and_exit_2(capsys):
    assert main(["encode_latent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "did you mean 'encode-latents'" in err
    assert main([]) == 2  # no subcommand: the list, as a usage error


def test_converter_command_forms_agree(tmp_path):
    """tools/convert_laion_to_wds.py (the seed's path), python -m sd_ds.convert and sd-ds convert: one program."""
    from sd_ds.convert.parts import write_part
    from tests.laion_parts import crops

    part = tmp_path / "part-00000.gz"
    write_part(part, [(caption, data) for caption, data, _ in crops(5)])
    outputs = {}
    for form, argv in (("tool", [str(REPO_ROOT / "tools" / "convert_laion_to_wds.py")]),
                       ("module", ["-m", "sd_ds.convert"]), ("sd-ds", ["-m", "sd_ds", "convert"])):
        out = tmp_path / form
        proc = subprocess.run([sys.executable, *argv, str(part), "--output_dir", str(out), "--processes", "1",
                               "--samples_per_shard", "2", "--no_progress"], cwd=tmp_path, env=subprocess_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs[form] = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    assert len(outputs["tool"]) == 3 and outputs["tool"] == outputs["module"] == outputs["sd-ds"]


# --- a real install ------------------------------------------------------------------------------------------

CPU_TORCH = os.environ.get("SD_DS_CPU_TORCH", "2.13.0")  # the version tools/setup_env.sh installs on CPU machines


def _pip(venv: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout)


def _installed_env() -> dict:
    """The environment of a user of the installed package: no checkout on the path, offline models."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env.pop("DS_ACCELERATOR", None)  # the demo sets it up itself, as run.sh does
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the CPU torch and `pip install CHECKOUT` (not editable): its bin/ folder. Minutes (PyPI
    downloads); skipped, saying why, where no CPU torch wheel or no package registry is available."""
    tmp_path = tmp_path_factory.mktemp("install")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # What pip would install for torch==CPU_TORCH, without downloading it: a CUDA build is gigabytes.
    probe = _pip(venv, "install", "--dry-run", "--no-deps", "--quiet", "--report", "-", f"torch=={CPU_TORCH}",
                 timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot find torch=={CPU_TORCH}: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    url = urllib.parse.unquote(json.loads(probe.stdout)["install"][0]["download_info"]["url"])
    if "+cpu" not in url:
        pytest.skip(f"no CPU build of torch {CPU_TORCH} available to pip here (it would take {url.rsplit('/', 1)[-1]})")
    # deepspeed==0.19.8 is on no local mirror here: a registry must answer
    registry = _pip(venv, "download", "--no-deps", "--quiet", "--dest", str(tmp_path / "probe"), "deepspeed==0.19.8",
                    timeout=300)
    if registry.returncode != 0:
        pytest.skip(f"no package registry reachable: {(registry.stderr.strip().splitlines() or ['?'])[-1]}")
    # The checkout's files, copied: a build in place would leave build/ and *.egg-info in it.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "demo_output",
                                                                     "build", "*.egg-info", ".pytest_cache"))
    for args in ([f"torch=={CPU_TORCH}"], [str(source)]):
        proc = _pip(venv, "install", "--quiet", *args)
        assert proc.returncode == 0, proc.stderr[-5000:]
    shutil.rmtree(source)
    return venv / "bin"


def _run_installed(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, env=_installed_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_installed_package_works_from_another_directory(installed, tmp_path):
    """sd-ds --help, sd-ds init, the packaged tokenizer and DeepSpeed defaults, the dependencies, from a directory
    that is not the checkout."""
    sd_ds_cmd = str(installed / "sd-ds")
    listed = [line.split()[0] for line in _run_installed(tmp_path, sd_ds_cmd, "--help").stdout.splitlines()
              if line.startswith("  ")]
    assert listed == list(SUBCOMMANDS)
    assert "--preset" in _run_installed(tmp_path, sd_ds_cmd, "init", "--help").stdout
    _run_installed(tmp_path, sd_ds_cmd, "init", "--preset", "tiny", "--output_dir", str(tmp_path / "m"))
    model = tmp_path / "m"
    assert (model / "unet" / "config.json").is_file() and (model / "tokenizer" / "vocab.json").is_file()
    where = _run_installed(tmp_path, str(installed / "python"), "-c", (
        "import sd_ds, sd_ds.engine as e, sd_ds.models as m\n"
        "print(sd_ds.__file__)\n"
        "assert (e.DS_CONFIG_DIR / 'zero2_bf16.json').is_file() and (m.CLIP_TOKENIZER_DIR / 'vocab.json').is_file()\n"
        "import torch, deepspeed, diffusers, transformers, webdataset, skimage"))
    assert str(installed.parent) in where.stdout and str(REPO_ROOT) not in where.stdout


@pytest.mark.slow
def test_installed_demo_runs_without_the_checkout(installed, tmp_path):
    """The short demo from the installed package: the converter by module, the ranks by the deepspeed launcher
    (no run.sh), its output under the current directory. ~2.5 min on 2 cores."""
    from tests.helpers import free_port

    proc = subprocess.run(
        [str(installed / "sd-ds"), "demo", "--train_steps", "2", "--vae_steps", "2", "--per_combination", "1",
         "--photo_crops", "1", "--micro_batch_size", "4", "--sample_steps", "2", "--score_seeds", "1", "--nproc", "2",
         "--validation_samples", "8", "--validation_steps", "2"],
        cwd=tmp_path, env={**_installed_env(), "MASTER_PORT": str(free_port())}, capture_output=True, text=True,
        timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = tmp_path / "demo_output"
    assert "-m deepspeed.launcher.runner --num_gpus 2" in proc.stdout
    assert (out / "train" / "checkpoint-2" / "trainer_state.json").is_file()
    assert (out / "export" / "model_index.json").is_file() and (out / "prompt_following.json").is_file()

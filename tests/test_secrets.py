"""No credential written down or printed: a URL with ``user:TOKEN@`` or a presigned-style query (X-Amz-Signature)
given to the trainer (2 ranks through run.sh) and to the converter, against a loopback HTTP server that wants the
credential. Every byte the runs wrote (shards untarred) and their console are searched for the secrets; the
runs themselves must have worked (the server refused every request without the credential)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sd_ds.redaction import holds_secret, redact_json, redact_text, redact_url
from tests.helpers import REPO_ROOT, run_sh, scalars, subprocess_env, train_flags
from tests.object_stores import HTTPFileServer

USER, TOKEN, SIGNATURE = "sduser", "SDDS-TOKEN-7f3a9c", "SDDS-SIG-2b8e41"


def secret_forms() -> list[bytes]:
    """The secrets as they could be written: plain, and as the basic-auth header carries them."""
    plain = [TOKEN.encode(), SIGNATURE.encode()]
    return plain + [base64.b64encode(f"{USER}:{TOKEN}".encode())]


def leaks(data: bytes, where: str) -> list[str]:
    return [f"{where}: {form!r}" for form in secret_forms() if form in data]


def leaks_under(root: Path) -> list[str]:
    """Every file under ``root`` (tar shards also member by member) searched for the secrets."""
    found: list[str] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        found += leaks(data, str(path))
        if path.suffix == ".tar" and tarfile.is_tarfile(path):
            with tarfile.open(path) as tf:
                for member in tf.getmembers():
                    found += leaks(member.name.encode(), f"{path}:{member.name} (name)")
                    if member.isfile():
                        found += leaks(tf.extractfile(member).read(), f"{path}:{member.name}")
    return found


# --- the helper ------------------------------------------------------------------------------------------

def test_redact_url_masks_userinfo_and_signed_queries_only():
    assert redact_url("http://user:TOKEN@host:8000/shards/") == "http://***@host:8000/shards/"
    assert redact_url("https://TOKEN@host/x.tar") == "https://***@host/x.tar"
    presigned = ("https://b.s3.amazonaws.com/k/00001.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1"
                 "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=SESSION&X-Amz-Signature=abc")
    assert redact_url(presigned) == (
        "https://b.s3.amazonaws.com/k/00001.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-Security-Token=***&X-Amz-Signature=***")
    assert redact_url("https://storage.googleapis.com/b/o?X-Goog-Credential=a&x-goog-signature=b&alt=media") == (
        "https://storage.googleapis.com/b/o?X-Goog-Credential=***&x-goog-signature=***&alt=media")
    assert redact_url("https://a.blob.core.windows.net/c/x.tar?sv=2020&se=2030&sig=SAS") == (
        "https://a.blob.core.windows.net/c/x.tar?sv=2020&se=2030&sig=***")
    assert redact_url("https://h/x?TOKEN=a&access_token=b&api_key=c&page=2") == (
        "https://h/x?TOKEN=***&access_token=***&api_key=***&page=2")
    for unchanged in ("s3://bucket/shards/00000.tar", "/data/shards/00000.tar", "https://host/shards/?page=2",
                      "gs://b/x", "relative/path.tar"):
        assert redact_url(unchanged) == unchanged and not holds_secret(unchanged)
    assert redact_url("pipe:curl -s https://u:p@h/0.tar -") == "pipe:curl -s https://***@h/0.tar -"
    text = "503 for url='http://u:SECRET@h/a.tar?token=T2' then (https://h/b?sig=S)"
    assert redact_text(text) == "503 for url='http://***@h/a.tar?token=***' then (https://h/b?sig=***)"
    assert redact_json({"a": ["http://u:p@h/"], "b": 3, "c": None}) == {"a": ["http://***@h/"], "b": 3, "c": None}


def test_the_lock_record_redacts_the_command(tmp_path):
    from sd_ds.lifecycle import LOCK_FILE, OutputDirLock

    url = f"http://{USER}:{TOKEN}@h/x?X-Amz-Signature={SIGNATURE}"
    lock = OutputDirLock(tmp_path, ["train.py", "--train_shards", url])
    with lock:
        record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert "***@h/x?X-Amz-Signature=***" in record["command"] and not leaks_under(tmp_path)


FAKE_DEEPSPEED = """#!/bin/sh
# Records the arguments it got and the flags file they name (its content and mode), as the ranks would read it.
printf '%s\\n' "$@" > "$SD_DS_TEST_RECORD/args"
for a in "$@"; do
  case $a in @*) cp "${a#@}" "$SD_DS_TEST_RECORD/flags"; stat -c %a "${a#@}" > "$SD_DS_TEST_RECORD/mode";; esac
done
"""


def fake_launch(tmp_path: Path, flags: list[str], env: dict) -> tuple[subprocess.CompletedProcess, Path]:
    fake, record, tmp = tmp_path / "bin", tmp_path / "record", tmp_path / "tmp"
    for d in (fake, record, tmp):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    (fake / "deepspeed").write_text(FAKE_DEEPSPEED)
    (fake / "deepspeed").chmod(0o755)
    full_env = subprocess_env({"PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                               "VIRTUAL_ENV": str(Path(sys.executable).parent.parent), "TMPDIR": str(tmp),
                               "SD_DS_TEST_RECORD": str(record)})
    for inherited in ("HOSTFILE", "NPROC_PER_NODE", "NO_SSH", "LAUNCHER_ARGS", "DS_CONFIG"):
        full_env.pop(inherited, None)
    full_env.update(env)
    proc = subprocess.run(["bash", str(REPO_ROOT / "run.sh"), *flags], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=120)
    return proc, record


def test_run_sh_passes_flags_with_a_credential_through_a_private_file(tmp_path):
    secret_url = f"http://{USER}:{TOKEN}@127.0.0.1:9/shards/?X-Amz-Signature={SIGNATURE}"
    flags = ["--output_dir", "out", "--train_shards", secret_url, "s3://bucket/more"]
    proc, record = fake_launch(tmp_path, flags, {})
    assert proc.returncode == 0, proc.stderr
    args = (record / "args").read_text().splitlines()
    user = args[args.index("sd_ds.train") + 1:]
    assert len(user) == 1 and user[0].startswith(f"@{tmp_path / 'tmp'}/sd_ds_args.")  # no flag on the command line
    assert not leaks("\n".join(args).encode(), "launcher arguments")
    assert (record / "flags").read_text().splitlines() == flags  # the ranks read every flag from the file
    assert (record / "mode").read_text().strip() == "600"
    assert not list((tmp_path / "tmp").iterdir()), "the flags file outlived run.sh"
    # argparse reads it as the trainer's own flags
    from sd_ds.config import parse_config

    (tmp_path / "flags").write_text((record / "flags").read_text())
    cfg = parse_config([f"@{tmp_path / 'flags'}", "--pretrained_model_name_or_path", "m"])
    assert cfg.data.train_shards == [secret_url, "s3://bucket/more"] and cfg.output_dir == "out"

    # Without a credential the flags stay on the command line, as before.
    proc, record = fake_launch(tmp_path, ["--output_dir", "out", "--train_shards", "s3://bucket/more"], {})
    args = (record / "args").read_text().splitlines()
    assert args[args.index("sd_ds.train") + 1:] == ["--output_dir", "out", "--train_shards", "s3://bucket/more"]

    # Over ssh to other nodes the flags would be printed on every node: refused, one line, exit 2.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    proc, record = fake_launch(tmp_path, flags, {"HOSTFILE": str(hostfile)})
    assert proc.returncode == 2 and "NO_SSH=1" in proc.stderr and not (record / "args").exists()
    assert not leaks((proc.stdout + proc.stderr).encode(), "console")


# --- the trainer, 2 ranks through run.sh ----------------------------------------------------------------------

@pytest.mark.slow
def test_the_trainer_writes_down_and_prints_no_credential(assets, tmp_path):
    """Shards behind basic auth, named by a brace URL carrying the credential and a signed query; one listed shard
    is missing (a warning naming it). Two ranks train and checkpoint; nothing they write or print holds a secret."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with HTTPFileServer(assets["shards"], basic_auth=(USER, TOKEN)) as http:
        shards = http.url("{00000..00004}.tar", auth=True) + f"?X-Amz-Signature={SIGNATURE}"
        out = tmp_path / "out"
        proc = run_sh(train_flags(out, shards, assets["model"], max_steps=2, save_steps=2), nproc=2,
                      extra_env={"TMPDIR": str(tmp)})
        refused = http.refused
    console = proc.stdout + proc.stderr
    assert len(scalars(out / "runs", "train/loss")) == 2 and (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert refused == 0  # every request carried the credential: the run read the shards with it
    assert "00004.tar" in console and "***@127.0.0.1" in console  # the missing shard's warning, redacted
    assert console.count("cmd = ") + console.count("spawned with command") >= 3  # DeepSpeed printed the rank command
    assert not leaks(console.encode(), "console"), console[-3000:]
    assert not leaks_under(out)
    assert not leaks_under(tmp) and not list(tmp.glob("sd_ds_args.*"))
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["config"]["data"]["train_shards"]
    assert saved == [redact_url(shards)]


# --- the converter -----------------------------------------------------------------------------------------

def test_the_converter_writes_down_and_prints_no_credential(tmp_path):
    """Parts behind basic auth, listed with the credential in their URLs or as signed queries, the filelist itself
    at such a URL, and one listed part missing: every file of the output (every sample's JSON inside the shards
    included) and the console are free of the secrets, and the samples are all there."""
    from laion_parts import crops
    from sd_ds.convert.parts import write_part
    from test_converter import run_tool, tar_samples

    root = tmp_path / "served"
    (root / "parts").mkdir(parents=True)
    pics = crops(12, seed=3)
    for i in range(3):
        write_part(root / "parts" / f"part-{i}.gz", [(c, b) for c, b, _ in pics[4 * i: 4 * i + 4]])
    with HTTPFileServer(root, basic_auth=(USER, TOKEN), query_token=("X-Amz-Signature", SIGNATURE)) as http:
        signed = lambda name: http.url(f"parts/{name}") + f"?X-Amz-Expires=60&X-Amz-Signature={SIGNATURE}"  # noqa
        (root / "parts" / "urls.filelist").write_text("".join(f"{line}\n" for line in (
            http.url("parts/part-0.gz", auth=True), signed("part-1.gz"), http.url("parts/part-2.gz", auth=True),
            http.url("parts/missing.gz", auth=True))))
        out = tmp_path / "out"
        proc = run_tool("--filelist", http.url("parts/urls.filelist", auth=True), "--output_dir", out,
                        "--samples_per_shard", 5)
    console = proc.stdout + proc.stderr
    assert "missing.gz" in console and "***@127.0.0.1" in console  # the missing part's warning, redacted
    samples = [meta for shard in sorted(out.glob("*.tar")) for _, m in tar_samples(shard)
               for meta in [json.loads(m["json"])]]
    assert len(samples) == 12
    assert {s["source_part"] for s in samples} == {
        f"http://***@127.0.0.1:{http.port}/parts/part-0.gz", f"http://***@127.0.0.1:{http.port}/parts/part-2.gz",
        f"http://127.0.0.1:{http.port}/parts/part-1.gz?X-Amz-Expires=60&X-Amz-Signature=***"}
    assert not leaks(console.encode(), "console"), console[-3000:]
    assert not leaks_under(out)
    assert json.loads((out / "sources.json").read_text())["sources"][0]["name"].startswith("http://***@")


# --- the latent encoder ------------------------------------------------------------------------------------

def test_the_latent_encoder_writes_down_no_credential(tmp_path):
    """Image shards behind basic auth, named with the credential: the latent shards, latents.json, the plan and the
    per-shard records hold none (the trainer reads the latent directory's manifest back and trains from it)."""
    import torch
    from diffusers import AutoencoderKL

    from sd_ds.data import latent_manifest_of_shards
    from sd_ds.presets import TINY_VAE
    from tests.helpers import write_photo_shards
    from tests.test_latents import encode_flags, finish, encode_subprocess

    images, out = tmp_path / "images", tmp_path / "latents"
    write_photo_shards(images, [5, 4])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    with HTTPFileServer(images, basic_auth=(USER, TOKEN)) as http:
        code, output = finish(encode_subprocess(encode_flags(http.url(auth=True), out, tmp_path / "vae")))
        refused = http.refused
    assert code == 0 and refused == 0, output[-3000:]
    assert latent_manifest_of_shards([str(out)])["samples"] == 9
    assert not leaks(output.encode(), "console") and not leaks_under(out)
    assert json.loads((out / "latents.json").read_text())["sources"][0]["name"].startswith("http://***@")

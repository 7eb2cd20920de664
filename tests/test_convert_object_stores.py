"""The converter on object storage, through fsspec: parts served by a loopback HTTP server and by moto's
standalone S3 server (filelists holding URLs, absolute or relative to a filelist that is itself at a URL),
output to S3. The samples are those of the local run, and an S3 output holds the same bytes as a local output
of the same inputs; a run killed mid-upload leaves no partial shard under a final name, and its rerun finishes
identically.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from laion_parts import bad_lines, crops, encode
from object_stores import S3Server, http_server_factory, s3_server  # noqa: F401 - pytest fixtures
from sd_ds.convert.parts import write_part
from test_converter import output_files, run_tool, tar_samples

pytest.importorskip("s3fs", reason="pip install s3fs (tools/setup_env.sh --dev)")
pytest.importorskip("moto", reason="pip install 'moto[server]' (tools/setup_env.sh --dev)")

SPP = 3


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """Six parts (5 good lines and a bad one each) in ROOT/parts, a filelist of their names relative to it,
    and their conversion from local paths."""
    root = tmp_path_factory.mktemp("store_parts")
    (root / "parts").mkdir()
    pics = crops(30, seed=13, formats=("JPEG", "PNG", "WEBP"))
    names = []
    for i in range(6):
        rows = [(c, b) for c, b, _ in pics[5 * i: 5 * i + 5]]
        rows.insert(i % 5, bad_lines()["invalid_base64"])
        names.append(f"part-{i:05d}.gz")
        write_part(root / "parts" / names[-1], rows)
    (root / "parts" / "relative.filelist").write_text("".join(f"{name}\n" for name in names))
    reference = root / "reference"
    run_tool(*[root / "parts" / name for name in names], "--output_dir", reference, "--samples_per_shard", SPP)
    return root, names, reference


def _samples_without_source(out: Path) -> list:
    """Every shard's samples, with source_part (the part as listed: a path or a URL) left out of the JSON."""
    samples = []
    for shard in sorted(out.glob("*.tar")):
        for key, members in tar_samples(shard):
            meta = json.loads(members.pop("json"))
            meta.pop("source_part")
            samples.append((shard.name, key, members, meta))
    return samples


def _download(s3: S3Server, bucket: str, prefix: str, to: Path) -> dict[str, bytes]:
    """Every object under s3://bucket/prefix/ (not in _convert/), by name."""
    client = s3.client()
    files = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) + 1:]
            if "/" not in name:
                files[name] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return dict(sorted(files.items()))


def test_parts_over_http(parts, http_server_factory, tmp_path):  # noqa: F811
    root, names, reference = parts
    server = http_server_factory(root)
    absolute = tmp_path / "urls.filelist"  # a local filelist of URLs
    absolute.write_text("".join(f"{server.url('parts/' + name)}\n" for name in names))
    out = tmp_path / "o"
    run_tool("--filelist", absolute, "--output_dir", out, "--samples_per_shard", SPP)
    assert _samples_without_source(out) == _samples_without_source(reference)
    first = tar_samples(out / "00000.tar")[0][1]
    assert json.loads(first["json"])["source_part"] == server.url("parts/" + names[0])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["failures"] == json.loads((reference / "stats.json").read_text())["failures"]
    assert server.bytes_served >= sum((root / "parts" / name).stat().st_size for name in names)

    # a filelist that is itself at a URL, naming its parts relative to it; and a missing part counted
    (root / "parts" / "with_missing.filelist").write_text("".join(f"{name}\n" for name in [*names, "nope.gz"]))
    out = tmp_path / "o2"
    run_tool("--filelist", server.url("parts/with_missing.filelist"), "--output_dir", out,
             "--samples_per_shard", SPP)
    assert _samples_without_source(out) == _samples_without_source(reference)
    assert json.loads((out / "stats.json").read_text())["missing_parts"] == 1


@pytest.mark.slow
def test_s3_in_and_out_same_bytes_as_local(parts, s3_server, tmp_path):  # noqa: F811
    root, names, _ = parts
    url = s3_server.upload_dir(root / "parts", "laion", "parts")
    filelist = f"{url}/relative.filelist"
    local = tmp_path / "local"
    run_tool("--filelist", filelist, "--output_dir", local, "--samples_per_shard", SPP, env=s3_server.env)
    run_tool("--filelist", filelist, "--output_dir", "s3://laion/shards", "--samples_per_shard", SPP,
             env=s3_server.env)
    remote = _download(s3_server, "laion", "shards", tmp_path)
    assert remote == output_files(local)
    assert json.loads(remote["sizes.json"]) and "complete.json" not in remote
    proc = run_tool("--filelist", filelist, "--output_dir", "s3://laion/shards", "--samples_per_shard", SPP,
                    env=s3_server.env)  # a rerun: complete, nothing written
    assert "already complete" in proc.stdout and _download(s3_server, "laion", "shards", tmp_path) == remote
    proc = run_tool("--filelist", filelist, "--output_dir", "s3://laion/shards", "--samples_per_shard", SPP + 1,
                    env=s3_server.env, check_rc=2)  # other options: refused, as locally
    assert "samples_per_shard" in proc.stderr


@pytest.mark.slow
def test_ray_workers_read_and_write_s3(parts, s3_server, tmp_path):  # noqa: F811
    """A cluster engine's workers reach the store themselves: parts in, fragments and shards out."""
    pytest.importorskip("ray")
    root, names, _ = parts
    url = s3_server.upload_dir(root / "parts", "laion-ray", "parts")
    filelist = f"{url}/relative.filelist"
    local = tmp_path / "local"
    run_tool("--filelist", filelist, "--output_dir", local, "--samples_per_shard", SPP, env=s3_server.env)
    run_tool("--filelist", filelist, "--output_dir", "s3://laion-ray/shards", "--samples_per_shard", SPP,
             "--engine", "ray", "--processes", 2, env=s3_server.env)
    assert _download(s3_server, "laion-ray", "shards", tmp_path) == output_files(local)


def _noise_png(seed: int, side: int = 600) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG", compress_level=0)


@pytest.mark.slow
def test_kill_mid_upload_leaves_no_partial_shard(s3_server, tmp_path):  # noqa: F811
    """Shards of ~12 MB, uploaded in 5 MB multipart blocks: the run is SIGKILLed while copying the second
    8 MB chunk of a shard, after a part of it went up. No shard may appear, and the rerun's are the local
    run's bytes."""
    rows = [(f"noise {i}", _noise_png(i)) for i in range(24)]
    part = tmp_path / "noise.gz"
    write_part(part, rows, compresslevel=1)
    url = s3_server.upload_dir(tmp_path, "noise", "in") + "/noise.gz"
    local = tmp_path / "local"
    run_tool(url, "--output_dir", local, "--samples_per_shard", 12, env=s3_server.env)
    args = [url, "--output_dir", "s3://noise/out", "--samples_per_shard", 12]
    proc = run_tool(*args, env={**s3_server.env, "SD_DS_FAULT": "shard_chunk:count=2",
                                "SD_DS_CONVERT_UPLOAD_BLOCK": str(5 << 20)}, check_rc=None)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    client = s3_server.client()
    uploads = client.list_multipart_uploads(Bucket="noise").get("Uploads", [])
    assert any(u["Key"] == "out/00000.tar" for u in uploads)  # the shard's upload had begun...
    assert not [name for name in _download(s3_server, "noise", "out", tmp_path) if name.endswith(".tar")]  # ...unseen
    run_tool(*args, env=s3_server.env)
    assert _download(s3_server, "noise", "out", tmp_path) == output_files(local)

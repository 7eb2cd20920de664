"""tools/write_filelist.py: ppdiffusers' 60,000-part filelist, custom patterns, and --check_exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "write_filelist.py"


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_default_is_the_ppdiffusers_filelist(tmp_path):
    out = tmp_path / "filelist" / "laion400m_en.filelist"
    proc = run(out)
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 60000
    assert lines[0] == "/data/laion400m/part-00000.gz" and lines[-1] == "/data/laion400m/part-59999.gz"
    assert len(set(lines)) == 60000


def test_pattern_count_start_and_check_exists(tmp_path):
    for i in (3, 4, 6):
        (tmp_path / f"p-{i}.gz").write_bytes(b"")
    out = tmp_path / "x.filelist"
    proc = run(out, "--pattern", str(tmp_path / "p-{}.gz"), "--count", 4, "--start", 3, "--check_exists")
    assert proc.returncode == 1  # p-5.gz is missing
    assert out.read_text().splitlines() == [str(tmp_path / f"p-{i}.gz") for i in (3, 4, 5, 6)]
    assert "1 of 4 parts do not exist" in proc.stderr and str(tmp_path / "p-5.gz") in proc.stderr
    assert str(tmp_path / "p-4.gz") not in proc.stderr
    (tmp_path / "p-5.gz").write_bytes(b"")
    proc = run(out, "--pattern", str(tmp_path / "p-{}.gz"), "--count", 4, "--start", 3, "--check_exists")
    assert proc.returncode == 0 and "all 4 parts exist" in proc.stdout


def test_bad_pattern_is_an_argument_error(tmp_path):
    proc = run(tmp_path / "x", "--pattern", "/data/part-{name}.gz", "--count", 2)
    assert proc.returncode == 2 and "--pattern" in proc.stderr


def test_check_exists_at_urls(tmp_path):
    """Parts at http:// URLs (the loopback server of tests/object_stores.py): HEADs tell the missing ones."""
    from object_stores import HTTPFileServer

    for i in (3, 5):
        (tmp_path / f"p-{i}.gz").write_bytes(b"x")
    with HTTPFileServer(tmp_path) as server:
        out = tmp_path / "urls.filelist"
        proc = run(out, "--pattern", server.url("p-{}.gz"), "--count", 3, "--start", 3, "--check_exists")
        assert proc.returncode == 1 and "1 of 3 parts do not exist" in proc.stderr
        assert server.url("p-4.gz") in proc.stderr and out.read_text().splitlines()[0] == server.url("p-3.gz")

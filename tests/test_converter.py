"""LAION parts → webdataset shards: tools/convert_laion_to_wds.py on generated parts.

Parts hold real JPEG/PNG/WebP bytes cut from scikit-image's photos and every kind of bad line. The tests
check sample counts, member names and contents, stats by reason, sources.json, byte-identical output across
--processes, resume after a SIGKILL at several points, and that webdataset and tarfile read the same samples;
listed parts that are missing (skipped and counted, or refused with --strict) or repeated (converted once), and
an unusable --output_dir (one line, exit 2). The frontier and the fault hook are also tested on their own.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from laion_parts import Dataset, bad_lines, crops, encode, photo
from sd_ds.faults import FAULT_ENV, Fault, FaultInjector, no_hook
from sd_ds.convert.image_header import PIL_MAX_IMAGE_PIXELS, ImageRejected, probe_image
from sd_ds.convert.parts import (LAYOUTS, LineRejected, PartStreamError, decode_image_base64, iter_part_lines,
                                 read_file_list_list, read_filelist, split_line, write_part)
from sd_ds.convert.planning import Frontier, PartSource
from sd_ds.convert.tar_writing import PartSpan, tar_header

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_laion_to_wds.py"
SPP = 4  # samples per shard: small, so sources span several shards and shards span parts


def run_tool(*args, env=None, check_rc=0, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(TOOL), *map(str, args), "--no_progress"], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=REPO, timeout=120, **kw)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def output_files(out: Path) -> dict[str, bytes]:
    """Everything a run leaves in OUT except its bookkeeping folder."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def tar_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tf.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    return Dataset(tmp_path_factory.mktemp("laion"))


@pytest.fixture(scope="module")
def converted(dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("out") / "shards"
    proc = run_tool("--file_list", dataset.file_list, "--output_dir", out, "--samples_per_shard", SPP,
                    "--processes", 1)
    return out, proc


# --- pieces -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,mode,kw", [
    ("JPEG", "RGB", {"quality": 90}), ("JPEG", "RGB", {"quality": 80, "progressive": True}),
    ("JPEG", "L", {}), ("JPEG", "CMYK", {}), ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}),
    ("WEBP", "RGB", {"quality": 80}), ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {"quality": 80}),
])
def test_image_header_matches_pil(fmt, mode, kw):
    img = photo("astronaut").crop((10, 20, 10 + 173, 20 + 91)).convert(mode)
    data = encode(img, fmt, **kw)
    info = probe_image(data)
    with Image.open(io.BytesIO(data)) as ref:
        assert (info.format, info.width, info.height) == (ref.format.lower(), *ref.size)
    for cut in (len(data) // 2, len(data) - 3):  # cut in the pixel data, and just before the end marker
        with pytest.raises(ImageRejected) as e:
            probe_image(data[:cut])
        assert e.value.reason == "truncated_image"


_JFIF_APP0 = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def test_image_header_rejects_bombs_and_non_images():
    png = encode(photo("coffee").crop((0, 0, 30, 20)), "PNG")
    bomb = bytearray(png)
    bomb[16:24] = (30000).to_bytes(4, "big") * 2  # header claims 30000 x 30000
    with pytest.raises(ImageRejected) as e:
        probe_image(bytes(bomb), max_pixels=PIL_MAX_IMAGE_PIXELS)
    assert e.value.reason == "image_too_large"
    assert probe_image(bytes(bomb), max_pixels=0).width == 30000  # 0: no limit
    assert probe_image(png, max_pixels=600).width == 30 and PIL_MAX_IMAGE_PIXELS == Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected) as e:
        probe_image(png, max_pixels=599)
    assert e.value.reason == "image_too_large"
    for data, reason in [(b"hello world, no image", "not_an_image"), (b"", "not_an_image"),
                         (encode(photo("coffee").crop((0, 0, 9, 9)), "GIF"), "unsupported_format"),
                         (encode(photo("coffee").crop((0, 0, 9, 9)), "BMP"), "unsupported_format"),
                         (_JFIF_APP0 + b"garbage where a marker should be", "not_an_image"),
                         (_JFIF_APP0, "truncated_image")]:  # ends inside its header
        with pytest.raises(ImageRejected) as e:
            probe_image(data)
        assert e.value.reason == reason, data[:10]


def test_split_line_layouts_and_encodings():
    jpeg = crops(1, formats=("JPEG",))[0][1]
    b64 = __import__("base64").b64encode(jpeg)
    laion, aes = LAYOUTS["laion400m"], LAYOUTS["laion_aes"]
    for line in (b"a cat\t_\t" + b64 + b"\n", b"a cat\t_\t" + b64 + b"\r\n", b"a cat\t_\t" + b64 + b"\tx\ty\n",
                 b"  a cat \tid\t" + b64):
        caption, image_b64 = split_line(line, laion)
        assert caption == "a cat" and decode_image_base64(image_b64) == jpeg
    # (short GB18030 texts can happen to be valid UTF-8, e.g. "一只猫": UTF-8 wins then, by the spec's order)
    for encoding in ("gb18030", "utf-8"):
        caption, _ = split_line("橘猫在沙发上睡觉".encode(encoding) + b"\t_\t" + b64, laion)
        assert caption == "橘猫在沙发上睡觉"
    for meta, expected in [(b'{"caption_en": "en", "blip_caption_en": "blip"}', "en"),
                           (b'{"caption_en": "", "blip_caption_en": "blip"}', "blip"), (b'{"other": 1}', "")]:
        caption, image_b64 = split_line(b"\t".join([b"1", b"u", meta, b"x", b"y", b64]) + b"\n", aes)
        assert caption == expected and decode_image_base64(image_b64) == jpeg
    for line, layout, reason in [(b"caption\t_", laion, "too_few_columns"), (b"c\t_\t" + b64, aes, "too_few_columns"),
                                 (b"\x80\xff\t_\t" + b64, laion, "undecodable_text"),
                                 (b"1\tu\t[1]\tx\ty\t" + b64, aes, "invalid_caption_json"),
                                 (b"1\tu\t{bad\tx\ty\t" + b64, aes, "invalid_caption_json")]:
        with pytest.raises(LineRejected) as e:
            split_line(line, layout)
        assert e.value.reason == reason
    with pytest.raises(LineRejected) as e:
        decode_image_base64(b"abc$")
    assert e.value.reason == "invalid_base64"


def test_part_stream_errors_keep_every_complete_line(tmp_path):
    import zlib

    rows = [(c, b) for c, b, _ in crops(30, seed=5)]
    part = tmp_path / "p.gz"
    write_part(part, rows)
    data = part.read_bytes()
    lines = list(iter_part_lines(part))
    assert len(lines) == 30 and lines[0].startswith(rows[0][0].encode())
    for frac in (0.2, 0.5, 0.97):  # cut: every line zlib can inflate before the cut comes out, for each reader
        cut = data[: int(len(data) * frac)]
        part.write_bytes(cut)
        expected = zlib.decompressobj(31).decompress(cut).count(b"\n")
        for reader in ("threaded", "buffered", "exact"):
            got = []
            with pytest.raises(PartStreamError) as e:
                got.extend(iter_part_lines(part, reader=reader))
            assert e.value.reason == "truncated_gzip" and got == lines[:expected], (frac, reader)
    corrupt = bytearray(data)
    corrupt[-8] ^= 0xFF  # the CRC in the gzip trailer
    part.write_bytes(bytes(corrupt))
    got = []
    with pytest.raises(PartStreamError) as e:
        got.extend(iter_part_lines(part))
    assert e.value.reason == "gzip_error" and got == lines
    plain = tmp_path / "p.txt"
    write_part(plain, rows, gzip=False)
    assert list(iter_part_lines(plain)) == lines


def test_filelists(tmp_path, monkeypatch):
    (tmp_path / "p0.gz").write_bytes(b"")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "x.filelist").write_text(f"# comment\n{tmp_path / 'p0.gz'}\n\n../p1.gz\n")
    (tmp_path / "lists" / "train.filelist.list").write_text("x.filelist 0.25\n# off\nx.filelist\n")
    monkeypatch.chdir(tmp_path / "lists")
    assert read_file_list_list("train.filelist.list") == [("x.filelist", 0.25), ("x.filelist", 1.0)]
    monkeypatch.chdir(tmp_path)
    listed = read_file_list_list(tmp_path / "lists" / "train.filelist.list")
    assert listed == [(str(tmp_path / "lists" / "x.filelist"), 0.25), (str(tmp_path / "lists" / "x.filelist"), 1.0)]
    # p1.gz exists nowhere: kept as written, so the converter can name it as missing
    assert read_filelist(listed[0][0]) == [str(tmp_path / "p0.gz"), "../p1.gz"]


def test_tar_header_is_tarfiles():
    for name, size in [(b"000000000.jpg", 12345), (b"123456789.json", 0), (b"0000012345.webp", 8 ** 11 - 1)]:
        info = tarfile.TarInfo(name.decode())
        info.size, info.mode, info.uid, info.gid, info.uname, info.gname, info.mtime = size, 0o644, 0, 0, "", "", 0
        assert tar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_frontier_cuts_each_source_into_full_shards_in_input_order():
    sources = [PartSource("a", 1.0, ("a0", "a1")), PartSource("b", 1.0, ("b0",))]
    frontier = Frontier(sources, samples_per_shard=3, limit=None)
    jobs = frontier.consume(5)  # a0: 5 samples; shard 0 is ready once a sample past it is known
    assert [(j.shard, j.source_index, j.first_sample, j.end_sample) for j in jobs] == [(0, 0, 0, 3)]
    assert (jobs[0].failures_from, jobs[0].failures_to) == (0, 3)
    assert jobs[0].parts == (PartSpan(0, 0, 5, "a0"),)
    jobs = frontier.consume(2) + frontier.consume(4)  # a1 ends source a (its last shard is short), b0 source b
    assert [(j.shard, j.source_index, j.first_sample, j.end_sample) for j in jobs] == [
        (1, 0, 3, 6), (2, 0, 6, 7), (3, 1, 0, 3), (4, 1, 3, 4)]
    assert (jobs[0].failures_from, jobs[0].failures_to) == (4, 6) and jobs[1].failures_from == 7
    assert jobs[1].parts == (PartSpan(1, 5, 2, "a1"),) and frontier.done
    assert [(r.shards, r.samples) for r in frontier.results] == [([0, 1, 2], 7), ([3, 4], 4)]

    limited = Frontier(sources, samples_per_shard=3, limit=4)
    jobs = limited.consume(5)  # the limit falls inside a0: nothing after it is read or counted
    assert [(j.first_sample, j.end_sample, j.failures_to) for j in jobs] == [(0, 3, 3), (3, 4, 3)]
    assert limited.done and [r.excluded for r in limited.results] == [False, True]


def test_fault_injection_hook():
    assert FaultInjector.from_env({}) is no_hook
    hook = FaultInjector.from_env({FAULT_ENV: "part:count=3,sample:action=sleep:seconds=0.5"})
    assert hook.faults == [Fault("part", count=3), Fault("sample", action="sleep", seconds=0.5)]
    code = ("import os; from sd_ds.faults import Fault, FaultInjector\n"
            "hook = FaultInjector([Fault('part', count=2)])\nhook('sample'); hook('part'); print('alive', flush=True)\n"
            "hook('part'); print('not reached')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "alive\n", proc.stderr


# --- the tool end to end ----------------------------------------------------------------------------------

def test_converts_every_sample_with_its_metadata(dataset, converted):
    out, proc = converted
    assert "converted" in proc.stdout and "skipped: truncated_gzip" in proc.stdout  # the summary table
    sources = json.loads((out / "sources.json").read_text())
    sizes = json.loads((out / "sizes.json").read_text())
    assert list(sources) == ["sources"]
    shard_of_source = {}
    next_shard = 0
    for entry, name in zip(sources["sources"], dataset.source_names):
        assert set(entry) == {"name", "weight", "shards", "samples"}
        assert entry["name"] == name and entry["weight"] == dataset.weights[name]
        assert isinstance(entry["weight"], float) and isinstance(entry["samples"], int)
        expected = dataset.expected.get(name, [])
        assert entry["samples"] == len(expected)
        n_shards = -(-len(expected) // SPP)
        assert entry["shards"] == [f"{i:05d}.tar" for i in range(next_shard, next_shard + n_shards)]
        shard_of_source[name] = entry["shards"]
        next_shard += n_shards
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:05d}.tar" for i in range(next_shard)]
    assert sorted(sizes) == [f"{i:05d}.tar" for i in range(next_shard)]

    for name in dataset.source_names:
        expected = dataset.expected.get(name, [])
        got = []
        for shard_file in shard_of_source[name]:
            shard = int(shard_file[:5])
            samples = tar_samples(out / shard_file)
            assert len(samples) == sizes[shard_file]
            # full shards except the last of the source; never two sources in one
            assert len(samples) == SPP or shard_file == shard_of_source[name][-1]
            for index, (key, members) in enumerate(samples):
                assert key == f"{shard:05d}{index:04d}"
                got.append(members)
        assert len(got) == len(expected)
        for members, exp in zip(got, expected):
            ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}[Image.open(io.BytesIO(exp["image"])).format.lower()]
            assert sorted(members) == sorted([ext, "txt", "json"])
            assert members[ext] == exp["image"]  # original bytes, no re-encode
            assert members["txt"].decode("utf-8") == exp["caption"]
            meta = json.loads(members["json"])
            assert meta["caption"] == exp["caption"] and (meta["width"], meta["height"]) == exp["size"]
            assert meta["source_part"] == exp["part"] and meta["line_number"] == exp["line"]
            assert meta["format"] == exp["layout"]
            assert meta["image_format"] == {"jpg": "jpeg"}.get(ext, ext)


def test_stats_count_every_line_by_reason(dataset, converted):
    out, _ = converted
    stats = json.loads((out / "stats.json").read_text())
    expected_total: dict[str, int] = {}
    for name in dataset.source_names:
        for reason, n in dataset.failures.get(name, {}).items():
            expected_total[reason] = expected_total.get(reason, 0) + n
    assert stats["failures"] == dict(sorted(expected_total.items()))
    n_good = sum(len(v) for v in dataset.expected.values())
    assert stats["successes"] == n_good
    assert stats["count"] == n_good + sum(expected_total.values())
    assert stats["empty_captions"] == dataset.empty_captions == 1
    for entry, name in zip(stats["sources"], dataset.source_names):
        assert entry["failures"] == dict(sorted(dataset.failures.get(name, {}).items()))
    # Per-shard stats add up to the totals (source C has no shard: its failures are only in stats.json).
    shard_stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    per_shard: Counter = Counter(dataset.failures[dataset.source_names[2]])
    for s in shard_stats:
        assert s["count"] == s["successes"] + sum(s["failures"].values())
        per_shard.update(s["failures"])
    assert per_shard == Counter(expected_total)
    assert [s["empty_captions"] for s in shard_stats] == [0, 0, 1, 0, 0, 0, 0, 0]
    # A failure sits in the shard of the good sample before it. a1.gz's good lines 1, 3 and 6 are samples
    # 6, 7 and 8 of source A (shards 1, 1, 2): lines 2, 4, 5 go to shard 1, lines 7-10 to shard 2.
    assert shard_stats[1]["failures"] == {"invalid_base64": 1, "not_an_image": 1, "too_few_columns": 1}
    assert shard_stats[2]["failures"] == {"image_too_large": 1, "truncated_image": 1, "undecodable_text": 1,
                                          "unsupported_format": 1}


def test_identical_bytes_whatever_the_process_count(dataset, converted, tmp_path):
    reference, _ = converted
    for processes, thread in [(2, "no"), (3, "yes")]:
        out = tmp_path / f"p{processes}"
        run_tool("--file_list", dataset.file_list, "--output_dir", out, "--samples_per_shard", SPP,
                 "--processes", processes, "--inflate_thread", thread)
        assert output_files(out) == output_files(reference)


def test_webdataset_and_tarfile_read_the_same_samples(converted):
    import webdataset as wds

    out, _ = converted
    shards = sorted(str(p) for p in out.glob("*.tar"))
    by_tarfile = [(key, members) for s in shards for key, members in tar_samples(Path(s))]
    by_wds = [{k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")}
              for sample in wds.WebDataset(shards, shardshuffle=False)]
    assert len(by_wds) == len(by_tarfile) == sum(json.loads((out / "sizes.json").read_text()).values())
    for sample, (key, members) in zip(by_wds, by_tarfile):
        assert sample == {"__key__": key, **members}


def test_limit_takes_the_first_samples_in_input_order(dataset, converted, tmp_path):
    reference, _ = converted
    for processes in (1, 2):
        out = tmp_path / f"limit{processes}"
        run_tool("--file_list", dataset.file_list, "--output_dir", out, "--samples_per_shard", SPP,
                 "--processes", processes, "--limit", 8)
        sources = json.loads((out / "sources.json").read_text())["sources"]
        assert [s["samples"] for s in sources] == [8, 0, 0]
        assert [s["shards"] for s in sources] == [["00000.tar", "00001.tar"], [], []]
        for shard in ("00000.tar", "00001.tar"):
            assert (out / shard).read_bytes() == (reference / shard).read_bytes()
        stats = json.loads((out / "stats.json").read_text())
        # the run stops after the 8th sample (a1.gz line 3): the bad line 2 counts, lines 4... are not read
        assert stats["successes"] == 8 and stats["failures"] == {"too_few_columns": 1}
        if processes == 1:
            first = output_files(out)
        else:
            assert output_files(out) == first


def test_min_size_and_resize(tmp_path):
    big = encode(photo("astronaut").crop((0, 0, 300, 200)), "PNG")
    small = encode(photo("coffee").crop((0, 0, 40, 30)), "JPEG", quality=90)
    part = tmp_path / "p.gz"
    write_part(part, [("big", big), ("small", small)])
    out = tmp_path / "o1"
    run_tool(part, "--output_dir", out, "--min_size", 31)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["successes"] == 1 and stats["failures"] == {"too_small": 1}

    out = tmp_path / "o2"
    run_tool(part, "--output_dir", out, "--max_side", 60, "--jpeg_quality", 80)
    (k0, m0), (k1, m1) = tar_samples(out / "00000.tar")
    assert sorted(m0) == ["jpg", "json", "txt"]  # re-encoded as JPEG
    with Image.open(io.BytesIO(m0["jpg"])) as im:
        assert im.size == (60, 40) and im.format == "JPEG"
    meta = json.loads(m0["json"])
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (60, 40, 300, 200)
    assert m1["jpg"] == small and "original_width" not in json.loads(m1["json"])  # within limits: untouched

    out = tmp_path / "o3"
    run_tool(part, "--output_dir", out, "--resize_shorter_to", 50)
    (_, m0), (_, m1) = tar_samples(out / "00000.tar")
    with Image.open(io.BytesIO(m0["jpg"])) as im:
        assert im.size == (75, 50)
    assert m1["jpg"] == small


def test_forced_layout_and_all_bad_input_exit_1(tmp_path):
    aes = tmp_path / "aes.gz"
    write_part(aes, [(c, b) for c, b, _ in crops(3)], fmt="laion_aes")
    out = tmp_path / "o"
    proc = run_tool(aes, "--output_dir", out, "--format", "laion400m", check_rc=1)  # nothing converted
    stats = json.loads((out / "stats.json").read_text())
    assert stats["successes"] == 0 and stats["failures"] == {"invalid_base64": 3}
    assert "skipped: invalid_base64" in proc.stdout
    assert json.loads((out / "sources.json").read_text()) == {
        "sources": [{"name": "inputs", "weight": 1.0, "shards": [], "samples": 0}]}


def test_missing_input_is_reported_before_any_work(dataset, tmp_path):
    out = tmp_path / "o"
    proc = run_tool("--file_list", tmp_path / "no.list", "--output_dir", out, check_rc=2)
    assert "no.list" in proc.stderr and not out.exists()
    proc = run_tool("--filelist", tmp_path / "no.filelist", "--output_dir", out, check_rc=2)
    assert "no.filelist" in proc.stderr and not out.exists()
    proc = run_tool(str(tmp_path / "*.gz"), "--output_dir", out, check_rc=2)  # a glob matching nothing
    assert "*.gz" in proc.stderr and not out.exists()
    proc = run_tool(dataset.root / "a0.gz", tmp_path / "typo.gz", "--output_dir", out, check_rc=2)  # a named part
    assert str(tmp_path / "typo.gz") in proc.stderr and not out.exists()


def test_missing_listed_part_is_skipped_and_counted_or_refused_with_strict(dataset, tmp_path):
    missing = [tmp_path / "nope-00001.gz", tmp_path / "nope-00002.gz"]
    filelist = tmp_path / "x.filelist"
    filelist.write_text(f"{missing[0]}\n{dataset.root / 'a0.gz'}\n{missing[1]}\n")
    out = tmp_path / "o"
    proc = run_tool("--filelist", filelist, "--output_dir", out, "--strict", check_rc=2)
    assert "--strict" in proc.stderr and all(str(p) in proc.stderr for p in missing) and not out.exists()

    proc = run_tool("--filelist", filelist, "--output_dir", out)
    assert "warning: 2 of 3 listed parts do not exist" in proc.stderr
    assert all(str(p) in proc.stderr for p in missing)
    assert "2 listed part(s) do not exist: skipped" in proc.stdout  # the final summary
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["missing_parts"], stats["parts"], stats["successes"]) == (2, 1, 6)
    assert stats["sources"][0]["missing_parts"] == 2 and stats["failures"] == {}
    reference = tmp_path / "ref"  # the same conversion with only the part that exists listed
    (tmp_path / "ref.filelist").write_text(f"{dataset.root / 'a0.gz'}\n")
    run_tool("--filelist", tmp_path / "ref.filelist", "--output_dir", reference)
    assert (out / "00000.tar").read_bytes() == (reference / "00000.tar").read_bytes()
    assert json.loads((reference / "stats.json").read_text())["missing_parts"] == 0
    proc = run_tool("--filelist", filelist, "--output_dir", out)  # a rerun: same plan, already complete
    assert "already complete" in proc.stdout and "2 listed part(s) do not exist" in proc.stdout


def test_part_listed_twice_is_converted_once(dataset, tmp_path):
    part = dataset.root / "a0.gz"
    first = tmp_path / "first.filelist"  # the part, then the same file under two other spellings
    first.write_text(f"{part}\n{dataset.root}/./a0.gz\n{os.path.relpath(part, tmp_path)}\n")
    second = tmp_path / "second.filelist"  # and in a second source
    second.write_text(f"{part}\n")
    out = tmp_path / "o"
    proc = run_tool("--filelist", first, "--filelist", second, "--output_dir", out)
    assert "warning: 3 part(s) listed more than once" in proc.stderr
    assert "3 part(s) listed more than once: converted once" in proc.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["duplicate_parts"], stats["parts"], stats["successes"], stats["shards"]) == (3, 1, 6, 1)
    assert [s["duplicate_parts"] for s in stats["sources"]] == [2, 1]
    sources = json.loads((out / "sources.json").read_text())["sources"]
    assert [(s["samples"], s["shards"]) for s in sources] == [(6, ["00000.tar"]), (0, [])]
    assert len(tar_samples(out / "00000.tar")) == 6


def test_refuses_an_output_dir_written_otherwise(dataset, converted, tmp_path):
    out, _ = converted
    before = output_files(out)
    proc = run_tool("--file_list", dataset.file_list, "--output_dir", out, "--samples_per_shard", SPP + 1,
                    check_rc=2)
    assert "samples_per_shard" in proc.stderr and output_files(out) == before
    proc = run_tool("--file_list", dataset.file_list, "--output_dir", out, "--samples_per_shard", SPP)
    assert "already complete" in proc.stdout and output_files(out) == before  # same arguments: a no-op
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_tool(dataset.root / "a0.gz", "--output_dir", foreign, check_rc=2)
    assert "not empty" in proc.stderr


def test_unusable_output_dir_is_a_one_line_error_exit_2(dataset, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out, reason in [(a_file, "is a file, not a folder"), (a_file / "shards", "Not a directory")]:
        proc = run_tool(dataset.root / "a0.gz", "--output_dir", out, check_rc=2)
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: ") and str(out) in proc.stderr and reason in proc.stderr
    assert a_file.read_text() == "not a folder"


def test_help_explains_and_startup_stays_light():
    proc = run_tool("--help")
    for flag in ("--file_list", "--filelist", "--format", "--samples_per_shard", "--processes", "--min_size",
                 "--max_side", "--resize_shorter_to", "--jpeg_quality", "--limit", "--max_pixels", "sources.json",
                 "truncated_gzip", "--strict", "missing_parts", "duplicate_parts", "--inflate_thread", "--no_progress"):
        assert flag in proc.stdout
    code = ("import runpy, sys; sys.argv = ['x', '--help']\ntry: runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit: pass\nassert 'torch' not in sys.modules and 'PIL' not in sys.modules" % str(TOOL))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO)


# --- resume ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def many_parts(tmp_path_factory) -> tuple[list[Path], Path]:
    """Eight parts of 5 good and 1 bad line, and an uninterrupted conversion of them (3 samples a shard)."""
    root = tmp_path_factory.mktemp("many")
    pics = crops(40, seed=7, formats=("JPEG", "PNG"))
    parts = []
    for i in range(8):
        rows = [(c, b) for c, b, _ in pics[5 * i: 5 * i + 5]]
        rows.insert(i % 5, bad_lines()["not_an_image"])
        parts.append(root / f"part-{i:05d}.gz")
        write_part(parts[-1], rows)
    reference = root / "reference"
    run_tool(*parts, "--output_dir", reference, "--samples_per_shard", 3, "--processes", 1)
    return parts, reference


@pytest.mark.parametrize("kill_at,processes", [
    ("sample:count=7", 1),        # inside the second part, fragment half written
    ("part:count=3", 2),          # a worker, right after its third part is recorded
    ("shard_chunk:count=2", 1),   # inside the second shard, tar half written
    ("shard:count=4", 1),         # right after a shard is renamed into place
    ("main_shard:count=5", 2),    # the main process, after five shards are done
])
def test_resume_after_sigkill(many_parts, tmp_path, kill_at, processes):
    parts, reference = many_parts
    out = tmp_path / "o"
    args = [*parts, "--output_dir", out, "--samples_per_shard", 3, "--processes", processes]
    proc = run_tool(*args, env={"SD_DS_FAULT": kill_at}, check_rc=None)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not (out / "stats.json").exists()  # really killed mid-run
    run_tool(*args)
    assert output_files(out) == output_files(reference)
    assert not list(out.glob("*.tmp.*")) and not (out / "_convert" / "parts").exists()


def test_resume_after_external_sigkill_of_the_main_process(many_parts, tmp_path):
    """SIGKILL from outside, to the main process only: its workers must die with it, and a rerun completes."""
    parts, reference = many_parts
    out = tmp_path / "o"
    args = [sys.executable, str(TOOL), *map(str, parts), "--output_dir", str(out), "--samples_per_shard", "3",
            "--processes", "2", "--no_progress"]
    # slow the workers down (0.2 s per sample written) so the kill lands mid-run, whatever the machine
    env = {**os.environ, "SD_DS_FAULT": "sample:action=sleep:seconds=0.1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "00000.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == proc.pid]
    proc.kill()
    proc.wait()
    assert (out / "00000.tar").exists() and not (out / "stats.json").exists()
    assert len(children) >= 2  # the two workers (and multiprocessing's resource tracker)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in children), "workers outlived the killed main process"
    run_tool(*parts, "--output_dir", out, "--samples_per_shard", 3, "--processes", 2)
    assert output_files(out) == output_files(reference)


def _alive(proc_dir: Path) -> bool:
    """Running, not a zombie that an init without reaping keeps listed."""
    try:
        return (proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _ppid(proc_dir: Path):
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_second_run_into_a_busy_output_dir_is_refused(dataset, tmp_path):
    import fcntl

    out = tmp_path / "o"
    part = dataset.root / "a0.gz"
    run_tool(part, "--output_dir", out, "--limit", 1)  # an OUT of this plan...
    (out / "_convert" / "complete.json").unlink()
    with open(out / "_convert" / "lock", "w") as lock:  # ...that another run is writing to
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = run_tool(part, "--output_dir", out, "--limit", 1, check_rc=2)
    assert "another conversion" in proc.stderr


def test_progress_bar_shows_bytes_and_samples_per_second(dataset, tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), str(dataset.root / "a0.gz"), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "B/s" in proc.stderr and "samples/s" in proc.stderr and "6 samples" in proc.stderr


def test_a_directory_given_as_an_input_is_named_a_directory_not_missing(dataset, tmp_path):
    """Issue 30: a part path (or filelist) that is a directory said "input file not found"."""
    out = tmp_path / "o"
    folder = dataset.root
    for args in ([folder], ["--filelist", folder]):
        proc = run_tool(*args, "--output_dir", out, check_rc=2)
        assert proc.stderr.strip().splitlines() == [
            f"error: {folder} is a directory, not a file: parts, --filelist and --file_list name files (for the parts "
            f"in a directory, a quoted glob such as '{folder}/*'); nothing was converted"], proc.stderr
        assert "not found" not in proc.stderr and not out.exists()
    # A directory and a missing part together: each said for what it is.
    proc = run_tool(folder, tmp_path / "typo.gz", "--output_dir", out, check_rc=2)
    assert f"{folder} is a directory" in proc.stderr and "1 input file(s) not found" in proc.stderr
    assert str(tmp_path / "typo.gz") in proc.stderr and not out.exists()

"""Metadata filters at conversion (img2dataset's): --min_image_size, --max_aspect_ratio and, on the laion_aes
layout's metadata, --min_aesthetic, --max_punsafe, --max_pwatermark; every drop counted under its reason in
stats.json and the shard stats, and a run without filters keeps its plan record as before (resumable)."""

from __future__ import annotations

import json

from laion_parts import encode, photo
from sd_ds.convert.parts import write_part
from sd_ds.convert.planning import ConvertOptions, PartSource, plan_record
from test_converter import run_tool, tar_samples


def _image(width: int, height: int) -> bytes:
    return encode(photo("astronaut").crop((0, 0, width, height)), "JPEG", quality=85)


def test_filters_drop_and_count_by_reason(tmp_path):
    rows = [  # (metadata, image): which filter drops it
        ({"caption_en": "kept", "aesthetic": 6.5, "punsafe": 0.01, "pwatermark": 0.1}, _image(64, 48)),
        ({"caption_en": "ugly", "AESTHETIC_SCORE": 4.0, "punsafe": 0.01, "pwatermark": 0.1}, _image(64, 48)),
        ({"caption_en": "nsfw", "aesthetic_score": 7.0, "punsafe": 0.9, "pwatermark": 0.1}, _image(64, 48)),
        ({"caption_en": "marked", "aesthetic": 7.0, "punsafe": 0.0, "pwatermark": 0.95}, _image(64, 48)),
        ({"caption_en": "no scores"}, _image(48, 64)),  # no metadata: the metadata filters do not apply
        ({"caption_en": "banner", "aesthetic": 9.0}, _image(200, 40)),  # 5:1
        ({"caption_en": "tiny", "aesthetic": 9.0}, _image(20, 30)),
    ]
    part = tmp_path / "aes.gz"
    write_part(part, rows, fmt="laion_aes")
    out = tmp_path / "o"
    proc = run_tool(part, "--output_dir", out, "--min_image_size", 24, "--max_aspect_ratio", 3, "--min_aesthetic", 5,
                    "--max_punsafe", 0.5, "--max_pwatermark", 0.8)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["failures"] == {"aesthetic_too_low": 1, "aspect_ratio_too_large": 1, "punsafe_too_high": 1,
                                 "pwatermark_too_high": 1, "too_small": 1}
    assert stats["successes"] == 2 and stats["count"] == 7
    assert json.loads((out / "00000_stats.json").read_text())["failures"] == stats["failures"]
    assert [m["txt"] for _, m in tar_samples(out / "00000.tar")] == [b"kept", b"no scores"]
    assert "skipped: punsafe_too_high" in proc.stdout

    # laion400m lines carry no metadata: only the image filters apply there
    plain = tmp_path / "plain.gz"
    write_part(plain, [("wide", _image(200, 40)), ("fine", _image(64, 48))])
    out = tmp_path / "o2"
    run_tool(plain, "--output_dir", out, "--max_aspect_ratio", 3, "--min_aesthetic", 5, "--max_punsafe", 0.1)
    assert json.loads((out / "stats.json").read_text())["failures"] == {"aspect_ratio_too_large": 1}


def test_plan_record_without_filters_is_unchanged():
    """Filters off: the plan record holds no filter keys, so an OUT written before they existed resumes."""
    sources = [PartSource("inputs", 1.0, ())]
    options = plan_record(sources, ConvertOptions())["options"]
    assert not {"max_aspect_ratio", "min_aesthetic", "max_punsafe", "max_pwatermark"} & set(options)
    assert plan_record(sources, ConvertOptions(max_punsafe=0.5))["options"]["max_punsafe"] == 0.5

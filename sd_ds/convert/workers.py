"""What the converter's worker processes run: one part into a fragment (each line parsed, its image header
checked, optionally re-encoded) and one shard assembled from fragments; and their start-up (die with the main
process, report progress through a queue, carry the run's hook).

Workers are spawned, so everything they get (jobs, the hook) is pickled, and this module imports little.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from sd_ds.convert.image_header import ImageInfo, ImageRejected, probe_image
from sd_ds.convert.parts import (LAYOUTS, Layout, LineRejected, PartStreamError, decode_image_base64, detect_layout,
                                 iter_part_lines, line_metadata, part_size, split_line)
from sd_ds.convert.planning import ConvertOptions
from sd_ds.convert.storage import open_store
from sd_ds.convert.tar_writing import (FragmentWriter, KeyFormat, PartSpan, ShardJob, assemble_shard,
                                       fragment_paths)
from sd_ds.faults import Hook, no_hook

__all__ = ["PartJob", "worker_init", "run_task", "convert_part", "assemble_shard_job", "PROGRESS_INTERVAL_S"]

PROGRESS_INTERVAL_S = 0.25  # how often a worker reports progress mid-part

# Set by worker_init in each worker process.
_progress_queue: Optional[Any] = None
_hook: Hook = no_hook
_hook_run = ""  # the run whose hook run_task installed in this process


def worker_init(progress_queue: Any, main_pid: int, hook: Hook) -> None:
    global _progress_queue, _hook
    _progress_queue, _hook = progress_queue, hook
    if sys.platform.startswith("linux"):
        try:  # die with the main process, so a killed run leaves no writer behind
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != main_pid:  # the main process died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process


def run_task(hook: Hook, run_id: str, fn: Callable[..., Any], *args: Any) -> Any:
    """A task on a cluster worker (Spark, Ray): the local pool's ``worker_init`` does not run there (no
    parent to die with, no progress queue: progress rides on the result), so the hook comes with each task.
    It is installed by the first task of a run that a worker process runs (engines reuse worker processes
    across tasks and runs), so its counts are per process and run, as in the local pool."""
    global _hook, _hook_run
    if _hook_run != run_id:
        _hook, _hook_run = hook, run_id
    return fn(*args)


def _report_progress(nbytes: int, samples: int) -> None:
    if _progress_queue is not None and (nbytes or samples):
        _progress_queue.put((nbytes, samples))


@dataclass(frozen=True)
class PartJob:
    """Convert part number ``part`` (``path``) into its fragment in ``work``."""

    part: int
    path: str
    out: str  # the output folder or URL (its store holds the fragments, in _convert/parts)
    options: ConvertOptions
    reader: str = "buffered"  # iter_part_lines' reader: "threaded" inflates in a thread of its own


# --- one sample ------------------------------------------------------------------------------------------

def _resize(image: bytes, info: ImageInfo, options: ConvertOptions) -> tuple[bytes, ImageInfo]:
    """Downscale to the size limits and re-encode as JPEG; images already within them keep their bytes."""
    width, height = info.width, info.height
    scale = 1.0
    if options.resize_shorter_to and min(width, height) > options.resize_shorter_to:
        scale = options.resize_shorter_to / min(width, height)
    if options.max_side and max(width, height) * scale > options.max_side:
        scale = options.max_side / max(width, height)
    if scale >= 1.0:
        return image, info
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = options.max_pixels or None  # already enforced on the header; keep PIL consistent
    try:
        with Image.open(io.BytesIO(image)) as pil_image:
            pil_image.draft("RGB", size)  # JPEG: decode at a reduced DCT scale, much faster for large downscales
            has_alpha = pil_image.mode in ("RGBA", "LA", "PA")
            if has_alpha or (pil_image.mode == "P" and "transparency" in pil_image.info):
                rgba = pil_image.convert("RGBA")
                pil_image = Image.new("RGB", rgba.size, (255, 255, 255))
                pil_image.paste(rgba, mask=rgba.getchannel("A"))
            else:
                pil_image = pil_image.convert("RGB")
            pil_image = pil_image.resize(size, Image.LANCZOS)
            encoded = io.BytesIO()
            pil_image.save(encoded, format="JPEG", quality=options.jpeg_quality)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageRejected("decode_error", str(e)) from None
    return encoded.getvalue(), ImageInfo("jpeg", *size)


def _parse_sample(line: bytes, layout: Layout, options: ConvertOptions) -> tuple[str, bytes, ImageInfo, ImageInfo]:
    """(caption, image bytes, image info, original image info) of a line; raises LineRejected/ImageRejected."""
    caption, image_base64 = split_line(line, layout)
    filters = options.metadata_filters
    if filters:  # before the image: a dropped line costs no base64 decode
        values = line_metadata(line, layout)
        for name, (threshold, sign, reason) in filters.items():
            if name in values and sign * values[name] < sign * threshold:
                raise LineRejected(reason, f"{name} {values[name]}")
    image = decode_image_base64(image_base64)
    info = original = probe_image(image, options.max_pixels)
    if options.min_size and min(info.width, info.height) < options.min_size:
        raise ImageRejected("too_small", f"{info.width}x{info.height}")
    if options.max_aspect_ratio and max(info.width, info.height) > options.max_aspect_ratio * min(info.width,
                                                                                                   info.height):
        raise ImageRejected("aspect_ratio_too_large", f"{info.width}x{info.height}")
    if options.reencodes:
        image, info = _resize(image, info, options)
    return caption, image, info, original


# --- one part, one shard ---------------------------------------------------------------------------------

def convert_part(job: PartJob) -> dict:
    """One part → fragment (tar members of its good samples), offsets and record (the part's sample count,
    failures and empty captions). Returns the part, its samples and bytes, and the progress not yet reported
    (it rides on the result, so the progress bar ends exact)."""
    options = job.options
    path = job.path
    layout = LAYOUTS[options.layout if options.layout != "auto" else (detect_layout(path) or "laion400m")]
    limit = options.limit
    failures: list[list] = []  # [line number, reason, good samples before it in this part]
    empty_captions: list[int] = []  # indices of the part's samples that have one
    stream_error: Optional[str] = None
    samples = lines = 0
    position = [0]  # compressed bytes read, for progress
    reported = (0, 0)
    next_report = time.monotonic() + PROGRESS_INTERVAL_S
    placeholder = KeyFormat(options.samples_per_shard).placeholder
    with FragmentWriter(open_store(job.out), fragment_paths(job.part), placeholder) as fragment:
        try:
            for line in iter_part_lines(path, position, reader=job.reader):
                lines += 1
                try:
                    caption, image, info, original = _parse_sample(line, layout, options)
                except (LineRejected, ImageRejected) as e:
                    failures.append([lines, e.reason, samples])
                    continue
                meta = {"caption": caption, "width": info.width, "height": info.height}
                if info is not original:
                    meta.update(original_width=original.width, original_height=original.height)
                meta.update(source_part=path, line_number=lines, format=layout.name, image_format=info.format)
                fragment.add(info.ext, image, caption, meta)
                if not caption:
                    empty_captions.append(samples)
                samples += 1
                _hook("sample")
                if lines % 32 == 0 and time.monotonic() >= next_report:
                    _report_progress(position[0] - reported[0], samples - reported[1])
                    reported, next_report = (position[0], samples), time.monotonic() + PROGRESS_INTERVAL_S
                if limit is not None and samples >= limit:
                    break
        except PartStreamError as e:
            failures.append([lines + 1, e.reason, samples])
            stream_error = str(e)
    record = {"part": job.part, "path": path, "layout": layout.name, "lines": lines, "samples": samples,
              "bytes": part_size(path), "stream_error": stream_error, "failures": failures,
              "empty_captions": empty_captions}
    fragment.commit(record)
    _hook("part")
    return {"part": job.part, "samples": samples, "bytes": record["bytes"],
            "unreported": (record["bytes"] - reported[0], samples - reported[1])}


def assemble_shard_job(job: ShardJob, source_name: str, out: str, part_template: PartJob) -> bool:
    """Assemble one shard (see ``tar_writing.assemble_shard``), converting again any part whose fragment a
    resumed run already deleted. ``part_template``: the run's PartJob, for those parts. Returns False when
    the shard already existed."""
    def redo_part(span: PartSpan) -> None:
        convert_part(PartJob(span.part, span.path, part_template.out, part_template.options, part_template.reader))

    return assemble_shard(job, source_name, open_store(out), KeyFormat(part_template.options.samples_per_shard),
                          redo_part, _hook)

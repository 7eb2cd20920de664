"""Repack LAION base64 parts into webdataset shards (the img2dataset layout, read by open_clip and sd-ds).

    python tools/convert_laion_to_wds.py --file_list train.filelist.list --output_dir OUT
    python tools/convert_laion_to_wds.py 'parts/part-*.gz' --output_dir OUT --processes 32

Inputs (any mix; sources in this order): --file_list files (lines "filelist_path [weight]"), --filelist
files (one part path per line, weight 1.0), part paths or globs (one source named "inputs"). Parts may be
gzip-compressed or plain (told apart by content). A list, filelist, part path or glob named on the command
line that does not exist is reported before any work (exit 2). A part listed in a filelist that does not
exist is skipped with a warning and counted (stats.json "missing_parts", per source and in total, and the
final summary): tools/write_filelist.py writes ppdiffusers' 60,000 names, not all of which need exist;
with --strict it is refused instead (exit 2, before any work). A part listed more than once (in one filelist
or several, however its path is written) is converted once, where it is first listed, with a warning
(stats.json "duplicate_parts").

Output in OUT: 00000.tar, 00001.tar, ... with samples KEY.jpg|png|webp (the original image bytes unless a
resize is asked for), KEY.txt (caption) and KEY.json (key, caption, width, height, source_part, line_number,
format, image_format); KEY = f"{shard:05d}{index:04d}" (more index digits above 10^4 samples per shard).
Also NNNNN_stats.json per shard, sizes.json, stats.json (totals) and sources.json (shards and samples per
filelist, with its weight, which the trainer uses to mix sources; a shard never holds two sources).

Work split: a gzip part cannot be counted without inflating it, so instead of a counting pass (a second
read of every part) each part is read once, by one worker, into a fragment of finished tar members; shards
are then cut from the fragments in input order as soon as the counts before them are known. So every shard
holds exactly --samples_per_shard samples except the last of each source, samples keep their input order,
and the bytes are the same for any --processes (sd_ds/convert/ has the details). A killed run resumes
when started again with the same arguments (done parts and shards are kept); other arguments are refused.

Bad lines are skipped and counted by reason in the stats, never fatal:
{reasons}.
Empty captions are kept and counted. Exit status 0, 1 when nothing could be converted, 2 for bad arguments,
missing inputs (listed parts too, with --strict) or an unusable OUT (a file, not creatable or writable, not
empty and not a converter output, written with other inputs or options, or in use by another run), 130 when
interrupted (rerun the command to resume).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

from sd_ds.convert.engines import ENGINES, EngineSettings, EngineUnavailable, check_installed
from sd_ds.convert.image_header import PIL_MAX_IMAGE_PIXELS
from sd_ds.convert.planning import ConvertOptions, OutputDirError, collect_sources
from sd_ds.convert.reasons import FAILURE_REASONS
from sd_ds.convert.run import available_cores, convert, format_summary
from sd_ds.faults import FaultInjector
from sd_ds.redaction import guard_console

DOC = __doc__.replace("{reasons}", textwrap.fill(", ".join(FAILURE_REASONS), 106, initial_indent="  ",
                                                subsequent_indent="  "))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    summary, epilog = DOC.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog=prog, description=summary, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="PART", help="part files or globs (quote globs), gzip or plain")
    parser.add_argument("--file_list", action="append", default=[], metavar="LIST",
                        help="a train.filelist.list: lines 'filelist_path [weight]' (repeatable)")
    parser.add_argument("--filelist", action="append", default=[], metavar="FILE",
                        help="a filelist: one part path per line; weight 1.0 (repeatable)")
    parser.add_argument("--output_dir", required=True,
                        help="folder for the shards (created; resumed if it holds a run)")
    parser.add_argument("--format", choices=["auto", "laion400m", "laion_aes"], default="auto",
                        help="line layout. laion400m: caption, _, base64 image; laion_aes: JSON caption (caption_en, "
                             "else blip_caption_en) in column 3, image in column 6; auto (default): decided per part "
                             "from its first good line")
    parser.add_argument("--samples_per_shard", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--processes", type=int, default=available_cores(),
                        help="worker processes (default: all cores, here %(default)s); does not change the output")
    parser.add_argument("--min_size", "--min_image_size", dest="min_size", type=int, default=0,
                        help="skip images whose shorter side is smaller (default 0; img2dataset's name: "
                             "--min_image_size)")
    parser.add_argument("--max_aspect_ratio", type=float, default=0.0,
                        help="skip images whose longer side / shorter side exceeds this (default 0: off)")
    parser.add_argument("--min_aesthetic", type=float, default=None,
                        help="laion_aes: skip lines whose metadata's aesthetic score (aesthetic, aesthetic_score or "
                             "AESTHETIC_SCORE in the JSON column) is below this; lines without one are kept")
    parser.add_argument("--max_punsafe", type=float, default=None,
                        help="laion_aes: skip lines whose metadata's punsafe is above this (default: off)")
    parser.add_argument("--max_pwatermark", type=float, default=None,
                        help="laion_aes: skip lines whose metadata's pwatermark is above this (default: off)")
    parser.add_argument("--max_pixels", type=int, default=PIL_MAX_IMAGE_PIXELS,
                        help="skip images with more pixels, width x height (decompression bombs); default PIL's "
                             "MAX_IMAGE_PIXELS, %(default)s; 0: no limit")
    parser.add_argument("--max_side", type=int, default=0,
                        help="downscale images whose longer side exceeds this and re-encode them as JPEG "
                             "(default 0: off)")
    parser.add_argument("--resize_shorter_to", type=int, default=0,
                        help="downscale images whose shorter side exceeds this to it, re-encoding as JPEG "
                             "(default 0: off)")
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N good samples (trials)")
    parser.add_argument("--inflate_thread", choices=["auto", "yes", "no"], default="auto",
                        help="inflate each part in a thread beside its parser (auto, the default: when --processes "
                             "leaves cores idle); never changes the output")
    parser.add_argument("--strict", action="store_true",
                        help="refuse (exit 2) when a part listed in a filelist does not exist, instead of skipping it "
                             "with a warning")
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="where the work runs: local (default) worker processes on this host; spark, on "
                             "--spark_master; ray, on --ray_address. This process plans and numbers every part and "
                             "shard, the engine converts parts and writes shards, so the output is byte-identical "
                             "for every engine and executor count. Cluster workers need --output_dir on storage "
                             "they all reach. Extras: pip install -e '.[spark]' / '.[ray]'")
    parser.add_argument("--spark_master", default=None,
                        help="Spark master for --engine spark: local[N], spark://host:7077, ... (default: the one "
                             "spark-submit provides, else local[*])")
    parser.add_argument("--ray_address", default=None,
                        help="Ray cluster for --engine ray: 'auto' joins the cluster this host belongs to (ray "
                             "start), ray://host:10001 a remote one (default: start a local Ray with --processes "
                             "CPUs)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def _print_paths(headline: str, paths: list[str], shown: int = 20) -> None:
    """A headline and the first ``shown`` paths, on stderr."""
    print(headline, file=sys.stderr)
    for path in paths[:shown]:
        print(f"  {path}", file=sys.stderr)
    if len(paths) > shown:
        print(f"  ... and {len(paths) - shown:,} more", file=sys.stderr)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    guard_console()  # no credential of a part's URL reaches the console (ours or a library's messages)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    try:
        options = ConvertOptions(layout=args.format, samples_per_shard=args.samples_per_shard,
                                 min_size=args.min_size, max_pixels=args.max_pixels, max_side=args.max_side,
                                 resize_shorter_to=args.resize_shorter_to, jpeg_quality=args.jpeg_quality,
                                 limit=args.limit, max_aspect_ratio=args.max_aspect_ratio,
                                 min_aesthetic=args.min_aesthetic, max_punsafe=args.max_punsafe,
                                 max_pwatermark=args.max_pwatermark)
    except ValueError as e:
        parser.error(str(e))
    collected = collect_sources(args.file_list, args.filelist, args.inputs)
    if collected.missing_inputs:
        directories = collected.directory_inputs
        missing = [path for path in collected.missing_inputs if path not in directories]
        advice = "parts, --filelist and --file_list name files (for the parts in a directory, a quoted glob such as"
        if len(directories) == 1:
            print(f"error: {directories[0]} is a directory, not a file: {advice} '{directories[0]}/*'); nothing was "
                  "converted", file=sys.stderr)
        elif directories:
            _print_paths(f"error: {len(directories)} inputs are directories, not files: {advice} 'DIR/*'); nothing "
                         "was converted:", directories)
        if missing:
            _print_paths(f"error: {len(missing)} input file(s) not found; nothing was converted:", missing)
        return 2
    sources = collected.sources
    missing_parts, duplicate_parts = collected.missing_parts, collected.duplicate_parts
    if missing_parts and args.strict:
        _print_paths(f"error: {len(missing_parts):,} listed part(s) do not exist (--strict); nothing was converted:",
                     missing_parts)
        return 2
    if missing_parts:
        listed = len(missing_parts) + sum(len(source.parts) for source in sources)
        _print_paths(f"warning: {len(missing_parts):,} of {listed:,} listed parts do not exist; they are skipped and "
                     f"counted in stats.json (missing_parts); --strict refuses them:", missing_parts)
    if duplicate_parts:
        _print_paths(f"warning: {len(duplicate_parts):,} part(s) listed more than once; each is converted once, "
                     f"where first listed:", duplicate_parts)
    if not any(source.parts for source in sources):
        parser.error("no input parts: give part paths/globs, --filelist or --file_list"
                     + (" (none of the listed parts exists)" if missing_parts else ""))
    try:
        check_installed(args.engine)
    except EngineUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        stats = convert(sources, args.output_dir, options, processes=args.processes, progress=not args.no_progress,
                        inflate_thread={"auto": None, "yes": True, "no": False}[args.inflate_thread],
                        hook=FaultInjector.from_env(),  # the tests' way in to kill a run at a chosen point
                        engine=EngineSettings(args.engine, args.processes, args.spark_master, args.ray_address))
    except (OutputDirError, EngineUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(format_summary(stats))
    print(f"output: {args.output_dir} ({time.monotonic() - started:.1f} s)")
    return 0 if stats["successes"] else 1


if __name__ == "__main__":
    sys.exit(main())

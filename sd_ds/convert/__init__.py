"""The LAION converter: LAION parts → webdataset shards in the img2dataset layout (plan, convert, assemble,
resume). ``cli`` is its command line (``sd-ds convert``, ``python -m sd_ds.convert`` and
``tools/convert_laion_to_wds.py``, the same flags); ``run.convert`` its entry point.

Modules, one concern each:

- ``parts``: LAION part files: line layouts, filelists, reading parts (and writing them, for tests and demos);
- ``image_header``: an image's format, size and completeness from its header, without decoding pixels;
- ``reasons``: what a line is skipped for, and the catalogue of reasons the stats count;
- ``tar_writing``: tar headers, fragments (a part's samples as finished tar members), shard assembly;
- ``planning``: options, sources, the plan record a resume must match, the frontier that orders shards;
- ``workers``: what a worker process runs (a part into a fragment, a shard from fragments);
- ``run``: the run loop on a process pool, its progress bar, and the totals it writes;

Output (OUT = --output_dir)::

    00000.tar 00001.tar ...   samples "{key}.jpg|png|webp" (original bytes), "{key}.txt", "{key}.json"
    00000_stats.json ...      per shard: count, successes, failures by reason, empty captions
    sizes.json                {"00000.tar": samples, ...}
    sources.json              {"sources": [{"name", "weight", "shards", "samples"}]}: one per filelist
    stats.json                totals and per-source totals
    convert_options.json      inputs and options of the run (a resume must match them)

Keys are ``f"{shard:05d}{index:04d}"`` (img2dataset's scheme; the index widens when --samples_per_shard
exceeds 10^4), so a key names its shard and position.

How the work is split, and why. Shard numbers need the sample counts of all earlier parts, and a gzip part
cannot be counted without inflating it: a counting pass would read a 60,000-part input twice. So each part is
read exactly once, by one worker, into a *fragment* (``OUT/_convert/parts/NNNNNN.frag``): the finished tar
members of its good samples, in line order, with a placeholder key of the final width; next to it a small
record of the sample count, byte offsets and failures. When the counts of all parts up to a shard's end are
known, a worker *assembles* the shard: it copies the shard's byte ranges out of one or more fragments, writes
the real keys into the member names and JSON (same width, so sizes and offsets do not move) and renames the
tar into place. Every shard therefore holds exactly --samples_per_shard samples except the last one of each
source (a shard never mixes two filelists), samples keep their input order, and nothing depends on which
worker did what: the output is byte-identical for any --processes. The price is one extra sequential copy of
the output bytes (page-cache warm; with it, one process still converts faster than ``gzip -dc`` inflates, see
bench/bench_converter.py). Parts are handed out in input order with a bounded look-ahead, so few fragments wait
for assembly at any time, and each is deleted once its shards exist. img2dataset's other option, every part
writing its own shard range, would leave one short shard per part (a 7,000-line part → a 7,000-sample shard).

Resume. Fragments, records and shards are written under temporary names and renamed when complete; a record
marks a part done and a shard file marks a shard done. A run killed at any point (SIGKILL included) and
started again with the same arguments skips what exists and redoes the rest, so no sample is lost or
duplicated. Workers die with the main process (PR_SET_PDEATHSIG) and temporary names carry the writer's pid,
so a straggler of a killed run cannot corrupt the next one. Different inputs or options are refused.
Renames protect against killed processes; only the small JSON records go through ``sd_ds.fileio``'s fsync,
so a machine losing power can still lose fragment or shard bytes.

Bad input is counted, never fatal: see ``reasons.FAILURE_REASONS``. A failure is attributed to the shard of
the previous good sample of its source (the first shard when there is none).
"""

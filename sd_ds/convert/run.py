"""The conversion run: ``convert`` opens the output folder, runs the work on a process pool and writes the
totals (stats.json, sizes.json, sources.json); ``format_summary`` is the table printed at the end.

The loop itself is ``ConversionRun``: it hands parts to workers in input order (a bounded look-ahead past the
oldest part whose count is not yet used), feeds their sample counts to the ``Frontier``, hands the shards that
became ready to workers, and deletes fragments no shard still needs. ``Progress`` is its bar: compressed bytes
read, and samples written with their rate.
"""

from __future__ import annotations

import os
import queue
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import replace
from typing import Any, Callable, Optional

from sd_ds.convert.engines import EngineSettings, build_engine
from sd_ds.convert.planning import WORK_DIR, ConvertOptions, Frontier, PartSource, open_output, plan_record
from sd_ds.convert.storage import Store, open_store
from sd_ds.convert.tar_writing import PARTS_DIR, ShardJob, fragment_paths, shard_name, stats_name
from sd_ds.convert.workers import PartJob, assemble_shard_job, convert_part
from sd_ds.faults import Hook, no_hook

__all__ = ["convert", "ConversionRun", "Progress", "available_cores", "format_summary"]

COMPLETE_FILE = "complete.json"  # in OUT/_convert: the run finished; a rerun only reports


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def convert(sources: list[PartSource], output_dir: str | os.PathLike, options: ConvertOptions, processes: int = 1,
            progress: bool = True, inflate_thread: Optional[bool] = None,
            log: Callable[[str], None] = print, hook: Hook = no_hook,
            engine: Optional[EngineSettings] = None) -> dict:
    """Convert ``sources`` into shards in ``output_dir`` (resuming what a previous run left); returns the
    totals written to stats.json. Raises planning.OutputDirError when ``output_dir`` cannot be used, and
    engines.EngineUnavailable when the engine asked for is not installed.

    ``inflate_thread``: inflate each part in a thread of its own, overlapping the parsing (None: when
    ``processes`` leaves cores idle; never on a cluster engine). The output is the same either way. ``hook``:
    called at the converter's points ``sd_ds.faults.POINTS`` lists, in the main process and (a copy) in each worker.
    ``engine``: where the tasks run (default: ``processes`` local worker processes); never changes the
    output."""
    engine = engine or EngineSettings("local", processes)
    store = open_store(output_dir)
    plan = plan_record(sources, options)
    lock = open_output(store, plan)
    try:
        complete = f"{WORK_DIR}/{COMPLETE_FILE}"
        if store.exists(complete):
            store.remove_tree(PARTS_DIR)
            stats = store.read_json("stats.json")
            log(f"{store}: already complete")
            return stats
        _remove_stale_temporaries(store)
        started = time.monotonic()
        if inflate_thread is None:
            inflate_thread = engine.engine == "local" and engine.processes < available_cores()
        conversion = ConversionRun(sources, store, options, engine, "threaded" if inflate_thread else "buffered",
                                   hook)
        total_bytes = sum(size for source in plan["sources"] for _, size in source["parts"])
        bar = Progress(total_bytes, conversion.done_bytes, enabled=progress)
        try:
            frontier = conversion.run(bar)
        finally:
            bar.close()
        stats = _write_totals(sources, store, frontier)
        # every task is over: temporaries left by tasks that died (and were retried) go now
        _remove_stale_temporaries(store)
        store.write_json(complete, {"seconds_last_run": round(time.monotonic() - started, 3)})
        store.remove_tree(PARTS_DIR)
        return stats
    finally:
        if lock is not None:
            lock.close()


def _remove_stale_temporaries(store: Store) -> None:
    """Temporaries of a killed run (its workers are dead: they die with the main process) or of tasks that
    died and were retried."""
    for folder in ("", PARTS_DIR):
        store.remove_temporaries(folder)


class Progress:
    """The progress bar: compressed bytes read (resumed runs start at what earlier runs read), and the samples
    written this run with their rate."""

    def __init__(self, total_bytes: int, done_bytes: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, initial=min(done_bytes, total_bytes), unit="B", unit_scale=True,
                        desc="convert", dynamic_ncols=True, disable=not enabled, smoothing=0.05, mininterval=0.5)
        self.started = time.monotonic()
        self.samples = 0

    def advance(self, nbytes: int, samples: int) -> None:
        self.samples += samples
        self.bar.update(nbytes)
        rate = self.samples / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.samples:,} samples, {rate:,.0f} samples/s", refresh=False)

    def drain(self, reports: Any, wait_s: float = 0.0) -> None:
        """Take every (bytes, samples) report waiting in the workers' queue; with ``wait_s``, also those that
        arrive within that long of each other (the last ones of workers that just finished)."""
        try:
            while True:
                self.advance(*(reports.get(timeout=wait_s) if wait_s else reports.get_nowait()))
        except queue.Empty:
            pass

    def close(self) -> None:
        self.bar.close()


class ConversionRun:
    """The run loop over a process pool, and the state it keeps between events."""

    def __init__(self, sources: list[PartSource], store: Store, options: ConvertOptions, engine: EngineSettings,
                 reader: str, hook: Hook = no_hook):
        self.sources, self.store, self.engine_settings, self.hook = sources, store, engine, hook
        self.processes = engine.processes  # replaced by the engine's parallelism once it is up
        self.existing = set(store.list())  # shards earlier runs finished (one listing, not a request per shard)
        self.frontier = Frontier(sources, options.samples_per_shard, options.limit)
        self.part_paths = self.frontier.part_paths
        self.part_template = PartJob(part=-1, path="", out=store.root, options=options, reader=reader)
        self.sample_counts: dict[int, int] = {}  # part → good samples, for every part converted so far
        self.done_bytes = 0  # input bytes of the parts earlier runs converted
        for record_name in store.list(PARTS_DIR):
            if not record_name.endswith(".json") or record_name.startswith("."):
                continue
            record = store.read_json(f"{PARTS_DIR}/{record_name}")
            if record["part"] < len(self.part_paths) and record["path"] == self.part_paths[record["part"]]:
                self.sample_counts[record["part"]] = record["samples"]
                self.done_bytes += record["bytes"]
        self.pending: dict[Future, tuple[str, int]] = {}  # future → ("part", part) or ("shard", shard)
        self.parts_in_flight: set[int] = set()
        self.shard_first_part: dict[int, int] = {}  # shard in flight → first part holding its samples
        self.deleted_below = 0  # fragments of the parts before this are deleted
        self.next_dispatch = 0  # the next part to consider handing out
        self.lookahead = 4 * self.processes + 2  # parts converted ahead of the oldest part not yet consumed
        self.executor: Any = None  # the engine (engines.LocalEngine, SparkEngine, RayEngine)

    def run(self, progress: Progress) -> Frontier:
        """Convert every part not converted yet and assemble every shard not assembled yet; returns the
        frontier, which knows each source's shards and samples."""
        # Workers even for --processes 1: the main process stays free to show progress mid-part.
        self.executor = build_engine(self.engine_settings, self.hook)
        self.processes = self.executor.parallelism
        self.lookahead = 4 * self.processes + 2
        reports = self.executor.progress_queue
        try:
            self._consume_ready()
            while True:
                self._dispatch_parts()
                if not self.pending:
                    break
                finished, _ = wait(list(self.pending), timeout=0.2, return_when=FIRST_COMPLETED)
                if reports is not None:
                    progress.drain(reports)
                for future in finished:
                    self._finish(future, progress)
                self._delete_consumed_fragments()
            if not self.frontier.done:  # cannot happen: every part was converted and consumed
                raise RuntimeError("conversion ended before all parts were consumed")
        finally:
            self.executor.shutdown()
            if reports is not None:
                progress.drain(reports, wait_s=0.05)  # reports still on their way from the workers
        return self.frontier

    def _dispatch_parts(self) -> None:
        """Hand out parts in input order, at most one more than there are processes at a time, and no further
        than ``lookahead`` past the oldest part not yet consumed."""
        frontier = self.frontier
        while (not frontier.done and len(self.parts_in_flight) < max(self.processes, 1) + 1
               and self.next_dispatch < len(self.part_paths)
               and self.next_dispatch < frontier.next_part + self.lookahead):
            part = self.next_dispatch
            if part not in self.sample_counts and part not in self.parts_in_flight:
                self.parts_in_flight.add(part)
                job = replace(self.part_template, part=part, path=self.part_paths[part])
                self.pending[self.executor.submit(convert_part, job)] = ("part", part)
            self.next_dispatch += 1

    def _finish(self, future: Future, progress: Progress) -> None:
        kind, ident = self.pending.pop(future)
        result = future.result()  # a worker exception is a bug or an I/O error: stop the run
        if kind == "part":
            self.parts_in_flight.discard(ident)
            self.sample_counts[ident] = result["samples"]
            progress.advance(*result["unreported"])
            self._consume_ready()
        else:
            self.shard_first_part.pop(ident, None)
            self.hook("main_shard")

    def _consume_ready(self) -> None:
        """Feed the frontier every count it can take (it takes them in input order) and submit the shards
        that became ready."""
        while self.frontier.next_part in self.sample_counts and not self.frontier.done:
            self._submit_shards(self.frontier.consume(self.sample_counts[self.frontier.next_part]))

    def _submit_shards(self, jobs: list[ShardJob]) -> None:
        for job in jobs:
            first_sample_part = next((span.part for span in job.parts if span.end_sample > job.first_sample),
                                     self.frontier.next_part)
            if shard_name(job.shard) in self.existing:
                continue
            self.shard_first_part[job.shard] = first_sample_part
            source_name = self.sources[job.source_index].name
            future = self.executor.submit(assemble_shard_job, job, source_name, self.store.root, self.part_template)
            self.pending[future] = ("shard", job.shard)

    def _delete_consumed_fragments(self) -> None:
        """Delete the fragments of parts that neither the frontier nor a shard in flight still needs (their
        records stay: a shard's failures and the totals are read from them)."""
        low = min([self.frontier.first_needed_part(), *self.shard_first_part.values()])
        for part in range(self.deleted_below, low):
            paths = fragment_paths(part)
            self.store.delete(paths.members)
            self.store.delete(paths.offsets)
        self.deleted_below = max(self.deleted_below, low)


# --- totals ----------------------------------------------------------------------------------------------

def _write_totals(sources: list[PartSource], store: Store, frontier: Frontier) -> dict:
    """sizes.json, sources.json and stats.json from the shards' stats (and, for a source without shards, from
    its part records); returns the stats. Listed parts that do not exist, and parts listed more than once, are
    counted per source and in total (``missing_parts``, ``duplicate_parts``); they hold no lines, so ``count``
    (every line read) does not include them."""
    sizes: dict[str, int] = {}
    totals: Counter = Counter()
    per_source = []
    successes = empty_captions = 0
    for source_index, (source, result) in enumerate(zip(sources, frontier.results)):
        failures: Counter = Counter()
        for shard in result.shards:
            shard_stats = store.read_json(stats_name(shard))
            sizes[shard_name(shard)] = shard_stats["successes"]
            failures.update(shard_stats["failures"])
            empty_captions += shard_stats["empty_captions"]
        if not result.shards and not result.excluded:
            # No sample to attribute failures to: count them from the part records.
            first = frontier.source_end[source_index] - len(source.parts)
            for part in range(first, first + len(source.parts)):
                record = store.read_json(fragment_paths(part).record)
                failures.update(reason for _, reason, _ in record["failures"])
        totals.update(failures)
        successes += result.samples
        per_source.append({"name": source.name, "weight": source.weight, "parts": len(source.parts),
                           "missing_parts": len(source.missing_parts), "duplicate_parts": len(source.duplicate_parts),
                           "shards": len(result.shards), "samples": result.samples,
                           "failures": dict(sorted(failures.items())), "excluded_by_limit": result.excluded})
    stats = {"count": successes + sum(totals.values()), "successes": successes,
             "failures": dict(sorted(totals.items())), "empty_captions": empty_captions, "shards": len(sizes),
             "parts": sum(len(source.parts) for source in sources),
             "missing_parts": sum(len(source.missing_parts) for source in sources),
             "duplicate_parts": sum(len(source.duplicate_parts) for source in sources), "sources": per_source}
    sources_json = {"sources": [
        {"name": source.name, "weight": source.weight, "shards": [shard_name(shard) for shard in result.shards],
         "samples": result.samples}
        for source, result in zip(sources, frontier.results)]}
    store.write_json("sizes.json", sizes)
    store.write_json("sources.json", sources_json)
    store.write_json("stats.json", stats)
    return stats


def format_summary(stats: dict) -> str:
    """The end-of-run table: converted samples and each failure reason, with shares of all lines; then the
    shards, and the listed parts that were missing or repeated."""
    total = max(stats["count"], 1)
    rows = [("converted", stats["successes"])]
    rows += [(f"skipped: {reason}", count) for reason, count in stats["failures"].items()]
    rows.append(("(kept, empty caption)", stats["empty_captions"]))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{'outcome':<{width}}{'samples':>14}{'share':>9}"]
    lines += [f"{label:<{width}}{count:>14,}{100 * count / total:>8.2f}%" for label, count in rows]
    lines.append(f"{stats['shards']:,} shards from {stats['parts']:,} parts in {len(stats['sources'])} source(s)")
    if stats.get("missing_parts"):  # .get: stats.json of a run before these were counted
        lines.append(f"{stats['missing_parts']:,} listed part(s) do not exist: skipped (stats.json: missing_parts)")
    if stats.get("duplicate_parts"):
        lines.append(f"{stats['duplicate_parts']:,} part(s) listed more than once: converted once "
                     f"(stats.json: duplicate_parts)")
    return "\n".join(lines)

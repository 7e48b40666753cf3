"""chDB memory under sustained loading, and the rest of the core process.

    python -m benchmarks.chdb_memory [--rate 50000] [--seconds 600] [--parts store,core]

Two parts, each variant a child process (chDB holds one data directory per
process), each sampling every ``--sample-seconds``:

* ``store``: chDB alone. A fresh store opened by strata's own ``Store.open``
  (raw ``events`` + the default metrics' 5m/1d rollup views) gets one insert
  with a deduplication token every ``--interval-ms`` (``rate * interval``
  generated events, fresh event_ids, timestamps around now), plus one rollup
  query per second. Samples: RSS (anon / file), chDB's own accounting
  (``system.metrics`` MemoryTracking and caches, ``system.parts``,
  ``system.merges``, ``system.jemalloc_stats``).
* ``core``: the whole core process of `strata serve` (``Pipeline.open``:
  loaders, stream processor, archiver) in this process, fed at ``--rate``
  straight into the embedded log (no HTTP: the ingest workers are other
  processes). Samples: RSS, glibc's arenas (``mallinfo2``: in use / free),
  chDB's jemalloc, Arrow's pool, the archiver's buffers, the log's batch
  index, the processor's groups, the loaders' lag.

Variants: ``default`` = ClickHouse's and glibc's defaults (the store and the
processes before decision 095); ``bounded`` = strata's shipped settings
(``store.chdb_*``, ``server.malloc_*``; docs/configuration.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import write_section

# Each part writes its own section of docs/benchmarks.md.
SECTIONS = {
    "store": "chDB memory under sustained loading",
    "core": "Core process memory under sustained loading",
}
STORE_NOTE = (
    "chDB's own memory is flat at this rate in both variants: its caches are still tiny at "
    "this age of the data (mark cache < 30 KiB, primary index < 250 KiB), so "
    "`store.chdb_cache_bytes` bounds what months of data would bring, not what is seen here; "
    "about 250 MiB of the RSS is the mapped chDB library (RssFile)."
)
CORE_NOTE = (
    'What `default` adds is free memory kept in glibc\'s arenas (column "free"). "glibc in '
    "use\" rises in both variants during the first minutes while the retry dedup indexes' hot "
    "windows fill (decision 094: up to ~140 MiB per consumer at 50k events/s, three consumers "
    "here) and with the loader's backlog (the loader lagged on the shared box: a lagging "
    "loader reads and inserts `loader.max_batch_events` at once)."
)
CLICKHOUSE_DEFAULT_CACHE = 5 * 2**30
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {
        "store": {"chdb_cache_bytes": CLICKHOUSE_DEFAULT_CACHE},
        "server": {"malloc_mmap_threshold": 0, "malloc_arena_max": 0, "malloc_trim_interval": "0s"},
    },
    "bounded": {},
}

CHDB_METRICS = (
    "MemoryTracking",
    "MarkCacheBytes",
    "PrimaryIndexCacheBytes",
    "UncompressedCacheBytes",
    "QueryCacheBytes",
    "MergesMutationsMemoryTracking",
    "Merge",
    "PageCacheBytes",
    "CompiledExpressionCacheBytes",
    "QueryConditionCacheBytes",
)


def rss() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def jemalloc(store: Any) -> dict[str, int]:
    text = store.scalar("SELECT stats FROM system.jemalloc_stats") or ""
    match = re.search(
        r"Allocated: (\d+), active: (\d+), metadata: (\d+).*?resident: (\d+), "
        r"mapped: (\d+), retained: (\d+)",
        text,
    )
    if not match:
        return {}
    keys = ("allocated", "active", "metadata", "resident", "mapped", "retained")
    return {f"je_{k}": int(v) for k, v in zip(keys, match.groups(), strict=True)}


def sample(store: Any, started: float, inserted: int) -> dict[str, Any]:
    row: dict[str, Any] = {"t": round(time.monotonic() - started, 1), "inserted": inserted}
    row.update(rss())
    _, metrics = store.query_rows(
        "SELECT metric, value FROM system.metrics WHERE metric IN {names:Array(String)}",
        {"names": list(CHDB_METRICS)},
    )
    row.update({name: int(value) for name, value in metrics})
    _, parts = store.query_rows(
        "SELECT count(), sum(bytes_on_disk), sum(primary_key_bytes_in_memory_allocated), "
        "countIf(table = 'events') FROM system.parts WHERE active"
    )
    row["parts"], row["parts_bytes"], row["pk_bytes"], row["events_parts"] = map(int, parts[0])
    _, merges = store.query_rows("SELECT count(), sum(memory_usage) FROM system.merges")
    row["merges"], row["merges_memory"] = int(merges[0][0]), int(merges[0][1] or 0)
    row.update(jemalloc(store))
    return row


def event_pool(size: int) -> Any:
    """``size`` generated events, decoded to the events table's Arrow schema."""
    import msgspec
    import numpy as np

    from strata.events import Normalizer
    from strata.generate import TrafficModel
    from strata.loader.sinks import EVENTS_SINK

    model = TrafficModel(seed=5)
    normalizer = Normalizer(
        partitions=8, max_future_skew_ms=600_000, max_event_age_ms=90 * 86_400_000
    )
    now = int(time.time() * 1000)
    raw = [msgspec.json.encode(e) for e in model.batch(size, now)]
    accepted, _ = normalizer.normalize(raw, sent_at_ms=None, received_at_ms=now)
    values = [value for _, value, _ in accepted]
    table = EVENTS_SINK.decode(values)
    return EVENTS_SINK.finish(table, np.zeros(len(values)), np.zeros(len(values)))


def child(
    rate: float, seconds: float, interval_ms: int, sample_seconds: float, overrides: dict[str, Any]
) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa

    from strata import allocator
    from strata.config import load_config
    from strata.loader.sinks import TIMESTAMP
    from strata.store import Store

    per_insert = max(1, int(rate * interval_ms / 1000))
    pool = event_pool(max(per_insert * 4, 50_000))
    with tempfile.TemporaryDirectory(prefix="strata-bench-chdb-memory-") as tmp:
        config = load_config(overrides={"data_dir": tmp, **overrides}, environ={})
        trimmer = allocator.setup(config)
        store = Store.open(config)
        samples = [sample(store, time.monotonic(), 0)]
        started = time.monotonic()
        next_sample = started + sample_seconds
        next_query = started + 1.0
        inserted = 0
        cycle = 0
        columns = pool.schema.names
        while time.monotonic() - started < seconds:
            due = started + cycle * interval_ms / 1000
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            start = (cycle * per_insert) % (len(pool) - per_insert)
            batch = pool.slice(start, per_insert)
            now_ms = int(time.time() * 1000)
            ids = pa.array([f"m{inserted + i}" for i in range(per_insert)])
            ts = pa.array(now_ms - np.random.randint(0, 20_000, per_insert), TIMESTAMP)
            offsets = pa.array(np.arange(inserted, inserted + per_insert, dtype=np.uint64))
            batch = batch.set_column(columns.index("event_id"), "event_id", ids)
            batch = batch.set_column(columns.index("ts"), "ts", ts)
            batch = batch.set_column(
                columns.index("received_at"),
                "received_at",
                pa.array(np.full(per_insert, now_ms), TIMESTAMP),
            )
            batch = batch.set_column(columns.index("_offset"), "_offset", offsets)
            store.insert_arrow(
                "events",
                batch.combine_chunks(),
                dedup_token=f"0-{inserted}-{inserted + per_insert - 1}",
            )
            inserted += per_insert
            cycle += 1
            now = time.monotonic()
            if now >= next_query:
                store.query_rows(
                    "SELECT window_start, country, countMerge(views), uniqCombinedMerge(users) FROM "
                    "rollup_page_views_by_country_5m WHERE window_start >= now() - 3600 "
                    "GROUP BY window_start, country"
                )
                next_query = now + 1.0
            if now >= next_sample:
                samples.append(sample(store, started, inserted))
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
                next_sample = now + sample_seconds
        elapsed = time.monotonic() - started
        samples.append(sample(store, started, inserted))
        store.close()
        trimmer.set()
    return {"samples": samples, "rate": inserted / elapsed, "per_insert": per_insert}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def glibc_heap() -> dict[str, int]:
    """glibc malloc: bytes in use (heap chunks + own mappings), free bytes
    kept in the arenas, arena bytes (glibc >= 2.33; {} elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {
        "glibc_in_use": info.uordblks + info.hblkhd,
        "glibc_free": info.fordblks,
        "glibc_arenas": info.arena,
    }


def value_templates(size: int) -> list[tuple[int, bytes, bytes, bytes, bytes, bytes]]:
    """``size`` normalized events as log values cut around event_id, ts and
    received_at (fixed width), so the feeder only joins bytes."""
    import msgspec

    from strata.events import Normalizer
    from strata.generate import TrafficModel

    model = TrafficModel(seed=5)
    normalizer = Normalizer(
        partitions=8, max_future_skew_ms=600_000, max_event_age_ms=90 * 86_400_000
    )
    now = int(time.time() * 1000)
    raw = [msgspec.json.encode(e) for e in model.batch(size, now)]
    accepted, _ = normalizer.normalize(raw, sent_at_ms=None, received_at_ms=now)
    out = []
    for partition, value, _ in accepted:
        id_at = value.index(b'"event_id":"') + 12
        ts_at = value.index(b'"ts":') + 5
        received_at = value.index(b'"received_at":') + 14
        out.append(
            (
                partition,
                value[:id_at],
                value[id_at + 32 : ts_at],
                value[ts_at + 13 : received_at],
                value[received_at + 13 :],
                b"",
            )
        )
    return out


def core_child(
    rate: float, seconds: float, sample_seconds: float, overrides: dict[str, Any]
) -> dict[str, Any]:
    import threading

    import pyarrow as pa

    from strata import allocator
    from strata.config import load_config
    from strata.server.pipeline import Pipeline

    templates = value_templates(100_000)
    with tempfile.TemporaryDirectory(prefix="strata-bench-core-memory-") as tmp:
        config = load_config(
            overrides={"data_dir": tmp, "log": {"fsync": "never"}, **overrides}, environ={}
        )
        trimmer = allocator.setup(config)
        pipeline = Pipeline.open(config)
        pipeline.start()
        stop = threading.Event()
        produced = [0]
        ticks_per_second = 20
        per_tick = max(1, int(rate / ticks_per_second))

        def feed() -> None:
            producer = pipeline.log.producer()
            started, tick = time.monotonic(), 0
            while not stop.is_set():
                delay = started + tick / ticks_per_second - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                now = int(time.time() * 1000)
                received = str(now).encode()
                base = produced[0]
                for k in range(per_tick):
                    partition, a, b, c, d, _ = templates[(base + k) % len(templates)]
                    value = b"".join(
                        (a, b"%032x" % (base + k), b, str(now - k % 5000).encode(), c, received, d)
                    )
                    producer.produce("events", partition, None, value)
                producer.flush()
                produced[0] = base + per_tick
                tick += 1

        feeder = threading.Thread(target=feed, name="feeder", daemon=True)
        feeder.start()
        started = time.monotonic()
        samples = []
        while time.monotonic() - started < seconds:
            time.sleep(sample_seconds)
            row: dict[str, Any] = {
                "t": round(time.monotonic() - started, 1),
                "produced": produced[0],
            }
            row.update(rss())
            row.update(glibc_heap())
            row["MemoryTracking"] = int(
                pipeline.store.scalar(
                    "SELECT value FROM system.metrics WHERE metric = 'MemoryTracking'"
                )
            )
            row.update(jemalloc(pipeline.store))
            row["arrow_allocated"] = pa.total_allocated_bytes()
            archiver = pipeline.components.get("archiver")
            row["archiver_buffered"] = sum(b.nbytes for b in archiver.buffers.values())
            # Batch index entries (24 B each) the core holds; bounded since decision 099.
            index = pipeline.log.index_stats() if hasattr(pipeline.log, "index_stats") else {}
            row["log_index_batches"] = index.get("batches", 0)
            row["log_index_segments"] = index.get("segments", 0)
            row["processor_groups"] = pipeline.components["processor"].engine.groups_held
            row["loader_lag"] = sum(loader.lag() for loader in pipeline.loaders.values())
            samples.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        elapsed = time.monotonic() - started
        stop.set()
        trimmer.set()
        feeder.join()
        pipeline.stop()
    return {"samples": samples, "rate": produced[0] / elapsed}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chdb_memory")
    parser.add_argument("--rate", type=float, default=50_000)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument(
        "--interval-ms",
        type=int,
        default=250,
        help="store part: one insert per interval (the loader's max_wait_ms)",
    )
    parser.add_argument("--sample-seconds", type=float, default=15)
    parser.add_argument("--parts", default="store,core")
    parser.add_argument("--variants", default="default,bounded")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        part, variant = args.child.split(":")
        if part == "store":
            result = child(
                args.rate, args.seconds, args.interval_ms, args.sample_seconds, VARIANTS[variant]
            )
        else:
            result = core_child(args.rate, args.seconds, args.sample_seconds, VARIANTS[variant])
        print(json.dumps(result), flush=True)
        os._exit(0)  # chDB's engine threads can outlive the interpreter's shutdown
    results: dict[str, dict[str, Any]] = {}
    for part in args.parts.split(","):
        for variant in args.variants.split(","):
            before = loadavg()
            print(f"--- {part}: {variant}", flush=True)
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.chdb_memory",
                    "--child",
                    f"{part}:{variant}",
                    "--rate",
                    str(args.rate),
                    "--seconds",
                    str(args.seconds),
                    "--interval-ms",
                    str(args.interval_ms),
                    "--sample-seconds",
                    str(args.sample_seconds),
                ],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["load"] = (before, loadavg())
            results.setdefault(part, {})[variant] = result
    for part, section in SECTIONS.items():
        if part in results:
            body = render(args, {part: results[part]})
            print(body)
            if not args.no_write:
                write_section(section, body)
    return results


def series(samples: list[dict[str, Any]], key: str, count: int = 10) -> str:
    step = max(1, len(samples) // count)
    chosen = samples[::step]
    if chosen[-1] is not samples[-1]:
        chosen.append(samples[-1])
    return ", ".join(f"{s['t']:.0f}s {mib(s[key])}" for s in chosen)


def render(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"`python -m benchmarks.chdb_memory --rate {args.rate:.0f} --seconds {args.seconds:.0f} "
        f"--parts {','.join(results)} --variants {args.variants}`. MiB. `default` = ClickHouse's "
        "cache sizes (5 GiB each) and glibc's malloc defaults; `bounded` = strata's "
        "defaults (`store.chdb_cache_bytes` 256 MiB, `server.malloc_mmap_threshold` 1 MiB, "
        "`server.malloc_arena_max` 2, `server.malloc_trim_interval` 10s). Both store "
        "variants create `events` with `use_primary_key_cache = 1`.",
        "",
    ]
    store = results.get("store", {})
    if store:
        lines += [
            f"**chDB alone** (one process, `Store.open`, one insert with a dedup token every "
            f"{args.interval_ms} ms + one rollup query per second):",
            "",
            "| variant | rate | RSS first / half-way / last (max) | RssAnon last | MemoryTracking "
            "last (max) | jemalloc allocated / resident last | active parts last (max) | data "
            "on disk last | load before / after |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, result in store.items():
            samples = result["samples"]
            half, last = samples[len(samples) // 2], samples[-1]
            lines.append(
                f"| {variant} | {result['rate']:,.0f}/s | {mib(samples[0]['VmRSS'])} / "
                f"{mib(half['VmRSS'])} / {mib(last['VmRSS'])} "
                f"({mib(max(s['VmRSS'] for s in samples))}) | {mib(last['RssAnon'])} | "
                f"{mib(last['MemoryTracking'])} "
                f"({mib(max(s['MemoryTracking'] for s in samples))}) | "
                f"{mib(last.get('je_allocated', 0))} / {mib(last.get('je_resident', 0))} | "
                f"{last['parts']} ({max(s['parts'] for s in samples)}) | "
                f"{mib(last['parts_bytes'])} | {result['load'][0]} / {result['load'][1]} |"
            )
        lines.append("")
        lines += [STORE_NOTE, ""]
        for variant, result in store.items():
            lines.append(f"RSS samples, store {variant}: {series(result['samples'], 'VmRSS')}.")
            lines.append("")
    core = results.get("core", {})
    if core:
        lines += [
            "**The core process** (`Pipeline.open`: loaders, processor, archiver; fed straight "
            "into the embedded log, fsync never, no HTTP):",
            "",
            "| variant | fed | RSS half-way / last (max) | RssAnon last | glibc in use / free "
            "in arenas, last (max free) | chDB jemalloc resident last | Arrow pool last | "
            "archiver buffers last | log index batches last | loader lag last | load before "
            "/ after |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant, result in core.items():
            samples = result["samples"]
            half, last = samples[len(samples) // 2], samples[-1]
            lines.append(
                f"| {variant} | {result['rate']:,.0f}/s | {mib(half['VmRSS'])} / "
                f"{mib(last['VmRSS'])} ({mib(max(s['VmRSS'] for s in samples))}) | "
                f"{mib(last['RssAnon'])} | {mib(last.get('glibc_in_use', 0))} / "
                f"{mib(last.get('glibc_free', 0))} "
                f"({mib(max(s.get('glibc_free', 0) for s in samples))}) | "
                f"{mib(last.get('je_resident', 0))} | {mib(last['arrow_allocated'])} | "
                f"{mib(last['archiver_buffered'])} | {last['log_index_batches']:,} | "
                f"{last['loader_lag']:,} | {result['load'][0]} / {result['load'][1]} |"
            )
        lines += ["", CORE_NOTE]
        for variant, result in core.items():
            lines.append(f"RSS samples, core {variant}: {series(result['samples'], 'VmRSS')}.")
            lines.append("")
            lines.append(
                f"glibc free in arenas, core {variant}: {series(result['samples'], 'glibc_free')}."
            )
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

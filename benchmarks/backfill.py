"""Backfill throughput: events/s that `strata batch --backfill METRIC` computes
from the Parquet lake into the rollups (read the lake, stage in chDB, build
5m and 1d states, replace the day partitions, write the reconciliation),
against a plain pyarrow scan of the same columns in the same run.

    python -m benchmarks.backfill [--events 20000000] [--days 30] [--runs 1]

The lake is generated directly (vectorized, Hive layout, zstd Parquet) in a
temporary data directory; no log or loader is involved, so the batch takes
the lake whole (strata.lake.batch: no cut without consumer checkpoints).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.common import fmt, write_section
from strata.config import load_config
from strata.lake.base import LAKE_SCHEMA, Lake, file_relpath
from strata.lake.batch import BatchJob, metric_columns
from strata.store import Store

TYPES = ["page_view", "click", "purchase", "signup", "search", "add_to_cart"]
COUNTRIES = ["DE", "FR", "US", "BR", "JP", "IN", "GB", "ES", "IT", "NL"]
DAY_MS = 86_400_000


def generate(lake: Lake, events: int, days: int, seed: int = 1) -> list[str]:
    """Write ``events`` events spread evenly over ``days`` days ending two days ago."""
    rng = np.random.default_rng(seed)
    last = datetime.now(UTC).date() - timedelta(days=2)
    first = last - timedelta(days=days - 1)
    per_day = events // days
    written = []
    offset = 0
    for index in range(days):
        day = first + timedelta(days=index)
        start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
        n = per_day + (events - per_day * days if index == days - 1 else 0)
        ts = np.sort(rng.integers(start, start + DAY_MS, n))
        users = rng.zipf(1.3, n) % 200_000
        type_index = rng.choice(len(TYPES), n, p=[0.5, 0.2, 0.05, 0.05, 0.1, 0.1])
        user_ids = pc.binary_join_element_wise("u", pc.cast(pa.array(users), pa.string()), "")
        ids = pc.binary_join_element_wise(
            "e", pc.cast(pa.array(np.arange(offset, offset + n)), pa.string()), ""
        )
        is_purchase = type_index == 2
        table = pa.table(
            {
                "event_id": ids,
                "event_type": pa.array(np.array(TYPES)[type_index]),
                "user_id": user_ids,
                "anonymous_id": pa.array([""] * 1, pa.string()).take(np.zeros(n, dtype=np.int64)),
                "distinct_id": user_ids,
                "session_id": pc.binary_join_element_wise(
                    "s", pc.cast(pa.array(users * 7 + index), pa.string()), ""
                ),
                "ts": pa.array(ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
                "received_at": pa.array(ts + 1000, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
                "country": pa.array(np.array(COUNTRIES)[rng.integers(0, len(COUNTRIES), n)]),
                "platform": pa.array(np.array(["web", "ios", "android"])[rng.integers(0, 3, n)]),
                "os": pa.array(np.array(["linux", "macos", "windows"])[rng.integers(0, 3, n)]),
                "app_version": pa.array(np.array(["1.0", "1.1", "2.0"])[rng.integers(0, 3, n)]),
                "path": pc.binary_join_element_wise(
                    "/p/", pc.cast(pa.array(rng.integers(0, 500, n)), pa.string()), ""
                ),
                "referrer": pa.array(np.array(["", "google", "news"])[rng.integers(0, 3, n)]),
                "revenue": pa.array(np.where(is_purchase, rng.uniform(1, 200, n).round(2), 0.0)),
                "currency": pa.array(np.where(is_purchase, "EUR", "")),
                "properties": pa.array(["{}"] * 1, pa.string()).take(np.zeros(n, dtype=np.int64)),
                "_partition": pa.array((users % 8).astype(np.uint16)),
                "_offset": pa.array(np.arange(offset, offset + n, dtype=np.uint64)),
            }
        ).cast(LAKE_SCHEMA)
        for position, event_type in enumerate(TYPES):
            part = table.filter(pa.array(type_index == position))
            relpath = file_relpath(day, event_type, 0, offset, offset + n - 1)
            lake.write(relpath, part)
            written.append(relpath)
        offset += n
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backfill")
    parser.add_argument("--events", type=int, default=20_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--metric", default="events_by_type")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="strata-backfill-"))
    try:
        config = load_config(overrides={"data_dir": str(directory)}, environ={})
        lake = Lake.open(config)
        started = time.perf_counter()
        files = generate(lake, args.events, args.days)
        generate_s = time.perf_counter() - started
        lake_bytes = sum(f.size for f in lake.files())
        print(f"lake: {args.events:,} events, {len(files)} files, {lake_bytes / 2**20:,.0f} MiB "
              f"in {generate_s:.0f}s")

        store = Store.open(config)
        job = BatchJob(config, store, lake)
        metric = job.metric(args.metric)
        columns = sorted(metric_columns(metric) | {"ts", "received_at", "user_id", "distinct_id",
                                                    "event_id", "_partition", "_offset"})
        scan_rates, backfill_rates = [], []
        for run in range(args.runs):
            started = time.perf_counter()
            scanned = sum(b.num_rows for b in lake.dataset(lake.files()).to_batches(columns=columns))
            scan_rates.append(scanned / (time.perf_counter() - started))
            started = time.perf_counter()
            rows = job.backfill(args.metric, progress=True)
            elapsed = time.perf_counter() - started
            events = sum(r.batch_events for r in rows if r.aggregation == metric.aggregations[0].alias)
            assert events == args.events, (events, args.events)
            backfill_rates.append(events / elapsed)
            print(f"run {run + 1}: backfill {events / elapsed:,.0f} events/s ({elapsed:.1f}s), "
                  f"pyarrow scan {scan_rates[-1]:,.0f} rows/s")
        store.close()
        body = f"""
`python -m benchmarks.backfill --events {args.events} --days {args.days} --runs {args.runs}`
(metric `{args.metric}`: {len(metric.aggregations)} aggregations, dimensions
{list(metric.dimensions)}; lake: {len(files)} zstd Parquet files, {lake_bytes / 2**20:,.0f} MiB,
local filesystem).

| what | events/s |
|---|---|
| `strata batch --backfill {args.metric}` (lake -> chDB staging -> 5m + 1d states -> partition replace, per day) | {fmt(backfill_rates)} |
| baseline: pyarrow scan of the same columns, no aggregation | {fmt(scan_rates)} |

Backfill is one day at a time: read the day's columns (pyarrow), insert them
into the staging table, aggregate both granularities with the rollups' own
state expressions, compare with the live rollups, replace the two day
partitions. Most of the time goes to the chDB insert and aggregation; the
Parquet scan is a small share (see the baseline).
"""
        if not args.no_write:
            write_section("Backfill from the lake", body)
        print(body)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""Why is DAU over a year on the 1-day rollup not faster than raw? Measures the
same merge query on `rollup_active_users_1d` as partitioned (one partition per
day, decision 030), after OPTIMIZE FINAL, and on copies partitioned by month
and unpartitioned, in one process on one data set.

    python -m benchmarks.rollup_parts [--events 1000000] [--days 365] [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import fmt, write_section

DAY_MS = 86_400_000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollup_parts")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)

    from benchmarks.query import generate_chunk
    from strata.config import load_config
    from strata.store import Store

    data_dir = Path(tempfile.mkdtemp(prefix="strata-bench-parts-"))
    try:
        config = load_config(overrides={"data_dir": str(data_dir),
                                        "store.raw_ttl": f"{args.days + 30}d",
                                        "store.rollup_5m_ttl": f"{args.days + 30}d"}, environ={})
        store = Store.open(config)
        users = max(1000, args.events // 100)
        now = int(time.time() * 1000)
        end_day = now - now % DAY_MS
        start_ms = end_day - args.days * DAY_MS
        rng = np.random.default_rng(42)
        slice_days = max(1, min(30, int(2_000_000 * args.days / max(1, args.events))))
        loaded = 0
        for first_day in range(0, args.days, slice_days):
            span = min(slice_days, args.days - first_day)
            n = args.events * (first_day + span) // args.days - loaded
            if n > 0:
                store.insert_arrow("events", generate_chunk(rng, loaded, n, start_ms + first_day * DAY_MS,
                                                            span, users), f"parts-{loaded}")
                loaded += n
        table = "rollup_active_users_1d"
        params = {"a": start_ms // 1000, "b": end_day // 1000}

        def dau(name: str) -> str:
            return (f"SELECT toDate(window_start) AS day, uniqCombinedMerge(users) AS u FROM {name} "
                    "WHERE window_start >= toDateTime({a:UInt32}) AND window_start < toDateTime({b:UInt32}) "
                    "GROUP BY day ORDER BY day")

        def parts(name: str) -> int:
            return int(store.scalar("SELECT count() FROM system.parts WHERE database = currentDatabase() "
                                    "AND table = {t:String} AND active", {"t": name}))

        def measure(name: str) -> tuple[list[float], list[float]]:
            store.query_rows(dau(name), params)  # warm
            wall, cpu = [], []
            for _ in range(args.runs):
                w, c = time.perf_counter(), time.process_time()
                store.query_rows(dau(name), params)
                wall.append((time.perf_counter() - w) * 1000)
                cpu.append((time.process_time() - c) * 1000)
            return wall, cpu

        rows = []
        load = [Path("/proc/loadavg").read_text().split()[0]]
        copies = {"day": "toYYYYMMDD(window_start)", "none": "tuple()"}
        for kind, partition in copies.items():
            store.command(f"CREATE TABLE exp_{kind} AS {table} ENGINE = AggregatingMergeTree "
                          f"PARTITION BY {partition} ORDER BY window_start")
            store.command(f"INSERT INTO exp_{kind} SELECT * FROM {table} "
                          "SETTINGS max_partitions_per_insert_block = 10000")
        # The live table as the loader's views wrote it (month partitions since
        # decision 080), then a day-partitioned copy (decision 030) and an
        # unpartitioned one; every table after OPTIMIZE FINAL too.
        rows.append(("month partitions (live table, decision 080), as loaded", parts(table),
                     *measure(table)))
        rows.append(("day partitions (copy, decision 030), as inserted", parts("exp_day"),
                     *measure("exp_day")))
        for label, name in (("month partitions (live table), after OPTIMIZE FINAL", table),
                            ("day partitions (copy), after OPTIMIZE FINAL", "exp_day"),
                            ("one partition (copy), after OPTIMIZE FINAL", "exp_none")):
            store.command(f"OPTIMIZE TABLE {name} FINAL")
            rows.append((label, parts(name), *measure(name)))
        state_bytes = store.scalar(
            "SELECT sum(bytes_on_disk) FROM system.parts WHERE database = currentDatabase() "
            "AND table = {t:String} AND active", {"t": table})
        raw_sql = ("SELECT toDate(ts) AS day, uniq(distinct_id) FROM events WHERE ts >= "
                   "fromUnixTimestamp64Milli({a:Int64}) AND ts < fromUnixTimestamp64Milli({b:Int64}) "
                   "GROUP BY day ORDER BY day")
        raw_params = {"a": start_ms, "b": end_day}
        raw_wall = []
        for _ in range(max(3, args.runs // 3)):
            w = time.perf_counter()
            store.query_rows(raw_sql, raw_params)
            raw_wall.append((time.perf_counter() - w) * 1000)
        load.append(Path("/proc/loadavg").read_text().split()[0])
        lines = [
            f"`python -m benchmarks.rollup_parts --events {args.events} --days {args.days} --runs "
            f"{args.runs}`: {args.events:,} events, {users:,} users over {args.days} days; DAU for the "
            "whole range as `uniqCombinedMerge(users)` grouped by day, straight on chDB (no API), "
            f"ms, median (min–max) of {args.runs} runs; live table "
            f"{int(state_bytes or 0) / 2**10:,.0f} KiB on disk. Load average (1 min) before / "
            f"after: {load[0]} / {load[1]}.",
            "",
            "| rollup_active_users_1d | active parts | wall ms | CPU ms (this process) |",
            "|---|---|---|---|",
        ]
        for label, n, wall, cpu in rows:
            lines.append(f"| {label} | {n} | {fmt(wall, '', 1)} | {fmt(cpu, '', 1)} |")
        lines.append(f"| baseline: raw `uniq(distinct_id)` on `events` | | {fmt(raw_wall, '', 1)} | |")
        body = "\n".join(lines)
        print(body)
        if not args.no_write:
            write_section(f"DAU on the daily rollup: parts and partitions ({args.events:,} events)", body)
        store.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    os._exit(0)  # chDB's engine threads can delay interpreter exit


if __name__ == "__main__":
    main()

"""Daily rollups are partitioned by month (decision 080); the batch job
replaces one day by rebuilding its month in staging. The other days of the
month must come through unchanged, also when the recomputed day is empty."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from strata.config import load_config
from strata.lake import Lake
from strata.lake.batch import BatchJob
from strata.loader.sinks import EVENTS_SINK
from strata.store import Store

DAY_MS = 86_400_000


def events(day: date, count: int, first: int) -> pa.Table:
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    ts = start + np.arange(count, dtype=np.int64) * (DAY_MS // (count + 1))
    text = {
        name: [""] * count
        for name in EVENTS_SINK.schema.names
        if name not in ("ts", "received_at", "revenue")
    }
    text["event_id"] = [f"e{first + i}" for i in range(count)]
    text["event_type"] = ["page_view" if i % 3 else "signup" for i in range(count)]
    text["user_id"] = text["distinct_id"] = [f"u{(first + i) % 17}" for i in range(count)]
    text["country"] = ["DE" if i % 2 else "US" for i in range(count)]
    text["properties"] = ["{}"] * count
    columns = {**text, "ts": ts, "received_at": ts, "revenue": np.zeros(count)}
    table = pa.table({name: columns[name] for name in EVENTS_SINK.schema.names},
                     schema=EVENTS_SINK.schema)
    return EVENTS_SINK.finish(table, np.zeros(count, dtype=np.uint16),
                              np.arange(first, first + count, dtype=np.uint64))


def test_replacing_one_day_keeps_the_rest_of_the_month(tmp_path: Path) -> None:
    config = load_config(overrides={"data_dir": str(tmp_path), "store.raw_ttl": "400d",
                                    "store.rollup_5m_ttl": "400d"}, environ={})
    store = Store.open(config)
    try:
        month = (datetime.now(UTC).date() - timedelta(days=40)).replace(day=1)
        days = [month + timedelta(days=i) for i in range(4)]  # the 4th stays empty
        counts = {days[0]: 40, days[1]: 70, days[2]: 55}
        first = 0
        for day, count in counts.items():
            store.insert_arrow("events", events(day, count, first))
            first += count
        table = "rollup_events_by_type_1d"

        def per_day() -> dict[date, int]:
            _, rows = store.query_rows(
                f"SELECT toDate(window_start), countMerge(events) FROM {table} GROUP BY 1")
            return {d: int(n) for d, n in rows}

        def partitions() -> set[str]:
            _, rows = store.query_rows(
                "SELECT DISTINCT partition_id FROM system.parts WHERE database = currentDatabase() "
                "AND table = {t:String} AND active", {"t": table})
            return {str(p) for (p,) in rows}

        assert per_day() == counts
        assert partitions() == {month.strftime("%Y%m")}
        # Lose day 2 from the rollup only; the raw table still has it.
        store.command(f"ALTER TABLE {table} DELETE WHERE toDate(window_start) = {{d:Date}} "
                      "SETTINGS mutations_sync = 2", {"d": days[1]})
        assert per_day() == {days[0]: 40, days[2]: 55}

        job = BatchJob(config, store, Lake.open(config))
        job.recompute_day(days[1], source="raw")
        assert per_day() == counts
        # An empty day replaces the month with the other days, it does not drop it.
        job.recompute_day(days[3], source="raw")
        assert per_day() == counts
        assert partitions() == {month.strftime("%Y%m")}
        # The 5-minute rollup is still partitioned by day.
        _, rows = store.query_rows(
            "SELECT DISTINCT partition_id FROM system.parts WHERE database = currentDatabase() "
            "AND table = 'rollup_events_by_type_5m' AND active")
        assert {str(p) for (p,) in rows} == {d.strftime("%Y%m%d") for d in counts}
    finally:
        store.close()

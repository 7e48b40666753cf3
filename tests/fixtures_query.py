"""Shared helpers for the query-layer tests: synthetic events bulk-loaded
into a real chDB store, the way the loader would store them."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from strata.loader.sinks import EVENTS_SINK

DAY_MS = 86_400_000
EVENT_TYPES = ["page_view", "signup", "add_to_cart", "checkout", "purchase"]
COUNTRIES = ["US", "DE", "FR", "BR", "IN"]
PLATFORMS = ["web", "ios", "android"]


def base_day_ms(days_ago: int = 10) -> int:
    """Midnight UTC ``days_ago`` days before today: inside every TTL."""
    now = int(time.time() * 1000)
    return now - now % DAY_MS - days_ago * DAY_MS


def make_rows(
    n: int, *, start_ms: int, span_ms: int, users: int = 60, seed: int = 1, id_prefix: str = "e"
) -> list[dict[str, Any]]:
    """``n`` events with whole-number revenue (sums are exact in any order)."""
    rng = np.random.default_rng(seed)
    ts = start_ms + rng.integers(0, span_ms, n)
    event_type = rng.choice(EVENT_TYPES, n, p=[0.5, 0.15, 0.15, 0.1, 0.1])
    user = rng.integers(0, users, n)
    country = rng.choice(COUNTRIES, n)
    platform = rng.choice(PLATFORMS, n)
    paths = rng.choice(["/", "/pricing", "/docs", "/blog"], n)
    rows = []
    for i in range(n):
        revenue = float(rng.integers(1, 100)) if event_type[i] == "purchase" else 0.0
        uid = f"u{user[i]}"
        rows.append(
            {
                "event_id": f"{id_prefix}{seed}-{i}",
                "event_type": str(event_type[i]),
                "user_id": uid,
                "anonymous_id": "",
                "distinct_id": uid,
                "session_id": f"s{user[i]}",
                "ts": int(ts[i]),
                "received_at": int(ts[i]),
                "country": str(country[i]),
                "platform": str(platform[i]),
                "os": "linux",
                "app_version": "1.0",
                "path": str(paths[i]),
                "referrer": "",
                "revenue": revenue,
                "currency": "USD" if revenue else "",
                "properties": "{}",
            }
        )
    return rows


def to_arrow(rows: list[dict[str, Any]], first_offset: int = 0) -> pa.Table:
    """Rows -> the loader's Arrow table for ``events`` (EVENTS_SINK schema)."""
    table = pa.table(
        {f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in EVENTS_SINK.schema}
    )
    n = len(rows)
    return EVENTS_SINK.finish(
        table, np.zeros(n, dtype=np.uint16), np.arange(first_offset, first_offset + n)
    )


def load(store: Any, rows: list[dict[str, Any]], token: str) -> None:
    store.insert_arrow("events", to_arrow(rows), token)


class CountingStore:
    """Wraps a real Store and counts the queries that reach it."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.queries = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name.startswith("query") or name in ("scalar", "command"):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.queries += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def finalizer_for(pipeline: Any, watermark: Any) -> Any:
    """A DayFinalizer of ``pipeline`` driven by ``watermark()`` (the test sets
    the processor's input), with the real log end offsets and loader, late
    data to ``pipeline.on_revised`` and no wait between late_events scans."""
    from strata.query.day_answers import DayFinalizer

    return DayFinalizer(
        lambda: pipeline.query.day_answers,
        watermark,
        lambda: pipeline.log.end_offsets("events"),
        lambda: dict(pipeline.loaders["events"].offsets),
        lambda: 0,
        on_late=pipeline.on_revised,
        late_scan_interval_s=0.0,
    )

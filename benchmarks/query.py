"""Query-layer benchmark: metrics API, SQL router, raw SQL, cache hits and
DuckDB on the same data.

    python -m benchmarks.query --events 100000000

Data: N synthetic events over the last 365 days, generated with numpy and
bulk-loaded with ``Store.insert_arrow`` (no HTTP; the materialized views
fill the rollups as they would from the loader). The same rows are
exported once to Parquet for DuckDB.

Measured (p50/p99 over ``--runs`` runs each, after one warm-up):

* the metrics API (in-process ASGI, cache off): DAU per day over one year,
  page views by country per 5 minutes over 24 h, a 5-step funnel over 30 days;
* DAU before any day is finalized (``API: cold``), then with complete days
  read from ``day_answers`` (decision 096), and for the year up to now (a
  watermark 30 s behind now, open ranges not result-cached);
* chDB's per-query floor (``SELECT 1``, a one-row rollup read) and the
  router's own Python time;
* the same questions as SQL through ``POST /v1/sql`` (router, cache off),
  plus events by type per day over the year (a rollup-answerable question
  whose raw form scans every event);
* the same SQL forced onto the raw events;
* cache hits (the same requests with the cache on);
* the equivalent raw queries in DuckDB over the Parquet export.

Results go to the "Query layer" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from benchmarks.common import write_section

DAY_MS = 86_400_000
EVENT_TYPES = ["page_view", "signup", "add_to_cart", "checkout", "purchase", "search"]
EVENT_P = [0.55, 0.05, 0.12, 0.06, 0.04, 0.18]
COUNTRIES = ["US", "DE", "FR", "BR", "IN", "GB", "JP", "CA", "ES", "IT"]
PLATFORMS = ["web", "ios", "android"]
TOKEN = "bench_admin_token"


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dict_strings(indices: np.ndarray, values: list[str]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(
        pa.array(indices.astype(np.int32)), pa.array(values)
    ).cast(pa.string())


def generate_chunk(
    rng: np.random.Generator, first: int, n: int, start_ms: int, days: int, users: int
) -> pa.Table:
    """One chunk of events in the loader's Arrow shape (EVENTS_SINK)."""
    from strata.loader.sinks import EVENTS_SINK

    ts = np.sort(start_ms + rng.integers(0, days * DAY_MS, n))
    # Skewed user activity: a few heavy users, a long tail.
    user = np.minimum((rng.pareto(1.2, n) * users / 20).astype(np.int64), users - 1)
    user_names = pa.array(np.char.add("u", np.arange(users).astype(str)))
    distinct = pa.DictionaryArray.from_arrays(pa.array(user.astype(np.int32)), user_names).cast(
        pa.string()
    )
    event_type = rng.choice(len(EVENT_TYPES), n, p=EVENT_P)
    revenue = np.where(event_type == 4, rng.integers(1, 200, n).astype(np.float64), 0.0)
    empty = pa.array(np.full(n, "", dtype=object), type=pa.string())
    columns = {
        "event_id": pa.array(np.char.add("e", np.arange(first, first + n).astype(str))),
        "event_type": _dict_strings(event_type, EVENT_TYPES),
        "user_id": distinct,
        "anonymous_id": empty,
        "distinct_id": distinct,
        "session_id": empty,
        "ts": pa.array(ts),
        "received_at": pa.array(ts),
        "country": _dict_strings(rng.integers(0, len(COUNTRIES), n), COUNTRIES),
        "platform": _dict_strings(rng.integers(0, len(PLATFORMS), n), PLATFORMS),
        "os": empty,
        "app_version": empty,
        "path": _dict_strings(rng.integers(0, 4, n), ["/", "/pricing", "/docs", "/blog"]),
        "referrer": empty,
        "revenue": pa.array(revenue),
        "currency": _dict_strings((revenue > 0).astype(np.int64), ["", "USD"]),
        "properties": empty,
    }
    table = pa.table({f.name: columns[f.name] for f in EVENTS_SINK.schema})
    return EVENTS_SINK.finish(table, np.zeros(n, np.uint16), np.arange(first, first + n))


def measure(fn: Callable[[], Any], runs: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def measure_with_gc(
    fn: Callable[[], Any], runs: int
) -> tuple[list[float], list[tuple[int, float]]]:
    """``measure(fn, runs)`` plus every garbage collection that ran meanwhile,
    as (generation, ms)."""
    pauses: list[tuple[int, float]] = []
    started_at: list[float] = []

    def on_gc(event: str, info: dict[str, Any]) -> None:
        if event == "start":
            started_at.append(time.perf_counter())
        elif started_at:
            pauses.append((info["generation"], (time.perf_counter() - started_at.pop()) * 1000))

    gc.callbacks.append(on_gc)
    try:
        return measure(fn, runs), pauses
    finally:
        gc.callbacks.remove(on_gc)


def _cell(pair: tuple[float, float]) -> str:
    digits = 3 if pair[1] < 1 else 2 if pair[1] < 10 else 1
    return f"{pair[0]:.{digits}f} / {pair[1]:.{digits}f}"


def p50_p99(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return statistics.median(ordered), p99


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.query")
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=0, help="default: events / 100")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--runs", type=int, default=30, help="runs of the fast queries")
    parser.add_argument("--raw-runs", type=int, default=5, help="runs of raw/DuckDB queries")
    parser.add_argument("--data-dir", help="default: a temporary directory, removed at the end")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)

    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from strata import allocator
    from strata.config import load_config
    from strata.query import sandbox
    from strata.query.api import CoreAPI, core_routes
    from strata.server.pipeline import Pipeline

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="strata-bench-query-"))
    users = args.users or max(1000, args.events // 100)
    base_overrides = {
        "data_dir": str(data_dir),
        "auth.admin_tokens": [TOKEN],
        # Keep a year of raw events and 5-minute rollups for the comparison.
        "store.raw_ttl": f"{args.days + 30}d",
        "store.rollup_5m_ttl": f"{args.days + 30}d",
        "query.rate_limit_per_minute": 10_000_000,
        "query.rate_limit_burst": 10_000_000,
        "query.max_concurrent_heavy": 100,
        "query.cache_ttl": "0s",
        "query.open_range_cache_ttl": "0s",
    }
    config = load_config(overrides=base_overrides)
    pipeline = Pipeline.open(config)
    store = pipeline.store
    now = int(time.time() * 1000)
    end_day = now - now % DAY_MS
    start_ms = end_day - args.days * DAY_MS

    print(f"loading {args.events:,} events over {args.days} days into {data_dir} ...")
    rng = np.random.default_rng(42)
    load_started = time.perf_counter()
    # One insert per slice of days: the raw table and the daily rollups are
    # partitioned by day, and an insert may touch at most 100 partitions.
    slice_days = max(1, min(30, int(2_000_000 * args.days / max(1, args.events))))
    loaded = 0
    for first_day in range(0, args.days, slice_days):
        span = min(slice_days, args.days - first_day)
        target = args.events * (first_day + span) // args.days
        n = target - loaded
        if n <= 0:
            continue
        table = generate_chunk(rng, loaded, n, start_ms + first_day * DAY_MS, span, users)
        store.insert_arrow("events", table, f"bench-{loaded}")
        loaded += n
        print(f"  {loaded:,} events", flush=True)
    load_s = time.perf_counter() - load_started
    store.command("OPTIMIZE TABLE rollup_active_users_1d FINAL")
    # Background merges of the bulk load compete with every query; let them
    # finish (bounded) so the first measurements are not the slowest.
    settle_started = time.perf_counter()
    while time.perf_counter() - settle_started < 300:
        if not int(store.scalar("SELECT count() FROM system.merges") or 0):
            break
        time.sleep(2)
    settle_s = time.perf_counter() - settle_started
    print(f"  background merges settled in {settle_s:.0f} s", flush=True)

    app = Starlette(routes=core_routes(CoreAPI(pipeline)))
    # As `strata serve`'s core does once started (server.gc_freeze, decision 098).
    frozen_objects = allocator.freeze_startup_heap(config, "core")
    client = TestClient(app)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    year = {"from": _iso(start_ms), "to": _iso(end_day)}
    day = {"from": _iso(end_day - DAY_MS), "to": _iso(end_day)}
    month_from = end_day - 30 * DAY_MS
    funnel_body = {
        "steps": [
            {"event_type": t}
            for t in ["page_view", "search", "add_to_cart", "checkout", "purchase"]
        ],
        "window": "1d",
        "from": _iso(month_from),
        "to": _iso(end_day),
    }

    def get(path: str, params: dict[str, str]) -> Callable[[], Any]:
        def run() -> Any:
            response = client.get(path, params=params, headers=headers)
            assert response.status_code == 200, response.text
            return response.json()

        return run

    def funnel() -> Any:
        response = client.post("/v1/metrics/funnel", json=funnel_body, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    dau_sql = (
        f"SELECT toDate(ts) AS day, uniq(distinct_id) AS users FROM events "
        f"WHERE ts >= '{_utc(start_ms)}' AND ts < '{_utc(end_day)}' GROUP BY day ORDER BY day"
    )
    views_sql = (
        f"SELECT toStartOfFiveMinutes(ts) AS t, country, count() AS views FROM events "
        f"WHERE event_type = 'page_view' AND ts >= '{_utc(end_day - DAY_MS)}' "
        f"AND ts < '{_utc(end_day)}' GROUP BY t, country ORDER BY t, country"
    )

    # A rollup-answerable question whose raw form scans the whole year.
    types_sql = (
        f"SELECT toDate(ts) AS day, event_type, count() AS events FROM events "
        f"WHERE ts >= '{_utc(start_ms)}' AND ts < '{_utc(end_day)}' "
        "GROUP BY day, event_type ORDER BY day, event_type"
    )

    def sql(text: str) -> Callable[[], Any]:
        def run() -> Any:
            response = client.post("/v1/sql", json={"sql": text}, headers=headers)
            assert response.status_code == 200, response.text
            return response.json()

        return run

    def raw(text: str) -> Callable[[], Any]:
        route = pipeline.query.router.raw(sandbox.check(text))
        return lambda: store.query_rows(route.sql)

    def routed(text: str) -> Callable[[], Any]:
        route = pipeline.query.router.route(sandbox.check(text))
        return lambda: store.query_rows(route.sql)

    results: dict[str, dict[str, tuple[float, float]]] = {}
    served: dict[str, str] = {}

    def record(row: str, column: str, fn: Callable[[], Any], runs: int) -> None:
        values = measure(fn, runs)
        results.setdefault(row, {})[column] = p50_p99(values)
        print(
            f"  {row:<40} {column:<14} p50 {results[row][column][0]:9.2f} ms  "
            f"p99 {results[row][column][1]:9.2f} ms",
            flush=True,
        )

    print("measuring ...")
    # DAU before any day is finalized: the whole year's states merged.
    cold_dau = get("/v1/metrics/dau", year)()
    served["dau_cold"] = cold_dau["served_from"]
    record("DAU per day, 1 year", "API: cold", get("/v1/metrics/dau", year), args.raw_runs)
    # Finalize the complete days (what the DayFinalizer does once the loader
    # has stored them; here the bulk load bypassed the log).
    answers = pipeline.query.day_answers
    from strata.query.day_answers import day_of

    finalize_started = time.perf_counter()
    answers.finalize(day_of(start_ms), day_of(end_day), answers.next_seq())
    answers.set_frontier(day_of(end_day))
    finalize_s = time.perf_counter() - finalize_started
    record(
        "DAU per day, 1 year",
        "store: day_answers",
        lambda: answers.read("active_users", "users", day_of(start_ms), day_of(end_day)),
        args.runs,
    )
    served["dau"] = get("/v1/metrics/dau", year)()["served_from"]
    served["views"] = get(
        "/v1/metrics/count",
        {**day, "granularity": "5m", "group_by": "country", "event_type": "page_view"},
    )()["served_from"]
    # The in-memory rollup tier (decision 102) holds the finalized days now;
    # its first read of a range, then the SQL API answers say who served.
    tier = pipeline.query.tier
    views_route = pipeline.query.router.route(sandbox.check(views_sql))
    types_route = pipeline.query.router.route(sandbox.check(types_sql))

    def tiered(route: Any) -> Callable[[], Any]:
        def run() -> Any:
            answer, why = tier.answer(route)
            assert answer is not None, f"the rollup tier declined: {why}"
            return answer

        return run

    def tier_cold(route: Any) -> Callable[[], Any]:
        def run() -> Any:
            tier.clear()
            return tiered(route)()

        return run

    record("page views by country / 5 min, 24 h", "tier: first read", tier_cold(views_route), args.raw_runs)
    record("events by type per day, 1 year", "tier: first read", tier_cold(types_route), args.raw_runs)
    served["views_tier"] = str(sql(views_sql)().get("rollup_tier"))
    served["types_tier"] = str(sql(types_sql)().get("rollup_tier"))
    record("DAU per day, 1 year", "metrics API", get("/v1/metrics/dau", year), args.runs)
    record(
        "page views by country / 5 min, 24 h",
        "metrics API",
        get(
            "/v1/metrics/count",
            {**day, "granularity": "5m", "group_by": "country", "event_type": "page_view"},
        ),
        args.runs,
    )
    record("5-step funnel, 30 days", "metrics API", funnel, args.raw_runs)
    record("DAU per day, 1 year", "SQL API", sql(dau_sql), args.runs)
    record("page views by country / 5 min, 24 h", "SQL API", sql(views_sql), args.runs)
    record("events by type per day, 1 year", "SQL API", sql(types_sql), args.runs)
    # Engine level, the same way for both paths: the router's SQL and the
    # raw SQL, each straight on the store.
    record("DAU per day, 1 year", "store: routed", routed(dau_sql), args.runs)
    record("DAU per day, 1 year", "store: raw", raw(dau_sql), args.raw_runs)
    record("events by type per day, 1 year", "store: routed", routed(types_sql), args.runs)
    record("events by type per day, 1 year", "router: memory tier", tiered(types_route), args.runs)
    record("events by type per day, 1 year", "store: raw", raw(types_sql), args.raw_runs)
    served["types"] = pipeline.query.router.route(sandbox.check(types_sql)).served_from
    # chDB's fixed cost per query, measured interleaved with the page-views
    # query routed and raw (one round of each in turn, so load drift hits
    # all alike): the floor under every routed answer (a 10x speedup needs
    # raw >= 10x this floor). The one-row read is one 5-minute bucket of the
    # same rollup (10 countries); `rollup_active_users_1d` would not do: a
    # one-row read deserializes the whole granule's HLL states.
    last_bucket = _utc(end_day - 300_000)
    views_raw = pipeline.query.router.raw(sandbox.check(views_sql))
    # What the floor is made of (decision 098): the same 24 h of rollup rows
    # read without GROUP BY, a GROUP BY + ORDER BY of 10 generated rows (no
    # table at all), and the routed query on a month-partitioned copy of the
    # rollup (one INSERT, so one part per month, like the settled live table's
    # one part per day).
    views_table = "rollup_page_views_by_country_5m"
    month_copy = "bench_rollup_page_views_by_country_5m_month"
    store.command(f"DROP TABLE IF EXISTS {month_copy}")
    store.command(  # only the columns the routed query reads
        f"CREATE TABLE {month_copy} ENGINE = AggregatingMergeTree "
        "PARTITION BY toYYYYMM(window_start) ORDER BY (window_start, country) "
        f"AS SELECT window_start, country, views FROM {views_table}"
    )
    month_sql = views_route.sql.replace(views_table, month_copy)
    # The same route as before decision 098 (GROUP BY + countMerge instead of
    # FINAL + finalizeAggregation), to measure the FINAL read in this run.
    from strata.query import router as router_module

    one_row_per_group = router_module._one_row_per_group
    router_module._one_row_per_group = lambda *args: False
    try:
        group_by_sql = pipeline.query.router.route(sandbox.check(views_sql)).sql
    finally:
        router_module._one_row_per_group = one_row_per_group
    day_rows_sql = (
        f"SELECT window_start, country, finalizeAggregation(views) FROM {views_table} "
        f"WHERE window_start >= '{_utc(end_day - DAY_MS)}' AND window_start < '{_utc(end_day)}'"
    )
    tiny_group_sql = "SELECT number % 3 AS k, count() FROM numbers(10) GROUP BY k ORDER BY k"
    interleaved = {
        ("chDB floor", "SELECT 1"): lambda: store.query_rows("SELECT 1"),
        ("chDB floor", "one-row rollup read"): lambda: store.query_rows(
            "SELECT country, countMerge(views) FROM rollup_page_views_by_country_5m "
            f"WHERE window_start = '{last_bucket}' GROUP BY country"
        ),
        ("chDB floor", "sandbox + route (Python)"): lambda: pipeline.query.router.route(
            sandbox.check(views_sql)
        ),
        ("page views by country / 5 min, 24 h", "store: routed"): lambda: store.query_rows(
            views_route.sql
        ),
        ("page views by country / 5 min, 24 h", "router: memory tier"): tiered(views_route),
        ("page views by country / 5 min, 24 h", "store: raw"): lambda: store.query_rows(
            views_raw.sql
        ),
        ("chDB floor", "GROUP BY + ORDER BY, 10 rows"): lambda: store.query_rows(tiny_group_sql),
        ("chDB floor", "24 h rollup rows, no GROUP BY"): lambda: store.query_rows(day_rows_sql),
        ("page views by country / 5 min, 24 h", "store: routed, month parts"): (
            lambda: store.query_rows(month_sql)
        ),
        ("page views by country / 5 min, 24 h", "store: routed, GROUP BY form"): (
            lambda: store.query_rows(group_by_sql)
        ),
    }
    _, part_rows = store.query_rows(
        "SELECT table, count() FROM system.parts WHERE active AND database = currentDatabase() "
        f"AND table IN ('events', '{views_table}', '{month_copy}') GROUP BY table"
    )
    parts = {str(table): int(n) for table, n in part_rows}
    timings: dict[tuple[str, str], list[float]] = {key: [] for key in interleaved}
    for fn in interleaved.values():
        fn()  # warm-up
    for _ in range(args.runs):
        for key, fn in interleaved.items():
            started = time.perf_counter()
            fn()
            timings[key].append((time.perf_counter() - started) * 1000)
    for (row, column), values in timings.items():
        results.setdefault(row, {})[column] = p50_p99(values)
        print(
            f"  {row:<40} {column:<14} p50 {results[row][column][0]:9.2f} ms  "
            f"p99 {results[row][column][1]:9.2f} ms (interleaved)",
            flush=True,
        )

    store.command(f"DROP TABLE IF EXISTS {month_copy}")

    # Where the p99 tail of a rollup-served request comes from: the page-views
    # request again, with every garbage collection timed (gc.callbacks), once
    # with the start-up heap unfrozen (full collections traverse it) and once
    # frozen again, as everything above ran.
    page_views = get(
        "/v1/metrics/count",
        {**day, "granularity": "5m", "group_by": "country", "event_type": "page_view"},
    )
    gc_runs = args.runs * 4
    gc_report: dict[str, dict[str, Any]] = {}
    for phase in ("unfrozen", "frozen"):
        if phase == "unfrozen":
            gc.unfreeze()
        else:
            gc.collect()
            gc.freeze()
        walls, pauses = measure_with_gc(page_views, gc_runs)
        full = [ms for generation, ms in pauses if generation == 2]
        gc_report[phase] = {
            "p50_p99": p50_p99(walls),
            "full": len(full),
            "full_max": max(full, default=0.0),
            "full_median": statistics.median(full) if full else 0.0,
            "tracked": len(gc.get_objects()),
        }
        print(f"  gc {phase}: {gc_report[phase]}", flush=True)
    gc_as_is, gc_frozen = gc_report["unfrozen"], gc_report["frozen"]
    gc_note = (
        "p99 tails: everything above ran with the start-up heap frozen, as `strata serve` "
        f"does (`server.gc_freeze`; {frozen_objects:,} objects). The page-views API request "
        f"{gc_runs} more times with every garbage collection timed, the heap unfrozen: "
        f"p50 / p99 {_cell(gc_as_is['p50_p99'])} ms, {gc_as_is['full']} full (generation 2) "
        f"collections inside requests (median {gc_as_is['full_median']:.1f} ms, max "
        f"{gc_as_is['full_max']:.1f} ms; {gc_as_is['tracked']:,} objects tracked); frozen "
        f"again: {_cell(gc_frozen['p50_p99'])} ms, {gc_frozen['full']} full collections "
        f"(median {gc_frozen['full_median']:.1f} ms, max {gc_frozen['full_max']:.1f} ms)."
    )

    # Cache hits: the same requests on a service with the cache on.
    pipeline._query = None
    pipeline.config = load_config(
        overrides={
            **base_overrides,
            "query.cache_ttl": "600s",
            "query.open_range_cache_ttl": "600s",
        }
    )
    cached_app = Starlette(routes=core_routes(CoreAPI(pipeline)))
    client = TestClient(cached_app)
    record("DAU per day, 1 year", "cache hit (API)", get("/v1/metrics/dau", year), args.runs * 5)
    record("5-step funnel, 30 days", "cache hit (API)", funnel, args.runs * 5)
    record("page views by country / 5 min, 24 h", "cache hit (SQL)", sql(views_sql), args.runs * 5)
    # The cache itself, without the in-process HTTP client (TestClient costs
    # a few ms per request by itself).
    service = pipeline.query
    record(
        "DAU per day, 1 year",
        "cache hit (service)",
        lambda: service.sql("bench", dau_sql),
        args.runs * 5,
    )
    record(
        "page views by country / 5 min, 24 h",
        "cache hit (service)",
        lambda: service.sql("bench", views_sql),
        args.runs * 5,
    )

    # The per-day cache of complete days (QueryService.granule_cached), the
    # way a dashboard asks: DAU for the year up to now, with a watermark
    # 30 s behind now as a running processor reports it. Open ranges are
    # not result-cached here, so every request merges today's open day on
    # the store and takes the 365 complete days from the per-day cache.
    from strata.query.service import QueryService

    day_cache_config = load_config(
        overrides={**base_overrides, "query.cache_ttl": "600s", "query.open_range_cache_ttl": "0s"}
    )
    pipeline.config = day_cache_config
    pipeline._query = QueryService(
        day_cache_config, lambda: store, lambda: int(time.time() * 1000) - 30_000
    )
    client = TestClient(Starlette(routes=core_routes(CoreAPI(pipeline))))
    year_to_now = {"from": _iso(start_ms), "to": _iso(int(time.time() * 1000))}
    cold_started = time.perf_counter()
    cold = get("/v1/metrics/dau", year_to_now)()
    day_cache_cold_ms = (time.perf_counter() - cold_started) * 1000
    warm = get("/v1/metrics/dau", year_to_now)()
    day_cache_note = (
        f"first request {day_cache_cold_ms:.0f} ms ({cold.get('days_answered')} days from "
        f"day_answers, {cold.get('days_computed')} computed), then "
        f"{warm.get('days_answered')} days from day_answers and "
        f"{warm.get('days_computed')} open day(s), served from `{warm['served_from']}`"
    )
    record(
        "DAU per day, 1 year",
        "API: to now",
        get("/v1/metrics/dau", year_to_now),
        args.runs,
    )
    target = pipeline.query.day_answer_target("distinct_id")
    assert target is not None
    record(
        "DAU per day, 1 year",
        "to now (service)",
        lambda: pipeline.query.daily_answers(
            target=target,
            start_ms=start_ms,
            end_ms=end_day + DAY_MS,
            compute=lambda lo, hi: pipeline.query.sql(
                "bench",
                f"SELECT toDate(ts) AS day, uniq(distinct_id) AS users FROM events "
                f"WHERE ts >= '{_utc(lo)}' AND ts < '{_utc(hi)}' GROUP BY day ORDER BY day",
            ),
        ),
        args.runs,
    )

    # DuckDB over a Parquet export of the same rows.
    import duckdb
    import pyarrow.parquet as pq

    parquet_dir = data_dir / "parquet"
    parquet_dir.mkdir(exist_ok=True)
    print("exporting to Parquet ...")
    export_started = time.perf_counter()
    for month in range(0, args.days, 30):
        lower = start_ms + month * DAY_MS
        upper = min(end_day, lower + 30 * DAY_MS)
        part = store.query_arrow(
            "SELECT event_type, distinct_id, ts, country, revenue FROM events "
            "WHERE ts >= fromUnixTimestamp64Milli({lo:Int64}) "
            "AND ts < fromUnixTimestamp64Milli({hi:Int64})",
            {"lo": lower, "hi": upper},
        )
        pq.write_table(part, parquet_dir / f"part-{month:03d}.parquet")
    export_s = time.perf_counter() - export_started
    duck = duckdb.connect()
    duck.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet('{parquet_dir}/*.parquet')")
    duck_dau = (
        "SELECT CAST(ts AS DATE) AS day, count(DISTINCT distinct_id) FROM events "
        f"WHERE ts >= TIMESTAMPTZ '{_utc(start_ms)}+00' AND ts < TIMESTAMPTZ '{_utc(end_day)}+00' "
        "GROUP BY day ORDER BY day"
    )
    duck_dau_approx = duck_dau.replace(
        "count(DISTINCT distinct_id)", "approx_count_distinct(distinct_id)"
    )
    duck_types = (
        "SELECT CAST(ts AS DATE) AS day, event_type, count(*) FROM events "
        f"WHERE ts >= TIMESTAMPTZ '{_utc(start_ms)}+00' AND ts < TIMESTAMPTZ '{_utc(end_day)}+00' "
        "GROUP BY day, event_type ORDER BY day, event_type"
    )
    duck_views = (
        "SELECT time_bucket(INTERVAL 5 MINUTE, ts) AS t, country, count(*) FROM events "
        f"WHERE event_type = 'page_view' AND ts >= TIMESTAMPTZ '{_utc(end_day - DAY_MS)}+00' "
        f"AND ts < TIMESTAMPTZ '{_utc(end_day)}+00' GROUP BY t, country ORDER BY t, country"
    )
    # The analyst's usual funnel: from each user's first step-1 event, the
    # first next step within the window (greedy from the first start).
    steps = ["page_view", "search", "add_to_cart", "checkout", "purchase"]
    ctes = [
        f"s1 AS (SELECT distinct_id, min(ts) AS t0, min(ts) AS t FROM events WHERE "
        f"event_type = 'page_view' AND ts >= TIMESTAMPTZ '{_utc(month_from)}+00' "
        f"AND ts < TIMESTAMPTZ '{_utc(end_day)}+00' GROUP BY distinct_id)"
    ]
    for k, step in enumerate(steps[1:], start=2):
        ctes.append(
            f"s{k} AS (SELECT p.distinct_id, p.t0, min(e.ts) AS t FROM s{k - 1} p JOIN events e "
            f"ON e.distinct_id = p.distinct_id AND e.event_type = '{step}' AND e.ts > p.t "
            f"AND e.ts <= p.t0 + INTERVAL 1 DAY GROUP BY p.distinct_id, p.t0)"
        )
    duck_funnel = (
        "WITH "
        + ", ".join(ctes)
        + " SELECT "
        + ", ".join(f"(SELECT count(*) FROM s{k})" for k in range(1, 6))
    )
    record(
        "DAU per day, 1 year",
        "DuckDB exact",
        lambda: duck.execute(duck_dau).fetchall(),
        args.raw_runs,
    )
    record(
        "DAU per day, 1 year",
        "DuckDB approx",
        lambda: duck.execute(duck_dau_approx).fetchall(),
        args.raw_runs,
    )
    record(
        "page views by country / 5 min, 24 h",
        "DuckDB",
        lambda: duck.execute(duck_views).fetchall(),
        args.raw_runs,
    )
    record(
        "events by type per day, 1 year",
        "DuckDB",
        lambda: duck.execute(duck_types).fetchall(),
        args.raw_runs,
    )
    record(
        "5-step funnel, 30 days",
        "DuckDB",
        lambda: duck.execute(duck_funnel).fetchall(),
        args.raw_runs,
    )

    columns = [
        "SELECT 1",
        "one-row rollup read",
        "sandbox + route (Python)",
        "GROUP BY + ORDER BY, 10 rows",
        "24 h rollup rows, no GROUP BY",
        "API: cold",
        "metrics API",
        "store: day_answers",
        "API: to now",
        "to now (service)",
        "SQL API",
        "store: routed",
        "router: memory tier",
        "tier: first read",
        "store: routed, month parts",
        "store: routed, GROUP BY form",
        "store: raw",
        "cache hit (API)",
        "cache hit (SQL)",
        "cache hit (service)",
        "DuckDB exact",
        "DuckDB approx",
        "DuckDB",
    ]
    lines = [
        f"`python -m benchmarks.query --events {args.events} --runs {args.runs} "
        f"--raw-runs {args.raw_runs}`: {args.events:,} events over {args.days} days, "
        f"{users:,} users, bulk-loaded in {load_s:.0f} s ({args.events / load_s:,.0f} events/s "
        f"including the 8 rollup views; background merges settled {settle_s:.0f} s later); "
        f"Parquet export {export_s:.0f} s. "
        "Latencies in ms as p50 / p99, measured in-process through the ASGI app "
        "(HTTP parsing included, no network; `SQL API` is `POST /v1/sql` with the cache off, "
        "`store: routed`/`store: raw` run the router's SQL and the raw SQL straight on chDB; "
        "`router: memory tier` is the same routed query answered by the in-memory rollup tier "
        "(decision 102) from finalized rows it holds, `tier: first read` the same after "
        "emptying the tier, so it reads the range's rows from chDB first). "
        f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other "
        "jobs share the machine). Served from: DAU "
        f"`{served['dau']}`, page views `{served['views']}`, events by type "
        f"`{served['types']}`, funnel `raw`; the SQL API's page views and events by type were "
        f"answered by the rollup tier: `{served['views_tier']}`, `{served['types_tier']}` "
        "(`memory` = from the in-memory tier). `metrics API` runs with the result cache off; "
        "DAU reads the complete days' finalized answers from `day_answers` (decision 096; "
        f"finalizing the {args.days} days took {finalize_s:.1f} s, once) and `API: cold` is "
        f"the same request before any day was finalized (served from `{served['dau_cold']}`: "
        "the year's states merged per request). `store: day_answers` is the table read alone. "
        "`API: to now` asks DAU for the year up to now with a watermark 30 s behind now and "
        f"open ranges not result-cached: {day_cache_note}; `to now (service)` is the same "
        "without the HTTP client. `chDB floor`: chDB's fixed cost per query in this run "
        "(`SELECT 1`; a one-row read: one 5-minute bucket of `rollup_page_views_by_country_5m`) "
        "and the router's own Python (sandbox + route of the page-views query), measured "
        "interleaved with page views `store: routed` and `store: raw` (one of each in turn).",
        "",
        "| query | " + " | ".join(c for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row, cells in results.items():
        rendered = [_cell(cells[c]) if c in cells else "" for c in columns]
        lines.append(f"| {row} | " + " | ".join(rendered) + " |")
    dau_speedup = (
        results["DAU per day, 1 year"]["store: raw"][0]
        / results["DAU per day, 1 year"]["store: routed"][0]
    )
    views_speedup = (
        results["page views by country / 5 min, 24 h"]["store: raw"][0]
        / results["page views by country / 5 min, 24 h"]["store: routed"][0]
    )
    types_speedup = (
        results["events by type per day, 1 year"]["store: raw"][0]
        / results["events by type per day, 1 year"]["store: routed"][0]
    )
    views_tier_speedup = (
        results["page views by country / 5 min, 24 h"]["store: raw"][0]
        / results["page views by country / 5 min, 24 h"]["router: memory tier"][0]
    )
    types_tier_speedup = (
        results["events by type per day, 1 year"]["store: raw"][0]
        / results["events by type per day, 1 year"]["router: memory tier"][0]
    )
    floor = results["chDB floor"]["one-row rollup read"][0]
    views_raw = results["page views by country / 5 min, 24 h"]["store: raw"][0]
    dau_raw = results["DAU per day, 1 year"]["store: raw"][0]
    dau_answers = results["DAU per day, 1 year"]["store: day_answers"][0]
    lines += [
        "",
        f"Floor: `SELECT 1` {results['chDB floor']['SELECT 1'][0]:.2f} ms, a one-row rollup "
        f"read {floor:.2f} ms (p50); raw page views ({views_raw:.1f} ms) are "
        f"{views_raw / floor:.1f}x that floor, so no query that chDB runs on that rollup, however "
        f"small, can be more than about {views_raw / floor:.1f}x faster than raw there (the "
        "in-memory rollup tier, decision 102, does not ask chDB; active parts: "
        f"`events` {parts.get('events', 0)}, `{views_table}` {parts.get(views_table, 0)}; both "
        "are partitioned by day). What the floor is made of (decision 098): a GROUP BY + ORDER "
        "BY of 10 generated rows, no table, costs "
        f"{results['chDB floor']['GROUP BY + ORDER BY, 10 rows'][0]:.2f} ms; the routed "
        "query's 24 h of rollup rows read without GROUP BY "
        f"{results['chDB floor']['24 h rollup rows, no GROUP BY'][0]:.2f} ms; the routed query "
        f"on a month-partitioned copy of the rollup ({parts.get(month_copy, 0)} parts) "
        f"{results['page views by country / 5 min, 24 h']['store: routed, month parts'][0]:.2f}"
        " ms; the routed query in its GROUP BY form (before decision 098's FINAL read) "
        f"{results['page views by country / 5 min, 24 h']['store: routed, GROUP BY form'][0]:.2f}"
        " ms. DAU from "
        f"`day_answers` vs raw DAU on the store: {dau_raw / dau_answers:.0f}x.",
        "",
        gc_note,
        "",
        f"Router vs raw on the store (p50): DAU {dau_speedup:.1f}x, page views "
        f"{views_speedup:.1f}x, events by type per day {types_speedup:.0f}x with the routed SQL "
        f"on chDB; with the in-memory rollup tier (what the router does for finalized days, "
        f"decision 102): page views {views_tier_speedup:.1f}x, events by type per day "
        f"{types_tier_speedup:.0f}x. "
        "Targets: p99 <= 50 ms for rollup-served metrics, <= 2 ms for cache hits, router >= 10x "
        "raw for rollup-answerable queries.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Query layer", body)
    pipeline.stop()
    if not args.data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)
    os._exit(0)  # chDB's engine threads can delay interpreter exit


if __name__ == "__main__":
    main()

"""The SQL router: rollup answers equal raw answers on the same data."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from tests.fixtures_query import DAY_MS, base_day_ms, load, make_rows

from strata.config import default_metrics, load_config
from strata.query import sandbox
from strata.query.router import Router
from strata.store import Store


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    metrics = msgspec.to_builtins(default_metrics()) + [
        {
            "name": "revenue_range",
            "filter": "revenue > 0",
            "dimensions": ["platform"],
            "aggregations": {
                "low": "min(revenue)",
                "high": "max(revenue)",
                "total": "sum(revenue)",
            },
        }
    ]
    config = load_config(
        overrides={"data_dir": str(tmp_path_factory.mktemp("router")), "metrics": metrics}
    )
    store = Store.open(config)
    base = base_day_ms(10)
    # Two inserts, the second with older timestamps (late data), so the
    # rollups hold several parts per bucket that must be merged.
    load(store, make_rows(3000, start_ms=base, span_ms=6 * DAY_MS, seed=1), "t1")
    load(store, make_rows(800, start_ms=base, span_ms=3 * DAY_MS, seed=2), "t2")
    yield store, Router(store.metrics, rollup_5m_ttl_ms=35 * DAY_MS), base
    store.close()


def _generate_queries(base: int) -> list[str]:
    """Rollup-answerable queries over every default metric."""
    rng = random.Random(7)
    buckets = [
        ("toStartOfFiveMinutes(ts)", False),
        ("toStartOfHour(ts)", False),
        ("toStartOfInterval(ts, INTERVAL 15 MINUTE)", False),
        ("toStartOfDay(ts)", True),
        ("toDate(ts)", True),
        ("toStartOfInterval(ts, INTERVAL 2 DAY)", True),
        # sqlglot parses these as DateTrunc / a calendar interval.
        ("date_trunc('hour', ts)", False),
        ("date_trunc('day', ts)", True),
        ("toStartOfInterval(ts, INTERVAL 1 MONTH)", True),
        (None, True),
    ]
    metrics = [
        ("event_type = 'page_view'", ["country"], ["count()", "uniq(user_id)"]),
        ("", ["event_type"], ["count()", "uniq(distinct_id)", "uniqCombined(distinct_id)"]),
        ("", [], ["count()", "uniq(distinct_id)"]),
        (
            "revenue > 0",
            ["country", "currency"],
            ["sum(revenue)", "count()", "uniq(distinct_id)", "avg(revenue)"],
        ),
        ("revenue > 0", ["platform"], ["min(revenue)", "max(revenue)", "sum(revenue)"]),
    ]
    dimension_filters = {
        "country": ["country = 'US'", "country IN ('DE', 'FR')", "country != 'BR'"],
        "event_type": ["event_type = 'purchase'", "event_type IN ('signup', 'checkout')"],
        "currency": ["currency = 'USD'"],
        "platform": ["platform = 'web'", "platform NOT IN ('ios')"],
    }
    queries = []
    for (metric_filter, dims, aggs), (bucket, day_aligned) in itertools.product(metrics, buckets):
        for variant in range(3):
            if day_aligned:
                start = base + rng.randint(0, 2) * DAY_MS
                end = start + rng.randint(1, 4) * DAY_MS
            else:
                start = base + rng.randint(0, 5 * 288) * 300_000
                end = start + rng.randint(1, 600) * 300_000
            group = [d for d in dims if rng.random() < 0.7]
            chosen = rng.sample(aggs, k=rng.randint(1, len(aggs)))
            where = [f"ts >= '{_utc(start)}'", f"ts < '{_utc(end)}'"]
            if metric_filter:
                where.insert(rng.randint(0, len(where)), metric_filter)
            if dims and variant == 2:
                where.append(rng.choice(dimension_filters[rng.choice(dims)]))
            select = ([f"{bucket} AS bucket"] if bucket else []) + group
            select += [f"{a} AS a{i}" for i, a in enumerate(chosen)]
            keys = (["bucket"] if bucket else []) + group
            sql = f"SELECT {', '.join(select)} FROM events WHERE {' AND '.join(where)}"
            if keys:
                sql += f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
            queries.append(sql)
    # Unaliased projections, HAVING, ORDER BY an aggregate, LIMIT.
    day = _utc(base)
    queries += [
        "SELECT count() FROM events",
        "SELECT country, count() FROM events WHERE event_type = 'page_view' GROUP BY country "
        "HAVING count() > 10 ORDER BY count() DESC, country LIMIT 3",
        f"SELECT event_type, count(), uniq(distinct_id) FROM events WHERE ts >= '{day}' GROUP BY event_type "
        "ORDER BY event_type",
        "SELECT country, currency, avg(revenue) AS a FROM events WHERE revenue > 0 "
        "GROUP BY country, currency ORDER BY country, currency",
    ]
    return queries


def _normalize(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(rows, key=repr)


def test_router_equivalence_over_generated_queries(store: Any) -> None:
    store_, router, base = store
    queries = _generate_queries(base)
    assert len(queries) >= 50
    served = {"rollup_5m": 0, "rollup_1d": 0}
    for sql in queries:
        tree = sandbox.check(sql)
        route = router.route(tree)
        assert route.served_from in served, (sql, route.reason, route.rejected)
        served[route.served_from] += 1
        raw = router.raw(tree)
        assert " uniq(" not in raw.sql and "(uniq(" not in raw.sql
        raw_columns, raw_rows = store_.query_rows(raw.sql)
        columns, rows = store_.query_rows(route.sql)
        assert columns == raw_columns, sql
        assert len(rows) == len(raw_rows), sql
        ordered = "ORDER BY" in sql
        left = rows if ordered else _normalize(rows)
        right = raw_rows if ordered else _normalize(raw_rows)
        for got, want in zip(left, right, strict=True):
            for g, w in zip(got, want, strict=True):
                if isinstance(w, float):
                    # Whole-number revenue: sums are exact; avg is a division.
                    assert g == pytest.approx(w, rel=1e-12), sql
                else:
                    assert g == w, sql
    assert served["rollup_5m"] > 0 and served["rollup_1d"] > 0
    # At least one query had a non-empty answer of several rows.
    assert sum(1 for q in queries if store_.query_rows(router.route(sandbox.check(q)).sql)[1])


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT toStartOfMinute(ts) AS m, count() FROM events GROUP BY m", "no rollup"),
        ("SELECT path, count() FROM events GROUP BY path", "no rollup"),
        ("SELECT count() FROM events WHERE ts > '2026-01-01 00:00:00'", "ts > A"),
        ("SELECT count() FROM events WHERE ts >= '2026-01-01 00:00:07'", "5-minute"),
        ("SELECT event_id FROM events", "row-level"),
        ("SELECT uniqExact(user_id) FROM events", "no rollup"),
        ("SELECT count() FROM (SELECT * FROM events)", "events table"),
        (
            "SELECT count() FROM events WHERE event_type = 'page_view' OR country = 'US'",
            "no rollup",
        ),
        ("SELECT sum(revenue) OVER () FROM events", "window"),
        (
            "SELECT toStartOfHour(ts) AS h, count() FROM events "
            "WHERE ts >= '2020-01-01 00:00:00' GROUP BY h",
            "retention",
        ),
    ],
)
def test_router_sends_the_rest_to_raw(store: Any, sql: str, reason: str) -> None:
    store_, router, _ = store
    route = router.route(sandbox.check(sql))
    assert route.served_from == "raw"
    assert reason in route.reason or any(reason in r for r in route.rejected.values()), route
    store_.query_rows(route.sql)  # the raw rewrite still runs


def test_time_range_and_explain(store: Any) -> None:
    _, router, base = store
    sql = (
        f"SELECT toStartOfHour(ts) AS h, count() AS n FROM events WHERE ts >= '{_utc(base)}' "
        f"AND ts < '{_utc(base + DAY_MS)}' AND event_type = 'signup' GROUP BY h"
    )
    route = router.route(sandbox.check(sql))
    assert route.served_from == "rollup_5m"
    assert route.metric == "events_by_type"
    assert (route.time_range.start_ms, route.time_range.end_ms) == (base, base + DAY_MS)
    explained = route.explain()
    assert "rollup_events_by_type_5m" in explained["sql"] and "countMerge" in explained["sql"]

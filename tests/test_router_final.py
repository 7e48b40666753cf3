"""The router's FINAL form (decision 098): a rollup query whose groups are
exactly the rollup's rows reads the table FINAL and finalizes each row
instead of GROUP BY + merge. It must give the raw answer also when a
bucket's states are spread over several unmerged parts; every other shape
keeps GROUP BY."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from tests.fixtures_query import DAY_MS, base_day_ms, load, make_rows

from strata.config import load_config
from strata.query import sandbox
from strata.query.router import Router
from strata.store import Store

ROLLUPS = [
    "rollup_page_views_by_country_5m",
    "rollup_events_by_type_5m",
    "rollup_events_by_type_1d",
    "rollup_revenue_by_country_5m",
]


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = load_config(
        overrides={"data_dir": str(tmp_path_factory.mktemp("final"))}, environ={}
    )
    store = Store.open(config)
    for table in ROLLUPS:  # keep the parts apart: FINAL must do the merging
        store.command(f"SYSTEM STOP MERGES {table}")
    base = base_day_ms(5)
    # Three inserts over the same two days (the later ones partly older:
    # late data), so every bucket's states sit in up to three parts.
    load(store, make_rows(1500, start_ms=base, span_ms=2 * DAY_MS, seed=11), "f1")
    load(store, make_rows(700, start_ms=base, span_ms=DAY_MS, seed=12), "f2")
    load(store, make_rows(500, start_ms=base, span_ms=2 * DAY_MS, seed=13), "f3")
    yield store, Router(store.metrics, rollup_5m_ttl_ms=35 * DAY_MS), base
    store.close()


def _answers(env: Any, sql: str) -> tuple[Any, tuple[Any, Any], tuple[Any, Any]]:
    store, router, _ = env
    tree = sandbox.check(sql)
    route = router.route(tree)
    return route, store.query_rows(route.sql), store.query_rows(router.raw(tree).sql)


def test_rollup_parts_are_unmerged(env: Any) -> None:
    store, _, base = env
    _, rows = store.query_rows(
        "SELECT count(), uniqExact(window_start, country) FROM rollup_page_views_by_country_5m "
        "WHERE window_start >= {lo:DateTime} AND window_start < {hi:DateTime}",
        {"lo": _utc(base), "hi": _utc(base + DAY_MS)},
    )
    stored_rows, keys = rows[0]
    assert stored_rows > keys  # several state rows per (bucket, country) to merge


@pytest.mark.parametrize(
    "template",
    [
        # The seed query: page views per country per 5 minutes.
        "SELECT toStartOfFiveMinutes(ts) AS t, country, count() AS views FROM events "
        "WHERE event_type = 'page_view' AND ts >= '{lo}' AND ts < '{hi}' "
        "GROUP BY t, country ORDER BY t, country",
        # Bucket written out in GROUP BY, unaliased aggregate, ORDER BY an aggregate.
        "SELECT toStartOfInterval(ts, INTERVAL 5 MINUTE), event_type, count() FROM events "
        "WHERE ts >= '{lo}' AND ts < '{hi}' "
        "GROUP BY toStartOfInterval(ts, INTERVAL 5 MINUTE), event_type "
        "ORDER BY count() DESC, event_type, toStartOfInterval(ts, INTERVAL 5 MINUTE) LIMIT 50",
        # Daily rollup, dimension filter.
        "SELECT toDate(ts) AS day, event_type, count() AS n FROM events "
        "WHERE event_type != 'signup' AND ts >= '{day_lo}' AND ts < '{day_hi}' "
        "GROUP BY day, event_type ORDER BY day, event_type",
        # Two dimensions; sum, avg and an expression over aggregates.
        "SELECT toStartOfFiveMinutes(ts) AS t, country, currency, sum(revenue) AS total, "
        "avg(revenue) AS mean, sum(revenue) / count() AS per_order FROM events "
        "WHERE revenue > 0 AND ts >= '{lo}' AND ts < '{hi}' "
        "GROUP BY t, country, currency ORDER BY t, country, currency",
    ],
)
def test_one_row_per_group_reads_final_and_equals_raw(env: Any, template: str) -> None:
    _, _, base = env
    sql = template.format(
        lo=_utc(base + 3_600_000),
        hi=_utc(base + DAY_MS + 7_200_000),
        day_lo=_utc(base),
        day_hi=_utc(base + 2 * DAY_MS),
    )
    route, (columns, rows), (raw_columns, raw_rows) = _answers(env, sql)
    assert route.served_from.startswith("rollup_"), route.reason
    assert " FINAL " in route.sql and "GROUP BY" not in route.sql, route.sql
    assert "finalizeAggregation(" in route.sql and "Merge(" not in route.sql
    assert "one rollup row per group" in route.reason
    assert columns == raw_columns
    assert rows and rows == raw_rows


@pytest.mark.parametrize(
    "template",
    [
        # A dimension is not grouped: several rollup rows per group.
        "SELECT toStartOfFiveMinutes(ts) AS t, count() AS views FROM events "
        "WHERE event_type = 'page_view' AND ts >= '{lo}' AND ts < '{hi}' GROUP BY t ORDER BY t",
        # A coarser bucket than the rollup's.
        "SELECT toStartOfHour(ts) AS t, country, count() AS views FROM events "
        "WHERE event_type = 'page_view' AND ts >= '{lo}' AND ts < '{hi}' "
        "GROUP BY t, country ORDER BY t, country",
        # HAVING filters merged values.
        "SELECT toStartOfFiveMinutes(ts) AS t, country, count() AS views FROM events "
        "WHERE event_type = 'page_view' AND ts >= '{lo}' AND ts < '{hi}' "
        "GROUP BY t, country HAVING count() > 1 ORDER BY t, country",
        # Distinct counts merge faster in GROUP BY (decision 098).
        "SELECT toStartOfFiveMinutes(ts) AS t, country, count() AS views, uniq(user_id) AS u "
        "FROM events WHERE event_type = 'page_view' AND ts >= '{lo}' AND ts < '{hi}' "
        "GROUP BY t, country ORDER BY t, country",
        # Positions instead of expressions.
        "SELECT toStartOfFiveMinutes(ts) AS t, country, count() AS views FROM events "
        "WHERE event_type = 'page_view' AND ts >= '{lo}' AND ts < '{hi}' "
        "GROUP BY 1, 2 ORDER BY 1, 2",
        # No time bucket: many window starts per group.
        "SELECT country, count() AS views FROM events "
        "WHERE event_type = 'page_view' AND ts >= '{lo}' AND ts < '{hi}' "
        "GROUP BY country ORDER BY country",
    ],
)
def test_other_shapes_keep_group_by(env: Any, template: str) -> None:
    _, _, base = env
    sql = template.format(lo=_utc(base + 3_600_000), hi=_utc(base + DAY_MS + 7_200_000))
    route, (columns, rows), (raw_columns, raw_rows) = _answers(env, sql)
    assert "FINAL" not in route.sql, route.sql
    assert columns == raw_columns
    assert rows and rows == raw_rows

"""Fuzz of the in-memory rollup tier (decision 102): for hundreds of
generated rollup-routed queries, ``RollupTier.answer`` either declines or
returns exactly what the engine returns for ``route.sql`` (same columns,
rows, Python values and types, and order wherever ORDER BY fixes it).

The data has awkward dimension values (empty string, 'Ü', 'é', emoji,
values differing only in case, values whose byte order differs from a
locale's order) in several inserts whose rollup states stay in separate
parts (merges stopped). Named regression tests below pin what the fuzz and
the review of the tier found."""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from tests.fixtures_query import DAY_MS, base_day_ms, load, make_rows

from strata.config import default_metrics, load_config
from strata.query import sandbox
from strata.query.day_answers import day_of
from strata.query.service import QueryService
from strata.store import Store

COUNTRIES = ["US", "us", "DE", "", "Ü", "é", "éclair", "f", "Zebra", "apple", "🎉", "ß"]
PLATFORMS = ["web", "Web", "ios", "", "Ü", "🎉"]
CURRENCIES = ["USD", "usd", "EUR", "€"]
EVENT_TYPES = ["page_view", "signup", "Signup", "purchase", "ünï", ""]
FRONTIER_DAYS = 8  # days base-3 .. base+7 are final; data spans base .. base+6


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _rows(n: int, start_ms: int, span_ms: int, seed: int) -> list[dict[str, Any]]:
    rows = make_rows(n, start_ms=start_ms, span_ms=span_ms, seed=seed, id_prefix="z")
    rng = random.Random(seed)
    for row in rows:
        row["country"] = rng.choice(COUNTRIES)
        row["platform"] = rng.choice(PLATFORMS)
        if row["event_type"] != "purchase" and rng.random() < 0.3:
            row["event_type"] = rng.choice(EVENT_TYPES)
        if row["event_type"] == "purchase":
            # Fractional revenue: a float sum merged in another order could
            # differ in the last bit.
            row["revenue"] = rng.randint(1, 99) + rng.choice([0.0, 0.1, 0.2, 0.3, 0.7])
            row["currency"] = rng.choice(CURRENCIES)
    return rows


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
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
        overrides={"data_dir": str(tmp_path_factory.mktemp("tierfuzz")), "metrics": metrics},
        environ={},
    )
    store = Store.open(config)
    _, tables = store.query_rows(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND name LIKE 'rollup\\_%'"
    )
    for (table,) in tables:  # keep the parts apart: FINAL and merges must combine them
        store.command(f"SYSTEM STOP MERGES {table}")
    base = base_day_ms(10)
    load(store, _rows(9000, base, 6 * DAY_MS, 1), "z1")
    load(store, _rows(800, base, 3 * DAY_MS, 2), "z2")
    load(store, _rows(600, base + DAY_MS, 2 * DAY_MS, 3), "z3")
    load(store, _rows(400, base, DAY_MS // 4, 4), "z4")  # dense: several parts per bucket
    load(store, _rows(300, base, DAY_MS // 4, 5), "z5")
    svc = QueryService(config, lambda: store, lambda: None)
    answers = svc.day_answers
    frontier = day_of(base + FRONTIER_DAYS * DAY_MS)
    answers.finalize(day_of(base - 3 * DAY_MS), frontier, answers.next_seq())
    answers.set_frontier(frontier)
    yield svc, store, base
    store.close()


# -- comparison ---------------------------------------------------------------------------------


def _typed(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with every value paired with its type (1 == 1.0 and a date is
    not a datetime); NaN compares equal to NaN."""

    def one(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return (float, "nan")
        if isinstance(value, float) and value == 0 and math.copysign(1, value) < 0:
            return (float, "-0")
        if isinstance(value, list | tuple):
            return (type(value), tuple(one(v) for v in value))
        return (type(value), value)

    return [tuple(one(v) for v in row) for row in rows]


def _compare(
    svc: Any, store: Any, sql: str, mode: str, order_columns: list[int] | None = None
) -> str | None:
    """None when the tier declined, else "" when its answer equals the
    engine's and a description of the difference when not. ``mode``:
    "exact" (ORDER BY is total), "multiset" (no order), "ordered" (ORDER BY
    over ``order_columns``, not total: rows equal as a multiset and the
    order columns equal in sequence)."""
    route = svc.router.route(sandbox.check(sql))
    assert route.served_from in ("rollup_5m", "rollup_1d"), (sql, route.reason)
    held, why = svc.tier.answer(route)
    if held is None:
        return None
    columns, rows = store.query_rows(route.sql)
    problem = ""
    left, right = _typed(held.rows), _typed(rows)
    if held.columns != columns:
        problem = f"columns {held.columns} != {columns}"
    elif mode == "exact" and left != right:
        problem = "rows differ"
    elif mode != "exact" and sorted(left, key=repr) != sorted(right, key=repr):
        problem = "row multisets differ"
    elif mode == "ordered":
        cols = order_columns or []
        if [tuple(r[i] for i in cols) for r in left] != [tuple(r[i] for i in cols) for r in right]:
            problem = "order differs"
    if problem:
        return (
            f"{problem}\n  sql: {sql}\n  routed: {route.sql}\n"
            f"  tier: {held.rows[:8]}\n  engine: {rows[:8]}"
        )
    return ""


# -- the generator ------------------------------------------------------------------------------

# (metric filter, dimensions, aggregates the tier may answer over several rows)
METRICS = [
    ("event_type = 'page_view'", ["country"], ["count()"]),
    ("", ["event_type"], ["count()", "count(event_type)"]),
    ("", [], ["count()"]),
    ("revenue > 0", ["country", "currency"], ["count()"]),
    ("revenue > 0", ["platform"], ["min(revenue)", "max(revenue)"]),
]
BUCKETS_5M = [
    "toStartOfFiveMinutes(ts)",
    "toStartOfTenMinutes(ts)",
    "toStartOfFifteenMinutes(ts)",
    "toStartOfHour(ts)",
    "toStartOfInterval(ts, INTERVAL 10 MINUTE)",
    "toStartOfInterval(ts, INTERVAL 2 HOUR)",
    "date_trunc('hour', ts)",
    "toHour(toStartOfHour(ts))",
    "toString(toStartOfFifteenMinutes(ts))",
]
BUCKETS_1D = [
    "toStartOfInterval(ts, INTERVAL 1 DAY)",
    "toStartOfDay(ts)",
    "toDate(ts)",
    "toMonday(ts)",
    "toStartOfWeek(ts)",
    "toStartOfMonth(ts)",
    "date_trunc('day', ts)",
    "toStartOfQuarter(ts)",
    "toStartOfYear(ts)",
    "toStartOfInterval(ts, INTERVAL 1 WEEK)",
    "toStartOfInterval(ts, INTERVAL 1 MONTH)",
    "toUnixTimestamp(toStartOfDay(ts))",
    "toDayOfWeek(toDate(ts))",
]
KEY_FORMS = [
    "{d}",
    "{d}",
    "{d}",
    "lower({d})",
    "upper({d})",
    "substring({d}, 1, 1)",
    "substringUTF8({d}, 1, 1)",
    "concat({d}, '-')",
    "length({d})",
    "lengthUTF8({d})",
    "reverse({d})",
    "nullIf({d}, '')",
    "if({d} = '', 'none', {d})",
    "{d} = 'US'",
    "concat(lower({d}), upper({d}))",
]
VALUES = {
    "country": COUNTRIES,
    "event_type": EVENT_TYPES,
    "currency": CURRENCIES,
    "platform": PLATFORMS,
}


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _filter(rng: random.Random, d: str) -> str:
    v = VALUES[d]
    a, b = rng.sample(v, 2)
    forms = [
        f"{d} = {_quote(a)}",
        f"{d} != {_quote(a)}",
        f"{d} IN ({_quote(a)}, {_quote(b)})",
        f"{d} NOT IN ({_quote(a)}, {_quote(b)})",
        f"{d} LIKE {_quote(a[:1] + '%')}",
        f"{d} NOT LIKE '%e%'",
        f"startsWith({d}, {_quote(a[:1])})",
        f"length({d}) > 1",
        f"({d} = {_quote(a)} OR {d} = {_quote(b)})",
        f"({d} = {_quote(a)} OR startsWith({d}, 'U'))",
        f"lower({d}) = {_quote(a.lower())}",
    ]
    return rng.choice(forms)


def _range(rng: random.Random, base: int, kind: str) -> tuple[int, int]:
    last_end = base + FRONTIER_DAYS * DAY_MS
    if kind == "days":
        start = base + rng.randint(0, 5) * DAY_MS
        end = start + rng.randint(1, 4) * DAY_MS
    elif kind == "empty":
        start = base - rng.randint(2, 3) * DAY_MS
        end = start + rng.randint(1, 12) * 3_600_000
    else:
        start = base + rng.randint(0, 5 * 288) * 300_000
        end = start + rng.randint(1, 700) * 300_000
    return start, min(end, last_end)


def _query(rng: random.Random, base: int) -> tuple[str, str, list[int]]:
    """(sql, comparison mode, order columns)."""
    metric_filter, dims, aggs = rng.choice(METRICS)
    kind = rng.choices(["days", "5m", "empty"], [8, 10, 0.5])[0]
    start, end = _range(rng, base, kind)
    day_aligned = start % DAY_MS == 0 and end % DAY_MS == 0
    bucket_pool = BUCKETS_1D if day_aligned or rng.random() < 0.3 else BUCKETS_5M
    bucket = rng.choice(bucket_pool) if rng.random() < 0.75 else None
    if bucket in BUCKETS_1D and not day_aligned and kind == "5m":
        pass  # a daily bucket over a 5-minute-aligned range: the 5-minute rollup
    group_dims = [d for d in dims if rng.random() < 0.6]

    # Keys: (expression, alias or None).
    keys: list[tuple[str, str | None]] = []
    if bucket:
        keys.append((bucket, "b" if rng.random() < 0.7 else None))
    for i, d in enumerate(group_dims):
        form = rng.choice(KEY_FORMS).format(d=d)
        alias = f"k{i}" if form != d and rng.random() < 0.6 else None
        keys.append((form, alias))
    rng.shuffle(keys)

    # Aggregates: (expression, alias or None), possibly repeated.
    chosen = [rng.choice(aggs) for _ in range(rng.randint(1, 3))]
    aggregates = [(a, f"a{i}" if rng.random() < 0.6 else None) for i, a in enumerate(chosen)]

    where = [f"ts >= '{_utc(start)}'", f"ts < '{_utc(end)}'"]
    if metric_filter:
        where.insert(rng.randint(0, 2), metric_filter)
    if dims:
        for d in rng.sample(dims, k=rng.choice([0, 0, 1, 1, len(dims)])):
            where.append(_filter(rng, d))

    keys_in_select = not keys or rng.random() < 0.9
    outputs: list[tuple[str, str | None, bool]] = []  # (expr, alias, is key)
    if keys_in_select:
        outputs += [(e, a, True) for e, a in keys]
    outputs += [(e, a, False) for e, a in aggregates]
    if keys_in_select:
        rng.shuffle(outputs)
    select = ", ".join(f"{e} AS {a}" if a else e for e, a, _ in outputs)
    sql = f"SELECT {select} FROM events WHERE {' AND '.join(where)}"

    def reference(index: int) -> str:
        expression, alias, _ = outputs[index]
        choice = rng.random()
        if choice < 0.3:
            return str(index + 1)
        if alias and choice < 0.8:
            return alias
        return expression

    if keys:
        group_refs = []
        for expression, alias in keys:
            position = next(
                (i for i, o in enumerate(outputs) if o[0] == expression and o[2]), None
            )
            r = rng.random()
            if position is not None and r < 0.2:
                group_refs.append(str(position + 1))
            elif alias and r < 0.6:
                group_refs.append(alias)
            else:
                group_refs.append(expression)
        sql += " GROUP BY " + ", ".join(group_refs)

    key_positions = [i for i, o in enumerate(outputs) if o[2]]
    aggregate_positions = [i for i, o in enumerate(outputs) if not o[2]]
    mode = "multiset"
    order_columns: list[int] = []
    if not keys:
        mode = "exact"  # one row (or none)
        if rng.random() < 0.3:
            sql += f" ORDER BY {reference(aggregate_positions[0])} DESC"
        if rng.random() < 0.3:
            sql += f" LIMIT {rng.randint(0, 2)}"
            if rng.random() < 0.5:
                sql += f" OFFSET {rng.randint(0, 1)}"
        return sql, mode, order_columns
    if keys_in_select and rng.random() < 0.75:
        # A total order: every key, with aggregates interleaved.
        order = key_positions[:]
        rng.shuffle(order)
        for position in aggregate_positions:
            if rng.random() < 0.4:
                order.insert(rng.randint(0, len(order)), position)
        parts = [
            f"{reference(i)}{rng.choice(['', ' ASC', ' DESC'])}" for i in order
        ]
        sql += " ORDER BY " + ", ".join(parts)
        mode = "exact"
        if rng.random() < 0.5:
            sql += f" LIMIT {rng.choice([1, 2, 3, 5, 10, 30] * 4 + [0])}"
            if rng.random() < 0.5:
                sql += f" OFFSET {rng.choice([0, 1, 2, 3] * 3 + [20])}"
    elif keys_in_select and rng.random() < 0.5:
        order_columns = rng.sample(aggregate_positions, k=1)
        if rng.random() < 0.5 and key_positions:
            order_columns.append(rng.choice(key_positions))
        sql += " ORDER BY " + ", ".join(
            f"{reference(i)}{rng.choice(['', ' DESC'])}" for i in order_columns
        )
        mode = "ordered"
    return sql, mode, order_columns


def test_tier_answers_equal_the_engine(env: Any) -> None:
    svc, store, base = env
    rng = random.Random(102)
    eligible = answered = 0
    declined: Counter[str] = Counter()
    not_routed: Counter[str] = Counter()
    failures: list[str] = []
    while eligible < 420:
        sql, mode, order_columns = _query(rng, base)
        route = svc.router.route(sandbox.check(sql))
        if route.served_from not in ("rollup_5m", "rollup_1d"):
            not_routed[route.reason[:80]] += 1
            continue
        eligible += 1
        outcome = _compare(svc, store, sql, mode, order_columns)
        if outcome is None:
            _, why = svc.tier.answer(route)
            declined[why] += 1
        elif outcome:
            failures.append(outcome)
        else:
            answered += 1
    print(f"\n{eligible} rollup-routed queries, {answered} answered by the tier")
    for why, n in declined.most_common():
        print(f"  declined {n}: {why}")
    for why, n in not_routed.most_common():
        print(f"  not routed to a rollup {n}: {why}")
    assert not failures, "\n".join(failures[:5])
    assert answered >= 0.8 * eligible, declined


# -- named regressions ---------------------------------------------------------------------------


def _range_sql(base: int, first_day: int = 0, days: int = 2) -> str:
    start = base + first_day * DAY_MS
    return f"ts >= '{_utc(start)}' AND ts < '{_utc(start + days * DAY_MS)}'"


def _declined(svc: Any, sql: str) -> str:
    """The tier's reason for declining ``sql`` ("" if it answered)."""
    route = svc.router.route(sandbox.check(sql))
    assert route.served_from in ("rollup_5m", "rollup_1d"), (sql, route.reason)
    held, why = svc.tier.answer(route)
    return "" if held is not None else why


def test_substring_of_a_multibyte_character_is_declined(env: Any) -> None:
    """substring() cuts 'Ü', 'é' and '🎉' inside their UTF-8 bytes: the
    client decodes such a value to a str that neither groups nor sorts like
    the engine's bytes (the fuzz found 'c3' sorted before 'f'; the engine
    puts byte 0xC3 after it)."""
    svc, store, base = env
    sql = (
        f"SELECT substring(country, 1, 1) AS c, count() AS n FROM events "
        f"WHERE event_type = 'page_view' AND {_range_sql(base)} GROUP BY c ORDER BY c"
    )
    assert "UTF-8" in _declined(svc, sql)
    # The UTF-8-aware function and ASCII-only values are answered, exactly.
    assert _compare(svc, store, sql.replace("substring(", "substringUTF8("), "exact") == ""
    ascii_only = sql.replace("GROUP BY", "AND country IN ('US', 'us', 'DE', 'Zebra') GROUP BY")
    assert _compare(svc, store, ascii_only, "exact") == ""


def test_empty_answers_are_left_to_the_engine(env: Any) -> None:
    """chDB's empty answer has no column names after a GROUP BY over no
    rows but all of them under LIMIT 0 (the fuzz found both): the tier
    cannot know which, so the engine answers every empty result."""
    svc, store, base = env
    grouped = (
        f"SELECT country, count() FROM events WHERE event_type = 'page_view' "
        f"AND {_range_sql(base)} AND country = 'nowhere' GROUP BY country"
    )
    limited = (
        f"SELECT country, count() FROM events WHERE event_type = 'page_view' "
        f"AND {_range_sql(base)} GROUP BY country ORDER BY country LIMIT 0"
    )
    for sql in (grouped, limited):
        assert _declined(svc, sql).startswith("no rows"), sql
    assert _compare(svc, store, limited.replace("LIMIT 0", "LIMIT 2"), "exact") == ""


def test_null_in_an_ordered_key_is_declined(env: Any) -> None:
    """nullIf() makes a NULL key; Python cannot order None among strings
    (the tier raised TypeError) and the engine puts NULL last in both
    directions. Unordered, NULL is one group in both."""
    svc, store, base = env
    select = (
        f"SELECT nullIf(country, '') AS c, count() AS n FROM events "
        f"WHERE event_type = 'page_view' AND {_range_sql(base)} GROUP BY c"
    )
    assert "NULL" in _declined(svc, select + " ORDER BY c DESC")
    assert _compare(svc, store, select, "multiset") == ""
    assert _compare(svc, store, select + " ORDER BY n DESC", "ordered", [1]) == ""


def test_unhashable_and_float_keys_are_declined(env: Any) -> None:
    """An array key raised TypeError (unhashable) in the tier; -0.0 and 0.0
    are two groups for the engine but one for Python."""
    svc, store, base = env
    where = f"WHERE event_type = 'page_view' AND {_range_sql(base)}"
    arrays = f"SELECT splitByChar('e', country) AS c, count() FROM events {where} GROUP BY c"
    assert "group" in _declined(svc, arrays)
    zeros = f"SELECT if(country = 'US', -0.0, 0.0) AS z, count() FROM events {where} GROUP BY z"
    assert "-0.0" in _declined(svc, zeros)
    columns, rows = store.query_rows(svc.router.route(sandbox.check(zeros)).sql)
    assert len(rows) == 2  # what a merged group would have got wrong


def test_functions_that_change_between_calls_are_declined(env: Any) -> None:
    """The tier evaluates a filter or key once per dimension value and
    remembers it: now(), rand() or arrayJoin (several rows per value) must
    not be remembered."""
    svc, store, base = env
    where = f"event_type = 'page_view' AND {_range_sql(base)}"
    cases = {
        f"SELECT country, count() FROM events WHERE {where} "
        "AND (country = 'US' OR now() < toDateTime('2000-01-01 00:00:00')) GROUP BY country": "now",
        f"SELECT concat(country, toString(rand() % 2)) AS c, count() FROM events WHERE {where} "
        "GROUP BY c": "rand",
        f"SELECT arrayJoin([country, lower(country)]) AS c, count() FROM events WHERE {where} "
        "GROUP BY c": "arrayJoin",
    }
    for sql, function in cases.items():
        reason = _declined(svc, sql)
        assert function in reason and "deterministic" in reason, (sql, reason)
    # Deterministic functions and operators pass the same check.
    sql = (
        f"SELECT lower(country) AS c, count() AS n FROM events WHERE {where} "
        "AND (country LIKE '%e%' OR startsWith(country, 'U') OR length(country) > 3) "
        "GROUP BY c ORDER BY c"
    )
    assert _compare(svc, store, sql, "exact") == ""


def test_an_expression_the_engine_cannot_evaluate_is_declined(env: Any) -> None:
    """The tier evaluates a filter over every value of the dimension's
    dictionary, not only the query's rows: an error there (throwIf) must
    decline, not raise."""
    svc, _, base = env
    sql = (
        f"SELECT country, count() FROM events WHERE event_type = 'page_view' "
        f"AND {_range_sql(base)} AND throwIf(country = 'Ü', 'no') = 0 GROUP BY country"
    )
    assert "could not evaluate" in _declined(svc, sql)


def test_sum_and_avg_of_single_row_groups(env: Any) -> None:
    """sum/avg over fractional revenue whose states sit in several parts:
    answered only where every group is one rollup row (FINAL shape), and
    then exactly the engine's floats."""
    svc, store, base = env
    answered = 0
    for days, bucket in ((1, "toStartOfFiveMinutes(ts)"), (2, "toStartOfDay(ts)")):
        sql = (
            f"SELECT {bucket} AS w, country, currency, sum(revenue) AS s, avg(revenue) AS a, "
            f"count() AS n FROM events WHERE revenue > 0 AND {_range_sql(base, 0, days)} "
            "GROUP BY w, country, currency ORDER BY w, country, currency"
        )
        outcome = _compare(svc, store, sql, "exact")
        assert outcome == "", outcome
        answered += 1
    several = (
        f"SELECT country, sum(revenue) AS s FROM events WHERE revenue > 0 "
        f"AND {_range_sql(base, 0, 3)} GROUP BY country ORDER BY country"
    )
    assert "several rollup rows" in _declined(svc, several)


def test_what_the_tier_must_decline(env: Any) -> None:
    svc, _, base = env
    frontier_day = base + FRONTIER_DAYS * DAY_MS
    cases = {
        f"SELECT country, uniq(user_id) FROM events WHERE event_type = 'page_view' "
        f"AND {_range_sql(base)} GROUP BY country": "uniq",
        f"SELECT country, count() AS n FROM events WHERE event_type = 'page_view' "
        f"AND {_range_sql(base)} GROUP BY country HAVING n > 3": "HAVING",
        f"SELECT country, count() FROM events WHERE event_type = 'page_view' "
        f"AND ts >= '{_utc(base)}' GROUP BY country": "open-ended",
        f"SELECT count() FROM events WHERE event_type = 'page_view' "
        f"AND ts < '{_utc(base)}'": "open-ended",
        f"SELECT toDate(ts) AS d, count() FROM events WHERE ts >= '{_utc(frontier_day - DAY_MS)}' "
        f"AND ts < '{_utc(frontier_day + DAY_MS)}' GROUP BY d": "frontier",
        # Ranges over more than MAX_QUERY_DAYS days go to the engine.
        f"SELECT toDate(ts) AS d, count() FROM events WHERE ts >= "
        f"'{_utc(base - 2000 * DAY_MS)}' AND ts < '{_utc(base)}' GROUP BY d": "days",
    }
    for sql, reason in cases.items():
        assert reason in _declined(svc, sql), sql
    # The day before the frontier is final and answered (it has no data:
    # the engine's empty answer stands; the day with data is answered).
    inside = (
        f"SELECT toDate(ts) AS d, count() FROM events WHERE ts >= '{_utc(base + 5 * DAY_MS)}' "
        f"AND ts < '{_utc(frontier_day)}' GROUP BY d ORDER BY d"
    )
    assert _declined(svc, inside) == ""


def test_a_stale_day_is_declined_until_recomputed(env: Any) -> None:
    """Last in this module: it marks a day stale on the shared service."""
    svc, store, base = env
    sql = (
        f"SELECT toStartOfHour(ts) AS h, country, count() AS n FROM events "
        f"WHERE event_type = 'page_view' AND {_range_sql(base, 1, 2)} "
        "GROUP BY h, country ORDER BY h, country"
    )
    assert _compare(svc, store, sql, "exact") == ""
    revised = (base + 2 * DAY_MS + 3_600_000, base + 2 * DAY_MS + 7_200_000)
    svc.day_answers.mark_stale(*revised)
    svc.tier.invalidate(*revised)
    assert "revised" in _declined(svc, sql)
    # The days around it are still answered.
    assert _declined(svc, sql.replace(_range_sql(base, 1, 2), _range_sql(base, 0, 2))) == ""
    assert _declined(svc, sql.replace(_range_sql(base, 1, 2), _range_sql(base, 3, 2))) == ""


def test_two_outputs_of_one_name_are_declined(env: Any) -> None:
    """The engine rejects two different expressions under one alias
    (Code 179); the tier answered them. One expression twice is fine."""
    svc, store, base = env
    where = f"WHERE event_type = 'page_view' AND {_range_sql(base)}"
    for sql in (
        f"SELECT count() AS h, toStartOfHour(ts) AS h FROM events {where} GROUP BY h",
        f"SELECT country AS c, lower(country) AS c, count() FROM events {where} "
        "GROUP BY country, lower(country)",
    ):
        assert "named" in _declined(svc, sql), sql
        with pytest.raises(Exception, match="Multiple expressions"):
            store.query_rows(svc.router.route(sandbox.check(sql)).sql)
    same = (
        f"SELECT country AS c, country AS c, count() AS n, count() AS n FROM events {where} "
        "GROUP BY country ORDER BY c"
    )
    assert _compare(svc, store, same, "exact") == ""

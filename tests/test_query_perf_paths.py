"""The query layer's fast paths give the same answers as plain references.

* Funnels: the vectorized per-step formulation (``funnel_sql``) against a
  Python fold over every event (levels and time to convert) and against
  the brute-force greedy reference of test_query_api, on random data full
  of ties, repeated step types and multi-condition steps; and a funnel of
  many steps still compiles and counts every level.
* DAU: complete days served from the per-day cache, open days from the
  store, and a late event for an old day changes that day on the next
  request.
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from tests.fixtures_query import DAY_MS, CountingStore, base_day_ms, load, make_rows
from tests.test_query_api import _step_row, iso, ref_dau, ref_funnel

from strata.config import load_config
from strata.query.api import CoreAPI, core_routes
from strata.query.metrics_api import (
    FAST_FUNNEL_MAX_STEPS,
    _step_condition,
    _utc,
    funnel_sql_fold,
    funnel_sql_steps,
    steps_exclusive,
)
from strata.server.pipeline import Pipeline

ADMIN = "adm_perf_paths"


class Env:
    def __init__(self, pipeline: Pipeline, client: TestClient, base: int) -> None:
        self.pipeline = pipeline
        self.client = client
        self.base = base
        self.rows: list[dict[str, Any]] = []
        self.headers = {"Authorization": f"Bearer {ADMIN}"}

    def add(self, rows: list[dict[str, Any]], token: str) -> None:
        load(self.pipeline.store, rows, token)
        self.rows.extend(rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("perf_paths")),
            "auth.admin_tokens": [ADMIN],
            "query.cache_ttl": "600s",
            "query.open_range_cache_ttl": "600s",
        }
    )
    pipeline = Pipeline.open(config)
    base = base_day_ms(20)
    app = Starlette(routes=core_routes(CoreAPI(pipeline)))
    with TestClient(app) as client:
        yield Env(pipeline, client, base)
    pipeline.stop()


def fold_reference(
    rows: list[dict[str, Any]], steps: list[dict[str, str]], window: int, start: int, end: int
) -> tuple[list[int], list[float | None]]:
    """Users per level and mean time to convert, by the fold the funnel is
    defined by (docs/query.md): per user, events sorted by (time, matched
    steps); ``acc[k]`` the latest start of a chain at step k, ``ttc[k]``
    the time the chain took when step k was first reached."""
    n = len(steps)
    per_user: dict[str, list[tuple[int, tuple[int, ...]]]] = defaultdict(list)
    for r in rows:
        if not start <= r["ts"] < end + window:
            continue
        matched = tuple(
            k + 1
            for k, step in enumerate(steps)
            if all(r[c] == v for c, v in step.items()) and (k > 0 or r["ts"] < end)
        )
        if matched:
            per_user[r["distinct_id"]].append((r["ts"], matched))
    users = [0] * n
    times: list[list[int]] = [[] for _ in range(n)]
    for events in per_user.values():
        events.sort()
        acc = [-1] * (n + 1)
        ttc = [-1] * (n + 1)
        for ts, matched in events:
            new = acc[:]
            for k in range(1, n + 1):
                if k not in matched:
                    continue
                if k == 1:
                    new[1] = ts
                elif acc[k - 1] >= 0 and ts - acc[k - 1] <= window:
                    new[k] = max(acc[k], acc[k - 1])
                if ttc[k] < 0 and new[k] >= 0:
                    ttc[k] = ts - new[k]
            acc = new
        if acc[1] < 0:
            continue
        for k in range(1, n + 1):
            if acc[k] >= 0:
                users[k - 1] += 1
                times[k - 1].append(ttc[k])
    return users, [statistics.fmean(t) if t else None for t in times]


def _random_rows(base: int, seed: int, users: int = 60) -> list[dict[str, Any]]:
    """Events on a coarse time grid (many equal timestamps), few types."""
    rng = random.Random(seed)
    rows = []
    for u in range(users):
        for i in range(rng.randint(1, 40)):
            ts = base + rng.randint(0, 48) * 600_000
            row = _step_row(f"r{seed}-{u}", 0, ts, f"rand{seed}-{u}-{i}")
            row["event_type"] = rng.choice(["a", "b", "c", "d"])
            row["platform"] = rng.choice(["web", "ios"])
            row["country"] = rng.choice(["US", "DE"])
            rows.append(row)
    return rows


def _funnel(env: Env, body: dict[str, Any]) -> dict[str, Any]:
    response = env.client.post("/v1/metrics/funnel", json=body, headers=env.headers)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_funnel_matches_fold_and_greedy_references_on_random_data(env: Env, seed: int) -> None:
    base = env.base + seed * DAY_MS
    env.add(_random_rows(base, seed), f"rand-{seed}")
    rng = random.Random(100 + seed)
    for attempt in range(6):
        steps: list[dict[str, str]] = []
        if attempt < 2:  # distinct event types: the packed (exclusive) query
            steps = [{"event_type": t} for t in rng.sample(["a", "b", "c", "d"], rng.randint(2, 4))]
            assert steps_exclusive(steps)
        for _ in range(rng.randint(2, 6) if attempt >= 2 else 0):
            step = {"event_type": rng.choice(["a", "b", "c", "d"])}
            if rng.random() < 0.3:
                step["platform"] = "web"
            steps.append(step)
        window = rng.choice([600_000, 3_600_000, 4 * 3_600_000])
        start, end = base, base + 6 * 3_600_000
        body = _funnel(
            env,
            {"steps": steps, "window": f"{window // 1000}s", "from": iso(start), "to": iso(end)},
        )
        users, mean_ttc = fold_reference(env.rows, steps, window, start, end)
        greedy = ref_funnel(env.rows, steps, window, start, end).get("", [0] * len(steps))
        assert users == greedy, (steps, window)
        got = body["rows"][0]["steps"] if body["rows"] else []
        assert [s["users"] for s in got] == (users if users[0] else [])
        for level, expected in zip(got, mean_ttc, strict=False):
            if expected is None:
                assert level["avg_ms_to_convert"] is None
            else:
                assert level["avg_ms_to_convert"] == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("breakdown", [None, "country"])
def test_fast_and_general_funnel_paths_agree_on_random_data(
    env: Env, breakdown: str | None
) -> None:
    base = env.base + 5 * DAY_MS
    env.add(_random_rows(base, 7, users=80), f"paths-{breakdown}")
    rng = random.Random(7 if breakdown else 8)
    for attempt in range(6):
        if attempt % 2:
            steps = [{"event_type": rng.choice(["a", "b", "c", "d"])} for _ in range(9)]
        else:
            steps = [{"event_type": t} for t in rng.sample(["a", "b", "c"], 3)]
            steps += [{"event_type": "d", "platform": p} for p in ("ios", "web")]
        parameters: dict[str, Any] = {
            "start": _utc(base),
            "end": _utc(base + 6 * 3_600_000),
            "until": _utc(base + 10 * 3_600_000),
        }
        conditions = [_step_condition(i, step, parameters) for i, step in enumerate(steps)]
        store = env.pipeline.store
        window = 4 * 3_600_000
        general = store.query_rows(funnel_sql_fold(conditions, window, breakdown), parameters)
        variants = [False, True] if steps_exclusive(steps) else [False]
        assert variants == ([False] if attempt % 2 else [False, True])
        for exclusive in variants:
            sql = funnel_sql_steps(conditions, window, breakdown, exclusive)
            fast = store.query_rows(sql, parameters)
            # users and mean time to convert; the median is ClickHouse's sampled one
            assert [r[:3] for r in fast[1]] == [r[:3] for r in general[1]]
            means = [r[3] for r in general[1]]
            assert [r[3] for r in fast[1]] == pytest.approx(means, nan_ok=True)
            assert fast[1] and fast[1][0][2] > 0


def test_steps_exclusive() -> None:
    assert steps_exclusive([{"event_type": "a"}, {"event_type": "b"}])
    assert not steps_exclusive([{"event_type": "a"}, {"event_type": "a"}])
    assert not steps_exclusive([{"event_type": "a"}, {"platform": "web"}])
    assert steps_exclusive([{"event_type": "a", "platform": "ios"}, {"platform": "web"}])
    assert not steps_exclusive([{"event_type": "a"}, {"event_type": "a", "platform": "web"}])


def test_many_step_funnel_counts_every_level(env: Env) -> None:
    base = env.base + 10 * DAY_MS
    n = 150
    assert n > FAST_FUNNEL_MAX_STEPS  # the general path
    rows = []
    for u in range(6):
        t = base + u * 1000
        for k in range(n - u):  # user u stops u steps before the end
            t += 10
            rows.append(_step_row(f"m{u}", k, t, f"many-{u}-{k}"))
    env.add(rows, "many")
    steps = [{"event_type": f"step{k:02d}"} for k in range(n)]
    body = _funnel(
        env, {"steps": steps, "window": "1h", "from": iso(base), "to": iso(base + DAY_MS)}
    )
    got = [s["users"] for s in body["rows"][0]["steps"]]
    assert got == [max(0, min(6, n - k)) for k in range(n)]
    assert got[-1] == 1 and got[n - 6] == 6


# -- DAU: per-day cache of complete days -------------------------------------------------------
def test_dau_caches_complete_days_and_late_data_revises_them(env: Env) -> None:
    from strata.query.service import QueryService

    base = env.base + 12 * DAY_MS
    rows = make_rows(1500, start_ms=base, span_ms=6 * DAY_MS, users=70, seed=21, id_prefix="d")
    env.add(rows, "dau-1")
    watermark = [base + 4 * DAY_MS + 3_600_000]  # days 0-3 complete, 4-5 open
    pipeline = env.pipeline
    counting = CountingStore(pipeline.store)
    # Open ranges are not cached here, so every request queries its open days.
    config = msgspec.structs.replace(
        pipeline.config,
        query=msgspec.structs.replace(pipeline.config.query, open_range_cache_ttl="0s"),
    )
    pipeline._query = QueryService(config, lambda: counting, lambda: watermark[0])
    bob = pipeline.keyring.create_token("bob", ["metrics"])
    start, end = base, base + 6 * DAY_MS
    params = {"from": iso(start), "to": iso(end)}

    def dau(token: str = ADMIN, query: dict[str, str] = params) -> dict[str, Any]:
        response = env.client.get(
            "/v1/metrics/dau", params=query, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200, response.text
        return response.json()

    def values(body: dict[str, Any]) -> dict[str, int]:
        return {r["day"]: r["users"] for r in body["rows"]}

    first = dau()
    assert values(first) == ref_dau(env.rows, start, end)
    assert first["cache"] == "miss" and first["granules_cached"] == 0
    assert first["served_from"] == "rollup_1d"
    assert first["complete_until"] == iso(watermark[0]) and first["open_windows"] is True
    assert first["revised"] is False

    queries = counting.queries
    second = dau()
    assert values(second) == values(first)
    assert second["cache"] == "miss" and second["granules_cached"] == 4
    assert second["granules_computed"] == 2 and second["served_from"] == "rollup_1d"
    assert counting.queries == queries + 1  # the two open days only
    assert dau(bob)["granules_cached"] == 0  # never another user's entries

    # A late event for day 1 from a new user: the next answer counts it.
    day1 = base + DAY_MS + 7_200_000
    late = make_rows(1, start_ms=day1, span_ms=1, users=1, seed=22, id_prefix="late")
    late[0]["distinct_id"] = late[0]["user_id"] = "late-user"
    env.add(late, "dau-late")
    pipeline.on_late_rows([day1])
    revised = dau()
    day = iso(day1)[:10]
    assert values(revised)[day] == values(first)[day] + 1
    assert values(revised) == ref_dau(env.rows, start, end)
    assert revised["revised"] is True and revised["granules_cached"] == 3

    # A range that is complete: every day from the cache, no store query.
    closed = {"from": iso(start), "to": iso(base + 4 * DAY_MS)}
    dau(query=closed)
    queries = counting.queries
    body = dau(query=closed)
    assert body["cache"] == "hit" and body["open_windows"] is False
    assert counting.queries == queries
    assert values(body) == ref_dau(env.rows, start, base + 4 * DAY_MS)


def test_dau_with_open_days_is_a_hit_when_the_open_part_is_cached(env: Env) -> None:
    """A range that reaches into open days answers ``cache: hit`` on a repeat
    within the open-range TTL: the complete days come from the per-day
    cache and the open ones from the result cache, and the store is not
    queried (the benchmark of cache hits times exactly this request)."""
    from strata.query.service import QueryService

    base = env.base + 40 * DAY_MS
    rows = make_rows(600, start_ms=base, span_ms=3 * DAY_MS, users=40, seed=31, id_prefix="o")
    env.add(rows, "dau-open")
    watermark = base + 2 * DAY_MS + 3_600_000  # days 0-1 complete, day 2 open
    counting = CountingStore(env.pipeline.store)
    config = msgspec.structs.replace(
        env.pipeline.config,
        query=msgspec.structs.replace(env.pipeline.config.query, open_range_cache_ttl="10m"),
    )
    env.pipeline._query = QueryService(config, lambda: counting, lambda: watermark)
    params = {"from": iso(base), "to": iso(base + 3 * DAY_MS)}

    def dau() -> dict[str, Any]:
        response = env.client.get("/v1/metrics/dau", params=params, headers=env.headers)
        assert response.status_code == 200, response.text
        return response.json()

    first = dau()
    assert first["cache"] == "miss" and first["open_windows"] is True
    queries = counting.queries
    second = dau()
    assert second["cache"] == "hit" and second["rows"] == first["rows"]
    assert counting.queries == queries
    assert {r["day"]: r["users"] for r in second["rows"]} == ref_dau(
        env.rows, base, base + 3 * DAY_MS
    )


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_cache_get_many_in_order_and_after_invalidation(backend: str, redis_url: str) -> None:
    from strata.query.cache import MemoryCache, RedisCache, ResultCache, fingerprint
    from strata.query.results import QueryResult
    from strata.query.router import TimeRange

    cache: ResultCache = (
        MemoryCache() if backend == "memory" else RedisCache(redis_url, prefix="strata:gm:")
    )
    cache.clear()
    try:
        ranges = [TimeRange(d * DAY_MS, (d + 1) * DAY_MS) for d in range(5)]
        keys = [fingerprint("dau", r, "alice", "dau:granule") for r in ranges]
        for day, (key, time_range) in enumerate(zip(keys, ranges, strict=True)):
            if day != 2:
                cache.put(key, QueryResult(["users"], [(day,)]), 60_000, time_range)
        got = cache.get_many(keys)
        assert [g.rows if g else None for g in got] == [[(0,)], [(1,)], None, [(3,)], [(4,)]]
        assert cache.invalidate(3 * DAY_MS + 5, 3 * DAY_MS + 6) == 1
        got = cache.get_many(keys)
        assert [g is not None for g in got] == [True, True, False, False, True]
        assert cache.get_many([]) == []
    finally:
        cache.clear()
        cache.close()


def test_revenue_and_top_revenue_on_the_raw_path(env: Env) -> None:
    """``path`` is no rollup dimension, so these run on raw events (where a
    ``sum(revenue) AS revenue`` alias once broke ``WHERE revenue > 0``)."""
    base = env.base + 30 * DAY_MS
    rows = make_rows(600, start_ms=base, span_ms=DAY_MS, users=30, seed=31, id_prefix="rv")
    env.add(rows, "revenue-raw")
    params = {"from": iso(base), "to": iso(base + DAY_MS), "filter.path": "/"}
    mine = [r for r in rows if r["path"] == "/" and r["revenue"] > 0]
    response = env.client.get("/v1/metrics/revenue", params=params, headers=env.headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["served_from"] == "raw"
    assert [(r["revenue"], r["orders"]) for r in body["rows"]] == [
        (sum(r["revenue"] for r in mine), len(mine))
    ]
    response = env.client.get(
        "/v1/metrics/top",
        params={**params, "dimension": "country", "measure": "revenue", "n": "10"},
        headers=env.headers,
    )
    assert response.status_code == 200, response.text
    by_country: dict[str, float] = defaultdict(float)
    for r in mine:
        by_country[r["country"]] += r["revenue"]
    got = {r["value"]: r["revenue"] for r in response.json()["rows"]}
    assert got == dict(by_country)

"""Metrics API and SQL endpoint against a real Pipeline/Store (chDB in tmp),
checked against small Python references computed over the raw rows."""

from __future__ import annotations

import io
import random
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from tests.fixtures_query import DAY_MS, CountingStore, base_day_ms, load, make_rows

from strata.config import load_config
from strata.query.api import CoreAPI, core_routes
from strata.server.pipeline import Pipeline

ADMIN = "adm_query_test"


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def day_of(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()


class Env:
    def __init__(
        self,
        pipeline: Pipeline,
        client: TestClient,
        rows: list[dict[str, Any]],
        base: int,
        tokens: dict[str, str],
    ) -> None:
        self.pipeline = pipeline
        self.client = client
        self.rows = rows
        self.base = base
        self.tokens = tokens

    def headers(self, user: str = "alice", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}", **extra}

    def add(self, rows: list[dict[str, Any]], token: str) -> None:
        load(self.pipeline.store, rows, token)
        self.rows.extend(rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    config = load_config(
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("query_api")),
            "auth.admin_tokens": [ADMIN],
            # No processor runs here, so every range counts as open; keep
            # open answers long enough that a slow machine still sees hits.
            "query.open_range_cache_ttl": "600s",
            "query.user_limits": {"limited": {"rate_limit_per_minute": 1, "rate_limit_burst": 3}},
        }
    )
    pipeline = Pipeline.open(config)
    tokens = {
        user: pipeline.keyring.create_token(user, ["metrics", "sql"])
        for user in ("alice", "bob", "limited")
    }
    tokens["admin"] = ADMIN
    base = base_day_ms(12)
    rows = make_rows(4000, start_ms=base, span_ms=8 * DAY_MS, users=80, seed=3)
    load(pipeline.store, rows, "api-1")
    app = Starlette(routes=core_routes(CoreAPI(pipeline)))
    with TestClient(app) as client:
        yield Env(pipeline, client, rows, base, tokens)
    pipeline.stop()


# -- references ---------------------------------------------------------------------------
def ref_dau(rows: list[dict[str, Any]], start: int, end: int) -> dict[str, int]:
    users: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if start <= r["ts"] < end:
            users[day_of(r["ts"])].add(r["distinct_id"])
    return {day: len(u) for day, u in users.items()}


def ref_rolling(rows: list[dict[str, Any]], start: int, end: int, days: int) -> dict[str, int]:
    out = {}
    for day_start in range(start, end, DAY_MS):
        lower = day_start - (days - 1) * DAY_MS
        users = {r["distinct_id"] for r in rows if lower <= r["ts"] < day_start + DAY_MS}
        if users:
            out[day_of(day_start)] = len(users)
    return out


def ref_funnel(
    rows: list[dict[str, Any]],
    steps: list[dict[str, str]],
    window: int,
    start: int,
    end: int,
    breakdown: str | None = None,
) -> dict[str, list[int]]:
    """Brute force: for every step-1 event as a start, match the next steps
    greedily (earliest next event in order within the window); a user's
    level is the best over starts. Returns breakdown value -> users per step."""
    per_user: dict[str, list[tuple[int, tuple[int, ...], dict[str, Any]]]] = defaultdict(list)
    for r in rows:
        if not start <= r["ts"] < end + window:
            continue
        matched = tuple(
            k + 1
            for k, step in enumerate(steps)
            if all(r[c] == v for c, v in step.items()) and (k > 0 or r["ts"] < end)
        )
        if matched:
            per_user[r["distinct_id"]].append((r["ts"], matched, r))
    result: dict[str, list[int]] = {}
    for events in per_user.values():
        events.sort(key=lambda e: (e[0], e[1]))
        best = 0
        firsts = [e for e in events if 1 in e[1]]
        if not firsts:
            continue
        for i, (t0, matched, _) in enumerate(events):
            if 1 not in matched:
                continue
            level, position = 1, i
            while level < len(steps):
                nxt = next(
                    (
                        j
                        for j in range(position + 1, len(events))
                        if level + 1 in events[j][1] and events[j][0] - t0 <= window
                    ),
                    None,
                )
                if nxt is None:
                    break
                level, position = level + 1, nxt
            best = max(best, level)
        group = str(min(firsts, key=lambda e: e[0])[2][breakdown]) if breakdown else ""
        counts = result.setdefault(group, [0] * len(steps))
        for k in range(best):
            counts[k] += 1
    return result


def ref_retention(
    rows: list[dict[str, Any]], start: int, end: int, days: int
) -> dict[str, tuple[int, list[int]]]:
    first: dict[str, int] = {}
    active: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        if r["ts"] < end:
            first[r["distinct_id"]] = min(first.get(r["distinct_id"], r["ts"]), r["ts"])
        if start <= r["ts"] < end + (days + 1) * DAY_MS:
            active[r["distinct_id"]].add(r["ts"] // DAY_MS)
    cohorts: dict[str, tuple[int, list[int]]] = {}
    for user, ts in first.items():
        cohort_day = ts // DAY_MS
        if not start // DAY_MS <= cohort_day < end // DAY_MS:
            continue
        key = day_of(ts)
        size, returned = cohorts.get(key, (0, [0] * (days + 1)))
        for n in range(days + 1):
            if cohort_day + n in active[user]:
                returned[n] += 1
        cohorts[key] = (size + 1, returned)
    return cohorts


# -- metrics API ----------------------------------------------------------------------------
def test_dau_from_rollup_matches_reference(env: Env) -> None:
    start, end = env.base, env.base + 8 * DAY_MS
    response = env.client.get(
        "/v1/metrics/dau", params={"from": iso(start), "to": iso(end)}, headers=env.headers()
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["served_from"] == "rollup_1d"
    for field in ("complete_until", "open_windows", "revised", "served_from"):
        assert field in body
    assert {r["day"]: r["users"] for r in body["rows"]} == ref_dau(env.rows, start, end)
    exact = env.client.get(
        "/v1/metrics/dau",
        params={"from": iso(start), "to": iso(end), "exact": "true"},
        headers=env.headers(),
    ).json()
    assert exact["served_from"] == "raw"
    assert {r["day"]: r["users"] for r in exact["rows"]} == ref_dau(env.rows, start, end)


@pytest.mark.parametrize(("path", "days"), [("wau", 7), ("mau", 30)])
def test_rolling_active_users_match_reference(env: Env, path: str, days: int) -> None:
    start, end = env.base + 2 * DAY_MS, env.base + 9 * DAY_MS
    body = env.client.get(
        f"/v1/metrics/{path}", params={"from": iso(start), "to": iso(end)}, headers=env.headers()
    ).json()
    assert body["served_from"] == "rollup_1d"
    assert {r["day"]: r["users"] for r in body["rows"]} == ref_rolling(env.rows, start, end, days)
    filtered = env.client.get(
        f"/v1/metrics/{path}",
        params={"from": iso(start), "to": iso(end), "country": "DE"},
        headers=env.headers(),
    ).json()
    de_rows = [r for r in env.rows if r["country"] == "DE"]
    assert {r["day"]: r["users"] for r in filtered["rows"]} == ref_rolling(
        de_rows, start, end, days
    )


def test_funnel_with_breakdown_matches_reference(env: Env) -> None:
    steps = [
        {"event_type": "page_view"},
        {"event_type": "add_to_cart"},
        {"event_type": "purchase", "platform": "web"},
    ]
    start, end = env.base, env.base + 5 * DAY_MS
    body = env.client.post(
        "/v1/metrics/funnel",
        json={
            "steps": steps,
            "window": "12h",
            "from": iso(start),
            "to": iso(end),
            "breakdown": "country",
        },
        headers=env.headers(),
    ).json()
    expected = ref_funnel(env.rows, steps, 12 * 3_600_000, start, end, "country")
    got = {b["value"]: [s["users"] for s in b["steps"]] for b in body["rows"]}
    assert got == expected
    assert any(counts[-1] > 0 for counts in got.values())  # someone converted
    first = body["rows"][0]["steps"]
    assert first[0]["avg_ms_to_convert"] == 0.0
    assert first[-1]["avg_ms_to_convert"] is None or first[-1]["avg_ms_to_convert"] > 0


def _forty_step_rows(base: int, users: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for u in range(users):
        t = base + rng.randint(0, 3 * 3_600_000)
        depth = rng.randint(1, 40) if u % 4 else 40
        for k in range(depth):
            t += rng.randint(1, 120_000) if rng.random() > 0.03 else rng.randint(0, 3_600_000)
            rows.append(_step_row(f"f{u}", k, t, f"fun{seed}-{u}-{k}"))
    return rows


def _step_row(user: str, k: int, ts: int, event_id: str) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "event_type": f"step{k:02d}",
        "user_id": user,
        "anonymous_id": "",
        "distinct_id": user,
        "session_id": "",
        "ts": ts,
        "received_at": ts,
        "country": "US",
        "platform": "web",
        "os": "",
        "app_version": "",
        "path": "/",
        "referrer": "",
        "revenue": 0.0,
        "currency": "",
        "properties": "{}",
    }


def test_forty_step_funnel_and_late_events(env: Env) -> None:
    base = env.base + DAY_MS
    env.add(_forty_step_rows(base, 120, seed=11), "fun-1")
    steps = [{"event_type": f"step{k:02d}"} for k in range(40)]
    request = {"steps": steps, "window": "2h", "from": iso(base), "to": iso(base + DAY_MS)}
    window = 2 * 3_600_000

    def funnel() -> dict[str, Any]:
        response = env.client.post("/v1/metrics/funnel", json=request, headers=env.headers())
        assert response.status_code == 200, response.text
        return response.json()

    body = funnel()
    got = [s["users"] for s in body["rows"][0]["steps"]]
    expected = ref_funnel(env.rows, steps, window, base, base + DAY_MS)[""]
    assert got == expected
    assert got[39] > 0 and got[0] > got[39]  # no silent zeros at depth 40

    # Late events: users stuck at step k now complete step k+1 (old timestamps).
    late = []
    for u in range(1, 120, 4):
        mine = sorted((r for r in env.rows if r["distinct_id"] == f"f{u}"), key=lambda r: r["ts"])
        if len(mine) < 40:
            k = len(mine)
            late.append(_step_row(f"f{u}", k, mine[-1]["ts"] + 1000, f"late-{u}"))
    assert late
    env.add(late, "fun-late")
    assert funnel()["cache"] == "hit"  # stale until told: the hook below is the contract
    env.pipeline.on_late_rows([r["ts"] for r in late])
    revised = funnel()
    assert revised["cache"] == "miss" and revised["revised"] is True
    got = [s["users"] for s in revised["rows"][0]["steps"]]
    assert got == ref_funnel(env.rows, steps, window, base, base + DAY_MS)[""]


def test_retention_matches_reference(env: Env) -> None:
    start, end = env.base, env.base + 4 * DAY_MS
    body = env.client.get(
        "/v1/metrics/retention",
        params={"from": iso(start), "to": iso(end), "days": "5"},
        headers=env.headers(),
    ).json()
    expected = ref_retention(env.rows, start, end, 5)
    got = {r["cohort"]: (r["users"], r["returned"]) for r in body["rows"]}
    assert got == expected


def test_count_revenue_and_top(env: Env) -> None:
    start, end = env.base, env.base + 3 * DAY_MS
    window = {"from": iso(start), "to": iso(end)}
    inside = [r for r in env.rows if start <= r["ts"] < end]
    count = env.client.get(
        "/v1/metrics/count",
        params={**window, "granularity": "1d", "group_by": "event_type"},
        headers=env.headers(),
    ).json()
    assert count["served_from"] == "rollup_1d"
    assert sum(r["events"] for r in count["rows"]) == len(inside)
    revenue = env.client.get(
        "/v1/metrics/revenue", params={**window, "granularity": "1h"}, headers=env.headers()
    ).json()
    assert revenue["served_from"] == "rollup_5m"
    assert sum(r["revenue"] for r in revenue["rows"]) == sum(r["revenue"] for r in inside)
    top = env.client.get(
        "/v1/metrics/top",
        params={**window, "dimension": "country", "n": "2", "event_type": "page_view"},
        headers=env.headers(),
    ).json()
    views: dict[str, int] = defaultdict(int)
    for r in inside:
        if r["event_type"] == "page_view":
            views[r["country"]] += 1
    best = sorted(views.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    assert [(r["value"], r["events"]) for r in top["rows"]] == best
    assert top["served_from"].startswith("rollup")


def test_metrics_bad_input_is_a_clear_4xx(env: Env) -> None:
    cases = [
        ("get", "/v1/metrics/count", {"granularity": "7m"}, "granularity"),
        ("get", "/v1/metrics/top", {"dimension": "nope"}, "dimension"),
        ("get", "/v1/metrics/retention", {"days": "x"}, "days"),
        ("get", "/v1/metrics/active-users", {"window": "2d"}, "window"),
        ("get", "/v1/metrics/dau", {"from": "yesterday"}, "from"),
        # found by schemathesis: a year-11476 bound overflowed to a 500
        ("get", "/v1/metrics/events", {"to": "300000000000000"}, "to"),
        ("get", "/v1/metrics/dau", {"from": "-5"}, "from"),
        ("get", "/v1/metrics/count", {"to": "9999-12-31T00:00:00Z"}, "to"),
        # found by schemathesis: "²" is a digit to str.isdigit(), not to int()
        ("get", "/v1/metrics/events", {"from": "\u00b2"}, "from"),
        ("get", "/v1/metrics/dau", {"to": "-\u0663"}, "to"),
    ]
    for method, path, params, field in cases:
        response = getattr(env.client, method)(path, params=params, headers=env.headers())
        assert response.status_code == 400 and field in response.json()["error"], path
    bad_funnels = [
        ({"steps": [{"event_type": "a"}]}, "steps"),
        ({"steps": [{"nope": "a"}, {"event_type": "b"}]}, "steps[0].nope"),
        ({"steps": ["a", "b"], "window": "soon"}, "window"),
        ({"steps": ["a", "b"], "breakdown": "password"}, "breakdown"),
    ]
    for body, field in bad_funnels:
        response = env.client.post("/v1/metrics/funnel", json=body, headers=env.headers())
        assert response.status_code == 400 and field in response.json()["error"], body
    assert env.client.get("/v1/metrics/dau").status_code == 401


# -- SQL endpoint --------------------------------------------------------------------------------
SQL = "SELECT toDate(ts) AS day, count() AS n FROM events WHERE event_type = 'signup' GROUP BY day ORDER BY day"


def test_sql_formats_and_explain(env: Env) -> None:
    as_json = env.client.post("/v1/sql", json={"sql": SQL}, headers=env.headers()).json()
    assert as_json["served_from"] == "rollup_1d" and as_json["columns"] == ["day", "n"]
    as_csv = env.client.post("/v1/sql", json={"sql": SQL}, headers=env.headers(accept="text/csv"))
    assert as_csv.headers["content-type"].startswith("text/csv")
    lines = as_csv.text.strip().splitlines()
    assert lines[0] == "day,n" and len(lines) == len(as_json["rows"]) + 1
    assert as_csv.headers["x-strata-served-from"] == "rollup_1d"
    as_arrow = env.client.post(
        "/v1/sql",
        json={"sql": SQL},
        headers=env.headers(accept="application/vnd.apache.arrow.stream"),
    )
    table = pa.ipc.open_stream(io.BytesIO(as_arrow.content)).read_all()
    assert table.column_names == ["day", "n"]
    assert table.column("n").to_pylist() == [r[1] for r in as_json["rows"]]
    assert (
        env.client.post(
            "/v1/sql", json={"sql": SQL}, headers=env.headers(accept="image/png")
        ).status_code
        == 406
    )
    explained = env.client.post(
        "/v1/sql", json={"sql": SQL, "explain": True}, headers=env.headers()
    ).json()
    assert explained["executed"] is False
    assert "countMerge" in explained["explain"]["sql"]
    assert explained["explain"]["table"] == "rollup_events_by_type_1d"


def test_cache_hit_skips_store_and_never_crosses_users(env: Env) -> None:
    real = env.pipeline.store
    counting = CountingStore(real)
    env.pipeline.store = counting
    try:
        sql = "SELECT country, count() AS n FROM events WHERE event_type = 'page_view' GROUP BY country ORDER BY country"
        first = env.client.post("/v1/sql", json={"sql": sql}, headers=env.headers("alice")).json()
        assert first["cache"] == "miss" and counting.queries == 1
        again = env.client.post(
            "/v1/sql",
            json={
                "sql": "select country, COUNT() as n from events  -- same\n where "
                "event_type = 'page_view' group by country order by country"
            },
            headers=env.headers("alice"),
        ).json()
        assert again["cache"] == "hit" and counting.queries == 1
        assert again["rows"] == first["rows"]
        other = env.client.post("/v1/sql", json={"sql": sql}, headers=env.headers("bob")).json()
        assert other["cache"] == "miss" and counting.queries == 2
        # Late data in the range invalidates; the next answer includes it.
        late = make_rows(50, start_ms=env.base, span_ms=DAY_MS, seed=99, id_prefix="late")
        env.add(late, "late-sql")
        env.pipeline.on_revised(env.base, env.base + DAY_MS)
        fresh = env.client.post("/v1/sql", json={"sql": sql}, headers=env.headers("alice")).json()
        assert fresh["cache"] == "miss" and fresh["revised"] is True
        expected = defaultdict(int)
        for r in env.rows:
            if r["event_type"] == "page_view":
                expected[r["country"]] += 1
        assert {c: n for c, n in fresh["rows"]} == dict(expected)
    finally:
        env.pipeline.store = real


def test_rate_limit_refuses_one_user_and_serves_another(env: Env) -> None:
    statuses = []
    for _ in range(6):
        response = env.client.post(
            "/v1/sql", json={"sql": "SELECT 1"}, headers=env.headers("limited")
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert "rate limit" in response.json()["error"]
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
    served = env.client.post("/v1/sql", json={"sql": "SELECT 1"}, headers=env.headers("bob"))
    assert served.status_code == 200


def test_token_admin_api(env: Env) -> None:
    admin = env.headers("admin")
    created = env.client.post(
        "/v1/admin/tokens", json={"user": "carol", "scopes": ["metrics"]}, headers=admin
    )
    assert created.status_code == 201
    token = created.json()["token"]
    listed = env.client.get("/v1/admin/tokens", headers=admin).json()["tokens"]
    assert any(t["user"] == "carol" and t["scopes"] == ["metrics"] for t in listed)
    assert all("hash" not in t and "token" not in t for t in listed)
    carol = {"Authorization": f"Bearer {token}"}
    assert env.client.get("/v1/metrics/dau", headers=carol).status_code == 200
    assert env.client.post("/v1/sql", json={"sql": "SELECT 1"}, headers=carol).status_code == 403
    assert env.client.get("/v1/admin/tokens", headers=env.headers("alice")).status_code == 403
    assert (
        env.client.post(
            "/v1/admin/tokens", json={"user": "x", "scopes": ["root"]}, headers=admin
        ).status_code
        == 400
    )
    assert env.client.delete("/v1/admin/tokens/carol", headers=admin).json()["revoked"] == 1
    env.pipeline.keyring._reload(force=True)
    assert env.client.get("/v1/metrics/dau", headers=carol).status_code == 401
    assert env.client.delete("/v1/admin/tokens/carol", headers=admin).status_code == 404


def test_open_ranges_are_cached_briefly(env: Env) -> None:
    service = env.pipeline.query
    closed = {"open_windows": False}
    assert service.ttl_for(closed) == service.cache_ttl_ms == 60_000
    assert service.ttl_for({"open_windows": True}) == service.open_ttl_ms
    # Without a watermark nothing is known to be complete.
    from strata.query.router import TimeRange

    assert service.completeness(TimeRange(0, 1))["open_windows"] is (service.watermark() is None)


def test_openapi_and_docs_page(env: Env) -> None:
    spec = env.client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in ("/v1/sql", "/v1/metrics/funnel", "/v1/metrics/dau", "/v1/admin/tokens"):
        assert path in spec["paths"]
    page = env.client.get("/docs")
    assert page.headers["content-type"].startswith("text/html")
    assert "/v1/metrics/retention" in page.text and "<script" not in page.text
    assert "http://" not in page.text and "https://" not in page.text


# -- SDK query client over real HTTP ----------------------------------------------------------
@pytest.fixture(scope="module")
def http_url(env: Env) -> Iterator[str]:
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Starlette(routes=core_routes(CoreAPI(env.pipeline)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_sdk_query_client_returns_arrow_and_pandas(env: Env, http_url: str) -> None:
    from strata.sdk.client import Client
    from strata.sdk.query import QueryClient, QueryError

    client = QueryClient(http_url, env.tokens["bob"])
    table = client.sql(SQL, output="arrow")
    assert isinstance(table, pa.Table) and table.column_names == ["day", "n"]
    frame = client.sql(SQL)
    assert list(frame.columns) == ["day", "n"] and len(frame) == table.num_rows
    assert client.last_meta["served_from"] == "rollup_1d"
    assert client.explain(SQL)["served_from"] == "rollup_1d"
    dau = client.metric("dau", output="pandas", **{"from": iso(env.base), "to": iso(env.base + DAY_MS)})
    assert list(dau.columns) == ["day", "users"]
    with pytest.raises(QueryError) as refused:
        client.sql("DROP TABLE events")
    assert refused.value.status == 400
    with Client(http_url, "unused-write-key", token=env.tokens["bob"]) as sdk:
        assert sdk.sql(SQL, output="arrow").equals(table)


def test_empty_answers_keep_their_column_names(env: Env) -> None:
    """A query that matches nothing still names its columns in JSON, CSV and
    Arrow (chDB itself names none after a GROUP BY over no rows)."""
    for sql in (
        "SELECT country, count() AS n FROM events WHERE event_type = 'no such type' "
        "GROUP BY country ORDER BY country",
        "SELECT event_id, ts FROM events WHERE event_type = 'no such type'",
    ):
        as_json = env.client.post("/v1/sql", json={"sql": sql}, headers=env.headers()).json()
        assert as_json["rows"] == []
        assert as_json["columns"] == (["country", "n"] if "country" in sql else ["event_id", "ts"])
        as_csv = env.client.post("/v1/sql", json={"sql": sql}, headers=env.headers(accept="text/csv"))
        assert as_csv.text.strip().splitlines() == [",".join(as_json["columns"])]
        as_arrow = env.client.post(
            "/v1/sql", json={"sql": sql}, headers=env.headers(accept="application/vnd.apache.arrow.stream")
        )
        table = pa.ipc.open_stream(io.BytesIO(as_arrow.content)).read_all()
        assert table.column_names == as_json["columns"] and table.num_rows == 0
